"""Everything users read is there: hooks documented in code and in docs, README commands consistent."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from gmesh import hookspecs
from gmesh.pluginmanager import Plugins

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("gmesh_")]


def test_there_are_hooks() -> None:
    assert "gmesh_register_config_kinds" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_and_a_docs_entry(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 80, f"{hook} needs a real docstring"
    assert "Hot path: never" in doc
    assert f"`{hook}`" in (ROOT / "docs" / "plugins.md").read_text()


def test_every_config_field_is_in_the_config_reference() -> None:
    reference = (ROOT / "docs" / "config.md").read_text()
    for kind in Plugins.builtin_only().config_kinds():
        assert f"## {kind.name}" in reference
        for name, field in kind.spec.model_fields.items():
            assert f"`{field.alias or name}`" in reference, f"{kind.name}.{field.alias or name} undocumented"


def test_readme_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    test_cmd = re.search(r"<!-- test-command -->\s*\n\s+(.+)\n", readme)
    main_cmd = re.search(r"<!-- main-command -->\s*\n\s+(.+)\n", readme)
    assert test_cmd and main_cmd
    assert "tox" in test_cmd.group(1) and "gmesh demo" in main_cmd.group(1)
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
