"""An application with its own OpenTelemetry setup calling through a `gmesh:///` channel: one
root span per call, the channel's spans under it. Prints each call's trace id and code.

    python traced_app.py TARGET CALLS [KEY=VALUE metadata...]
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import gmesh.aio
from gmesh.v1 import echo_pb2, echo_pb2_grpc


async def main(target: str, calls: int, metadata: list[tuple[str, str]]) -> None:
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "app"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("app")
    async with gmesh.aio.channel(target) as channel:
        await channel.channel_ready()
        stub = echo_pb2_grpc.EchoStub(channel)
        for i in range(calls):
            with tracer.start_as_current_span(f"app-call-{i}") as span:
                trace_id = format(span.get_span_context().trace_id, "032x")
                try:
                    await stub.Unary(echo_pb2.EchoRequest(message=str(i)), metadata=metadata, timeout=10)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                print(trace_id, code, flush=True)
    provider.shutdown()


if __name__ == "__main__":
    pairs = [tuple(arg.split("=", 1)) for arg in sys.argv[3:]]
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), pairs))  # type: ignore[arg-type]
