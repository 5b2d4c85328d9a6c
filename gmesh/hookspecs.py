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

    from gmesh.chain.filter import FilterFactory
    from gmesh.config.kinds import KindRegistry
    from gmesh.stats.edits import AccessLogField, BodyRedactor, MetadataRedactor

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


# --------------------------------------------------------------------------- data path


@hookspec
def gmesh_filter_factories() -> list[FilterFactory]:  # type: ignore[empty-body]
    """Give filter factories for the chain every call runs through (proxy and channel alike).

    Return a list of objects with `name` (str), `phase` (`gmesh.chain.Phase`: OBSERVE,
    AUTHENTICATE, AUTHORIZE, LIMIT, ROUTE, RETRY, ATTEMPT, BALANCE) and
    ``build(ctx) -> Filter | None``. gmesh calls `build` for a service when the service is
    first called in a process and again when its config changes (its `Service`, its
    `Route`, or any resource of a plugin's kind), and composes the filters it returns in
    phase order (then plugin order) in front of the forwarder; return None when the service
    needs nothing from you, so its calls do not pay for your filter.

    `ctx` (`gmesh.chain.BuildContext`): `ctx.service`, `ctx.snapshot` (the whole mesh),
    `ctx.spec` (the service's `Service` spec or None), `ctx.route` (its compiled `Route`
    or None), `ctx.resources(kind)` (resources of any kind, yours included), `ctx.mesh`
    (this process's state of the mesh: breakers, retry budgets, counters) and
    ``ctx.kept(key, make)`` for per-service state that must outlive a config change.

    A `build` that raises makes that service's chain fail closed: every call to it ends
    UNAVAILABLE naming your plugin until a build succeeds, and `gmesh plugins` and the
    proxy's config dump show why (an authorization filter must never fail open).

    A filter is ``async def __call__(self, call, next, /)`` — `next` comes positionally,
    name it as you like: raise ``gmesh.errors.CallError(code, details)`` to end the call
    with a gRPC status, change ``call`` (``call.metadata``, read it with
    ``call.header(key)``) and ``return await next(call)``, or wrap that await (timing,
    retries) and judge how it ended with ``gmesh.chain.outcome_of(error)`` — the one
    classification stats, outlier detection and retries use. Filters are shared by
    concurrent calls: keep per-call state in ``call.stash``.

    Called when a service is first called and when its config changes. Hot path: never
    (the filters it builds are the hot path, and run as plain awaited calls).
    """


# --------------------------------------------------------------------------- telemetry


@hookspec
def gmesh_redact_metadata() -> list[MetadataRedactor]:  # type: ignore[empty-body]
    """Give functions that see request metadata before any of it leaves the process in telemetry.

    Each is ``redact(service, pairs) -> pairs``: `service` is the destination mesh service,
    `pairs` the ``(key, value)`` request metadata about to be shown — the access log's
    `headers` and the `rpc.grpc.request.metadata.*` attributes of trace spans (both list only
    the keys a `Telemetry` resource names). Return the pairs to show: drop a pair, or replace
    its value (e.g. ``"<redacted>"``). Every plugin's functions run, in plugin order. What is
    sent upstream never changes.

    Called once when a process's outbound stack starts; the functions it gives run for each
    logged or traced call, as plain calls. Hot path: never (the hook itself).
    """


@hookspec
def gmesh_redact_bodies() -> list[BodyRedactor]:  # type: ignore[empty-body]
    """Give functions that see message bodies before `gmesh tap --bodies` sends them out.

    Each is ``redact(service, method, direction, body) -> body``: `direction` is
    ``"request"`` or ``"response"``, `body` the serialized message (the bytes a proxy relays,
    or what a channel's serializer makes). Return the bytes to show — the same, a message
    with fields cleared, or ``b""`` to hide it. Runs only for calls a tap with bodies takes.

    Called once when a process's outbound stack starts. Hot path: never (the hook itself).
    """


@hookspec
def gmesh_access_log_fields() -> list[AccessLogField]:  # type: ignore[empty-body]
    """Give functions that add or change fields of access log lines.

    Each is ``field(entry, call) -> None``: `entry` is the line as a dict (written as JSON
    after every function ran), `call` the `gmesh.chain.Call` that ended — its service,
    method, metadata (including what your own filters added), stash and endpoint. Keep them
    cheap: they run for every logged call.

    Called once when a process's outbound stack starts. Hot path: never (the hook itself).
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
