"""The real final status of a grpc.aio client call, even when a write raced the server's end.

grpc.aio's client replaces a call's status with INTERNAL ("Internal error from Core") when
a message write fails because the server already ended the call (say, UNIMPLEMENTED
while the client was still streaming requests). A moment later the status the server
really sent arrives and overwrites it. Whoever reads the status in between relays the
invented one. `StatusWatch` records every status the call reports (grpc.aio runs done
callbacks each time it sets one) and answers with the last real one, waiting briefly
for it when only the invented one has been seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import grpc
import grpc.aio

Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]

SYNTHETIC_INTERNAL = "Internal error from Core"
#: How long to wait for the real status after grpc.aio invented an INTERNAL one.
REAL_STATUS_WAIT = 2.0


def _now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a status accessor of a finished call: it completes without suspending."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("status not available synchronously")


def synthetic(status: Status) -> bool:
    return status[0] == grpc.StatusCode.INTERNAL and status[1] == SYNTHETIC_INTERNAL


class StatusWatch:
    """Create right after the call (before any write); `await final()` once the call is over."""

    __slots__ = ("_event", "call", "seen", "write_failed")

    def __init__(self, call: grpc.aio.Call) -> None:
        self.call = call
        self.seen: list[Status] = []
        self.write_failed = False
        self._event = asyncio.Event()
        call.add_done_callback(self._on_status)

    def _on_status(self, call: grpc.aio.Call) -> None:
        try:
            status: Status = (_now(call.code()), _now(call.details()), tuple(_now(call.trailing_metadata())))
        except RuntimeError:
            return
        self.seen.append(status)
        if not synthetic(status):
            self._event.set()

    async def final(self) -> Status:
        code = await self.call.code()
        real = [s for s in self.seen if not synthetic(s)]
        if real:
            return real[-1]
        if code == grpc.StatusCode.INTERNAL and await self.call.details() == SYNTHETIC_INTERNAL:
            # A write lost the race with the server's end (whoever wrote may not even have
            # seen its failure yet); the real status is on the way.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REAL_STATUS_WAIT):
                    await self._event.wait()
            real = [s for s in self.seen if not synthetic(s)]
            if real:
                return real[-1]
        return code, await self.call.details(), tuple(await self.call.trailing_metadata())
