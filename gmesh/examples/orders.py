"""The example Orders service (proto/gmesh/examples/v1/orders.proto), as a mesh service would be written.

    python -m gmesh.examples.orders --listen 127.0.0.1:50051 --version v2

starts a grpc.aio server with health and reflection, and registers it in the mesh as
service `orders` with label `version=v2` for as long as it runs (`gmesh.register`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import gmesh.discovery.registry
from gmesh.examples.v1 import orders_pb2, orders_pb2_grpc

SERVICE = orders_pb2.DESCRIPTOR.services_by_name["Orders"].full_name
ITEMS = ("espresso", "croissant", "bagel", "matcha", "scone")


class Orders(orders_pb2_grpc.OrdersServicer):  # type: ignore[misc]
    def __init__(self, version: str, fail_percent: float = 0.0) -> None:
        self.version = version
        self.fail_share = fail_percent / 100
        self.served = 0

    def _order(self, n: int) -> Any:
        return orders_pb2.Order(
            id=str(n), item=ITEMS[n % len(ITEMS)], quantity=1 + n % 3, served_by=self.version
        )

    async def GetOrder(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.id.isdigit():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no order {request.id!r}")
        self.served += 1
        if int(self.served * self.fail_share) != int((self.served - 1) * self.fail_share):
            # --fail-percent: a broken release, to watch a canary roll back
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"orders {self.version}: simulated failure")
        return self._order(int(request.id))

    async def WatchOrders(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        n = 0
        while not request.limit or n < request.limit:
            yield self._order(n)
            n += 1
            await asyncio.sleep(0.1)


async def serve(
    listen: str, version: str, *, service: str = "orders", register: bool = True, fail_percent: float = 0.0
) -> None:
    server = grpc.aio.server()
    orders_pb2_grpc.add_OrdersServicer_to_server(Orders(version, fail_percent), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(listen)
    await server.start()
    address = f"{listen.rpartition(':')[0]}:{port}"
    print(f"orders {version} listening on {address}", flush=True)
    async with contextlib.AsyncExitStack() as stack:
        if register:
            await stack.enter_async_context(
                gmesh.discovery.registry.register(address, service=service, labels={"version": version})
            )
            print(f"orders {version} registered as {service} {address}", flush=True)
        await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gmesh.examples.orders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any free port)")
    parser.add_argument("--version", default="v1", help="value of the endpoint's `version` label")
    parser.add_argument("--service", default="orders", help="mesh service name")
    parser.add_argument("--no-register", action="store_true", help="serve without registering in the mesh")
    parser.add_argument(
        "--fail-percent", type=float, default=0.0, help="fail this share of GetOrder calls with UNAVAILABLE"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.listen,
                args.version,
                service=args.service,
                register=not args.no_register,
                fail_percent=args.fail_percent,
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
