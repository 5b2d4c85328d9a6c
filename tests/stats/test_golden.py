"""Golden signals from published counters, without I/O: windows across processes, quantiles."""

from __future__ import annotations

import pytest

from gmesh.stats.golden import RowKey, Signals, group, summary, window
from gmesh.stats.metrics import BOUNDS

KEY: RowKey = ("orders", "proxy", "default", "orders/v1", "/pkg.Orders/Get", "")
OTHER: RowKey = ("orders", "channel", "default", "orders/v2", "/pkg.Orders/Get", "")


def signals(ok: int, failed: int = 0, bucket: int = 10) -> Signals:
    s = Signals({"OK": ok} | ({"UNAVAILABLE": failed} if failed else {}))
    s.buckets[bucket] = ok + failed
    return s


def test_a_window_is_the_difference_summed_over_processes() -> None:
    before = {"p1": {KEY: signals(10)}, "p2": {OTHER: signals(5, 1)}}
    after = {"p1": {KEY: signals(25)}, "p2": {OTHER: signals(9, 2)}, "p3": {KEY: signals(100)}}
    rows = window(before, after)
    assert rows[KEY].calls == 15  # p3 first published inside the window: left out
    assert rows[OTHER].codes == {"OK": 4, "UNAVAILABLE": 1}
    total = group(rows, lambda k: (k[0],))[("orders",)]
    assert (total.calls, total.failures) == (20, 1)


def test_a_restarted_process_counts_from_zero() -> None:
    before = {"p1": {KEY: signals(50)}}
    after = {"p1": {KEY: signals(7)}}
    assert window(before, after)[KEY].calls == 7


def test_counters_that_start_again_change_only_their_own_row() -> None:
    # one service forgotten and called again in a long-lived process: its row restarts, the
    # other rows of the process go on counting
    before = {"p1": {KEY: signals(1_000_000), OTHER: signals(50)}}
    after = {"p1": {KEY: signals(1_000_100), OTHER: signals(5)}}
    rows = window(before, after)
    assert rows[KEY].calls == 100 and rows[OTHER].calls == 5


def test_quantiles_interpolate_inside_their_bucket() -> None:
    s = Signals({"OK": 100})
    s.buckets[6] = 100  # (0.0008, 0.001]
    assert BOUNDS[5:7] == (0.0008, 0.001)
    assert s.quantile(0.5) == pytest.approx(0.0009)
    assert s.quantile(1.0) == pytest.approx(0.001)
    assert Signals().quantile(0.5) is None


def test_summary_numbers() -> None:
    s = signals(98, 2, bucket=13)  # (0.008, 0.01]
    doc = summary(s, 10.0)
    assert doc["calls"] == 100 and doc["failures"] == 2 and doc["successRate"] == 0.98
    assert doc["rps"] == 10.0 and 8.0 < doc["p50Ms"] <= doc["p99Ms"] <= 10.0
