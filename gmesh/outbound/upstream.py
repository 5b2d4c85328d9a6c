"""The upstream side of a stream, written once for both front doors: its real final status
(`StatusWatch`), its maximum age (`MaxAge`), and how it ended as an `UpstreamError`.

The real final status of a grpc.aio client call, even when a write raced the server's end:

grpc.aio's client replaces a call's status with INTERNAL ("Internal error from Core") when
a message write fails because the server already ended the call (say, UNIMPLEMENTED
while the client was still streaming requests). A moment later the status the server
really sent arrives and overwrites it. Whoever reads the status in between relays the
invented one. `StatusWatch` records every status the call reports (grpc.aio runs done
callbacks when the call ends; the real status may land before the invented one or replace it
later) and answers with the real one, waiting briefly for it when only the invented one has
been seen and a write may have failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import grpc.aio

from gmesh.config.types import format_duration
from gmesh.errors import SYNTHETIC_INTERNAL, CallError, Origin

Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]

#: How often to look for the real status meanwhile (grpc.aio tells nothing when it lands).
STATUS_POLL = 0.002
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
    """Create right after the call (before any write); `await final()` once the call is over.

    `own_writes`: every request write goes through code that counts it in `writing` while it
    runs and sets `write_failed` when one fails (the proxy's pump, the channel's `write()`);
    then an invented INTERNAL with no write failed or under way is final at once. When
    grpc.aio itself consumes a request iterator, a failed write is invisible, so an invented
    INTERNAL always waits for the real status.
    """

    __slots__ = ("_event", "call", "own_writes", "seen", "write_failed", "writing")

    def __init__(self, call: grpc.aio.Call, *, own_writes: bool = True) -> None:
        self.call = call
        self.seen: list[Status] = []
        self.write_failed = False
        #: writes under way now (a write may fail only after the invented status is set)
        self.writing = 0
        self.own_writes = own_writes
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

    def _current(self) -> Status:
        """The status the call holds now, read at once (code and details from the same moment)."""
        call = self.call
        return _now(call.code()), _now(call.details()), tuple(_now(call.trailing_metadata()))

    async def final(self) -> Status:
        await self.call.code()
        real = [s for s in self.seen if not synthetic(s)]
        if real:
            return real[-1]
        status = self._current()
        if synthetic(status) and (self.write_failed or self.writing or not self.own_writes):
            # A write lost the race with the server's end (whoever wrote may not even have
            # seen its failure yet); the real status is on the way. grpc.aio runs done
            # callbacks once: when the real status replaces the invented one, nothing tells
            # us, so look at the call every few ms (up to REAL_STATUS_WAIT).
            deadline = time.monotonic() + REAL_STATUS_WAIT
            while synthetic(status) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STATUS_POLL):
                        await self._event.wait()
                real = [s for s in self.seen if not synthetic(s)]
                if real:
                    return real[-1]
                status = self._current()
        return status


#: Trailer on a stream gmesh ended at its maximum age (the caller should simply reconnect).
MAX_AGE_TRAILER = ("x-gmesh-stream-max-age", "1")


class MaxAge:
    """A stream's maximum age (the Service's `maxStreamAge`), armed once when the call starts —
    never again per retry. When it fires, `expire` ends the upstream side (whichever attempt
    is current); the caller then gets `error()`: UNAVAILABLE between two messages (never a
    reset mid-message), with a trailer saying to reconnect. Up to 10% later at random, so
    streams opened together do not all end together."""

    __slots__ = ("_timer", "age", "expired")

    def __init__(self, age: float, expire: Callable[[], None]) -> None:
        self.age = age
        self.expired = False

        def fire() -> None:
            self.expired = True
            expire()

        self._timer = asyncio.get_running_loop().call_later(age * (1 + random.random() / 10), fire)

    def cancel(self) -> None:
        self._timer.cancel()

    def error(self) -> CallError:
        """What the caller gets: a deliberate end, never counted against the endpoint, never retried."""
        return CallError(
            grpc.StatusCode.UNAVAILABLE,
            f"gmesh: stream reached its maximum age ({format_duration(self.age)}); reconnect",
            (MAX_AGE_TRAILER,),
            origin=Origin.DELIBERATE,
        )
