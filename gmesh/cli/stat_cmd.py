"""`gmesh stat` and `gmesh top`: the mesh's golden signals (success rate, requests/s, latency) per
service, route rule, backend and method, from the counters every proxy and channel publishes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click

from gmesh.cli.common import DURATION, MeshTarget, mesh_options, run, table
from gmesh.stats import golden
from gmesh.store.etcd import Store

#: the counters are published once a second: a window must be longer to see anything
MIN_WINDOW = 2.0


def _row(signals: golden.Signals, seconds: float) -> list[str]:
    s = golden.summary(signals, seconds)
    return [
        str(s["calls"]),
        golden.format_percent(s["successRate"]),
        f"{s['rps']:.1f}",
        golden.format_ms(s["p50Ms"]),
        golden.format_ms(s["p95Ms"]),
        golden.format_ms(s["p99Ms"]),
    ]


async def _measure(
    store: Store, target: MeshTarget, service: str | None, seconds: float, say: bool = True
) -> tuple[dict[golden.RowKey, golden.Signals], float]:
    before = await golden.read_calls(store, target.keys, service)
    started = time.monotonic()
    if say:
        click.echo(f"measuring for {seconds:g}s ...", err=True)
    await asyncio.sleep(seconds)
    after = await golden.read_calls(store, target.keys, service)
    return golden.window(before, after), time.monotonic() - started


def stat_document(rows: dict[golden.RowKey, golden.Signals], seconds: float) -> dict[str, Any]:
    """`gmesh stat -o json`: per service, its totals, its routes and backends, its methods."""
    services = []
    for (service,), signals in sorted(golden.group(rows, lambda k: (k[0],)).items()):
        mine = {k: v for k, v in rows.items() if k[0] == service}
        services.append(
            {
                "service": service,
                **golden.summary(signals, seconds),
                "routes": [
                    {"route": route, "backend": backend, **golden.summary(s, seconds)}
                    for (route, backend), s in sorted(golden.group(mine, lambda k: (k[2], k[3])).items())
                ],
                "methods": [
                    {"method": method, **golden.summary(s, seconds)}
                    for (method,), s in sorted(golden.group(mine, lambda k: (k[4],)).items())
                ],
                "doors": {
                    door: s.calls for (door,), s in sorted(golden.group(mine, lambda k: (k[1],)).items())
                },
            }
        )
    return {"windowSeconds": round(seconds, 3), "services": services}


@click.command()
@click.argument("service", required=False)
@click.option(
    "--window",
    type=DURATION,
    default="10s",
    show_default=True,
    help="how long to measure (the command waits this long; at least 2s)",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="a table, or JSON with per-method and per-door counts too",
)
@mesh_options
def stat(target: MeshTarget, service: str | None, window: float, output: str) -> None:
    """Golden signals of every service (or SERVICE): calls, success rate, requests/s, p50/p95/p99.

    Measured over --window from the counters every `gmesh proxy` and `gmesh:///` channel
    publishes each second, summed over all of them. One row per service, then one per route
    rule and backend. Success rate counts server-side failures (UNKNOWN, DEADLINE_EXCEEDED,
    UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) as failed.
    """
    window = max(window, MIN_WINDOW)

    async def go() -> tuple[dict[golden.RowKey, golden.Signals], float]:
        async with target.store() as store:
            return await _measure(store, target, service, window)

    rows, seconds = run(go())
    if output == "json":
        click.echo(json.dumps(stat_document(rows, seconds), indent=2))
        return
    if not rows:
        click.echo(f"no calls in the last {seconds:.0f}s" + (f" to {service}" if service else ""))
        return
    out = []
    for (name,), signals in sorted(golden.group(rows, lambda k: (k[0],)).items()):
        out.append([name, "*", "*", *_row(signals, seconds)])
        mine = {k: v for k, v in rows.items() if k[0] == name}
        for (route, backend), s in sorted(golden.group(mine, lambda k: (k[2], k[3])).items()):
            out.append(["", route or "-", backend, *_row(s, seconds)])
    click.echo(table(["SERVICE", "ROUTE", "BACKEND", "CALLS", "SUCCESS", "RPS", "P50", "P95", "P99"], out))


def top_frame(service: str, rows: dict[golden.RowKey, golden.Signals], seconds: float, limit: int) -> Any:
    """One frame of `gmesh top`: the busiest methods and backends of `service`."""
    from rich.console import Group
    from rich.table import Table

    def busiest(by: Any, title: str, label: str) -> Table:
        grid = Table(title=title, title_justify="left", expand=False)
        for name in (label, "RPS", "SUCCESS", "P50", "P99", "CALLS"):
            grid.add_column(name, justify="left" if name == label else "right")
        groups = sorted(golden.group(rows, by).items(), key=lambda item: -item[1].calls)[:limit]
        for (name,), s in groups:
            calls, success, rps, p50, _p95, p99 = _row(s, seconds)
            grid.add_row(name or "-", rps, success, p50, p99, calls)
        return grid

    total = golden.Signals()
    for s in rows.values():
        total.add(s)
    head = (
        f"{service}: {total.calls / seconds if seconds else 0:.1f} calls/s, "
        f"success {golden.format_percent(total.success_rate)}, last {seconds:.1f}s"
    )
    return Group(
        head,
        busiest(lambda k: (k[4],), "methods", "METHOD"),
        busiest(lambda k: (k[3],), "backends", "BACKEND"),
    )


@click.command()
@click.argument("service")
@click.option(
    "--interval", type=DURATION, default="2s", show_default=True, help="refresh every (at least 2s)"
)
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True, help="rows per table")
@click.option("--once", is_flag=True, help="print one frame (measured over --interval) and exit")
@mesh_options
def top(target: MeshTarget, service: str, interval: float, limit: int, once: bool) -> None:
    """A live view of SERVICE's busiest methods and backends: requests/s, success rate, p50, p99.

    Refreshes every --interval from the counters every proxy and channel publishes; Ctrl-C
    stops. --once prints a single frame, for scripts.
    """
    from rich.console import Console
    from rich.live import Live

    interval = max(interval, MIN_WINDOW)
    console = Console()

    async def go() -> None:
        async with target.store() as store:
            if once:
                rows, seconds = await _measure(store, target, service, interval)
                console.print(top_frame(service, rows, seconds, limit))
                return
            before = await golden.read_calls(store, target.keys, service)
            started = time.monotonic()
            with Live(f"{service}: measuring ...", console=console, refresh_per_second=2) as live:
                while True:
                    await asyncio.sleep(interval)
                    after = await golden.read_calls(store, target.keys, service)
                    now = time.monotonic()
                    live.update(top_frame(service, golden.window(before, after), now - started, limit))
                    before, started = after, now

    try:
        run(go())
    except KeyboardInterrupt:
        sys.exit(0)
