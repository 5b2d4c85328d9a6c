"""`gmesh apply` of RateLimits as users run it (subprocesses, a real etcd): bad ones are refused with
file, line and field, and the limit in force stays; `gmesh explain` shows which limits apply."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gmesh.discovery.endpoint import Endpoint
from gmesh.discovery.keys import MeshKeys
from gmesh.store.etcd import EtcdConfig, Store

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]

GOOD = """\
kind: RateLimit
metadata:
  name: orders-limit
spec:
  service: orders
  rate: 100/s
  burst: 20
  key: metadata:x-api-key
"""


def gmesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=60)


def stored(env: dict[str, str], keys: MeshKeys) -> object:
    async def read() -> object:
        async with await Store.connect(EtcdConfig.parse(env["GMESH_ETCD"])) as store:
            kv = await store.get(keys.config("RateLimit", "orders-limit"))
            return json.loads(kv.value) if kv is not None else None

    return asyncio.run(read())


BAD = [
    ("  rate: 100/s\n", "  rate: 0/s\n", 6, "spec.rate", "must be greater than 0"),
    ("  rate: 100/s\n", "  rate: 100\n", 6, "spec.rate", "write it with its window, e.g. 100/s"),
    ("  rate: 100/s\n", "  rate: 100/fortnight\n", 6, "spec.rate", "expected N/s, N/min, N/h or N/d"),
    ("  burst: 20\n", "  burst: 0\n", 7, "spec.burst", "greater than or equal to 1"),
    ("  key: metadata:x-api-key\n", "  key: header:x-api-key\n", 8, "spec.key", "one of caller, metadata:<"),
]


@pytest.mark.parametrize(("old", "new", "line", "path", "message"), BAD, ids=[b[1].strip() for b in BAD])
def test_a_bad_limit_is_refused_with_file_line_and_field_and_the_good_one_stays(
    old: str, new: str, line: int, path: str, message: str, gmesh_env: dict[str, str], mesh_keys: MeshKeys,
    tmp_path: Path,
) -> None:  # fmt: skip
    doc = tmp_path / "limit.yaml"
    doc.write_text(GOOD)
    assert gmesh("apply", "-f", str(doc), env=gmesh_env).returncode == 0
    before = stored(gmesh_env, mesh_keys)
    assert before is not None
    doc.write_text(GOOD.replace(old, new))
    result = gmesh("apply", "-f", str(doc), env=gmesh_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: 1 problem in config, nothing was written", result.stderr
    assert lines[1].strip().startswith(f"{doc}:{line}: RateLimit/orders-limit: {path}: "), lines
    assert message in lines[1]
    assert stored(gmesh_env, mesh_keys) == before


def test_explain_lists_the_limits_that_apply(
    gmesh_env: dict[str, str], mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    doc = tmp_path / "limits.yaml"
    doc.write_text(
        GOOD + "---\nkind: RateLimit\nmetadata: {name: writes}\nspec:\n  service: orders\n  rate: 10/min\n"
        "  methods: ['/gmesh.v1.Echo/Write*']\n  mode: shadow\n"
    )
    assert gmesh("apply", "-f", str(doc), env=gmesh_env).returncode == 0

    async def endpoint() -> None:
        async with await Store.connect(EtcdConfig.parse(gmesh_env["GMESH_ETCD"])) as store:
            ep = Endpoint("orders", "127.0.0.1:5001", grpc_services=("gmesh.v1.Echo",))
            await store.put(mesh_keys.endpoint("orders", ep.address), ep.to_json())

    asyncio.run(endpoint())
    out = gmesh("explain", "orders", "/gmesh.v1.Echo/Unary", "-H", "x-api-key=k1", env=gmesh_env).stdout
    assert "rate limit orders-limit: 100/s burst 20 per metadata:x-api-key (this call's key: k1)" in out
    assert "writes" not in out
    write = gmesh("explain", "orders", "/gmesh.v1.Echo/WriteAll", env=gmesh_env).stdout
    assert "rate limit writes: 10/min burst 1 (shadow: counted, never refused)" in write


def test_get_quota_shows_use_per_key(gmesh_env: dict[str, str], mesh_keys: MeshKeys, tmp_path: Path) -> None:
    from gmesh.ratelimit.quota import QuotaSpec, QuotaState

    doc = tmp_path / "quota.yaml"
    doc.write_text(
        "kind: Quota\nmetadata: {name: daily}\nspec:\n  service: orders\n  limit: 100\n  window: 24h\n"
        "  key: metadata:x-api-key\n  chunk: 5\n"
    )
    assert gmesh("apply", "-f", str(doc), env=gmesh_env).returncode == 0

    async def spend() -> None:
        spec = QuotaSpec.model_validate(
            {"service": "orders", "limit": 100, "window": "24h", "key": "metadata:x-api-key", "chunk": 5}
        )
        async with await Store.connect(EtcdConfig.parse(gmesh_env["GMESH_ETCD"])) as store:
            holder = QuotaState("daily", spec, store, mesh_keys)
            for key, calls in (("k-1", 7), ("k/2", 1)):
                for _ in range(calls):
                    assert await holder.admit(key)
            await holder.close()  # gives back what it holds: counters = calls made

    asyncio.run(spend())
    out = gmesh("get", "quota", "daily", env=gmesh_env).stdout
    rows = [line.split() for line in out.splitlines()]
    assert ["k-1", "7", "100", "93"] in rows and ["k/2", "1", "100", "99"] in rows, out
    bad = tmp_path / "bad.yaml"
    bad.write_text(doc.read_text().replace("window: 24h", "window: daily"))
    result = gmesh("apply", "-f", str(bad), env=gmesh_env)
    assert result.returncode == 1 and f"{bad}:6: Quota/daily: spec.window" in result.stderr


def test_explain_shows_live_state_of_global_limits_and_quotas(
    gmesh_env: dict[str, str], mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    from gmesh.ratelimit.quota import QuotaSpec, QuotaState

    doc = tmp_path / "live.yaml"
    doc.write_text(
        "kind: RateLimit\nmetadata: {name: mesh}\nspec: {service: orders, rate: 100/s, scope: global}\n---\n"
        "kind: Quota\nmetadata: {name: hourly}\nspec: {service: orders, limit: 50, window: 1h, "
        "key: 'metadata:x-api-key', chunk: 1}\n"
    )
    assert gmesh("apply", "-f", str(doc), env=gmesh_env).returncode == 0

    async def setup() -> None:
        async with await Store.connect(EtcdConfig.parse(gmesh_env["GMESH_ETCD"])) as store:
            ep = Endpoint("orders", "127.0.0.1:5001", grpc_services=("gmesh.v1.Echo",))
            await store.put(mesh_keys.endpoint("orders", ep.address), ep.to_json())
            for process, demand in (("p1", 80.0), ("p2", 10.0)):
                await store.put(
                    mesh_keys.limit_demand("mesh", process), json.dumps({"demand": demand}).encode()
                )
            spec = QuotaSpec.model_validate(
                {"service": "orders", "limit": 50, "window": "1h", "key": "metadata:x-api-key", "chunk": 1}
            )
            holder = QuotaState("hourly", spec, store, mesh_keys)
            for _ in range(3):
                assert await holder.admit("k9")

    asyncio.run(setup())
    out = gmesh("explain", "orders", "/gmesh.v1.Echo/Unary", "-H", "x-api-key=k9", env=gmesh_env).stdout
    assert (
        "global: p1 wants 80/s, may admit 88.5/s" in out and "global: p2 wants 10/s, may admit 11.5/s" in out
    )
    assert (
        "quota hourly: 50 per 1h per metadata:x-api-key (this call's key: k9); 3 used in this window" in out
    )
