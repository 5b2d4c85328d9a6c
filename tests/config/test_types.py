"""Durations: parsing what users write, formatting what gmesh stores."""

import pytest

from gmesh.config.types import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("0.5m", 30.0),
        ("0s", 0.0),
        ("1s500ms", 1.5),
        (" 2s ", 2.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "unitized"), [(2, "2s or 2ms"), (1.5, "1.5s or 1.5ms"), (0, "0s or 0ms")])
def test_bare_number_asks_for_a_unit(value: float, unitized: str) -> None:
    with pytest.raises(ValueError, match="needs a unit") as error:
        parse_duration(value)
    assert str(error.value) == f"duration {value!r} needs a unit: write {unitized}"


@pytest.mark.parametrize("text", ["2", "2 s", "-1s", "abc", "", "s", "1d", "1.s", ".5s", "2sec", "2S"])
def test_rejects_malformed_strings(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration") as error:
        parse_duration(text)
    assert str(error.value).startswith(f"{text!r} is not a duration: use a number with a unit ms, s, m or h")


@pytest.mark.parametrize("value", [True, False, None, [2], {"s": 2}])
def test_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValueError, match=r"^expected a duration such as 2s or 300ms$"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (90, "90s"),
        (60, "1m"),
        (0.3, "300ms"),
        (3600, "1h"),
        (5400, "90m"),
        (86400, "24h"),
        (2, "2s"),
        (1.5, "1500ms"),
        (0, "0ms"),
        (0.0015, "0.0015s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("90s", "90s"), ("1m30s", "90s"), ("60s", "1m"), ("0.3s", "300ms"), ("60m", "1h"), ("2000ms", "2s")],
)
def test_format_of_parse_is_canonical(text: str, canonical: str) -> None:
    assert format_duration(parse_duration(text)) == canonical
    assert format_duration(parse_duration(canonical)) == canonical


@pytest.mark.parametrize("text", ["300ms", "1m30s", "1.5s", "0.25ms", "0.01ms", "0.05ms", "1.2345678s"])
def test_formatted_duration_parses_back_to_the_same_value(text: str) -> None:
    # What format_duration writes (e.g. into etcd) must be readable by parse_duration, exactly.
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-12, abs=0)
