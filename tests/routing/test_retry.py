"""The retry budget (a share of recent requests plus a floor, over a sliding window) and backoff."""

from __future__ import annotations

import pytest

from gmesh.routing.retry import RetryBudget, backoff


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget(
    clock: FakeClock, *, ratio: float = 0.2, min_per_second: float = 0.0, window: float = 10.0
) -> RetryBudget:
    return RetryBudget(ratio=ratio, min_per_second=min_per_second, window=window, clock=clock)


def retries_allowed(b: RetryBudget, limit: int = 10_000) -> int:
    """How many retries in a row the budget allows right now (spending them)."""
    n = 0
    while n < limit and b.try_retry():
        n += 1
    return n


def test_ratio_of_requests_allows_exactly_that_many_retries() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.2)
    for _ in range(100):
        b.record_request()
    assert retries_allowed(b) == 20
    assert b.usage() == (100, 20)
    assert b.try_retry() is False
    assert b.usage() == (100, 20)  # a refused retry is not counted


def test_more_requests_make_room_for_more_retries() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.5)
    for _ in range(10):
        b.record_request()
    assert retries_allowed(b) == 5
    for _ in range(4):
        b.record_request()
    assert retries_allowed(b) == 2
    assert b.usage() == (14, 7)


def test_no_requests_no_floor_no_retries() -> None:
    b = budget(FakeClock(), ratio=0.2, min_per_second=0)
    assert b.try_retry() is False
    assert b.usage() == (0, 0)


def test_floor_applies_without_requests() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.2, min_per_second=2, window=5)
    assert retries_allowed(b) == 2 * 5
    assert b.usage() == (0, 10)


def test_floor_adds_to_the_ratio() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.1, min_per_second=1, window=3)
    for _ in range(50):
        b.record_request()
    assert retries_allowed(b) == 5 + 3


def test_requests_over_several_seconds_all_count() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.2, window=10)
    for _ in range(9):
        for _ in range(10):
            b.record_request()
        clock.now += 1
    assert b.usage() == (90, 0)
    assert retries_allowed(b) == 18


def test_old_seconds_slide_out_of_the_window() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.2, window=10)
    for _ in range(100):
        b.record_request()
    assert retries_allowed(b) == 20
    clock.now += 10 + 1
    assert b.usage() == (0, 0)
    assert b.try_retry() is False  # no requests left in the window, no floor


def test_window_slides_second_by_second() -> None:
    clock = FakeClock(2000.0)
    b = budget(clock, ratio=0.5, window=10)
    for _ in range(10):
        b.record_request()  # at t=0
    clock.now += 5
    for _ in range(20):
        b.record_request()  # at t=5
    assert b.try_retry() is True
    clock.now += 4  # t=9: both seconds still in the window
    assert b.usage() == (30, 1)
    clock.now += 1  # t=10: second 0 has left
    assert b.usage() == (20, 1)
    clock.now += 5  # t=15: second 5 has left too
    assert b.usage() == (0, 0)


def test_spent_retries_slide_out_and_the_budget_refills() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.0, min_per_second=1, window=4)
    assert retries_allowed(b) == 4
    clock.now += 4 + 1
    assert b.usage() == (0, 0)
    assert retries_allowed(b) == 4


def test_a_long_pause_clears_everything() -> None:
    clock = FakeClock()
    b = budget(clock, ratio=0.2, window=10)
    for _ in range(100):
        b.record_request()
    retries_allowed(b)
    clock.now += 1_000_000
    assert b.usage() == (0, 0)


def test_fractional_seconds_share_a_slot() -> None:
    clock = FakeClock(3000.0)
    b = budget(clock, ratio=0.2, window=2)
    for _ in range(10):
        b.record_request()
    clock.now += 0.9
    assert b.usage() == (10, 0)
    clock.now += 2.2  # now 3.1 s later: second 3000 has left the 2 s window
    assert b.usage() == (0, 0)


def test_ratio_is_exact_for_whole_percentages() -> None:
    b = budget(FakeClock(), ratio=0.29)
    for _ in range(100):
        b.record_request()
    assert retries_allowed(b) == 29


# -- backoff -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "cap"), [(0.025, 0.25), (0.1, 1.0), (1.0, 0.5)])
@pytest.mark.parametrize("attempt", range(1, 9))
def test_backoff_stays_below_the_exponential_bound(attempt: int, base: float, cap: float) -> None:
    bound = min(cap, base * 2 ** (attempt - 1))
    high = backoff(attempt, base, cap, rand=lambda: 0.999)
    low = backoff(attempt, base, cap, rand=lambda: 0.0)
    assert 0.0 <= high < bound
    assert high == pytest.approx(0.999 * bound)
    assert low == 0.0


def test_backoff_doubles_until_the_cap() -> None:
    highs = [backoff(n, 0.1, 1.0, rand=lambda: 0.5) for n in range(1, 8)]
    assert highs == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5])


def test_backoff_with_real_randomness_stays_in_range() -> None:
    for attempt in range(1, 6):
        bound = min(0.25, 0.025 * 2 ** (attempt - 1))
        for _ in range(200):
            assert 0.0 <= backoff(attempt, 0.025, 0.25) < bound
