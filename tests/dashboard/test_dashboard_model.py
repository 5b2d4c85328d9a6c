"""The dashboard's rate window, per process, from published samples (plain objects, no I/O)."""

from __future__ import annotations

from collections import deque

from gmesh.dashboard.model import ACTIVE, WINDOW, Sample, _series_window
from gmesh.dashboard.render import layout
from gmesh.stats.golden import RowKey, Signals

KEY: RowKey = ("orders", "proxy", "", "orders", "/x.Y/Z", "web")


def sample(at: float, calls: int, skew: float = 0.0, since: float | None = None) -> Sample:
    """Published at `at` by the process's clock; read by the dashboard `skew` seconds later by its own."""
    return Sample(at, at + skew, {KEY: Signals(codes={"OK": calls})}, {}, [], since)


def rate(series: deque[Sample], now: float) -> float | None:
    found = _series_window(series, now)
    if found is None:
        return None
    start, end, seconds = found
    return (end.rows[KEY].calls - start.rows[KEY].calls) / seconds


def test_a_steady_publisher_is_measured_between_its_own_publish_times() -> None:
    # 20 calls/s, published every 1.1 s (the interval drifts): the rate is exact, whatever the
    # dashboard's own clock says, as long as the process still publishes
    series = deque(sample(100 + i * 1.1, round(i * 1.1 * 20)) for i in range(15))
    now = series[-1].at + 0.9
    assert rate(series, now) == 20.0
    start, end, seconds = _series_window(series, now)  # type: ignore[misc]
    assert end is series[-1] and seconds >= WINDOW and start.at <= end.at - WINDOW


def test_a_process_that_stopped_calling_falls_to_zero_over_the_window() -> None:
    series = deque(sample(100 + i, i * 10) for i in range(12))  # 10/s until t=111, then nothing
    last = series[-1].at
    assert rate(series, last + 0.5) == 10.0
    assert rate(series, last + ACTIVE + 1) < 10.0  # type: ignore[operator]
    assert rate(series, last + WINDOW + 1) is None  # the window holds no publish: nothing measured


def test_after_a_quiet_spell_the_rate_is_of_the_calls_since_it_ended() -> None:
    # 20/s, then nothing for 60 s (no publishes), then 20/s again: the window starts at the
    # publisher's tick before the first new publish (`since`), not 60 s back
    series = deque(sample(100 + i, i * 20) for i in range(10))
    series.append(sample(169, 200, since=168))  # it had counted 180 at its tick at 168
    assert rate(series, 169.2) == 20.0
    for i in range(1, 5):
        series.append(sample(169 + i, 200 + i * 20, since=168 + i))
    assert rate(series, 173.2) == 20.0
    # a publisher that does not say `since`: one tick before its first publish
    older = deque(sample(100 + i, i * 20) for i in range(10))
    older.extend(sample(169 + i, 200 + i * 20) for i in range(5))
    assert rate(older, 173.2) == 20.0


def test_late_publishes_and_bursts_are_measured_over_the_whole_window() -> None:
    # 20/s, but one publish 2.5 s late (etcd slow): no quiet spell, nothing dropped from the window
    ats = [100 + i for i in range(8)] + [110.5] + [111 + i for i in range(6)]
    late = deque(sample(at, round((at - 100) * 20)) for at in ats)
    assert rate(late, 116.2) == 20.0
    # bursts of 100 calls every 5 s, published at the tick after each burst: 20/s on average
    bursts = deque(sample(100 + 5 * i, 100 * i) for i in range(6))
    assert rate(bursts, 125.2) == 20.0


def test_a_publisher_whose_clock_is_off_is_measured_on_its_own_clock() -> None:
    for skew in (-30.0, 30.0):  # its clock half a minute behind or ahead of the dashboard's
        series = deque(sample(100 + i, i * 10, skew) for i in range(12))
        assert rate(series, series[-1].seen + 0.5) == 10.0, skew
        assert rate(series, series[-1].seen + WINDOW + 1) is None, skew  # quiet for a window: nothing


def test_one_sample_is_no_rate_and_a_restart_counts_from_zero() -> None:
    assert rate(deque([sample(100, 50)]), 100.5) is None
    series = deque([sample(100, 500), sample(101, 5), sample(102, 15)])
    start, end, _ = _series_window(series, 102.1)  # type: ignore[misc]
    assert start.rows[KEY].calls == 500 and end.rows[KEY].calls == 15  # the model takes `end` alone then


def test_layout_puts_callers_left_of_what_they_call_and_survives_cycles() -> None:
    place = layout(["web", "orders", "payments", "stock"], [("web", "orders"), ("orders", "payments"),
                   ("orders", "stock"), ("stock", "orders")])  # fmt: skip
    assert place["web"][0] == 0 and place["orders"][0] >= 1
    assert place["payments"][0] > place["orders"][0]
    assert len(set(place.values())) == 4  # no two nodes on one spot
    lonely = layout(["a", "b"], [])
    assert lonely == {"a": (0, 0), "b": (0, 1)}
