"""The catalog over a real etcd: snapshots, subscribers, static stability, and the persisted copy."""

from __future__ import annotations

import json
from pathlib import Path

from gmesh.config.kinds import KindRegistry
from gmesh.discovery.catalog import Catalog, MeshSnapshot
from gmesh.discovery.endpoint import Endpoint
from gmesh.discovery.keys import MeshKeys
from gmesh.store.etcd import EtcdConfig, Store
from gmesh.testing.etcd import EtcdMember

SERVICE_DOC = {
    "kind": "Service",
    "metadata": {"name": "orders"},
    "spec": {"subsets": {"v1": {"version": "v1"}}, "timeout": "2s"},
}


def endpoint(service: str, address: str, **labels: str) -> bytes:
    return Endpoint(
        service=service, address=address, labels=labels, grpc_services=("shop.v1.Orders",)
    ).to_json()


async def test_snapshot_has_endpoints_config_and_grpc_index(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    k = mesh_keys
    await store.put(k.config("Service", "orders"), json.dumps(SERVICE_DOC).encode())
    await store.put(k.endpoint("orders", "127.0.0.1:2"), endpoint("orders", "127.0.0.1:2", version="v2"))
    await store.put(k.endpoint("orders", "127.0.0.1:1"), endpoint("orders", "127.0.0.1:1", version="v1"))
    await store.put(k.proxy("p1"), b"{}")  # outside the catalog's range: ignored
    seen: list[MeshSnapshot] = []
    async with Catalog(store, k, config_kinds) as catalog:
        catalog.subscribe(seen.append)
        snap = catalog.snapshot
        assert snap.source == "etcd"
        assert [e.address for e in snap.endpoints_of("orders")] == ["127.0.0.1:1", "127.0.0.1:2"]
        assert snap.grpc_services == {"shop.v1.Orders": ("orders",)}
        service = snap.resource("Service", "orders")
        assert service is not None and service.spec.timeout == 2.0  # type: ignore[attr-defined]
        assert snap.services() == ["orders"]

        rev = await store.delete(k.endpoint("orders", "127.0.0.1:1"))
        assert rev == 1
        after = await catalog.wait_for(lambda s: len(s.endpoints_of("orders")) == 1, timeout=5)
        assert after.revision > snap.revision
        assert snap.endpoints_of("orders")[0].address == "127.0.0.1:1"  # old snapshots never change
        assert seen and seen[-1] is after
        await store.delete(k.endpoints_of("orders"), prefix=True)
        empty = await catalog.wait_for(lambda s: not s.endpoints_of("orders"), timeout=5)
        assert "orders" not in empty.endpoints and "shop.v1.Orders" not in empty.grpc_services


async def test_invalid_stored_config_keeps_the_last_valid_version(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    key = mesh_keys.config("Service", "orders")
    await store.put(key, json.dumps(SERVICE_DOC).encode())
    async with Catalog(store, mesh_keys, config_kinds) as catalog:
        bad = {**SERVICE_DOC, "spec": {"timeout": "soon"}}
        rev = await store.put(key, json.dumps(bad).encode())
        snap = await catalog.wait_for(lambda s: s.revision >= rev, timeout=5)
        kept = snap.resource("Service", "orders")
        assert kept is not None and kept.spec.timeout == 2.0  # type: ignore[attr-defined]
        assert "spec.timeout" in catalog.invalid[key]
        # A malformed endpoint record is ignored too, without hiding the others.
        await store.put(mesh_keys.endpoint("orders", "127.0.0.1:1"), endpoint("orders", "127.0.0.1:1"))
        rev = await store.put(mesh_keys.endpoint("orders", "junk"), b"{not json")
        snap = await catalog.wait_for(lambda s: s.revision >= rev, timeout=5)
        assert [e.address for e in snap.endpoints_of("orders")] == ["127.0.0.1:1"]


async def test_etcd_down_keeps_the_snapshot_and_catches_up_when_back(
    etcd_member: EtcdMember, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    k = mesh_keys
    store = await Store.connect(EtcdConfig.parse(etcd_member.url))
    try:
        await store.put(k.endpoint("orders", "127.0.0.1:1"), endpoint("orders", "127.0.0.1:1"))
        async with Catalog(store, k, config_kinds) as catalog:
            before = catalog.snapshot
            assert len(before.endpoints_of("orders")) == 1
            etcd_member.stop()
            await catalog.wait_for(lambda s: not catalog.connected, timeout=10)
            assert catalog.snapshot is before  # still serving the last good snapshot
            assert catalog.last_error

            etcd_member.start()
            await store.put(k.endpoint("orders", "127.0.0.1:2"), endpoint("orders", "127.0.0.1:2"))
            after = await catalog.wait_for(lambda s: len(s.endpoints_of("orders")) == 2, timeout=20)
            assert catalog.connected and after.source == "etcd"
    finally:
        await store.close()


async def test_restart_without_etcd_serves_the_persisted_snapshot(
    etcd_member: EtcdMember, mesh_keys: MeshKeys, config_kinds: KindRegistry, tmp_path: Path
) -> None:
    k = mesh_keys
    persisted = tmp_path / "snapshot.json"
    store = await Store.connect(EtcdConfig.parse(etcd_member.url, timeout=1.0))
    try:
        await store.put(k.config("Service", "orders"), json.dumps(SERVICE_DOC).encode())
        rev = await store.put(k.endpoint("orders", "127.0.0.1:1"), endpoint("orders", "127.0.0.1:1"))
        async with Catalog(store, k, config_kinds, persist_path=persisted) as catalog:
            await catalog.wait_for(lambda s: s.revision >= rev, timeout=5)
        assert persisted.exists()

        etcd_member.stop()
        restarted = Catalog(store, k, config_kinds, persist_path=persisted)
        await restarted.start(wait=0.5)
        try:
            snap = restarted.snapshot
            assert snap.source == "file" and snap.revision == rev
            assert [e.address for e in snap.endpoints_of("orders")] == ["127.0.0.1:1"]
            assert snap.resource("Service", "orders") is not None

            etcd_member.start()  # etcd back: the restarted catalog switches to live data
            live = await restarted.wait_for(lambda s: s.source == "etcd", timeout=20)
            assert live.revision >= rev
        finally:
            await restarted.close()
    finally:
        await store.close()
