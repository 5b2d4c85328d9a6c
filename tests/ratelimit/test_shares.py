"""Max-min fair shares and how a process follows them (pure logic; etcd is exercised in
tests/integration/test_rate_limits.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gmesh.discovery.keys import MeshKeys
from gmesh.ratelimit.limits import LimitState
from gmesh.ratelimit.shares import HEADROOM, MIN_SHARE, GlobalLimits, max_min_shares
from gmesh.ratelimit.spec import RateLimitSpec


def test_small_demands_are_met_and_the_rest_split() -> None:
    shares = max_min_shares(200, {"a": 400, "b": 25, "c": 25, "d": 25, "e": 25})
    assert shares == {"a": 100, "b": 25, "c": 25, "d": 25, "e": 25}
    assert math.isclose(sum(shares.values()), 200)


def test_capacity_nobody_wants_is_split_evenly() -> None:
    shares = max_min_shares(100, {"a": 10, "b": 30})
    assert shares == {"a": 40, "b": 60}  # 10 + 30, 30 + 30


def test_equal_demands_over_capacity_split_equally_and_the_answer_is_deterministic() -> None:
    demands = {f"p{i}": 80.0 for i in range(5)}
    shares = max_min_shares(200, demands)
    assert all(math.isclose(s, 40) for s in shares.values())
    assert max_min_shares(200, dict(reversed(list(demands.items())))) == shares
    assert max_min_shares(200, {}) == {}


def spec(**extra: Any) -> RateLimitSpec:
    return RateLimitSpec.model_validate(
        {"service": "orders", "rate": "200/s", "burst": 20, "scope": "global", **extra}
    )


def test_a_process_follows_its_share_and_etcd_trouble_by_policy() -> None:
    limits = GlobalLimits(store=None, keys=MeshKeys(), process="me")  # type: ignore[arg-type]
    state = LimitState("l", spec(), shares=None)  # registered by hand below (no loop, no store)
    state.shares = limits
    limits.states["l"] = state
    limits._published["l"] = 50.0
    limits.view = {"l": {"me": 50.0, "other": 400.0}}
    limits._apply("l")
    # before the demands were read (start-up): the full rate, a burst of one
    assert state.share == 200.0 and state.buckets.bucket.burst == 1
    limits.loaded = True
    limits._apply("l")
    # demands with headroom: me 55, other 440; me (the smaller) gets 55, other the other 145
    assert state.share == pytest.approx(50 * HEADROOM) and state.buckets.bucket.rate == pytest.approx(55.0)
    assert limits.shares("l") == pytest.approx({"me": 55.0, "other": 145.0})
    for policy, expected in (("share", 55.0), ("allow", 1e12), ("deny", 0.0)):
        state.spec = spec(onStoreUnavailable=policy)
        limits._watch_ok = True
        limits._refresh()
        limits._watch_ok = False
        limits._refresh("etcd down")
        assert state.share == pytest.approx(expected), policy
        assert state.blocked == (policy == "deny")
    # a publish round that did not need etcd must not count as etcd answering again
    limits._publish_ok = True
    assert not limits._refresh() and not limits.store_ok
    limits._watch_ok = True
    assert limits._refresh()
    assert state.share == pytest.approx(55.0) and not state.blocked


def test_a_rate_change_keeps_tokens_owed_at_the_new_rate() -> None:
    state = LimitState("l", spec(), shares=None)
    buckets = state.buckets
    now = 100.0
    assert all(buckets.take(None, now) for _ in range(20))  # the whole burst: owes 20 x 5 ms
    assert not buckets.take(None, now)
    # the share drops to ~0 and back: an admitted call must not block the bucket for days
    state.set_share(MIN_SHARE)
    state.set_share(200.0)
    assert buckets.tat(None) < now + 1.0
