"""`gmesh apply` of Routes, `gmesh explain` and `gmesh rollout` as users run them (a subprocess),
against a real etcd: what they print, what they write, and their one-line errors."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gmesh.discovery.endpoint import Endpoint
from gmesh.discovery.keys import MeshKeys
from gmesh.store.etcd import EtcdConfig, Store

# -P: run the installed gmesh, never a source checkout that happens to be the cwd
GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]

V1 = ("127.0.0.1:5001", "127.0.0.1:5002")
V2 = ("127.0.0.1:5003",)
METHOD = "/gmesh.v1.Echo/Unary"

# Block style, so that every field has a line of its own; the line numbers below are this text's.
GOOD = """\
kind: Service
metadata:
  name: orders
spec:
  subsets:
    v1: {version: v1}
    v2: {version: v2}
---
kind: Route
metadata:
  name: orders
spec:
  service: orders
  rules:
    - name: beta-users
      match:
        metadata:
          x-tier:
            exact: beta
      backends:
        - subset: v2
          weight: 100
    - name: default
      backends:
        - subset: v1
          weight: 90
        - subset: v2
          weight: 10
      retry:
        attempts: 3
        on: [UNAVAILABLE]
"""

SERVICE_DOC: dict[str, Any] = {
    "kind": "Service",
    "metadata": {"name": "orders"},
    "spec": {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}}},
}
ROUTE_DOC: dict[str, Any] = {
    "kind": "Route",
    "metadata": {"name": "orders"},
    "spec": {
        "service": "orders",
        "rules": [
            {
                "name": "beta-users",
                "match": {"metadata": {"x-tier": {"exact": "beta"}}},
                "backends": [{"subset": "v2", "weight": 100}],
            },
            {
                "name": "default",
                "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
                "retry": {"attempts": 3, "on": ["UNAVAILABLE"]},
            },
        ],
    },
}


def gmesh(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The run failed with exactly one line on stderr, 'error: ...', and no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _store(env: dict[str, str]) -> Any:
    return Store.connect(EtcdConfig.parse(env["GMESH_ETCD"]))


def stored(env: dict[str, str], keys: MeshKeys, *refs: tuple[str, str]) -> list[tuple[Any, int]]:
    """(document, mod revision) of each (kind, name) as etcd holds it now; (None, 0) when absent."""

    async def read() -> list[tuple[Any, int]]:
        async with await _store(env) as store:
            out = []
            for kind, name in refs:
                kv = await store.get(keys.config(kind, name))
                out.append((json.loads(kv.value), kv.mod_revision) if kv is not None else (None, 0))
            return out

    return asyncio.run(read())


def put_mesh(env: dict[str, str], keys: MeshKeys, *docs: dict[str, Any]) -> None:
    """Write config documents as `gmesh apply` stores them, and register endpoints of `orders`:
    V1 with label version=v1, V2 with version=v2 (explain and rollout never call them)."""

    async def put() -> None:
        async with await _store(env) as store:
            for doc in docs:
                key = keys.config(doc["kind"], doc["metadata"]["name"])
                await store.put(key, json.dumps(doc).encode())
            for version, addresses in (("v1", V1), ("v2", V2)):
                for address in addresses:
                    ep = Endpoint(
                        "orders", address, labels={"version": version}, grpc_services=("gmesh.v1.Echo",)
                    )
                    await store.put(keys.endpoint("orders", address), ep.to_json())

    asyncio.run(put())


# -- 1. apply: a bad Route names file:line and field, and leaves the good one in place -----------


def _bad(old: str, new: str) -> str:
    assert GOOD.count(old) == 1, old
    return GOOD.replace(old, new)


BAD_ROUTES = {
    "weights-sum-to-95": (
        _bad("          weight: 10\n", "          weight: 5\n"),
        24,
        "spec.rules[1].backends",
        "backend weights sum to 95; they must sum to 100",
    ),
    "unknown-subset-v3": (
        _bad("        - subset: v2\n          weight: 100", "        - subset: v3\n          weight: 100"),
        21,
        "spec.rules[0].backends[0].subset",
        "unknown subset 'v3': Service/orders defines v1, v2",
    ),
    "invalid-regex": (
        _bad("            exact: beta", "            regex: '('"),
        19,
        "spec.rules[0].match.metadata.x-tier.regex",
        "invalid regex '(': ",
    ),
    "unknown-status-code": (
        _bad("on: [UNAVAILABLE]", "on: [UNAVAILBLE]"),
        31,
        "spec.rules[1].retry.on",
        "unknown gRPC status code 'UNAVAILBLE' (one of: OK, CANCELLED, ",
    ),
    "duplicate-rule-names": (
        _bad("    - name: beta-users", "    - name: default"),
        14,
        "spec.rules",
        "two rules are named 'default'; rule names must be unique",
    ),
}


@pytest.mark.parametrize(("text", "line", "path", "message"), BAD_ROUTES.values(), ids=BAD_ROUTES.keys())
def test_apply_bad_route_names_file_line_and_field_and_keeps_the_good_one(
    text: str, line: int, path: str, message: str, gmesh_env: dict[str, str], mesh_keys: MeshKeys,
    tmp_path: Path,
) -> None:  # fmt: skip
    doc = tmp_path / "orders.yaml"
    doc.write_text(GOOD)
    applied = ok(gmesh("apply", "-f", str(doc), env=gmesh_env))
    assert "+ Service/orders (created)" in applied and "+ Route/orders (created)" in applied
    assert "applied 2 change(s)" in applied
    before = stored(gmesh_env, mesh_keys, ("Service", "orders"), ("Route", "orders"))
    assert before[1][0] == ROUTE_DOC and before[1][1] > 0

    # The same file, changed: a valid change to the Service and a bad Route; neither is written.
    doc.write_text(text.replace("    v2: {version: v2}\n", "    v2: {version: v2}\n  timeout: 5s\n", 1))
    assert "timeout: 5s" in doc.read_text()
    result = gmesh("apply", "-f", str(doc), env=gmesh_env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: 1 problem in config, nothing was written", result.stderr
    # the Service gained a line (timeout) above the Route: the Route's lines are one further down
    where = f"{doc}:{line + 1}: Route/orders: {path}: "
    assert len(lines) == 2 and lines[1].strip().startswith(where + message), result.stderr

    assert stored(gmesh_env, mesh_keys, ("Service", "orders"), ("Route", "orders")) == before
    assert json.loads(ok(gmesh("get", "route", "orders", "-o", "json", env=gmesh_env))) == ROUTE_DOC


# -- 2. explain ------------------------------------------------------------------------------------


def test_explain_rules_backends_and_spread(gmesh_env: dict[str, str], mesh_keys: MeshKeys) -> None:
    put_mesh(gmesh_env, mesh_keys, SERVICE_DOC, ROUTE_DOC)

    beta = ok(gmesh("explain", "orders", METHOD, "-H", "x-tier=beta", env=gmesh_env)).splitlines()
    assert "route: Route/orders" in beta
    assert "  1. beta-users: MATCH" in beta
    assert not any(line.startswith("  2.") for line in beta), beta  # rules after the match: not tried
    assert "  subset v2: weight 100, 1 endpoint" in beta
    chosen = [line for line in beta if line.startswith("chosen: ")]
    assert len(chosen) == 1 and chosen[0] in {f"chosen: subset v2 -> {a}" for a in V2}, beta

    plain = ok(gmesh("explain", "orders", METHOD, env=gmesh_env)).splitlines()
    assert "  1. beta-users: no: metadata x-tier exact 'beta' does not hold" in plain
    assert "  2. default: MATCH" in plain
    assert "  subset v1: weight 90, 2 endpoints" in plain and "  subset v2: weight 10, 1 endpoint" in plain
    assert "retry: 3 attempts on UNAVAILABLE, backoff 25ms..250ms; budget" in " ".join(plain)
    chosen = [line for line in plain if line.startswith("chosen: ")]
    assert len(chosen) == 1 and chosen[0] in {f"chosen: subset {v} -> {a}" for v, a in _addresses()}

    n = 10_000
    result = json.loads(ok(gmesh("explain", "orders", METHOD, "--n", str(n), "-o", "json", env=gmesh_env)))
    assert result["rule"] == "default"
    assert [r["name"] for r in result["rules"]] == ["beta-users", "default"]
    picks = {(p["backend"], p["endpoint"]): p["calls"] for p in result["picks"]}
    assert set(picks) == set(_addresses(prefix="subset ")), picks
    per_subset = collections.Counter[str]()
    for (backend, _), calls in picks.items():
        per_subset[backend] += calls
    # the split walks a 100-slot schedule: exact per 100 calls, so exact over 10000
    assert per_subset == {"subset v1": 9000, "subset v2": 1000}, picks
    for address in V1:
        assert abs(picks[("subset v1", address)] / 9000 - 0.5) <= 0.02, picks


def _addresses(prefix: str = "") -> list[tuple[str, str]]:
    return [(f"{prefix}v1", a) for a in V1] + [(f"{prefix}v2", a) for a in V2]


def test_explain_shows_the_balancing_and_resilience_policy(
    gmesh_env: dict[str, str], mesh_keys: MeshKeys
) -> None:
    service = json.loads(json.dumps(SERVICE_DOC))
    service["spec"].update(
        balancer={
            "policy": "least_request",
            "subsets": {"v2": {"policy": "ring_hash", "hashKey": "x-user-id"}},
        },
        healthCheck={"interval": "2s", "unhealthyThreshold": 3, "healthyThreshold": 2},
        outlierDetection={"consecutiveErrors": 5, "baseEjectionTime": "30s", "maxEjectionPercent": 50},
        circuitBreaker={"maxRequests": 100, "maxPending": 10},
    )
    put_mesh(gmesh_env, mesh_keys, service, ROUTE_DOC)
    lines = ok(gmesh("explain", "orders", METHOD, env=gmesh_env)).splitlines()
    assert "balancer: least_request, v2: ring_hash on x-user-id" in lines, lines
    assert "health check: every 2s, out after 3 failed, back after 2 passed" in lines, lines
    assert (
        "outlier ejection: 5 errors in a row; 30s x n, at most 50% ejected; panic below 50% usable" in lines
    ), lines
    assert "circuit breaker: maxRequests 100, maxPending 10" in lines, lines


def test_explain_unknown_service_and_bad_method(gmesh_env: dict[str, str], mesh_keys: MeshKeys) -> None:
    put_mesh(gmesh_env, mesh_keys, SERVICE_DOC, ROUTE_DOC)
    error = one_line_error(gmesh("explain", "nosuch", "/a.B/C", env=gmesh_env))
    assert error.startswith("error: no mesh service 'nosuch'") and "orders" in error, error

    bad = gmesh("explain", "orders", "not-a-method", env=gmesh_env)
    assert bad.returncode in (1, 2), (bad.returncode, bad.stdout, bad.stderr)
    error = one_line_error(bad, code=bad.returncode)
    assert "'not-a-method'" in error and "/package.Service/Method" in error, error


# -- 3. rollout switch / status / abort ------------------------------------------------------------


def test_rollout_switch_status_and_abort(gmesh_env: dict[str, str], mesh_keys: MeshKeys) -> None:
    put_mesh(gmesh_env, mesh_keys, SERVICE_DOC, ROUTE_DOC)
    [(_, revision)] = stored(gmesh_env, mesh_keys, ("Route", "orders"))

    status = ok(gmesh("rollout", "status", "orders", env=gmesh_env)).splitlines()
    assert status == ["service orders: weights v1 90%, v2 10%", "no rollout yet"]

    error = one_line_error(gmesh("rollout", "switch", "orders", "--to", "v9", env=gmesh_env))
    assert error == "error: Service/orders has no subset 'v9' (defined: v1, v2)"
    assert stored(gmesh_env, mesh_keys, ("Route", "orders")) == [(ROUTE_DOC, revision)]

    switched = ok(gmesh("rollout", "switch", "orders", "--to", "v2", env=gmesh_env)).strip()
    [(doc, new_revision)] = stored(gmesh_env, mesh_keys, ("Route", "orders"))
    assert switched == f"orders: all traffic to v2 (revision {new_revision})"
    assert new_revision > revision
    shown = json.loads(ok(gmesh("get", "route", "orders", "-o", "json", env=gmesh_env)))
    assert shown == doc
    expected = json.loads(json.dumps(ROUTE_DOC))
    expected["spec"]["rules"][-1]["backends"] = [{"subset": "v2", "weight": 100}]
    assert shown == expected  # only the default rule's backends changed; its retry and beta-users stay

    status = ok(gmesh("rollout", "status", "orders", env=gmesh_env)).splitlines()
    assert status == ["service orders: weights v2 100%", "no rollout yet"]

    error = one_line_error(gmesh("rollout", "abort", "orders", env=gmesh_env))
    assert error == "error: no rollout of 'orders' is running"
    assert stored(gmesh_env, mesh_keys, ("Route", "orders")) == [(expected, new_revision)]

    again = ok(gmesh("rollout", "switch", "orders", "--to", "v2", env=gmesh_env)).strip()
    assert again == f"orders: all traffic to v2 (revision {new_revision})"  # nothing to change: no write
    assert stored(gmesh_env, mesh_keys, ("Route", "orders")) == [(expected, new_revision)]

    error = one_line_error(gmesh("rollout", "status", "nosuch", env=gmesh_env))
    assert error == "error: no mesh service 'nosuch' (no Service resource, no endpoints)"


# -- 4. help ---------------------------------------------------------------------------------------

MESH = ("--etcd", "--prefix")
HELP = {
    "explain": (
        "SERVICE METHOD",
        "-H, --header",
        "--caller-label",
        "--caller-identity",
        "-n, --n",
        "-o, --output",
        *MESH,
    ),
    "rollout": ("switch", "canary", "status", "abort"),
    "rollout switch": ("SERVICE", "--to", *MESH),
    "rollout canary": (
        "SERVICE",
        "--to",
        "--from",
        "--steps",
        "--interval",
        "--max-error-rate",
        "--max-latency-p99",
        "--min-calls",
        *MESH,
    ),
    "rollout status": ("SERVICE", *MESH),
    "rollout abort": ("SERVICE", *MESH),
}


@pytest.mark.parametrize(("command", "mentions"), HELP.items(), ids=HELP.keys())
def test_help(command: str, mentions: tuple[str, ...], gmesh_env: dict[str, str]) -> None:
    text = ok(gmesh(*command.split(), "--help", env=gmesh_env))
    assert text.startswith(f"Usage: gmesh {command} ")
    missing = [m for m in mentions if m not in text]
    assert missing == [], text
