"""Every gmesh hook. These docstrings are the plugin author's reference (docs/plugins.md).

A plugin is a module or object with functions named like the specs below, marked with
`gmesh.hookimpl`, and made known through the `gmesh` entry-point group:

    [project.entry-points.gmesh]
    my-plugin = "my_package.gmesh_plugin"

Hooks run when gmesh starts or when config changes, never per request: a hook returns
registrations or factories, and gmesh composes what they give into plain code before
the first call it serves (hot path: never).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from gmesh.config.kinds import KindRegistry

PROJECT = "gmesh"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- config


@hookspec
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    """Add config kinds that users can write in YAML and `gmesh apply`.

    Call ``kinds.add(Kind(name=..., spec=Model, description=...))`` for each kind. The
    spec model should subclass `gmesh.config.types.SpecModel` (camelCase fields, unknown
    fields rejected); pydantic's errors become ``file:line: field.path: message`` for
    users. An optional ``check(resource, view)`` yields ``(field_path, message)`` for
    problems that involve other resources (a name that does not exist, ...).

    :param kinds: the process-wide registry; the first plugin to add a kind name wins,
        and built-ins run last, so a third party can replace a built-in kind.

    Called once per process, when the plugin manager is loaded. Hot path: never.
    """


# --------------------------------------------------------------------------- CLI


@hookspec
def gmesh_register_commands(cli: click.Group) -> None:
    """Add commands (or command groups) to the `gmesh` CLI.

    Call ``cli.add_command(command)``. Commands should give every option a help text;
    errors meant for users should raise `gmesh.errors.GmeshError` subclasses, which the
    CLI prints as one line and turns into exit code 1.

    :param cli: the root `gmesh` click group.

    Called once, when the `gmesh` command starts, before arguments are parsed.
    Hot path: never.
    """
