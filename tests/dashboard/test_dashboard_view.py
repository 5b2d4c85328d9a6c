"""The dashboard's model (`MeshView`) over a real etcd: what processes publish becomes edges, rates,
endpoint states, process records and rollout trends; bad records are skipped; history walks back."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from gmesh.config.kinds import KindRegistry
from gmesh.dashboard.app import Dashboard
from gmesh.dashboard.model import UNKNOWN, MeshView
from gmesh.discovery.keys import MeshKeys
from gmesh.rollout.controller import RolloutState, Thresholds
from gmesh.store.etcd import Store


def row(caller: str, ok: int, backend: str = "orders", failed: int = 0) -> dict[str, Any]:
    codes = {"OK": ok, **({"UNAVAILABLE": failed} if failed else {})}
    return {"caller": caller, "door": "channel", "route": "", "backend": backend, "method": "/x.Y/Z",
            "codes": codes, "buckets": {"10": ok + failed}, "sum": 0.0}  # fmt: skip


async def publish(store: Store, keys: MeshKeys, process: str, at: float, rows: list[Any], **doc: Any) -> None:
    await store.put(keys.stats("orders", process), json.dumps({"at": at, "calls": rows, **doc}).encode())


async def test_rates_per_caller_from_two_publishes_of_each_process(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    view = MeshView(store, mesh_keys, config_kinds)
    now = time.time()
    await publish(store, mesh_keys, "p1", now - 5, [row("web", 100), row("", 10)])
    await publish(store, mesh_keys, "p2", now - 5, [row("batch", 0)])
    await view.poll()
    assert view.edges() == {}  # one publish each: nothing to measure yet
    await store.put(mesh_keys.stats("orders", "junk"), b"{not json")
    for second in range(4, -1, -1):  # a publish a second while they call: 20/s, 2/s and 10/s
        done = 5 - second
        await publish(
            store, mesh_keys, "p1", now - second, [row("web", 100 + 20 * done), row("", 10 + 2 * done)]
        )
        await publish(store, mesh_keys, "p2", now - second, [row("batch", 8 * done, failed=2 * done)])
        await view.poll()
    edges = {k: (round(r.rps, 3), r.signals.calls, r.signals.failures) for k, r in view.edges().items()}
    assert edges == {
        ("web", "orders"): (20.0, 100, 0),
        (UNKNOWN, "orders"): (2.0, 10, 0),
        ("batch", "orders"): (10.0, 50, 10),
    }
    assert round(view.total("orders").rps, 3) == 32.0
    assert view.services() == ["orders"]

    await store.delete(mesh_keys.stats("orders", "p2"))  # the process left (its lease went)
    await view.poll()
    assert ("batch", "orders") not in view.edges() and ("web", "orders") in view.edges()


async def test_endpoint_views_combine_every_caller(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    view = MeshView(store, mesh_keys, config_kinds)
    now = time.time()

    def endpoint(address: str, **state: Any) -> dict[str, Any]:
        base = {"address": address, "inflight": 1, "ewmaMs": 2.0, "attempts": 10, "failures": 0}
        return {**base, "healthy": True, "ejected": False, "down": False, **state}

    await publish(store, mesh_keys, "p1", now - 2, [row("a", 1)], endpoints=[endpoint("e1"), endpoint("e2")])
    await publish(store, mesh_keys, "p2", now - 2, [row("b", 1)], endpoints=[endpoint("e1", ewmaMs=9.0)])
    await view.poll()
    await publish(store, mesh_keys, "p1", now, [row("a", 2)],
                  endpoints=[endpoint("e1", attempts=30, failures=5), endpoint("e2", down=True)])  # fmt: skip
    await publish(store, mesh_keys, "p2", now, [row("b", 2)],
                  endpoints=[endpoint("e1", ewmaMs=9.0, ejected=True, inflight=3, attempts=20)])  # fmt: skip
    await view.poll()
    e1, e2 = view.endpoint_views["orders"]["e1"], view.endpoint_views["orders"]["e2"]
    assert (e1.inflight, e1.ewma_ms, e1.seen_by, e1.state) == (4, 9.0, 2, "ejected")
    assert (e1.attempts, e1.failures) == (30, 5)  # 20 + 10 attempts since the first publishes
    assert e2.state == "unreachable" and e2.success_rate is None


async def test_process_records_rollout_trends_and_behind(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    view = MeshView(store, mesh_keys, config_kinds)
    await store.put(
        mesh_keys.process("p1"), json.dumps({"process": "p1", "role": "proxy", "revision": 0}).encode()
    )
    await store.put(mesh_keys.processes_root + "bad", b"[")
    state = RolloutState("orders", "v1", "v2", [10, 100], 30.0, Thresholds())
    await store.put(mesh_keys.rollout("orders"), state.to_json())
    now = time.time()
    await publish(store, mesh_keys, "p1", now - 2, [row("a", 0, "orders/v1"), row("a", 0, "orders/v2")])
    await view.poll()
    await publish(
        store, mesh_keys, "p1", now, [row("a", 90, "orders/v1"), row("a", 10, "orders/v2", failed=1)]
    )
    await view.poll()
    assert list(view.processes) == ["p1"]
    assert view.rollouts["orders"].weight == 10
    _, point = view.trends["orders"][-1]
    assert point["canary"]["calls"] == 11 and point["baseline"]["calls"] == 90
    assert point["canary"]["successRate"] == round(10 / 11, 5)
    assert not view.behind("p1")  # the catalog is not started: revision 0, nobody is behind it


async def test_history_walks_back_every_version_and_the_diff_page_shows_two(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    key = mesh_keys.config("Route", "orders")
    revisions = []
    for weight in (100, 70, 30):
        rules = [{"name": "d", "backends": [{"subset": "v1", "weight": weight}]}]
        doc = {"kind": "Route", "metadata": {"name": "orders"}, "spec": {"service": "orders", "rules": rules}}
        revisions.append(await store.put(key, json.dumps(doc).encode()))
    versions, older = await store.history(key, 10)
    assert [kv.mod_revision for kv in versions] == revisions[::-1] and not older
    assert [kv.version for kv in versions] == [3, 2, 1]
    versions, older = await store.history(key, 2)
    assert len(versions) == 2 and older
    await store.delete(key)
    doc["spec"]["rules"][0]["backends"][0]["weight"] = 50
    again = await store.put(key, json.dumps(doc).encode())
    versions, older = await store.history(key, 10)
    assert [kv.mod_revision for kv in versions] == [again] and not older  # since it was created again

    view = MeshView(store, mesh_keys, config_kinds)
    dashboard = Dashboard(view)
    _, html = await dashboard.main("/config/Route/orders", {})
    assert html.count('class="revision"') == 1 and "nothing to compare" in html


def test_the_host_guard_admits_ip_literals_localhost_and_the_listen_name_only() -> None:
    dashboard = Dashboard(None, hosts={"mesh.internal"})  # type: ignore[arg-type]
    for host in (
        "127.0.0.1:15080",
        "localhost:15080",
        "[::1]:15080",
        "10.1.2.3",
        "mesh.internal:80",
        "LOCALHOST",
    ):
        assert dashboard.host_allowed(host), host
    for host in ("evil.example", "evil.example:15080", "", "127.0.0.1.evil.example:1"):
        assert not dashboard.host_allowed(host), host


async def test_records_with_wrong_types_are_skipped_or_coerced_and_every_page_renders(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    view = MeshView(store, mesh_keys, config_kinds)
    now = time.time()
    bad_endpoint = {"address": ["x"], "inflight": "many", "ewmaMs": None, "attempts": "1", "healthy": "no"}
    await publish(store, mesh_keys, "p1", now - 2, [row("a", 1)], endpoints=[bad_endpoint, 7, "x"])
    await publish(store, mesh_keys, "p2", "yesterday", [row("a", 1)])  # type: ignore[arg-type]
    await store.put(mesh_keys.stats("orders", "p3"), json.dumps([1, 2]).encode())
    await store.put(mesh_keys.stats("orders", "p4"), json.dumps({"at": now, "calls": [{"door": 1}]}).encode())
    record = {
        "process": "p1",
        "role": ["proxy"],
        "revision": "12",
        "startedAt": "monday",
        "services": "orders",
    }
    await store.put(mesh_keys.process("p1"), json.dumps(record).encode())
    await store.put(mesh_keys.proxy("x"), json.dumps({"id": 5, "serving": "yes"}).encode())
    good = json.loads(RolloutState("orders", "v1", "v2", [10, 100], 30.0, Thresholds()).to_json())
    huge = 10**400
    nested = b"[" * 100_000 + b"]" * 100_000
    await publish(store, mesh_keys, "p5", now, [{**row("a", 1), "codes": {"OK": huge}}])
    await publish(
        store, mesh_keys, "p6", now, [row("a", 1)], endpoints=[{"address": "e", "inflight": math.inf}]
    )
    await store.put(mesh_keys.stats("orders", "p7"), nested)
    await store.put(mesh_keys.process("p8"), json.dumps({"revision": math.inf, "startedAt": huge}).encode())
    await store.put(mesh_keys.process("p9"), nested)
    await store.put(mesh_keys.rollout("nested"), nested)
    changes = (
        ("steps", {"steps": ["<b>10</b>"]}),
        ("empty", {"steps": []}),
        ("reason", {"reason": 5}),
        ("negative", {"step": -10}),
        ("nan", {"started_at": math.nan}),
        ("p99", {"thresholds": {**good["thresholds"], "max_latency_p99": math.inf}}),
        ("interval", {"interval": huge}),
        ("measured", {"measured": {"canary": {"calls": "x"}, "baseline": {"calls": 5, "p99": huge}}}),
    )
    for name, change in changes:
        await store.put(mesh_keys.rollout(name), json.dumps({**good, "service": name, **change}).encode())
    await view.poll()
    await view.poll()
    assert set(view.rollouts) == {"measured"}  # wrong types skipped; a bad measurement shown as none
    assert view.processes["p1"]["revision"] == 0 and view.processes["p1"]["services"] == []
    assert view.processes["p8"]["revision"] == 0 and "p9" not in view.processes
    assert view.endpoint_views["orders"]["e"].inflight == 0
    dashboard = Dashboard(view)
    for path in ("/", "/services/orders", "/rollouts", "/config", "/proxies", "/config/Route/x"):
        _, html = await dashboard.main(path, {})
        assert "<b>" not in html, path


async def test_a_process_is_behind_only_while_it_misses_a_change(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    view = MeshView(store, mesh_keys, config_kinds)
    await view.start()
    try:
        doc = {"kind": "Service", "metadata": {"name": "orders"}, "spec": {}}
        changed = await store.put(mesh_keys.config("Service", "orders"), json.dumps(doc).encode())
        await view.catalog.wait_for(lambda s: s.resource("Service", "orders") is not None, timeout=5)
        for process, revision in (("late", changed - 1), ("current", changed), ("read-later", changed + 50)):
            record = {"process": process, "role": "channel", "revision": revision}
            await store.put(mesh_keys.process(process), json.dumps(record).encode())
        await view.poll()
        assert view.latest_change() == changed
        later = time.time() + 10  # behind for longer than the grace
        assert [p for p in ("late", "current", "read-later") if view.behind(p, later)] == ["late"]
        assert not view.behind("late")  # not yet: it may be on its way
    finally:
        await view.close()


async def test_the_service_page_shows_global_shares_and_quota_use_from_etcd(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    from gmesh.ratelimit.quota import counter_name, window_of

    docs = {
        ("Service", "orders"): {},
        ("RateLimit", "orders-global"): {"service": "orders", "rate": "100/s", "scope": "global"},
        ("Quota", "orders-hourly"): {"service": "orders", "limit": 1000, "window": "1h", "key": "caller"},
    }
    for (kind, name), spec in docs.items():
        doc = {"kind": kind, "metadata": {"name": name}, "spec": spec}
        await store.put(mesh_keys.config(kind, name), json.dumps(doc).encode())
    for process, demand in (("a", 10.0), ("b", 500.0)):
        body = json.dumps({"demand": demand, "at": time.time()}).encode()
        await store.put(mesh_keys.limit_demand("orders-global", process), body)
    view = MeshView(store, mesh_keys, config_kinds)
    await view.start()
    try:
        await view.catalog.wait_for(lambda s: s.resource("Quota", "orders-hourly") is not None, timeout=5)
        quota: Any = view.snapshot.resource("Quota", "orders-hourly")
        window, _ = window_of(quota.spec, time.time())
        for key, used in (("web", 300), ("<b>batch</b>", 20)):
            counter = mesh_keys.quota_counter("orders-hourly", str(window), counter_name(key))
            await store.put(counter, str(used).encode())
        live = await view.limit_state("orders")
        shares = {p: (d, round(s, 1)) for p, d, s in live["RateLimit/orders-global"]["processes"]}
        assert shares == {"a": (10.0, 11.0), "b": (500.0, 89.0)}  # max-min fair, 10% headroom
        assert live["Quota/orders-hourly"]["used"] == [("web", 300), ("<b>batch</b>", 20)]
        _, html = await Dashboard(view).main("/services/orders", {})
        assert "<td>web</td><td>300</td><td>700</td>" in html
        assert "&lt;b&gt;batch&lt;/b&gt;" in html and "<b>" not in html
        assert "<td>b</td><td>500.0/s</td><td>89.0/s</td>" in html
    finally:
        await view.close()


async def test_a_process_first_document_counts_from_zero_so_a_burst_shows_at_once(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    view = MeshView(store, mesh_keys, config_kinds)
    now = time.time()
    # a proxy that served one burst of 20 calls in its first second, then nothing
    await publish(store, mesh_keys, "burst", now, [row("web", 20)], since=now - 1, first=True)
    # a process whose first document the dashboard missed: its counts may be older than the window
    await publish(store, mesh_keys, "older", now, [row("batch", 500)], since=now - 1)
    await view.poll()
    edges = {k: (round(r.rps, 3), r.signals.calls) for k, r in view.edges().items()}
    assert edges == {("web", "orders"): (20.0, 20)}
