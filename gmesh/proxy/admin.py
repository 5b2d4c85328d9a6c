"""The proxy's admin port: `grpc.health.v1` (SERVING once a snapshot is loaded), server
reflection of its own services, `gmesh.v1.Admin/ConfigDump` and `Tap`.

Loopback by default. With an identity (`gmesh proxy --identity` or `--inbound`), the port
serves mutual TLS only, and ConfigDump and Tap (which show config and live calls) are admitted
by the AuthorizationPolicies of the proxy's own service like any call to it: an ALLOW policy
must let the caller's identity call `/gmesh.v1.Admin/*` (`gmesh tap --identity ops`)."""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gmesh.errors import CallError
from gmesh.outbound.stack import Outbound
from gmesh.proxy.server import bind
from gmesh.security.enforce import Gate
from gmesh.stats.tap import DEFAULT_BODY, DEFAULT_RATE, Tap, TapHub, TooManyTaps
from gmesh.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from gmesh.security.identity import WorkloadIdentity

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def _loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_dump(outbound: Outbound, proxy: dict[str, Any], only: str = "") -> dict[str, Any]:
    """What this proxy serves now: revision, connection to etcd, services, endpoints (with their
    load, latency, health and ejection state here, for the services in use), breakers, chains,
    and what the outbound stack holds (compiled services, services in use, connections)."""
    snapshot = outbound.snapshot
    mesh = outbound.mesh
    services = {}
    now = time.monotonic()
    for name in snapshot.services():
        if only and name != only:
            continue
        compiled = outbound.preview(name)
        in_use = name in outbound.backends.active
        breaker = mesh.breakers.get(name)
        services[name] = {
            "inUse": in_use,
            "endpoints": [
                {
                    "address": e.address,
                    "labels": dict(e.labels),
                    "weight": e.weight,
                    "zone": e.zone,
                    # what this process sees of it: load, latency, health, ejection
                    "state": mesh.states.get(name, e.address).describe(now) if in_use else None,
                }
                for e in snapshot.endpoints_of(name)
            ],
            "breaker": None if breaker is None else breaker.describe(),
            "rateLimits": [state.describe() for state in mesh.kept_of(name, "ratelimit:")],
            "quotas": [state.describe() for state in mesh.kept_of(name, "quota:")],
            "grpcServices": sorted({g for e in snapshot.endpoints_of(name) for g in e.grpc_services}),
            "chain": list(compiled.chain.filters) if compiled else [],
            "chainError": compiled.chain.error if compiled else None,
            "config": {
                kind: resources[name].document()["spec"]
                for kind, resources in snapshot.resources.items()
                if name in resources
            },
        }
    return {
        "revision": snapshot.revision,
        "source": snapshot.source,
        "connected": outbound.catalog.connected,
        "lastError": outbound.catalog.last_error,
        "proxy": proxy,
        "outbound": outbound.describe(),
        "services": services,
    }


class _Admin(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        dump: Callable[[str], dict[str, Any]],
        hub: Callable[[str], TapHub | None],
        gate: Gate | None = None,
    ) -> None:
        self._dump = dump
        self._hub = hub
        self._gate = gate

    async def _admit(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if self._gate is None:
            return
        try:
            self._gate.admit(
                context, f"/{ADMIN_SERVICE}/{method}", tuple(context.invocation_metadata() or ())
            )
        except CallError as exc:
            await context.abort(exc.status, exc.details)

    async def ConfigDump(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._admit(context, "ConfigDump")
        return admin_pb2.ConfigDumpResponse(json=json.dumps(self._dump(request.service), indent=2))

    async def Tap(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await self._admit(context, "Tap")
        async for event in tap_events(request, context, self._hub):
            yield event


async def tap_events(
    request: Any, context: grpc.aio.ServicerContext, hub_of: Callable[[str], TapHub | None]
) -> AsyncIterator[Any]:
    """The events of one `Tap` call until the caller goes away (shared by the proxy's admin port
    and `gmesh.admin` in applications)."""
    if not request.service:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "gmesh: tap: name a service")
    hub = hub_of(request.service)
    if hub is None:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"gmesh: tap: no mesh service {request.service!r} here"
        )
    assert hub is not None
    tap = Tap(
        request.service,
        request.method,
        request.bodies,
        rate=request.max_rate or DEFAULT_RATE,
        max_body=request.max_body_bytes or DEFAULT_BODY,
    )
    try:
        hub.open(tap)
    except TooManyTaps as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"gmesh: tap: {exc}")
    try:
        await context.send_initial_metadata((("gmesh-tap", "open"),))  # the caller can tell it is open
        while True:
            event = await tap.next_event()
            metadata = [admin_pb2.TapHeader(key=k, value=v) for k, v in event.pop("metadata")]
            yield admin_pb2.TapEvent(metadata=metadata, **event)
    finally:
        hub.close(tap)


class AdminServer:
    """Health, reflection and config dump on their own port, apart from proxied traffic."""

    def __init__(
        self,
        outbound: Outbound,
        listen: str,
        proxy_info: Callable[[], dict[str, Any]],
        *,
        reuse_port: bool = False,
        identity: WorkloadIdentity | None = None,
    ) -> None:
        self.outbound = outbound
        gate = None
        if identity is not None:
            gate = Gate(identity.service, lambda: outbound.snapshot)
        elif not _loopback(listen):
            log.warning(
                "the admin port %s is not on loopback and has no mTLS (no --identity): whoever reaches "
                "it can dump config and tap calls",
                listen,
            )
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(
            _Admin(
                lambda only: config_dump(outbound, proxy_info(), only),
                lambda service: outbound.mesh.taps if outbound.snapshot.has_service(service) else None,
                gate,
            ),
            self.server,
        )
        reflection.enable_server_reflection(
            (ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        credentials = identity.server_credentials() if identity is not None else None
        self.address = bind(self.server, listen, credentials=credentials)
        self.tls = identity is not None

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(ADMIN_SERVICE, status)

    async def stop(self) -> None:
        await self.server.stop(None)
