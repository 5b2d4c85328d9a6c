"""The catalog: one etcd watch feeding an immutable `MeshSnapshot` (endpoints + config + revision).

Everything that serves traffic reads the current snapshot and subscribes to changes; a
change builds a new snapshot and swaps one reference, so readers never lock and never see
half an update. While etcd is unreachable the last snapshot stays in force (static
stability) and the watch catches up by itself when etcd is back. With `persist_path`,
the snapshot is also kept on disk so a process restarted without etcd still has it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gmesh.config.kinds import ConfigView, KindRegistry, Resource
from gmesh.config.validate import parse_stored
from gmesh.discovery.endpoint import Endpoint
from gmesh.discovery.keys import MeshKeys
from gmesh.store.etcd import EventType, KeyValue, Resync, Store, WatchBatch, WatchLost

log = logging.getLogger(__name__)

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

#: With a persisted snapshot on disk, how long a starting catalog lets etcd answer before it
#: serves the file (a restart while etcd is down must serve within a second).
FILE_AFTER = 0.1


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    """What the mesh looks like at one etcd revision. Immutable; share it freely.

    `endpoints`: service -> its endpoints, sorted by address.
    `resources`: kind -> name -> validated resource.
    `grpc_services`: gRPC service name (`orders.v1.Orders`) -> mesh services registering it.
    `routes`: mesh service -> the `Route` resource that routes its calls.
    `source`: "etcd", "file" (loaded from the persisted copy) or "empty".

    A new snapshot reuses every part the change did not touch (the same endpoint records,
    the same resource objects), so `same_endpoints(old, new, s)` tells in O(1) whether a
    service's endpoints changed: consumers diff only what they use. Endpoint records are
    parsed per service when first read, the gRPC index when first read.
    """

    revision: int = 0
    endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=lambda: _EMPTY_MAP)
    resources: Mapping[str, Mapping[str, Resource]] = field(default_factory=lambda: _EMPTY_MAP)
    grpc_services: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY_MAP)
    source: str = "empty"
    routes: Mapping[str, Resource] = field(default_factory=lambda: _EMPTY_MAP)

    def endpoints_of(self, service: str) -> tuple[Endpoint, ...]:
        return self.endpoints.get(service, ())

    def has_service(self, service: str) -> bool:
        """Whether `service` exists: it has endpoints or a `Service` resource."""
        return service in self.endpoints or service in self.resources.get("Service", _EMPTY_MAP)

    def resource(self, kind: str, name: str) -> Resource | None:
        return self.resources.get(kind, _EMPTY_MAP).get(name)

    def services(self) -> list[str]:
        """Every service with endpoints or a `Service` resource."""
        return sorted(set(self.endpoints) | set(self.resources.get("Service", _EMPTY_MAP)))

    def config_view(self) -> ConfigView:
        return ConfigView(self.resources)


def same_endpoints(old: MeshSnapshot, new: MeshSnapshot, service: str) -> bool:
    """Whether `service`'s endpoints are the very same in both snapshots (O(1), nothing parsed)."""
    a, b = old.endpoints, new.endpoints
    if isinstance(a, EndpointTable) and isinstance(b, EndpointTable):
        return a.members(service) is b.members(service)
    return a.get(service) is b.get(service)


class _Members:
    """One service's endpoint records at one revision, parsed the first time anyone reads them:
    a process pays for the services it uses, not for the whole mesh."""

    __slots__ = ("_endpoints", "_grpc", "_parse", "kvs", "service")

    def __init__(
        self,
        service: str,
        kvs: tuple[KeyValue, ...],
        parse: Callable[[str, tuple[KeyValue, ...]], tuple[Endpoint, ...]],
    ) -> None:
        self.service = service
        self.kvs = kvs
        self._parse = parse
        self._endpoints: tuple[Endpoint, ...] | None = None
        self._grpc: frozenset[str] | None = None

    def endpoints(self) -> tuple[Endpoint, ...]:
        if self._endpoints is None:
            self._endpoints = self._parse(self.service, self.kvs)
        return self._endpoints

    def grpc_services(self) -> frozenset[str]:
        if self._grpc is None:
            self._grpc = frozenset(g for ep in self.endpoints() for g in ep.grpc_services)
        return self._grpc


