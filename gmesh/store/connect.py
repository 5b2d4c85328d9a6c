"""Which etcd a gmesh process talks to: `--etcd`, else `GMESH_ETCD`, else the embedded one."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from gmesh.store.embedded import EmbeddedEtcd
from gmesh.store.etcd import EtcdConfig, Store

ETCD_ENV = "GMESH_ETCD"


async def resolve_etcd(etcd: str | None = None, *, start_embedded: bool = True, **options: Any) -> EtcdConfig:
    """The etcd to use. With no URLs given anywhere, the embedded etcd (started if absent)."""
    urls = etcd or os.environ.get(ETCD_ENV)
    if not urls:
        embedded = EmbeddedEtcd()
        state = embedded.status()
        if state is None and start_embedded:
            state, _ = await asyncio.to_thread(embedded.start)
        if state is None:
            from gmesh.errors import StoreUnavailable

            raise StoreUnavailable("no --etcd given and the embedded etcd is not running (gmesh etcd start)")
        urls = state.client_url
    return EtcdConfig.parse(urls, **options)


async def open_store(etcd: str | EtcdConfig | None = None, **options: Any) -> Store:
    """Connect to the resolved etcd (see `resolve_etcd`). The caller closes the store."""
    config = etcd if isinstance(etcd, EtcdConfig) else await resolve_etcd(etcd, **options)
    return await Store.connect(config)
