"""`gmesh register`: hold an endpoint registration in the foreground for a server of any language."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import click

from gmesh.cli.common import DURATION, MeshTarget, mesh_options, run
from gmesh.discovery.endpoint import check_grpc_service, check_service_name, parse_address, parse_label
from gmesh.discovery.registry import DEFAULT_TTL, Registration
from gmesh.store.connect import resolve_etcd


@click.command()
@click.option("--service", "-s", required=True, help="mesh service this endpoint serves, e.g. orders")
@click.option("--address", "-a", required=True, help="HOST:PORT the server listens on")
@click.option(
    "--label",
    "-l",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="endpoint label (repeatable), e.g. --label version=v2",
)
@click.option(
    "--grpc-service",
    "grpc_services",
    multiple=True,
    metavar="NAME",
    help="gRPC service served (repeatable); used when the server offers no reflection",
)
@click.option("--zone", default="", help="locality zone of the endpoint")
@click.option(
    "--weight",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="relative share of traffic; 0 drains the endpoint",
)
@click.option(
    "--ttl",
    type=click.IntRange(min=2),
    default=DEFAULT_TTL,
    show_default=True,
    help="lease seconds: how long a dead process stays listed",
)
@click.option(
    "--health-check",
    is_flag=True,
    help="poll grpc.health.v1 and withdraw the endpoint while it is not SERVING",
)
@click.option(
    "--health-service", default="", help="service name to ask the health check about (default: server)"
)
@click.option(
    "--health-interval", type=DURATION, default="2s", show_default=True, help="health poll interval"
)
@click.option(
    "--drain-delay",
    type=DURATION,
    default="2s",
    show_default=True,
    help="on Ctrl-C or SIGTERM, how long to wait after withdrawing the endpoint before exiting "
    "(calls already routed to it still land)",
)
@click.option("--no-reflection", is_flag=True, help="do not ask the server which gRPC services it serves")
@mesh_options
def register(
    target: MeshTarget,
    service: str,
    address: str,
    labels: tuple[str, ...],
    grpc_services: tuple[str, ...],
    zone: str,
    weight: int,
    ttl: int,
    health_check: bool,
    health_service: str,
    health_interval: float,
    drain_delay: float,
    no_reflection: bool,
) -> None:
    """Register ADDRESS as an endpoint of SERVICE until interrupted.

    Stays in the foreground holding the registration's lease; Ctrl-C or SIGTERM withdraws
    it at once and exits after --drain-delay (stop the server after that), a crash lets it
    expire after --ttl seconds. The gRPC services served are
    learned from server reflection when the server offers it, else taken from
    --grpc-service.
    """
    check_service_name(service)
    parse_address(address)
    parsed_labels = dict(parse_label(text) for text in labels)
    for name in grpc_services:
        check_grpc_service(name)
    run(
        _hold(
            target,
            dict(
                address=address,
                service=service,
                labels=parsed_labels,
                grpc_services=grpc_services,
                zone=zone,
                weight=weight,
                ttl=ttl,
                prefix=target.keys.prefix,
                reflection=not no_reflection,
                health_check=health_check,
                health_service=health_service,
                health_interval=health_interval,
                handle_sigterm=False,
                drain_delay=drain_delay,
            ),
        )
    )


async def _hold(target: MeshTarget, options: dict[str, Any]) -> None:
    etcd = await resolve_etcd(target.etcd, **target.options)
    registration = Registration(options.pop("address"), etcd=etcd, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with registration:
        ep = registration.endpoint
        assert ep is not None
        services = ", ".join(ep.grpc_services) or "none"
        state = "registered" if registration.published else "waiting for SERVING before registering"
        click.echo(
            f"{state}: {registration.service} {registration.address} "
            f"(labels {dict(ep.labels) or '{}'}, gRPC services {services} [{ep.grpc_services_from}], "
            f"ttl {registration.ttl}s); Ctrl-C to withdraw",
            err=True,
        )
        await stop.wait()
        click.echo(
            f"withdrawing: {registration.service} {registration.address}; exiting in "
            f"{registration.drain_delay:g}s",
            err=True,
        )
    click.echo(f"withdrawn: {registration.service} {registration.address}", err=True)
