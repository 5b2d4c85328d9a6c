"""Built-in plugin: circuit breakers in the LIMIT phase — fail fast instead of piling calls on a service.

Per service (the Service kind's `circuitBreaker`): at most `maxRequests` calls in flight;
above that, up to `maxPending` calls wait (first come, first served, never past their
deadline) and the rest fail at once with UNAVAILABLE saying which limit; `maxRetries`
caps retries in flight (read by the retry filter). Per endpoint, `maxRequestsPerEndpoint`
is enforced by the balancer (busy endpoints are skipped). The counts are the mesh's
(`gmesh.balancer.breaker.BreakerState`): they live across config changes.
"""

from __future__ import annotations

from typing import Any

from gmesh.balancer.breaker import BreakerState
from gmesh.chain.call import Call
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.hookspecs import hookimpl


class Breaker:
    """Admits a call if the service has a free slot (or a waiting place), else fails it fast."""

    __slots__ = ("max_pending", "max_requests", "state")

    def __init__(self, state: BreakerState, max_requests: int, max_pending: int) -> None:
        self.state = state
        self.max_requests = max_requests
        self.max_pending = max_pending

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        state = self.state
        if state.active < self.max_requests:
            state.active += 1
        else:
            await state.acquire(self.max_requests, self.max_pending, call.time_remaining())
        try:
            return await next(call)
        finally:
            state.release()


class BreakerFactory:
    name = "breaker"
    phase = Phase.LIMIT

    def build(self, ctx: BuildContext) -> Filter | None:
        spec = ctx.spec.circuit_breaker if ctx.spec is not None else None
        if spec is None or spec.max_requests is None:
            return None
        return Breaker(ctx.mesh.breaker(ctx.service), spec.max_requests, spec.max_pending)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [BreakerFactory()]
