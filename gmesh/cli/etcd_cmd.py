"""`gmesh etcd start|stop|status`: the embedded etcd of this machine."""

from __future__ import annotations

import time

import click

from gmesh.config.types import age
from gmesh.store.embedded import EmbeddedEtcd, is_healthy


@click.group()
def etcd() -> None:
    """Run the embedded etcd (for one machine; give --etcd to use a real cluster instead).

    Its data lives under the user's data dir (GMESH_DATA_DIR overrides); a state file
    there tells every gmesh command where it listens.
    """


@etcd.command()
def start() -> None:
    """Start the embedded etcd on 127.0.0.1 (no-op when it already runs)."""
    state, started = EmbeddedEtcd().start()
    verb = "started" if started else "already running"
    click.echo(f"embedded etcd {verb}: {state.client_url} (pid {state.pid}, data {state.data_dir})")


@etcd.command()
def stop() -> None:
    """Stop the embedded etcd (its data stays for the next start)."""
    state = EmbeddedEtcd().stop()
    if state is None:
        click.echo("embedded etcd is not running")
    else:
        click.echo(f"embedded etcd stopped (was {state.client_url}, pid {state.pid})")


@etcd.command()
def status() -> None:
    """Say whether the embedded etcd runs, where, and whether it is healthy. Exit 3 when stopped."""
    embedded = EmbeddedEtcd()
    state = embedded.status()
    if state is None:
        click.echo(f"embedded etcd is not running (data dir {embedded.root})")
        raise SystemExit(3)
    health = "healthy" if is_healthy(state.client_url) else "NOT healthy"
    click.echo(
        f"embedded etcd running: {state.client_url} pid {state.pid}, {health}, "
        f"up {age(time.time() - state.started_at)}, data {state.data_dir}, log {state.log_file}"
    )
