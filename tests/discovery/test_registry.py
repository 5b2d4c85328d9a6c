"""Registrations over a real etcd and real gRPC servers: what is recorded, and how fast it leaves."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

import gmesh
from gmesh.config.kinds import KindRegistry
from gmesh.discovery.catalog import Catalog
from gmesh.discovery.endpoint import Endpoint, MethodKind
from gmesh.discovery.keys import MeshKeys
from gmesh.store.etcd import EtcdConfig, Store
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember

TTL = 3
# -P: run the installed gmesh, never a source checkout that happens to be the cwd
GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


@contextlib.asynccontextmanager
async def watchers(
    etcd_server: EtcdMember, keys: MeshKeys, kinds: KindRegistry, count: int = 2
) -> AsyncIterator[list[Catalog]]:
    """`count` independent catalogs, each with its own connection: "every watcher"."""
    stack = contextlib.AsyncExitStack()
    async with stack:
        catalogs = []
        for _ in range(count):
            store = await Store.connect(EtcdConfig.parse(etcd_server.url))
            stack.push_async_callback(store.close)
            catalogs.append(await stack.enter_async_context(Catalog(store, keys, kinds)))
        yield catalogs


async def all_see(catalogs: list[Catalog], service: str, count: int, timeout: float) -> float:
    """Seconds until every catalog shows `count` endpoints of `service`."""
    start = time.monotonic()
    await asyncio.gather(
        *(c.wait_for(lambda s: len(s.endpoints_of(service)) == count, timeout=timeout) for c in catalogs)
    )
    return time.monotonic() - start


async def spawn(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    return proc


async def read_until(proc: asyncio.subprocess.Process, marker: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"process exited before {marker!r}: {''.join(seen)}")
            seen.append(line)
            if marker in line:
                return line


async def test_record_carries_labels_and_reflected_services(
    echo_server: EchoServer, store: Store, mesh_keys: MeshKeys
) -> None:
    async with gmesh.register(
        echo_server.address,
        service="echo",
        labels={"version": "v2"},
        zone="z1",
        weight=3,
        store=store,
        prefix=mesh_keys.prefix,
    ) as reg:
        kv = await store.get(mesh_keys.endpoint("echo", echo_server.address))
        assert kv is not None and kv.lease != 0
        ep = Endpoint.from_json("echo", kv.value)
        assert ep.address == echo_server.address
        assert dict(ep.labels) == {"version": "v2"}
        assert (ep.zone, ep.weight) == ("z1", 3)
        assert ep.grpc_services == ("gmesh.v1.Echo",)  # health and reflection left out
        assert ep.grpc_services_from == "reflection"
        assert ep.methods == {
            "/gmesh.v1.Echo/Unary": MethodKind.UNARY,
            "/gmesh.v1.Echo/ServerStream": MethodKind.SERVER_STREAMING,
            "/gmesh.v1.Echo/ClientStream": MethodKind.CLIENT_STREAMING,
            "/gmesh.v1.Echo/Bidi": MethodKind.BIDI_STREAMING,
        }
        assert reg.published
    assert await store.get(mesh_keys.endpoint("echo", echo_server.address)) is None


async def test_without_reflection_the_given_services_are_recorded(store: Store, mesh_keys: MeshKeys) -> None:
    server = await start_echo_server("plain", reflection_enabled=False)
    try:
        async with gmesh.register(
            server.address,
            service="echo",
            grpc_services=["gmesh.v1.Echo"],
            store=store,
            prefix=mesh_keys.prefix,
        ):
            kv = await store.get(mesh_keys.endpoint("echo", server.address))
            assert kv is not None
            ep = Endpoint.from_json("echo", kv.value)
            assert (ep.grpc_services, ep.grpc_services_from, dict(ep.methods)) == (
                ("gmesh.v1.Echo",),
                "given",
                {},
            )
    finally:
        await server.stop()


async def test_graceful_exit_leaves_every_watcher_within_a_second(
    echo_server: EchoServer, etcd_server: EtcdMember, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    async with watchers(etcd_server, mesh_keys, config_kinds) as catalogs:
        async with gmesh.register(
            echo_server.address, service="echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, ttl=10
        ):
            await all_see(catalogs, "echo", 1, timeout=5)
        assert await all_see(catalogs, "echo", 0, timeout=1.0) < 1.0


async def test_lease_lost_while_cut_off_is_replaced(
    echo_server: EchoServer, store: Store, mesh_keys: MeshKeys
) -> None:
    key = mesh_keys.endpoint("echo", echo_server.address)
    async with gmesh.register(
        echo_server.address, service="echo", store=store, prefix=mesh_keys.prefix, ttl=TTL
    ):
        first = await store.get(key)
        assert first is not None
        # What etcd does to a lease whose holder was unreachable for longer than the TTL.
        await store.revoke_lease(first.lease)
        deadline = time.monotonic() + 10
        while (again := await store.get(key)) is None or again.lease == first.lease:
            assert time.monotonic() < deadline, "registration did not come back under a new lease"
            await asyncio.sleep(0.1)
    assert await store.get(key) is None


@contextlib.asynccontextmanager
async def registered_process(
    how: str, service: str, ttl: int, env: dict[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process holding a registration of `service`: a Python server using gmesh.register()
    ("python"), or `gmesh register` in front of a server of any language ("cli")."""
    upstream = None
    if how == "python":
        cmd = [sys.executable, "-P", "-m", "gmesh.testing.echo", "--service", service, "--ttl", str(ttl)]
    else:
        upstream = await start_echo_server(service)
        cmd = [*GMESH, "register", "-s", service, "-a", upstream.address, "--ttl", str(ttl)]
    proc = await spawn(*cmd, env=env)
    try:
        await read_until(proc, "registered")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if upstream is not None:
            await upstream.stop()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python", "cli"])
