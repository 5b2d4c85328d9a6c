"""GCRA buckets and the bounded key table (pure logic: simulated clocks, exact counts)."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import pytest

from gmesh.ratelimit.bucket import SWEEP_INTERVAL, Bucket, Buckets


def offered(buckets: Buckets, key: object, rate: float, seconds: float, start: float = 0.0) -> int:
    """Calls admitted when `rate` calls/s of `key` arrive evenly for `seconds`."""
    n = round(rate * seconds)
    return sum(buckets.take(key, start + i / rate) for i in range(n))


def test_a_quiet_bucket_admits_its_burst_then_the_rate() -> None:
    buckets = Buckets(Bucket(100, 20))
    # 300/s for 10 s: the burst of 20, then 100 per second
    admitted = offered(buckets, None, 300, 10)
    assert admitted in (1019, 1020)  # 20 + 100 x (10 s - one arrival interval)
    # all at once: exactly the burst
    fresh = Buckets(Bucket(100, 20))
    assert sum(fresh.take("k", 5.0) for _ in range(50)) == 20


def test_offered_below_the_rate_everything_passes() -> None:
    buckets = Buckets(Bucket(100, 1))
    assert offered(buckets, None, 99, 10) == 990


def test_verdict_numbers_for_callers() -> None:
    bucket = Bucket(10, 5)  # a token every 100 ms, 5 at most
    buckets = Buckets(bucket)
    for i in range(5):
        assert buckets.take("k", 0.0)
        verdict = buckets.verdict("k", 0.0, True)
        assert verdict.remaining == 4 - i
    assert not buckets.take("k", 0.0)
    refused = buckets.verdict("k", 0.0, False)
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(0.1)  # the next token
    assert refused.reset == pytest.approx(0.5)  # full again
    # honouring retry_after gets the next call in, and no earlier
    assert not buckets.take("k", 0.099)
    assert buckets.take("k", 0.1)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="rate must be greater than 0"):
        Bucket(0, 1)
    with pytest.raises(ValueError, match="burst must be at least 1"):
        Bucket(1, 0)


def test_only_full_buckets_are_evicted_so_an_active_key_never_gains_a_refill() -> None:
    buckets = Buckets(Bucket(1, 2), max_keys=3)
    # key a spends its whole burst at t=0
    assert buckets.take("a", 0.0) and buckets.take("a", 0.0) and not buckets.take("a", 0.0)
    buckets.take("b", 0.0)
    buckets.take("c", 0.0)
    # table full of active keys: a newcomer shares the overflow bucket; a keeps its state
    assert buckets.take("d", 0.5)
    assert len(buckets) == 3 and buckets.overflowed == 1
    assert not buckets.take("a", 0.5)  # still empty: no refill by eviction
    # later, b and c are full again (1 token/s, burst 2: full 2 s after their one call), a is not
    # (it spent two tokens at 0 and one more would be due at 2.0 -> full at 2.0 as well); at 1.6
    # only b and c (TAT 1.0) are full
    assert buckets.take("e", 0.5 + SWEEP_INTERVAL + 0.1)
    assert buckets.evicted == 2 and len(buckets) == 2  # a and e
    assert buckets.tat("a") == pytest.approx(2.0)


def test_the_overflow_bucket_limits_a_flood_of_new_keys() -> None:
    buckets = Buckets(Bucket(10, 10), max_keys=100)
    # 100 legitimate keys, each with one call in the last instant: their buckets are not full
    for i in range(100):
        assert buckets.take(f"user-{i}", 0.0)
    # 10,000 made-up keys in the next second: one shared bucket (10/s, burst 10) admits 20
    flood = sum(buckets.take(f"made-up-{i}", i / 10_000) for i in range(10_000))
    assert flood == 10 + 10 - 1 or flood in (19, 20)
    assert len(buckets) == 100 and buckets.overflowed == 10_000
    # the legitimate keys still have their own buckets: 9 more tokens each right now
    assert sum(buckets.take("user-7", 0.0) for _ in range(20)) == 9


def test_a_million_distinct_keys_stay_within_the_bound() -> None:
    buckets = Buckets(Bucket(1, 1), max_keys=100_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    now = 0.0
    for i in range(1_000_000):
        now = i / 100_000  # 100,000 new keys per second
        buckets.take(f"key-{i}", now)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(buckets) <= 100_000
    # a key string (~60 B) + a float (24 B) + a dict slot (~100 B): well under 25 MiB for 100k
    assert grown < 25 * 1024 * 1024, grown
    # a legitimate key is limited exactly as before the flood
    legit = Buckets(Bucket(1, 1), max_keys=100_000)
    assert [legit.take("me", now + d) for d in (0.0, 0.5, 1.0)] == [True, False, True]
    assert math.isinf(Buckets(Bucket(1, 1)).tat("never"))


def test_workers_sharing_buckets_admit_together_what_one_process_would(tmp_path: Any) -> None:
    from gmesh.ratelimit.bucket import SharedBuckets

    path = str(tmp_path / "limit")
    one, two = SharedBuckets(Bucket(100, 20), path), SharedBuckets(Bucket(100, 20), path)
    n = 3000  # 300/s for 10 s, every other call on each "worker"
    admitted = sum((one if i % 2 else two).take("k", i / 300) for i in range(n))
    assert admitted in (1019, 1020)
    # keys hash to slots; a refused key's verdict is read from the shared slot
    assert not one.take("k", (n - 1) / 300) and one.verdict("k", (n - 1) / 300, False).retry_after > 0
    assert one.slots == 131072 and len(one) + len(two) == 1  # one slot used, counted where first taken


def _hammer(path: str, seconds: float, out: Any) -> None:
    import time as clock

    from gmesh.ratelimit.bucket import Bucket as B
    from gmesh.ratelimit.bucket import SharedBuckets as S

    buckets = S(B(1000, 50), path)
    first = clock.monotonic()
    stop = first + seconds
    admitted = 0
    while (now := clock.monotonic()) < stop:
        admitted += buckets.take(None, now)
    out.put((admitted, first, now))


def test_two_processes_at_full_speed_never_admit_more_than_the_limit(tmp_path: Any) -> None:
    """Two real processes race on one shared bucket (1000/s, burst 50) for 2 s: together they
    admit at most 50 + 1000 x 2 s (+ the few ms their start is apart), not twice that."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    path = str(tmp_path / "shared")
    procs = [context.Process(target=_hammer, args=(path, 2.0, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    totals = [admitted for admitted, _, _ in results]
    # from the first take of either to the last take of either (monotonic is system-wide)
    window = max(last for _, _, last in results) - min(first for _, first, _ in results)
    assert all(t > 0 for t in totals)
    assert sum(totals) <= 50 + 1000 * window + 1, (totals, window)
    assert sum(totals) >= 50 + 1000 * 2.0 * 0.9, totals  # and the limit is reached, not starved
