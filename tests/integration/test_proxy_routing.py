"""Finding the destination of a call, and saying clearly when there is none."""

from __future__ import annotations

import json

import grpc
import grpc.aio
import pytest

import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.proxy.run import RunningProxy
from gmesh.store.etcd import Store
from gmesh.testing.echo import EchoServer
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc


async def test_unknown_grpc_service_and_unknown_mesh_service(
    proxy: RunningProxy, upstream: EchoServer
) -> None:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/shop.v1.Nobody/Get")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no mesh service serves gRPC service 'shop.v1.Nobody'" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/gmesh.v1.Echo/Unary")(
                b"", metadata=(("x-gmesh-service", "ghost"),), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no mesh service 'ghost'" in (err.value.details() or "")


async def test_a_service_without_endpoints_is_unavailable_by_name(
    proxy: RunningProxy, store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember
) -> None:
    doc = {"kind": "Service", "metadata": {"name": "lonely"}, "spec": {}}
    rev = await store.put(mesh_keys.config("Service", "lonely"), json.dumps(doc).encode())
    await proxy.catalog.wait_for(lambda s: s.revision >= rev, timeout=5)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/gmesh.v1.Echo/Unary")(
                b"", metadata=(("x-gmesh-service", "lonely"),), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "gmesh: service 'lonely' has no endpoints"
    async with gmesh.aio.channel("gmesh:///lonely", etcd=etcd_server.url, prefix=mesh_keys.prefix) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(), timeout=5)
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "gmesh: service 'lonely' has no endpoints",
    )
