"""The outbound stack: one per process, event loop and mesh (etcd + key prefix), shared by the
proxy and every `gmesh.aio.channel` of the process.

    logical   destination service -> its compiled chain (route filters pick the backend)
    concrete  the mesh's live backends: a picker per (service, subset), breakers, detectors
    endpoint  pooled grpc.aio channels per endpoint address and connection profile

One catalog subscription, one compiled chain per service, one backend table, one set of
endpoint states, breakers, retry budgets and counters. Per-caller settings (zone, caller
labels, connection profile) are views on it, never copies.

Cost follows use. A service's chain is compiled when it is first called, and again only
when its own config changes (its `Service`, its `Route`, or a plugin's kind); its backends
are built, its endpoints connected and health-checked when a call first needs them, and
all of that is released after `idle_timeout` without calls. A change to the mesh touches
only what is in use: 10,000 endpoints of services nobody here calls cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gmesh.balancer.backends import service_spec
from gmesh.chain.compose import PluginFactory, ServiceChain, build_chain, order
from gmesh.config.types import parse_duration
from gmesh.discovery.catalog import Catalog, MeshSnapshot, same_endpoints
from gmesh.discovery.endpoint import MethodKind
from gmesh.discovery.keys import MeshKeys
from gmesh.outbound.health import HealthChecks
from gmesh.outbound.mesh import Build, MeshState
from gmesh.outbound.pool import EndpointConn, EndpointPool, Profile
from gmesh.routing.table import compile_table
from gmesh.stats.backend import PROCESS
from gmesh.stats.metrics import known_methods
from gmesh.stats.publish import ENDPOINT_VIEWS, StatsPublisher

if TYPE_CHECKING:
    from gmesh.pluginmanager import Plugins
    from gmesh.store.etcd import EtcdConfig, Store

log = logging.getLogger(__name__)

#: A service with no call for this long is released: its connections, health checks and
#: pickers (`gmesh proxy --idle-timeout`, `channel(idle_timeout=)`, GMESH_IDLE_TIMEOUT).
DEFAULT_IDLE_TIMEOUT = 600.0
_NO_METHODS: Mapping[str, MethodKind] = MappingProxyType({})


def idle_timeout_from_env() -> float:
    text = os.environ.get("GMESH_IDLE_TIMEOUT", "")
    return parse_duration(text) if text else DEFAULT_IDLE_TIMEOUT


@dataclass(frozen=True, slots=True)
class CompiledService:
    """What the data path reads per call for one destination service. Immutable; replaced on
    change. `methods`: method path -> kind, from its endpoints' reflection (per service:
    two services may serve one gRPC service differently)."""

    name: str
    chain: ServiceChain
    timeout: float | None = None
    max_stream_age: float | None = None
    methods: Mapping[str, MethodKind] = field(default_factory=lambda: _NO_METHODS)
    revision: int = 0


def _methods(snapshot: MeshSnapshot, service: str) -> Mapping[str, MethodKind]:
    found: dict[str, MethodKind] = {}
    for endpoint in snapshot.endpoints_of(service):
        found.update(endpoint.methods)
    return MappingProxyType(found) if found else _NO_METHODS


def _interest(view: dict[str, Any]) -> tuple[bool, int, str]:
    """Endpoints out of service first, then those with the most attempts so far (a ranking that
    changes slowly: the set published stays the same from one second to the next)."""
    usable = view["healthy"] and not view["ejected"] and not view["down"]
    return (usable, -int(view["attempts"]), str(view["address"]))


class Outbound:
    """The outbound stack of one mesh in this process. Get one with `acquire()`."""

    def __init__(
        self,
        store: Store,
        keys: MeshKeys,
        plugins: Plugins,
        *,
        persist_path: Path | None = None,
        idle_timeout: float | None = None,
        drain_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.keys = keys
        self.plugins = plugins
        self.catalog = Catalog(store, keys, plugins.config_kinds(), persist_path=persist_path)
        self.factories: list[PluginFactory] = order(plugins.filter_factories())
        #: the snapshot everything below was built from
        self.snapshot = MeshSnapshot()
        self.mesh = MeshState(
            lambda: self.snapshot, on_activate=self._activate, edits=plugins.telemetry_edits()
        )
        self.backends = self.mesh.backends
        from gmesh.ratelimit.shares import GlobalLimits

        self.mesh.shares = GlobalLimits(store, keys)
        #: compiled services (those called, or asked about), by name; read per call
        self.services: dict[str, CompiledService] = {}
        self.idle_timeout = idle_timeout if idle_timeout is not None else idle_timeout_from_env()
        self.drain_timeout = drain_timeout
        self.health = HealthChecks(self.mesh.states, self._conn_anywhere)
        #: what this process is, in its record under processes/ (the proxy sets "proxy" and its id)
        self.role = "channel"
        self.role_id = ""
        self.started_at = time.time()
        self.publisher = StatsPublisher(
            store, keys, self.mesh.stats, self.mesh.metrics,
            endpoints=self.endpoint_views, process=self.process_record,
        )  # fmt: skip
        self._pools: dict[Any, tuple[EndpointPool, int]] = {}
        self._unhooks: dict[Any, Callable[[], None]] = {}
        self._listeners: list[Callable[[Outbound], None]] = []
        self._activity: dict[str, tuple[int, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.users = 0
        self.closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, *, wait: float = 5.0) -> None:
        """Follow the catalog; return once a snapshot is there (etcd's, or the persisted file's)
        or after `wait` seconds (calls then fail UNAVAILABLE until one arrives)."""
        self._unsubscribe = self.catalog.subscribe(self._on_snapshot)
        await self.catalog.start(wait=wait)
        self.publisher.start()
        if self.mesh.shares is not None:
            # global rate limits read every process's demand before the first call needs them
            self.mesh.shares.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle(), name="gmesh-idle")

    async def close(self, grace: float | None = 0) -> None:
        if self.closed:
            return
        self.closed = True
        self.mesh.metrics.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.health.close()
        self.backends.close()
        await self.publisher.close()
        for quota in self.mesh.kept_under("quota:"):  # tokens held go back to etcd
            with contextlib.suppress(Exception):
                await asyncio.wait_for(quota.close(), 2.0)
        if self.mesh.shares is not None:
            await self.mesh.shares.close()
        pools = [pool for pool, _ in self._pools.values()]
        self._pools.clear()
        await asyncio.gather(*(p.close(grace) for p in pools), return_exceptions=True)
        await self.catalog.close()
        await self.store.close()

    def on_change(self, listener: Callable[[Outbound], None]) -> Callable[[], None]:
        """Call `listener(outbound)` after each snapshot is in use (the proxy republishes its record)."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def revision(self) -> int:
        """The etcd revision of the config and endpoints in use."""
        return self.snapshot.revision

    # -- pools ------------------------------------------------------------------------------

    def pool(self, profile: Profile | None = None) -> EndpointPool:
        """The pool of `profile` (the default one when None), shared by every caller that asks
        for the same; give it back with `release_pool` when done."""
        profile = profile or Profile()
        found = self._pools.get(profile.key)
        if found is None:
            pool = EndpointPool(
                profile,
                addresses_of=lambda s: (e.address for e in self.snapshot.endpoints_of(s)),
                tls_of=lambda s: {e.address: e.tls for e in self.snapshot.endpoints_of(s) if e.tls},
                drain_timeout=self.drain_timeout,
                on_state_change=self.backends.wake,
            )
            if profile.identity is not None:
                # a new certificate or trust bundle: new connections (grpc cannot rotate them)
                rebuild = pool.rebuild
                self._unhooks[profile.key] = profile.identity.on_change(lambda _material: rebuild())
            found = (pool, 0)
        pool, users = found
        self._pools[profile.key] = (pool, users + 1)
        return pool

    async def release_pool(self, pool: EndpointPool, grace: float | None = None) -> None:
        found = self._pools.get(pool.profile.key)
        if found is None or found[0] is not pool:
            return
        users = found[1] - 1
        if users > 0:
            self._pools[pool.profile.key] = (pool, users)
            return
        del self._pools[pool.profile.key]
        unhook = self._unhooks.pop(pool.profile.key, None)
        if unhook is not None:
            unhook()
        await pool.close(grace)

    def pools(self) -> list[EndpointPool]:
        return [pool for pool, _ in self._pools.values()]

    def _conn_anywhere(self, address: str) -> EndpointConn | None:
        for pool, _ in self._pools.values():
            conn = pool.conn(address)
            if conn is not None:
                return conn
        return None

    # -- compiling (per service, on first use and on change) --------------------------------

    def compiled(self, service: str) -> CompiledService | None:
        """The compiled service, compiled now if it was never called; None when the mesh has
        no such service."""
        found = self.services.get(service)
        if found is not None:
            return found
        if not self.snapshot.has_service(service):
            return None
        return self._compile(service)

    def preview(self, service: str) -> CompiledService | None:
        """`compiled` without keeping it (admin dumps, `gmesh explain`): costs nothing later."""
        found = self.services.get(service)
        if found is not None or not self.snapshot.has_service(service):
            return found
        return self._compile(service, keep=False)

    def _compile(self, service: str, *, keep: bool = True) -> CompiledService:
        snapshot = self.snapshot
        spec = service_spec(snapshot, service)
        ctx = Build(service, snapshot, spec, compile_table(service, snapshot), self.backends, self.mesh)
        methods = _methods(snapshot, service)
        compiled = CompiledService(
            service,
            build_chain(ctx, self.factories),
            spec.timeout if spec is not None else None,
            spec.max_stream_age if spec is not None else None,
            methods,
            snapshot.revision,
        )
        if keep:
            self.services[service] = compiled
            self.mesh.metrics.set_known(service, known_methods(snapshot, service, methods))
        return compiled

    def _on_snapshot(self, new: MeshSnapshot) -> None:
        started = time.perf_counter()
        old, self.snapshot = self.snapshot, new
        # Plugin kinds have no service of their own: a change to one recompiles every chain.
        kinds = (set(old.resources) | set(new.resources)) - {"Service", "Route"}
        plugin_kinds_changed = any(old.resources.get(k) is not new.resources.get(k) for k in kinds)
        recompiled = 0
        for service, compiled in list(self.services.items()):
            if not new.has_service(service):
                del self.services[service]
                self.mesh.forget(service)
                continue
            if (
                plugin_kinds_changed
                or old.resource("Service", service) is not new.resource("Service", service)
                or old.routes.get(service) is not new.routes.get(service)
            ):
                self._compile(service)
                recompiled += 1
            elif not same_endpoints(old, new, service):
                methods = _methods(new, service)
                self.services[service] = replace(compiled, methods=methods, revision=new.revision)
                self.mesh.metrics.set_known(service, known_methods(new, service, methods))
        touched = [
            s
            for s in self.backends.active
            if not same_endpoints(old, new, s) or old.resource("Service", s) is not new.resource("Service", s)
        ]
        for service in touched:
            if new.has_service(service):
                self.backends.build(service)
                self._follow(service)
            else:
                self._deactivate(service)
        log.debug(
            "revision %d in use after %.2f ms (%d chains recompiled, %d services in use touched)",
            new.revision, (time.perf_counter() - started) * 1000, recompiled, len(touched),
        )  # fmt: skip
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:
                log.exception("outbound listener %r failed", listener)

    # -- services in use --------------------------------------------------------------------

    def activate(self, service: str) -> None:
        """Build `service`'s backends now (a channel asked to connect): as its first call would."""
        self.backends.get((service, None))

    def _activate(self, service: str) -> None:
        """Backends of `service` were just built for a call: check its endpoints' health."""
        self._activity[service] = (-1, time.monotonic())
        self._follow(service)

    def _follow(self, service: str) -> None:
        spec = service_spec(self.snapshot, service)
        addresses = [e.address for e in self.snapshot.endpoints_of(service)]
        with contextlib.suppress(RuntimeError):  # no running loop (gmesh explain)
            self.health.sync(service, spec.health_check if spec is not None else None, addresses)
            for pool, _ in self._pools.values():
                pool.sync(service, addresses)

    def _deactivate(self, service: str) -> None:
        log.info("releasing %s: no calls for %s", service, "a while")
        self.backends.drop(service)
        self.health.stop(service)
        self._activity.pop(service, None)
        for pool, _ in self._pools.values():
            pool.release(service)

    def _activity_of(self, service: str) -> tuple[int, int]:
        """(attempts finished, attempts in flight) of `service`'s endpoints in this process."""
        addresses = (e.address for e in self.snapshot.endpoints_of(service))
        states = self.mesh.states.of_service(service, addresses)
        return sum(s.calls for s in states), sum(s.inflight for s in states)

    def sweep_idle(self, now: float | None = None) -> list[str]:
        """Release the services in use that had no call for `idle_timeout`; their names."""
        now = time.monotonic() if now is None else now
        released = []
        for service in list(self.backends.active):
            calls, inflight = self._activity_of(service)
            last_calls, since = self._activity.get(service, (-1, now))
            if inflight or calls != last_calls:
                self._activity[service] = (calls, now)
            elif now - since >= self.idle_timeout:
                self._deactivate(service)
                released.append(service)
        return released

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(max(min(self.idle_timeout / 4, 60.0), 0.05))
            try:
                self.sweep_idle()
            except Exception:
                log.exception("idle sweep failed")

    def process_record(self) -> dict[str, Any]:
        """This process under processes/ (the dashboard's Proxies page)."""
        return {
            "role": self.role,
            "id": self.role_id or PROCESS,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "revision": self.revision,
            "startedAt": round(self.started_at, 3),
            "services": sorted(self.backends.active),
        }

    def endpoint_views(self) -> dict[str, list[dict[str, Any]]]:
        """service -> this process's view of its endpoints (for the published stats): at most
        ENDPOINT_VIEWS per service, those out of service and the most used first, so a document
        stays far below etcd's request limit however large the service."""
        down: set[str] = set()
        for pool in self.pools():
            down.update(pool.down)
        now = time.monotonic()
        out: dict[str, list[dict[str, Any]]] = {}
        for state in self.mesh.states.all():
            out.setdefault(state.service, []).append(
                {
                    "address": state.address,
                    "inflight": state.inflight,
                    "ewmaMs": round(state.ewma * 1000, 1),
                    "attempts": state.calls,
                    "failures": state.errors,
                    "healthy": state.healthy,
                    "ejected": state.ejected_until > now,
                    "ejections": state.ejections,
                    "down": state.address in down,
                }
            )
        for views in out.values():
            if len(views) > ENDPOINT_VIEWS:
                views.sort(key=_interest)
                del views[ENDPOINT_VIEWS:]
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "compiled": sorted(self.services),
            "inUse": sorted(self.backends.active),
            "healthChecks": self.health.checking(),
            "pools": [p.describe() for p in self.pools()],
            "idleTimeoutSeconds": self.idle_timeout,
        }


