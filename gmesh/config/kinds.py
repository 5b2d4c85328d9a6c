"""Config kinds (Service, Route, ... and plugin-contributed ones), and resources of those kinds.

A kind is a name, a typed spec model, and optionally a check against the other resources
of the mesh (a Route naming a subset its Service lacks). Plugins add kinds through the
`gmesh_register_config_kinds` hook; the registry is built once per process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from gmesh.config.types import SpecModel
from gmesh.errors import NotFound

log = logging.getLogger(__name__)

API_VERSION = "gmesh/v1"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a resource was read from."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Resource:
    """One validated config resource. `revision` is its etcd mod revision (0 = not stored yet)."""

    kind: str
    name: str
    spec: SpecModel
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = field(default=0, compare=False)
    source: Source | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"

    def document(self) -> dict[str, Any]:
        """The resource as users write it (only the fields they set)."""
        metadata: dict[str, Any] = {"name": self.name}
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        return {
            "kind": self.kind,
            "metadata": metadata,
            "spec": self.spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.document(), sort_keys=True, separators=(",", ":")).encode()


#: A cross-resource check: yields (field path, message) for each problem of `resource`
#: given every other resource of the mesh. The path is a tuple (`("spec", "rules", 0)`)
#: or the dotted form users see (`"spec.rules[0].backends[1].subset"`).
Check = Callable[["Resource", "ConfigView"], Iterable[tuple[str | tuple[str | int, ...], str]]]


@dataclass(frozen=True, slots=True)
class Kind:
    """A config kind: `name` as written in `kind:`, the spec model, docs, and an optional check."""

    name: str
    spec: type[SpecModel]
    description: str
    aliases: tuple[str, ...] = ()
    check: Check | None = None
    summary: Callable[[Any], str] | None = None
    plugin: str = ""

    def names(self) -> tuple[str, ...]:
        lower = self.name.lower()
        return (lower, f"{lower}s", *(a.lower() for a in self.aliases))


class KindRegistry:
    """Every kind this process knows. First registration of a name wins (built-ins register last)."""

    def __init__(self) -> None:
        self._kinds: dict[str, Kind] = {}
        self._lookup: dict[str, Kind] = {}
        #: the plugin whose hook is running; stamped on the kinds it adds
        self.plugin = ""

    def add(self, kind: Kind) -> None:
        if not kind.plugin and self.plugin:
            kind = replace(kind, plugin=self.plugin)
        existing = self._kinds.get(kind.name)
        if existing is not None:
            log.info("kind %s from %s overrides the one from %s", kind.name, existing.plugin, kind.plugin)
            return
        self._kinds[kind.name] = kind
        for alias in kind.names():
            self._lookup.setdefault(alias, kind)

    def get(self, name: str) -> Kind | None:
        """By exact name (`Service`), lowercase, plural or alias (`svc`)."""
        return self._kinds.get(name) or self._lookup.get(name.lower())

    def require(self, name: str) -> Kind:
        kind = self.get(name)
        if kind is None:
            raise NotFound(f"unknown kind {name!r} (known: {', '.join(self.names()) or 'none'})")
        return kind

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def __iter__(self) -> Iterator[Kind]:
        return iter(sorted(self._kinds.values(), key=lambda k: k.name))

    def __len__(self) -> int:
        return len(self._kinds)


class ConfigView:
    """Read-only view of the mesh's resources by kind and name (for cross-resource checks)."""

    def __init__(self, resources: Mapping[str, Mapping[str, Resource]]) -> None:
        self._resources = resources

    def get(self, kind: str, name: str) -> Resource | None:
        return self._resources.get(kind, {}).get(name)

    def of_kind(self, kind: str) -> Mapping[str, Resource]:
        return self._resources.get(kind, MappingProxyType({}))

    def overlay(self, resources: Iterable[Resource]) -> ConfigView:
        """This view with `resources` added or replacing what they name."""
        merged = {k: dict(v) for k, v in self._resources.items()}
        for r in resources:
            merged.setdefault(r.kind, {})[r.name] = r
        return ConfigView(merged)
