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
from collections.abc import Iterator, Sequence
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
        #: time.monotonic() of each call that ended cancelled (by the caller or a proxy)
        self.cancelled_at: list[float] = []
        #: calls running now
        self.active = 0
        #: messages written on streams (ServerStream, Bidi), all calls together
        self.sent = 0
        #: fail this share (0..1) of Unary, ClientStream and Bidi calls at once with `fail_with`
        self.fail_share = 0.0
        self.fail_with = grpc.StatusCode.UNAVAILABLE
        self._unary_seen = 0
        #: fail this share (0..1) of ServerStream and Bidi calls with `fail_with` right after their
        #: first response (a stream the caller has started to read: committed, never retried)
        self.stream_fail_share = 0.0
        self._streams_seen = 0
        #: seconds added to every Unary call (a slow endpoint), and the most calls seen at once
        self.extra_delay = 0.0
        self.max_active = 0
        #: request metadata of the last calls (most recent last, at most 100)
        self.seen_metadata: list[dict[str, str | bytes]] = []

    @contextlib.contextmanager
    def _call(self, method: str) -> Iterator[None]:
        """Count the call, and note when it is cancelled: the handler's task is cancelled at
        an await, or (blocked writing to a slow reader) its write fails when the stream resets."""
        self.calls[method] = self.calls.get(method, 0) + 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            yield
        except grpc.aio.AbortError:
            raise  # ended on purpose with a status (fail_code)
        except BaseException:
            self.cancelled_at.append(time.monotonic())
            raise
        finally:
            self.active -= 1

    async def _headers(self, req: Any, context: grpc.aio.ServicerContext) -> None:
        if req.initial_metadata:
            await context.send_initial_metadata(tuple(_pairs(req.initial_metadata)))
        if req.trailing_metadata:
            context.set_trailing_metadata(tuple(_pairs(req.trailing_metadata)))

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

    async def _maybe_refuse(self, context: grpc.aio.ServicerContext) -> None:
        """Fail `fail_share` of calls at once (before headers or reading a request), evenly spread."""
        if self.fail_share:
            n = self._unary_seen = self._unary_seen + 1
            if int(n * self.fail_share) != int((n - 1) * self.fail_share):
                await context.abort(self.fail_with, f"{self.name}: failing {self.fail_share:.0%} of calls")

    def _stream_fails(self) -> bool:
        """Whether this stream is one of the `stream_fail_share` that fail (evenly spread)."""
        if not self.stream_fail_share:
            return False
        n = self._streams_seen = self._streams_seen + 1
        return int(n * self.stream_fail_share) != int((n - 1) * self.stream_fail_share)

    async def _fail_stream(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(self.fail_with, f"{self.name}: failing {self.stream_fail_share:.0%} of streams")

    async def _maybe_fail(self, req: Any, context: grpc.aio.ServicerContext) -> None:
        if req.fail_code:
            trailing = tuple(_pairs(req.trailing_metadata))
            await context.abort(status_code(req.fail_code), req.fail_details, trailing)

    async def Unary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with self._call("Unary"):
            self.seen_metadata = [*self.seen_metadata[-99:], dict(context.invocation_metadata() or ())]
            await self._maybe_refuse(context)
            await self._headers(request, context)
            if self.extra_delay:
                await asyncio.sleep(self.extra_delay)
            if request.delay_ms:
                await asyncio.sleep(request.delay_ms / 1000)
            await self._maybe_fail(request, context)
            return self._reply(request, context)

    # Streams write with context.write (not generators), so a cancel always lands in the
    # handler's own await and is seen at once, even while a slow reader blocks the write.
    async def ServerStream(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        with self._call("ServerStream"):
            await self._headers(request, context)
            fails = self._stream_fails()
            for i in range(max(request.count, 1)):
                if request.delay_ms:
                    await asyncio.sleep(request.delay_ms / 1000)
                await context.write(self._reply(request, context, i))
                if fails:
                    await self._fail_stream(context)
                self.sent += 1
            await self._maybe_fail(request, context)

    async def ClientStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        with self._call("ClientStream"):
            await self._maybe_refuse(context)
            last, count = echo_pb2.EchoRequest(), 0
            async for req in request_iterator:
                last, count = req, count + 1
            await self._headers(last, context)
            await self._maybe_fail(last, context)
            return self._reply(last, context, count)

    async def Bidi(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        with self._call("Bidi"):
            await self._maybe_refuse(context)
            fails = self._stream_fails()
            i = 0
            async for req in request_iterator:
                if i == 0:
                    await self._headers(req, context)
                if req.delay_ms:
                    await asyncio.sleep(req.delay_ms / 1000)
                await self._maybe_fail(req, context)
                await context.write(self._reply(req, context, i))
                self.sent += 1
                i += 1
                if fails:
                    await self._fail_stream(context)


def _pairs(headers: Any) -> list[tuple[str, str | bytes]]:
    return [(h.key, h.value if h.key.endswith("-bin") else h.value.decode()) for h in headers]


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
    parser.add_argument(
        "--drain-delay", type=float, default=2.0, help="seconds to serve on after withdrawing (SIGTERM)"
    )
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
                register(
                    server.address,
                    service=args.service,
                    labels=labels,
                    ttl=args.ttl,
                    drain_delay=args.drain_delay,
                )
            )
            print(f"registered {args.service} {server.address} at {time.time():.3f}", flush=True)
        await server.server.wait_for_termination()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(sys.argv[1:]))
