"""The `gmesh` command line. Plugins add commands through `gmesh_register_commands`."""

from __future__ import annotations

import os
import sys

import click

from gmesh import __version__
from gmesh.cli.common import GmeshGroup, fail, setup_logging


@click.group(
    cls=GmeshGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="gmesh")
@click.option(
    "--log-level",
    envvar="GMESH_LOG_LEVEL",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="what gmesh logs to stderr [env GMESH_LOG_LEVEL]",
)
def cli(log_level: str) -> None:
    """gmesh: a gRPC-first service mesh — discovery and config in etcd, one pluggable filter chain.

    With no --etcd (or GMESH_ETCD), commands use the embedded etcd on this machine and
    start it when it is not running.
    """
    setup_logging(log_level)


def _add_builtin_commands() -> None:
    from gmesh.cli import (
        ca_cmd,
        config_cmd,
        dashboard_cmd,
        demo,
        etcd_cmd,
        explain_cmd,
        plugins_cmd,
        proxy_cmd,
        register_cmd,
        rollout_cmd,
        stat_cmd,
        tap_cmd,
    )

    for command in (
        etcd_cmd.etcd,
        register_cmd.register,
        proxy_cmd.proxy,
        config_cmd.apply,
        config_cmd.get,
        config_cmd.delete,
        config_cmd.schema,
        explain_cmd.explain,
        rollout_cmd.rollout,
        ca_cmd.ca,
        stat_cmd.stat,
        stat_cmd.top,
        dashboard_cmd.dashboard,
        tap_cmd.tap,
        plugins_cmd.plugins,
        demo.demo,
    ):
        cli.add_command(command)


def main() -> None:
    """Console entry point: load plugins (they may add commands), then run the CLI."""
    from gmesh.errors import GmeshError
    from gmesh.pluginmanager import Plugins

    _add_builtin_commands()
    try:
        Plugins.load().register_commands(cli)
    except GmeshError as exc:
        fail(str(exc))
    except Exception as exc:  # a broken third-party plugin must not hide every command
        if os.environ.get("GMESH_DEBUG"):
            raise
        click.echo(f"error: a gmesh plugin failed to load: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="gmesh")
