"""A key that lives as long as its owner: written under a lease kept alive in the background.

The base of endpoint registrations and proxy records. If etcd forgets the lease (the owner
was cut off longer than the TTL), a new lease is granted and the key written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gmesh.errors import StoreUnavailable
from gmesh.store.etcd import LeaseKeeper, Store

log = logging.getLogger(__name__)


class LeasedKey:
    """One key under one lease. `put` publishes (or updates), `withdraw` hides it but keeps the
    lease, `close` revokes the lease (watchers see the key deleted at once)."""

    def __init__(self, store: Store, key: str, ttl: int) -> None:
        self.store, self.key, self.ttl = store, key, ttl
        self.lease = 0
        self.value: bytes | None = None
        self.published = False
        self._keeper: LeaseKeeper | None = None
        self._lock = asyncio.Lock()
        self._renewal: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self) -> None:
        await self._grant()

    async def _grant(self) -> None:
        self.lease = await self.store.grant_lease(self.ttl)
        self._keeper = self.store.keep_alive(self.lease, self.ttl, self._lost)

    def _lost(self) -> None:
        if not self._closed:
            self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        async with self._lock:
            while not self._closed:
                try:
                    await self._grant()
                    if self.published and self.value is not None:
                        await self.store.put(self.key, self.value, lease=self.lease)
                    log.info("%s written again under a new lease", self.key)
                    return
                except StoreUnavailable as exc:
                    log.warning("renewing %s failed (%s); retrying", self.key, exc)
                    await asyncio.sleep(1.0)

    async def put(self, value: bytes) -> None:
        async with self._lock:
            await self.store.put(self.key, value, lease=self.lease)
            self.value, self.published = value, True

    async def withdraw(self) -> None:
        async with self._lock:
            if self.published:
                await self.store.delete(self.key)
                self.published = False

    async def close(self) -> None:
        """Revoke the lease now (idempotent); if etcd is unreachable the key expires after the TTL."""
        if self._closed:
            return
        self._closed = True
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewal
        if self._keeper is not None:
            await self._keeper.stop()
        if self.lease:
            try:
                await self.store.revoke_lease(self.lease, timeout=2.0)
            except StoreUnavailable as exc:
                log.warning("could not withdraw %s now (%s); it expires within %ss", self.key, exc, self.ttl)
        self.published = False
