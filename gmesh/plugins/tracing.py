"""Built-in plugin: OpenTelemetry spans of calls and attempts, in both front doors (gRFC A72's shape).

- `tracing` (OBSERVE phase): one span per call — through `gmesh proxy` a SERVER span whose
  parent is the caller's W3C `traceparent`; through a `gmesh:///` channel an INTERNAL span
  under the application's current span.
- `tracing-attempts` (ATTEMPT phase): one CLIENT span per attempt under the call's span, so
  retries and hedges show as sibling attempts; its context goes upstream as `traceparent`
  (with `tracestate` and `baggage`), so an upstream instrumented with OpenTelemetry
  continues the trace.

Sampling is parent-based: a call whose caller's trace is sampled is traced; one whose
caller's trace is not is not (and its context passes on unchanged); a call that starts a
trace is sampled at the service's `Telemetry` `tracing.samplePercent` (default 1%). An
unsampled call creates no span at all. Built only when a tracer provider is set up (the
application's, or `gmesh proxy`'s from `OTEL_*` variables): otherwise tracing costs nothing.
"""

from __future__ import annotations

import importlib
import random
from typing import TYPE_CHECKING, Any

from gmesh.chain.call import Call, Door
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.config.telemetry import telemetry_of
from gmesh.errors import SERVER_ERRORS, outcome_of
from gmesh.hookspecs import hookimpl
from gmesh.stats.edits import NO_EDITS, TelemetryEdits, report_failure
from gmesh.stats.metrics import backend_label
from gmesh.stats.traces import incoming, tracer, with_context

if TYPE_CHECKING:
    from opentelemetry import trace

_PROXY = Door.PROXY
# The OpenTelemetry API, imported when the first tracing filter is built (`_load`): a process with
# no tracer provider (which it could only have set up after importing OpenTelemetry) never pays
# for the import.
otel_context: Any = None
otel_trace: Any = None


def _load() -> None:
    global otel_context, otel_trace
    if otel_trace is None:
        otel_context = importlib.import_module("opentelemetry.context")
        otel_trace = importlib.import_module("opentelemetry.trace")


def _names(method: str) -> tuple[str, str, str]:
    """(span name `pkg.Service/Method`, rpc.service, rpc.method) of `/pkg.Service/Method`."""
    name = method[1:]
    service, _, rpc_method = name.partition("/")
    return name, service, rpc_method


class TraceCalls:
    """Starts the call's span when the call is sampled; ends it with the call's outcome."""

    __slots__ = ("edits", "headers", "ratio", "service", "tracer")

    def __init__(
        self,
        tracer: trace.Tracer,
        service: str,
        ratio: float,
        headers: frozenset[str] = frozenset(),
        edits: TelemetryEdits = NO_EDITS,
    ) -> None:
        self.tracer = tracer
        self.service = service
        self.ratio = ratio
        #: request metadata keys recorded on the span (after the plugins' redaction)
        self.headers = headers
        self.edits = edits

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        parent = incoming(call.metadata) if call.door is _PROXY else otel_context.get_current()
        caller = None if parent is None else otel_trace.get_current_span(parent).get_span_context()
        if caller is None or not caller.is_valid:
            # no trace to continue (none, baggage alone, a malformed traceparent): this call
            # may start one; baggage that came stays in its context
            ratio = self.ratio
            if ratio <= 0.0 or (ratio < 1.0 and random.random() >= ratio):
                return await next(call)
        elif not caller.trace_flags.sampled:
            if call.door is not _PROXY and parent is not None:
                # the proxy passes the caller's context on as it came; a channel sends the app's
                call.metadata = with_context(call.metadata, parent)
            return await next(call)
        name, rpc_service, rpc_method = _names(call.method)
        server = call.door is _PROXY
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=otel_trace.SpanKind.SERVER if server else otel_trace.SpanKind.INTERNAL,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": rpc_service,
                "rpc.method": rpc_method,
                "gmesh.door": "proxy" if server else "channel",
                "gmesh.service": self.service,
            },
        )
        call.span = span
        if self.headers:
            try:
                self._record_headers(span, call)
            except Exception:
                report_failure("span headers")
        code = 0
        try:
            return await next(call)
        except BaseException as exc:
            outcome = outcome_of(exc, call.committed, call.deadline)
            code = outcome.code.value[0]
            # a server span fails when the server side failed; a client's, on any error
            if not server or outcome.code in SERVER_ERRORS:
                span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, outcome.details))
            raise
        finally:
            rule = call.route
            span.set_attributes(
                {
                    "rpc.grpc.status_code": code,
                    "gmesh.route": "" if rule is None else rule.name,
                    "gmesh.backend": backend_label(self.service, call.backend),
                    "gmesh.attempts": call.attempts or 1,
                }
            )
            span.end()

    def _record_headers(self, span: Any, call: Call[Any]) -> None:
        found: dict[str, list[str]] = {}
        pairs = [(k, v) for k, v in call.metadata if k in self.headers]
        for key, value in self.edits.shown(self.service, pairs):
            found.setdefault(key, []).append(value if isinstance(value, str) else "<binary>")
        for key, values in found.items():
            span.set_attribute(f"rpc.grpc.request.metadata.{key}", values)


