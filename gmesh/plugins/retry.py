"""Built-in plugin: the RETRY phase — retries of uncommitted attempts, per-try timeouts, a retry budget.

The matched route rule (`call.route`) carries the policy. An attempt is retried only when
the front door can replay the request (`call.replayable`: unary calls, and streams whose
requests so far fit the replay buffer), nothing of the response has reached the caller
(`call.committed`), its status is one the policy names (or its per-try timeout ran out
while the call's own deadline had not), the service's retry budget has room (and the
breaker's `maxRetries`), and the backoff still ends before the caller's deadline. Each
retry prefers an endpoint no earlier attempt used. A deliberate end (a stream's max age)
is never retried. The budget is the mesh's, per service (`MeshState.budget`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.balancer.breaker import BreakerState
from gmesh.chain.call import Call
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.errors import CallError, Origin, outcome_of
from gmesh.hookspecs import hookimpl
from gmesh.routing.retry import RetryBudget, RetryStats, backoff

if TYPE_CHECKING:
    from gmesh.routing.table import CompiledRetry

_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


class Retry:
    """Runs the rest of the chain once, or again per the rule's retry policy."""

    __slots__ = ("breaker", "budget", "max_retries", "stats")

    def __init__(
        self,
        budget: RetryBudget,
        stats: RetryStats,
        breaker: BreakerState | None = None,
        max_retries: int | None = None,
    ) -> None:
        self.budget = budget
        self.stats = stats
        #: the service's circuit-breaker counts, when it caps retries in flight (maxRetries)
        self.breaker = breaker
        self.max_retries = max_retries

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
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
                if not self._again(call, exc, policy, attempt, deadline):
                    raise
                pause = backoff(attempt, policy.backoff_base, policy.backoff_max)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise
                if (
                    breaker is not None
                    and self.max_retries is not None
                    and breaker.retries >= self.max_retries
                ) or not self.budget.try_retry():
                    self.stats.denied += 1
                    raise
                self.stats.retries += 1
                if pause > 0:
                    await asyncio.sleep(pause)  # a cancelled call stops waiting here
                if call.endpoint is not None:
                    if call.tried is None:
                        call.tried = set()
                    call.tried.add(call.endpoint.address)
                call.endpoint = None
                attempt += 1
            finally:
                call.deadline = deadline

    @staticmethod
    def _again(
        call: Call[Any], exc: Exception, policy: CompiledRetry, attempt: int, deadline: float | None
    ) -> bool:
        """Whether the failed attempt may be tried again (the budget aside)."""
        if call.committed or not call.replayable or attempt >= policy.attempts:
            return False
        if isinstance(exc, CallError) and exc.origin == Origin.DELIBERATE:
            return False
        code = outcome_of(exc).code
        if code in policy.on:
            return True
        # Its per-try timeout ran out while the call's own deadline had not: try again.
        return (
            code is _DEADLINE
            and policy.per_try_timeout is not None
            and (deadline is None or time.monotonic() < deadline - 0.001)
        )


class RetryFactory:
    """One Retry filter per service whose Route has a retry policy; the budget is the mesh's."""

    name = "retry"
    phase = Phase.RETRY

    def build(self, ctx: BuildContext) -> Filter | None:
        route = ctx.route
        if route is None or not any(rule.retry is not None for rule in route.rules):
            return None
        budget, stats = ctx.mesh.budget(ctx.service, ctx.spec)
        limits = ctx.spec.circuit_breaker if ctx.spec is not None else None
        if limits is not None and limits.max_retries is not None:
            return Retry(budget, stats, ctx.mesh.breaker(ctx.service), limits.max_retries)
        return Retry(budget, stats)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [RetryFactory()]
