"""Request messages kept for replay, so a retry can send a stream's requests again (both front doors).

What a stream keeps is bounded twice: per call (`REPLAY_LIMIT`, 1 MiB: past it the call is
no longer retried) and per process (`ReplayBudget`: every replay buffer together; when it
is spent, new messages are not kept and those calls go on without retry protection — they
never fail for it). Sizes are real bytes: `len()` of raw frames in the proxy, the encoded
size of an application's messages in the channel. Everything kept is freed as soon as the
call commits (it can no longer be retried) and when it ends.
"""

from __future__ import annotations

import asyncio
import sys
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


class RequestStreamBroken(Exception):
    """The caller's request stream failed (as opposed to ending): the call must fail too."""


#: Request bytes one stream keeps for retries; beyond this, the call is no longer retried.
REPLAY_LIMIT = 1024 * 1024
#: Request bytes all streams of the process keep together (`gmesh proxy --replay-budget`).
DEFAULT_REPLAY_BUDGET = 64 * 1024 * 1024


class ReplayBudget:
    """The bytes every replay buffer of the process holds, against one cap. Event-loop only."""

    __slots__ = ("limit", "refused", "used")

    def __init__(self, limit: int = DEFAULT_REPLAY_BUDGET) -> None:
        self.limit = limit
        self.used = 0
        #: messages not kept because the budget was spent (their calls lost retry protection)
        self.refused = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            self.refused += 1
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


#: The process's budget (one per process: it bounds the process's memory).
REPLAY_BUDGET = ReplayBudget()


def message_size(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], int]:
    """How to count the real bytes of an application's request messages: protobuf messages
    by their encoded size, bytes by length, anything else by what its serializer makes."""

    def size(message: Any) -> int:
        if isinstance(message, (bytes, bytearray, memoryview)):
            return len(message)
        byte_size = getattr(message, "ByteSize", None)
        if byte_size is not None:
            return int(byte_size())
        if serializer is not None:
            return len(serializer(message))
        return sys.getsizeof(message)

    return size


class _Kept:
    """Messages kept for replay and their sizes, charged to the budget; released at commit."""

    __slots__ = (
        "_base",
        "_budget",
        "_call",
        "_measure",
        "_messages",
        "_reader",
        "_size",
        "_sizes",
        "keeping",
    )

    def __init__(self, call: Call[Any], size: Callable[[Any], int], budget: ReplayBudget) -> None:
        self._call = call
        self._measure = size
        self._budget = budget
        self._messages: list[Any] = []
        self._sizes: list[int] = []
        self._base = 0  # absolute index of self._messages[0]
        self._reader = 0  # absolute index of the next message the current reader takes
        self._size = 0
        #: False once the call can no longer be replayed: nothing more is kept
        self.keeping = True

    def _keep(self, message: Any) -> None:
        self._messages.append(message)
        if not self.keeping:
            self._sizes.append(0)
            return
        n = self._measure(message)
        if self._size + n > REPLAY_LIMIT or not self._budget.take(n):
            self._stop()
            self._sizes.append(0)
            return
        self._sizes.append(n)
        self._size += n

    def _stop(self) -> None:
        """No more replays: keep nothing new, give back what is kept (messages still to be
        read by the current attempt stay until it reads them, at no charge)."""
        self.keeping = False
        self._call.replayable = False
        self._budget.give(self._size)
        self._size = 0
        self._sizes = [0] * len(self._sizes)
        self._drop_before(self._reader)  # what the current reader has passed goes at once

    def _drop_before(self, index: int) -> None:
        """Forget the messages before absolute `index` (the reader has passed them)."""
        n = index - self._base
        if n > 0:
            del self._messages[:n]
            del self._sizes[:n]
            self._base = index

    def release(self) -> None:
        """The call committed or ended: it will never be replayed."""
        if self.keeping:
            self._stop()

    @property
    def kept_bytes(self) -> int:
        return self._size


class RequestTape(_Kept):
    """The caller's request messages, read once and kept so a retry can send them again.

    Reads are pulled by the attempt that needs the next message (flow control holds), and
    run in a task of their own: cancelling a failed attempt's pump never loses a message.
    Once the call can no longer be replayed the tape keeps nothing it has handed out. One
    attempt reads at a time (the retry filter runs them one after another).
    """

    __slots__ = ("_closing", "_ended", "_error", "_iter", "_reading")

    def __init__(
        self,
        requests: AsyncIterator[Any],
        call: Call[Any],
        size: Callable[[Any], int] = len,
        budget: ReplayBudget = REPLAY_BUDGET,
    ) -> None:
        super().__init__(call, size, budget)
        self._iter = requests.__aiter__()
        self._ended = False
        self._error: BaseException | None = None
        self._reading: asyncio.Future[Any] | None = None
        self._closing = False

    def _read_done(self, future: asyncio.Future[Any]) -> None:
        self._reading = None
        if future.cancelled():
            self._ended = True
            if not self._closing:
                # The request stream itself raised CancelledError: a broken stream, not its end
                # (a retried call must not send the upstream a truncated request as complete).
                self._error = RequestStreamBroken("the caller's request stream was cancelled")
            return
        error = future.exception()
        if error is not None:
            self._ended = True
            if not isinstance(error, StopAsyncIteration):
                self._error = error
            return
        self._keep(future.result())

    async def messages(self) -> AsyncIterator[Any]:
        """Every request message from the first, replayed from memory, then read live."""
        i = 0
        while True:
            if i < self._base:
                raise RuntimeError("request stream is past its replay limit")
            if i - self._base < len(self._messages):
                message = self._messages[i - self._base]
                i += 1
                self._reader = i
                if not self.keeping:  # nothing is kept that no attempt will read again
                    self._drop_before(i)
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

    def close(self) -> None:
        """The call is over: stop a read in flight and free everything."""
        self._closing = True
        self.release()
        if self._reading is not None:
            self._reading.cancel()
        self._messages.clear()
        self._sizes.clear()


class WrittenTape(_Kept):
    """What an application wrote on a stream itself (`call.write()`), kept so a new attempt
    can be sent all of it. Push, not pull: the application's writes go straight upstream."""

    __slots__ = ("half_closed",)

    def __init__(
        self, call: Call[Any], size: Callable[[Any], int], budget: ReplayBudget = REPLAY_BUDGET
    ) -> None:
        super().__init__(call, size, budget)
        #: the application called done_writing(): a new attempt is half-closed after the replay
        self.half_closed = False

    def record(self, message: Any) -> None:
        if self.keeping:
            self._keep(message)

    def kept(self) -> list[Any]:
        """Everything written so far, in order (empty once the call cannot be replayed)."""
        return self._messages if self.keeping else []

    def _stop(self) -> None:
        super()._stop()
        self._messages.clear()
        self._sizes.clear()
