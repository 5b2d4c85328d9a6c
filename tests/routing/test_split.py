"""Weighted splits: exact per 100 calls without a key, sticky and stable with one."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Hashable
from typing import TypeVar

import pytest

from gmesh.routing.split import HASH_SPACE, Split, key_point, smooth_schedule

H = TypeVar("H", bound=Hashable)


def counts(split: Split[H], n: int) -> collections.Counter[H]:
    return collections.Counter(split.next() for _ in range(n))


def test_90_10_is_exact_over_10000_calls() -> None:
    assert counts(Split(["v1", "v2"], [90, 10]), 10_000) == {"v1": 9000, "v2": 1000}


def test_every_100_consecutive_calls_follow_the_weights() -> None:
    split = Split(["v1", "v2"], [90, 10])
    picks = [split.next() for _ in range(1000)]
    for start in range(len(picks) - 100 + 1):
        window = collections.Counter(picks[start : start + 100])
        assert window == {"v1": 90, "v2": 10}, f"calls {start}..{start + 99}"


def test_three_way_split_is_exact() -> None:
    split = Split(["a", "b", "c"], [50, 30, 20])
    assert counts(split, 10_000) == {"a": 5000, "b": 3000, "c": 2000}
    assert counts(split, 100) == {"a": 50, "b": 30, "c": 20}


def test_zero_weight_choice_is_never_picked() -> None:
    split = Split(["a", "b", "c"], [60, 0, 40])
    assert counts(split, 1000) == {"a": 600, "c": 400}
    assert all(split.for_key(f"user-{i}") != "b" for i in range(2000))


def test_schedule_interleaves_the_minority_evenly() -> None:
    schedule = smooth_schedule((90, 10))
    assert len(schedule) == 100
    positions = [i for i, choice in enumerate(schedule) if choice == 1]
    assert len(positions) == 10
    gaps = {b - a for a, b in itertools.pairwise(positions)}
    assert gaps == {10}


def test_three_way_schedule_has_exact_counts() -> None:
    schedule = smooth_schedule((50, 30, 20))
    assert collections.Counter(schedule) == {0: 50, 1: 30, 2: 20}
    # smooth: the majority never runs more than twice in a row at 50%
    longest = run = 0
    for prev, cur in itertools.pairwise(schedule):
        run = run + 1 if cur == prev == 0 else 0
        longest = max(longest, run)
    assert longest <= 1


@pytest.mark.parametrize(
    ("choices", "weights"),
    [
        (["a", "b"], [90, 9]),
        (["a", "b"], [90, 11]),
        (["a", "b", "c"], [50, 30, 30]),
        (["a"], [99]),
        (["a", "b"], [110, -10]),
        (["a", "b"], [100]),
        ([], []),
    ],
)
def test_bad_weights_raise_value_error(choices: list[str], weights: list[int]) -> None:
    with pytest.raises(ValueError, match="weight"):
        Split(choices, weights)


def test_for_key_is_deterministic() -> None:
    split = Split(["v1", "v2"], [90, 10])
    other = Split(["v1", "v2"], [90, 10])  # another process: a different schedule start
    for i in range(500):
        key = f"user-{i}"
        first = split.for_key(key)
        assert {split.for_key(key) for _ in range(5)} == {first}
        assert other.for_key(key) == first


def test_key_point_is_stable_and_in_range() -> None:
    points = [key_point(f"user-{i}") for i in range(10_000)]
    assert points == [key_point(f"user-{i}") for i in range(10_000)]
    assert all(0 <= p < HASH_SPACE for p in points)
    # spread over the space, not bunched: every tenth of it gets 10% +- 2%
    tenths = collections.Counter(p * 10 // HASH_SPACE for p in points)
    assert set(tenths) == set(range(10))
    assert all(800 <= n <= 1200 for n in tenths.values()), tenths


def key_at(point: int) -> str:
    """A key whose hash lands exactly on `point`."""
    return next(k for k in (f"key-{i}" for i in range(1_000_000)) if key_point(k) == point)


def test_for_key_picks_the_backend_whose_cumulative_weight_covers_the_point() -> None:
    split = Split(["a", "b", "c"], [50, 30, 20])
    # a covers [0, 5000), b [5000, 8000), c [8000, 10000)
    for point, expected in [(0, "a"), (4999, "a"), (5000, "b"), (7999, "b"), (8000, "c"), (9999, "c")]:
        assert split.for_key(key_at(point)) == expected, point
    for i in range(2000):
        key = f"user-{i}"
        p = key_point(key)
        assert split.for_key(key) == ("a" if p < 5000 else "b" if p < 8000 else "c"), key


def test_sticky_distribution_is_within_2_percent() -> None:
    split = Split(["v1", "v2"], [90, 10])
    sticky = collections.Counter(split.for_key(f"user-{i}") for i in range(10_000))
    assert set(sticky) == {"v1", "v2"}
    assert 8800 <= sticky["v1"] <= 9200, sticky
    assert 800 <= sticky["v2"] <= 1200, sticky


def test_moving_weights_moves_keys_only_towards_the_canary() -> None:
    before = Split(["v1", "v2"], [90, 10])
    after = Split(["v1", "v2"], [75, 25])
    keys = [f"user-{i}" for i in range(10_000)]
    moves = collections.Counter((before.for_key(k), after.for_key(k)) for k in keys)
    assert moves[("v2", "v1")] == 0
    assert moves[("v1", "v2")] > 0
    # the keys that moved are about the 15% between the old and the new boundary
    assert 1300 <= moves[("v1", "v2")] <= 1700, moves
    # every key that was on the canary stays there
    assert moves[("v2", "v2")] == sum(1 for k in keys if before.for_key(k) == "v2")


def test_single() -> None:
    assert Split(["only"], [100]).single == "only"
    assert Split(["a", "b"], [0, 100]).single == "b"
    assert Split(["a", "b", "c"], [100, 0, 0]).single == "a"
    assert Split(["a", "b"], [90, 10]).single is None
    assert Split(["a", "b", "c"], [50, 0, 50]).single is None


def test_single_choice_always_chosen() -> None:
    split = Split([("orders", "v1")], [100])
    assert counts(split, 50) == {("orders", "v1"): 50}
    assert split.for_key("anyone") == ("orders", "v1")
