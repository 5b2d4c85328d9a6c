"""`gmesh proxy` as a process: a port already taken, a restart while etcd is down, leaving
gracefully, and servers that leave gracefully under load."""

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
from pathlib import Path

import grpc
import grpc.aio
import pytest
from conftest import until

import gmesh
import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.store.embedded import free_port
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


@contextlib.asynccontextmanager
async def proxy_process(
    env: dict[str, str], address: str, *extra: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "proxy", "--listen", address, "--admin", "", "--drain-delay", "0s", *extra,
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)


async def listening(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while b"gmesh proxy listening" not in (line := await proc.stderr.readline()):
            assert line, "proxy exited before listening"


async def echo_once(address: str, timeout: float = 5) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Unary(
            echo_pb2.EchoRequest(message="x"), timeout=timeout
        )
    return str(reply.server)


@pytest.fixture
async def registered(etcd_server: EtcdMember, mesh_keys: MeshKeys) -> AsyncIterator[EchoServer]:
    server = await start_echo_server("up1")
    async with gmesh.register(
        server.address, service="echo", etcd=etcd_server.url, prefix=mesh_keys.prefix,
        handle_sigterm=False, drain_delay=0,
    ):  # fmt: skip
        yield server
    await server.stop(None)


async def test_a_second_proxy_on_a_busy_port_fails_clearly_and_the_first_serves_on(
    registered: EchoServer, gmesh_env: dict[str, str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with proxy_process(gmesh_env, address) as first:
        await listening(first)
        for extra in ((), ("--workers", "2")):
            second = await asyncio.create_subprocess_exec(
                *GMESH, "proxy", "--listen", address, "--admin", "", *extra,
                env=gmesh_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(second.communicate(), 30)
            assert second.returncode == 1, err.decode()
            lines = [line for line in err.decode().splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and f"cannot listen on {address}" in lines[0], err.decode()
            assert "in use" in lines[0]
        for _ in range(20):  # every new connection still reaches the first proxy, which serves
            assert await echo_once(address) == "up1"
        assert first.returncode is None


async def test_two_worker_groups_never_share_a_port(
    registered: EchoServer, gmesh_env: dict[str, str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with proxy_process(gmesh_env, address, "--workers", "2") as group:
        await listening(group)
        second = await asyncio.create_subprocess_exec(
            *GMESH, "proxy", "--listen", address, "--admin", "", "--workers", "2",
            env=gmesh_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 1 and "another `gmesh proxy --workers` already serves it" in err.decode()
        single = await asyncio.create_subprocess_exec(
            *GMESH, "proxy", "--listen", address, "--admin", "",
            env=gmesh_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(single.communicate(), 30)
        assert single.returncode == 1 and "in use" in err.decode()
        assert await echo_once(address) == "up1"


async def test_restarted_with_etcd_down_it_serves_its_snapshot_within_a_second(
    etcd_member: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    server = await start_echo_server("up1")
    snapshot = tmp_path / "snapshot.json"
    env = {
        **os.environ,
        "GMESH_ETCD": etcd_member.url,
        "GMESH_PREFIX": mesh_keys.prefix,
        "GMESH_DATA_DIR": str(tmp_path / "data"),
    }
    address = f"127.0.0.1:{free_port()}"
    registration = gmesh.register(
        server.address, service="echo", etcd=etcd_member.url, prefix=mesh_keys.prefix,
        handle_sigterm=False, drain_delay=0, ttl=60,
    )  # fmt: skip
    await registration.__aenter__()
    try:
        async with proxy_process(env, address, "--snapshot-file", str(snapshot)) as first:
            await listening(first)
            assert await echo_once(address) == "up1"
            key = mesh_keys.endpoint("echo", server.address)
            await until(
                lambda: snapshot.exists() and key in snapshot.read_text(), 5, "the snapshot persisted"
            )
        etcd_member.kill()
        started = time.monotonic()
        async with proxy_process(env, address, "--snapshot-file", str(snapshot)) as second:
            # a client that tries to connect every 10 ms (grpc's default waits a second between
            # tries: that would measure the client, not the proxy)
            quick = [("grpc.initial_reconnect_backoff_ms", 10), ("grpc.min_reconnect_backoff_ms", 10),
                     ("grpc.max_reconnect_backoff_ms", 10)]  # fmt: skip
            async with grpc.aio.insecure_channel(address, options=quick) as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                # wait_for_ready: keep trying while the port is not accepting yet (never a failure)
                reply = await stub.Unary(echo_pb2.EchoRequest(), timeout=10, wait_for_ready=True)
            took = time.monotonic() - started
            assert reply.server == "up1"
            assert second.returncode is None
        print(f"first call answered {took * 1000:.0f} ms after the proxy process started")
        assert took <= 1.0, f"first call {took:.2f}s after start"
    finally:
        with contextlib.suppress(Exception):
            await registration.deregister(drain=False)
        await server.stop(None)


async def test_a_proxy_without_etcd_or_snapshot_accepts_no_call_it_cannot_route(
    registered: EchoServer, gmesh_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**gmesh_env, "GMESH_ETCD": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    address = f"127.0.0.1:{free_port()}"
    async with proxy_process(env, address, "--snapshot-file", str(tmp_path / "none.json")) as proc:
        await listening(proc)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Unary(echo_pb2.EchoRequest(), timeout=1.0, wait_for_ready=True)
        # the call waited for the proxy to accept it and ran out of time: it was never refused
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


SERVER = """
import asyncio, sys
from gmesh.testing.echo import _main
asyncio.run(_main(sys.argv[1:]))
"""


async def test_a_server_leaving_on_sigterm_under_load_fails_no_call(
    gmesh_env: dict[str, str], mesh_keys: MeshKeys, etcd_server: EtcdMember
) -> None:
    procs = []
    for i in range(3):
        proc = await asyncio.create_subprocess_exec(
            *GMESH[:2], "-m", "gmesh.testing.echo", "--service", "echo", "--name", f"up{i}",
            env=gmesh_env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
    try:
        for proc in procs:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                while b"registered" not in await proc.stdout.readline():
                    pass
        outcomes: collections.Counter[str] = collections.Counter()
        stop = asyncio.Event()
        async with gmesh.aio.channel(
            "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix
        ) as channel:
            outbound = await channel.ready_outbound()
            await outbound.catalog.wait_for(lambda s: len(s.endpoints_of("echo")) == 3, timeout=10)
            stub = echo_pb2_grpc.EchoStub(channel)

            async def load() -> None:
                while not stop.is_set():
                    try:
                        reply = await stub.Unary(echo_pb2.EchoRequest(delay_ms=10), timeout=5)
                        outcomes[reply.server] += 1
                    except grpc.aio.AioRpcError as exc:
                        outcomes[exc.code().name] += 1

            workers = [asyncio.ensure_future(load()) for _ in range(16)]
            await until(lambda: sum(outcomes.values()) >= 300, 20, "steady load")
            procs[0].send_signal(signal.SIGTERM)  # no retries configured: only the drain protects
            await asyncio.wait_for(procs[0].wait(), 15)
            after = sum(outcomes.values())
            await until(lambda: sum(outcomes.values()) >= after + 300, 20, "load after it left")
            stop.set()
            await asyncio.gather(*workers)
        assert procs[0].returncode == -signal.SIGTERM  # it died of SIGTERM, as it would have
        assert set(outcomes) == {"up0", "up1", "up2"}, outcomes  # not one failure of any kind
        assert outcomes["up0"] > 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sigterm_turns_the_proxy_not_serving_then_it_serves_the_drain_delay(
    registered: EchoServer, gmesh_env: dict[str, str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    admin = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "proxy", "--listen", address, "--admin", admin, "--drain-delay", "1s",
        env=gmesh_env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await listening(proc)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(admin) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await until_serving(health, health_pb2.HealthCheckResponse.SERVING)
            listed = json.loads(await cli(gmesh_env, "get", "proxies", "-o", "json"))
            assert [r["address"] for r in listed] == [address]
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await until_serving(health, health_pb2.HealthCheckResponse.NOT_SERVING)
            assert await echo_once(address) == "up1"  # still serving during the drain delay
            assert address not in await cli(gmesh_env, "get", "proxies")  # its record left first
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert time.monotonic() - sent >= 1.0  # it waited the drain delay before closing
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def until_serving(health: object, status: int) -> None:
    from grpc_health.v1 import health_pb2

    async with asyncio.timeout(10):
        while True:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)  # type: ignore[attr-defined]
            if reply.status == status:
                return
            await asyncio.sleep(0.02)


async def cli(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *GMESH, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()
