"""gmesh for asyncio gRPC clients: `gmesh.aio.channel("gmesh:///orders")` is a `grpc.aio.Channel`.

import gmesh.aio
from orders.v1 import orders_pb2_grpc

async with gmesh.aio.channel("gmesh:///orders") as channel:
    stub = orders_pb2_grpc.OrdersStub(channel)
    order = await stub.GetOrder(request)
"""

from gmesh.channel.channel import MeshChannel, channel

__all__ = ["MeshChannel", "channel"]
