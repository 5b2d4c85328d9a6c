"""`gmesh plugins`: which plugins are loaded, from which distribution, and what they give."""

from __future__ import annotations

import click

from gmesh.cli.common import table
from gmesh.pluginmanager import DISABLE_ENV, Plugins


@click.command()
@click.option("-v", "--verbose", is_flag=True, help="also list the hooks each plugin implements")
def plugins(verbose: bool) -> None:
    """List loaded plugins: name, distribution, version, and the config kinds and chain
    filters (with their phase) each gives — built-ins included.

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
