"""The Telemetry kind: validation with file, line and field; mesh defaults and per-service overrides."""

from __future__ import annotations

from textwrap import dedent

import pytest

from gmesh.config.kinds import ConfigView, KindRegistry
from gmesh.config.loader import load_text
from gmesh.config.telemetry import TELEMETRY, telemetry_of
from gmesh.config.validate import validate_documents
from gmesh.errors import ConfigError

KINDS = KindRegistry()
KINDS.add(TELEMETRY)


def load(text: str) -> dict[str, object]:
    docs, problems = load_text(dedent(text), "tel.yaml")
    assert problems == []
    return {r.name: r for r in validate_documents(docs, KINDS, ConfigView({}))}


def test_a_bad_field_names_file_line_and_field() -> None:
    text = """\
        kind: Telemetry
        metadata: {name: t}
        spec:
          metrics: {enabeld: true}
    """
    with pytest.raises(ConfigError) as error:
        load(text)
    [problem] = error.value.problems
    assert (problem.file, problem.line, problem.path) == ("tel.yaml", 4, "spec.metrics.enabeld")
    assert "did you mean 'enabled'" in problem.message


def test_two_telemetries_for_one_service_are_refused() -> None:
    text = """\
        kind: Telemetry
        metadata: {name: a}
        spec: {service: orders}
        ---
        kind: Telemetry
        metadata: {name: b}
        spec: {service: orders, metrics: {enabled: false}}
    """
    with pytest.raises(ConfigError) as error:
        load(text)
    assert any("already sets service 'orders'" in p.message for p in error.value.problems)


def test_a_service_overrides_the_mesh_defaults_field_by_field() -> None:
    resources = load("""\
        kind: Telemetry
        metadata: {name: mesh}
        spec: {metrics: {enabled: false}}
        ---
        kind: Telemetry
        metadata: {name: orders}
        spec: {service: orders, metrics: {enabled: true}}
        ---
        kind: Telemetry
        metadata: {name: batch}
        spec: {service: batch, metrics: {}}
    """)
    assert telemetry_of(resources, "orders").metrics is True  # type: ignore[arg-type]
    assert telemetry_of(resources, "batch").metrics is False  # type: ignore[arg-type]  # not given: mesh's
    assert telemetry_of(resources, "other").metrics is False  # type: ignore[arg-type]
    assert telemetry_of({}, "other").metrics is True
