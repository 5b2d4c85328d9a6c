"""`gmesh dashboard`: the mesh in a browser, live."""

from __future__ import annotations

import sys

import click

from gmesh.cli.common import MeshTarget, mesh_options, run

DEFAULT_LISTEN = "127.0.0.1:15080"


@click.command()
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="where to serve the dashboard (loopback unless you say otherwise; port 0: any free port)",
)
@click.option(
    "--allow-writes",
    is_flag=True,
    help="let the page act on the mesh (abort a rollout); off by default: the page only reads",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="a host name browsers may reach the dashboard by (repeatable), besides IP addresses, localhost "
    "and the --listen host; others are refused (DNS rebinding)",
)
@mesh_options
def dashboard(target: MeshTarget, listen: str, allow_writes: bool, allow_hosts: tuple[str, ...]) -> None:
    """Serve a web dashboard of the mesh: service graph, services, rollouts, config, proxies.

    Pages update by themselves (server-sent events) within about two seconds of a change. Every
    number comes from what proxies and gmesh:/// channels already publish to etcd: the
    dashboard watches the catalog and reads four key ranges once a second, however many pages
    are open, and never calls a proxy. Ctrl-C stops it.
    """
    try:
        run(serve_dashboard(target, listen, allow_writes, allow_hosts))
    except KeyboardInterrupt:
        sys.exit(0)


async def serve_dashboard(
    target: MeshTarget, listen: str, allow_writes: bool, allow_hosts: tuple[str, ...] = ()
) -> None:
    from gmesh.dashboard.app import serve
    from gmesh.dashboard.model import MeshView
    from gmesh.pluginmanager import Plugins
    from gmesh.store.connect import resolve_etcd
    from gmesh.store.etcd import Store

    config = await resolve_etcd(target.etcd, **target.options)
    store = await Store.connect(config)
    try:
        view = MeshView(store, target.keys, Plugins.load().config_kinds())

        def ready(server: object) -> None:
            url = getattr(server, "url", "")
            click.echo(f"gmesh dashboard on {url} (etcd {config.describe()}, prefix {target.keys.prefix})")
            click.echo("writes are on: the page can abort rollouts" if allow_writes else "read-only")
            sys.stdout.flush()

        await serve(view, listen, allow_writes=allow_writes, hosts=allow_hosts, on_ready=ready)
    finally:
        await store.close()
