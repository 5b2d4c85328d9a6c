"""Built-in plugin: the access log — one JSON line per call, in both front doors.

Built for services whose `Telemetry` turns `accessLog` on (off by default); a share of calls
(`samplePercent`) is logged. The line (OBSERVE phase, so rejections by later filters are
logged too) has the time, trace id, door, caller, service, method, route rule, backend,
endpoint, code, duration, attempts, stream messages and bytes each way, and the request
headers the Telemetry names — after every `gmesh_redact_metadata` hook has seen them. Then
every `gmesh_access_log_fields` function may add or change fields. Unlogged calls cost one
random draw.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

from gmesh.chain.call import Call, Door
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.config.telemetry import telemetry_of
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import outcome_of
from gmesh.hookspecs import hookimpl
from gmesh.stats.accesslog import sink, timestamp
from gmesh.stats.edits import TelemetryEdits, report_failure
from gmesh.stats.metrics import backend_label

_DOORS = {Door.PROXY: "proxy", Door.CHANNEL: "channel"}


def _trace_id(call: Call[Any]) -> str | None:
    span = call.span
    if span is not None:
        return format(span.get_span_context().trace_id, "032x")
    for key, value in call.metadata:
        if key == "traceparent" and isinstance(value, str) and len(value) >= 35:
            return value[3:35]
    if call.door is Door.CHANNEL:
        trace = sys.modules.get("opentelemetry.trace")  # the application's current span, if it traces
        if trace is not None:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                return format(context.trace_id, "032x")
    return None


class LogCalls:
    """Writes one line for each sampled call, when it ends."""

    __slots__ = ("edits", "headers", "ratio", "service")

    def __init__(self, service: str, ratio: float, headers: frozenset[str], edits: TelemetryEdits) -> None:
        self.service = service
        self.ratio = ratio
        self.headers = headers
        self.edits = edits

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        if self.ratio < 1.0 and random.random() >= self.ratio:
            return await next(call)
        started = time.time()
        clock = time.perf_counter()
        # the request headers as the caller sent them (later filters may rewrite call.metadata)
        metadata = call.metadata
        code = "OK"
        try:
            return await next(call)
        except BaseException as exc:
            code = outcome_of(exc, call.committed, call.deadline).code.name
            raise
        finally:
            try:
                self._write(call, metadata, code, started, time.perf_counter() - clock)
            except Exception:
                report_failure("access log line")

    def _write(self, call: Call[Any], metadata: Any, code: str, started: float, seconds: float) -> None:
        rule = call.route
        endpoint = call.endpoint
        caller = call.caller
        unary = call.kind is MethodKind.UNARY
        entry: dict[str, Any] = {
            "time": timestamp(started),
            "traceId": _trace_id(call),
            "door": _DOORS[call.door],
            "caller": caller.identity or caller.peer or None,
            "service": self.service,
            "method": call.method,
            "route": None if rule is None else rule.name,
            "backend": backend_label(self.service, call.backend),
            "endpoint": None if endpoint is None else endpoint.address,
            "code": code,
            "durationMs": round(seconds * 1000, 3),
            "attempts": call.attempts or 1,
            "requestMessages": 1 if unary else call.sent,
            "responseMessages": (1 if code == "OK" else 0) if unary else call.received,
            # bytes are counted where messages are bytes (the proxy); a channel sees objects
            "requestBytes": call.sent_bytes if call.door is Door.PROXY else None,
            "responseBytes": call.received_bytes if call.door is Door.PROXY else None,
        }
        if caller.labels:
            entry["callerLabels"] = caller.labels
        if self.headers:
            shown = self.edits.shown(self.service, [(k, v) for k, v in metadata if k in self.headers])
            entry["headers"] = {k: v if isinstance(v, str) else "<binary>" for k, v in shown}
        for edit in self.edits.access_log_fields:
            edit(entry, call)
        sink().write(entry)


class AccessLogFactory:
    """`access-log`: one LogCalls per service whose Telemetry turns the access log on."""

    name = "access-log"
    phase = Phase.OBSERVE

    def build(self, ctx: BuildContext) -> Filter | None:
        settings = telemetry_of(ctx.resources("Telemetry"), ctx.service)
        if not settings.access_log or settings.access_log_ratio <= 0:
            return None
        return LogCalls(ctx.service, settings.access_log_ratio, settings.access_log_headers, ctx.mesh.edits)


@hookimpl(tryfirst=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [AccessLogFactory()]
