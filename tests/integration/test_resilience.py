"""Balancers, health checks, outlier ejection, circuit breakers and stream age — real etcd, real servers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from conftest import start_proxy, until

import gmesh
import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.outbound import stack
from gmesh.store.etcd import Store
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

DOORS = ("proxy", "channel")


@dataclass
class Fleet:
    """Echo servers registered as mesh service `svc`, by name."""

    store: Store
    keys: MeshKeys
    servers: dict[str, EchoServer] = field(default_factory=dict)
    registrations: list[Any] = field(default_factory=list)

    async def add(self, name: str, *, labels: dict[str, str] | None = None, **options: Any) -> EchoServer:
        server = await start_echo_server(name)
        reg = gmesh.register(
            server.address, service="svc", labels=labels or {}, store=self.store, prefix=self.keys.prefix,
            handle_sigterm=False, drain_delay=0, **options,
        )  # fmt: skip
        await reg.__aenter__()
        self.servers[name] = server
        self.registrations.append(reg)
        return server

    async def service(self, **spec: Any) -> int:
        doc = {"kind": "Service", "metadata": {"name": "svc"}, "spec": spec}
        return await self.store.put(self.keys.config("Service", "svc"), json.dumps(doc).encode())

    def counts(self, method: str = "Unary") -> dict[str, int]:
        return {name: s.servicer.calls.get(method, 0) for name, s in self.servers.items()}

    async def close(self) -> None:
        for reg in self.registrations:
            await reg.__aexit__(None, None, None)
        for server in self.servers.values():
            await server.stop(None)


@pytest.fixture
async def fleet(store: Store, mesh_keys: MeshKeys) -> AsyncIterator[Fleet]:
    running = Fleet(store, mesh_keys)
    yield running
    await running.close()


@contextlib.asynccontextmanager
async def door(
    kind: str, etcd: EtcdMember, keys: MeshKeys, tmp_path: Path, revision: int, endpoints: int, **caller: Any
) -> AsyncIterator[echo_pb2_grpc.EchoStub]:
    """A stub to `svc` through the proxy or a channel, once `revision` and enough endpoints are in use."""

    def ready(s: Any) -> bool:
        return bool(s.revision >= revision and len(s.endpoints_of("svc")) >= endpoints)

    if kind == "proxy":
        proxy = await start_proxy(etcd, keys, tmp_path, **caller)
        try:
            await proxy.catalog.wait_for(ready, timeout=5)
            async with grpc.aio.insecure_channel(proxy.address) as ch:
                yield echo_pb2_grpc.EchoStub(ch)
        finally:
            await proxy.stop(0)
    else:
        async with gmesh.aio.channel("gmesh:///svc", etcd=etcd.url, prefix=keys.prefix, **caller) as ch:
            await (await ch.ready_outbound()).catalog.wait_for(ready, timeout=5)
            yield echo_pb2_grpc.EchoStub(ch)


async def calls(
    stub: echo_pb2_grpc.EchoStub, n: int, concurrency: int = 16, metadata: Any = lambda i: ()
) -> collections.Counter[str]:
    """n unary calls: who served them ("" + code name for failures)."""
    served: collections.Counter[str] = collections.Counter()
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            try:
                reply = await stub.Unary(echo_pb2.EchoRequest(), metadata=metadata(i), timeout=10)
                served[reply.server] += 1
            except grpc.aio.AioRpcError as exc:
                served[exc.code().name] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


@pytest.mark.parametrize("kind", DOORS)
async def test_round_robin_exact_and_weighted_within_2_percent(
    kind: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    for name, weight in (("a", 1), ("b", 2), ("c", 7)):
        await fleet.add(name, weight=weight)
    revision = await fleet.service(balancer={"policy": "round_robin"})
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 3) as stub:
        assert await calls(stub, 3000) == {"a": 1000, "b": 1000, "c": 1000}
        revision = await fleet.service(balancer={"policy": "weighted_round_robin"})
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 3) as stub:
        served = await calls(stub, 10_000, concurrency=32)
    for name, weight in (("a", 0.1), ("b", 0.2), ("c", 0.7)):
        assert abs(served[name] / 10_000 - weight) <= 0.02, served


@pytest.mark.parametrize("policy", ["least_request", "peak_ewma"])
@pytest.mark.parametrize("kind", DOORS)
async def test_load_aware_balancers_spare_a_10x_slower_endpoint(
    kind: str, policy: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    for name in ("fast1", "fast2", "slow"):
        await fleet.add(name)
    fleet.servers["fast1"].servicer.extra_delay = fleet.servers["fast2"].servicer.extra_delay = 0.005
    fleet.servers["slow"].servicer.extra_delay = 0.050
    revision = await fleet.service(balancer={"policy": policy})
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 3) as stub:
        served = await calls(stub, 900, concurrency=12)
    assert sum(served.values()) == 900 and set(served) <= {"fast1", "fast2", "slow"}
    assert served["slow"] < 300, served  # round robin would give it exactly a third
    assert served["slow"] < served["fast1"] / 2 and served["slow"] < served["fast2"] / 2, served


@pytest.mark.parametrize("kind", DOORS)
async def test_ring_hash_keeps_keys_and_moves_few_when_an_endpoint_joins(
    kind: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    for i in range(10):
        await fleet.add(f"e{i}")
    revision = await fleet.service(balancer={"policy": "ring_hash", "hashKey": "x-user-id"})
    keys = [f"user-{i}" for i in range(2000)]

    async def owners(stub: echo_pb2_grpc.EchoStub) -> dict[str, str]:
        found: dict[str, str] = {}

        async def one(key: str) -> None:
            reply = await stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-user-id", key),), timeout=10)
            found[key] = reply.server

        for start in range(0, len(keys), 100):
            await asyncio.gather(*(one(k) for k in keys[start : start + 100]))
        return found

    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 10) as stub:
        before = await owners(stub)
        assert await owners(stub) == before, "a key moved with no change"
        assert len(set(before.values())) == 10
        await fleet.add("e10")
        deadline = time.monotonic() + 5
        while True:
            after = await owners(stub)
            if "e10" in after.values() or time.monotonic() > deadline:
                break
    moved = sum(1 for k in keys if after[k] != before[k])
    assert all(after[k] == "e10" for k in keys if after[k] != before[k]), "keys moved between old endpoints"
    assert 0.03 < moved / len(keys) <= 0.15, moved


@pytest.mark.parametrize("kind", DOORS)
async def test_failing_endpoint_is_ejected_then_probed_back(
    kind: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    for name in ("a", "b", "bad"):
        await fleet.add(name)
    bad = fleet.servers["bad"].servicer
    bad.fail_share = 1.0
    revision = await fleet.service(
        balancer={"policy": "round_robin"},
        outlierDetection={"consecutiveErrors": 5, "baseEjectionTime": "1s", "maxEjectionPercent": 50},
    )
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 3) as stub:
        served = await calls(stub, 60, concurrency=1)
        assert served["UNAVAILABLE"] == 5, served  # exactly the 5 that trip the detector
        ejected_at = bad.calls["Unary"]
        started = time.monotonic()
        (outbound,) = stack.running()  # this process's view (one stack: one mesh, one loop)
        back_at = outbound.mesh.states.get("svc", fleet.servers["bad"].address).ejected_until
        during = await calls(stub, 200, concurrency=4)
        assert bad.calls["Unary"] == ejected_at and "UNAVAILABLE" not in during, (
            "traffic reached it while ejected"
        )
        # Calls go on; once the ejection time (1 s) is over it gets one again (and, failing, is
        # ejected again) — not before.
        while bad.calls["Unary"] == ejected_at:
            assert time.monotonic() - started < 3, "never probed back after the ejection time"
            failed = (await calls(stub, 1, concurrency=1)).get("UNAVAILABLE", 0)
            assert failed == bad.calls["Unary"] - ejected_at, "a failure that was not the probe"
        assert back_at > started and time.monotonic() >= back_at, "probed back before its ejection ended"


@pytest.mark.parametrize("kind", DOORS)
async def test_breaker_caps_concurrency_and_rejects_fast(
    kind: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    server = await fleet.add("only")
    revision = await fleet.service(circuitBreaker={"maxRequests": 50, "maxPending": 0})
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 1) as stub:
        await stub.Unary(echo_pb2.EchoRequest(), timeout=5)  # connected before the burst
        server.servicer.extra_delay = 2.0

        async def one() -> str:
            try:
                await stub.Unary(echo_pb2.EchoRequest(), timeout=10)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"

        burst = [asyncio.ensure_future(one()) for _ in range(200)]
        await until(lambda: server.servicer.active == 50, 5, "50 calls in flight")
        # While the breaker is full, each further call is refused at once.
        took = []
        for _ in range(20):
            started = time.perf_counter()
            outcome = await one()
            took.append(time.perf_counter() - started)
            assert outcome.startswith("UNAVAILABLE") and "maxRequests" in outcome, outcome
        results = collections.Counter(r.partition(":")[0] for r in await asyncio.gather(*burst))
    assert server.servicer.max_active <= 50
    assert results == {"OK": 50, "UNAVAILABLE": 150}, results
    assert sorted(took)[10] < 0.005, f"median refusal {sorted(took)[10] * 1000:.2f} ms"


@pytest.mark.parametrize("kind", DOORS)
async def test_not_serving_health_check_takes_an_endpoint_out_within_two_intervals(
    kind: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    for name in ("a", "b", "sick"):
        await fleet.add(name)
    revision = await fleet.service(
        balancer={"policy": "round_robin"},
        healthCheck={"interval": "500ms", "timeout": "200ms", "unhealthyThreshold": 1, "healthyThreshold": 1},
    )
    sick = fleet.servers["sick"]
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 3) as stub:
        assert (await calls(stub, 30, concurrency=1))["sick"] == 10
        await sick.set_serving(False)
        flipped = time.monotonic()
        while True:
            before = sick.servicer.calls["Unary"]
            await calls(stub, 6, concurrency=1)
            if sick.servicer.calls["Unary"] == before:
                break
            assert time.monotonic() - flipped < 1.0, "still picked two intervals after NOT_SERVING"
        assert (await calls(stub, 30, concurrency=1)).get("sick", 0) == 0
        await sick.set_serving(True)
        deadline = time.monotonic() + 3
        while (await calls(stub, 6, concurrency=1)).get("sick", 0) == 0:
            assert time.monotonic() < deadline, "never taken back after SERVING again"


@pytest.mark.parametrize("kind", DOORS)
async def test_zone_aware_prefers_the_callers_zone_and_spills_over(
    kind: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    for name, zone in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")):
        await fleet.add(name, zone=zone)
    revision = await fleet.service(
        balancer={"policy": "round_robin", "zoneAware": {"minHealthyPercent": 60}},
        outlierDetection={"consecutiveErrors": 1, "baseEjectionTime": "30s", "maxEjectionPercent": 50},
    )
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 4, zone="a") as stub:
        assert await calls(stub, 100) == {"a1": 50, "a2": 50}
        fleet.servers["a1"].servicer.fail_share = 1.0  # a1 gets ejected: zone a is 50% usable < 60%
        served = await calls(stub, 100, concurrency=1)
        assert served["UNAVAILABLE"] == 1, served
        spilled = await calls(stub, 90)
    assert spilled == {"a2": 30, "b1": 30, "b2": 30}, spilled


async def test_kill_9_of_one_of_three_under_load_with_retries(
    store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, tmp_path: Path, gmesh_env: dict[str, str]
) -> None:
    procs = []
    for i in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "gmesh.testing.echo", "--name", f"p{i}", "--service", "svc",
            "--ttl", "30", env=gmesh_env, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
    try:
        route = {"service": "svc", "rules": [{"name": "default", "retry": {
            "attempts": 3, "on": ["UNAVAILABLE"], "backoff": {"base": "5ms", "max": "20ms"}}}]}  # fmt: skip
        doc = {"kind": "Route", "metadata": {"name": "svc"}, "spec": route}
        revision = await store.put(mesh_keys.config("Route", "svc"), json.dumps(doc).encode())
        async with gmesh.aio.channel("gmesh:///svc", etcd=etcd_server.url, prefix=mesh_keys.prefix) as ch:
            outbound = await ch.ready_outbound()
            await outbound.catalog.wait_for(
                lambda s: s.revision >= revision and len(s.endpoints_of("svc")) == 3, timeout=20
            )
            stub = echo_pb2_grpc.EchoStub(ch)
            codes: collections.Counter[str] = collections.Counter()
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    try:
                        await stub.Unary(echo_pb2.EchoRequest(), timeout=5)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1

            workers = [asyncio.ensure_future(load()) for _ in range(16)]
            await until(lambda: codes["OK"] >= 500, 10, "steady load")
            os.kill(procs[0].pid, signal.SIGKILL)
            killed_at = codes.total()
            await until(lambda: codes.total() >= killed_at + 3000, 30, "load after the kill")
            stop.set()
            await asyncio.gather(*workers)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    total = codes.total()
    assert codes["OK"] / total >= 0.999, codes


@pytest.mark.parametrize("kind", DOORS)
async def test_a_stream_ends_cleanly_at_its_max_age(
    kind: str, fleet: Fleet, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    await fleet.add("only")
    revision = await fleet.service(maxStreamAge="1s")
    async with door(kind, etcd_server, mesh_keys, tmp_path, revision, 1) as stub:
        call = stub.Bidi(timeout=10)
        started = time.monotonic()
        received: list[str] = []

        async def ping_until_the_end() -> None:
            for i in range(100):
                try:
                    await call.write(echo_pb2.EchoRequest(message=f"m{i}"))
                except asyncio.InvalidStateError:
                    return  # the proxy ended the call between two messages
                received.append((await call.read()).message)
                await asyncio.sleep(0.05)

        with contextlib.suppress(grpc.aio.AioRpcError):
            await ping_until_the_end()
        code, details, trailers = await call.code(), await call.details(), await call.trailing_metadata()
    took = time.monotonic() - started
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "maximum age" in details
    assert ("x-gmesh-stream-max-age", "1") in tuple(trailers or ())
    assert received == [f"m{i}" for i in range(len(received))] and len(received) >= 10
    assert 0.9 <= took < 2.5, took
