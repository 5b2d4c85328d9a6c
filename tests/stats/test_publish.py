"""Publishing counters: every changed service in one etcd write, nothing while idle (real etcd)."""

from __future__ import annotations

import json

import grpc

from gmesh.chain.call import Door
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.discovery.keys import MeshKeys
from gmesh.outbound.mesh import MeshState
from gmesh.stats.backend import PROCESS
from gmesh.stats.publish import MAX_TXN_BYTES, MAX_TXN_OPS, StatsPublisher, _chunks
from gmesh.store.etcd import Store


def count(mesh: MeshState, service: str, n: int = 1) -> None:
    cell = mesh.metrics.service(service).method(Door.CHANNEL, "/x.Y/Z").call_cell("", "", None)
    for _ in range(n):
        cell.record(grpc.StatusCode.OK, 0.001)


async def test_every_changed_service_goes_out_in_one_write(store: Store, mesh_keys: MeshKeys) -> None:
    mesh = MeshState(lambda: MeshSnapshot())
    publisher = StatsPublisher(store, mesh_keys, mesh.stats, mesh.metrics)
    for i in range(20):
        count(mesh, f"svc-{i}")
    mesh.stats.of("svc-0", "v1").record(0.001, False)
    _, revision = await store.get_prefix(mesh_keys.stats_root)
    await publisher.publish()
    kvs, after = await store.get_prefix(mesh_keys.stats_root)
    assert publisher.writes == 1 and after == revision + 1  # one etcd revision for 20 services
    assert len(kvs) == 20
    doc = json.loads(next(kv.value for kv in kvs if kv.key == mesh_keys.stats("svc-0", PROCESS)))
    assert doc["backends"]["v1"]["calls"] == 1
    [row] = doc["calls"]
    assert row["codes"] == {"OK": 1} and row["backend"] == "svc-0" and row["door"] == "channel"
    assert doc["first"] is True and doc["since"] <= doc["at"]  # counted from zero since then

    await publisher.publish()  # nothing changed: no write
    assert publisher.writes == 1
    count(mesh, "svc-3", 2)
    await publisher.publish()  # one service changed: one write, of that service only
    kvs, latest = await store.get_prefix(mesh_keys.stats_root)
    assert publisher.writes == 2 and latest == after + 1
    changed = [kv for kv in kvs if kv.mod_revision == latest]
    assert [kv.key for kv in changed] == [mesh_keys.stats("svc-3", PROCESS)]
    again = json.loads(changed[0].value)
    # etcd held its counters from the first publish on, and still at the tick that found nothing new
    assert "first" not in again and doc["at"] < again["since"] < again["at"]
    await publisher.close()
    assert (await store.get_prefix(mesh_keys.stats_root))[0] == []  # the lease went with it


def test_transactions_stay_under_the_op_and_byte_limits() -> None:
    small = [(f"s{i}", ("", "x" * 100)) for i in range(MAX_TXN_OPS + 1)]
    assert [len(c) for c in _chunks(small)] == [MAX_TXN_OPS, 1]
    big = [(f"s{i}", ("", "x" * (MAX_TXN_BYTES // 3))) for i in range(4)]
    assert [len(c) for c in _chunks(big)] == [3, 1]
    huge = [("s", ("", "x" * (MAX_TXN_BYTES * 2)))]
    assert [len(c) for c in _chunks(huge)] == [1]  # one record alone: etcd decides


async def test_more_services_than_one_transaction_takes(store: Store, mesh_keys: MeshKeys) -> None:
    mesh = MeshState(lambda: MeshSnapshot())
    publisher = StatsPublisher(store, mesh_keys, mesh.stats, mesh.metrics)
    for i in range(MAX_TXN_OPS + 5):
        count(mesh, f"svc-{i}")
    await publisher.publish()
    assert publisher.writes == 2
    assert len((await store.get_prefix(mesh_keys.stats_root))[0]) == MAX_TXN_OPS + 5
    await publisher.close()


async def test_the_process_record_and_endpoint_views_go_in_the_same_write(
    store: Store, mesh_keys: MeshKeys
) -> None:
    mesh = MeshState(lambda: MeshSnapshot())
    record = {"role": "channel", "revision": 5}
    views = {"svc-a": [{"address": "127.0.0.1:1", "ejected": False}], "never-called": [{}]}
    publisher = StatsPublisher(
        store, mesh_keys, mesh.stats, mesh.metrics, endpoints=lambda: views, process=lambda: dict(record)
    )
    await publisher.publish()  # no calls yet: the record alone
    kvs, _ = await store.get_prefix(mesh_keys.processes_root)
    assert [json.loads(kv.value) for kv in kvs] == [{"process": PROCESS, "role": "channel", "revision": 5}]
    assert publisher.writes == 1
    await publisher.publish()  # nothing changed: no write
    assert publisher.writes == 1

    count(mesh, "svc-a", 3)
    record["revision"] = 6
    await publisher.publish()
    assert publisher.writes == 2  # stats and record together
    doc = json.loads((await store.get(mesh_keys.stats("svc-a", PROCESS))).value)  # type: ignore[union-attr]
    assert doc["endpoints"] == views["svc-a"]
    assert (await store.get(mesh_keys.stats("never-called", PROCESS))) is None
    assert json.loads((await store.get(mesh_keys.process(PROCESS))).value)["revision"] == 6  # type: ignore[union-attr]

    views["svc-a"] = [{"address": "127.0.0.1:1", "ejected": True}]
    await publisher.publish()  # an endpoint ejected: its service's document goes out again
    assert publisher.writes == 3
    doc = json.loads((await store.get(mesh_keys.stats("svc-a", PROCESS))).value)  # type: ignore[union-attr]
    assert doc["endpoints"][0]["ejected"] is True
    await publisher.close()
    assert (await store.get_prefix(mesh_keys.processes_root))[0] == []  # leased: gone with it
