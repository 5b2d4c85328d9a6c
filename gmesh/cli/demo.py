"""`gmesh demo`: the README's main job — a small mesh that starts, serves, and cleans up after itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from typing import Any

import click
import grpc.aio

from gmesh.cli.common import MeshTarget, mesh_options, run, table
from gmesh.cli.config_cmd import endpoints_table
from gmesh.config.apply import plan_apply, write_plan
from gmesh.config.loader import Document
from gmesh.discovery.catalog import Catalog
from gmesh.discovery.keys import MeshKeys
from gmesh.pluginmanager import Plugins
from gmesh.proxy.run import ProxySettings, RunningProxy
from gmesh.store.embedded import EmbeddedEtcd
from gmesh.store.etcd import EtcdConfig, Store

VERSIONS = ("v1", "v2")


@click.command()
@click.option(
    "--keep",
    is_flag=True,
    help="leave the mesh running with steady traffic and a canary rollout, and serve the dashboard, "
    "until Ctrl-C (then stop and clean up everything)",
)
@click.option(
    "--dashboard-listen",
    default="127.0.0.1:15080",
    show_default=True,
    metavar="HOST:PORT",
    help="with --keep: where the dashboard listens (port 0: any free port)",
)
@mesh_options
def demo(target: MeshTarget, keep: bool, dashboard_listen: str) -> None:
    """Run a small mesh end to end, then stop everything it started.

    Starts the embedded etcd (unless --etcd is given or it already runs), applies a
    Service config, starts two versions of the example Orders service that register
    themselves, lists the endpoints, sends traffic through a gmesh proxy and through the
    in-process gmesh:/// channel, shows which endpoint served what, stops the servers and
    shows them leave the mesh. Everything is written under a prefix of its own, removed
    at the end.

    With --keep it stays up instead: a proxy, a little steady traffic (a `frontend` caller
    through gmesh:///orders and a plain client through the proxy), a canary rollout of
    orders going back and forth between v1 and v2, and the dashboard (its URL is printed),
    until Ctrl-C stops and removes everything.
    """
    try:
        run(_demo(target, keep, dashboard_listen))
    except KeyboardInterrupt:
        sys.exit(130)


def step(text: str) -> None:
    click.secho(f"\n==> {text}", bold=True)


async def _demo(target: MeshTarget, keep: bool = False, listen: str = "") -> None:
    embedded = EmbeddedEtcd()
    started_etcd = False
    if target.etcd:
        config = EtcdConfig.parse(target.etcd, **target.options)
        step(f"using etcd at {config.describe()}")
    else:
        running = embedded.status()
        if running is None:
            step("starting the embedded etcd")
            state, started_etcd = await asyncio.to_thread(embedded.start)
            click.echo(f"etcd listening on {state.client_url} (data in {state.data_dir})")
        else:
            state = running
            step(f"using the embedded etcd already running at {state.client_url}")
        config = EtcdConfig.parse(state.client_url)
    keys = MeshKeys(f"/gmesh-demo/{uuid.uuid4().hex[:8]}/")
    store = await Store.connect(config)
    servers: list[asyncio.subprocess.Process] = []
    try:
        await store.ping()
        kinds = Plugins.load().config_kinds()

        step("gmesh apply: the orders Service with subsets v1 and v2")
        doc = {
            "kind": "Service",
            "metadata": {"name": "orders"},
            "spec": {"subsets": {v: {"version": v} for v in VERSIONS}, "timeout": "2s"},
        }
        plan = await plan_apply(store, keys, kinds, [Document("demo", 1, doc)])
        revision = await write_plan(store, keys, plan)
        click.echo(f"applied Service/orders at revision {revision}")

        async with Catalog(store, keys, kinds) as catalog:
            step("starting orders v1 and v2; each registers itself with gmesh.register()")
            env = {**os.environ, "GMESH_ETCD": ",".join(config.endpoints), "GMESH_PREFIX": keys.prefix}
            t0 = time.monotonic()
            for version in VERSIONS:
                servers.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-P",  # never import a source checkout in the cwd over the installed gmesh
                        "-m",
                        "gmesh.examples.orders",
                        "--version",
                        version,
                        env=env,
                        stdout=asyncio.subprocess.DEVNULL,
                    )
                )
            snapshot = await catalog.wait_for(
                lambda s: len(s.endpoints_of("orders")) == len(VERSIONS), timeout=30
            )
            click.echo(
                f"both endpoints in the catalog {time.monotonic() - t0:.1f}s after launch "
                f"(snapshot revision {snapshot.revision})"
            )

            step("gmesh get endpoints")
            click.echo(endpoints_table(list(snapshot.endpoints_of("orders"))))

            step("calling each endpoint of orders directly")
            for ep in snapshot.endpoints_of("orders"):
                order = await _get_order(ep.address, "7")
                click.echo(
                    f"{ep.address} (version={ep.labels.get('version')}): order 7 = "
                    f"{order.quantity} x {order.item}, served_by={order.served_by}"
                )

            step(
                "gmesh proxy, then 100 calls through it and 100 through gmesh.aio.channel('gmesh:///orders')"
            )
            proxy = RunningProxy(
                ProxySettings(
                    listen="127.0.0.1:0", admin="127.0.0.1:0", etcd=config, keys=keys, drain_timeout=5
                )
            )
            await proxy.start()
            try:
                await proxy.catalog.wait_for(
                    lambda s: len(s.endpoints_of("orders")) == len(VERSIONS), timeout=10
                )
                admin = proxy.admin.address if proxy.admin else "-"
                click.echo(f"proxy listening on {proxy.address} (admin {admin})")
                counts = await _traffic(proxy.address, config, keys)
            finally:
                await proxy.stop(0)
            by_version = {ep.labels.get("version"): ep.address for ep in snapshot.endpoints_of("orders")}
            rows = [[door, v, by_version.get(v, "?"), str(n)] for (door, v), n in sorted(counts.items())]
            click.echo(table(["VIA", "VERSION", "ENDPOINT", "CALLS"], rows))

            if keep:
                await _keep(store, config, keys, kinds, listen)
                return
            step("stopping the servers (SIGTERM): they withdraw from the mesh")
            t0 = time.monotonic()
            for proc in servers:
                proc.send_signal(signal.SIGTERM)
            await catalog.wait_for(lambda s: not s.endpoints_of("orders"), timeout=15)
            click.echo(f"orders has no endpoints {time.monotonic() - t0:.2f}s after SIGTERM")
        click.secho("\ndemo done. Next: the README's 5-minute tour.", bold=True)
    finally:
        for proc in servers:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        with contextlib.suppress(Exception):
            await store.delete(keys.prefix, prefix=True)
        await store.close()
        if started_etcd:
            step("stopping the embedded etcd this demo started")
            await asyncio.to_thread(embedded.stop)


#: steady traffic of `gmesh demo --keep`: calls per second from the frontend and through the proxy
FRONTEND_RATE, PROXY_RATE = 8.0, 4.0


async def _keep(store: Store, config: EtcdConfig, keys: MeshKeys, kinds: Any, listen: str) -> None:
    """The mesh stays up: a proxy, steady traffic, a canary going back and forth, the dashboard."""
    import gmesh.aio
    from gmesh.dashboard.app import serve
    from gmesh.dashboard.model import MeshView
    from gmesh.examples.v1 import orders_pb2, orders_pb2_grpc

    step("--keep: a proxy, steady traffic, a canary rollout of orders, and the dashboard")
    proxy = RunningProxy(
        ProxySettings(listen="127.0.0.1:0", admin="127.0.0.1:0", etcd=config, keys=keys, drain_timeout=1)
    )
    await proxy.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    async def paced(rate: float, call: Any) -> None:
        started, n = time.monotonic(), 0
        while not stopping.is_set():
            n += 1
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call(n)
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def frontend() -> None:
        async with gmesh.aio.channel(
            "gmesh:///orders", etcd=config, prefix=keys.prefix, caller_labels={"app": "frontend"}
        ) as channel:
            stub = orders_pb2_grpc.OrdersStub(channel)
            await paced(
                FRONTEND_RATE, lambda n: stub.GetOrder(orders_pb2.GetOrderRequest(id=str(n)), timeout=5)
            )

    async def plain_client() -> None:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            stub = orders_pb2_grpc.OrdersStub(channel)
            await paced(PROXY_RATE, lambda n: stub.GetOrder(orders_pb2.GetOrderRequest(id=str(n)), timeout=5))

    async def canaries() -> None:
        from gmesh.rollout import controller as rc

        baseline, canary = "v1", "v2"
        await rc.set_weights(store, keys, kinds, "orders", {baseline: 100})
        while not stopping.is_set():
            state = rc.RolloutState(
                "orders", baseline, canary, [10, 25, 50, 100], 15.0, rc.Thresholds(min_calls=10)
            )
            final = await rc.run_canary(store, keys, kinds, state)
            if final.phase == rc.PROMOTED:  # else (aborted, rolled back) try the same again
                baseline, canary = canary, baseline

    def ready(server: Any) -> None:
        click.secho(f"\ndashboard: {server.url}", bold=True)
        click.echo(
            f"orders gets {FRONTEND_RATE:g} calls/s from `frontend` (gmesh:///orders) and {PROXY_RATE:g}/s "
            f"from a plain client through the proxy at {proxy.address}; a canary moves it between v1 and "
            "v2 every minute or so."
        )
        click.echo("Ctrl-C stops and removes everything.")
        sys.stdout.flush()

    view = MeshView(store, keys, kinds)
    tasks = [asyncio.create_task(job()) for job in (frontend, plain_client, canaries)]
    try:
        await serve(view, listen, allow_writes=True, on_ready=ready, until=stopping.wait())
    finally:
        stopping.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.stop(0, delay=0)
        step("stopped: removing the demo's servers and keys")


async def _traffic(proxy_address: str, config: EtcdConfig, keys: MeshKeys) -> Counter[tuple[str, str]]:
    """100 calls through the proxy and 100 through the in-process channel; who served each."""
    import gmesh.aio
    from gmesh.examples.v1 import orders_pb2, orders_pb2_grpc

    counts: Counter[tuple[str, str]] = Counter()
    async with grpc.aio.insecure_channel(proxy_address) as via_proxy:
        stub = orders_pb2_grpc.OrdersStub(via_proxy)
        for i in range(100):
            order = await stub.GetOrder(orders_pb2.GetOrderRequest(id=str(i)), timeout=5)
            counts[("proxy", order.served_by)] += 1
    async with gmesh.aio.channel("gmesh:///orders", etcd=config, prefix=keys.prefix) as in_process:
        stub = orders_pb2_grpc.OrdersStub(in_process)
        for i in range(100):
            order = await stub.GetOrder(orders_pb2.GetOrderRequest(id=str(i)), timeout=5)
            counts[("channel", order.served_by)] += 1
    return counts


async def _get_order(address: str, order_id: str) -> Any:
    from gmesh.examples.v1 import orders_pb2, orders_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return await orders_pb2_grpc.OrdersStub(channel).GetOrder(
            orders_pb2.GetOrderRequest(id=order_id), timeout=5
        )
