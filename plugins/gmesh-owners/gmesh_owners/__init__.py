"""gmesh-owners: an `Owner` config kind and a `gmesh owners` command (an example gmesh plugin)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import click
from pydantic import Field, field_validator

from gmesh import hookimpl
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
