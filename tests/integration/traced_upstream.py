"""An Echo upstream instrumented the stock way (opentelemetry-instrumentation-grpc's server
interceptor), exporting to the OTLP endpoint of OTEL_EXPORTER_OTLP_ENDPOINT, registered in the mesh.

    python traced_upstream.py SERVICE FAIL_SHARE
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import gmesh
from gmesh.testing.echo import EchoServicer
from gmesh.v1 import echo_pb2_grpc


async def main(service: str, fail_share: float) -> None:
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "upstream"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    server = grpc.aio.server(interceptors=[aio_server_interceptor()])
    servicer = EchoServicer("up")
    servicer.fail_share = fail_share
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with gmesh.register(
        f"127.0.0.1:{port}", service=service, grpc_services=["gmesh.v1.Echo"], handle_sigterm=False,
        drain_delay=0,
    ):  # fmt: skip
        print("registered", flush=True)
        await stop.wait()
    await server.stop(None)
    provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
