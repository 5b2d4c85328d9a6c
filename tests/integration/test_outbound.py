"""The outbound stack: one per process and mesh, connections only to what is called, released when
idle, bounded against hostile callers, consistent hashing that falls over, waiting for ready,
cancellation that reaches every wait."""

from __future__ import annotations

import asyncio
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
from gmesh.discovery.registry import Registration
from gmesh.outbound import stack
from gmesh.outbound.pool import CALL_CACHE
from gmesh.proxy.server import HANDLER_CACHE
from gmesh.store.etcd import Store
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


def connections_to(ports: set[int]) -> int:
    """Established TCP connections of this process whose remote port is one of `ports`."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "01" and parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) in ports:
                found += 1
    return found


def port(server: EchoServer) -> int:
    return int(server.address.rsplit(":", 1)[1])


@dataclass
class Services:
    """Echo servers registered as mesh services, by service name."""

    store: Store
    keys: MeshKeys
    servers: dict[str, list[EchoServer]] = field(default_factory=dict)
    registrations: list[Registration] = field(default_factory=list)

    async def add(self, service: str, count: int) -> list[EchoServer]:
        for i in range(count):
            server = await start_echo_server(f"{service}-{i}")
            reg = gmesh.register(
                server.address, service=service, store=self.store, prefix=self.keys.prefix,
                handle_sigterm=False, drain_delay=0,
            )  # fmt: skip
            await reg.__aenter__()
            self.servers.setdefault(service, []).append(server)
            self.registrations.append(reg)
        return self.servers[service]

    def ports(self, service: str) -> set[int]:
        return {port(s) for s in self.servers[service]}

    async def put(self, kind: str, name: str, spec: dict[str, Any]) -> int:
        doc = {"kind": kind, "metadata": {"name": name}, "spec": spec}
        return await self.store.put(self.keys.config(kind, name), json.dumps(doc).encode())


@pytest.fixture
async def services(store: Store, mesh_keys: MeshKeys) -> AsyncIterator[Services]:
    found = Services(store, mesh_keys)
    yield found
    for reg in found.registrations:
        await reg.deregister(drain=False)
    for servers in found.servers.values():
        for server in servers:
            await server.stop(None)


def to(service: str) -> tuple[tuple[str, str], ...]:
    return (("x-gmesh-service", service),)


async def test_only_the_called_service_is_connected_and_health_checked(
    services: Services, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    await services.add("called", 3)
    await services.add("unused", 3)
    health = {"healthCheck": {"interval": "200ms", "timeout": "100ms"}}
    await services.put("Service", "called", health)
    revision = await services.put("Service", "unused", health)
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path)
    try:
        await proxy.catalog.wait_for(
            lambda s: s.revision >= revision and len(s.endpoints_of("unused")) == 3, timeout=5
        )
        assert connections_to(services.ports("called") | services.ports("unused")) == 0  # nothing yet
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for _ in range(6):
                await stub.Unary(echo_pb2.EchoRequest(), metadata=to("called"), timeout=5)
        outbound = proxy.outbound
        # every endpoint of the called service from its first call (balancing spreads at once)
        assert connections_to(services.ports("called")) == 3
        assert connections_to(services.ports("unused")) == 0
        assert set(outbound.backends.active) == {"called"}
        assert outbound.health.checking() == 3
        await until(
            lambda: all(outbound.mesh.states.get("called", s.address).hc_successes >= 1
                        for s in services.servers["called"]),
            5, "health checks of the called service",
        )  # fmt: skip
        assert not any(k[0] == "unused" for k in outbound.mesh.states.states)
    finally:
        await proxy.stop(0)


async def test_an_idle_service_is_released_and_connected_again_on_its_next_call(
    services: Services, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    await services.add("echo", 3)
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path, idle_timeout=0.5)
    try:
        await proxy.catalog.wait_for(lambda s: len(s.endpoints_of("echo")) == 3, timeout=5)
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for _ in range(3):
                await stub.Unary(echo_pb2.EchoRequest(), timeout=5)
            assert connections_to(services.ports("echo")) == 3
            # a long stream keeps the service in use however long it runs without new calls
            call = stub.Bidi(timeout=20)
            await call.write(echo_pb2.EchoRequest())
            await call.read()
            await asyncio.sleep(1.5)  # three idle timeouts with the stream open
            assert "echo" in proxy.outbound.backends.active
            await call.write(echo_pb2.EchoRequest())
            await call.read()
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            took = await until(lambda: connections_to(services.ports("echo")) == 0, 10, "connections closed")
            assert proxy.outbound.backends.active == {} and proxy.outbound.health.checking() == 0
            assert took >= 0.4  # not before the idle timeout
            reply = await stub.Unary(echo_pb2.EchoRequest(), timeout=5)
            assert reply.server.startswith("echo-")
            assert connections_to(services.ports("echo")) == 3
    finally:
        await proxy.stop(0)


async def test_fifty_channels_to_five_services_share_fifty_connections(
    services: Services, etcd_server: EtcdMember, mesh_keys: MeshKeys
) -> None:
    names = [f"svc{i}" for i in range(5)]
    for name in names:
        await services.add(name, 10)
    ports = set().union(*(services.ports(n) for n in names))
    channels = [
        gmesh.aio.channel(f"gmesh:///{names[i % 5]}", etcd=etcd_server.url, prefix=mesh_keys.prefix)
        for i in range(50)
    ]
    try:
        outbound = await channels[0].ready_outbound()
        await outbound.catalog.wait_for(lambda s: all(len(s.endpoints_of(n)) == 10 for n in names), timeout=5)
        stubs = [echo_pb2_grpc.EchoStub(c) for c in channels]
        replies = await asyncio.gather(
            *(s.Unary(echo_pb2.EchoRequest(), timeout=10) for s in stubs for _ in range(10))
        )
        assert len({r.server for r in replies}) == 50  # every endpoint served calls
        assert connections_to(ports) == 50
        assert len(stack.running()) == 1 and len(outbound.pools()) == 1  # one stack, one pool
    finally:
        for c in channels:
            await c.close()
    assert stack.running() == []  # the last channel closed it


async def test_made_up_method_names_never_grow_the_proxy(
    services: Services, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    await services.add("echo", 2)
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path)
    try:
        await proxy.catalog.wait_for(lambda s: len(s.endpoints_of("echo")) == 2, timeout=5)
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(), timeout=5)  # a real one
            codes: list[grpc.StatusCode] = []
            for start in range(0, 3000, 50):  # 50 at a time, as a busy caller would
                codes += await asyncio.gather(*(made_up(channel, i) for i in range(start, start + 50)))
            assert set(codes) == {grpc.StatusCode.UNIMPLEMENTED}
            reply = await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(message="ok"), timeout=5)
            assert reply.message == "ok"  # still serving
        inbound = proxy.server.inbound
        assert inbound.cached() <= 4  # only the Echo methods its endpoints reported
        assert HANDLER_CACHE <= 4096
        for conn in proxy.pool.conns():
            assert conn.cached_calls() <= CALL_CACHE
    finally:
        await proxy.stop(0)


async def made_up(channel: grpc.aio.Channel, i: int) -> grpc.StatusCode:
    # half name the service (destination found, method unknown to it), half a known gRPC
    # service with a made-up method, a third kind an unknown gRPC service
    if i % 3 == 0:
        method, metadata = f"/gmesh.v1.Echo/Made{i}", ()
    elif i % 3 == 1:
        method, metadata = f"/made.up{i}.Svc/M", to("echo")
    else:
        method, metadata = f"/made.up{i}.Svc/M", ()
    try:
        await channel.unary_unary(method)(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


SERVER = "from gmesh.testing.echo import _main; import asyncio, sys; asyncio.run(_main(sys.argv[1:]))"


@pytest.mark.parametrize("kind", ["proxy", "channel"])
async def test_a_hash_key_falls_over_when_its_endpoint_is_killed(
    kind: str,
    store: Store,
    etcd_server: EtcdMember,
    mesh_keys: MeshKeys,
    tmp_path: Path,
    gmesh_env: dict[str, str],
) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            *GMESH[:2],
            "-m",
            "gmesh.testing.echo",
            "--service",
            "svc",
            "--name",
            f"e{i}",
            env=gmesh_env,
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                while b"registered" not in await proc.stdout.readline():
                    pass
        spec = {"kind": "Service", "metadata": {"name": "svc"},
                "spec": {"balancer": {"policy": "ring_hash", "hashKey": "x-user-id"}}}  # fmt: skip
        revision = await store.put(mesh_keys.config("Service", "svc"), json.dumps(spec).encode())
        async with hashing_door(kind, etcd_server, mesh_keys, tmp_path, revision) as (stub, outbound):
            key = (("x-user-id", "alice"),) + (to("svc") if kind == "proxy" else ())
            owner = {
                (await stub.Unary(echo_pb2.EchoRequest(), metadata=key, timeout=5)).server for _ in range(5)
            }
            assert len(owner) == 1  # sticky
            victim = procs[int(owner.pop()[1])]
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            # Its record stays until its lease expires (10 s); the mesh notices the connection is
            # gone within milliseconds, and from then on the key's calls go to the next endpoint.
            (pool,) = outbound.pools()
            await until(lambda: len(pool.down) == 1, 10, "the killed endpoint's connection seen down")
            served = [
                (await stub.Unary(echo_pb2.EchoRequest(), metadata=key, timeout=5)).server for _ in range(20)
            ]
            assert len(set(served)) == 1, served  # all 20 on one other endpoint, the same each time
            assert served[0] != f"e{procs.index(victim)}"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def hashing_door(
    kind: str, etcd: EtcdMember, keys: MeshKeys, tmp_path: Path, revision: int
) -> AsyncIterator[tuple[echo_pb2_grpc.EchoStub, Any]]:
    def ready(s: Any) -> bool:
        return bool(s.revision >= revision and len(s.endpoints_of("svc")) == 3)

    if kind == "proxy":
        proxy = await start_proxy(etcd, keys, tmp_path)
        try:
            await proxy.catalog.wait_for(ready, timeout=5)
            async with grpc.aio.insecure_channel(proxy.address) as ch:
                yield echo_pb2_grpc.EchoStub(ch), proxy.outbound
        finally:
            await proxy.stop(0)
    else:
        async with gmesh.aio.channel("gmesh:///svc", etcd=etcd.url, prefix=keys.prefix) as ch:
            outbound = await ch.ready_outbound()
            await outbound.catalog.wait_for(ready, timeout=5)
            yield echo_pb2_grpc.EchoStub(ch), outbound


@pytest.mark.parametrize("kind", ["proxy", "channel"])
async def test_wait_for_ready_waits_for_an_endpoint_up_to_the_deadline(
    kind: str, services: Services, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    revision = await services.put("Service", "late", {})
    await services.add("other", 1)  # the proxy needs a way to name "late": the header
    async with contextlib.AsyncExitStack() as exits:
        if kind == "proxy":
            proxy = await start_proxy(etcd_server, mesh_keys, tmp_path)
            exits.push_async_callback(proxy.stop, 0)
            await proxy.catalog.wait_for(lambda s: s.revision >= revision, timeout=5)
            channel = await exits.enter_async_context(grpc.aio.insecure_channel(proxy.address))
            stub = echo_pb2_grpc.EchoStub(channel)

            def call(wait: bool, timeout: float) -> Any:
                metadata = to("late") + ((("x-gmesh-wait-for-ready", "1"),) if wait else ())
                return stub.Unary(echo_pb2.EchoRequest(), metadata=metadata, timeout=timeout)
        else:
            mesh_channel = await exits.enter_async_context(
                gmesh.aio.channel("gmesh:///late", etcd=etcd_server.url, prefix=mesh_keys.prefix)
            )
            outbound = await mesh_channel.ready_outbound()
            await outbound.catalog.wait_for(lambda s: s.revision >= revision, timeout=5)
            stub = echo_pb2_grpc.EchoStub(mesh_channel)

            def call(wait: bool, timeout: float) -> Any:
                return stub.Unary(echo_pb2.EchoRequest(), timeout=timeout, wait_for_ready=wait)

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(False, 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no endpoints" in (
            err.value.details() or ""
        )
        assert time.monotonic() - started < 1.0  # at once, without wait_for_ready
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(True, 0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # waited its whole deadline
        waiting = asyncio.ensure_future(call(True, 10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        registered_at = time.monotonic()
        await services.add("late", 1)
        reply = await waiting
        assert reply.server == "late-0"
        assert time.monotonic() - registered_at < 2.0  # served once the endpoint appeared


async def test_cancel_interrupts_a_retry_backoff_and_a_breaker_wait(
    services: Services, etcd_server: EtcdMember, mesh_keys: MeshKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    (server,) = await services.add("svc", 1)
    await services.put("Service", "svc", {"circuitBreaker": {"maxRequests": 1, "maxPending": 5}})
    retry = {"attempts": 3, "on": ["UNAVAILABLE"], "backoff": {"base": "1ms", "max": "1ms"}}
    revision = await services.put(
        "Route", "svc", {"service": "svc", "rules": [{"name": "all", "retry": retry}]}
    )
    import gmesh.plugins.retry

    monkeypatch.setattr(gmesh.plugins.retry, "backoff", lambda attempt, base, cap: 30.0)  # a long backoff
    async with gmesh.aio.channel("gmesh:///svc", etcd=etcd_server.url, prefix=mesh_keys.prefix) as channel:
        outbound = await channel.ready_outbound()
        await outbound.catalog.wait_for(lambda s: s.revision >= revision, timeout=5)
        stub = echo_pb2_grpc.EchoStub(channel)
        # 1. in a retry's backoff: the first attempt failed, the second waits 30 s
        server.servicer.fail_share = 1.0
        call = stub.Unary(echo_pb2.EchoRequest(), timeout=60)
        await until(lambda: server.servicer.calls.get("Unary", 0) == 1, 5, "the first attempt")
        # the retry is counted just before its backoff starts: in the backoff now
        await until(lambda: outbound.mesh.budgets["svc"][1].retries == 1, 5, "the retry's backoff")
        cancelled_at = time.monotonic()
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert time.monotonic() - cancelled_at < 1.0
        assert await call.code() == grpc.StatusCode.CANCELLED
        # 2. waiting for a breaker slot: one call holds the only slot for 3 s
        server.servicer.fail_share = 0.0
        holder = stub.Unary(echo_pb2.EchoRequest(delay_ms=3000), timeout=10)
        breaker = outbound.mesh.breaker("svc")
        await until(lambda: breaker.active == 1, 5, "the slot taken")
        waiter = stub.Unary(echo_pb2.EchoRequest(), timeout=10)
        await until(lambda: len(breaker.waiting) == 1, 5, "a call waiting for the slot")
        cancelled_at = time.monotonic()
        assert waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert time.monotonic() - cancelled_at < 1.0
        assert len(breaker.waiting) == 0  # it left the line
        assert (await holder).server == "svc-0"
        assert breaker.active == 0  # and no slot leaked
