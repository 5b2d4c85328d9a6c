"""Call the example `orders` service through the mesh, both ways, and count who served each call.

    python examples/client.py [--proxy 127.0.0.1:15001] [--calls 10]
    python examples/client.py --forever [--rate 50] [--as web]   # steady traffic via gmesh:///orders
    python examples/client.py --service secure-orders --identity web   # mTLS, as mesh identity web

Via the proxy: a plain grpc.aio channel to `gmesh proxy`. In-process: `gmesh.aio.channel`
("gmesh:///orders"), the same routing without the proxy hop. Start the servers and the proxy
as in the README's tour first.
"""

import argparse
import asyncio
import contextlib
from collections import Counter

import grpc.aio

import gmesh.aio
from gmesh.examples.v1 import orders_pb2, orders_pb2_grpc


async def calls(channel: grpc.aio.Channel, n: int) -> Counter[str]:
    stub = orders_pb2_grpc.OrdersStub(channel)
    served: Counter[str] = Counter()
    for i in range(n):
        try:
            order = await stub.GetOrder(orders_pb2.GetOrderRequest(id=str(i)), timeout=5)
            served[order.served_by] += 1
        except grpc.aio.AioRpcError as exc:  # refused by the mesh (a limit, a policy) or failed
            served[exc.code().name] += 1
    return served


async def forever(rate: float, name: str | None) -> None:
    """Steady calls through gmesh:///orders; every 5 s, who served them and how many failed.
    `name`: the caller's `app` label (what the dashboard's service graph calls this client)."""
    labels = {"app": name} if name else None
    async with gmesh.aio.channel("gmesh:///orders", caller_labels=labels) as channel:
        stub = orders_pb2_grpc.OrdersStub(channel)
        served: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        report = loop.time() + 5
        i = 0
        while True:
            try:
                order = await stub.GetOrder(orders_pb2.GetOrderRequest(id=str(i)), timeout=5)
                served[order.served_by] += 1
            except grpc.aio.AioRpcError as exc:
                served[exc.code().name] += 1
            i += 1
            await asyncio.sleep(1 / rate)
            if loop.time() >= report:
                print("last 5s:", dict(served), flush=True)
                served.clear()
                report += 5


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--proxy", default="127.0.0.1:15001", help="address of a running gmesh proxy")
    parser.add_argument("--calls", type=int, default=10, help="calls each way")
    parser.add_argument("--forever", action="store_true", help="call gmesh:///orders until stopped")
    parser.add_argument("--rate", type=float, default=50, help="calls per second with --forever")
    parser.add_argument(
        "--as", dest="name", help="with --forever: call as app NAME (its name in the service graph)"
    )
    parser.add_argument("--service", default="orders", help="the mesh service to call")
    parser.add_argument(
        "--identity",
        help="call via gmesh:///SERVICE only, as this mesh identity (mutual TLS to endpoints that offer it)",
    )
    args = parser.parse_args()
    if args.identity:
        target = f"gmesh:///{args.service}"
        async with gmesh.aio.channel(target, identity=args.identity) as channel:
            try:
                print(f"via {target} as {args.identity}:", dict(await calls(channel, args.calls)))
            except grpc.aio.AioRpcError as exc:
                print(f"via {target} as {args.identity}: {exc.code().name}: {exc.details()}")
        return
    if args.forever:
        await forever(args.rate, args.name)
        return
    async with grpc.aio.insecure_channel(args.proxy) as channel:
        print("via the proxy:     ", dict(await calls(channel, args.calls)))
    async with gmesh.aio.channel("gmesh:///orders") as channel:
        print("via gmesh:///orders:", dict(await calls(channel, args.calls)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
