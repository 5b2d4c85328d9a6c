"""The Echo upstream (proto/gmesh/v1/echo.proto): a real gRPC server for tests, examples and benches.

It serves all four RPC kinds, `grpc.health.v1` and server reflection on 127.0.0.1, and can
wait, fail with a chosen status, and report what it saw (metadata, remaining deadline).
Run one in its own process with `python -m gmesh.testing.echo --listen 127.0.0.1:0`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gmesh.v1 import echo_pb2, echo_pb2_grpc

SERVICE = echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name


class EchoServicer(echo_pb2_grpc.EchoServicer):  # type: ignore[misc]
    def __init__(self, name: str) -> None:
        self.name = name
        #: calls received per method name (e.g. "Unary")
        self.calls: dict[str, int] = {}

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    def _reply(self, req: Any, context: grpc.aio.ServicerContext, index: int = 0) -> Any:
        remaining = context.time_remaining()
        metadata = {}
        for key, value in context.invocation_metadata() or ():
            metadata[key] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
        return echo_pb2.EchoResponse(
            payload=req.payload,
            message=req.message,
            server=self.name,
            index=index,
            metadata=metadata,
            deadline_ms=int(remaining * 1000) if remaining is not None else -1,
        )

    async def _maybe_fail(self, req: Any, context: grpc.aio.ServicerContext) -> None:
        if req.fail_code:
            await context.abort(status_code(req.fail_code), req.fail_details)

    async def Unary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Unary")
        if request.delay_ms:
            await asyncio.sleep(request.delay_ms / 1000)
        await self._maybe_fail(request, context)
        return self._reply(request, context)

    async def ServerStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self._count("ServerStream")
        for i in range(max(request.count, 1)):
            if request.delay_ms:
                await asyncio.sleep(request.delay_ms / 1000)
            yield self._reply(request, context, i)
        await self._maybe_fail(request, context)

    async def ClientStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("ClientStream")
        last, count = echo_pb2.EchoRequest(), 0
        async for req in request_iterator:
            last, count = req, count + 1
        await self._maybe_fail(last, context)
        return self._reply(last, context, count)

    async def Bidi(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self._count("Bidi")
        i = 0
        async for req in request_iterator:
            if req.delay_ms:
                await asyncio.sleep(req.delay_ms / 1000)
            await self._maybe_fail(req, context)
            yield self._reply(req, context, i)
            i += 1


def status_code(value: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` with numeric value `value` (UNKNOWN if there is none)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


@dataclass
class EchoServer:
    """A running Echo server: its address, health servicer (flip to NOT_SERVING) and call counts."""

    name: str
    address: str
    server: grpc.aio.Server = field(repr=False)
    health: health.aio.HealthServicer = field(repr=False)
    servicer: EchoServicer = field(repr=False)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


async def start_echo_server(
    name: str = "echo",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    reflection_enabled: bool = True,
    options: Sequence[tuple[str, Any]] = (),
) -> EchoServer:
    server = grpc.aio.server(options=list(options))
    servicer = EchoServicer(name)
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    echo = EchoServer(name, f"{host}:{bound}", server, health_servicer, servicer)
    await echo.set_serving(True)
    return echo


async def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m gmesh.testing.echo", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any free port)")
    parser.add_argument("--name", default="echo", help="name reported in every response")
    parser.add_argument("--service", help="also register in the mesh as this service (needs etcd)")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE label when registering")
    parser.add_argument("--ttl", type=int, default=10, help="registration lease TTL in seconds")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = await start_echo_server(args.name, host=host, port=int(port))
    print(f"listening {server.address}", flush=True)
    async with contextlib.AsyncExitStack() as stack:
        if args.service:
            from gmesh.discovery.endpoint import parse_label
            from gmesh.discovery.registry import register

            labels = dict(parse_label(text) for text in args.label)
            await stack.enter_async_context(
                register(server.address, service=args.service, labels=labels, ttl=args.ttl)
            )
            print(f"registered {args.service} {server.address} at {time.time():.3f}", flush=True)
        await server.server.wait_for_termination()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(sys.argv[1:]))
