"""Compiled string matches (exact, prefix, whole-value regex, present, absent) and metadata lookup."""

from __future__ import annotations

import pytest

from gmesh.routing import match as m


@pytest.mark.parametrize(
    ("value", "expected"),
    [("beta", True), ("Beta", False), ("beta ", False), ("bet", False), ("", False), (None, False)],
)
def test_exact(value: str | None, expected: bool) -> None:
    assert m.exact("beta")(value) is expected


def test_exact_empty_string_is_not_absent() -> None:
    assert m.exact("")("") is True
    assert m.exact("")(None) is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/orders.v1.Orders/Get", True),
        ("/orders.v1.Orders/", True),
        ("/orders.v1.Order", False),
        ("/orders.v2.Orders/Get", False),
        ("x/orders.v1.Orders/Get", False),
        (None, False),
    ],
)
def test_prefix(value: str | None, expected: bool) -> None:
    assert m.prefix("/orders.v1.Orders/")(value) is expected


def test_empty_prefix_matches_any_present_value() -> None:
    assert m.prefix("")("") is True
    assert m.prefix("")("anything") is True
    assert m.prefix("")(None) is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/orders.v1.Orders/GetOrder", True),
        ("/orders.v1.Orders/ListOrder", True),
        ("/orders.v1.Orders/GetOrderX", False),  # the whole value must match ...
        ("x/orders.v1.Orders/GetOrder", False),  # ... from its start
        ("/orders.v1.Orders/DeleteOrder", False),
        ("/ordersXv1.Orders/GetOrder", False),  # escaped dots are literal
        (None, False),
    ],
)
def test_regex_matches_the_whole_value(value: str | None, expected: bool) -> None:
    assert m.regex(r"/orders\.v1\.Orders/(Get|List)Order")(value) is expected


def test_regex_alternation_is_anchored_as_a_whole() -> None:
    # fullmatch, not `^a|b$`: "ab" matches neither alternative in full
    test = m.regex("a|b")
    assert (test("a"), test("b"), test("ab"), test("ba")) == (True, True, False, False)


def test_present_and_absent() -> None:
    assert (m.present("x"), m.present(""), m.present(None)) == (True, True, False)
    assert (m.absent("x"), m.absent(""), m.absent(None)) == (False, False, True)


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x", "a{2,1}", "(?P<n>a)(?P<n>b)"])
def test_regex_problem_names_the_invalid_pattern(pattern: str) -> None:
    problem = m.regex_problem(pattern)
    assert problem is not None
    assert problem.startswith(f"invalid regex {pattern!r}: ")
    assert len(problem) > len(f"invalid regex {pattern!r}: ")  # says why, too


@pytest.mark.parametrize("pattern", ["", "a", r"/orders\.v1\..*", "(Get|List)Order", "[a-z]{2,3}"])
def test_regex_problem_is_none_for_valid_patterns(pattern: str) -> None:
    assert m.regex_problem(pattern) is None


METADATA: tuple[tuple[str, str | bytes], ...] = (
    ("x-tier", "beta"),
    ("x-user-id", "u-1"),
    ("x-tier", "gold"),
    ("trace-bin", b"\x00\xff\xe9"),
    ("x-empty", ""),
)


def test_metadata_value_first_value_wins() -> None:
    assert m.metadata_value(METADATA, "x-tier") == "beta"
    assert m.metadata_value(METADATA, "x-user-id") == "u-1"


def test_metadata_value_bytes_are_decoded_as_latin_1() -> None:
    value = m.metadata_value(METADATA, "trace-bin")
    assert value == "\x00\xff\xe9"
    assert isinstance(value, str)


def test_metadata_value_absent_is_none() -> None:
    assert m.metadata_value(METADATA, "x-missing") is None
    assert m.metadata_value((), "x-tier") is None


def test_metadata_value_empty_is_present() -> None:
    assert m.metadata_value(METADATA, "x-empty") == ""


def test_metadata_value_keys_are_compared_exactly() -> None:
    # gRPC metadata keys are lowercase on the wire; the lookup expects a lowercase key
    assert m.metadata_value(METADATA, "X-Tier") is None


def test_metadata_value_feeds_predicates() -> None:
    assert m.exact("beta")(m.metadata_value(METADATA, "x-tier")) is True
    assert m.absent(m.metadata_value(METADATA, "x-debug")) is True
    assert m.present(m.metadata_value(METADATA, "x-empty")) is True
