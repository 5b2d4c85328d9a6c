"""The `gmesh` command as users run it (a subprocess) against a real etcd: output, errors, exit codes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from gmesh.config.loader import load_text
from gmesh.discovery.keys import MeshKeys
from gmesh.store.etcd import EtcdConfig, Store
from gmesh.testing.etcd import EtcdMember

# -P: run the installed gmesh, never a source checkout that happens to be the cwd
GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def gmesh(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one line on stderr, 'error: ...', and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def stored_keys(etcd: EtcdMember, prefix: str) -> list[str]:
    async def read() -> list[str]:
        async with await Store.connect(EtcdConfig.parse(etcd.url)) as store:
            return [kv.key for kv in (await store.get_prefix(prefix))[0]]

    return asyncio.run(read())


def all_commands() -> list[list[str]]:
    from gmesh.cli import _add_builtin_commands, cli

    _add_builtin_commands()
    found: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        found.append(path)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(cli, [])
    return found


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "gmesh")
def test_every_command_has_help(command: list[str], gmesh_env: dict[str, str]) -> None:
    result = gmesh(*command, "--help", env=gmesh_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: gmesh {' '.join(command)}".rstrip())


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "gmesh")
def test_every_command_and_option_is_described(command: list[str]) -> None:
    from gmesh.cli import cli

    cmd: click.Command = cli
    for name in command:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    assert cmd.help and cmd.help.strip()
    undocumented = [
        p.name for p in cmd.params if isinstance(p, click.Option) and not p.help and p.name != "help"
    ]
    assert undocumented == []


def test_apply_bad_field_names_file_line_and_path_and_writes_nothing(
    gmesh_env: dict[str, str], etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    good = tmp_path / "a-good.yaml"
    good.write_text("kind: Service\nmetadata: {name: orders}\nspec:\n  timeout: 2s\n")
    bad = tmp_path / "b-bad.yaml"
    bad.write_text(
        "kind: Service\nmetadata:\n  name: payments\nspec:\n  subsets:\n    v1: {version: v1}\n  timout: 3s\n"
    )
    result = gmesh("apply", "-f", str(tmp_path), env=gmesh_env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{bad}:7: Service/payments: spec.timout: unknown field; did you mean 'timeout'?" in result.stderr
    assert "nothing was written" in result.stderr
    assert stored_keys(etcd_server, mesh_keys.prefix) == []  # not even the good document


def test_apply_diff_dry_run_and_get(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    doc = tmp_path / "orders.yaml"
    doc.write_text(
        "kind: Service\nmetadata: {name: orders}\nspec:\n  subsets: {v1: {version: v1}}\n  timeout: 2s\n"
    )
    dry = gmesh("apply", "-f", str(doc), "--dry-run", env=gmesh_env)
    assert dry.returncode == 0, dry.stderr
    assert "+ Service/orders (created)" in dry.stdout and "dry run: 1 change(s) not written" in dry.stdout
    assert "no Service resources" in gmesh("get", "service", env=gmesh_env).stdout

    applied = gmesh("apply", "-f", str(doc), env=gmesh_env)
    assert applied.returncode == 0 and "applied 1 change(s)" in applied.stdout
    again = gmesh("apply", "-f", str(doc), env=gmesh_env)
    assert "= Service/orders (unchanged)" in again.stdout and "nothing to change" in again.stdout

    doc.write_text(doc.read_text().replace("2s", "3s"))
    changed = gmesh("apply", "-f", str(doc), env=gmesh_env)
    assert "~ Service/orders (changed)" in changed.stdout
    assert "-  timeout: 2s" in changed.stdout and "+  timeout: 3s" in changed.stdout

    table = gmesh("get", "svc", env=gmesh_env).stdout.splitlines()
    assert table[0].split() == ["NAME", "SPEC", "REVISION"]
    assert table[1].split()[:3] == ["orders", "subsets=v1", "timeout=3s"]
    as_yaml = yaml.safe_load(gmesh("get", "service", "orders", "-o", "yaml", env=gmesh_env).stdout)
    assert as_yaml == {
        "kind": "Service",
        "metadata": {"name": "orders"},
        "spec": {"subsets": {"v1": {"version": "v1"}}, "timeout": "3s"},
    }
    as_json = json.loads(gmesh("get", "Service", "-o", "json", env=gmesh_env).stdout)
    assert as_json == [as_yaml]

    assert gmesh("delete", "service", "orders", env=gmesh_env).returncode == 0
    assert (
        one_line_error(gmesh("delete", "service", "orders", env=gmesh_env))
        == "error: Service/orders not found"
    )


def test_get_endpoints_table_and_json(gmesh_env: dict[str, str], mesh_keys: MeshKeys) -> None:
    from gmesh.discovery.endpoint import Endpoint

    async def put() -> None:
        async with await Store.connect(EtcdConfig.parse(gmesh_env["GMESH_ETCD"])) as store:
            for addr, version in (("127.0.0.1:5001", "v1"), ("127.0.0.1:5002", "v2")):
                tls = addr if version == "v2" else ""  # v2 serves mTLS only
                ep = Endpoint(
                    "orders", addr, labels={"version": version}, grpc_services=("shop.Orders",), tls=tls
                )
                await store.put(mesh_keys.endpoint("orders", addr), ep.to_json())

    asyncio.run(put())
    rows = gmesh("get", "endpoints", env=gmesh_env).stdout.splitlines()
    header = ["SERVICE", "ADDRESS", "MTLS", "LABELS", "GRPC", "SERVICES", "ZONE", "WEIGHT", "AGE"]
    assert rows[0].split() == header
    assert [r.split()[:5] for r in rows[1:]] == [
        ["orders", "127.0.0.1:5001", "-", "version=v1", "shop.Orders"],
        ["orders", "127.0.0.1:5002", "only", "version=v2", "shop.Orders"],
    ]
    records = json.loads(gmesh("get", "endpoints", "orders", "-o", "json", env=gmesh_env).stdout)
    assert [(r["service"], r["address"], r["labels"]) for r in records] == [
        ("orders", "127.0.0.1:5001", {"version": "v1"}),
        ("orders", "127.0.0.1:5002", {"version": "v2"}),
    ]
    assert (
        gmesh("get", "endpoints", "payments", env=gmesh_env).stdout.strip()
        == "no endpoints for service payments"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["get", "widgets"], "error: unknown kind 'widgets'"),
        (["delete", "Servce", "x"], "error: unknown kind 'Servce'"),
        (["register", "-s", "orders", "-a", "127.0.0.1"], "error: address '127.0.0.1' has no port"),
        (["register", "-s", "orders", "-a", "[::1]"], "error: address '[::1]' has no port"),
        (
            ["register", "-s", "orders", "-a", "127.0.0.1:5000", "-l", "version"],
            "error: label 'version': expected KEY=VALUE",
        ),
        (
            ["register", "-s", "orders", "-a", "127.0.0.1:5000", "-l", "ver sion=v1"],
            "error: label key 'ver sion'",
        ),
        (
            ["register", "-s", "orders", "-a", "127.0.0.1:5000", "-l", "version=v 1"],
            "error: label value 'v 1'",
        ),
        (
            ["register", "-s", "Orders_1", "-a", "127.0.0.1:5000"],
            "error: service 'Orders_1' is not a valid name",
        ),
        (
            ["get", "endpoints", "--etcd", "http://127.0.0.1:1"],
            "error: etcd at http://127.0.0.1:1 is unreachable",
        ),
        (["get", "endpoints", "--etcd", "127.0.0.1"], "error: etcd endpoint '127.0.0.1': expected HOST:PORT"),
        (["get", "service", "--prefix", "gmesh"], "error: --prefix: mesh prefix must start and end with '/'"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], expected: str, gmesh_env: dict[str, str]) -> None:
    assert one_line_error(gmesh(*args, env=gmesh_env)).startswith(expected)


def test_apply_unknown_kind_and_duplicate_names(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "kind: Service\nmetadata: {name: orders}\n---\nkind: Widget\nmetadata: {name: w}\n"
    )
    (tmp_path / "b.yaml").write_text("\n\nkind: Service\nmetadata: {name: orders}\n")
    result = gmesh("apply", "-f", str(tmp_path), env=gmesh_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'a.yaml'}:4: kind: unknown kind 'Widget' (known: " in result.stderr
    assert (
        f"{tmp_path / 'b.yaml'}:4: Service/orders: metadata.name: duplicate Service/orders "
        f"(also defined at {tmp_path / 'a.yaml'}:1)"
    ) in result.stderr


def test_apply_missing_file_and_invalid_yaml(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    missing = gmesh("apply", "-f", str(tmp_path / "nope.yaml"), env=gmesh_env)
    assert (
        missing.returncode == 1 and f"{tmp_path / 'nope.yaml'}: no such file or directory" in missing.stderr
    )
    (tmp_path / "broken.yaml").write_text("kind: Service\nmetadata: {name: orders\n")
    broken = gmesh("apply", "-f", str(tmp_path / "broken.yaml"), env=gmesh_env)
    assert broken.returncode == 1 and "broken.yaml:3: invalid YAML" in broken.stderr


def test_schema_validates_the_examples_and_rejects_typos(gmesh_env: dict[str, str]) -> None:
    result = gmesh("schema", env=gmesh_env)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    # YAML 1.2 as gmesh (and yaml-language-server) read it: PyYAML's 1.1 would turn the key `on:` into True.
    docs = [d.data for p in sorted(EXAMPLES.glob("*.yaml")) for d in load_text(p.read_text(), str(p))[0]]
    assert docs, "examples/ has config documents"
    for doc in docs:
        jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "Service", "metadata": {"name": "x"}, "spec": {"timout": "2s"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "Service", "metadata": {"name": "x"}, "spec": {"timeout": "2"}}, schema)


def test_plugins_lists_builtins_and_refuses_to_disable_essentials(gmesh_env: dict[str, str]) -> None:
    listed = gmesh("plugins", env=gmesh_env)
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "DISTRIBUTION", "VERSION", "BUILT-IN", "GIVES"]
    service = next(r.split() for r in rows if r.startswith("service "))
    assert service[:4] == ["service", "gmesh", "0.1.0", "yes"]
    router = next(r for r in rows if r.startswith("router "))
    assert router.endswith("kind Route, filter route (ROUTE)")
    assert next(r for r in rows if r.startswith("breaker ")).endswith("filter breaker (LIMIT)")
    refused = gmesh("plugins", env={**gmesh_env, "GMESH_DISABLE_PLUGINS": "service"})
    assert one_line_error(refused) == (
        "error: GMESH_DISABLE_PLUGINS: built-in plugin(s) service cannot be disabled"
    )
