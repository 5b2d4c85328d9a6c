"""Fixtures for data-path tests: a registered Echo upstream, a running proxy, stubs to both."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc.aio
import pytest_asyncio

import gmesh
from gmesh.discovery.keys import MeshKeys
from gmesh.proxy.run import ProxySettings, RunningProxy
from gmesh.store.etcd import EtcdConfig, Store
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2_grpc


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
        server.address, service="echo", store=store, prefix=mesh_keys.prefix, handle_sigterm=False
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
