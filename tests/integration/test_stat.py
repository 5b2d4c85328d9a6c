"""`gmesh stat` and `gmesh top` against a known workload through two `gmesh proxy` processes and one
channel process (this one): every count exact, from what each process published to etcd."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from conftest import Mesh, rule, split

import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.outbound import stack
from gmesh.store.embedded import free_port
from gmesh.store.etcd import Store
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]
UNARY = "/gmesh.v1.Echo/Unary"


@contextlib.asynccontextmanager
async def proxy(env: dict[str, str]) -> AsyncIterator[str]:
    address = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "proxy", "--listen", address, "--admin", "", "--drain-delay", "0s",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"gmesh proxy listening" not in (line := await proc.stderr.readline()):
                assert line, "proxy exited"
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


async def calls(stub: Any, n: int, failing: int = 0) -> collections.Counter[str]:
    codes: collections.Counter[str] = collections.Counter()
    for i in range(n):
        request = echo_pb2.EchoRequest(fail_code=14 if i < failing else 0)  # 14: UNAVAILABLE
        try:
            await stub.Unary(request, timeout=10)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
    return codes


async def started(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """A CLI command, once it said it took its first reading."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while b"measuring for" not in (line := await proc.stderr.readline()):
            assert line, "the command exited before measuring"
    return proc


def served(mesh: Mesh) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for name, server in mesh.servers.items():
        counts[f"orders/{name[:2]}"] += server.servicer.calls.get("Unary", 0)
    return dict(counts)


async def test_stat_and_top_match_a_workload_over_two_proxies_and_a_channel(
    mesh: Mesh, store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, gmesh_env: dict[str, str]
) -> None:
    await mesh.put(
        "Route", "orders", {"service": "orders", "rules": [rule("default", backends=split(50, 50))]}
    )
    async with (
        proxy(gmesh_env) as first,
        proxy(gmesh_env) as second,
        grpc.aio.insecure_channel(first) as a,
        grpc.aio.insecure_channel(second) as b,
        gmesh.aio.channel("gmesh:///orders", etcd=etcd_server.url, prefix=mesh_keys.prefix) as c,
    ):  # fmt: skip
        stubs = [echo_pb2_grpc.EchoStub(ch) for ch in (a, b, c)]
        for stub in stubs:  # each process calls once and publishes: known before the window
            await stub.Unary(echo_pb2.EchoRequest(), timeout=10, wait_for_ready=True)
        deadline = asyncio.get_running_loop().time() + 10
        while len((await store.get_prefix(mesh_keys.stats_of("orders")))[0]) < 3:
            assert asyncio.get_running_loop().time() < deadline, "3 processes never published"
            await asyncio.sleep(0.05)
        publisher = stack.running()[0].publisher
        writes, since = publisher.writes, asyncio.get_running_loop().time()
        before = served(mesh)

        stat = await started([*GMESH, "stat", "orders", "--window", "5s", "-o", "json"], gmesh_env)
        codes = await asyncio.gather(calls(stubs[0], 20, failing=3), calls(stubs[1], 30), calls(stubs[2], 25))
        out, _ = await asyncio.wait_for(stat.communicate(), 30)
        assert stat.returncode == 0
        assert [dict(c) for c in codes] == [{"OK": 17, "UNAVAILABLE": 3}, {"OK": 30}, {"OK": 25}]
        window = {k: v - before.get(k, 0) for k, v in served(mesh).items()}

        doc = json.loads(out)
        [orders] = doc["services"]
        assert orders["service"] == "orders"
        assert orders["calls"] == 75 and orders["failures"] == 3
        assert orders["codes"] == {"OK": 72, "UNAVAILABLE": 3}
        assert abs(orders["successRate"] - 72 / 75) < 1e-6
        assert orders["doors"] == {"proxy": 50, "channel": 25}
        by_backend = {r["backend"]: r["calls"] for r in orders["routes"]}
        assert by_backend == {k: v for k, v in window.items() if v}  # what each subset's servers answered
        assert {r["route"] for r in orders["routes"]} == {"default"}
        [method] = orders["methods"]
        assert method["method"] == UNARY and method["calls"] == 75
        assert 0 < orders["p50Ms"] <= orders["p95Ms"] <= orders["p99Ms"] < 1000
        assert orders["rps"] > 0
        # this process (the channel's) wrote its counters at most once a second
        elapsed = asyncio.get_running_loop().time() - since
        assert 1 <= publisher.writes - writes <= elapsed / publisher.INTERVAL + 1

        top = await started([*GMESH, "top", "orders", "--once", "--interval", "3s"], gmesh_env)
        await asyncio.gather(calls(stubs[0], 15), calls(stubs[2], 15))
        out, _ = await asyncio.wait_for(top.communicate(), 30)
        assert top.returncode == 0
        frame = out.decode()
        assert UNARY in frame and "orders/v1" in frame and "orders/v2" in frame
        assert "success 100.00%" in frame
