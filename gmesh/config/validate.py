"""From YAML documents to validated resources, or to every problem with file, line and field.

The same parser reads what `gmesh apply` is given and what the catalog finds in etcd, so
a resource is valid in exactly one sense.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from gmesh.config.kinds import API_VERSION, ConfigView, Kind, KindRegistry, Resource, Source
from gmesh.config.loader import Document, FieldPath, format_path, parse_path
from gmesh.config.types import Labels, Name
from gmesh.errors import ConfigError, Problem

ENVELOPE_FIELDS = ("apiVersion", "kind", "metadata", "spec")


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    labels: Labels = {}
    annotations: dict[str, str] = {}


def _problem(doc: Document, path: FieldPath, message: str, resource: str = "") -> Problem:
    return Problem(doc.file, doc.line_of(path) if doc.lines else None, format_path(path), message, resource)


def _pydantic_problems(
    doc: Document, error: ValidationError, base: FieldPath, model: type[BaseModel], resource: str
) -> list[Problem]:
    problems = []
    for err in error.errors(include_url=False):
        loc: list[str | int] = []
        key_error = False
        for part in err["loc"]:
            if part == "[key]":
                key_error = True
                continue
            loc.append(part if isinstance(part, int) else str(part))
        path = (*base, *loc)
        problems.append(
            _problem(doc, path, _message(err, model, loc, key_error, doc.scalars.get(path)), resource)
        )
    return problems


def _message(
    err: Mapping[str, Any], model: type[BaseModel], loc: list[str | int], key_error: bool, written: str | None
) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model, loc[:-1])
        name = str(loc[-1]) if loc else "?"
        hint = difflib.get_close_matches(name, allowed, n=1)
        suggestion = (
            f"; did you mean {hint[0]!r}?"
            if hint
            else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        )
        return f"unknown field{suggestion}"
    if kind == "missing":
        return "required field is missing"
    if kind.startswith("string_type") and isinstance(err.get("input"), (int, float, bool)):
        # Quote what the user wrote: YAML already turned 1.10 into 1.1.
        text = written if written is not None else str(err["input"])
        return f"expected a string, got {text} (quote it in YAML: '{text}')"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if msg[1:2].islower():  # "Value must be" -> "value must be"; "OK is not" stays
        msg = msg[:1].lower() + msg[1:]
    return f"key: {msg}" if key_error else msg


def _allowed_fields(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """camelCase field names of the model found at `path` inside `model` (best effort)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue  # a list item: `current` is already the item's model
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            current = None
            break
        fields = {(f.alias or n): f for n, f in current.model_fields.items()}
        info = fields.get(part)
        current = _model_in(info.annotation) if info else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted((f.alias or n) for n, f in current.model_fields.items())
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def parse_document(doc: Document, kinds: KindRegistry) -> tuple[Resource | None, list[Problem]]:
    """One document -> one resource (or the problems that prevent it)."""
    data = doc.data
    if not isinstance(data, dict):
        return None, [_problem(doc, (), "a config document must be a mapping with kind, metadata and spec")]
    problems: list[Problem] = []
    name_for_errors = ""
    metadata_raw = data.get("metadata")
    if isinstance(metadata_raw, dict) and isinstance(metadata_raw.get("name"), str):
        name_for_errors = metadata_raw["name"]
    for key in data:
        if key not in ENVELOPE_FIELDS:
            near = difflib.get_close_matches(str(key), ENVELOPE_FIELDS, n=1)
            message = "unknown field" + (f"; did you mean {near[0]!r}?" if near else "")
            problems.append(
                _problem(
                    doc,
                    (str(key),),
                    message,
                    f"{data.get('kind')}/{name_for_errors}" if name_for_errors else "",
                )
            )
    api_version = data.get("apiVersion", API_VERSION)
    if api_version != API_VERSION:
        problems.append(_problem(doc, ("apiVersion",), f"must be {API_VERSION!r} (or left out)"))
    kind_name = data.get("kind")
    kind: Kind | None = None
    if kind_name is None:
        problems.append(_problem(doc, ("kind",), "required field is missing"))
    elif (
        not isinstance(kind_name, str)
        or kinds.get(kind_name) is None
        or kinds.require(kind_name).name != kind_name
    ):
        known_kinds = kinds.names()
        close = kinds.get(str(kind_name))
        similar = difflib.get_close_matches(str(kind_name), known_kinds, n=1)
        hint = (
            f"; did you mean {close.name!r}?"
            if close
            else (f"; did you mean {similar[0]!r}?" if similar else "")
        )
        problems.append(
            _problem(
                doc, ("kind",), f"unknown kind {kind_name!r}{hint} (known: {', '.join(known_kinds) or '-'})"
            )
        )
    else:
        kind = kinds.require(kind_name)
    ref = f"{kind.name if kind else kind_name}/{name_for_errors}" if name_for_errors else ""
    metadata: Metadata | None = None
    if metadata_raw is None:
        problems.append(_problem(doc, ("metadata",), "required field is missing (metadata.name)"))
    else:
        try:
            metadata = Metadata.model_validate(metadata_raw)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(doc, exc, ("metadata",), Metadata, ref))
    spec_raw = data.get("spec")
    spec = None
    if kind is not None:
        if spec_raw is None:
            spec_raw = {}
        try:
            spec = kind.spec.model_validate(spec_raw)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(doc, exc, ("spec",), kind.spec, ref))
    if problems or kind is None or metadata is None or spec is None:
        return None, problems
    return (
        Resource(
            kind=kind.name,
            name=metadata.name,
            spec=spec,
            labels=MappingProxyType(dict(metadata.labels)),
            annotations=MappingProxyType(dict(metadata.annotations)),
            source=Source(doc.file, doc.line),
        ),
        [],
    )


def parse_stored(raw: bytes, kinds: KindRegistry, *, key: str, revision: int = 0) -> Resource:
    """A resource as stored in etcd; raises ValueError naming the problem if it no longer validates."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{key}: not JSON: {exc}") from None
    resource, problems = parse_document(Document(key, 0, data), kinds)
    if resource is None:
        raise ValueError("; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems))
    return Resource(
        kind=resource.kind,
        name=resource.name,
        spec=resource.spec,
        labels=resource.labels,
        annotations=resource.annotations,
        revision=revision,
    )


def validate_documents(docs: Iterable[Document], kinds: KindRegistry, current: ConfigView) -> list[Resource]:
    """Every document valid, no duplicates, every cross-resource check passing — or `ConfigError`."""
    problems: list[Problem] = []
    resources: list[Resource] = []
    docs_by_resource: dict[tuple[str, str], Document] = {}
    for doc in docs:
        resource, found = parse_document(doc, kinds)
        problems.extend(found)
        if resource is None:
            continue
        first = docs_by_resource.get((resource.kind, resource.name))
        if first is not None:
            problems.append(
                _problem(
                    doc,
                    ("metadata", "name"),
                    f"duplicate {resource.ref} (also defined at {first.file}:{first.line})",
                    resource.ref,
                )
            )
            continue
        docs_by_resource[(resource.kind, resource.name)] = doc
        resources.append(resource)
    if not problems:
        view = current.overlay(resources)
        for resource in resources:
            kind = kinds.require(resource.kind)
            if kind.check is None:
                continue
            doc = docs_by_resource[(resource.kind, resource.name)]
            for path, message in kind.check(resource, view):
                field_path = parse_path(path) if isinstance(path, str) else tuple(path)
                problems.append(_problem(doc, field_path, message, resource.ref))
    if problems:
        raise ConfigError(problems)
    return resources
