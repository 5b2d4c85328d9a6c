"""The data path under load and under change: many streams, long streams, endpoints leaving."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from conftest import start_proxy

import gmesh
import gmesh.aio
from gmesh.discovery.catalog import Catalog
from gmesh.discovery.keys import MeshKeys
from gmesh.proxy.run import RunningProxy
from gmesh.store.etcd import Store
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


async def test_1000_concurrent_streams_through_one_proxy(proxy: RunningProxy) -> None:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        opened = asyncio.Event()
        started = 0

        async def one(i: int) -> list[str]:
            nonlocal started
            call = stub.Bidi(timeout=60)
            await call.write(echo_pb2.EchoRequest(message=f"{i}-a"))
            first = await call.read()
            started += 1
            if started == 1000:
                opened.set()
            await opened.wait()  # all 1000 are open at the same time
            await call.write(echo_pb2.EchoRequest(message=f"{i}-b"))
            second = await call.read()
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            return [first.message, second.message]

        results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert results == [[f"{i}-a", f"{i}-b"] for i in range(1000)]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def proxy_process(
    env: dict[str, str], *extra: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    from gmesh.store.embedded import free_port

    address = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "proxy", "--listen", address, "--admin", "", "--drain-timeout", "2s", *extra,
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"gmesh proxy listening" not in (line := await proc.stderr.readline()):
                assert line, "proxy exited before listening"
        yield proc, address
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)


async def test_bidi_stream_of_100000_messages_keeps_proxy_memory_bounded(
    upstream: EchoServer, gmesh_env: dict[str, str]
) -> None:
    total, payload = 100_000, b"m" * 1024  # 100 MB each way through the proxy
    async with proxy_process(gmesh_env) as (proc, address), grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Unary(echo_pb2.EchoRequest(), timeout=10)  # warm: connections, handlers
        before = rss_kib(proc.pid)
        peak = before

        async def requests() -> AsyncIterator[Any]:
            for i in range(total):
                yield echo_pb2.EchoRequest(payload=payload, message=str(i))

        received = 0
        async for response in stub.Bidi(requests(), timeout=300):
            assert response.index == received
            received += 1
            if received % 10_000 == 0:
                peak = max(peak, rss_kib(proc.pid))
        assert received == total
    growth_mib = (peak - before) / 1024
    print(f"proxy RSS {before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB over {total} messages")
    assert growth_mib < 40, f"proxy memory grew by {growth_mib:.1f} MiB: messages are being buffered"


async def open_door(
    stack: contextlib.AsyncExitStack,
    door: str,
    etcd: EtcdMember,
    keys: MeshKeys,
    tmp_path: Path,
    *,
    endpoints: int,
) -> tuple[grpc.aio.Channel, Catalog]:
    """A channel to `echo` through a fresh proxy or in-process, and the catalog that door routes
    by, once it sees `endpoints` endpoints."""
    if door == "proxy":
        proxy = await start_proxy(etcd, keys, tmp_path)
        stack.push_async_callback(proxy.stop, 0)
        channel: grpc.aio.Channel = await stack.enter_async_context(grpc.aio.insecure_channel(proxy.address))
        catalog = proxy.catalog
    else:
        mesh = await stack.enter_async_context(
            gmesh.aio.channel("gmesh:///echo", etcd=etcd.url, prefix=keys.prefix)
        )
        channel, catalog = mesh, (await mesh.ready_outbound()).catalog
    await catalog.wait_for(lambda s: len(s.endpoints_of("echo")) == endpoints, timeout=5)
    return channel, catalog


async def steady_load(
    call: Callable[[], Awaitable[Any]],
    stop: asyncio.Event,
    concurrency: int = 16,
    failed_at: list[float] | None = None,
) -> collections.Counter[str]:
    """Calls back to back from `concurrency` workers until `stop`; outcome counts (and the
    start time of every failed call in `failed_at`)."""
    outcomes: collections.Counter[str] = collections.Counter()

    async def worker() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await call()
                outcomes[f"ok:{response.server}"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                if failed_at is not None:
                    failed_at.append(started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


@pytest.mark.parametrize("door", ["proxy", "channel"])
async def test_graceful_removal_under_load_fails_no_call(
    door: str, store: Store, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    servers = [await start_echo_server(f"up{i}") for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        regs = [
            await stack.enter_async_context(
                gmesh.register(
                    s.address,
                    service="echo",
                    store=store,
                    prefix=mesh_keys.prefix,
                    handle_sigterm=False,
                    drain_delay=0,
                )
            )
            for s in servers
        ]
        channel, catalog = await open_door(stack, door, etcd_server, mesh_keys, tmp_path, endpoints=3)
        stub = echo_pb2_grpc.EchoStub(channel)
        stop = asyncio.Event()
        load = asyncio.create_task(
            steady_load(lambda: stub.Unary(echo_pb2.EchoRequest(delay_ms=20), timeout=5), stop)
        )
        await asyncio.sleep(1.0)  # steady load before the change
        # Graceful removal, as a server does it: withdraw from discovery; once the front
        # door routes without it, serve on for a drain delay (calls already sent may still
        # be in transit: a server that stops at once refuses them with CANCELLED), then stop
        # with a grace period for calls still running.
        await regs[0].deregister()
        await catalog.wait_for(lambda s: len(s.endpoints_of("echo")) == 2, timeout=5)
        await asyncio.sleep(0.2)  # the server's drain delay, part of the scenario
        await servers[0].stop(grace=2.0)
        await asyncio.sleep(1.0)
        stop.set()
        outcomes = await load
    for s in servers[1:]:
        await s.stop(None)
    print(door, dict(outcomes))
    assert set(outcomes) == {"ok:up0", "ok:up1", "ok:up2"}  # no failure of any kind
    assert outcomes["ok:up1"] > 50 and outcomes["ok:up2"] > 50


@pytest.mark.slow
@pytest.mark.parametrize("door", ["proxy", "channel"])
async def test_kill_9_of_one_of_three_fails_only_calls_in_flight_on_it(
    door: str, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path, gmesh_env: dict[str, str]
) -> None:
    procs = []
    for i in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "gmesh.testing.echo", "--name", f"up{i}", "--service", "echo",
            "--ttl", "3", env=gmesh_env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while b"registered" not in (line := await proc.stdout.readline()):
                assert line, "upstream exited"
        procs.append(proc)
    concurrency, delay = 30, 0.2
    async with contextlib.AsyncExitStack() as stack:
        for proc in procs:
            stack.callback(lambda p=proc: p.returncode is None and p.kill())
        channel, catalog = await open_door(stack, door, etcd_server, mesh_keys, tmp_path, endpoints=3)
        stub = echo_pb2_grpc.EchoStub(channel)
        stop = asyncio.Event()
        request = echo_pb2.EchoRequest(delay_ms=int(delay * 1000))
        failed_at: list[float] = []
        load = asyncio.create_task(
            steady_load(lambda: stub.Unary(request, timeout=5), stop, concurrency, failed_at)
        )
        await asyncio.sleep(1.5)  # steady load before the kill
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await procs[0].wait()
        # The lease expires (TTL 3 s) and the dead endpoint leaves the mesh; load goes on meanwhile.
        await catalog.wait_for(lambda s: len(s.endpoints_of("echo")) == 2, timeout=10)
        await asyncio.sleep(0.5)  # and a little after
        stop.set()
        outcomes = await load
    print(
        door, dict(outcomes), f"failed calls started {[round(t - killed, 3) for t in failed_at]}s after kill"
    )
    # Only calls already on the dead endpoint fail: none started after its connection was
    # seen failing (a few ms after the kill; 100 ms allowed for a busy loop).
    assert failed_at, "the kill should have failed the calls in flight on it"
    assert max(failed_at) - killed < 0.1
    assert len(failed_at) <= concurrency
    assert outcomes["ok:up1"] > 100 and outcomes["ok:up2"] > 100
    for proc in procs:
        await proc.wait()
