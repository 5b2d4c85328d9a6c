"""OpenTelemetry plumbing of the data path: the tracer, W3C context in gRPC metadata, and a bounded,
counted export for processes gmesh sets up itself (`gmesh proxy`).

The API (`opentelemetry-api`) is a dependency; the SDK and the OTLP exporter come with the
`gmesh[otel]` extra. Without a configured tracer provider, nothing is traced and the tracing
filters are not even built. An application using `gmesh:///` channels sets up its own
provider as usual (gmesh's spans join its traces); `gmesh proxy` sets one up from the
standard `OTEL_*` environment variables (`configure_from_env`).

Export is asynchronous and bounded: spans wait in the SDK's batch queue
(`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) and a background thread sends them; when the collector is
slow or away, the queue fills and further spans are dropped — counted, never waited for.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gmesh.chain.metadata import Metadata

if TYPE_CHECKING:
    from opentelemetry import trace
    from opentelemetry.context import Context

log = logging.getLogger(__name__)


class SpanCounts:
    """Spans this process exported and dropped (only when gmesh set up the export)."""

    def __init__(self) -> None:
        self.exported = 0
        self.queue_full = 0
        self.export_failed = 0
        self.active = False


SPANS = SpanCounts()


def tracer() -> trace.Tracer | None:
    """gmesh's tracer from the global provider, or None when no real provider is set up."""
    if "opentelemetry.trace" not in sys.modules:
        return None  # nobody imported OpenTelemetry, so nobody set up a provider: stay light
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    from gmesh import __version__

    return provider.get_tracer("gmesh", __version__)


class _MetadataGetter:
    """OpenTelemetry's `Getter` over gRPC metadata pairs."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        found = [v for k, v in carrier if k == key and isinstance(v, str)]
        return found or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()
#: header names of the W3C propagators (trace context, baggage): a call without them has no parent
CONTEXT_KEYS = frozenset({"traceparent", "tracestate", "baggage"})


def incoming(metadata: Metadata) -> Context | None:
    """The trace context a caller sent in its metadata, or None when it sent none."""
    for key, _ in metadata:
        if key in CONTEXT_KEYS:
            from opentelemetry import propagate

            return propagate.extract(metadata, getter=_GETTER)  # type: ignore[arg-type]
    return None


def with_context(metadata: Metadata, context: Context) -> Metadata:
    """`metadata` carrying `context` (W3C traceparent, tracestate, baggage) instead of what it had."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    if not carrier:
        return metadata
    return (*(kv for kv in metadata if kv[0] not in carrier), *carrier.items())


# ------------------------------------------------------------------ gmesh's own export (proxy)


def configure_from_env(service_name: str) -> bool:
    """Set up the global tracer provider from the standard `OTEL_*` variables, when they ask for
    an export (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and
    `OTEL_TRACES_EXPORTER` not `none`) and no provider is set yet. Returns whether it did."""
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    if not (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return False
    if tracer() is not None:
        return False  # set up already (by the application, or opentelemetry-instrument)
    from opentelemetry import trace

    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        log.warning(
            "an OTLP endpoint is set, but the OpenTelemetry SDK is missing: pip install 'gmesh[otel]'"
        )
        return False
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
    # sampler: OTEL_TRACES_SAMPLER (parent-based by default); shut down by `flush`, bounded in
    # time (the SDK's own exit hook waits for a dead collector's retries)
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(_counted_batch(CountingExporter(OTLPSpanExporter())))
    trace.set_tracer_provider(provider)
    SPANS.active = True
    return True


def flush(timeout: float = 3.0) -> None:
    """Send what is queued and stop exporting (at a proxy's stop), giving up after `timeout`
    seconds: a collector that is away never holds a stopping proxy."""
    if not SPANS.active:
        return
    from opentelemetry import trace

    provider: Any = trace.get_tracer_provider()
    if not hasattr(provider, "shutdown"):
        return
    ending = threading.Thread(target=provider.shutdown, name="gmesh-trace-flush", daemon=True)
    ending.start()
    ending.join(timeout)


class CountingExporter:
    """A span exporter that counts what it sent and what it failed to send."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def export(self, spans: Iterable[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        batch = list(spans)
        try:
            result = self.inner.export(batch)
        except Exception:
            SPANS.export_failed += len(batch)
            raise
        if result == SpanExportResult.SUCCESS:
            SPANS.exported += len(batch)
        else:
            SPANS.export_failed += len(batch)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))


def _counted_batch(exporter: Any) -> Any:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    class CountingBatchSpanProcessor(BatchSpanProcessor):
        """The SDK's batch processor, counting the spans it drops because its queue is full."""

        def on_end(self, span: Any) -> None:
            batch = getattr(self, "_batch_processor", None)
            queue = getattr(batch, "_queue", None)
            if queue is not None and len(queue) >= getattr(batch, "_max_queue_size", 1 << 62):
                SPANS.queue_full += 1
            super().on_end(span)

    return CountingBatchSpanProcessor(exporter)
