"""W3C trace context and baggage in gRPC metadata, without I/O."""

from __future__ import annotations

from opentelemetry import baggage, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from gmesh.stats.traces import incoming, tracer, with_context

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_call_without_context_has_no_parent() -> None:
    assert incoming((("x-user", "a"), ("grpc-trace-bin", b"\x00"))) is None


def test_traceparent_and_baggage_come_in_and_go_out() -> None:
    ctx = incoming((("x-user", "a"), ("traceparent", PARENT), ("baggage", "tenant=acme")))
    assert ctx is not None
    span_context = trace.get_current_span(ctx).get_span_context()
    assert format(span_context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert span_context.trace_flags.sampled
    assert baggage.get_baggage("tenant", ctx) == "acme"

    child = SpanContext(span_context.trace_id, 0x1122334455667788, False, TraceFlags(TraceFlags.SAMPLED))
    out = with_context(
        (("x-user", "a"), ("traceparent", PARENT), ("baggage", "tenant=acme")),
        trace.set_span_in_context(NonRecordingSpan(child), ctx),
    )
    assert dict(out) == {
        "x-user": "a",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-1122334455667788-01",
        "baggage": "tenant=acme",
    }
    assert [k for k, _ in out].count("traceparent") == 1  # replaced, not added


def test_an_unsampled_parent_passes_on_unsampled() -> None:
    unsampled = PARENT[:-2] + "00"
    ctx = incoming((("traceparent", unsampled),))
    assert ctx is not None
    assert not trace.get_current_span(ctx).get_span_context().trace_flags.sampled
    assert dict(with_context((), ctx))["traceparent"] == unsampled


def test_no_tracer_without_a_configured_provider() -> None:
    # this test process never sets a global provider: gmesh builds no tracing filters
    assert tracer() is None
