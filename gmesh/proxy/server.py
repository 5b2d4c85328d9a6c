"""The inbound side of `gmesh proxy`: accept any method on a grpc.aio server, find the
destination service, run its chain, and relay raw bytes (see `relay`).

Destination of a call, in order:
1. the `x-gmesh-service` request header, when it names a mesh service;
2. the mesh service whose endpoints registered the gRPC service of the method path
   (`/orders.v1.Orders/Get` -> whoever serves `orders.v1.Orders`).
(The HTTP/2 `:authority` would come first, but grpc-python's server does not expose it:
grpc/grpc#38906. It slots in here when it does.)

Not found: UNIMPLEMENTED naming the gRPC service; found but no endpoints: UNAVAILABLE.

A method's handler is prepared once per snapshot and kept only when the destination's
endpoints report that method (reflection): method names a caller makes up get a handler
of their own that is dropped after the call, so they can never grow the proxy's memory.
grpc's own wait_for_ready never leaves the client; a caller that would rather wait for an
endpoint of a service that has none sends `x-gmesh-wait-for-ready: 1`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, Caller, Door
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import AddressInUse, CallError
from gmesh.proxy.relay import (
    ProxyStream,
    ProxyUnary,
    forward_stream,
    forward_unary,
    forwardable,
    mirror_unary,
)

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.outbound.pool import EndpointPool
    from gmesh.outbound.stack import CompiledService, Outbound

log = logging.getLogger(__name__)

SERVICE_HEADER = "x-gmesh-service"
WAIT_HEADER = "x-gmesh-wait-for-ready"
#: Prepared handlers kept (methods the destinations' endpoints report; least recently used go).
HANDLER_CACHE = 4096


def server_options(
    max_message_bytes: int, max_connection_age: float | None = None, *, reuse_port: bool = False
) -> list[tuple[str, Any]]:
    age = [] if max_connection_age is None else [
        # Clients reconnect (GOAWAY) after this long, so they spread again over proxy workers;
        # calls in flight get another 30 s to finish.
        ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]  # fmt: skip
    return [
        *age,
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # grpc-core shares ports (SO_REUSEPORT) by default: two proxies on one port would both
        # run and split the traffic. Only the workers of one `gmesh proxy --workers N` share.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class _Prepared:
    """A method's handler for one snapshot."""

    __slots__ = ("handler", "snapshot")

    def __init__(self, snapshot: MeshSnapshot, handler: grpc.RpcMethodHandler) -> None:
        self.snapshot = snapshot
        self.handler = handler


