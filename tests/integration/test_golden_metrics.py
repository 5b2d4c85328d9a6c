"""Golden metrics equal a known workload exactly, in both front doors, as Prometheus reads them:
scraped over real HTTP and parsed with prometheus-client's own parsers."""

from __future__ import annotations

import asyncio
import collections
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest_asyncio
from conftest import Door, Mesh, route, rule, split, start_proxy
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

import gmesh.metrics
from gmesh.discovery.keys import MeshKeys
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2

UNARY = "/gmesh.v1.Echo/Unary"
BIDI = "/gmesh.v1.Echo/Bidi"


class Scrape:
    """One scrape: samples as (name, labels) -> value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def rows(self, name: str, **labels: str) -> Iterator[tuple[dict[str, str], float]]:
        want = set(labels.items())
        for (found, label_set), value in self.samples.items():
            if found == name and want <= label_set:
                yield dict(label_set), value

    def sum(self, name: str, **labels: str) -> float:
        return sum(value for _, value in self.rows(name, **labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        out: collections.Counter[str] = collections.Counter()
        for found, value in self.rows(name, **labels):
            out[found[label]] += value
        return {k: v for k, v in out.items() if v}


def get(url: str, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


async def scrape(address: str) -> Scrape:
    _, text = await asyncio.to_thread(get, f"http://{address}/metrics")
    return Scrape(text)


@pytest_asyncio.fixture
async def metrics_server() -> AsyncIterator[str]:
    """gmesh's collector alone, served over HTTP the way an application would."""
    registry = CollectorRegistry()
    gmesh.metrics.register(registry)
    server = gmesh.metrics.serve(0, "127.0.0.1", registry)
    yield server.address
    await asyncio.to_thread(server.close)


