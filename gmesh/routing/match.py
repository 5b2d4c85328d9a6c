"""Compiled matches on strings (method paths, metadata values): exact, prefix, regex, present, absent.

A compiled match is a plain callable `str | None -> bool` (None: the key is absent), built
once per config change; regexes must match the whole value (as Envoy's `safe_regex` does).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gmesh.chain.metadata import metadata_value

__all__ = ["absent", "exact", "metadata_value", "prefix", "present", "regex", "regex_problem"]

StringPredicate = Callable[[str | None], bool]


def exact(expected: str) -> StringPredicate:
    return lambda value: value == expected


def prefix(expected: str) -> StringPredicate:
    return lambda value: value is not None and value.startswith(expected)


def regex(pattern: str) -> StringPredicate:
    compiled = re.compile(pattern)
    return lambda value: value is not None and compiled.fullmatch(value) is not None


def present(value: str | None) -> bool:
    return value is not None


def absent(value: str | None) -> bool:
    return value is None


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` is not a valid regex, or None."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regex {pattern!r}: {exc}"
    return None
