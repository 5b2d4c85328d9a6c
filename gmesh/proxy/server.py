"""The inbound side of `gmesh proxy`: accept any method on a grpc.aio server, find the
destination service, run its chain, and relay raw bytes (see `relay`).

Destination of a call, in order:
1. the `x-gmesh-service` request header, when it names a mesh service;
2. the mesh service whose endpoints registered the gRPC service of the method path
   (`/orders.v1.Orders/Get` -> whoever serves `orders.v1.Orders`).
(The HTTP/2 `:authority` would come first, but grpc-python's server does not expose it:
grpc/grpc#38906. It slots in here when it does.)

Not found: UNIMPLEMENTED naming the gRPC service; found but no endpoints: UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, Caller
from gmesh.channel.outbound import Outbound, OutboundState
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import CallError
from gmesh.proxy.relay import forward_stream, forward_unary, forwardable, mirror_unary

log = logging.getLogger(__name__)

SERVICE_HEADER = "x-gmesh-service"


def server_options(max_message_bytes: int, max_connection_age: float | None = None) -> list[tuple[str, Any]]:
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
        ("grpc.so_reuseport", 1),  # --workers: several processes share the port
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class _Route:
    """The prepared handler of one method for one outbound state."""

    __slots__ = ("handler", "state")

    def __init__(self, state: OutboundState, handler: grpc.RpcMethodHandler) -> None:
        self.state = state
        self.handler = handler


class Inbound(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Resolves every incoming method to a prepared handler (cached per method and state)."""

    def __init__(
        self, outbound: Outbound, caller_labels: dict[str, str] | None = None, zone: str = ""
    ) -> None:
        self.outbound = outbound
        #: the workload behind this proxy, as route rules see the caller (identity comes with mTLS)
        self.caller_labels = caller_labels or {}
        #: the zone calls come from (zone-aware balancing prefers endpoints there)
        self.zone = zone
        self._routes: dict[str, _Route] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        state = self.outbound.state
        route = self._routes.get(method)
        if route is not None and route.state is state:
            return route.handler
        grpc_service = method[1:].partition("/")[0]
        services = state.snapshot.grpc_services.get(grpc_service, ())
        default = services[0] if len(services) == 1 else None
        ambiguous = services if len(services) > 1 else ()
        kind = state.method_kinds.get(method)
        handler = self._make(method, default, ambiguous, kind)
        if services:  # never cache made-up method names: the cache would grow without bound
            self._routes[method] = _Route(state, handler)
        return handler

    def _make(
        self, method: str, default: str | None, ambiguous: tuple[str, ...], kind: MethodKind | None
    ) -> grpc.RpcMethodHandler:
        outbound = self.outbound
        caller_labels, zone = self.caller_labels, self.zone
        grpc_service = method[1:].partition("/")[0]

        def destination(metadata: Any) -> str:
            for key, value in metadata:
                if key == SERVICE_HEADER:
                    return str(value)
            if default is not None:
                return default
            if ambiguous:
                raise CallError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"gmesh: gRPC service {grpc_service!r} is served by mesh services "
                    f"{', '.join(ambiguous)}; say which with the {SERVICE_HEADER} header",
                )
            raise CallError(
                grpc.StatusCode.UNIMPLEMENTED, f"gmesh: no mesh service serves gRPC service {grpc_service!r}"
            )

        unary = kind is MethodKind.UNARY

        def prepare(context: grpc.aio.ServicerContext, forward: Callable[[Call], Any], payload: Any) -> Any:
            metadata = context.invocation_metadata() or ()
            service = destination(metadata)
            chain = outbound.state.chain(service)
            if chain is None:
                raise CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: no mesh service {service!r}")
            remaining = context.time_remaining()
            timeout = _default_timeout(outbound.state, service) if remaining is None else remaining
            call = Call(
                method,
                forwardable(metadata),
                None if timeout is None else time.monotonic() + timeout,
                service,
                forward,
                kind=kind,
                caller=Caller(peer=context.peer(), labels=caller_labels, zone=zone),
                downstream=(
                    (context, payload, outbound.pool)
                    if unary
                    else (context, payload, outbound.pool, _max_stream_age(outbound.state, service))
                ),
                down=outbound.pool.down,
                replayable=True,  # unary: the request is in hand; streams: RequestTape
                mirror=mirror_unary if unary else None,
            )
            return chain.handler(call)

        if unary:

            async def unary_handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
                try:
                    result: bytes = await prepare(context, forward_unary, request)
                    return result
                except CallError as exc:
                    await context.abort(exc.status, exc.details, exc.trailing_metadata)
                    return None

            return grpc.unary_unary_rpc_method_handler(unary_handler)

        async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            try:
                await prepare(context, forward_stream, requests)
            except CallError as exc:
                await context.abort(exc.status, exc.details, exc.trailing_metadata)

        return grpc.stream_stream_rpc_method_handler(stream)


_NO_DEFAULTS: tuple[float | None, float | None] = (None, None)


def _max_stream_age(state: OutboundState, service: str) -> float | None:
    return state.defaults.get(service, _NO_DEFAULTS)[1]


def _default_timeout(state: OutboundState, service: str) -> float | None:
    return state.defaults.get(service, _NO_DEFAULTS)[0]


def bind(server: grpc.aio.Server, listen: str) -> str:
    """Listen on HOST:PORT (port 0 = any free one); the address actually bound."""
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return f"{listen.rpartition(':')[0]}:{port}"


class ProxyServer:
    """The listening side: a grpc.aio server whose only handler is `Inbound`."""

    def __init__(
        self,
        outbound: Outbound,
        listen: str,
        *,
        max_message_bytes: int,
        caller_labels: dict[str, str] | None = None,
        zone: str = "",
        max_connection_age: float | None = None,
    ) -> None:
        self.outbound = outbound
        self.listen = listen
        self.server = grpc.aio.server(options=server_options(max_message_bytes, max_connection_age))
        self.server.add_generic_rpc_handlers([Inbound(outbound, caller_labels or {}, zone)])
        self.address = bind(self.server, listen)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting calls; calls in flight get `grace` seconds, then are cancelled."""
        await self.server.stop(grace)
