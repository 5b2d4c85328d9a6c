"""Request messages kept for replay, so a retry can send a stream's requests again (both front doors)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from gmesh.chain.call import Call


async def as_async(requests: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    """A plain or async iterable of requests (what grpc.aio accepts) as an async iterator."""
    if isinstance(requests, AsyncIterable):
        async for item in requests:
            yield item
    else:
        for item in requests:
            yield item


#: Request bytes a stream keeps for retries; beyond this, the call is no longer retried.
REPLAY_LIMIT = 1024 * 1024


class RequestTape:
    """The caller's request messages, read once and kept (up to `REPLAY_LIMIT` bytes, as
    `size` counts them) so a retry can send them again to another endpoint.

    Reads are pulled by the attempt that needs the next message (flow control holds), and
    run in a task of their own: cancelling a failed attempt's pump never loses a message.
    Past the limit the tape keeps nothing it has handed out and the call stops being
    replayable. One attempt reads at a time (the retry filter runs them one after another).
    """

    __slots__ = ("_base", "_call", "_ended", "_error", "_iter", "_measure", "_messages", "_reading", "_size")

    def __init__(self, requests: AsyncIterator[Any], call: Call, size: Callable[[Any], int] = len) -> None:
        self._iter = requests.__aiter__()
        self._call = call
        self._measure = size
        self._messages: list[Any] = []
        self._base = 0  # absolute index of self._messages[0]
        self._size = 0
        self._ended = False
        self._error: BaseException | None = None
        self._reading: asyncio.Future[Any] | None = None

    def _read_done(self, future: asyncio.Future[Any]) -> None:
        self._reading = None
        if future.cancelled():
            self._ended = True
            return
        error = future.exception()
        if error is not None:
            self._ended = True
            if not isinstance(error, StopAsyncIteration):
                self._error = error
            return
        message = future.result()
        self._messages.append(message)
        self._size += self._measure(message)
        if self._size > REPLAY_LIMIT:
            self._call.replayable = False

    async def messages(self) -> AsyncIterator[Any]:
        """Every request message from the first, replayed from memory, then read live."""
        i = 0
        while True:
            if i < self._base:
                raise RuntimeError("request stream is past its replay limit")
            if i - self._base < len(self._messages):
                message = self._messages[i - self._base]
                i += 1
                if not self._call.replayable:  # nothing is kept past the limit
                    del self._messages[: i - self._base]
                    self._base = i
                yield message
                continue
            if self._ended:
                if self._error is not None:
                    raise self._error
                return
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._iter.__anext__())
                self._reading.add_done_callback(self._read_done)
            try:
                # shield: a cancelled attempt must not cancel the read the next attempt needs.
                # _read_done was added to the read first, so it has run when this returns.
                await asyncio.shield(self._reading)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this attempt is being cancelled (not the read)
            except Exception:  # the read ended or failed: _read_done recorded it
                pass
