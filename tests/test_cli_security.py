"""`gmesh apply` of AuthorizationPolicies and Service tls, `gmesh explain --from`, `gmesh ca rotate`
and `gmesh ca status` as users run them (subprocesses), against a real etcd and a real CA."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from gmesh.discovery.endpoint import Endpoint
from gmesh.discovery.keys import MeshKeys
from gmesh.security.identity import WorkloadIdentity
from gmesh.store.etcd import EtcdConfig, Store

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]
METHOD = "/gmesh.v1.Echo/Unary"

POLICIES = """\
kind: Service
metadata:
  name: orders
spec:
  tls:
    mode: STRICT
---
kind: AuthorizationPolicy
metadata:
  name: orders-web
spec:
  service: orders
  rules:
    - from: ["spiffe://gmesh.local/svc/web"]
      methods: ["/gmesh.v1.Echo/*"]
---
kind: AuthorizationPolicy
metadata:
  name: no-deletes
spec:
  service: orders
  action: DENY
  rules:
    - methods: ["/gmesh.v1.Echo/Delete"]
"""


def gmesh(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def test_apply_policies_then_explain_from(
    gmesh_env: dict[str, str], mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    doc = tmp_path / "orders.yaml"
    doc.write_text(POLICIES)
    applied = ok(gmesh("apply", "-f", str(doc), env=gmesh_env))
    assert "applied 3 change(s)" in applied

    async def endpoint() -> None:
        async with await Store.connect(EtcdConfig.parse(gmesh_env["GMESH_ETCD"])) as store:
            ep = Endpoint("orders", "127.0.0.1:5001", grpc_services=("gmesh.v1.Echo",), tls="127.0.0.1:5001")
            await store.put(mesh_keys.endpoint("orders", ep.address), ep.to_json())

    asyncio.run(endpoint())
    web = ok(gmesh("explain", "orders", METHOD, "--from", "web", env=gmesh_env)).splitlines()
    allowed = "spiffe://gmesh.local/svc/web: ALLOWED: ALLOW policy orders-web matches"
    assert f"authorization (tls.mode STRICT): {allowed}" in web
    other = ok(gmesh("explain", "orders", METHOD, "--from", "spiffe://gmesh.local/svc/batch", env=gmesh_env))
    assert "DENIED (PERMISSION_DENIED): no ALLOW policy matches (orders-web)" in other
    delete = ok(gmesh("explain", "orders", "/gmesh.v1.Echo/Delete", "--from", "web", env=gmesh_env))
    assert "DENIED (PERMISSION_DENIED): DENY policy no-deletes matches" in delete
    plain = json.loads(ok(gmesh("explain", "orders", METHOD, "-o", "json", env=gmesh_env)))["authorization"]
    assert plain["allowed"] is False and "STRICT" in plain["reason"]


def test_apply_rejects_a_bad_policy_with_file_line_and_field(
    gmesh_env: dict[str, str], mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    doc = tmp_path / "bad.yaml"
    doc.write_text(POLICIES.replace('methods: ["/gmesh.v1.Echo/*"]', 'methods: ["gmesh.v1.Echo/*"]'))
    result = gmesh("apply", "-f", str(doc), env=gmesh_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: 1 problem in config, nothing was written", result.stderr
    assert lines[1].strip().startswith(f"{doc}:15: AuthorizationPolicy/orders-web: spec.rules[0].methods"), (
        lines
    )
    assert "a path like /orders.v1.Orders/Get" in lines[1]
    doc.write_text(POLICIES.replace("mode: STRICT", "mode: STRICTLY"))
    result = gmesh("apply", "-f", str(doc), env=gmesh_env)
    assert result.returncode == 1 and f"{doc}:6: Service/orders: spec.tls.mode" in result.stderr


def test_ca_rotate_refuses_to_drop_a_root_that_signs_live_certificates(
    gmesh_env: dict[str, str], mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    directory = tmp_path / "ca"
    ok(gmesh("ca", "init", "--dir", str(directory), env=gmesh_env))
    serve = subprocess.Popen(
        [*GMESH, "ca", "serve", "--dir", str(directory)], env=gmesh_env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert serve.stderr is not None
        while "gmesh ca serving on" not in (line := serve.stderr.readline()):
            assert line, "gmesh ca serve exited"

        async def get_certificate() -> str:
            async with await Store.connect(EtcdConfig.parse(gmesh_env["GMESH_ETCD"])) as store:
                identity = await WorkloadIdentity.start(
                    store, mesh_keys, "orders", token_file=directory / "local-token"
                )
                await identity.close()
                return identity.material.issuer

        issuer = asyncio.run(get_certificate())
        status = ok(gmesh("ca", "status", env=gmesh_env))
        assert "trust domain gmesh.local" in status and issuer[:16] in status
        assert any(line.split()[:2] == ["orders", "1"] for line in status.splitlines()), status

        rotated = ok(gmesh("ca", "rotate", "--dir", str(directory), "--propagation", "1s", env=gmesh_env))
        assert "new root in the trust bundle (2 roots)" in rotated
        again = gmesh("ca", "rotate", "--dir", str(directory), env=gmesh_env)
        assert again.returncode == 1 and "a root rotation is in progress" in again.stderr
        status = ok(gmesh("ca", "status", env=gmesh_env))
        assert "old (rotating out)" in status

        async def signed_by_the_new_root() -> float:
            """The running `gmesh ca serve` took the new root up from --dir: once the propagation
            delay is over, new certificates are signed by it."""
            from gmesh.security.identity import root_id
            from gmesh.security.rotation import roots_of
            from gmesh.security.tokens import read_bundle

            async with await Store.connect(EtcdConfig.parse(gmesh_env["GMESH_ETCD"])) as store:
                bundle = await read_bundle(store, mesh_keys)
                assert bundle is not None
                new = root_id(roots_of(bundle)[0])
                start = time.monotonic()
                while True:
                    identity = await WorkloadIdentity.start(
                        store, mesh_keys, "payments", token_file=directory / "local-token"
                    )
                    await identity.close()
                    if identity.material.issuer == new:
                        return time.monotonic() - start
                    assert identity.material.issuer == issuer  # the old root, until the switch
                    assert time.monotonic() - start < 15, "the CA never signed with the new root"
                    await asyncio.sleep(0.2)

        assert asyncio.run(signed_by_the_new_root()) < 15

        refused = gmesh("ca", "rotate", "--dir", str(directory), "--finish", env=gmesh_env)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "live certificate(s) are still signed by the old root (orders" in refused.stderr
        assert (directory / "previous-root.key.pem").exists()
        forced = ok(gmesh("ca", "rotate", "--dir", str(directory), "--finish", "--force", env=gmesh_env))
        assert "old root removed" in forced and not (directory / "previous-root.key.pem").exists()
    finally:
        serve.terminate()
        serve.wait(20)
