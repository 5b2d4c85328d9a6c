"""Echo calls of every kind, reduced to what must match between a direct and a meshed call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from gmesh.outbound.upstream import StatusWatch
from gmesh.v1 import echo_pb2, echo_pb2_grpc

H = echo_pb2.Header
REQUEST_MD = (("x-tenant", "acme"), ("x-trace-bin", b"\x00\x01\xff"))


def req(**kw: Any) -> Any:
    fields: dict[str, Any] = {
        "payload": b"\x00payload\xff",
        "message": "hi",
        "initial_metadata": [H(key="x-init", value=b"i1"), H(key="x-init-bin", value=b"\x01\x02")],
        "trailing_metadata": [H(key="x-trail", value=b"t1"), H(key="x-trail-bin", value=b"\xfe")],
    }
    return echo_pb2.EchoRequest(**{**fields, **kw})


async def reqs(n: int, **kw: Any) -> AsyncIterator[Any]:
    for i in range(n):
        yield req(message=f"m{i}", **kw)


def view(response: Any) -> tuple[Any, ...]:
    """What must match between a direct and a proxied call (not which server, not deadlines)."""
    md = {k: v for k, v in response.metadata.items() if k in ("x-tenant", "x-trace-bin")}
    return response.payload, response.message, response.index, tuple(sorted(md.items()))


async def outcome(kind: str, stub: echo_pb2_grpc.EchoStub, **kw: Any) -> dict[str, Any]:
    if kind == "unary":
        call = stub.Unary(req(**kw), metadata=REQUEST_MD, timeout=10)
    elif kind == "server_stream":
        call = stub.ServerStream(req(count=3, **kw), metadata=REQUEST_MD, timeout=10)
    elif kind == "client_stream":
        call = stub.ClientStream(reqs(3, **kw), metadata=REQUEST_MD, timeout=10)
    else:
        call = stub.Bidi(reqs(3, **kw), metadata=REQUEST_MD, timeout=10)
    # A plain grpc.aio client (the direct baseline too) may report its own synthetic INTERNAL
    # when one of its request writes races the server's end; StatusWatch waits for the real one.
    watch = StatusWatch(call, own_writes=False)  # grpc.aio writes the request iterator itself
    initial = await call.initial_metadata()  # must arrive before any message
    messages: list[Any] = []
    code, details = grpc.StatusCode.OK, ""
    try:
        if kind in ("unary", "client_stream"):
            messages.append(view(await call))
        else:
            async for message in call:
                messages.append(view(message))
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details()
    trailing = await call.trailing_metadata()
    if code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
        code, details, trailing = await watch.final()
    return {
        "initial": [(k, v) for k, v in initial if k.startswith("x-")],
        "trailing": [(k, v) for k, v in trailing if k.startswith("x-")],
        "code": code,
        "details": details,
        "messages": messages,
    }


KINDS = ["unary", "server_stream", "client_stream", "bidi"]


async def call_unimplemented(channel: grpc.aio.Channel, kind: str) -> grpc.StatusCode:
    """One call to a method the upstream lacks. Streaming requests keep coming while the
    upstream answers; the client reads the status with StatusWatch, because the plain
    grpc.aio client has the same race on its own writes (direct calls too)."""
    method = "/gmesh.v1.Echo/NoSuchMethod"
    if kind == "unary":
        try:
            await channel.unary_unary(method)(b"x", timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    if kind == "server_stream":
        call: Any = channel.unary_stream(method)(b"x", timeout=10)
        watch = StatusWatch(call, own_writes=False)
    else:
        call = (channel.stream_unary if kind == "client_stream" else channel.stream_stream)(method)(
            timeout=10
        )
        watch = StatusWatch(call)
        try:
            for _ in range(3):
                await call.write(b"x")
                await asyncio.sleep(0.001)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            watch.write_failed = True
    with contextlib.suppress(grpc.aio.AioRpcError):
        if kind == "client_stream":
            await call
        else:
            async for _ in call:
                pass
    return (await watch.final())[0]
