"""gmesh-owners: an `Owner` config kind, a chain filter that tags calls with their owning team, the
team in every access log line, credentials kept out of telemetry, and a `gmesh owners` command —
an example gmesh plugin to copy."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
from pydantic import Field, field_validator

from gmesh import hookimpl
from gmesh.chain import BuildContext, Call, Filter, FilterFactory, Handler, Phase, outcome_of
from gmesh.config.kinds import ConfigView, Kind, KindRegistry, Resource
from gmesh.config.types import Name, SpecModel

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class OwnerSpec(SpecModel):
    """Who runs a set of services."""

    team: str = Field(min_length=1, description="Team name, as people say it.")
    contact: str = Field(description="E-mail of the on-call or team list.")
    services: list[Name] = Field(min_length=1, description="Mesh services this team owns.")

    @field_validator("contact")
    @classmethod
    def _email(cls, contact: str) -> str:
        if not _EMAIL.fullmatch(contact):
            raise ValueError(f"{contact!r} is not an e-mail address")
        return contact


def _check(resource: Resource, view: ConfigView) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every owned service must exist as a Service resource."""
    spec = resource.spec
    assert isinstance(spec, OwnerSpec)
    for i, service in enumerate(spec.services):
        if view.get("Service", service) is None:
            yield ("spec", "services", i), f"no Service {service!r} (apply it first)"


OWNER = Kind(
    name="Owner",
    spec=OwnerSpec,
    description="Which team owns which mesh services, and how to reach them.",
    aliases=("owners",),
    check=_check,
    summary=lambda spec: f"{spec.team} <{spec.contact}>: {', '.join(spec.services)}",
)


@hookimpl
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(OWNER)


# --------------------------------------------------------------------------- a chain filter
#
# The template for a filter: a factory (built when a service is first called and when the
# config changes, never per request) and the filter it builds (plain code, per call).

#: Request metadata the filter adds: the team that owns the destination service.
TEAM_HEADER = "x-owner-team"


class TeamCounts:
    """Calls per owned service and how many failed (the server's fault), kept across config
    changes by `ctx.kept` (the factory builds a new filter each time; the counts stay)."""

    def __init__(self) -> None:
        self.calls = 0
        self.failed = 0


class TagWithTeam:
    """OBSERVE phase: adds `x-owner-team: <team>` to every call of an owned service, and counts
    calls and failures for the team (with gmesh's one classification of outcomes)."""

    def __init__(self, team: str, counts: TeamCounts) -> None:
        self.header = (TEAM_HEADER, team)
        self.counts = counts

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        call.metadata = (*call.metadata, self.header)
        self.counts.calls += 1
        try:
            return await next(call)
        except BaseException as exc:
            if outcome_of(exc, call.committed).failed:
                self.counts.failed += 1
            raise


class TagWithTeamFactory:
    name = "owner-team"
    phase = Phase.OBSERVE

    def build(self, ctx: BuildContext) -> Filter | None:
        for resource in ctx.resources("Owner").values():
            spec = resource.spec
            assert isinstance(spec, OwnerSpec)
            if ctx.service in spec.services:
                return TagWithTeam(spec.team, ctx.kept("owners.counts", TeamCounts))
        return None  # not owned: this service's calls do not pay for the filter


@hookimpl
def gmesh_filter_factories() -> list[FilterFactory]:
    return [TagWithTeamFactory()]


def team_field(entry: dict[str, Any], call: Call[Any]) -> None:
    """Access log field `team`: the owning team, as the `owner-team` filter tagged the call."""
    entry["team"] = call.header(TEAM_HEADER)


@hookimpl
def gmesh_access_log_fields() -> list[Callable[[dict[str, Any], Call[Any]], None]]:
    return [team_field]


#: Request metadata of this (imaginary) organisation never shown in telemetry (access log
#: headers, span attributes, tap); gmesh itself already hides `authorization`, cookies and
#: `x-api-key`.
SECRETS = frozenset({"x-session-token"})


def hide_secrets(service: str, pairs: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Show session tokens as `<redacted>` (what is sent upstream does not change)."""
    return [(key, "<redacted>" if key in SECRETS else value) for key, value in pairs]


@hookimpl
def gmesh_redact_metadata() -> list[Callable[[str, Sequence[tuple[str, Any]]], list[tuple[str, Any]]]]:
    return [hide_secrets]


@hookimpl
def gmesh_register_commands(cli: click.Group) -> None:
    cli.add_command(owners)


@click.command()
@click.option("--etcd", envvar="GMESH_ETCD", help="etcd endpoints [env GMESH_ETCD; default: embedded etcd]")
@click.option(
    "--prefix", envvar="GMESH_PREFIX", default="/gmesh/v1/", show_default=True, help="mesh key prefix"
)
def owners(etcd: str | None, prefix: str) -> None:
    """List each mesh service with the team that owns it (from Owner resources)."""
    from gmesh.config.apply import read_config
    from gmesh.discovery.keys import MeshKeys
    from gmesh.pluginmanager import Plugins
    from gmesh.store.connect import open_store

    async def go() -> dict[str, str]:
        store = await open_store(etcd)
        try:
            stored = await read_config(store, MeshKeys(prefix), Plugins.load().config_kinds())
        finally:
            await store.close()
        owned: dict[str, str] = {}
        for resource in stored.view.of_kind("Owner").values():
            spec = resource.spec
            assert isinstance(spec, OwnerSpec)
            for service in spec.services:
                owned[service] = f"{spec.team} <{spec.contact}>"
        for service in stored.view.of_kind("Service"):
            owned.setdefault(service, "(no owner)")
        return owned

    for service, owner in sorted(asyncio.run(go()).items()):
        click.echo(f"{service}\t{owner}")
