"""gmesh-owners through gmesh itself: loaded as an entry point, applied to a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio

from gmesh import register as gmesh_register
from gmesh.chain import Call, ServiceChain
from gmesh.chain.compose import order
from gmesh.config.kinds import Resource
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.errors import UpstreamError
from gmesh.outbound.mesh import MeshState, compile_chain
from gmesh.pluginmanager import Plugins
from gmesh.store.embedded import free_port
from gmesh.testing.echo import start_echo_server
from gmesh.v1 import echo_pb2, echo_pb2_grpc
from gmesh_owners import OwnerSpec as Owner
from gmesh_owners import TeamCounts

# -P: run the installed gmesh, never a source checkout that happens to be the cwd
GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


def gmesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=60)


def test_listed_by_gmesh_plugins(gmesh_env: dict[str, str]) -> None:
    out = gmesh("plugins", env=gmesh_env)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("owners "))
    assert "gmesh-owners" in row and "0.1.0" in row and "kind Owner" in row


def test_owner_is_validated_applied_and_listed(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "owner.yaml").write_text(
        "kind: Owner\nmetadata: {name: shop}\nspec:\n  team: Shop\n  contact: shop@example.com\n"
        "  services: [orders]\n"
    )
    refused = gmesh("apply", "-f", str(tmp_path / "owner.yaml"), env=gmesh_env)
    assert refused.returncode == 1
    assert f"{tmp_path / 'owner.yaml'}:6: Owner/shop: spec.services[0]: no Service 'orders'" in refused.stderr

    (tmp_path / "service.yaml").write_text("kind: Service\nmetadata: {name: orders}\n")
    applied = gmesh("apply", "-f", str(tmp_path), env=gmesh_env)
    assert applied.returncode == 0, applied.stderr
    listed = gmesh("owners", env=gmesh_env)
    assert listed.stdout.strip() == "orders\tShop <shop@example.com>"


def test_bad_contact_is_rejected_with_its_line(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "owner.yaml").write_text(
        "kind: Owner\nmetadata: {name: shop}\nspec:\n  team: Shop\n  contact: nobody\n  services: [orders]\n"
    )
    out = gmesh("apply", "-f", str(tmp_path / "owner.yaml"), env=gmesh_env)
    assert out.returncode == 1
    assert "owner.yaml:5: Owner/shop: spec.contact: 'nobody' is not an e-mail address" in out.stderr


# --------------------------------------------------------------------------- the filter template


def _snapshot(*owners: Owner) -> MeshSnapshot:
    resources = {"Owner": {f"o{i}": Resource("Owner", f"o{i}", spec) for i, spec in enumerate(owners)}}
    return MeshSnapshot(revision=1, resources={"Service": {"orders": None, "stock": None}, **resources})  # type: ignore[dict-item]


def _chain(snapshot: MeshSnapshot, service: str, mesh: MeshState | None = None) -> ServiceChain:
    factories = order([f for f in Plugins.load().filter_factories() if f.plugin == "owners"])
    return compile_chain(snapshot, factories, service, mesh)


def test_the_filter_is_built_only_for_owned_services() -> None:
    snapshot = _snapshot(Owner(team="Shop", contact="shop@example.com", services=["orders"]))
    assert _chain(snapshot, "orders").filters == ("owner-team", "forward")
    assert _chain(snapshot, "stock").filters == ("forward",)  # not owned: nothing to pay per call


async def test_the_filter_tags_calls_and_counts_failures() -> None:
    snapshot = _snapshot(Owner(team="Shop", contact="shop@example.com", services=["orders"]))
    mesh = MeshState(lambda: snapshot)
    chain = _chain(snapshot, "orders", mesh)
    seen: list[tuple[tuple[str, str | bytes], ...]] = []

    async def upstream(call: Call[None]) -> str:
        seen.append(call.metadata)
        if call.method.endswith("/Fail"):
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "down")
        if call.method.endswith("/Bad"):
            raise UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, "the caller's mistake")
        return "answered"

    for method in ("/shop.Orders/Get", "/shop.Orders/Fail", "/shop.Orders/Bad"):
        call: Call[None] = Call(method, (("x-user", "1"),), None, "orders", upstream)
        with contextlib.suppress(UpstreamError):
            await chain.handler(call)
    assert seen == [(("x-user", "1"), ("x-owner-team", "Shop"))] * 3
    counts = mesh.kept("orders", "owners.counts", TeamCounts)  # what the filter kept
    assert (counts.calls, counts.failed) == (3, 1)  # a caller's mistake is not a failure
    again = _chain(snapshot, "orders", mesh)  # a config change rebuilds the filter: counts stay
    await again.handler(Call("/shop.Orders/Get", (), None, "orders", upstream))
    assert counts.calls == 4


async def test_calls_through_a_real_proxy_carry_the_team(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(
        "kind: Service\nmetadata: {name: echo}\n---\n"
        "kind: Owner\nmetadata: {name: platform}\nspec:\n  team: Platform\n  contact: p@example.com\n"
        "  services: [echo]\n"
    )
    applied = gmesh("apply", "-f", str(tmp_path / "mesh.yaml"), env=gmesh_env)
    assert applied.returncode == 0, applied.stderr
    server = await start_echo_server("up")
    proxy = None
    try:
        async with gmesh_register(
            server.address, service="echo", etcd=gmesh_env["GMESH_ETCD"], prefix=gmesh_env["GMESH_PREFIX"],
            handle_sigterm=False, drain_delay=0,
        ):  # fmt: skip
            address = f"127.0.0.1:{free_port()}"
            proxy = await asyncio.create_subprocess_exec(
                *GMESH, "proxy", "--listen", address, "--admin", "", "--drain-delay", "0s",
                env=gmesh_env, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proxy.stderr is not None
            async with asyncio.timeout(30):
                while b"listening" not in (line := await proxy.stderr.readline()):
                    assert line, "the proxy exited"
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await echo_pb2_grpc.EchoStub(channel).Unary(
                    echo_pb2.EchoRequest(), timeout=10, wait_for_ready=True
                )
            assert reply.metadata["x-owner-team"] == "Platform"  # what the upstream server saw
    finally:
        if proxy is not None and proxy.returncode is None:
            proxy.terminate()
            await proxy.wait()
        await server.stop(None)
