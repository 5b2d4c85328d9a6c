"""Starting the outbound stack of a `gmesh:///` channel: plugins, and one catalog (one etcd
watch) shared by every channel of a process and event loop, per etcd and mesh prefix.

Start-up code, apart from the per-call modules: this is where plugins are loaded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gmesh.channel.endpoint import EndpointPool
from gmesh.channel.outbound import Outbound
from gmesh.discovery.catalog import Catalog
from gmesh.discovery.keys import MeshKeys
from gmesh.pluginmanager import Plugins
from gmesh.store.etcd import EtcdConfig, Store


@dataclass
class Shared:
    store: Store
    catalog: Catalog
    plugins: Plugins
    users: int = 0
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


_SHARED: dict[tuple[int, str, str], Shared] = {}


async def acquire(
    etcd: EtcdConfig, keys: MeshKeys, pool: EndpointPool, service: str | None = None
) -> tuple[Shared, Outbound]:
    """The shared catalog for (loop, etcd, prefix), started if new, and an outbound stack on it."""
    key = (id(asyncio.get_running_loop()), etcd.describe(), keys.prefix)
    shared = _SHARED.get(key)
    if shared is None:
        plugins = Plugins.load()
        store = await Store.connect(etcd)
        shared = Shared(store, Catalog(store, keys, plugins.config_kinds()), plugins)
        _SHARED[key] = shared
        try:
            await shared.catalog.start()
        finally:
            shared.ready.set_result(None)
    else:
        await shared.ready
    shared.users += 1
    # A channel health-checks only the service it calls (and where its Route sends calls).
    return shared, Outbound(
        shared.catalog, shared.plugins.filter_factories(), pool=pool, health_scope=service
    )


async def release(shared: Shared) -> None:
    shared.users -= 1
    if shared.users == 0:
        for key, value in list(_SHARED.items()):
            if value is shared:
                del _SHARED[key]
        await shared.catalog.close()
        await shared.store.close()
