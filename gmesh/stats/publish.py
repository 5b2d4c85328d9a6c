"""Publishing a mesh's per-backend counters to etcd, once a second while they change (leased)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

from gmesh.stats.backend import PROCESS, StatsRegistry

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import LeaseKeeper, Store

log = logging.getLogger(__name__)


class StatsPublisher:
    """Writes one mesh's counters to etcd once a second while they change, under a lease of
    its own (they vanish when the process does). One per outbound stack."""

    INTERVAL = 1.0
    TTL = 15

    def __init__(self, store: Store, keys: MeshKeys, registry: StatsRegistry) -> None:
        self.store, self.keys, self.registry = store, keys, registry
        self._task: asyncio.Task[None] | None = None
        self._lease = 0
        self._keeper: LeaseKeeper | None = None
        self._published: dict[str, str] = {}

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

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL)
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down: counters keep counting; publish later
                log.debug("publishing stats failed: %s", exc)

    async def publish(self) -> None:
        for service, backends in self.registry.by_service().items():
            body = json.dumps({"process": PROCESS, "at": time.time(), "backends": backends}, sort_keys=True)
            unchanged = body.partition('"backends"')[2]
            if self._published.get(service) == unchanged:
                continue
            if not self._lease:
                self._lease = await self.store.grant_lease(self.TTL)
                if self._keeper is not None:
                    await self._keeper.stop()
                self._keeper = self.store.keep_alive(self._lease, self.TTL, self._lost)
            await self.store.put(self.keys.stats(service, PROCESS), body.encode(), lease=self._lease)
            self._published[service] = unchanged
