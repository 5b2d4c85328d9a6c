"""The outbound stack shared by both front doors: snapshot -> compiled chains + endpoint channels.

    logical   destination service -> its chain (route filters pick the backend)
    concrete  the balance filter's picker over the backend's endpoints
    endpoint  one pooled grpc.aio channel per endpoint address

`Outbound` follows a catalog; every change compiles a new `OutboundState` (chains and the
method-kind index) and swaps one reference. The proxy and `gmesh.aio.channel` only add
their own forwarder (how messages cross to and from the caller).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from gmesh.balancer.state import REGISTRY
from gmesh.chain.compose import ChainTable, ServiceChain, build_table
from gmesh.chain.filter import FilterFactory
from gmesh.channel.endpoint import EndpointPool
from gmesh.channel.health import HealthChecks
from gmesh.discovery.catalog import Catalog, MeshSnapshot
from gmesh.discovery.endpoint import MethodKind
from gmesh.plugins.stats import StatsPublisher

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutboundState:
    """Everything the data path reads per call, for one snapshot. Immutable."""

    snapshot: MeshSnapshot
    table: ChainTable
    #: method path -> kind, learned from endpoints' reflection (for the proxy's unary fast path)
    method_kinds: Mapping[str, MethodKind] = field(default_factory=lambda: MappingProxyType({}))
    built_at: float = 0.0
    #: service -> (default timeout, max stream age) from its Service kind, read per call
    defaults: Mapping[str, tuple[float | None, float | None]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def chain(self, service: str) -> ServiceChain | None:
        return self.table.chains.get(service)


class Outbound:
    """Compiles chains from a catalog's snapshots and keeps the endpoint pool in step."""

    def __init__(
        self,
        catalog: Catalog,
        factories: Sequence[FilterFactory],
        *,
        pool: EndpointPool | None = None,
        health_scope: str | None = None,
    ) -> None:
        self.catalog = catalog
        self.factories = tuple(factories)
        self.pool = pool or EndpointPool()
        self.state = OutboundState(MeshSnapshot(), ChainTable(0))
        self._listeners: list[Callable[[OutboundState], None]] = []
        # Per-backend counters go to etcd for canary rollouts (one publisher per process and mesh).
        self._publisher = StatsPublisher.acquire(catalog.store, catalog.keys)
        self.registry = REGISTRY
        self.health = HealthChecks(self.pool, self.registry, health_scope)
        self._refresh_pending = False
        # Health or ejection changed: new pickers without (or with again) that endpoint.
        self._unlisten = self.registry.listen(self._schedule_refresh)
        self._unsubscribe = catalog.subscribe(self._on_snapshot)
        if catalog.snapshot.source != "empty":
            self._on_snapshot(catalog.snapshot)

    def on_change(self, listener: Callable[[OutboundState], None]) -> None:
        """Call `listener(state)` after each swap (the proxy republishes its record)."""
        self._listeners.append(listener)

    def _schedule_refresh(self) -> None:
        if self._refresh_pending:
            return
        self._refresh_pending = True
        asyncio.get_running_loop().call_soon(self._refresh)

    def _refresh(self) -> None:
        self._refresh_pending = False
        if self.state.snapshot.source != "empty":
            self.health.sync(self.state.snapshot)  # take over checks another outbound dropped
            self._on_snapshot(self.state.snapshot, health_only=True)

    def _on_snapshot(self, snapshot: MeshSnapshot, *, health_only: bool = False) -> None:
        started = time.perf_counter()
        table = build_table(snapshot, self.factories)
        kinds: dict[str, MethodKind] = {}
        for endpoints in snapshot.endpoints.values():
            for ep in endpoints:
                kinds.update(ep.methods)
        defaults = {}
        for name, resource in snapshot.resources.get("Service", {}).items():
            spec = resource.spec
            defaults[name] = (getattr(spec, "timeout", None), getattr(spec, "max_stream_age", None))
        self.state = OutboundState(
            snapshot, table, MappingProxyType(kinds), time.time(), MappingProxyType(defaults)
        )
        if not health_only:
            self.pool.sync(ep.address for eps in snapshot.endpoints.values() for ep in eps)
            self.health.sync(snapshot)
            self.registry.retain(
                self, {(e.service, e.address) for eps in snapshot.endpoints.values() for e in eps}
            )
        log.debug(
            "compiled %d chains for revision %d in %.2f ms",
            len(table.chains),
            snapshot.revision,
            (time.perf_counter() - started) * 1000,
        )
        for listener in list(self._listeners):
            try:
                listener(self.state)
            except Exception:
                log.exception("outbound listener %r failed", listener)

    async def close(self, grace: float | None = None) -> None:
        self._unsubscribe()
        self._unlisten()
        await self.health.close()
        self.registry.retain(self, None)
        await self._publisher.release()
        await self.pool.close(grace)