class EndpointTable(Mapping[str, tuple[Endpoint, ...]]):
    """service -> its endpoints (sorted by address), parsed per service on first read."""

    __slots__ = ("_members",)

    def __init__(self, members: Mapping[str, _Members]) -> None:
        self._members = members

    def __getitem__(self, service: str) -> tuple[Endpoint, ...]:
        return self._members[service].endpoints()

    def __contains__(self, service: object) -> bool:
        return service in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def members(self, service: str) -> _Members | None:
        return self._members.get(service)


class GrpcIndex(Mapping[str, tuple[str, ...]]):
    """gRPC service name -> the mesh services registering it, built on first read (the proxy
    reads it; channels never do, and never pay for parsing every endpoint of the mesh)."""

    __slots__ = ("_index", "_table")

    def __init__(self, table: EndpointTable) -> None:
        self._table = table
        self._index: dict[str, tuple[str, ...]] | None = None

    def _built(self) -> dict[str, tuple[str, ...]]:
        if self._index is None:
            found: dict[str, list[str]] = {}
            for service in self._table:
                members = self._table.members(service)
                assert members is not None
                for name in members.grpc_services():
                    found.setdefault(name, []).append(service)
            self._index = {k: tuple(sorted(v)) for k, v in found.items()}
        return self._index

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._built()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


Subscriber = Callable[[MeshSnapshot], None]


