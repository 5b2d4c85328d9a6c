"""Planning and writing config against a real etcd: diffs, all-or-nothing writes, lost races."""

from __future__ import annotations

import json

import pytest

from gmesh.config.apply import delete_resource, plan_apply, read_config, render_diff, write_plan
from gmesh.config.kinds import KindRegistry
from gmesh.config.loader import load_text
from gmesh.discovery.keys import MeshKeys
from gmesh.errors import ConfigError, Conflict, NotFound
from gmesh.store.etcd import Store

TWO = """\
kind: Service
metadata: {name: orders}
spec: {timeout: 2s}
---
kind: Service
metadata: {name: payments}
spec:
  subsets: {v1: {version: v1}}
"""


def docs(text: str = TWO) -> list:  # type: ignore[type-arg]
    found, problems = load_text(text, "test.yaml")
    assert not problems
    return found


async def test_create_unchanged_update(store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry) -> None:
    plan = await plan_apply(store, mesh_keys, config_kinds, docs())
    assert [(c.action, c.resource.ref) for c in plan.changes] == [
        ("create", "Service/orders"),
        ("create", "Service/payments"),
    ]
    revision = await write_plan(store, mesh_keys, plan)
    stored = await store.get(mesh_keys.config("Service", "orders"))
    assert stored is not None and stored.mod_revision == revision
    assert json.loads(stored.value) == {
        "kind": "Service",
        "metadata": {"name": "orders"},
        "spec": {"timeout": "2s"},
    }
    payments = await store.get(mesh_keys.config("Service", "payments"))
    assert payments is not None and payments.mod_revision == revision  # one transaction

    again = await plan_apply(store, mesh_keys, config_kinds, docs())
    assert [c.action for c in again.changes] == ["unchanged", "unchanged"] and not again.pending
    assert await write_plan(store, mesh_keys, again) == 0

    changed = await plan_apply(store, mesh_keys, config_kinds, docs(TWO.replace("2s", "5s")))
    assert [c.action for c in changed.changes] == ["update", "unchanged"]
    diff = render_diff(changed)
    assert "~ Service/orders (changed)" in diff and "-  timeout: 2s" in diff and "+  timeout: 5s" in diff
    assert "= Service/payments (unchanged)" in diff


async def test_a_concurrent_change_fails_the_whole_write(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    plan = await plan_apply(store, mesh_keys, config_kinds, docs())
    # Someone else creates payments between our read and our write.
    await store.put(
        mesh_keys.config("Service", "payments"), b'{"kind":"Service","metadata":{"name":"payments"}}'
    )
    with pytest.raises(Conflict):
        await write_plan(store, mesh_keys, plan)
    assert await store.get(mesh_keys.config("Service", "orders")) is None  # nothing of ours was written


async def test_invalid_documents_write_nothing(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    with pytest.raises(ConfigError) as err:
        await plan_apply(
            store, mesh_keys, config_kinds, docs(TWO + "---\nkind: Service\nmetadata: {name: Bad}\n")
        )
    assert [str(p) for p in err.value.problems] == [
        "test.yaml:11: Service/Bad: metadata.name: 'Bad' is not a valid name: "
        "use at most 63 lowercase letters, digits and "
        "'-', starting and ending with a letter or digit"
    ]
    assert (await store.get_prefix(mesh_keys.prefix))[0] == []


async def test_stored_invalid_resources_are_reported_not_hidden(
    store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry
) -> None:
    key = mesh_keys.config("Service", "legacy")
    await store.put(key, b'{"kind":"Service","metadata":{"name":"legacy"},"spec":{"retries":3}}')
    stored = await read_config(store, mesh_keys, config_kinds)
    assert "spec.retries: unknown field" in stored.invalid[key]
    # Applying a valid version replaces it (an update of the stored key, checked by revision).
    plan = await plan_apply(store, mesh_keys, config_kinds, docs("kind: Service\nmetadata: {name: legacy}\n"))
    assert [c.action for c in plan.changes] == ["update"]
    await write_plan(store, mesh_keys, plan)
    assert not (await read_config(store, mesh_keys, config_kinds)).invalid


async def test_delete(store: Store, mesh_keys: MeshKeys, config_kinds: KindRegistry) -> None:
    await write_plan(store, mesh_keys, await plan_apply(store, mesh_keys, config_kinds, docs()))
    service = config_kinds.require("Service")
    await delete_resource(store, mesh_keys, service, "orders")
    assert await store.get(mesh_keys.config("Service", "orders")) is None
    with pytest.raises(NotFound, match="Service/orders not found"):
        await delete_resource(store, mesh_keys, service, "orders")
