"""The metrics core without I/O: cells, bounded method labels, sums across stacks, exposition."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gmesh.chain.call import Door
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.outbound.mesh import MeshState
from gmesh.stats.metrics import (
    BOUNDS,
    OTHER,
    Cell,
    Families,
    MeshCollector,
    ServiceMetrics,
    backend_label,
)

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_a_cell_counts_codes_and_puts_a_bound_in_its_own_bucket() -> None:
    cell = Cell()
    cell.record(OK, 0.001)  # exactly a bound: Prometheus' `le` is inclusive
    cell.record(OK, 0.0011)
    cell.record(UNAVAILABLE, 1000.0)  # above every bound
    assert cell.calls == 3
    assert sorted(cell.by_code()) == [("OK", 2), ("UNAVAILABLE", 1)]
    buckets, total = cell.cumulative()
    le = dict(buckets)
    assert le["0.0008"] == 0 and le["0.001"] == 1 and le["0.002"] == 2
    assert le["100.0"] == 2 and le["+Inf"] == 3
    assert len(buckets) == len(BOUNDS) + 1
    assert total == 0.001 + 0.0011 + 1000.0


def test_unknown_methods_share_other_and_grow_nothing() -> None:
    sm = ServiceMetrics("orders")
    sm.known = frozenset({"/pkg.Orders/Get"})
    known = sm.method(Door.PROXY, "/pkg.Orders/Get")
    assert sm.method(Door.PROXY, "/pkg.Orders/Get") is known
    assert known is not sm.method(Door.CHANNEL, "/pkg.Orders/Get")  # one per door
    for i in range(1000):
        assert sm.method(Door.PROXY, f"/pkg.Orders/Made{i}") is sm.other[Door.PROXY]
    assert list(sm.by_door[Door.PROXY]) == ["/pkg.Orders/Get"]
    assert sm.other[Door.PROXY].name == OTHER


def test_backend_labels() -> None:
    assert backend_label("orders", None) == "orders"
    assert backend_label("orders", ("orders", None)) == "orders"
    assert backend_label("orders", ("orders", "v2")) == "orders/v2"
    assert backend_label("orders", ("orders-eu", "v1")) == "orders-eu/v1"


def scrape(collector: MeshCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_two_stacks_in_one_process_sum_into_one_series_and_a_closed_one_leaves() -> None:
    collector = MeshCollector()
    meshes = [MeshState(lambda: MeshSnapshot()) for _ in range(2)]
    for mesh, n in zip(meshes, (2, 3), strict=True):
        collector.add(mesh.metrics)
        sm = mesh.metrics.service("orders")
        sm.known = frozenset({"/pkg.Orders/Get"})
        cell = sm.method(Door.CHANNEL, "/pkg.Orders/Get").call_cell("", "default", ("orders", "v1"))
        for _ in range(n):
            cell.record(OK, 0.002)
    labels = {
        "door": "channel",
        "service": "orders",
        "route": "default",
        "backend": "orders/v1",
        "method": "/pkg.Orders/Get",
    }
    samples = scrape(collector)
    assert samples[("gmesh_calls_total", frozenset({**labels, "code": "OK"}.items()))] == 5
    assert samples[("gmesh_call_duration_seconds_count", frozenset(labels.items()))] == 5
    assert samples[("gmesh_call_duration_seconds_bucket", frozenset({**labels, "le": "0.002"}.items()))] == 5
    collector.discard(meshes[0].metrics)
    samples = scrape(collector)
    assert samples[("gmesh_calls_total", frozenset({**labels, "code": "OK"}.items()))] == 3


def test_a_service_never_called_has_no_series() -> None:
    collector = MeshCollector()
    mesh = MeshState(lambda: MeshSnapshot())
    collector.add(mesh.metrics)
    mesh.metrics.service("orders")  # compiled (e.g. previewed by explain), never called
    assert not [k for k in scrape(collector) if k[0].startswith("gmesh_calls")]


def test_scrape_time_families_read_the_mesh_state() -> None:
    collector = MeshCollector()
    mesh = MeshState(lambda: MeshSnapshot())
    collector.add(mesh.metrics)
    mesh.breaker("orders").rejected = 4
    mesh.breaker("orders").endpoint_rejected = 1
    _budget, stats = mesh.budget("orders", None)
    stats.retries, stats.denied = 7, 2
    state = mesh.states.get("orders", "127.0.0.1:1")
    state.observe(0.01, True, 1.0)
    state.observe(0.01, False, 2.0)
    state.healthy = False
    samples = scrape(collector)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("gmesh_breaker_rejections_total", service="orders", limit="service") == 4
    assert value("gmesh_breaker_rejections_total", service="orders", limit="endpoint") == 1
    assert value("gmesh_retries_total", service="orders") == 7
    assert value("gmesh_retry_budget_refusals_total", service="orders") == 2
    endpoint = {"service": "orders", "endpoint": "127.0.0.1:1"}
    assert value("gmesh_endpoint_attempts_total", **endpoint) == 2
    assert value("gmesh_endpoint_failures_total", **endpoint) == 1
    assert value("gmesh_endpoint_healthy", **endpoint) == 0
    assert value("gmesh_endpoint_ejected", **endpoint) == 0


def test_calls_are_counted_per_caller_and_summed_in_the_exposition() -> None:
    from gmesh.chain.call import source_of

    assert source_of("spiffe://mesh.local/svc/checkout", {"app": "web"}, "proxy:p") == "checkout"
    assert source_of("", {"app": "web"}, "proxy:p") == "web"
    assert source_of("", {"service": "cart", "app": "web"}, "proxy:p") == "cart"
    assert source_of("spiffe://other/ns/x", {}, "proxy:p") == "proxy:p"

    mesh = MeshState(lambda: MeshSnapshot())
    sm = mesh.metrics.service("orders")
    sm.known = frozenset({"/pkg.Orders/Get"})
    mm = sm.method(Door.PROXY, "/pkg.Orders/Get")
    for source, n in (("web", 2), ("proxy:p", 3)):
        for _ in range(n):
            mm.call_cell(source, "", None).record(grpc.StatusCode.OK, 0.001)
    rows = mesh.metrics.published()["orders"]
    assert sorted((r["caller"], r["codes"]["OK"]) for r in rows) == [("proxy:p", 3), ("web", 2)]
    out = Families()
    mesh.metrics.samples(out)
    assert out.values["calls"][("proxy", "orders", "", "orders", "/pkg.Orders/Get", "OK")] == 5
