"""`gmesh plugins`: which plugins are loaded, from which distribution, what they give, and whether
their filters build for the services of the mesh."""

from __future__ import annotations

import sys

import click

from gmesh.chain.compose import order
from gmesh.cli.common import MeshTarget, mesh_options, run, table
from gmesh.errors import GmeshError
from gmesh.pluginmanager import DISABLE_ENV, Plugins


@click.command()
@click.option("-v", "--verbose", is_flag=True, help="also list the hooks each plugin implements")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="build every service's chain from the mesh's config in etcd and report filters that fail "
    "(a service whose chain fails refuses its calls); skipped when no etcd is reachable",
)
@mesh_options
def plugins(target: MeshTarget, verbose: bool, check: bool) -> None:
    """List loaded plugins: name, distribution, version, and the config kinds and chain
    filters (with their phase) each gives — built-ins included. Then, with --check, build
    every service's chain as proxies and channels would, and list the filters that fail to
    build: their services refuse every call (UNAVAILABLE naming the plugin) until they do.
    Exits 1 when one fails.

    Plugins come from the `gmesh` entry-point group; set GMESH_DISABLE_PLUGINS=a,b to
    leave some out.
    """
    loaded = Plugins.load()
    kinds = loaded.config_kinds()
    filters = loaded.filters_by_plugin()
    rows = []
    for info in loaded.describe():
        gives = [f"kind {k.name}" for k in kinds if k.plugin == info.name]
        gives += [f"filter {f.name} ({f.phase.name})" for f in filters.get(info.name, ())]
        row = [
            info.name,
            info.distribution,
            info.version or "-",
            "yes" if info.builtin else "no",
            ", ".join(gives) or "-",
        ]
        if verbose:
            row.append(", ".join(info.hooks))
        rows.append(row)
    headers = ["NAME", "DISTRIBUTION", "VERSION", "BUILT-IN", "GIVES"] + (["HOOKS"] if verbose else [])
    click.echo(table(headers, rows))
    blocked = [name for name, plugin in loaded.pm.list_name_plugin() if plugin is None]
    if blocked:
        click.echo(f"disabled by {DISABLE_ENV}: {', '.join(sorted(blocked))}")
    if not check:
        return
    try:
        failures, services = run(_check(target, loaded))
    except GmeshError as exc:
        click.echo(f"chains not checked: {exc}")
        return
    if not failures:
        click.echo(f"chains: every filter builds for the {services} services of the mesh")
        return
    click.echo(f"chains: {len(failures)} of {services} services refuse every call:")
    for service, error in failures:
        click.echo(f"  {service}: {error}")
    sys.exit(1)


async def _check(target: MeshTarget, loaded: Plugins) -> tuple[list[tuple[str, str]], int]:
    """(service, why its chain fails) for every service whose chain does not build."""
    from gmesh.discovery.catalog import Catalog
    from gmesh.outbound.mesh import MeshState, compile_chain
    from gmesh.store.connect import resolve_etcd
    from gmesh.store.etcd import Store

    config = await resolve_etcd(target.etcd, start_embedded=False, **target.options)
    store = await Store.connect(config)
    try:
        await store.ping()
        async with Catalog(store, target.keys, loaded.config_kinds()) as catalog:
            snapshot = catalog.snapshot
    finally:
        await store.close()
    factories = order(loaded.filter_factories())
    mesh = MeshState(lambda: snapshot)
    failures = []
    for service in snapshot.services():
        chain = compile_chain(snapshot, factories, service, mesh)
        if chain.error is not None:
            failures.append((service, chain.error))
    return failures, len(snapshot.services())
