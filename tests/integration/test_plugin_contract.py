"""The plugin contract, as a third party meets it: a filter factory whose build fails makes its
services refuse every call (fail closed), naming the plugin, in the proxy, in its config dump
and in `gmesh plugins` — a broken authorization plugin must never let calls through."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

import gmesh
from gmesh.discovery.keys import MeshKeys
from gmesh.store.embedded import free_port
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import admin_pb2, admin_pb2_grpc, echo_pb2, echo_pb2_grpc

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]

BROKEN = '''
"""A third-party plugin whose authorization filter cannot be built (its policy store is away)."""
from gmesh import hookimpl
from gmesh.chain import Phase


class AuthzFactory:
    name = "authz"
    phase = Phase.AUTHORIZE

    def build(self, ctx):
        if ctx.service == "echo":
            raise RuntimeError("policy store unreachable")
        return None


@hookimpl
def gmesh_filter_factories():
    return [AuthzFactory()]
'''


@pytest.fixture
def broken_plugin(tmp_path: Path, gmesh_env: dict[str, str]) -> dict[str, str]:
    """An installed distribution (`broken-plugin`, entry point `broken`) on PYTHONPATH."""
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "broken_plugin.py").write_text(BROKEN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gmesh]\nbroken = broken_plugin\n")
    return {
        **gmesh_env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture
async def echo_and_other(etcd_server: EtcdMember, mesh_keys: MeshKeys) -> AsyncIterator[list[EchoServer]]:
    servers = [await start_echo_server("echo-up"), await start_echo_server("other-up")]
    registrations = [
        gmesh.register(s.address, service=name, etcd=etcd_server.url, prefix=mesh_keys.prefix,
                       handle_sigterm=False, drain_delay=0)
        for s, name in zip(servers, ("echo", "other"), strict=True)
    ]  # fmt: skip
    for reg in registrations:
        await reg.__aenter__()
    yield servers
    for reg in registrations:
        await reg.deregister(drain=False)
    for server in servers:
        await server.stop(None)


async def test_gmesh_plugins_names_the_services_a_broken_filter_closes(
    broken_plugin: dict[str, str], echo_and_other: list[EchoServer]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "plugins", env=broken_plugin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 1, text + err.decode()
    row = next(line for line in text.splitlines() if line.startswith("broken "))
    assert "broken-plugin" in row and "filter authz (AUTHORIZE)" in row
    assert "chains: 1 of 2 services refuse every call:" in text
    assert (
        "  echo: filter 'authz' of plugin 'broken' failed to build for service 'echo': "
        "RuntimeError: policy store unreachable"
    ) in text


async def test_a_proxy_refuses_the_calls_of_a_service_whose_chain_failed(
    broken_plugin: dict[str, str], echo_and_other: list[EchoServer]
) -> None:
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "proxy", "--listen", address, "--admin", admin, "--drain-delay", "0s",
        env=broken_plugin, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"listening" not in (line := await proc.stderr.readline()):
                assert line, "the proxy exited"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Unary(
                        echo_pb2.EchoRequest(), metadata=(("x-gmesh-service", "echo"),), timeout=5
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "plugin 'broken'" in (err.value.details() or "")
                assert "RuntimeError: policy store unreachable" in (err.value.details() or "")
            # the other service, whose chain builds, is served
            reply = await stub.Unary(
                echo_pb2.EchoRequest(), metadata=(("x-gmesh-service", "other"),), timeout=5
            )
            assert reply.server == "other-up"
        assert echo_and_other[0].servicer.calls.get("Unary", 0) == 0  # not one call got through
        async with grpc.aio.insecure_channel(admin) as channel:
            dump = json.loads(
                (
                    await admin_pb2_grpc.AdminStub(channel).ConfigDump(
                        admin_pb2.ConfigDumpRequest(), timeout=5
                    )
                ).json
            )
        assert "plugin 'broken'" in dump["services"]["echo"]["chainError"]
        assert dump["services"]["echo"]["chain"][-1] == "authz (failed)"
        assert dump["services"]["other"]["chainError"] is None
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)