async def unary(door: Door, timeout: float = 10, **request: Any) -> grpc.StatusCode:
    try:
        await door.stub.Unary(echo_pb2.EchoRequest(**request), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def bidi(door: Door, messages: int) -> None:
    call = door.stub.Bidi(timeout=10)
    for i in range(messages):
        await call.write(echo_pb2.EchoRequest(message=str(i)))
        assert (await call.read()) is not grpc.aio.EOF
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_metrics_equal_a_known_workload(mesh: Mesh, door: Door, metrics_server: str) -> None:
    await route(mesh, door, [rule("default", backends=split(50, 50))])
    jobs: list[dict[str, Any]] = (
        [{}] * 35
        + [{"delay_ms": 1000}] * 5
        + [{"fail_code": grpc.StatusCode.UNAVAILABLE.value[0]}] * 6
        + [{"fail_code": grpc.StatusCode.NOT_FOUND.value[0]}] * 4
    )
    codes = collections.Counter(await asyncio.gather(*(unary(door, **job) for job in jobs)))
    assert codes == {grpc.StatusCode.OK: 40, grpc.StatusCode.UNAVAILABLE: 6, grpc.StatusCode.NOT_FOUND: 4}
    for _ in range(3):
        await bidi(door, 4)

    m = await scrape(metrics_server)
    mine = {"door": door.name, "service": "orders"}
    unary_calls = {**mine, "method": UNARY}
    assert m.by("gmesh_calls_total", "code", **unary_calls) == {"OK": 40, "UNAVAILABLE": 6, "NOT_FOUND": 4}
    assert m.by("gmesh_calls_total", "route", **unary_calls) == {"default": 50}
    # per backend: exactly what each subset's servers answered
    served = {
        "orders/v1": sum(mesh.servers[n].servicer.calls.get("Unary", 0) for n in ("v1a", "v1b")),
        "orders/v2": mesh.servers["v2"].servicer.calls.get("Unary", 0),
    }
    assert sum(served.values()) == 50
    assert m.by("gmesh_calls_total", "backend", **unary_calls) == {k: v for k, v in served.items() if v}
    # the duration histogram: 5 calls slept 1 s on the server, the other 45 did not
    assert m.sum("gmesh_call_duration_seconds_count", **unary_calls) == 50
    assert m.sum("gmesh_call_duration_seconds_bucket", le="+Inf", **unary_calls) == 50
    assert m.sum("gmesh_call_duration_seconds_bucket", le="1.0", **unary_calls) == 45
    assert m.sum("gmesh_call_duration_seconds_bucket", le="0.65", **unary_calls) == 45
    assert m.sum("gmesh_call_duration_seconds_sum", **unary_calls) >= 5.0
    # no retry policy: one attempt per call, same codes
    assert m.by("gmesh_attempts_total", "code", **unary_calls) == {"OK": 40, "UNAVAILABLE": 6, "NOT_FOUND": 4}
    assert m.sum("gmesh_attempt_duration_seconds_count", **unary_calls) == 50
    # streams: 3 calls, 4 messages each way
    assert m.by("gmesh_calls_total", "code", **mine, method=BIDI) == {"OK": 3}
    assert m.sum("gmesh_stream_messages_sent_total", **mine, method=BIDI) == 12
    assert m.sum("gmesh_stream_messages_received_total", **mine, method=BIDI) == 12
    assert m.sum("gmesh_stream_messages_sent_total", **mine, method=UNARY) == 0
    assert m.sum("gmesh_calls_in_flight", **mine) == 0
    # per endpoint, in its own family: every attempt, each endpoint as its server counted
    per_endpoint = m.by("gmesh_endpoint_attempts_total", "endpoint", service="orders")
    assert per_endpoint == {
        s.address: s.servicer.calls.get("Unary", 0) + s.servicer.calls.get("Bidi", 0)
        for s in mesh.servers.values()
        if s.servicer.calls
    }
    assert m.sum("gmesh_endpoint_failures_total", service="orders") == 6  # NOT_FOUND is the caller's
    assert set(m.by("gmesh_endpoint_healthy", "endpoint", service="orders").values()) == {1}
    assert m.sum("gmesh_endpoint_ejected", service="orders") == 0


async def test_retries_show_as_attempts_under_one_call(mesh: Mesh, door: Door, metrics_server: str) -> None:
    # v2 refuses every call: each call to v2 is retried once on v1
    mesh.servers["v2"].servicer.fail_share = 1.0
    retry = {"attempts": 2, "on": ["UNAVAILABLE"], "backoff": {"base": "1ms", "max": "2ms"}}
    await route(mesh, door, [rule("default", retry=retry)], balancer={"policy": "round_robin"})
    codes = collections.Counter([await unary(door) for _ in range(30)])
    assert codes == {grpc.StatusCode.OK: 30}
    refused = mesh.servers["v2"].servicer.calls.get("Unary", 0)
    assert refused > 0

    m = await scrape(metrics_server)
    mine = {"door": door.name, "service": "orders", "method": UNARY}
    assert m.by("gmesh_calls_total", "code", **mine) == {"OK": 30}
    assert m.by("gmesh_attempts_total", "code", **mine) == {"OK": 30, "UNAVAILABLE": refused}
    assert m.sum("gmesh_retries_total", service="orders") == refused
    assert m.sum("gmesh_retry_budget_refusals_total", service="orders") == 0


async def test_made_up_methods_mint_no_series(
    mesh: Mesh, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path, metrics="127.0.0.1:0")
    n = 10_000
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    try:
        await proxy.catalog.wait_for(lambda s: len(s.endpoints_of("orders")) == 3, timeout=5)
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            await channel.unary_unary(UNARY)(echo_pb2.EchoRequest().SerializeToString(), timeout=10)
            left = iter(range(n))

            async def worker() -> None:
                for i in left:
                    call = channel.unary_unary(f"/gmesh.v1.Echo/Made{i}")
                    try:
                        await call(b"", metadata=(("x-gmesh-service", "orders"),), timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code()] += 1

            await asyncio.gather(*(worker() for _ in range(32)))
        m = await scrape(proxy.info()["metrics"])
    finally:
        await proxy.stop(0)
    assert codes == {grpc.StatusCode.UNIMPLEMENTED: n}
    assert m.by("gmesh_calls_total", "method", door="proxy", service="orders") == {UNARY: 1, "other": n}
    attempts = m.by("gmesh_attempts_total", "method", door="proxy", service="orders")
    assert attempts == {UNARY: 1, "other": n}
    # the whole exposition stays small: no made-up name anywhere
    assert "Made" not in m.text
    assert len(m.text) < 100_000


async def test_telemetry_turns_metrics_off_per_service(mesh: Mesh, door: Door, metrics_server: str) -> None:
    await route(mesh, door, [rule("default")])
    for _ in range(5):
        assert await unary(door) == grpc.StatusCode.OK
    revision = await mesh.put(
        "Telemetry", "quiet-orders", {"service": "orders", "metrics": {"enabled": False}}
    )
    await door.wait(revision)
    for _ in range(7):
        assert await unary(door) == grpc.StatusCode.OK
    m = await scrape(metrics_server)
    assert m.sum("gmesh_calls_total", door=door.name, service="orders", method=UNARY) == 5
    revision = await mesh.put("Telemetry", "quiet-orders", {"service": "orders", "metrics": {}})
    await door.wait(revision)
    for _ in range(3):
        assert await unary(door) == grpc.StatusCode.OK
    m = await scrape(metrics_server)
    assert m.sum("gmesh_calls_total", door=door.name, service="orders", method=UNARY) == 8  # kept counting on


async def test_proxy_serves_metrics_over_http_in_both_formats(
    mesh: Mesh, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path, metrics="127.0.0.1:0")
    try:
        await proxy.catalog.wait_for(lambda s: len(s.endpoints_of("orders")) == 3, timeout=5)
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            from gmesh.v1 import echo_pb2_grpc

            stub = echo_pb2_grpc.EchoStub(channel)
            for _ in range(4):
                await stub.Unary(echo_pb2.EchoRequest(), timeout=10)
        address = proxy.info()["metrics"]
        assert address and address != "127.0.0.1:0"
        kind, text = await asyncio.to_thread(get, f"http://{address}/metrics")
        assert kind.startswith("text/plain")
        m = Scrape(text)
        assert m.sum("gmesh_calls_total", door="proxy", service="orders", method=UNARY, code="OK") == 4
        assert m.sum("process_resident_memory_bytes") > 0  # the process's own metrics come along
        kind, text = await asyncio.to_thread(
            get, f"http://{address}/metrics", "application/openmetrics-text; version=1.0.0"
        )
        assert kind.startswith("application/openmetrics-text")
        families = {f.name: f for f in parse_openmetrics(text)}
        calls = families["gmesh_calls"]
        assert calls.type == "counter"
        assert sum(s.value for s in calls.samples if s.name == "gmesh_calls_total") == 4
        assert families["gmesh_call_duration_seconds"].type == "histogram"
    finally:
        await proxy.stop(0)


async def test_an_ejection_and_its_endpoint_show(mesh: Mesh, door: Door, metrics_server: str) -> None:
    mesh.servers["v2"].servicer.fail_share = 1.0
    outlier = {"consecutiveErrors": 3, "baseEjectionTime": "30s", "maxEjectionPercent": 50}
    await route(mesh, door, [rule("default", backends=split(0, 100))], outlierDetection=outlier)
    for _ in range(3):
        assert await unary(door) == grpc.StatusCode.UNAVAILABLE
    v2 = mesh.servers["v2"].address

    m = await scrape(metrics_server)
    assert m.sum("gmesh_endpoint_ejected", service="orders", endpoint=v2) == 1
    assert m.sum("gmesh_endpoint_ejected", service="orders") == 1
    assert m.sum("gmesh_outlier_ejections_total", service="orders") == 1
    assert m.sum("gmesh_endpoint_failures_total", service="orders", endpoint=v2) == 3


async def test_a_deadline_that_runs_out_counts_as_deadline_exceeded(
    mesh: Mesh, door: Door, metrics_server: str
) -> None:
    await route(mesh, door, [rule("default")])
    for _ in range(3):
        assert await unary(door, delay_ms=2000, timeout=0.2) == grpc.StatusCode.DEADLINE_EXCEEDED
    m = await scrape(metrics_server)
    mine = {"door": door.name, "service": "orders", "method": UNARY}
    # the caller's deadline, passed on to the upstream, runs out there first: not CANCELLED
    assert m.by("gmesh_calls_total", "code", **mine) == {"DEADLINE_EXCEEDED": 3}
    assert m.by("gmesh_attempts_total", "code", **mine) == {"DEADLINE_EXCEEDED": 3}
