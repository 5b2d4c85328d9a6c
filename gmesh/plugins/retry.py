"""Built-in plugin: the RETRY phase — retries of uncommitted attempts, per-try timeouts, a retry budget.

The matched route rule (`call.route`) carries the policy. An attempt is retried only when
the front door can replay the request (`call.replayable`: unary calls, and proxied streams
whose requests so far fit the replay buffer), nothing of the response has
reached the caller (`call.committed`), its status is one the policy names (or its per-try
timeout ran out while the call's own deadline had not), the service's retry budget has
room, and the backoff still ends before the caller's deadline. Each retry prefers an
endpoint no earlier attempt used.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.chain.call import Call
from gmesh.chain.filter import Filter, FilterFactory, Handler, Phase
from gmesh.errors import CallError
from gmesh.hookspecs import hookimpl
from gmesh.routing.retry import RetryBudget, backoff

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.plugins.router import CompiledRetry

_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status an attempt failed with (None: not a call failure)."""
    if isinstance(exc, CallError):
        return exc.status
    if isinstance(exc, grpc.aio.AioRpcError):
        code: grpc.StatusCode = exc.code()
        return code
    return None


def endpoint_failed(exc: BaseException, failures: frozenset[grpc.StatusCode]) -> bool:
    """Whether `exc` counts against the endpoint that served the attempt."""
    if isinstance(exc, CallError):
        return exc.endpoint_fault and exc.status in failures
    return status_of(exc) in failures


class Retry:
    """Runs the rest of the chain once, or again per the rule's retry policy."""

    __slots__ = ("breaker", "budget", "max_retries", "stats")

    def __init__(
        self, budget: RetryBudget, stats: RetryStats, breaker: Any = None, max_retries: int | None = None
    ) -> None:
        self.budget = budget
        self.stats = stats
        #: the service's circuit-breaker counts, when it caps retries in flight (maxRetries)
        self.breaker = breaker
        self.max_retries = max_retries

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.budget.record_request()
        rule = call.route
        policy: CompiledRetry | None = rule.retry if rule is not None else None
        if policy is None or not call.replayable:
            return await next(call)
        deadline = call.deadline
        per_try = policy.per_try_timeout
        attempt = 1
        breaker = self.breaker
        while True:
            call.attempts = attempt
            if per_try is not None:
                limit = time.monotonic() + per_try
                call.deadline = limit if deadline is None or limit < deadline else deadline
            try:
                if attempt > 1 and breaker is not None:
                    breaker.retries += 1
                    try:
                        return await next(call)
                    finally:
                        breaker.retries -= 1
                return await next(call)
            except Exception as exc:
                code = status_of(exc)
                if code is None or call.committed or not call.replayable or attempt >= policy.attempts:
                    raise
                now = time.monotonic()
                try_expired = (
                    code is _DEADLINE and per_try is not None and (deadline is None or now < deadline - 0.001)
                )
                if code not in policy.on and not try_expired:
                    raise
                pause = backoff(attempt, policy.backoff_base, policy.backoff_max)
                if deadline is not None and now + pause >= deadline:
                    raise
                if (
                    breaker is not None
                    and self.max_retries is not None
                    and breaker.retries >= self.max_retries
                ):
                    self.stats.denied += 1
                    raise
                if not self.budget.try_retry():
                    self.stats.denied += 1
                    raise
                self.stats.retries += 1
                if pause > 0:
                    await asyncio.sleep(pause)
                if call.endpoint is not None:
                    if call.tried is None:
                        call.tried = set()
                    call.tried.add(call.endpoint.address)
                call.endpoint = None
                attempt += 1
            finally:
                call.deadline = deadline


class RetryStats:
    """Retries made and retries the budget refused, per service (kept across config changes)."""

    __slots__ = ("denied", "retries")

    def __init__(self) -> None:
        self.retries = 0
        self.denied = 0


class RetryFactory:
    """One Retry filter per service with a Route; the budget outlives config changes."""

    name = "retry"
    phase = Phase.RETRY

    def __init__(self) -> None:
        self.budgets: dict[str, tuple[RetryBudget, RetryStats]] = {}

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None:
        from gmesh.plugins.router import route_of

        route = route_of(service, snapshot)
        if route is None or not any(r.retry is not None for r in getattr(route.spec, "rules", ())):
            return None
        resource = snapshot.resource("Service", service)
        spec = getattr(resource.spec, "retry_budget", None) if resource is not None else None
        ratio, floor, window = (
            (0.2, 10.0, 10.0) if spec is None else (spec.percent / 100, spec.min_per_second, spec.window)
        )
        budget, stats = self.budgets.get(service, (None, None))
        if budget is None or (budget.ratio, budget.min_per_second, budget.window) != (
            ratio,
            floor,
            int(window),
        ):
            budget, stats = RetryBudget(ratio, floor, window), stats or RetryStats()
            self.budgets[service] = (budget, stats)
        assert stats is not None
        limits = getattr(resource.spec, "circuit_breaker", None) if resource is not None else None
        if limits is not None and limits.max_retries is not None:
            from gmesh.plugins.breaker import state_of

            return Retry(budget, stats, state_of(service), limits.max_retries)
        return Retry(budget, stats)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [RetryFactory()]