# --------------------------------------------------------------------------- one per mesh


_STACKS: dict[tuple[int, str, str], Outbound] = {}
_STARTING: dict[tuple[int, str, str], asyncio.Future[Outbound]] = {}


async def acquire(
    etcd: EtcdConfig,
    keys: MeshKeys,
    *,
    persist_path: Path | None = None,
    idle_timeout: float | None = None,
    drain_timeout: float | None = None,
    wait: float = 5.0,
) -> Outbound:
    """The outbound stack of this event loop for (`etcd`, `keys.prefix`), started if new.

    Every caller shares it; each gives it back with `release()`. Settings that only the
    first caller could give (a snapshot file, the idle and drain timeouts) are applied to
    a running stack too: the file is persisted from then on, the shorter timeouts win.
    """
    from gmesh.pluginmanager import Plugins
    from gmesh.store.etcd import Store

    key = (id(asyncio.get_running_loop()), etcd.describe(), keys.prefix)
    stack = _STACKS.get(key)
    if stack is None:
        starting = _STARTING.get(key)
        if starting is not None:
            stack = await asyncio.shield(starting)
        else:
            future: asyncio.Future[Outbound] = asyncio.get_running_loop().create_future()
            _STARTING[key] = future
            try:
                plugins = Plugins.load()
                store = await Store.connect(etcd)
                stack = Outbound(
                    store,
                    keys,
                    plugins,
                    persist_path=persist_path,
                    idle_timeout=idle_timeout,
                    drain_timeout=30.0 if drain_timeout is None else drain_timeout,
                )
                await stack.start(wait=wait)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters get it through their own await
                raise
            finally:
                _STARTING.pop(key, None)
            _STACKS[key] = stack
            future.set_result(stack)
    else:
        if persist_path is not None and stack.catalog.persist_path is None:
            stack.catalog.persist_path = persist_path
        if idle_timeout is not None:
            stack.idle_timeout = min(stack.idle_timeout, idle_timeout)
        if drain_timeout is not None:
            stack.drain_timeout = min(stack.drain_timeout, drain_timeout)
    stack.users += 1
    return stack


async def release(stack: Outbound) -> None:
    """Give back a stack from `acquire`; the last user closes it."""
    stack.users -= 1
    if stack.users > 0:
        return
    for key, value in list(_STACKS.items()):
        if value is stack:
            del _STACKS[key]
    await stack.close()


def running() -> Sequence[Outbound]:
    """Every stack of this process (tests and benches look inside)."""
    return list(_STACKS.values())
