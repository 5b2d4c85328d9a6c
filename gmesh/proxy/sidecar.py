"""The inbound proxy (sidecar mode): `gmesh proxy --inbound APP --service S --listen-tls HOST:PORT`.

It terminates mutual TLS in front of a server in any language that knows nothing of TLS: the
caller's certificate is verified against the trust bundle and its SPIFFE ID read from the
handshake; the service's TLS mode and AuthorizationPolicies decide (`gmesh.security.enforce`);
admitted calls are relayed as raw bytes to the app over loopback plaintext, with the proxy's
relay (statuses, trailers, cancellation, flow control as in the outbound proxy). It serves
with its own workload identity for S (rotating through grpc's dynamic server credentials) and
registers the endpoint in etcd, its TLS address as `tls`:

    STRICT      address = tls = the TLS listener (plaintext callers cannot even connect)
    PERMISSIVE  address = the plaintext listener (`--listen-plain`), tls = the TLS listener
    DISABLED    address = the plaintext listener, no tls (needs `--listen-plain`)

and re-registers when the Service's mode changes. The app's methods come from its reflection
(if it offers it), so callers know the method kinds as for any endpoint.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, Caller, Door
from gmesh.discovery import probe
from gmesh.discovery.endpoint import Endpoint, MethodKind
from gmesh.discovery.registry import Registration
from gmesh.errors import CallError
from gmesh.outbound.pool import EndpointPool, Profile
from gmesh.proxy.relay import ProxyStream, ProxyUnary, forward_stream, forward_unary, forwardable
from gmesh.proxy.server import bind, server_options
from gmesh.ratelimit.limits import RateLimiter, limits_of
from gmesh.ratelimit.quota import KIND as QUOTA_KIND
from gmesh.ratelimit.quota import QuotaChecker, quotas_of
from gmesh.ratelimit.spec import KIND as RATE_LIMIT_KIND
from gmesh.security.enforce import Gate, mode_of

if TYPE_CHECKING:
    from gmesh.outbound.stack import Outbound
    from gmesh.security.identity import WorkloadIdentity

log = logging.getLogger(__name__)

HANDLER_CACHE = 1024


class Sidecar:
    """A started inbound proxy for `service` in front of `app`; `stop()` withdraws and drains."""

    def __init__(
        self,
        outbound: Outbound,
        identity: WorkloadIdentity,
        service: str,
        app: str,
        listen_tls: str,
        *,
        listen_plain: str | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        labels: Mapping[str, str] | None = None,
        zone: str = "",
    ) -> None:
        self.outbound, self.identity, self.service, self.app = outbound, identity, service, app
        self.labels, self.zone = dict(labels or {}), zone
        self.gate = Gate(service, lambda: outbound.snapshot, own_identity=identity.spiffe_id)
        #: the service's RateLimits, recompiled when they change (their buckets kept)
        self._limits_source: Any = None
        self._limiter: RateLimiter | None = None
        self._quotas_source: Any = None
        self._quotas: QuotaChecker | None = None
        self.app_endpoint = Endpoint(service=service, address=app)
        self.pool = EndpointPool(
            Profile(max_message_bytes=max_message_bytes), addresses_of=lambda _service: (app,)
        )
        self.methods: Mapping[str, MethodKind] = MappingProxyType({})
        self.grpc_services: tuple[str, ...] = ()
        self.server = grpc.aio.server(options=server_options(max_message_bytes))
        self.server.add_generic_rpc_handlers([_Handler(self)])
        self.tls_address = bind(self.server, listen_tls, credentials=identity.server_credentials())
        self.plain_address = bind(self.server, listen_plain) if listen_plain else ""
        self.registration: Registration | None = None
        self._registered: tuple[str, str] | None = None
        self._unlisten: Any = None
        self._tasks: set[Any] = set()

    async def start(self) -> None:
        api = await probe.reflect(self.app)
        if api is not None:
            self.methods, self.grpc_services = MappingProxyType(api.methods), api.services
        else:
            log.warning(
                "%s offers no reflection: method kinds unknown (every call relayed as a stream)", self.app
            )
        await self.server.start()
        await self._register()
        self._unlisten = self.outbound.on_change(lambda _o: self._spawn(self._register()))

    def _spawn(self, coro: Any) -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def limiter(self) -> RateLimiter | None:
        """The RateLimits of the service now (None without any): compiled once per change."""
        resources = self.outbound.snapshot.resources.get(RATE_LIMIT_KIND)
        if resources is not self._limits_source:
            self._limits_source = resources
            used: set[str] = set()
            limits = limits_of(resources or {}, self.service, self._kept(used), self.outbound.mesh.shares)
            self.outbound.mesh.prune(self.service, "ratelimit:", used)  # changed limits start afresh
            self._limiter = RateLimiter(limits) if limits else None
        return self._limiter

    def quotas(self) -> QuotaChecker | None:
        """The Quotas of the service now (None without any): compiled once per change."""
        resources = self.outbound.snapshot.resources.get(QUOTA_KIND)
        if resources is not self._quotas_source:
            self._quotas_source = resources
            used: set[str] = set()
            outbound = self.outbound
            checks = quotas_of(resources or {}, self.service, self._kept(used), outbound.store, outbound.keys)
            outbound.mesh.prune(self.service, "quota:", used)
            self._quotas = QuotaChecker(checks) if checks else None
        return self._quotas

    def _kept(self, used: set[str]) -> Any:
        """State kept in the mesh state, shared with the outbound chain of the same service (one
        bucket, one share of a global limit, per limit and process), closed with the stack, shown
        in the config dump. Records the keys asked for in `used`."""
        mesh, service = self.outbound.mesh, self.service

        def kept(key: str, make: Any) -> Any:
            used.add(key)
            return mesh.kept(service, key, make)

        return kept

    def wanted(self) -> tuple[str, str]:
        """(address, tls) the endpoint record should carry under the current TLS mode."""
        mode = mode_of(self.outbound.snapshot, self.service)
        if mode == "STRICT" or not self.plain_address:
            if mode == "DISABLED":
                log.error(
                    "%s is tls.mode DISABLED but this inbound proxy has no --listen-plain: serving mTLS",
                    self.service,
                )
            return self.tls_address, self.tls_address
        if mode == "DISABLED":
            return self.plain_address, ""
        return self.plain_address, self.tls_address

    async def _register(self) -> None:
        wanted = self.wanted()
        if wanted == self._registered:
            return
        address, tls = wanted
        old = self.registration
        registration = Registration(
            address, service=self.service, labels=self.labels, zone=self.zone, reflection=False,
            grpc_services=self.grpc_services, store=self.outbound.store, prefix=self.outbound.keys.prefix,
            tls_address=tls or None, handle_sigterm=False, drain_delay=0, methods=self.methods,
        )  # fmt: skip
        await registration.__aenter__()
        self.registration, self._registered = registration, wanted
        log.info("registered %s of %s (mTLS at %s)", address, self.service, tls or "none")
        if old is not None:
            await old.deregister(drain=False)
            await old.__aexit__(None, None, None)

    async def withdraw(self) -> None:
        """Leave discovery (the listeners keep serving)."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        for task in list(self._tasks):
            task.cancel()
        if self.registration is not None:
            registration, self.registration = self.registration, None
            await registration.deregister(drain=False)
            await registration.__aexit__(None, None, None)

    async def stop(self, grace: float | None = None) -> None:
        await self.withdraw()
        await self.server.stop(grace)
        await self.pool.close(0)

    def describe(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "tls": self.tls_address,
            "plaintext": self.plain_address or None,
            "registered": list(self._registered) if self._registered else None,
            **self.gate.describe(),
        }


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self._cache: collections.OrderedDict[str, grpc.RpcMethodHandler] = collections.OrderedDict()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        found = self._cache.get(method)
        if found is not None:
            return found
        kind = self.sidecar.methods.get(method)
        handler = _make(self.sidecar, method, kind)
        if kind is not None:  # only methods the app reports are kept (callers may make names up)
            self._cache[method] = handler
            if len(self._cache) > HANDLER_CACHE:
                self._cache.popitem(last=False)
        return handler


