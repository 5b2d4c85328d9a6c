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
from collections.abc import Callable, Iterable, Mapping
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
FILE_AFTER = 0.3


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    """What the mesh looks like at one etcd revision. Immutable; share it freely.

    `endpoints`: service -> its endpoints, sorted by address.
    `resources`: kind -> name -> validated resource.
    `grpc_services`: gRPC service name (`orders.v1.Orders`) -> mesh services registering it.
    `routes`: mesh service -> the `Route` resource that routes its calls.
    `source`: "etcd", "file" (loaded from the persisted copy) or "empty".

    A new snapshot reuses every part the change did not touch (the same tuple of endpoints,
    the same resource objects), so `old.endpoints_of(s) is new.endpoints_of(s)` tells in
    O(1) whether a service's endpoints changed: consumers diff only what they use.
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
        self._endpoints: dict[str, dict[str, Endpoint]] = {}
        self._resources: dict[str, dict[str, Resource]] = {}
        self._invalid: dict[str, str] = {}
        #: per mesh service, the gRPC services its endpoints serve; and the reverse index
        self._grpc_of: dict[str, frozenset[str]] = {}
        self._grpc_index: dict[str, set[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._persist_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._dirty = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, *, wait: float = 5.0, file_after: float = FILE_AFTER) -> None:
        """Start following etcd, and return once there is a snapshot to serve, or after `wait`.

        With a persisted snapshot on disk, etcd gets `file_after` seconds to answer first;
        then the file is served (source "file") while the watch keeps trying in the
        background, and etcd's own snapshot replaces it when it answers.
        """
        self._task = asyncio.create_task(self._follow(), name="gmesh-catalog")
        has_file = self.persist_path is not None and self.persist_path.exists()
        try:
            await self.wait_for(
                lambda s: s.source == "etcd", timeout=min(wait, file_after) if has_file else wait
            )
        except TimeoutError:
            revision = self._load_persisted() if self.snapshot.source == "empty" else None
            if revision is not None:
                await self._publish(revision, touched=None, source="file")
                log.warning(
                    "etcd not answering (%s); serving the snapshot persisted at %s (revision %d) "
                    "until it does",
                    self.last_error or "no answer yet",
                    self.persist_path,
                    self.snapshot.revision,
                )
            elif has_file and wait > file_after:
                with contextlib.suppress(TimeoutError):
                    await self.wait_for(lambda s: s.source == "etcd", timeout=wait - file_after)

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
            try:
                ep = Endpoint.from_json(parsed.group, kv.value, lease=kv.lease, revision=kv.mod_revision)
            except (ValueError, TypeError) as exc:
                self._reject(kv.key, str(exc))
                self._endpoints.get(parsed.group, {}).pop(parsed.name, None)
                return
            self._endpoints.setdefault(parsed.group, {})[parsed.name] = ep
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

    async def _publish(self, revision: int, *, touched: set[str] | None, source: str = "etcd") -> None:
        old = self.snapshot
        endpoints: dict[str, tuple[Endpoint, ...]]
        resources: dict[str, Mapping[str, Resource]]
        full = touched is None or old.source != source
        if full:
            endpoints = {s: _sorted(eps) for s, eps in self._endpoints.items() if eps}
            resources = {k: MappingProxyType(dict(v)) for k, v in self._resources.items() if v}
            self._grpc_of = {}
            self._grpc_index = {}
            touched_services: set[str] = set(endpoints)
        else:
            assert touched is not None
            endpoints = dict(old.endpoints)
            resources = dict(old.resources)
            touched_services = set()
            for what_group in touched:
                what, _, group = what_group.partition(":")
                if what == "endpoint":
                    touched_services.add(group)
                    members = self._endpoints.get(group)
                    if members:
                        endpoints[group] = _sorted(members)
                    else:
                        endpoints.pop(group, None)
                elif what == "config":
                    res = self._resources.get(group)
                    if res:
                        resources[group] = MappingProxyType(dict(res))
                    else:
                        resources.pop(group, None)
        # gRPC service -> mesh services, kept up to date for the services touched only
        grpc_changed = full
        for service in touched_services:
            names = frozenset(g for ep in endpoints.get(service, ()) for g in ep.grpc_services)
            before = self._grpc_of.get(service, frozenset())
            if names == before:
                continue
            grpc_changed = True
            for name in before - names:
                owners = self._grpc_index.get(name)
                if owners is not None:
                    owners.discard(service)
                    if not owners:
                        del self._grpc_index[name]
            for name in names - before:
                self._grpc_index.setdefault(name, set()).add(service)
            if names:
                self._grpc_of[service] = names
            else:
                self._grpc_of.pop(service, None)
        grpc_services = (
            MappingProxyType({k: tuple(sorted(v)) for k, v in self._grpc_index.items()})
            if grpc_changed
            else old.grpc_services
        )
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
            endpoints=MappingProxyType(endpoints),
            resources=MappingProxyType(resources),
            grpc_services=grpc_services,
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


def _sorted(eps: dict[str, Endpoint]) -> tuple[Endpoint, ...]:
    return tuple(sorted(eps.values(), key=lambda e: e.address))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
