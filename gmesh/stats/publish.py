"""Publishing a mesh's counters to etcd: every service this process called, in one etcd write per
interval (leased: they vanish with the process).

Per service, one key per process (`stats/<service>/<process>`) holding the per-backend attempt
counters canary rollouts compare (`backends`), the golden signals `gmesh stat`, `gmesh top` and
the dashboard read (`calls`: codes and duration buckets per caller, door, route rule, backend
and method) and what this process knows of the service's endpoints (`endpoints`: in flight,
EWMA latency, attempts, failures, health, ejection, connection down). The services whose
documents changed since the last publish go out together in one transaction — one write (one
etcd revision) per process per second while traffic flows, none while idle; above 128 changed
services or 1 MiB (etcd's default `--max-txn-ops` and `--max-request-bytes`) in several
transactions. The process itself (`processes/<process>`: proxy or channel, the revision it
serves, since when) goes in the same transaction when that changed — so a process that calls
nothing still writes once after each config or endpoint change it sees (at most once a second),
as a proxy's own record does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gmesh.errors import StoreUnavailable
from gmesh.stats.backend import PROCESS, StatsRegistry
from gmesh.store.etcd import Put

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.stats.metrics import MeshMetrics
    from gmesh.store.etcd import LeaseKeeper, Store

log = logging.getLogger(__name__)

#: Endpoints per service a process publishes its view of (each ~150 bytes of JSON).
ENDPOINT_VIEWS = 1000
#: Puts per transaction (etcd's default --max-txn-ops).
MAX_TXN_OPS = 128
#: Bytes per transaction (etcd's default --max-request-bytes is 1.5 MiB).
MAX_TXN_BYTES = 1 << 20


def _chunks(items: list[tuple[str, tuple[str, str]]]) -> list[list[tuple[str, tuple[str, str]]]]:
    """`items` in transactions of at most MAX_TXN_OPS puts and about MAX_TXN_BYTES."""
    chunks: list[list[tuple[str, tuple[str, str]]]] = [[]]
    size = 0
    for item in items:
        length = len(item[1][1])
        if chunks[-1] and (len(chunks[-1]) >= MAX_TXN_OPS or size + length > MAX_TXN_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += length
    return chunks


class StatsPublisher:
    """Writes one mesh's counters to etcd once a second while they change, under a lease of
    its own. One per outbound stack."""

    INTERVAL = 1.0
    TTL = 15

    def __init__(
        self,
        store: Store,
        keys: MeshKeys,
        registry: StatsRegistry,
        metrics: MeshMetrics | None = None,
        *,
        endpoints: Callable[[], dict[str, list[dict[str, Any]]]] | None = None,
        process: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store, self.keys, self.registry, self.metrics = store, keys, registry, metrics
        #: service -> this process's view of its endpoints; this process's record
        self._endpoints, self._process = endpoints, process
        self._process_published = ""
        self._task: asyncio.Task[None] | None = None
        self._lease = 0
        self._keeper: LeaseKeeper | None = None
        self._published: dict[str, str] = {}
        #: service -> when etcd last held exactly this process's counters (published, or unchanged since)
        self._synced: dict[str, float] = {}
        #: services ever published (their first document says so); the last tick that published
        #: everything it had (or found nothing new), at first when counting began
        self._ever: set[str] = set()
        self._clean_tick = time.time()
        #: etcd writes (transactions) made, for tests and the bench
        self.writes = 0
        self._warned = -1e9

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gmesh-stats")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._keeper is not None:
            await self._keeper.stop()
        if self._lease:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self._lease, timeout=1.0)

    def _lost(self) -> None:
        self._lease = 0
        self._published.clear()
        self._synced.clear()
        self._process_published = ""

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL)
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:  # etcd down: counters keep counting; publish later
                log.debug("publishing stats failed: %s", exc)
            except Exception as exc:  # refused (too big?): say so, once a minute at most
                now = time.monotonic()
                if now - self._warned >= 60:
                    self._warned = now
                    log.warning("publishing stats failed: %s", exc)

    def documents(self) -> dict[str, dict[str, Any]]:
        """service -> what this process publishes for it now."""
        docs: dict[str, dict[str, Any]] = {}
        for service, backends in self.registry.by_service().items():
            docs[service] = {"backends": backends}
        if self.metrics is not None:
            for service, rows in self.metrics.published().items():
                docs.setdefault(service, {})["calls"] = rows
        if self._endpoints is not None:
            for service, states in self._endpoints().items():
                if service in docs:  # only services this process counted calls to
                    docs[service]["endpoints"] = states
        return docs

    async def publish(self) -> None:
        now = time.time()
        changed: dict[str, tuple[str, str]] = {}
        for service, doc in self.documents().items():
            unchanged = json.dumps(doc, sort_keys=True)
            if self._published.get(service) == unchanged:
                self._synced[service] = now
                continue
            # `since`: when etcd last held exactly what this process had counted (its last publish,
            # or a later tick with nothing new): every call in this document came after it. The
            # first document of a service (`first`): its counters were zero at the last tick that
            # went through (it had nothing to publish then), or when this publisher started
            first = service not in self._ever
            since = self._synced.get(service)
            if first:
                since = self._clean_tick
            extra: dict[str, Any] = {"at": now}
            if since is not None:
                extra["since"] = since
            if first:
                extra["first"] = True
            body = json.dumps({"process": PROCESS, **extra, **doc}, sort_keys=True)
            changed[service] = (unchanged, body)
        record = ""
        if self._process is not None:
            record = json.dumps({"process": PROCESS, **self._process()}, sort_keys=True)
            if record == self._process_published:
                record = ""
        if not changed and not record:
            self._clean_tick = now
            return
        if not self._lease:
            self._lease = await self.store.grant_lease(self.TTL)
            if self._keeper is not None:
                await self._keeper.stop()
            self._keeper = self.store.keep_alive(self._lease, self.TTL, self._lost)
        chunks = _chunks(list(changed.items()))
        if record and len(chunks[-1]) >= MAX_TXN_OPS:
            chunks.append([])  # the process record needs a put of its own
        for n, chunk in enumerate(chunks):
            ops = [Put(self.keys.stats(s, PROCESS), body.encode(), self._lease) for s, (_, body) in chunk]
            if record and n == len(chunks) - 1:
                ops.append(Put(self.keys.process(PROCESS), record.encode(), self._lease))
            await self.store.txn((), ops)
            self.writes += 1
            for service, (unchanged, _) in chunk:
                self._published[service] = unchanged
                self._synced[service] = now
                self._ever.add(service)
        if record:
            self._process_published = record
        self._clean_tick = now
