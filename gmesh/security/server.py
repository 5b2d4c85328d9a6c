"""Mutual TLS and authorization for Python gRPC servers, in-process (no sidecar):

    async with gmesh.workload_identity("orders") as identity:
        server = grpc.aio.server(interceptors=gmesh.server_interceptors("orders", identity=identity))
        ...add servicers...
        server.add_secure_port("127.0.0.1:50051", gmesh.server_credentials(identity))
        await server.start()
        async with gmesh.register("127.0.0.1:50051", service="orders", tls=True, identity=identity):
            await server.wait_for_termination()

`server_credentials` rotate by themselves (grpc's dynamic server credentials); the
interceptor reads the caller's verified SPIFFE ID from the handshake, applies the service's
TLS mode (STRICT refuses plaintext calls, for servers that also listen in plaintext) and its
AuthorizationPolicies from the mesh's config, followed live.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.discovery.keys import DEFAULT_PREFIX, MeshKeys
from gmesh.errors import CallError
from gmesh.security.enforce import Gate

if TYPE_CHECKING:
    from gmesh.outbound.stack import Outbound
    from gmesh.security.identity import WorkloadIdentity
    from gmesh.store.etcd import EtcdConfig


def server_credentials(identity: WorkloadIdentity) -> grpc.ServerCredentials:
    """mTLS server credentials presenting `identity`'s certificate, rotating with it, accepting
    clients whose certificate chains to the mesh's trust bundle."""
    return identity.server_credentials()


@contextlib.asynccontextmanager
async def workload_identity(
    service: str, *, etcd: str | EtcdConfig | None = None, prefix: str | None = None, token: str | None = None
) -> AsyncIterator[WorkloadIdentity]:
    """This process's certificate for `service`, from the mesh CA, renewed until the block ends
    (a join token as `token` or GMESH_JOIN_TOKEN, or the local token on the CA's machine)."""
    from gmesh.security import identity as identities
    from gmesh.store.connect import open_store

    keys = MeshKeys(prefix or os.environ.get("GMESH_PREFIX") or DEFAULT_PREFIX)
    store = await open_store(etcd)
    try:
        identity = await identities.acquire(store, keys, service, mesh=store.config.describe(), token=token)
        try:
            yield identity
        finally:
            await identities.release(identity)
    finally:
        await store.close()


class MeshServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits each call by `service`'s TLS mode and AuthorizationPolicies (see `Gate`)."""

    def __init__(
        self,
        service: str,
        *,
        etcd: str | EtcdConfig | None = None,
        prefix: str | None = None,
        identity: WorkloadIdentity | None = None,
    ) -> None:
        self.service = service
        self._etcd = etcd
        self._keys = MeshKeys(prefix or os.environ.get("GMESH_PREFIX") or DEFAULT_PREFIX)
        self._identity = identity
        self._starting: asyncio.Future[Gate] | None = None
        self.gate: Gate | None = None
        self.outbound: Outbound | None = None

    async def start(self) -> Gate:
        """Follow the mesh's config (done by the first call otherwise)."""
        if self.gate is not None:
            return self.gate
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> Gate:
        from gmesh.outbound import stack
        from gmesh.store.connect import resolve_etcd
        from gmesh.store.etcd import EtcdConfig

        config = self._etcd if isinstance(self._etcd, EtcdConfig) else await resolve_etcd(self._etcd)
        outbound = await stack.acquire(config, self._keys)
        self.outbound = outbound
        own = self._identity.spiffe_id if self._identity is not None else ""
        self.gate = Gate(self.service, lambda: outbound.snapshot, own_identity=own)
        return self.gate

    async def close(self) -> None:
        from gmesh.outbound import stack

        if self.outbound is not None:
            outbound, self.outbound = self.outbound, None
            await stack.release(outbound)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        gate = self.gate or await self.start()
        return _guarded(handler, gate, handler_call_details.method)


def server_interceptors(
    service: str,
    *,
    etcd: str | EtcdConfig | None = None,
    prefix: str | None = None,
    identity: WorkloadIdentity | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for `grpc.aio.server(interceptors=...)` that enforce `service`'s TLS mode and
    AuthorizationPolicies on every call (PERMISSION_DENIED naming the policy)."""
    return [MeshServerInterceptor(service, etcd=etcd, prefix=prefix, identity=identity)]


def _guarded(handler: grpc.RpcMethodHandler, gate: Gate, method: str) -> grpc.RpcMethodHandler:
    async def admit(context: grpc.aio.ServicerContext) -> None:
        try:
            gate.admit(context, method, tuple(context.invocation_metadata() or ()))
        except CallError as exc:
            await context.abort(exc.status, exc.details)

    def wrap(inner: Any) -> Any:
        if inspect.isasyncgenfunction(inner):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(context)
                async for item in inner(request, context):
                    yield item

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            return await inner(request, context)

        return call

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, make in kinds:
        inner = getattr(handler, attr)
        if inner is not None:
            return make(
                wrap(inner),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler
