"""`gmesh proxy`: the standalone proxy, and `gmesh get proxies` support."""

from __future__ import annotations

import re
import sys
import time

import click

from gmesh.cli.common import DURATION, MeshTarget, mesh_options, run, table
from gmesh.config.types import age
from gmesh.discovery.endpoint import parse_address, parse_label
from gmesh.errors import InvalidArgument
from gmesh.store.connect import resolve_etcd
from gmesh.store.embedded import data_dir

_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise InvalidArgument(f"size {text!r}: expected a number with an optional unit, e.g. 16MiB")
    return int(match.group(1)) * _UNITS[(match.group(2) or "b").lower()]


@click.command()
@click.option("--listen", "-l", default="127.0.0.1:15001", show_default=True, help="HOST:PORT for calls")
@click.option(
    "--admin",
    default="127.0.0.1:15000",
    show_default=True,
    help="HOST:PORT for health, reflection and config dump ('' to disable)",
)
@click.option(
    "--metrics",
    default="",
    metavar="HOST:PORT",
    help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (with --workers N, "
    "worker i serves PORT+i) [default: off]",
)
@click.option(
    "--access-log",
    default=None,
    metavar="FILE",
    help="where access log lines go ('-' for stderr), for services whose Telemetry turns the access "
    "log on [default: GMESH_ACCESS_LOG, else stderr]",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="processes sharing the listen port (SO_REUSEPORT)",
)
@click.option(
    "--drain-timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    help="on SIGTERM, how long calls in flight may finish before they are cancelled",
)
@click.option(
    "--drain-delay",
    type=DURATION,
    default="2s",
    show_default=True,
    help="on SIGTERM, how long the proxy keeps serving after it turns NOT_SERVING and withdraws "
    "its record, before it stops accepting calls",
)
@click.option(
    "--idle-timeout",
    type=DURATION,
    default=None,
    help="close a service's connections (and stop its health checks) after this long without "
    "calls [default: 10m, or GMESH_IDLE_TIMEOUT]",
)
@click.option(
    "--replay-budget",
    default="64MiB",
    show_default=True,
    help="request bytes all retried streams may keep for replay together; beyond it streams go "
    "on without retry protection",
)
@click.option(
    "--max-message-size",
    default="4MiB",
    show_default=True,
    help="largest message accepted or forwarded, e.g. 16MiB",
)
@click.option(
    "--snapshot-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="where to persist the last snapshot, so a restart without etcd still serves "
    "[default: in the gmesh data dir, per listen port]",
)
@click.option(
    "--caller-label",
    "caller_labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="a label of the workload this proxy serves (repeatable); Route rules match calls "
    "through it with match.caller.labels",
)
@click.option(
    "--zone",
    envvar="GMESH_ZONE",
    default="",
    help="the zone this proxy runs in; Services with balancer.zoneAware prefer endpoints "
    "there [env GMESH_ZONE]",
)
@click.option(
    "--max-connection-age",
    type=DURATION,
    default=None,
    help="clients reconnect after this long (GOAWAY; calls in flight get 30 s more), so their "
    "connections spread again over workers and proxies [default: never]",
)
@click.option(
    "--identity",
    default=None,
    metavar="SERVICE",
    help="the mesh service this proxy's calls present: a certificate from the mesh CA, renewed by "
    "itself, shown in mutual TLS to every endpoint that offers it [default: none, plaintext]",
)
@click.option(
    "--token",
    envvar="GMESH_JOIN_TOKEN",
    default=None,
    help="join token for the identity's first certificate (`gmesh ca token`) [env GMESH_JOIN_TOKEN; "
    "default: the local token file on the CA's machine]",
)
@click.option(
    "--inbound",
    default=None,
    metavar="APP_HOST:PORT",
    help="sidecar mode: terminate mTLS for --service in front of the app at APP_HOST:PORT "
    "(plaintext, any language), enforce AuthorizationPolicies, register the endpoint",
)
@click.option("--service", default=None, help="with --inbound: the mesh service the app serves")
@click.option(
    "--listen-tls",
    default=None,
    metavar="HOST:PORT",
    help="with --inbound: where mutual TLS is served (registered as the endpoint's mTLS address)",
)
@click.option(
    "--listen-plain",
    default=None,
    metavar="HOST:PORT",
    help="with --inbound: where plaintext is served too (tls.mode PERMISSIVE or DISABLED)",
)
@click.option(
    "--worker-index",
    type=int,
    default=None,
    hidden=True,
    help="set by --workers for each worker process it starts",
)
@mesh_options
def proxy(
    target: MeshTarget,
    listen: str,
    admin: str,
    metrics: str,
    access_log: str | None,
    workers: int,
    drain_timeout: float,
    drain_delay: float,
    idle_timeout: float | None,
    replay_budget: str,
    max_message_size: str,
    snapshot_file: str | None,
    caller_labels: tuple[str, ...],
    zone: str,
    max_connection_age: float | None,
    identity: str | None,
    token: str | None,
    inbound: str | None,
    service: str | None,
    listen_tls: str | None,
    listen_plain: str | None,
    worker_index: int | None,
) -> None:
    """Run the standalone proxy: any gRPC method, routed to mesh services, raw bytes.

    A call's destination is the mesh service named by its x-gmesh-service header, else
    the one whose endpoints serve the gRPC service of its method path. Metadata,
    deadlines, cancellation, status and trailers pass through unchanged. SIGTERM
    drains: NOT_SERVING and the proxy's record withdrawn, --drain-delay more of service,
    then no new calls while calls in flight get --drain-timeout. A port already in use is
    an error (only the --workers of one proxy share a port). With etcd unreachable at
    start, it serves the snapshot its last run persisted. Connections to a service are
    made when it is first called and closed after --idle-timeout without calls. Runs on
    uvloop when it is installed (GMESH_EVENT_LOOP=asyncio to opt out).

    With --identity, calls leave with mutual TLS to endpoints that offer it. With --inbound
    APP --service S --listen-tls HOST:PORT it is also S's sidecar: mTLS in, authorization,
    plaintext to the app on loopback (docs/security.md).
    """
    from pathlib import Path

    from gmesh.proxy.run import ProxySettings, serve, supervise

    parse_address(listen)
    if admin:
        parse_address(admin)
    if metrics:
        parse_address(metrics)
    from gmesh.discovery.endpoint import check_service_name

    if identity:
        check_service_name(identity)
    if inbound or service or listen_tls or listen_plain:
        if not (inbound and service and listen_tls):
            raise InvalidArgument("sidecar mode needs --inbound APP_HOST:PORT, --service and --listen-tls")
        parse_address(inbound)
        parse_address(listen_tls)
        if listen_plain:
            parse_address(listen_plain)
        check_service_name(service)
        if identity and identity != service:
            raise InvalidArgument(
                f"--identity {identity} and --service {service}: a sidecar has one identity"
            )
        if workers > 1:
            raise InvalidArgument("--inbound runs in one process (no --workers)")
    max_bytes = parse_size(max_message_size)
    budget = parse_size(replay_budget)
    labels = dict(parse_label(text) for text in caller_labels)
    if workers > 1 and worker_index is None:
        argv = [a for a in sys.argv[1:]]
        raise SystemExit(supervise(argv, workers, listen))
    port = listen.rpartition(":")[2]
    index = worker_index or 0
    snapshot = Path(snapshot_file) if snapshot_file else data_dir() / "snapshots" / f"proxy-{port}.json"

    async def go() -> None:
        etcd = await resolve_etcd(target.etcd, **target.options)
        settings = ProxySettings(
            listen=listen,
            admin=admin or None,
            metrics=metrics or None,
            access_log=access_log,
            etcd=etcd,
            keys=target.keys,
            drain_timeout=drain_timeout,
            drain_delay=drain_delay,
            idle_timeout=idle_timeout,
            replay_budget=budget,
            max_message_bytes=max_bytes,
            snapshot_file=snapshot,
            worker=index,
            workers=workers,
            caller_labels=labels,
            zone=zone,
            max_connection_age=max_connection_age,
            identity=identity,
            token=token,
            inbound=inbound,
            service=service,
            listen_tls=listen_tls,
            listen_plain=listen_plain,
        )

        def announce(p: object) -> None:
            from gmesh.proxy.run import RunningProxy

            assert isinstance(p, RunningProxy)
            info = p.info()
            click.echo(
                f"gmesh proxy listening on {info['address']} (admin {info['admin'] or 'off'}, "
                f"metrics {(info['metrics'] and 'http://' + info['metrics'] + '/metrics') or 'off'}, "
                f"worker {index}, pid {info['pid']}), "
                f"serving revision {info['revision']} from {info['source']}"
                + (f", identity {info['identity']}" if info.get("identity") else "")
                + (f", inbound mTLS on {info['inbound']}" if info.get("inbound") else ""),
                err=True,
            )

        await serve(settings, announce=announce)

    run(go(), fast_loop=True)


def proxies_table(records: list[dict[str, object]]) -> str:
    now = time.time()
    rows = [
        [
            str(r.get("id", "?")),
            str(r.get("address", "?")),
            str(r.get("admin", "") or "-"),
            str(r.get("revision", "?")),
            str(r.get("pid", "?")),
            age(now - float(r.get("startedAt", now))),  # type: ignore[arg-type]
        ]
        for r in records
    ]
    return table(["ID", "ADDRESS", "ADMIN", "REVISION", "PID", "AGE"], rows)