def _refuse(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.stream_stream_rpc_method_handler(refuse)


class Inbound(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Resolves every incoming method to a prepared handler."""

    def __init__(
        self,
        outbound: Outbound,
        pool: EndpointPool,
        caller_labels: dict[str, str] | None = None,
        zone: str = "",
    ) -> None:
        self.outbound = outbound
        self.pool = pool
        #: the workload behind this proxy, as route rules see the caller (identity comes with mTLS)
        self.caller_labels = caller_labels or {}
        #: the zone calls come from (zone-aware balancing prefers endpoints there)
        self.zone = zone
        #: the SPIFFE ID this proxy presents (`--identity`): the caller route rules see
        self.caller_identity = ""
        #: what the service graph calls the callers of this proxy (`source_of`)
        self.source = ""
        self._prepared: collections.OrderedDict[tuple[str, str | None], _Prepared] = collections.OrderedDict()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        named: str | None = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == SERVICE_HEADER:
                named = str(value)
                break
        outbound = self.outbound
        snapshot = outbound.snapshot
        cache_key = (method, named)
        prepared = self._prepared.get(cache_key)
        if prepared is not None and prepared.snapshot is snapshot:
            self._prepared.move_to_end(cache_key)
            return prepared.handler
        grpc_service = method[1:].partition("/")[0]
        if named is not None:
            destination = named
        else:
            services = snapshot.grpc_services.get(grpc_service, ())
            if len(services) > 1:
                return _refuse(
                    grpc.StatusCode.UNAVAILABLE,
                    f"gmesh: gRPC service {grpc_service!r} is served by mesh services "
                    f"{', '.join(services)}; say which with the {SERVICE_HEADER} header",
                )
            if not services:
                return _refuse(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"gmesh: no mesh service serves gRPC service {grpc_service!r}",
                )
            destination = services[0]
        compiled = outbound.compiled(destination)
        if compiled is None:
            return _refuse(grpc.StatusCode.UNAVAILABLE, f"gmesh: no mesh service {destination!r}")
        kind = compiled.methods.get(method)
        handler = self._make(method, destination, kind)
        if kind is not None:  # a method its endpoints report: keep it (bounded, LRU)
            self._prepared[cache_key] = _Prepared(snapshot, handler)
            self._prepared.move_to_end(cache_key)
            if len(self._prepared) > HANDLER_CACHE:
                self._prepared.popitem(last=False)
        return handler

    def cached(self) -> int:
        return len(self._prepared)

    def _make(self, method: str, service: str, kind: MethodKind | None) -> grpc.RpcMethodHandler:
        outbound = self.outbound
        pool = self.pool
        caller_labels, zone = self.caller_labels, self.zone
        identity = self.caller_identity
        source = self.source
        known = kind is not None

        def prepare(
            context: grpc.aio.ServicerContext, forward: Callable[[Call[Any]], Any], downstream: Any
        ) -> tuple[CompiledService, Call[Any]]:
            compiled = outbound.services.get(service) or outbound.compiled(service)
            if compiled is None:
                raise CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: no mesh service {service!r}")
            metadata = context.invocation_metadata() or ()
            remaining = context.time_remaining()
            timeout = compiled.timeout if remaining is None else remaining
            wait = False
            for key, _ in metadata:
                if key == WAIT_HEADER:
                    wait = True
                    break
            call: Call[Any] = Call(
                method,
                forwardable(metadata),
                None if timeout is None else time.monotonic() + timeout,
                service,
                forward,
                downstream,
                kind=kind,
                caller=Caller(
                    peer=context.peer(), identity=identity, labels=caller_labels, zone=zone, source=source
                ),
                down=pool.down,
                replayable=True,  # unary: the request is in hand; streams: RequestTape
                mirror=mirror_unary if kind is MethodKind.UNARY else None,
                wait_for_ready=wait,
                door=Door.PROXY,
            )
            return compiled, call

        if kind is MethodKind.UNARY:

            async def unary_handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
                try:
                    compiled, call = prepare(
                        context, forward_unary, ProxyUnary(context, request, pool, known)
                    )
                    call.sent_bytes = len(request)
                    result: bytes = await compiled.chain.handler(call)
                    return result
                except CallError as exc:
                    await context.abort(exc.status, exc.details, exc.trailing_metadata)
                    return None

            return grpc.unary_unary_rpc_method_handler(unary_handler)

        async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            try:
                compiled = outbound.services.get(service) or outbound.compiled(service)
                age = compiled.max_stream_age if compiled is not None else None
                compiled, call = prepare(
                    context, forward_stream, ProxyStream(context, requests, pool, known, age)
                )
                await compiled.chain.handler(call)
            except CallError as exc:
                await context.abort(exc.status, exc.details, exc.trailing_metadata)

        return grpc.stream_stream_rpc_method_handler(stream)


def bind(server: grpc.aio.Server, listen: str, *, credentials: grpc.ServerCredentials | None = None) -> str:
    """Listen on HOST:PORT (port 0 = any free one), with TLS when `credentials` are given; the
    address actually bound. A port in use (or any other failure to listen) raises
    `AddressInUse` with one clear line."""
    why = (
        f"cannot listen on {listen}: the address is in use (another gmesh proxy, or another "
        "program) or not available here"
    )
    try:
        if credentials is not None:
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # grpcio >= 1.6x: "Failed to bind to address ..."
        raise AddressInUse(why) from exc
    if port == 0:
        raise AddressInUse(why)
    return f"{listen.rpartition(':')[0]}:{port}"


class ProxyServer:
    """The listening side: a grpc.aio server whose only handler is `Inbound`."""

    def __init__(
        self,
        outbound: Outbound,
        pool: EndpointPool,
        listen: str,
        *,
        max_message_bytes: int,
        caller_labels: dict[str, str] | None = None,
        zone: str = "",
        max_connection_age: float | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.outbound = outbound
        self.listen = listen
        self.server = grpc.aio.server(
            options=server_options(max_message_bytes, max_connection_age, reuse_port=reuse_port)
        )
        self.inbound = Inbound(outbound, pool, caller_labels or {}, zone)
        self.server.add_generic_rpc_handlers([self.inbound])
        self.address = bind(self.server, listen)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting calls; calls in flight get `grace` seconds, then are cancelled."""
        await self.server.stop(grace)
