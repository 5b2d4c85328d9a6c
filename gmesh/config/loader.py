"""Reading config files: YAML documents with the line of every field, for errors users can act on.

YAML 1.2 booleans only (`true`/`false`): `on: [UNAVAILABLE]` stays the key "on", not True.
Duplicate keys in one mapping are an error, not a silent last-one-wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gmesh.errors import Problem

PathPart = str | int
FieldPath = tuple[PathPart, ...]

SUFFIXES = (".yaml", ".yml", ".json")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (no yes/no/on/off)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass
class Document:
    """One YAML document: its data and the 1-based line of every field path in it."""

    file: str
    line: int
    data: Any
    lines: dict[FieldPath, int] = field(default_factory=dict)
    #: scalars as written, before YAML typed them (`1.10`, not 1.1), for error messages
    scalars: dict[FieldPath, str] = field(default_factory=dict)

    def line_of(self, path: FieldPath) -> int:
        """Line of `path`, or of its nearest parent that exists (a missing field's mapping)."""
        for end in range(len(path), -1, -1):
            found = self.lines.get(path[:end])
            if found is not None:
                return found
        return self.line


def format_path(path: FieldPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_INDEX = re.compile(r"\[(\d+)\]")


def parse_path(text: str) -> FieldPath:
    """The inverse of `format_path`: `spec.rules[0].backends[1].subset` -> parts; `a.2024` keeps "2024"."""
    path: list[PathPart] = []
    for segment in text.split("."):
        name, _, indexes = segment.partition("[")
        if name:
            path.append(name)
        if indexes:
            path.extend(int(i) for i in _INDEX.findall("[" + indexes))
    return tuple(path)


def load_text(text: str, file: str) -> tuple[list[Document], list[Problem]]:
    """Every non-empty document in `text`, or the YAML problems that stopped reading."""
    docs: list[Document] = []
    problems: list[Problem] = []
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[FieldPath, int] = {}
            scalars: dict[FieldPath, str] = {}
            try:
                _walk(node, (), lines, problems, file, scalars)
            except _RecursiveAlias as exc:
                problems.append(Problem(file, node.start_mark.line + 1, str(exc), "recursive YAML alias"))
                continue
            data = loader.construct_document(node)
            if data is None:
                continue  # an empty document between two `---`
            docs.append(Document(file, node.start_mark.line + 1, data, lines, scalars))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problems.append(Problem(file, line, "", f"invalid YAML: {exc.problem or exc.context}"))
    except yaml.YAMLError as exc:
        problems.append(Problem(file, None, "", f"invalid YAML: {exc}"))
    finally:
        loader.dispose()
    return docs, problems


class _RecursiveAlias(Exception):
    pass


def _walk(
    node: Node,
    path: FieldPath,
    lines: dict[FieldPath, int],
    problems: list[Problem],
    file: str,
    scalars: dict[FieldPath, str],
    parents: frozenset[int] = frozenset(),
) -> None:
    if id(node) in parents:
        raise _RecursiveAlias(format_path(path))
    parents = parents | {id(node)}
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, ScalarNode):
        scalars[path] = str(node.value)
    elif isinstance(node, MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                continue  # complex keys are rejected by validation later
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    Problem(
                        file, line, format_path((*path, key)), f"duplicate key (first at line {seen[key]})"
                    )
                )
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, problems, file, scalars, parents)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines, problems, file, scalars, parents)


def config_files(target: Path) -> list[Path]:
    """`target` itself, or every YAML/JSON file below a directory, in name order."""
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    return [target]


def load_paths(targets: list[Path]) -> tuple[list[Document], list[Problem]]:
    docs: list[Document] = []
    problems: list[Problem] = []
    for target in targets:
        if not target.exists():
            problems.append(Problem(str(target), None, "", "no such file or directory"))
            continue
        files = config_files(target)
        if not files:
            problems.append(Problem(str(target), None, "", "no .yaml, .yml or .json files in this directory"))
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(Problem(str(path), None, "", f"cannot read: {exc}"))
                continue
            found, bad = load_text(text, str(path))
            docs.extend(found)
            problems.extend(bad)
    return docs, problems
