"""What only the proxy does: find the destination of any method, and say clearly when there is none."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from gmesh.proxy.run import RunningProxy
from gmesh.testing.echo import EchoServer


async def test_unknown_service_method_and_no_endpoints(proxy: RunningProxy, upstream: EchoServer) -> None:
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
