"""A 3-member etcd cluster losing the member a client's watch is on (kill -9)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gmesh.discovery.keys import MeshKeys
from gmesh.errors import StoreUnavailable
from gmesh.store.etcd import EtcdConfig, Resync, Store, WatchBatch
from gmesh.testing.etcd import EtcdCluster

pytestmark = pytest.mark.slow

WATCHERS = "etcd_debugging_mvcc_watcher_total"


@pytest.mark.parametrize("victim", ["watch-holder", "leader"])
async def test_kill_a_member_reads_writes_and_watch_resume_exactly_once(
    etcd_cluster: EtcdCluster, mesh_keys: MeshKeys, victim: str
) -> None:
    p = mesh_keys.prefix
    store = await Store.connect(EtcdConfig.parse(etcd_cluster.endpoints))
    watched: list[int] = []
    resyncs: list[int] = []
    acked: list[tuple[float, int]] = []  # (when, revision) of every write etcd acknowledged
    seen = asyncio.Condition()

    async def watch() -> None:
        async for item in store.watch(p):
            async with seen:
                if isinstance(item, Resync):
                    resyncs.append(item.revision)
                elif isinstance(item, WatchBatch):
                    watched.extend(e.kv.mod_revision for e in item.events)
                seen.notify_all()

    stop_writing = asyncio.Event()

    async def write() -> None:
        i = 0
        while not stop_writing.is_set():
            # Failures during the failover are expected; what counts is when writes come back.
            with contextlib.suppress(StoreUnavailable):
                acked.append((time.monotonic(), await store.put(f"{p}k{i % 50}", str(i).encode())))
            i += 1
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    writer = asyncio.create_task(write())
    try:
        async with seen:
            await asyncio.wait_for(seen.wait_for(lambda: resyncs and len(watched) >= 20), 10)
        if victim == "watch-holder":  # the member this client's watch stream is attached to
            holder = next(m for m in etcd_cluster.members if m.metric(WATCHERS) > 0)
        else:  # the leader: writes wait for an election
            holder = next(m for m in etcd_cluster.members if m.is_leader())
        watched_before = len(watched)

        was_leader = holder.is_leader()
        holder.kill()
        killed_at = time.monotonic()

        # Writes resume within 10 s.
        while not any(t > killed_at + 0.05 for t, _ in acked):
            assert time.monotonic() - killed_at < 10, "writes did not resume within 10 s"
            await asyncio.sleep(0.02)
        write_resumed = next(t for t, _ in acked if t > killed_at + 0.05) - killed_at
        # Reads resume within 10 s.
        while True:
            try:
                await store.get(f"{p}k0")
                break
            except StoreUnavailable:
                assert time.monotonic() - killed_at < 10, "reads did not resume within 10 s"
        # The watch delivers a revision written after the kill within 10 s.
        first_after = next(r for t, r in acked if t > killed_at + 0.05)
        async with seen:
            await asyncio.wait_for(seen.wait_for(lambda: watched and watched[-1] >= first_after), 10)
        watch_resumed = time.monotonic() - killed_at
        assert watch_resumed < 10
        assert len(watched) > watched_before

        await asyncio.sleep(1.0)  # keep writing on the two survivors
        stop_writing.set()
        await writer
        last = acked[-1][1]
        async with seen:
            await asyncio.wait_for(seen.wait_for(lambda: watched[-1] >= last), 10)

        # Every revision exactly once: only this test writes to this cluster, so the
        # watched revisions are one contiguous run with no gap and no repeat, and every
        # acknowledged write is in it.
        assert watched == list(range(resyncs[0] + 1, watched[-1] + 1))
        assert {r for _, r in acked if r > resyncs[0]} <= set(watched)
        assert len(resyncs) == 1
        print(
            f"killed {holder.name} (leader={was_leader}): "
            f"writes back after {write_resumed:.2f}s, watch after {watch_resumed:.2f}s"
        )
    finally:
        stop_writing.set()
        writer.cancel()
        watcher.cancel()
        await store.close()
