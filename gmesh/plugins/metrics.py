"""Built-in plugin: golden metrics of every call and attempt, in both front doors.

Two filters per service whose `Telemetry` leaves metrics on (the default):
- `metrics` (OBSERVE phase, first in the chain): each call as its caller saw it — code,
  duration (retries and backoff included), route rule and backend, stream messages, calls in
  flight. It sees rejections of every later phase (breakers, limits, routing).
- `metrics-attempts` (ATTEMPT phase, below retries): each attempt against its backend.

The counters are the mesh's (`gmesh.stats.metrics`), kept across config changes; a call
costs two dict lookups and a few integer adds per filter, no label formatting, no lock.
Everything else (retries, ejections, breaker rejections, endpoint health) is read from the
mesh's state when Prometheus scrapes.
"""

from __future__ import annotations

import time
from typing import Any

from gmesh.chain.call import Call
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.config.telemetry import telemetry_of
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import outcome_of
from gmesh.hookspecs import hookimpl
from gmesh.stats.metrics import OK, ServiceMetrics

_clock = time.perf_counter
_UNARY = MethodKind.UNARY


class ObserveCalls:
    """Counts and times each call, as its caller saw it."""

    __slots__ = ("metrics",)

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        sm = self.metrics
        door = call.door
        mm = sm.by_door[door].get(call.method) or sm.method(door, call.method)
        if call.kind is not _UNARY:
            call.meter = mm  # the front door adds stream messages as they pass
        in_flight = sm.in_flight
        in_flight[door] += 1
        code = OK
        started = _clock()
        try:
            return await next(call)
        except BaseException as exc:
            code = outcome_of(exc, call.committed, call.deadline).code
            raise
        finally:
            elapsed = _clock() - started
            in_flight[door] -= 1
            rule = call.route
            cell = mm.call_cell(call.caller.source, "" if rule is None else rule.name, call.backend)
            cell.record(code, elapsed)


class ObserveAttempts:
    """Counts and times each attempt against the backend it went to."""

    __slots__ = ("metrics",)

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        started = _clock()
        try:
            result = await next(call)
        except BaseException as exc:
            if call.endpoint is not None:  # else nothing was sent: the balancer refused it
                outcome = outcome_of(exc, call.committed, call.deadline)
                self._cell(call).record(outcome.code, _clock() - started)
            raise
        self._cell(call).record(OK, _clock() - started)
        return result

    def _cell(self, call: Call[Any]) -> Any:
        sm = self.metrics
        door = call.door
        mm = sm.by_door[door].get(call.method) or sm.method(door, call.method)
        return mm.attempt_cell(call.backend)


class MetricsFactory:
    """`metrics`: one ObserveCalls per service with metrics on."""

    name = "metrics"
    phase = Phase.OBSERVE

    def build(self, ctx: BuildContext) -> Filter | None:
        if not telemetry_of(ctx.resources("Telemetry"), ctx.service).metrics:
            return None
        return ObserveCalls(ctx.mesh.metrics.service(ctx.service))


class AttemptMetricsFactory:
    """`metrics-attempts`: one ObserveAttempts per service with metrics on."""

    name = "metrics-attempts"
    phase = Phase.ATTEMPT

    def build(self, ctx: BuildContext) -> Filter | None:
        if not telemetry_of(ctx.resources("Telemetry"), ctx.service).metrics:
            return None
        return ObserveAttempts(ctx.mesh.metrics.service(ctx.service))


@hookimpl(tryfirst=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    # tryfirst: the first OBSERVE filter, so it sees what every other filter does to a call
    return [MetricsFactory(), AttemptMetricsFactory()]
