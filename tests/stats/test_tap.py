"""Tap bounds without I/O: method filters, the token bucket, the bounded queue, the tap limit."""

from __future__ import annotations

import time

import pytest

from gmesh.stats.tap import MAX_BODY, MAX_RATE, MAX_TAPS, QUEUE, Tap, TapHub, TooManyTaps, cut


async def test_method_filters() -> None:
    exact = Tap("orders", "/pkg.Orders/Get")
    prefix = Tap("orders", "/pkg.Orders/")
    assert exact.wants("/pkg.Orders/Get") and not exact.wants("/pkg.Orders/GetAll")
    assert prefix.wants("/pkg.Orders/List") and not prefix.wants("/pkg.Other/List")


async def test_the_bucket_starts_full_and_counts_what_it_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    tap = Tap("orders", rate=10)
    assert [tap.wants("/m") for _ in range(12)] == [True] * 10 + [False] * 2
    assert tap.dropped == 2
    now[0] += 0.25  # 2.5 tokens back
    assert [tap.wants("/m") for _ in range(3)] == [True, True, False]
    tap.offer({"n": 1})
    assert tap.queue.get_nowait() == {"n": 1, "dropped": 3} and tap.dropped == 0


async def test_a_slow_reader_loses_events_counted_and_bounds_are_capped() -> None:
    tap = Tap("orders", rate=10**9, max_body=10**9)
    assert tap.rate == MAX_RATE and tap.max_body == MAX_BODY
    for i in range(QUEUE + 5):
        tap.offer({"n": i})
    assert tap.queue.qsize() == QUEUE and tap.dropped == 5
    assert cut(b"abcdef", 4) == (b"abcd", True) and cut(b"ab", 4) == (b"ab", False)


async def test_at_most_max_taps_and_closing_frees_a_place() -> None:
    hub = TapHub()
    taps = [hub.open(Tap("orders")) for _ in range(MAX_TAPS)]
    with pytest.raises(TooManyTaps):
        hub.open(Tap("payments"))
    hub.close(taps[0])
    hub.open(Tap("payments"))
    assert sorted(hub.by_service) == ["orders", "payments"]
    for tap in taps[1:]:
        hub.close(tap)
    assert list(hub.by_service) == ["payments"]