class TraceAttempts:
    """One CLIENT span per attempt of a traced call, its context sent upstream."""

    __slots__ = ("service", "tracer")

    def __init__(self, tracer: trace.Tracer, service: str) -> None:
        self.tracer = tracer
        self.service = service

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        parent = call.span
        if parent is None:
            return await next(call)
        name, rpc_service, rpc_method = _names(call.method)
        attempt = call.attempts or 1
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": rpc_service,
            "rpc.method": rpc_method,
            "gmesh.attempt": attempt,
            "gmesh.backend": backend_label(self.service, call.backend),
        }
        if attempt > 1:  # the previous attempt's failure (retries are rare: the stash is cheap here)
            reason = call.stash.get("gmesh.retry_reason")
            if reason is not None:
                attributes["gmesh.retry_reason"] = reason
        context = otel_trace.set_span_in_context(parent)
        span = self.tracer.start_span(
            name, context=context, kind=otel_trace.SpanKind.CLIENT, attributes=attributes
        )
        metadata = call.metadata
        call.metadata = with_context(metadata, otel_trace.set_span_in_context(span, context))
        code = 0
        try:
            return await next(call)
        except BaseException as exc:
            outcome = outcome_of(exc, call.committed)
            code = outcome.code.value[0]
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, outcome.details))
            call.stash["gmesh.retry_reason"] = outcome.code.name
            raise
        finally:
            call.metadata = metadata
            endpoint = call.endpoint
            if endpoint is not None:
                host, _, port = endpoint.address.rpartition(":")
                span.set_attributes(
                    {
                        "server.address": host,
                        "server.port": int(port or 0),
                        "gmesh.endpoint": endpoint.address,
                    }
                )
            span.set_attribute("rpc.grpc.status_code", code)
            span.end()


class TracingFactory:
    """`tracing`: the call span, for services whose Telemetry leaves tracing on."""

    name = "tracing"
    phase = Phase.OBSERVE

    def build(self, ctx: BuildContext) -> Filter | None:
        settings = telemetry_of(ctx.resources("Telemetry"), ctx.service)
        found = tracer()
        if found is None or not settings.tracing:
            return None
        _load()
        return TraceCalls(found, ctx.service, settings.sample_ratio, settings.trace_headers, ctx.mesh.edits)


class AttemptTracingFactory:
    """`tracing-attempts`: the attempt spans."""

    name = "tracing-attempts"
    phase = Phase.ATTEMPT

    def build(self, ctx: BuildContext) -> Filter | None:
        settings = telemetry_of(ctx.resources("Telemetry"), ctx.service)
        found = tracer()
        if found is None or not settings.tracing:
            return None
        _load()
        return TraceAttempts(found, ctx.service)


@hookimpl(tryfirst=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    # tryfirst: early in OBSERVE, so a call another filter rejects is traced too
    return [TracingFactory(), AttemptTracingFactory()]
