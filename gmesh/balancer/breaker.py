"""Circuit-breaker state of one service in one mesh: calls and retries in flight, and the calls
waiting for a slot (a FIFO queue, each waiter bounded by its deadline).

The LIMIT-phase breaker filter admits calls through it; the retry filter reads `retries`.
Nothing to reset: a breaker closes by itself as calls finish. Concurrency: event loop only.
"""

from __future__ import annotations

import asyncio
import collections

import grpc

from gmesh.errors import CallError


class BreakerState:
    """Calls and retries in flight to one service, and the calls waiting for a slot."""

    __slots__ = ("active", "endpoint_rejected", "rejected", "retries", "service", "waiting")

    def __init__(self, service: str = "") -> None:
        self.service = service
        self.active = 0
        self.retries = 0
        self.rejected = 0
        #: attempts failed fast because every endpoint tried was at maxRequestsPerEndpoint
        self.endpoint_rejected = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, max_requests: int, max_pending: int, timeout: float | None) -> None:
        """Take a slot: at once when fewer than `max_requests` calls are in flight, else after
        waiting in line (at most `max_pending` wait; `timeout` seconds at most).

        Raises `CallError` UNAVAILABLE when the line is full, DEADLINE_EXCEEDED when the wait
        runs out. A slot handed over just as the wait ends (cancelled, or its deadline firing
        in the same loop turn) is passed on to the next in line, never lost.
        """
        if self.active < max_requests:
            self.active += 1
            return
        if len(self.waiting) >= max_pending:
            self.rejected += 1
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                f"gmesh: circuit breaker of service {self.service!r} is open: {max_requests} calls in "
                f"flight (maxRequests) and {len(self.waiting)} waiting (maxPending {max_pending})",
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as it gave up: pass it on
            else:
                waiter.cancel()
                if waiter in self.waiting:  # gave up: leave the line (at most maxPending long)
                    self.waiting.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise CallError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"gmesh: deadline exceeded waiting for a slot of service {self.service!r} (maxRequests)",
                ) from None
            raise
        # the slot passed on by release(): `active` already counts it

    def release(self) -> None:
        """A call ended: hand its slot to the first caller still waiting, or free it."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: `active` stays
                return
        self.active -= 1

    def describe(self) -> dict[str, int]:
        return {
            "active": self.active,
            "waiting": len(self.waiting),
            "retries": self.retries,
            "rejected": self.rejected,
            "endpointRejected": self.endpoint_rejected,
        }
