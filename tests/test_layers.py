"""Layering: the core never imports a plugin, and plugins never import each other.

Core (chain, routing, balancer, outcomes, endpoint state, stats, the outbound stack and the
front doors) sits below `gmesh/plugins/`: a built-in plugin is written like a third-party
one, against the core only. Walks every import statement of every module (type-only
imports included: they are dependencies too).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

GMESH = Path(__file__).resolve().parents[1] / "gmesh"
PLUGINS = "gmesh.plugins"
#: the one core module allowed to name the built-ins: it loads them by name, like entry points
LOADER = "gmesh.pluginmanager"


def module_of(path: Path) -> str:
    parts = list(path.relative_to(GMESH.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, by full name (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_of(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def plugin_of(module: str) -> str | None:
    """`gmesh.plugins.router` -> `router`; None for core modules."""
    if module == PLUGINS or not module.startswith(PLUGINS + "."):
        return None
    return module.split(".")[2]


MODULES = sorted(p for p in GMESH.rglob("*.py") if "_pb2" not in p.name)


def violations(path: Path) -> list[str]:
    module = module_of(path)
    own = plugin_of(module)
    bad = []
    for target in sorted(imports(path)):
        theirs = plugin_of(target)
        if theirs is None:
            continue
        if own is None and module != LOADER:
            bad.append(f"core module {module} imports plugin {target}")
        elif own is not None and theirs != own:
            bad.append(f"plugin {module} imports another plugin, {target}")
    return bad


def test_there_are_modules_and_plugins_to_check() -> None:
    names = {module_of(p) for p in MODULES}
    assert {"gmesh.chain.call", "gmesh.outbound.stack", "gmesh.plugins.router"} <= names
    assert sum(1 for n in names if plugin_of(n)) >= 6


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(GMESH)))
def test_no_core_to_plugin_or_plugin_to_plugin_import(path: Path) -> None:
    assert violations(path) == []


def test_the_walk_catches_both_kinds_of_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "gmesh"
    (fake / "plugins").mkdir(parents=True)
    (fake / "outbound").mkdir()
    core = fake / "outbound" / "stack.py"
    core.write_text("from gmesh.plugins.stats import CountCalls\n")
    plugin = fake / "plugins" / "retry.py"
    plugin.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .router import Route\n")
    fine = fake / "plugins" / "stats.py"
    fine.write_text("from gmesh.stats.backend import BackendStats\nfrom gmesh.plugins.stats import x\n")
    monkeypatch.setattr(sys.modules[__name__], "GMESH", fake)
    assert violations(core) == [
        "core module gmesh.outbound.stack imports plugin gmesh.plugins.stats",
        "core module gmesh.outbound.stack imports plugin gmesh.plugins.stats.CountCalls",
    ]
    assert violations(plugin) == [
        "plugin gmesh.plugins.retry imports another plugin, gmesh.plugins.router",
        "plugin gmesh.plugins.retry imports another plugin, gmesh.plugins.router.Route",
    ]
    assert violations(fine) == []
