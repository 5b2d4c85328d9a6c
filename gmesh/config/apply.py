"""Reading and writing config resources in etcd: list, plan an apply, show its diff, write it atomically.

An apply is all or nothing: every document is validated first (against the others and
against what etcd holds), then every change is written in one transaction that also
checks nobody changed those keys since they were read.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from gmesh.config.kinds import ConfigView, Kind, KindRegistry, Resource
from gmesh.config.loader import Document
from gmesh.config.validate import parse_stored, validate_documents
from gmesh.discovery.keys import MeshKeys
from gmesh.errors import NotFound
from gmesh.store.etcd import Compare, Delete, Put, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredConfig:
    """Every resource in etcd (valid ones parsed; invalid ones named with their problem)."""

    view: ConfigView
    resources: dict[tuple[str, str], Resource]
    revisions: dict[tuple[str, str], int]
    invalid: dict[str, str]
    revision: int


async def read_config(
    store: Store, keys: MeshKeys, kinds: KindRegistry, kind: Kind | None = None
) -> StoredConfig:
    prefix = keys.config_kind(kind.name) if kind else keys.config_root
    kvs, revision = await store.get_prefix(prefix)
    resources: dict[tuple[str, str], Resource] = {}
    revisions: dict[tuple[str, str], int] = {}
    invalid: dict[str, str] = {}
    for kv in kvs:
        parsed = keys.parse(kv.key)
        if parsed is None or parsed.what != "config":
            continue
        revisions[(parsed.group, parsed.name)] = kv.mod_revision
        try:
            resource = parse_stored(kv.value, kinds, key=kv.key, revision=kv.mod_revision)
        except ValueError as exc:
            invalid[kv.key] = str(exc)
            continue
        resources[(resource.kind, resource.name)] = resource
    by_kind: dict[str, dict[str, Resource]] = {}
    for (k, n), r in resources.items():
        by_kind.setdefault(k, {})[n] = r
    return StoredConfig(ConfigView(by_kind), resources, revisions, invalid, revision)


Action = Literal["create", "update", "unchanged"]


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    resource: Resource
    old: Resource | None
    mod_revision: int  # what the key had when read (0 = absent); the write checks it


@dataclass(frozen=True, slots=True)
class Plan:
    changes: tuple[Change, ...]

    @property
    def pending(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.action != "unchanged")


async def plan_apply(store: Store, keys: MeshKeys, kinds: KindRegistry, docs: list[Document]) -> Plan:
    """Validate `docs` (raises `ConfigError`) and work out what would change."""
    stored = await read_config(store, keys, kinds)
    resources = validate_documents(docs, kinds, stored.view)
    changes = []
    for resource in resources:
        key = (resource.kind, resource.name)
        old = stored.resources.get(key)
        mod = stored.revisions.get(key, 0)
        if old is None:
            action: Action = "update" if mod else "create"  # an invalid stored one gets replaced
        elif old.document() == resource.document():
            action = "unchanged"
        else:
            action = "update"
        changes.append(Change(action, resource, old, mod))
    return Plan(tuple(changes))


async def write_plan(store: Store, keys: MeshKeys, plan: Plan) -> int:
    """Write every pending change in one transaction; `Conflict` if any key moved meanwhile."""
    pending = plan.pending
    if not pending:
        return 0
    compares = [
        Compare(keys.config(c.resource.kind, c.resource.name), "mod", c.mod_revision) for c in pending
    ]
    ops = [Put(keys.config(c.resource.kind, c.resource.name), c.resource.to_json()) for c in pending]
    return await store.compare_and_swap(compares, ops)


def render_diff(plan: Plan) -> str:
    """A readable, unified diff per resource; unchanged ones get one line."""
    out: list[str] = []
    for change in plan.changes:
        ref = change.resource.ref
        if change.action == "unchanged":
            out.append(f"= {ref} (unchanged)")
            continue
        old = to_yaml(change.old.document()) if change.old else ""
        new = to_yaml(change.resource.document())
        sign = "+" if change.action == "create" else "~"
        out.append(f"{sign} {ref} ({'created' if change.action == 'create' else 'changed'})")
        diff = difflib.unified_diff(
            old.splitlines(), new.splitlines(), f"{ref} (etcd)", f"{ref} (new)", lineterm="", n=3
        )
        out.extend(f"    {line}" for line in list(diff)[2:])
    return "\n".join(out)


def to_yaml(document: dict[str, Any] | list[dict[str, Any]]) -> str:
    if isinstance(document, list):
        return "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False) for d in document)
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


async def delete_resource(store: Store, keys: MeshKeys, kind: Kind, name: str) -> int:
    """Delete one resource; `NotFound` if it does not exist. Returns the revision of the delete."""
    key = keys.config(kind.name, name)
    result = await store.txn([Compare(key, "version", 0, ">")], [Delete(key)])
    if not result.succeeded:
        raise NotFound(f"{kind.name}/{name} not found")
    return result.revision
