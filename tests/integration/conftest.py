"""Fixtures for data-path tests: a registered Echo upstream, a running proxy, stubs to both."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio

import gmesh
import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.proxy.run import ProxySettings, RunningProxy
from gmesh.store.etcd import EtcdConfig, Store
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait (polling, with a deadline) until `condition()` holds; seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


BIG = 32 * 1024 * 1024
BIG_OPTIONS = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]


@pytest_asyncio.fixture
async def upstream(store: Store, mesh_keys: MeshKeys) -> AsyncIterator[EchoServer]:
    """An Echo server registered as mesh service `echo` (reflection on: method kinds known)."""
    server = await start_echo_server("up1", options=BIG_OPTIONS)
    async with gmesh.register(
        server.address,
        service="echo",
        store=store,
        prefix=mesh_keys.prefix,
        handle_sigterm=False,
        drain_delay=0,
    ):
        yield server
    await server.stop(None)


async def start_proxy(etcd: EtcdMember, keys: MeshKeys, tmp_path: Path, **overrides: Any) -> RunningProxy:
    fields: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "etcd": EtcdConfig.parse(etcd.url),
        "keys": keys,
        "drain_timeout": 2.0,
        "drain_delay": 0.0,
        "max_message_bytes": BIG,
        "snapshot_file": tmp_path / "proxy-snapshot.json",
    }
    settings = ProxySettings(**{**fields, **overrides})
    proxy = RunningProxy(settings)
    await proxy.start()
    return proxy


@pytest_asyncio.fixture
async def proxy(
    etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path, upstream: EchoServer
) -> AsyncIterator[RunningProxy]:
    running = await start_proxy(etcd_server, mesh_keys, tmp_path)
    await running.catalog.wait_for(lambda s: bool(s.endpoints_of("echo")), timeout=5)
    yield running
    await running.stop(0)


@pytest_asyncio.fixture
async def direct(upstream: EchoServer) -> AsyncIterator[echo_pb2_grpc.EchoStub]:
    async with grpc.aio.insecure_channel(upstream.address, options=BIG_OPTIONS) as channel:
        yield echo_pb2_grpc.EchoStub(channel)


@pytest_asyncio.fixture
async def via_proxy(proxy: RunningProxy) -> AsyncIterator[echo_pb2_grpc.EchoStub]:
    async with grpc.aio.insecure_channel(proxy.address, options=BIG_OPTIONS) as channel:
        yield echo_pb2_grpc.EchoStub(channel)


# -- a mesh service with subsets, and its two front doors (route and rollout tests) ----------

SUBSETS = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}


@dataclass
class Mesh:
    """Service `orders`: endpoints v1a, v1b (version v1) and v2 (version v2), Echo servers."""

    servers: dict[str, EchoServer]
    store: Store
    keys: MeshKeys

    def counts(self) -> dict[str, int]:
        return {name: s.servicer.calls.get("Unary", 0) for name, s in self.servers.items()}

    async def put(self, kind: str, name: str, spec: dict[str, Any]) -> int:
        doc = {"kind": kind, "metadata": {"name": name}, "spec": spec}
        return await self.store.put(self.keys.config(kind, name), json.dumps(doc).encode())


@dataclass
class Door:
    """One front door to `orders`: a stub, and a way to wait until a revision is in use."""

    name: str
    stub: echo_pb2_grpc.EchoStub
    wait: Callable[[int], Awaitable[None]]


@pytest_asyncio.fixture
async def mesh(store: Store, mesh_keys: MeshKeys) -> AsyncIterator[Mesh]:
    servers: dict[str, EchoServer] = {}
    registrations = []
    for name, version in (("v1a", "v1"), ("v1b", "v1"), ("v2", "v2")):
        server = await start_echo_server(name)
        servers[name] = server
        reg = gmesh.register(
            server.address,
            service="orders",
            labels={"version": version},
            store=store,
            prefix=mesh_keys.prefix,
            handle_sigterm=False,
            drain_delay=0,
        )
        await reg.__aenter__()
        registrations.append(reg)
    mesh = Mesh(servers, store, mesh_keys)
    await mesh.put("Service", "orders", {"subsets": SUBSETS})
    yield mesh
    for reg in registrations:
        await reg.__aexit__(None, None, None)
    for server in servers.values():
        await server.stop(None)


@pytest_asyncio.fixture(params=["proxy", "channel"])
async def door(
    request: pytest.FixtureRequest, mesh: Mesh, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> AsyncIterator[Door]:
    if request.param == "proxy":
        proxy = await start_proxy(etcd_server, mesh_keys, tmp_path)
        await proxy.catalog.wait_for(lambda s: len(s.endpoints_of("orders")) == 3, timeout=5)

        async def wait_proxy(revision: int) -> None:
            await proxy.catalog.wait_for(lambda s: s.revision >= revision, timeout=5)

        async with grpc.aio.insecure_channel(proxy.address) as channel:
            yield Door("proxy", echo_pb2_grpc.EchoStub(channel), wait_proxy)
        await proxy.stop(0)
    else:
        async with gmesh.aio.channel("gmesh:///orders", etcd=etcd_server.url, prefix=mesh_keys.prefix) as ch:
            outbound = await ch.ready_outbound()
            await outbound.catalog.wait_for(lambda s: len(s.endpoints_of("orders")) == 3, timeout=5)

            async def wait_channel(revision: int) -> None:
                await outbound.catalog.wait_for(lambda s: s.revision >= revision, timeout=5)

            yield Door("channel", echo_pb2_grpc.EchoStub(ch), wait_channel)


def rule(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, **fields}


def split(v1: int, v2: int) -> list[dict[str, Any]]:
    return [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]


async def route(mesh: Mesh, door: Door, rules: list[dict[str, Any]], **service: Any) -> None:
    if service:
        await mesh.put("Service", "orders", {"subsets": SUBSETS, **service})
    revision = await mesh.put("Route", "orders", {"service": "orders", "rules": rules})
    await door.wait(revision)


async def many(
    door: Door,
    n: int,
    *,
    concurrency: int = 32,
    metadata: Callable[[int], Any] = lambda i: (),
    **request: Any,
) -> list[tuple[str, grpc.StatusCode, float]]:
    """n unary calls, `concurrency` at a time: (server or "", code, seconds) for each."""
    results: list[tuple[str, grpc.StatusCode, float]] = [("", grpc.StatusCode.OK, 0.0)] * n
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            started = time.perf_counter()
            try:
                reply = await door.stub.Unary(
                    echo_pb2.EchoRequest(**request), metadata=metadata(i), timeout=10
                )
                results[i] = (reply.server, grpc.StatusCode.OK, time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                results[i] = ("", exc.code(), time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def by_version(results: list[tuple[str, grpc.StatusCode, float]]) -> collections.Counter[str]:
    return collections.Counter(server[:2] for server, code, _ in results if code == grpc.StatusCode.OK)
