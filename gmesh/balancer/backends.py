"""Backends: the live table of one mesh's pickers, by `(service, subset)`, built when first needed.

A backend is where a call goes after routing: a subset of a service, or all of its
endpoints (subset None). Its `Backend` entry is immutable — the endpoints that take
traffic now, one picker over them, their states — and is replaced, never changed:

- built the first time an attempt needs a backend of that service (the service becomes
  *active*: `on_activate` connects its endpoints and starts its health checks);
- rebuilt when the service's endpoints or its `Service` spec change, and when one of its
  endpoints changes health or ejection (only that service's entries);
- dropped when the service has been idle long enough (`drop`); the next call builds it
  again.

Services nobody calls have no entry and cost nothing. Consistent-hash tables (ring hash,
Maglev) depend only on the endpoint set: they are kept while it stays the same (a health
flip rebuilds only the cheap picker around the table), and big ones are built on a worker
thread so the event loop never stalls; until a new table is ready, the previous one keeps
serving (the endpoints it lacks wait), and a first one makes calls wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gmesh.balancer import (
    HASHING,
    RING_POINTS,
    HashTable,
    NoEndpoints,
    Picker,
    ZoneAware,
    hash_table,
    make_picker,
    table_order,
)
from gmesh.balancer.outlier import OutlierDetector
from gmesh.balancer.state import EndpointState, EndpointStates

if TYPE_CHECKING:
    from gmesh.config.service import ServiceSpec
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.discovery.endpoint import Endpoint

log = logging.getLogger(__name__)

BackendKey = tuple[str, str | None]

#: A ring with at most this many points is built on the event loop (~1 ms); bigger rings and
#: every Maglev table (65537 slots, ~100 ms in Python) are built on a worker thread.
SYNC_RING_POINTS = 5_000


@dataclass(frozen=True, slots=True)
class Backend:
    """The endpoints of one backend that take traffic, the picker over them, and their states.

    `size`: endpoints the picker spreads over (the usable ones, or all of them in panic
    mode); `total`: endpoints with a weight; `states`: address -> state, every endpoint of
    the backend; `per_endpoint` and `detector`: the limits and passive health of the
    backend's own service (a route may lead to another service). `ready`: set while a
    consistent-hash table this backend needs is still being built (wait, then look again).
    """

    key: BackendKey
    picker: Picker
    size: int
    states: Mapping[str, EndpointState] = field(default_factory=lambda: MappingProxyType({}))
    total: int = 0
    panic: bool = False
    per_endpoint: int | None = None
    detector: OutlierDetector | None = None
    ready: asyncio.Future[None] | None = None

    def describe(self) -> str:
        service, subset = self.key
        return f"service {service!r}" if subset is None else f"subset {subset!r} of service {service!r}"


def subset_endpoints(snapshot: MeshSnapshot, service: str, subset: str | None) -> tuple[Endpoint, ...]:
    """The endpoints of `service` whose labels carry every label of `subset` (all without one)."""
    endpoints = snapshot.endpoints_of(service)
    if subset is None:
        return endpoints
    spec = service_spec(snapshot, service)
    selector = spec.subsets.get(subset) if spec is not None else None
    if selector is None:
        return ()
    return tuple(e for e in endpoints if all(e.labels.get(k) == v for k, v in selector.items()))


def service_spec(snapshot: MeshSnapshot, service: str) -> ServiceSpec | None:
    resource = snapshot.resource("Service", service)
    return resource.spec if resource is not None else None  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One backend's endpoints (weight > 0), their states, zones and hash-table orders, as of
    one endpoint set (`source`, by identity) and one spec (by identity)."""

    source: tuple[Endpoint, ...]
    spec: object
    hashing: str
    endpoints: tuple[Endpoint, ...]
    states: tuple[EndpointState, ...]
    by_address: Mapping[str, EndpointState]
    zones: dict[str, tuple[int, ...]]
    hashed: dict[str, tuple[tuple[Endpoint, ...], tuple[int, ...], TableKey]]


def _none(key: BackendKey) -> Backend:
    return Backend(key, NoEndpoints(), 0)


TableKey = tuple[str, tuple[tuple[str, int], ...]]


