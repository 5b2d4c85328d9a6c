"""Built-in plugin: circuit breakers in the LIMIT phase — fail fast instead of piling calls on a service.

Per service (the Service kind's `circuitBreaker`): at most `maxRequests` calls in flight;
above that, up to `maxPending` calls wait (first come, first served, never past their
deadline) and the rest fail at once with UNAVAILABLE saying which limit; `maxRetries`
caps retries in flight (read by the retry filter). Per endpoint, `maxRequestsPerEndpoint`
is enforced by the balancer (busy endpoints are skipped). Nothing to reset: a breaker
closes by itself as calls finish. The counts live across config changes, per process.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.chain.call import Call
from gmesh.chain.filter import Filter, FilterFactory, Handler, Phase
from gmesh.errors import CallError
from gmesh.hookspecs import hookimpl

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot


class BreakerState:
    """Calls and retries in flight to one service, and the calls waiting for a slot."""

    __slots__ = ("active", "rejected", "retries", "waiting")

    def __init__(self) -> None:
        self.active = 0
        self.retries = 0
        self.rejected = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def release(self) -> None:
        """A call ended: hand its slot to the first caller still waiting, or free it."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: `active` stays
                return
        self.active -= 1


#: service -> its breaker counts in this process
STATES: dict[str, BreakerState] = {}


def state_of(service: str) -> BreakerState:
    state = STATES.get(service)
    if state is None:
        state = STATES[service] = BreakerState()
    return state


class Breaker:
    """Admits a call if the service has a free slot (or a waiting place), else fails it fast."""

    __slots__ = ("max_pending", "max_requests", "service", "state")

    def __init__(self, service: str, max_requests: int, max_pending: int) -> None:
        self.service = service
        self.max_requests = max_requests
        self.max_pending = max_pending
        self.state = state_of(service)

    async def __call__(self, call: Call, next: Handler) -> Any:
        state = self.state
        if state.active < self.max_requests:
            state.active += 1
        else:
            await self._wait(call, state)
        try:
            return await next(call)
        finally:
            state.release()

    async def _wait(self, call: Call, state: BreakerState) -> None:
        if len(state.waiting) >= self.max_pending:
            state.rejected += 1
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                f"gmesh: circuit breaker of service {self.service!r} is open: {self.max_requests} calls in "
                f"flight (maxRequests) and {len(state.waiting)} waiting (maxPending {self.max_pending})",
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiting.append(waiter)
        try:
            await asyncio.wait_for(waiter, call.time_remaining())
        except TimeoutError:
            raise CallError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"gmesh: deadline exceeded waiting for a slot of service {self.service!r} (maxRequests)",
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                state.release()  # it was handed a slot just as it gave up: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in state.waiting:  # gave up: leave the queue (at most maxPending long)
                state.waiting.remove(waiter)


class BreakerFactory:
    name = "breaker"
    phase = Phase.LIMIT

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None:
        resource = snapshot.resource("Service", service)
        spec = getattr(resource.spec, "circuit_breaker", None) if resource is not None else None
        if spec is None or spec.max_requests is None:
            return None
        return Breaker(service, spec.max_requests, spec.max_pending)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [BreakerFactory()]
