"""Running the proxy: bad input, the admin port, its own record, SIGTERM drain, workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from conftest import BIG_OPTIONS, start_proxy, until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_load import GMESH, proxy_process

from gmesh.discovery.keys import MeshKeys
from gmesh.proxy.run import RunningProxy
from gmesh.testing.echo import EchoServer
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import admin_pb2, admin_pb2_grpc, echo_pb2, echo_pb2_grpc


async def test_oversized_message_is_refused_and_the_proxy_keeps_serving(
    upstream: EchoServer, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path, max_message_bytes=1024 * 1024)
    try:
        await proxy.catalog.wait_for(lambda s: bool(s.endpoints_of("echo")), timeout=5)
        async with grpc.aio.insecure_channel(proxy.address, options=BIG_OPTIONS) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Unary(echo_pb2.EchoRequest(payload=b"x" * 2 * 1024 * 1024), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (
                await stub.Unary(echo_pb2.EchoRequest(message="still here"), timeout=5)
            ).message == "still here"
    finally:
        await proxy.stop(0)


async def test_malformed_frames_do_not_hurt_the_proxy(proxy: RunningProxy) -> None:
    host, port = proxy.address.rsplit(":", 1)
    garbage = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\xff\x01\x00\x00\x00\x01junk" * 10,
        bytes(range(256)) * 64,
    ]
    for payload in garbage:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(payload)
        await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            async with asyncio.timeout(2):
                await reader.read(1024)  # the proxy answers (GOAWAY) or hangs up
        writer.close()
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        response = await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(message="ok"), timeout=5)
    assert response.message == "ok"


CLIENT = """
import asyncio, grpc.aio, sys
from gmesh.v1 import echo_pb2, echo_pb2_grpc
async def main():
    async with grpc.aio.insecure_channel(sys.argv[1]) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        if sys.argv[2] == "server_stream":
            call = stub.ServerStream(echo_pb2.EchoRequest(count=1000000, delay_ms=10), timeout=60)
        else:
            call = stub.Bidi(timeout=60)
        for i in range(1000000):
            if sys.argv[2] == "bidi":
                await call.write(echo_pb2.EchoRequest(message=str(i), delay_ms=10))
            await call.read()
            if i == 5:
                print("streaming", flush=True)
asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["server_stream", "bidi"])
async def test_client_that_disappears_mid_stream(
    kind: str, proxy: RunningProxy, upstream: EchoServer
) -> None:
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-c", CLIENT, proxy.address, kind, stdout=asyncio.subprocess.PIPE
    )
    assert client.stdout is not None
    async with asyncio.timeout(20):
        assert b"streaming" in await client.stdout.readline()
    before = len(upstream.servicer.cancelled_at)
    client.send_signal(signal.SIGKILL)
    await client.wait()
    # The upstream call ends: cancelled, or (bidi) half-closed when the dead client's
    # request stream ended, whichever the proxy learned first.
    await until(lambda: upstream.servicer.active == 0, 5, "the upstream call ending after the client died")
    if kind == "server_stream":
        assert len(upstream.servicer.cancelled_at) == before + 1
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        assert (
            await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(message="x"), timeout=5)
        ).message == "x"


async def test_admin_port_health_reflection_and_config_dump(
    proxy: RunningProxy, upstream: EchoServer
) -> None:
    assert proxy.admin is not None
    async with grpc.aio.insecure_channel(proxy.admin.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        listed = [s.name async for r in stream for s in r.list_services_response.service]
        assert "gmesh.v1.Admin" in listed and "grpc.health.v1.Health" in listed

        dump = json.loads(
            (
                await admin_pb2_grpc.AdminStub(channel).ConfigDump(admin_pb2.ConfigDumpRequest(), timeout=5)
            ).json
        )
    assert dump["revision"] == proxy.catalog.snapshot.revision > 0
    assert dump["connected"] is True and dump["source"] == "etcd"
    echo = dump["services"]["echo"]
    assert [e["address"] for e in echo["endpoints"]] == [upstream.address]
    assert echo["grpcServices"] == ["gmesh.v1.Echo"] and echo["chain"] == [
        "tap",
        "metrics",
        "metrics-attempts",
        "balance",
        "forward",
    ]
    assert dump["proxy"]["address"] == proxy.address


async def cli(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *GMESH, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_sigterm_drains_calls_in_flight_and_get_proxies_lists_it(
    upstream: EchoServer, gmesh_env: dict[str, str]
) -> None:
    async with proxy_process(gmesh_env) as (proc, address), grpc.aio.insecure_channel(address) as channel:
        listed = await cli(gmesh_env, "get", "proxies")
        row = next(line.split() for line in listed.splitlines() if address in line)
        assert row[1] == address and int(row[4]) == proc.pid
        stub = echo_pb2_grpc.EchoStub(channel)
        slow = asyncio.ensure_future(
            stub.Unary(echo_pb2.EchoRequest(delay_ms=1000, message="slow"), timeout=10)
        )
        await until(lambda: upstream.servicer.active == 1, 5, "the slow call reaching the upstream")
        proc.send_signal(signal.SIGTERM)
        assert (await slow).message == "slow"  # finished within the drain timeout
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        assert address not in await cli(gmesh_env, "get", "proxies")  # its record left with it


async def test_workers_share_the_port(upstream: EchoServer, gmesh_env: dict[str, str]) -> None:
    async with proxy_process(gmesh_env, "--workers", "2") as (_proc, address):
        deadline = time.monotonic() + 20
        while True:
            records = [
                r
                for r in json.loads(await cli(gmesh_env, "get", "proxies", "-o", "json"))
                if r["address"] == address
            ]
            if len(records) == 2:
                break
            assert time.monotonic() < deadline, f"expected 2 workers, got {records}"
            await asyncio.sleep(0.2)
        assert len({r["pid"] for r in records}) == 2 and {r["worker"] for r in records} == {0, 1}
        for _ in range(20):  # new connections land on either worker; every one is served
            async with grpc.aio.insecure_channel(address) as channel:
                response = await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(), timeout=5)
                assert response.server == "up1"
