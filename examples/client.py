"""Call the example `orders` service through the mesh, both ways, and count who served each call.

    python examples/client.py [--proxy 127.0.0.1:15001] [--calls 10]

Via the proxy: a plain grpc.aio channel to `gmesh proxy`. In-process: `gmesh.aio.channel`
("gmesh:///orders"), the same routing without the proxy hop. Start the servers and the proxy
as in the README's tour first.
"""

import argparse
import asyncio
from collections import Counter

import grpc.aio

import gmesh.aio
from gmesh.examples.v1 import orders_pb2, orders_pb2_grpc


async def calls(channel: grpc.aio.Channel, n: int) -> Counter[str]:
    stub = orders_pb2_grpc.OrdersStub(channel)
    served: Counter[str] = Counter()
    for i in range(n):
        order = await stub.GetOrder(orders_pb2.GetOrderRequest(id=str(i)), timeout=5)
        served[order.served_by] += 1
    return served


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--proxy", default="127.0.0.1:15001", help="address of a running gmesh proxy")
    parser.add_argument("--calls", type=int, default=10, help="calls each way")
    args = parser.parse_args()
    async with grpc.aio.insecure_channel(args.proxy) as channel:
        print("via the proxy:     ", dict(await calls(channel, args.calls)))
    async with gmesh.aio.channel("gmesh:///orders") as channel:
        print("via gmesh:///orders:", dict(await calls(channel, args.calls)))


if __name__ == "__main__":
    asyncio.run(main())