class Backends:
    """The live backend table of one mesh. Event loop only; `table` is read per attempt."""

    def __init__(
        self,
        states: EndpointStates,
        snapshot: Callable[[], MeshSnapshot],
        *,
        detectors: dict[str, OutlierDetector] | None = None,
        on_activate: Callable[[str], None] | None = None,
    ) -> None:
        self.states = states
        self._snapshot = snapshot
        self.detectors: dict[str, OutlierDetector] = {} if detectors is None else detectors
        self._on_activate = on_activate
        #: (service, subset) -> its backend; only services in use have entries
        self.table: dict[BackendKey, Backend] = {}
        #: services with backends built (in use), and when each was last built
        self.active: dict[str, float] = {}
        self._tables: dict[TableKey, HashTable] = {}
        self._building: dict[TableKey, asyncio.Future[None]] = {}
        #: per service: the table keys its backends use (others are dropped)
        self._uses: dict[str, set[TableKey]] = {}
        #: per (backend key, zone): the last table that served it and its endpoint order
        self._last: dict[tuple[BackendKey, str], tuple[HashTable, tuple[Endpoint, ...]]] = {}
        self._stale: set[str] = set()
        self._prepared: dict[BackendKey, _Prepared] = {}
        self._kept_for: dict[str, tuple[Endpoint, ...]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._unlisten = states.listen(self._health_changed)
        #: builds done (for tests and the config dump)
        self.builds = 0

    # -- reading (per attempt) -------------------------------------------------------------

    def get(self, key: BackendKey) -> Backend:
        """The backend of `key`, built now when its service is not in use yet."""
        backend = self.table.get(key)
        if backend is not None:
            return backend
        service = key[0]
        if service not in self.active:
            snapshot = self._snapshot()
            if not snapshot.has_service(service):
                return _none(key)  # not cached: keys come from config, but stay safe
            self.build(service)
            if self._on_activate is not None:
                self._on_activate(service)
        return self.table.get(key) or _none(key)

    async def changed(self, timeout: float | None) -> bool:
        """Wait until any backend is rebuilt or dropped (or a connection changes state: see
        `wake`); False when `timeout` passed first."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def wake(self) -> None:
        """Something a waiting pick depends on changed: waiters look again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- building --------------------------------------------------------------------------

    def build(self, service: str) -> None:
        """(Re)build every backend of `service` (the whole service and each subset)."""
        snapshot = self._snapshot()
        spec = service_spec(snapshot, service)
        self._configure_detector(snapshot, service, spec)
        now = time.monotonic()
        uses: set[TableKey] = set()
        subsets: list[str | None] = [None, *(spec.subsets if spec is not None else ())]
        for key in [k for k in self.table if k[0] == service]:
            if key[1] not in subsets:
                del self.table[key]
                self._prepared.pop(key, None)
        for subset in subsets:
            self.table[(service, subset)] = self._build(snapshot, service, subset, spec, now, uses)
        self._uses[service] = uses
        self._collect_tables()
        members = snapshot.endpoints_of(service)
        if self._kept_for.get(service) is not members:  # endpoints left: forget their states
            self.states.keep_only(service, (e.address for e in members))
            self._kept_for[service] = members
        self.active[service] = now
        self.builds += 1
        self.wake()

    def refresh(self, services: Sequence[str] | set[str]) -> None:
        """The endpoints or config of `services` changed: rebuild those in use (the others
        are built when first needed)."""
        snapshot = self._snapshot()
        for service in services:
            if service not in self.active:
                continue
            if snapshot.has_service(service):
                self.build(service)
            else:
                self.drop(service)

    def drop(self, service: str) -> None:
        """`service` is no longer in use (idle, or gone from the mesh): forget its backends."""
        for key in [k for k in self.table if k[0] == service]:
            del self.table[key]
        for last in [k for k in self._last if k[0][0] == service]:
            del self._last[last]
        for prepared in [k for k in self._prepared if k[0] == service]:
            del self._prepared[prepared]
        self._kept_for.pop(service, None)
        self.active.pop(service, None)
        self._uses.pop(service, None)
        self._collect_tables()
        detector = self.detectors.pop(service, None)
        if detector is not None:
            detector.stop()
        self.states.keep_only(service, ())
        self.wake()

    def close(self) -> None:
        self._unlisten()
        for service in list(self.active):
            self.drop(service)
        for future in self._building.values():
            future.cancel()

    def _health_changed(self, service: str) -> None:
        # Many flips in one loop turn (a health sweep, a burst of ejections): one rebuild.
        if service not in self.active or service in self._stale:
            return
        self._stale.add(service)
        try:
            asyncio.get_running_loop().call_soon(self._rebuild_stale)
        except RuntimeError:  # no loop (gmesh explain): rebuild now
            self._rebuild_stale()

    def _rebuild_stale(self) -> None:
        stale, self._stale = self._stale, set()
        for service in stale:
            if service in self.active:
                self.build(service)

    def _configure_detector(self, snapshot: MeshSnapshot, service: str, spec: ServiceSpec | None) -> None:
        outlier = spec.outlier_detection if spec is not None else None
        if outlier is None:
            if service in self.detectors:
                self.detectors.pop(service).stop()
            return
        detector = self.detectors.get(service)
        if detector is None:
            detector = self.detectors[service] = OutlierDetector(service, self.states)
        detector.configure(outlier, tuple(e.address for e in snapshot.endpoints_of(service)))

    def _prepare(
        self, snapshot: MeshSnapshot, service: str, subset: str | None, spec: ServiceSpec | None, hashing: str
    ) -> _Prepared:
        """What a backend's builds share until its endpoints or spec change: a health flip then
        costs one pass over the states (a few ms at 10,000 endpoints), not a rebuild of all this."""
        source = snapshot.endpoints_of(service)
        found = self._prepared.get((service, subset))
        if found is not None and found.source is source and found.spec is spec and found.hashing == hashing:
            return found
        # weight 0 drains an endpoint under every policy
        endpoints = tuple(e for e in subset_endpoints(snapshot, service, subset) if e.weight > 0)
        states = tuple(self.states.get(service, e.address) for e in endpoints)
        by_zone: dict[str, list[int]] = {}
        for i, e in enumerate(endpoints):
            if e.zone:
                by_zone.setdefault(e.zone, []).append(i)
        zones = {z: tuple(ix) for z, ix in by_zone.items()}
        hashed: dict[str, tuple[tuple[Endpoint, ...], tuple[int, ...], TableKey]] = {}
        if hashing:
            zoned = spec is not None and spec.balancer.zone_aware is not None
            position = {e.address: i for i, e in enumerate(endpoints)}
            groups: dict[str, tuple[Endpoint, ...]] = {"": endpoints}
            if zoned:  # a table per zone only when the balancer prefers the caller's zone
                groups.update((z, tuple(endpoints[i] for i in ix)) for z, ix in sorted(zones.items()))
            for zone, members in groups.items():
                ordered = table_order(hashing, members)
                tkey: TableKey = (hashing, tuple((e.address, e.weight) for e in ordered))
                hashed[zone] = (ordered, tuple(position[e.address] for e in ordered), tkey)
        prepared = _Prepared(
            source, spec, hashing, endpoints, states,
            MappingProxyType({e.address: s for e, s in zip(endpoints, states, strict=True)}), zones, hashed,
        )  # fmt: skip
        self._prepared[(service, subset)] = prepared
        return prepared

    def _build(
        self,
        snapshot: MeshSnapshot,
        service: str,
        subset: str | None,
        spec: ServiceSpec | None,
        now: float,
        uses: set[TableKey],
    ) -> Backend:
        key = (service, subset)
        balancer = spec.balancer if spec is not None else None
        policy = balancer.subsets.get(subset, balancer) if balancer is not None and subset else balancer
        name = policy.policy if policy is not None else "weighted_round_robin"
        hash_key = policy.hash_key if policy is not None else None
        prep = self._prepare(snapshot, service, subset, spec, name if name in HASHING else "")
        endpoints, states = prep.endpoints, prep.states
        flags = [s.usable(now) for s in states]
        usable = [e for e, ok in zip(endpoints, flags, strict=True) if ok]
        panic_threshold = spec.panic_threshold if spec is not None else 50.0
        panic = bool(endpoints) and len(usable) * 100 < panic_threshold * len(endpoints)
        if panic:
            log.warning(
                "panic mode for %s: %d of %d endpoints usable (< %g%%); balancing over all of them",
                service if subset is None else f"{service}/{subset}",
                len(usable), len(endpoints), panic_threshold,
            )  # fmt: skip
        ready: list[asyncio.Future[None]] = []

        def picker_over(indexes: Sequence[int] | None, zone: str) -> Picker:
            if name in HASHING:
                # every endpoint is in the table; the usable ones (all of them in panic) take calls
                ordered, order, tkey = prep.hashed[zone]
                table_flags = None if panic else [flags[i] for i in order]
                return self._hashing(key, zone, tkey, ordered, table_flags, hash_key or "", uses, ready)
            chosen = range(len(endpoints)) if indexes is None else indexes
            live = [i for i in chosen if panic or flags[i]]
            return make_picker(name, [endpoints[i] for i in live], [states[i] for i in live], hash_key)

        picker = picker_over(None, "")
        zone_spec = balancer.zone_aware if balancer is not None else None
        if zone_spec is not None and usable:
            # Judged on the endpoints really usable (panic or not): a zone whose endpoints are
            # out sends its callers elsewhere.
            by_zone: dict[str, Picker] = {}
            for z, indexes in sorted(prep.zones.items()):
                local = sum(1 for i in indexes if flags[i])
                if local and local * 100 >= zone_spec.min_healthy_percent * len(indexes):
                    by_zone[z] = picker_over([i for i in indexes if flags[i]], z)
            picker = ZoneAware(by_zone, picker)
        breaker = spec.circuit_breaker if spec is not None else None
        return Backend(
            key, picker, len(endpoints) if panic else len(usable), prep.by_address, len(endpoints),
            panic, breaker.max_requests_per_endpoint if breaker is not None else None,
            self.detectors.get(service), ready[0] if ready else None,
        )  # fmt: skip

    def _hashing(
        self,
        key: BackendKey,
        zone: str,
        tkey: TableKey,
        ordered: tuple[Endpoint, ...],
        flags: list[bool] | None,
        hash_key: str,
        uses: set[TableKey],
        ready: list[asyncio.Future[None]],
    ) -> Picker:
        """A consistent-hash picker: the table of this endpoint set (cached, or built now when
        small), else the last table this backend had while the new one is built."""
        policy = tkey[0]
        table = self._tables.get(tkey)
        if table is None and ordered:
            table = self._table(tkey, policy, ordered, key[0])
        if table is not None:
            uses.add(tkey)
            self._last[(key, zone)] = (table, ordered)
            return make_picker(policy, ordered, (), hash_key, table, flags)
        if not ordered:
            return NoEndpoints()
        building = self._building[tkey]
        last = self._last.get((key, zone))
        if last is None:
            ready.append(building)  # a first table: calls wait for it
            return NoEndpoints()
        # The previous table serves meanwhile; endpoints that left it are out, new ones wait.
        old_table, old_order = last
        now_in = {e.address: f for e, f in zip(ordered, flags or [True] * len(ordered), strict=True)}
        old_flags = [now_in.get(e.address, False) for e in old_order]
        return make_picker(policy, old_order, (), hash_key, old_table, old_flags)

    def _table(
        self, tkey: TableKey, policy: str, ordered: tuple[Endpoint, ...], service: str
    ) -> HashTable | None:
        """The table now when it is cheap (or no loop runs), else None and a build on a thread."""
        points = min(RING_POINTS, 100 * sum(max(e.weight, 1) for e in ordered))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or (policy == "ring_hash" and points <= SYNC_RING_POINTS):
            table = self._tables[tkey] = hash_table(policy, ordered)
            return table
        if tkey not in self._building:
            done: asyncio.Future[None] = loop.create_future()
            self._building[tkey] = done

            def finished(future: asyncio.Future[HashTable]) -> None:
                self._building.pop(tkey, None)
                if done.done():  # closed meanwhile
                    return
                if future.cancelled():
                    done.cancel()
                    return
                error = future.exception()
                if error is not None:
                    log.error("building the %s table of %s failed: %s", policy, service, error)
                    done.set_exception(error)
                    return
                self._tables[tkey] = future.result()
                done.set_result(None)
                if service in self.active:
                    self.build(service)  # picks the new table up (or drops it when stale)
                else:
                    self._collect_tables()

            def submit() -> None:
                # After this loop turn's own work: a thread started meanwhile would compete for
                # the GIL and stretch that work.
                if not done.done():
                    loop.run_in_executor(None, hash_table, policy, ordered).add_done_callback(finished)

            loop.call_soon(submit)
            done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved here
        return None

    def _collect_tables(self) -> None:
        used: set[TableKey] = set().union(*self._uses.values()) if self._uses else set()
        kept = {id(t) for t, _ in self._last.values()}
        for tkey in [k for k, t in self._tables.items() if k not in used and id(t) not in kept]:
            del self._tables[tkey]

    def describe(self) -> dict[str, Any]:
        return {
            "active": sorted(self.active),
            "backends": len(self.table),
            "hashTables": len(self._tables),
            "building": len(self._building),
        }


async def wait_ready(backend: Backend, timeout: float | None) -> bool:
    """Wait for the consistent-hash table `backend` needs; False when `timeout` passed first."""
    if backend.ready is None:
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.shield(backend.ready)
            return True
    return False
