"""`gmesh apply | get | delete | schema`: config resources and endpoints in etcd."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from gmesh.cli.common import MeshTarget, mesh_options, run, table
from gmesh.config.apply import delete_resource, plan_apply, read_config, render_diff, to_yaml, write_plan
from gmesh.config.kinds import KindRegistry
from gmesh.config.loader import load_paths
from gmesh.config.schema import json_schema
from gmesh.config.types import age
from gmesh.discovery.endpoint import Endpoint, check_service_name
from gmesh.errors import ConfigError, InvalidArgument, NotFound
from gmesh.pluginmanager import Plugins

ENDPOINTS = ("endpoints", "endpoint", "ep", "eps")
PROXIES = ("proxies", "proxy", "px")


def _kinds() -> KindRegistry:
    return Plugins.load().config_kinds()


@click.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="YAML file or directory of them (repeatable)",
)
@click.option("--dry-run", is_flag=True, help="validate and show the diff, write nothing")
@mesh_options
def apply(target: MeshTarget, paths: tuple[Path, ...], dry_run: bool) -> None:
    """Validate config documents, show what changes, and write them all in one transaction.

    Every document is checked first; any problem is reported with file:line and field
    path, and then nothing is written. Resources not named in the files are left as they
    are.
    """
    kinds = _kinds()
    docs, problems = load_paths(list(paths))
    if problems:
        raise ConfigError(problems)
    if not docs:
        raise InvalidArgument(f"no config documents in {', '.join(map(str, paths))}")

    async def go() -> None:
        async with target.store() as store:
            plan = await plan_apply(store, target.keys, kinds, docs)
            click.echo(render_diff(plan))
            pending = len(plan.pending)
            if dry_run:
                click.echo(f"dry run: {pending} change(s) not written")
                return
            if not pending:
                click.echo("nothing to change")
                return
            revision = await write_plan(store, target.keys, plan)
            click.echo(f"applied {pending} change(s) at revision {revision}")

    run(go())


@click.command()
@click.argument("kind")
@click.argument("name", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "yaml", "json"]),
    default="table",
    show_default=True,
    help="output format",
)
@mesh_options
def get(target: MeshTarget, kind: str, name: str | None, output: str) -> None:
    """Show config resources of KIND (e.g. service), registered endpoints, or running proxies.

    `gmesh get endpoints [SERVICE]` lists the endpoints of every service (or of one);
    `gmesh get proxies` lists running proxies and the config revision each serves;
    `gmesh get quota NAME` also shows the quota's use per key in the current window.
    """
    if kind.lower() in PROXIES:
        run(_get_proxies(target, output))
        return
    if kind.lower() in ENDPOINTS:
        if name is not None:
            check_service_name(name)
        run(_get_endpoints(target, name, output))
        return
    registry = _kinds()
    found = registry.require(kind)

    async def go() -> None:
        async with target.store() as store:
            stored = await read_config(store, target.keys, registry, found)
        resources = sorted(stored.view.of_kind(found.name).values(), key=lambda r: r.name)
        if name is not None:
            resources = [r for r in resources if r.name == name]
            if not resources:
                raise NotFound(f"{found.name}/{name} not found")
        if output == "json":
            docs = [r.document() for r in resources]
            click.echo(json.dumps(docs[0] if name else docs, indent=2))
        elif output == "yaml":
            click.echo(to_yaml([r.document() for r in resources]).rstrip())
        elif not resources:
            click.echo(f"no {found.name} resources")
        else:
            rows = [
                [r.name, found.summary(r.spec) if found.summary else "", str(r.revision)] for r in resources
            ]
            click.echo(table(["NAME", "SPEC", "REVISION"], rows))
            if found.name == "Quota" and name is not None:
                click.echo("")
                click.echo(await _quota_usage(target, resources[0]))
        for key, reason in stored.invalid.items():
            click.echo(f"warning: {key} is stored but invalid, and ignored: {reason}", err=True)

    run(go())


async def _get_endpoints(target: MeshTarget, service: str | None, output: str) -> None:
    async with target.store() as store:
        root = target.keys.endpoints_of(service) if service else target.keys.endpoints_root
        kvs, _ = await store.get_prefix(root)
    endpoints: list[Endpoint] = []
    for kv in kvs:
        parsed = target.keys.parse(kv.key)
        if parsed is None or parsed.what != "endpoint":
            continue
        try:
            endpoints.append(
                Endpoint.from_json(parsed.group, kv.value, lease=kv.lease, revision=kv.mod_revision)
            )
        except (ValueError, TypeError) as exc:
            click.echo(f"warning: {kv.key} is malformed, ignored: {exc}", err=True)
    endpoints.sort(key=lambda e: (e.service, e.address))
    if output in ("json", "yaml"):
        docs: list[dict[str, Any]] = [{"service": e.service, **json.loads(e.to_json())} for e in endpoints]
        click.echo(json.dumps(docs, indent=2) if output == "json" else to_yaml(docs).rstrip())
        return
    if not endpoints:
        click.echo(f"no endpoints{f' for service {service}' if service else ''}")
        return
    click.echo(endpoints_table(endpoints))


def endpoints_table(endpoints: list[Endpoint]) -> str:
    now = time.time()
    rows = [
        [
            e.service,
            e.address,
            ("only" if e.tls == e.address else e.tls) if e.tls else "-",
            ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())) or "-",
            ",".join(e.grpc_services) or "-",
            e.zone or "-",
            str(e.weight),
            age(now - e.registered_at) if e.registered_at else "?",
        ]
        for e in endpoints
    ]
    return table(["SERVICE", "ADDRESS", "MTLS", "LABELS", "GRPC SERVICES", "ZONE", "WEIGHT", "AGE"], rows)


async def _get_proxies(target: MeshTarget, output: str) -> None:
    from gmesh.cli.proxy_cmd import proxies_table

    async with target.store() as store:
        kvs, revision = await store.get_prefix(target.keys.proxies_root)
    records = []
    for kv in kvs:
        try:
            records.append(json.loads(kv.value))
        except ValueError:
            click.echo(f"warning: {kv.key} is malformed, ignored", err=True)
    records.sort(key=lambda r: str(r.get("id", "")))
    if output in ("json", "yaml"):
        click.echo(json.dumps(records, indent=2) if output == "json" else to_yaml(records).rstrip())
    elif not records:
        click.echo("no proxies")
    else:
        click.echo(proxies_table(records))
        click.echo(f"(etcd is at revision {revision})")


@click.command()
@click.argument("kind")
@click.argument("name")
@mesh_options
def delete(target: MeshTarget, kind: str, name: str) -> None:
    """Delete the config resource KIND/NAME."""
    found = _kinds().require(kind)

    async def go() -> None:
        async with target.store() as store:
            revision = await delete_resource(store, target.keys, found, name)
        click.echo(f"deleted {found.name}/{name} at revision {revision}")

    run(go())


@click.command()
@click.argument("kind", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="write to a file")
def schema(kind: str | None, output: Path | None) -> None:
    """Print the JSON Schema of config documents (all kinds, or KIND), for editors.

    For example, with the YAML language server: `gmesh schema -o gmesh.schema.json` and
    `# yaml-language-server: $schema=gmesh.schema.json` at the top of your files.
    """
    kinds = _kinds()
    text = json.dumps(json_schema(kinds, kinds.require(kind) if kind else None), indent=2)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text + "\n")
        click.echo(f"wrote {output}", err=True)


async def _quota_usage(target: MeshTarget, resource: Any) -> str:
    """Tokens taken per key in the current window of a Quota (from its counters in etcd)."""
    import time as clock
    from urllib.parse import unquote

    from gmesh.config.types import format_duration
    from gmesh.ratelimit.quota import window_of

    spec = resource.spec
    window, ends = window_of(spec, clock.time())
    prefix = target.keys.quota_window(resource.name, str(window))
    async with target.store() as store:
        kvs, _ = await store.get_prefix(prefix)
    rows = []
    for kv in sorted(kvs, key=lambda kv: -int(kv.value or b"0")):
        name = unquote(kv.key[len(prefix) :])
        key = name[1:] if name.startswith("=") else "(all calls)"
        used = int(kv.value or b"0")
        rows.append([key, str(used), str(spec.limit), str(max(spec.limit - used, 0))])
    left = format_duration(round(ends - clock.time()))
    head = f"window ends in {left} (tokens processes took and hold count as used)"
    return (
        head
        + "\n"
        + (table(["KEY", "USED", "LIMIT", "LEFT"], rows) if rows else "no calls counted in this window")
    )
