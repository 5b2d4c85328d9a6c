"""The Store against a real etcd: KV, transactions, leases, and watches that never skip or repeat."""

from __future__ import annotations

import asyncio
import time

import pytest

from gmesh.discovery.keys import MeshKeys
from gmesh.errors import Conflict, StoreUnavailable
from gmesh.store.etcd import (
    Compare,
    Delete,
    EtcdConfig,
    EventType,
    Put,
    Resync,
    Store,
    WatchBatch,
    WatchItem,
    WatchLost,
)
from gmesh.testing.etcd import EtcdMember


async def next_item(watch: object, timeout: float = 10.0) -> WatchItem:
    return await asyncio.wait_for(watch.__anext__(), timeout)  # type: ignore[attr-defined]


async def test_put_get_delete_and_range(store: Store, mesh_keys: MeshKeys) -> None:
    p = mesh_keys.prefix
    rev = await store.put(f"{p}a", b"1")
    assert rev > 0
    got = await store.get(f"{p}a")
    assert got is not None and got.value == b"1" and got.mod_revision == rev
    await store.put(f"{p}b", b"2")
    await store.put(f"{p}c/d", b"3")
    kvs, at = await store.get_prefix(p)
    assert [kv.key for kv in kvs] == [f"{p}a", f"{p}b", f"{p}c/d"]
    assert at >= rev
    kvs, _ = await store.get_range(f"{p}b", f"{p}c")
    assert [kv.key for kv in kvs] == [f"{p}b"]
    assert await store.delete(f"{p}a") == 1
    assert await store.get(f"{p}a") is None
    assert await store.delete(p, prefix=True) == 2
    assert (await store.get_prefix(p))[0] == []


async def test_range_reads_every_page_at_one_revision(store: Store, mesh_keys: MeshKeys) -> None:
    p = mesh_keys.prefix
    ops = [Put(f"{p}k{i:05d}", str(i).encode()) for i in range(2500)]
    for start in range(0, len(ops), 100):
        await store.txn([], ops[start : start + 100])
    kvs, _ = await store.get_prefix(p)
    assert len(kvs) == 2500
    assert [kv.value for kv in kvs[:3]] == [b"0", b"1", b"2"]
    assert kvs[-1].key == f"{p}k02499"


async def test_compare_and_swap(store: Store, mesh_keys: MeshKeys) -> None:
    key = f"{mesh_keys.prefix}cas"
    rev = await store.compare_and_swap([Compare(key, "mod", 0)], [Put(key, b"first")])
    # A second writer that also saw "absent" loses.
    with pytest.raises(Conflict):
        await store.compare_and_swap([Compare(key, "mod", 0)], [Put(key, b"second")])
    rev2 = await store.compare_and_swap([Compare(key, "mod", rev)], [Put(key, b"second")])
    assert rev2 > rev
    got = await store.get(key)
    assert got is not None and got.value == b"second"
    result = await store.txn([Compare(key, "value", b"nope")], [Delete(key)], [Put(key, b"failure-branch")])
    assert not result.succeeded
    got = await store.get(key)
    assert got is not None and got.value == b"failure-branch"


async def test_lease_keys_vanish_on_revoke_and_on_expiry(store: Store, mesh_keys: MeshKeys) -> None:
    p = mesh_keys.prefix
    lease = await store.grant_lease(2)
    await store.put(f"{p}leased", b"x", lease=lease)
    await store.revoke_lease(lease)
    assert await store.get(f"{p}leased") is None
    await store.revoke_lease(lease)  # already gone: not an error

    lease = await store.grant_lease(2)
    await store.put(f"{p}expiring", b"x", lease=lease)
    deadline = time.monotonic() + 10
    while await store.get(f"{p}expiring") is not None:
        assert time.monotonic() < deadline, "unkept lease did not expire"
        await asyncio.sleep(0.1)


async def test_keepalive_holds_a_lease_past_its_ttl(store: Store, mesh_keys: MeshKeys) -> None:
    key = f"{mesh_keys.prefix}kept"
    lease = await store.grant_lease(2)
    lost: list[bool] = []
    keeper = store.keep_alive(lease, 2, lambda: lost.append(True))
    await store.put(key, b"x", lease=lease)
    # Three TTLs later the key is still there (an unkept lease is gone after one).
    end = time.monotonic() + 6
    while time.monotonic() < end:
        assert await store.get(key) is not None
        await asyncio.sleep(0.5)
    assert not lost
    await keeper.stop()
    await store.revoke_lease(lease)


