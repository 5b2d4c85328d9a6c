"""The per-request path stays plain code: no plugin hook dispatch, no protobuf decoding in the proxy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GMESH = Path(__file__).resolve().parents[2] / "gmesh"
HOT = sorted(
    [
        *(GMESH / "chain").glob("*.py"),
        *(GMESH / "balancer").glob("*.py"),
        *(GMESH / "channel").glob("*.py"),
        *(p for p in (GMESH / "outbound").glob("*.py") if p.name != "stack.py"),  # stack: start-up
        GMESH / "proxy" / "relay.py",
        GMESH / "proxy" / "server.py",
        *(GMESH / "routing").glob("*.py"),
        GMESH / "errors.py",
        *(GMESH / "stats").glob("*.py"),
        GMESH / "plugins" / "balancer.py",
        GMESH / "plugins" / "router.py",
        GMESH / "plugins" / "retry.py",
        GMESH / "plugins" / "stats.py",
        GMESH / "plugins" / "breaker.py",
    ]
)
PROXY = [GMESH / "proxy" / "relay.py", GMESH / "proxy" / "server.py"]


def names(path: Path) -> tuple[set[str], set[str]]:
    """(attribute names used, modules imported) in a file."""
    tree = ast.parse(path.read_text())
    attrs = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imports: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imports.add(node.module)
    return attrs, imports


def test_the_hot_path_modules_exist() -> None:
    assert len(HOT) >= 8 and all(p.exists() for p in HOT)


@pytest.mark.parametrize("path", HOT, ids=lambda p: str(p.relative_to(GMESH)))
def test_no_plugin_hook_dispatch_on_the_request_path(path: Path) -> None:
    attrs, imports = names(path)
    assert "hook" not in attrs, f"{path.name} dispatches a pluggy hook"
    assert not {"pluggy", "gmesh.pluginmanager"} & imports, f"{path.name} imports the plugin manager"


@pytest.mark.parametrize("path", PROXY, ids=lambda p: p.name)
def test_the_proxy_never_decodes_protobuf(path: Path) -> None:
    attrs, imports = names(path)
    assert not any(i.startswith("google.protobuf") or i.endswith("_pb2") for i in imports)
    assert not {"FromString", "ParseFromString", "SerializeToString"} & attrs


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(pm):\n    return pm.hook.gmesh_filter_factories()\n")
    attrs, _ = names(bad)
    assert "hook" in attrs
