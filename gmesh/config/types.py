"""Field types shared by config kinds: durations, names, labels, and the spec base model."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema
from pydantic.alias_generators import to_camel

from gmesh.discovery.endpoint import dns_label_problem, label_key_problem, label_value_problem

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """`300ms`, `2s`, `1.5s`, `1m30s`, `1h` -> seconds. Bare numbers are refused: which unit?"""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a duration such as 2s or 300ms")
    if isinstance(value, (int, float)):
        raise ValueError(f"duration {value!r} needs a unit: write {value}s or {value}ms")
    text = value.strip()
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"{value!r} is not a duration: use a number with a unit ms, s, m or h (e.g. 2s, 300ms)"
        )
    return sum(float(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))


def age(seconds: float) -> str:
    """How long, roughly, for tables and pages: 45s, 12m, 3h, 2d ("?" for a negative span)."""
    if seconds < 0:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration."""
    ms = round(seconds * 1000, 6)
    if ms == int(ms):
        ms_int = int(ms)
        for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
            if ms_int and ms_int % size == 0:
                return f"{ms_int // size}{unit}"
        return f"{ms_int}ms"
    # Below a millisecond: plain decimal seconds (never an exponent, which would not parse back).
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {"type": "string", "pattern": _DURATION.pattern, "examples": ["2s", "300ms", "1m30s"]},
        mode="validation",
    ),
]
"""Seconds in Python; a string with a unit (`2s`, `300ms`) in YAML and in etcd."""


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be greater than 0")
    return seconds


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
"""A `Duration` greater than zero (timeouts, intervals, ages)."""


def _check(problem_of: object) -> AfterValidator:
    def check(value: str) -> str:
        problem = problem_of(value)  # type: ignore[operator]
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


Name = Annotated[
    str,
    _check(dns_label_problem),
    WithJsonSchema({"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"}),
]
"""A DNS label: service, resource and subset names."""

_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


def _metadata_key_problem(key: str) -> str | None:
    if not _METADATA_KEY.fullmatch(key):
        return f"metadata key {key!r} must be lowercase letters, digits, '-', '_' or '.'"
    return None


MetadataKey = Annotated[
    str, _check(_metadata_key_problem), WithJsonSchema({"type": "string", "pattern": r"^[0-9a-z_.-]+$"})
]
"""A gRPC request metadata key as gRPC carries it: lowercase."""


def method_pattern_problem(method: str) -> str | None:
    """Why `method` is not a method path (`/pkg.Service/Method`) or a prefix ending in `*`."""
    if method.startswith("/") and ("*" not in method or (method.endswith("*") and method.count("*") == 1)):
        return None
    example = "a path like /orders.v1.Orders/Get, or a prefix ending in '*' (/orders.v1.Orders/*)"
    return f"method {method!r}: {example}"


MethodPattern = Annotated[
    str,
    _check(method_pattern_problem),
    WithJsonSchema({"type": "string", "pattern": r"^/[^*]*\*?$"}),
]
"""A method path (`/orders.v1.Orders/Get`) or a prefix of paths ending in `*` (`/orders.v1.Orders/*`):
what AuthorizationPolicy, RateLimit and Quota select calls by."""

LabelKey = Annotated[str, _check(label_key_problem)]
LabelValue = Annotated[str, _check(label_value_problem)]
Labels = dict[LabelKey, LabelValue]


class SpecModel(BaseModel):
    """Base of every kind's spec: camelCase fields in YAML, unknown fields rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=False,
    )