async def test_kill_9_leaves_every_watcher_within_ttl_plus_2s(
    how: str,
    etcd_server: EtcdMember,
    mesh_keys: MeshKeys,
    config_kinds: KindRegistry,
    gmesh_env: dict[str, str],
) -> None:
    async with (
        watchers(etcd_server, mesh_keys, config_kinds) as catalogs,
        registered_process(how, "victim", TTL, gmesh_env) as proc,
    ):
        await all_see(catalogs, "victim", 1, timeout=5)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        gone_after = await all_see(catalogs, "victim", 0, timeout=TTL + 2)
        assert gone_after <= TTL + 2
        print(f"kill -9 ({how}): gone from every watcher after {gone_after:.2f}s (TTL {TTL}s)")


@pytest.mark.parametrize("how", ["python", "cli"])
async def test_sigterm_withdraws_within_a_second(
    how: str,
    etcd_server: EtcdMember,
    mesh_keys: MeshKeys,
    config_kinds: KindRegistry,
    gmesh_env: dict[str, str],
) -> None:
    async with (
        watchers(etcd_server, mesh_keys, config_kinds) as catalogs,
        registered_process(how, "leaving", 30, gmesh_env) as proc,
    ):
        await all_see(catalogs, "leaving", 1, timeout=5)
        proc.send_signal(signal.SIGTERM)
        gone_after = await all_see(catalogs, "leaving", 0, timeout=1.0)
        assert gone_after < 1.0
        print(f"SIGTERM ({how}): gone from every watcher after {gone_after * 1000:.0f}ms")
        code = await asyncio.wait_for(proc.wait(), 5)
        # gmesh register exits cleanly; a Python server dies of the SIGTERM it got, as before.
        assert code == (0 if how == "cli" else -signal.SIGTERM)


async def test_cli_health_check_withdraws_while_not_serving(
    echo_server: EchoServer,
    etcd_server: EtcdMember,
    mesh_keys: MeshKeys,
    config_kinds: KindRegistry,
    gmesh_env: dict[str, str],
) -> None:
    interval = 0.2
    cmd = [*GMESH, "register", "-s", "checked", "-a", echo_server.address, "--health-check",
           "--health-interval", f"{int(interval * 1000)}ms"]  # fmt: skip
    async with watchers(etcd_server, mesh_keys, config_kinds, count=1) as (catalog,):
        proc = await spawn(*cmd, env=gmesh_env)
        try:
            await read_until(proc, "registered")
            await all_see([catalog], "checked", 1, timeout=5)
            await echo_server.set_serving(False)
            assert await all_see([catalog], "checked", 0, timeout=5) <= 2 * interval + 0.5
            await echo_server.set_serving(True)
            await all_see([catalog], "checked", 1, timeout=5)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 5)