async def test_keepalive_reports_a_lease_revoked_elsewhere(store: Store, mesh_keys: MeshKeys) -> None:
    lease = await store.grant_lease(2)
    lost = asyncio.Event()
    keeper = store.keep_alive(lease, 2, lost.set)
    await store.revoke_lease(lease)
    await asyncio.wait_for(lost.wait(), 5)
    await keeper.stop()


async def test_watch_starts_with_resync_then_every_change_in_order(store: Store, mesh_keys: MeshKeys) -> None:
    p = mesh_keys.prefix
    await store.put(f"{p}before", b"0")
    watch = store.watch(p)
    first = await next_item(watch)
    assert isinstance(first, Resync)
    assert [kv.key for kv in first.kvs] == [f"{p}before"]
    revs = [await store.put(f"{p}k{i}", str(i).encode()) for i in range(20)]
    revs.append(await store.delete(f"{p}k0") and (await store.get_prefix(p))[1])
    await store.put(f"{mesh_keys.prefix[:-1]}-outside", b"not watched")
    seen: list[tuple[EventType, str, int]] = []
    while len(seen) < 21:
        item = await next_item(watch)
        assert isinstance(item, WatchBatch)
        seen.extend((e.type, e.kv.key, e.kv.mod_revision) for e in item.events)
    assert [r for _, _, r in seen] == revs
    assert seen[-1][:2] == (EventType.DELETE, f"{p}k0")
    assert all(key.startswith(p) for _, key, _ in seen)
    await watch.aclose()


async def test_watch_after_compaction_resyncs_instead_of_skipping(
    etcd_member: EtcdMember, mesh_keys: MeshKeys
) -> None:
    p = mesh_keys.prefix
    store = await Store.connect(EtcdConfig.parse(etcd_member.url))
    try:
        old = await store.put(f"{p}a", b"1")
        await store.put(f"{p}a", b"2")
        latest = await store.put(f"{p}b", b"3")
        await store.compact(latest)
        # Asking for history that compaction removed must give the full state, not a gap.
        watch = store.watch(p, start_revision=old)
        item = await next_item(watch)
        assert isinstance(item, Resync)
        assert {kv.key: kv.value for kv in item.kvs} == {f"{p}a": b"2", f"{p}b": b"3"}
        assert item.revision >= latest
        rev = await store.put(f"{p}c", b"4")
        item = await next_item(watch)
        assert isinstance(item, WatchBatch) and item.events[0].kv.mod_revision == rev
        await watch.aclose()
    finally:
        await store.close()


async def test_watch_survives_etcd_restart_without_gap_or_duplicate(
    etcd_member: EtcdMember, mesh_keys: MeshKeys
) -> None:
    p = mesh_keys.prefix
    store = await Store.connect(EtcdConfig.parse(etcd_member.url))
    events: list[int] = []
    losses: list[str] = []
    resyncs: list[int] = []
    got = asyncio.Condition()

    async def collect() -> None:
        async for item in store.watch(p):
            async with got:
                if isinstance(item, Resync):
                    resyncs.append(item.revision)
                elif isinstance(item, WatchBatch):
                    events.extend(e.kv.mod_revision for e in item.events)
                elif isinstance(item, WatchLost):
                    losses.append(item.error)
                got.notify_all()

    collector = asyncio.create_task(collect())
    try:
        async with got:
            await asyncio.wait_for(got.wait_for(lambda: resyncs), 10)
        written = [await store.put(f"{p}k{i}", b"x") for i in range(5)]
        etcd_member.stop()
        async with got:
            await asyncio.wait_for(got.wait_for(lambda: losses), 10)
        etcd_member.start()
        written += [await store.put(f"{p}k{i}", b"y") for i in range(5, 10)]
        async with got:
            await asyncio.wait_for(got.wait_for(lambda: len(events) >= 10), 20)
        assert events == written  # every revision, in order, once
        assert len(resyncs) == 1  # resumed from where it was, no full re-read
    finally:
        collector.cancel()
        await store.close()


async def test_unreachable_etcd_is_one_clear_error() -> None:
    store = await Store.connect(EtcdConfig.parse("http://127.0.0.1:1", timeout=2.0))
    try:
        with pytest.raises(StoreUnavailable) as err:
            await store.get("/x")
        message = str(err.value)
        assert "127.0.0.1:1" in message and "unreachable" in message and "\n" not in message
    finally:
        await store.close()