class Catalog:
    """Follows one mesh prefix in etcd and publishes snapshots. Use `async with` or start()/close()."""

    def __init__(
        self,
        store: Store,
        keys: MeshKeys,
        kinds: KindRegistry,
        *,
        persist_path: Path | None = None,
    ) -> None:
        self.store, self.keys, self.kinds = store, keys, kinds
        self.persist_path = persist_path
        self.snapshot = MeshSnapshot()
        #: False while the watch is down; `last_error` says why
        self.connected = False
        self.last_error = ""
        self.disconnected_since: float | None = None
        self._subscribers: list[Subscriber] = []
        self._kvs: dict[str, KeyValue] = {}
        #: raw endpoint records by service and endpoint id; parsed lazily (`_Members`)
        self._endpoints: dict[str, dict[str, KeyValue]] = {}
        #: the current per-service members, reused by snapshots until a change touches them
        self._members: dict[str, _Members] = {}
        #: etcd key -> its record parsed (reused while its mod revision stays)
        self._parsed: dict[str, Endpoint] = {}
        self._resources: dict[str, dict[str, Resource]] = {}
        self._invalid: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._persist_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._dirty = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, *, wait: float = 5.0, file_after: float = FILE_AFTER) -> None:
        """Start following etcd, and return once there is a snapshot to serve, or after `wait`.

        With a persisted snapshot on disk, etcd gets `file_after` seconds to answer first (less
        when the connection to it fails at once); then the file is served (source "file")
        while the watch keeps trying in the background, and etcd's own snapshot replaces it
        when it answers.
        """
        self._task = asyncio.create_task(self._follow(), name="gmesh-catalog")
        has_file = self.persist_path is not None and self.persist_path.exists()
        if has_file:
            from_etcd = asyncio.ensure_future(self.wait_for(lambda s: s.source == "etcd", timeout=wait))
            refused = asyncio.ensure_future(self.store.unreachable())
            await asyncio.wait((from_etcd, refused), timeout=file_after, return_when=asyncio.FIRST_COMPLETED)
            refused.cancel()
            if not from_etcd.done():
                from_etcd.cancel()
            with contextlib.suppress(BaseException):
                await from_etcd
            with contextlib.suppress(BaseException):
                await refused
        else:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(lambda s: s.source == "etcd", timeout=wait)
        if self.snapshot.source == "empty":
            revision = self._load_persisted()
            if revision is not None:
                await self._publish(revision, touched=None, source="file")
                log.warning(
                    "etcd not answering (%s); serving the snapshot persisted at %s (revision %d) "
                    "until it does",
                    self.last_error or "no answer yet",
                    self.persist_path,
                    self.snapshot.revision,
                )

    async def close(self) -> None:
        for task in (self._task, self._persist_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._persist_task = None
        if self._dirty:
            await self._persist_now()  # what was pending must not be lost on shutdown

    async def __aenter__(self) -> Catalog:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading -----------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber(snapshot)` after every change (on the event loop; keep it quick)."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    async def wait_for(self, predicate: Callable[[MeshSnapshot], bool], *, timeout: float) -> MeshSnapshot:
        """The first snapshot (current or coming) for which `predicate` holds; TimeoutError after `timeout`.

        The predicate is also re-checked when the connection to etcd is lost.
        """
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.snapshot))
            return self.snapshot

    @property
    def invalid(self) -> Mapping[str, str]:
        """Keys whose stored value does not validate (kept out of snapshots), with the reason."""
        return MappingProxyType(self._invalid)

    # -- following etcd ----------------------------------------------------------------

    async def _follow(self) -> None:
        start, end = self.keys.catalog_range
        watch = self.store.watch(start, end)
        try:
            async for item in watch:
                if isinstance(item, WatchLost):
                    self.connected = False
                    self.last_error = item.error
                    self.disconnected_since = self.disconnected_since or time.monotonic()
                    log.warning(
                        "catalog lost etcd (%s); keeping snapshot at revision %d",
                        item.error,
                        self.snapshot.revision,
                    )
                    async with self._changed:  # waiters may watch `connected` too
                        self._changed.notify_all()
                    continue
                if not self.connected and self.disconnected_since is not None:
                    log.info(
                        "catalog reconnected to etcd after %.1fs", time.monotonic() - self.disconnected_since
                    )
                self.connected, self.last_error, self.disconnected_since = True, "", None
                if isinstance(item, Resync):
                    self._replace(item.kvs)
                    await self._publish(item.revision, touched=None)
                elif isinstance(item, WatchBatch):
                    touched = self._apply(item)
                    await self._publish(item.revision, touched=touched)
        finally:
            await watch.aclose()

    def _replace(self, kvs: Iterable[KeyValue]) -> None:
        self._kvs = {kv.key: kv for kv in kvs}
        self._endpoints, self._resources, self._invalid = {}, {}, {}
        self._parsed = {}
        for kv in self._kvs.values():
            self._index(kv)

    def _apply(self, batch: WatchBatch) -> set[str]:
        touched: set[str] = set()
        for event in batch.events:
            kv = event.kv
            parsed = self.keys.parse(kv.key)
            if parsed is not None:
                touched.add(f"{parsed.what}:{parsed.group}")
            if event.type is EventType.DELETE:
                self._kvs.pop(kv.key, None)
                self._unindex(kv.key)
            else:
                self._kvs[kv.key] = kv
                self._index(kv)
        return touched

    def _index(self, kv: KeyValue) -> None:
        parsed = self.keys.parse(kv.key)
        if parsed is None:
            return
        if parsed.what == "endpoint":
            # kept raw: parsed when a snapshot's reader first asks for this service
            self._endpoints.setdefault(parsed.group, {})[parsed.name] = kv
            return
        elif parsed.what == "config":
            try:
                resource = parse_stored(kv.value, self.kinds, key=kv.key, revision=kv.mod_revision)
            except ValueError as exc:
                # Keep the last valid version in force; say why the new one is ignored.
                self._reject(kv.key, str(exc))
                return
            self._resources.setdefault(parsed.group, {})[parsed.name] = resource
        self._invalid.pop(kv.key, None)

    def _unindex(self, key: str) -> None:
        parsed = self.keys.parse(key)
        self._invalid.pop(key, None)
        self._parsed.pop(key, None)
        if parsed is None:
            return
        table: Mapping[str, dict[str, Any]] = (
            self._endpoints if parsed.what == "endpoint" else self._resources
        )
        group = table.get(parsed.group)
        if group is not None:
            group.pop(parsed.name, None)
            if not group:
                del table[parsed.group]  # type: ignore[attr-defined]

    def _reject(self, key: str, reason: str) -> None:
        if self._invalid.get(key) != reason:
            log.error("ignoring %s: %s", key, reason)
        self._invalid[key] = reason

    def _parse_members(self, service: str, kvs: tuple[KeyValue, ...]) -> tuple[Endpoint, ...]:
        """Parse `service`'s endpoint records (once each: reused while unchanged); a malformed one
        is left out and reported."""
        found: list[Endpoint] = []
        like: Endpoint | None = None
        for kv in kvs:
            ep = self._parsed.get(kv.key)
            if ep is None or ep.revision != kv.mod_revision:
                try:
                    ep = Endpoint.from_json(
                        service, kv.value, lease=kv.lease, revision=kv.mod_revision, like=like
                    )
                except (ValueError, TypeError) as exc:
                    self._reject(kv.key, str(exc))
                    continue
                if self._kvs.get(kv.key) is kv:  # still current: keep the parse for later snapshots
                    self._parsed[kv.key] = ep
                    self._invalid.pop(kv.key, None)
            found.append(ep)
            like = ep
        return tuple(sorted(found, key=lambda e: e.address))

    async def _publish(self, revision: int, *, touched: set[str] | None, source: str = "etcd") -> None:
        old = self.snapshot
        resources: dict[str, Mapping[str, Resource]]
        full = touched is None or old.source != source
        if full:
            self._members = {
                s: _Members(s, tuple(kvs.values()), self._parse_members)
                for s, kvs in self._endpoints.items()
                if kvs
            }
            resources = {k: MappingProxyType(dict(v)) for k, v in self._resources.items() if v}
        else:
            assert touched is not None
            self._members = dict(self._members)
            resources = dict(old.resources)
            for what_group in touched:
                what, _, group = what_group.partition(":")
                if what == "endpoint":
                    records = self._endpoints.get(group)
                    if records:
                        self._members[group] = _Members(group, tuple(records.values()), self._parse_members)
                    else:
                        self._members.pop(group, None)
                elif what == "config":
                    res = self._resources.get(group)
                    if res:
                        resources[group] = MappingProxyType(dict(res))
                    else:
                        resources.pop(group, None)
        endpoints = EndpointTable(self._members)
        routes = old.routes
        if full or resources.get("Route") is not old.resources.get("Route"):
            routes = MappingProxyType(
                {
                    getattr(r.spec, "service", ""): r
                    for r in sorted(resources.get("Route", _EMPTY_MAP).values(), key=lambda r: r.name)
                }
            )
        self.snapshot = MeshSnapshot(
            revision=revision,
            endpoints=endpoints,
            resources=MappingProxyType(resources),
            grpc_services=GrpcIndex(endpoints),
            source=source,
            routes=routes,
        )
        for subscriber in list(self._subscribers):
            try:
                subscriber(self.snapshot)
            except Exception:
                log.exception("catalog subscriber %r failed", subscriber)
        async with self._changed:
            self._changed.notify_all()
        if self.persist_path is not None and source == "etcd":
            self._schedule_persist()

    # -- persistence -------------------------------------------------------------------

    def _schedule_persist(self) -> None:
        self._dirty = True
        if self._persist_task is None or self._persist_task.done():
            self._persist_task = asyncio.create_task(self._persist_soon())

    async def _persist_soon(self) -> None:
        await asyncio.sleep(0.2)  # coalesce bursts of changes into one write
        await self._persist_now()

    async def _persist_now(self) -> None:
        assert self.persist_path is not None
        self._dirty = False
        data = {
            "prefix": self.keys.prefix,
            "revision": self.snapshot.revision,
            "savedAt": time.time(),
            "kvs": [
                {
                    "key": kv.key,
                    "value": base64.b64encode(kv.value).decode(),
                    "mod": kv.mod_revision,
                    "create": kv.create_revision,
                    "version": kv.version,
                    "lease": kv.lease,
                }
                for kv in self._kvs.values()
            ],
        }
        try:
            await asyncio.to_thread(_write_atomically, self.persist_path, json.dumps(data).encode())
        except OSError as exc:
            log.warning("could not persist the snapshot to %s: %s", self.persist_path, exc)

    def _load_persisted(self) -> int | None:
        """Load the persisted key-values; their revision, or None if there is nothing usable."""
        if self.persist_path is None:
            return None
        try:
            data = json.loads(self.persist_path.read_bytes())
            if data.get("prefix") != self.keys.prefix:
                log.warning(
                    "%s holds prefix %s, not %s; ignoring it",
                    self.persist_path,
                    data.get("prefix"),
                    self.keys.prefix,
                )
                return None
            kvs = [
                KeyValue(
                    d["key"], base64.b64decode(d["value"]), d["create"], d["mod"], d["version"], d["lease"]
                )
                for d in data["kvs"]
            ]
            revision = int(data["revision"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not read the persisted snapshot %s: %s", self.persist_path, exc)
            return None
        self._replace(kvs)
        return revision


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