def _make(sidecar: Sidecar, method: str, kind: MethodKind | None) -> grpc.RpcMethodHandler:
    gate, pool, service, endpoint = sidecar.gate, sidecar.pool, sidecar.service, sidecar.app_endpoint
    known = kind is not None

    def prepare(context: grpc.aio.ServicerContext, forward: Any, downstream: Any) -> Call[Any]:
        metadata = forwardable(context.invocation_metadata() or ())
        identity = gate.admit(context, method, metadata)
        remaining = context.time_remaining()
        call: Call[Any] = Call(
            method,
            metadata,
            None if remaining is None else time.monotonic() + remaining,
            service,
            forward,
            downstream,
            kind=kind,
            caller=Caller(peer=context.peer(), identity=identity),
            door=Door.PROXY,
        )
        call.endpoint = endpoint
        limiter = sidecar.limiter()
        if limiter is not None:
            limiter.check(call)
        return call

    if kind is MethodKind.UNARY:

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
            try:
                call = prepare(context, forward_unary, ProxyUnary(context, request, pool, known))
                quotas = sidecar.quotas()
                if quotas is not None:
                    for check in quotas.checks:
                        await check.check(call)
                return await forward_unary(call)
            except CallError as exc:
                await context.abort(exc.status, exc.details, exc.trailing_metadata)
                return None

        return grpc.unary_unary_rpc_method_handler(unary)

    async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        try:
            call = prepare(context, forward_stream, ProxyStream(context, requests, pool, known, None))
            quotas = sidecar.quotas()
            if quotas is not None:
                for check in quotas.checks:
                    await check.check(call)
            await forward_stream(call)
        except CallError as exc:
            await context.abort(exc.status, exc.details, exc.trailing_metadata)

    return grpc.stream_stream_rpc_method_handler(stream)
