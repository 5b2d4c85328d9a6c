"""Every picker policy: shares, load and latency awareness, consistent hashing, zones."""

from __future__ import annotations

import collections
import heapq
import math
import random
from collections.abc import Iterator, Sequence

import pytest

from gmesh.balancer import (
    HASHING,
    POLICIES,
    ConsistentHash,
    LeastRequest,
    MaglevTable,
    NoEndpoints,
    PeakEwma,
    Picker,
    PickFirst,
    Random,
    RingTable,
    RoundRobin,
    ZoneAware,
    hash64,
    make_picker,
)
from gmesh.balancer.state import EndpointState
from gmesh.chain.call import Call, Caller
from gmesh.discovery.endpoint import Endpoint

KEY = "x-user-id"


async def _noop(call: Call[None]) -> None:
    return None


def call(
    metadata: tuple[tuple[str, str | bytes], ...] = (), *, zone: str = "", down: Sequence[str] = ()
) -> Call[None]:
    return Call("/a.B/C", metadata, None, "s", _noop, caller=Caller(zone=zone), down=frozenset(down))


CALL = call()
#: 10,000 calls, each carrying its own hash key (built once: the hashing tests share them)
KEYED = [call(((KEY, f"user-{i}"),)) for i in range(10_000)]


def eps(n: int, *, weights: Sequence[int] | None = None, zone: str = "", first: int = 1) -> list[Endpoint]:
    weights = weights or [1] * n
    return [Endpoint("s", f"10.0.0.{first + i}:8080", zone=zone, weight=w) for i, w in enumerate(weights)]


def states_of(endpoints: Sequence[Endpoint]) -> list[EndpointState]:
    return [EndpointState("s", e.address) for e in endpoints]


def count(picker: Picker, n: int, c: Call[None] = CALL) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        ep = picker.pick(c)
        assert ep is not None
        out[ep.address] += 1
    return out


def owners(picker: Picker, calls: Sequence[Call[None]] = KEYED) -> list[str]:
    out = []
    for c in calls:
        ep = picker.pick(c)
        assert ep is not None
        out.append(ep.address)
    return out


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    """Pickers draw from the `random` module: seed it so shares are reproducible, then restore it."""
    saved = random.getstate()
    random.seed(20240601)
    yield
    random.setstate(saved)


# --------------------------------------------------------------------------- round robin, random, pick first


def test_round_robin_is_exact_and_ignores_weights() -> None:
    endpoints = eps(3, weights=[1, 2, 7])
    picker = make_picker("round_robin", endpoints, states_of(endpoints))
    n = 1000
    counts = count(picker, 3 * n)
    assert counts == {e.address: n for e in endpoints}
    # every window of three consecutive picks visits each endpoint once
    window = [picker.pick(CALL) for _ in range(3)]
    assert {e.address for e in window if e is not None} == {e.address for e in endpoints}


def test_weighted_round_robin_follows_weights() -> None:
    weights = [1, 2, 7]
    endpoints = eps(3, weights=weights)
    picker = make_picker("weighted_round_robin", endpoints, states_of(endpoints))
    n = 10_000
    counts = count(picker, n)
    for e, w in zip(endpoints, weights, strict=True):
        assert abs(counts[e.address] / n - w / sum(weights)) <= 0.02, counts


def test_random_is_roughly_uniform() -> None:
    endpoints = eps(3)
    picker = make_picker("random", endpoints, states_of(endpoints))
    assert isinstance(picker, Random)
    n = 3000
    counts = count(picker, n)
    assert set(counts) == {e.address for e in endpoints}
    for share in (v / n for v in counts.values()):
        assert 0.25 <= share <= 0.42, counts


def test_pick_first_takes_the_lowest_address_and_skips_down_ones() -> None:
    a, b, c = eps(3)
    picker = make_picker("pick_first", [c, a, b], states_of([c, a, b]))
    assert isinstance(picker, PickFirst)
    assert count(picker, 50) == {a.address: 50}
    assert picker.pick(call(down=[a.address])) == b
    assert picker.pick(call(down=[a.address, b.address])) == c
    # every one down: still the first rather than nothing (the balance filter decides what to do)
    assert picker.pick(call(down=[a.address, b.address, c.address])) == a
    assert PickFirst([]).pick(CALL) is None


def test_no_endpoints_pick_none_under_every_policy() -> None:
    for policy in POLICIES:
        picker = make_picker(policy, [], [], KEY)
        assert isinstance(picker, NoEndpoints)
        assert picker.pick(CALL) is None


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown balancer policy 'fastest'"):
        make_picker("fastest", eps(1), states_of(eps(1)))


# --------------------------------------------------------------------------- least request, peak EWMA


def simulate(
    picker: Picker,
    endpoints: Sequence[Endpoint],
    states: Sequence[EndpointState],
    ticks: Sequence[int],
    *,
    rounds: int = 1000,
    per_round: int = 3,
) -> collections.Counter[str]:
    """Send `per_round` calls per round; a call to endpoint i finishes `ticks[i]` rounds later
    (in flight until then), and its latency (1 ms per round) goes into the endpoint's EWMA."""
    index = {e.address: i for i, e in enumerate(endpoints)}
    running: list[tuple[int, int, int]] = []  # (finishes at, endpoint, started at)
    counts: collections.Counter[str] = collections.Counter()
    for now in range(rounds):
        while running and running[0][0] <= now:
            _, i, started = heapq.heappop(running)
            states[i].inflight -= 1
            states[i].observe((now - started) / 1000, False, 1.0 + now / 1000)
        for _ in range(per_round):
            ep = picker.pick(CALL)
            assert ep is not None
            i = index[ep.address]
            states[i].inflight += 1
            heapq.heappush(running, (now + ticks[i], i, now))
            counts[ep.address] += 1
    return counts


@pytest.mark.parametrize("policy", ["least_request", "peak_ewma"])
def test_load_aware_pickers_are_uniform_over_equal_endpoints(policy: str) -> None:
    endpoints = eps(3)
    picker = make_picker(policy, endpoints, states_of(endpoints))
    n = 3000
    counts = count(picker, n)
    for e in endpoints:
        assert 0.28 <= counts[e.address] / n <= 0.39, counts


def test_least_request_never_picks_the_busiest_of_three() -> None:
    # of any two different endpoints, one is always idle: the busy one always loses
    endpoints = eps(3)
    states = states_of(endpoints)
    states[0].inflight = 10
    counts = count(LeastRequest(endpoints, states), 3000)
    assert counts[endpoints[0].address] == 0
    assert counts[endpoints[1].address] + counts[endpoints[2].address] == 3000


def test_least_request_sends_less_to_an_endpoint_that_holds_calls_longer() -> None:
    endpoints = eps(3)
    states = states_of(endpoints)
    counts = simulate(LeastRequest(endpoints, states), endpoints, states, ticks=[10, 1, 1])
    total = sum(counts.values())
    assert counts[endpoints[0].address] < total / 3 / 2, counts  # well under its fair third
    assert all(s.inflight >= 0 for s in states)


def test_least_request_with_one_endpoint_always_picks_it() -> None:
    endpoints = eps(1)
    states = states_of(endpoints)
    states[0].inflight = 99
    assert LeastRequest(endpoints, states).pick(CALL) == endpoints[0]
    assert PeakEwma(endpoints, states).pick(CALL) == endpoints[0]


def test_peak_ewma_avoids_a_ten_times_slower_endpoint() -> None:
    endpoints = eps(3)
    states = states_of(endpoints)
    for s in states:
        s.ewma = 0.010
    states[0].ewma = 0.100
    counts = count(PeakEwma(endpoints, states), 3000)
    assert counts[endpoints[0].address] < 1000
    assert counts[endpoints[0].address] == 0  # 0.100 x 1 > 0.010 x 1 against either other


def test_peak_ewma_learns_slowness_from_observed_latency() -> None:
    endpoints = eps(3)
    states = states_of(endpoints)
    counts = simulate(PeakEwma(endpoints, states), endpoints, states, ticks=[10, 1, 1])
    total = sum(counts.values())
    assert counts[endpoints[0].address] < total / 3 / 2, counts
    assert states[0].ewma > 5 * states[1].ewma  # it did learn: ~10 ms against ~1 ms


def test_peak_ewma_weighs_calls_in_flight_against_latency() -> None:
    # fast but crowded: 10 ms x (20 + 1) = 210 ms of expected wait; slow but idle: 100 ms
    endpoints = eps(2)
    fast, slow = states_of(endpoints)
    fast.ewma, fast.inflight = 0.010, 20
    slow.ewma, slow.inflight = 0.100, 0
    assert math.isclose(fast.cost(), 0.210)
    assert count(PeakEwma(endpoints, [fast, slow]), 100) == {endpoints[1].address: 100}
    assert count(LeastRequest(endpoints, [fast, slow]), 100) == {endpoints[1].address: 100}
    fast.inflight = 5  # 60 ms < 100 ms: now the fast one wins under peak EWMA
    assert count(PeakEwma(endpoints, [fast, slow]), 100) == {endpoints[0].address: 100}


# --------------------------------------------------------------------------- ring hash, maglev


def hashing(
    policy: str, endpoints: Sequence[Endpoint], usable: Sequence[bool] | None = None
) -> ConsistentHash:
    picker = make_picker(policy, endpoints, states_of(endpoints), KEY, usable=usable)
    assert isinstance(picker, ConsistentHash)
    assert isinstance(picker.table, RingTable if policy == "ring_hash" else MaglevTable)
    return picker


def test_hashing_policies_are_the_ones_named() -> None:
    assert frozenset({"ring_hash", "maglev"}) == HASHING


def test_hash64_is_stable_and_64_bit() -> None:
    # blake2b with an 8-byte digest, big-endian: the same in every process
    assert hash64("user-1") == hash64("user-1")
    assert hash64("user-1") != hash64("user-2")
    assert all(0 <= hash64(f"k{i}") < 2**64 for i in range(100))
    assert max(hash64(f"k{i}") for i in range(1000)) > 2**63  # the whole range is used


@pytest.mark.parametrize("policy", sorted(HASHING))
def test_same_key_same_endpoint(policy: str) -> None:
    endpoints = eps(10)
    picker = hashing(policy, endpoints)
    sample = KEYED[:500]
    first = owners(picker, sample)
    for _ in range(3):
        assert owners(picker, sample) == first
    # another picker over the same endpoints, listed in another order (another process): same owners
    shuffled = list(endpoints)
    random.shuffle(shuffled)
    assert owners(hashing(policy, shuffled), sample) == first
    # the key may arrive as bytes
    assert hashing(policy, endpoints).pick(call(((KEY, b"user-7"),))) == picker.pick(KEYED[7])
    assert len(set(first)) == 10


@pytest.mark.parametrize("policy", sorted(HASHING))
def test_keys_spread_over_every_endpoint(policy: str) -> None:
    endpoints = eps(10)
    counts = collections.Counter(owners(hashing(policy, endpoints)))
    assert set(counts) == {e.address for e in endpoints}
    for address, n in counts.items():
        assert 0.05 <= n / len(KEYED) <= 0.15, (address, counts)


def moved_fraction(before: Sequence[str], after: Sequence[str]) -> float:
    return sum(1 for a, b in zip(before, after, strict=True) if a != b) / len(before)


@pytest.mark.parametrize("policy", sorted(HASHING))
def test_adding_one_endpoint_to_ten_moves_about_one_key_in_eleven(policy: str) -> None:
    before = owners(hashing(policy, eps(10)))
    after = owners(hashing(policy, eps(11)))
    moved = moved_fraction(before, after)
    assert 0.03 < moved <= 0.15, moved


@pytest.mark.parametrize("policy", sorted(HASHING))
@pytest.mark.parametrize("n", [3, 20, 100])
def test_adding_one_endpoint_to_n_moves_about_one_key_in_n_plus_one(policy: str, n: int) -> None:
    before = owners(hashing(policy, eps(n)))
    after = owners(hashing(policy, eps(n + 1)))
    moved = moved_fraction(before, after)
    # Maglev moves a few keys between the old endpoints too (its table is refilled): up to ~2x
    most = 1.5 if policy == "ring_hash" else 2.0
    assert 0.5 / (n + 1) < moved <= most / (n + 1), moved


def test_ring_hash_wraps_around_past_the_last_point() -> None:
    endpoints = eps(10)
    picker = hashing("ring_hash", endpoints)
    ring = picker.table
    assert isinstance(ring, RingTable)
    assert len(ring.points) == 100 * len(endpoints)
    assert list(ring.points) == sorted(ring.points)
    last = max(ring.points)
    first_owner = picker.endpoints[ring.owners[list(ring.points).index(min(ring.points))]]
    past = [c for c in KEYED if hash64(c.metadata[0][1]) > last]  # type: ignore[arg-type]
    assert past  # ~1 key in 1000 lands there
    assert set(owners(picker, past)) == {first_owner.address}


def test_ring_hash_adding_an_endpoint_moves_keys_only_to_it() -> None:
    before = owners(hashing("ring_hash", eps(10)))
    new = eps(11)[-1].address
    after = owners(hashing("ring_hash", eps(11)))
    assert {b for a, b in zip(before, after, strict=True) if a != b} == {new}


@pytest.mark.parametrize(
    ("policy", "others_may_move"),
    # Maglev trades a little disruption for its even spread: when an endpoint leaves, a few
    # other slots of the table change hands too (the Maglev paper's "minimal disruption").
    [("ring_hash", 0.0), ("maglev", 0.03)],
)
def test_removing_an_endpoint_moves_its_keys(policy: str, others_may_move: float) -> None:
    ten = eps(10)
    gone = ten[3].address
    before = owners(hashing(policy, ten))
    after = owners(hashing(policy, ten[:3] + ten[4:]))
    on_gone = [i for i, a in enumerate(before) if a == gone]
    assert on_gone  # it owned some keys
    assert all(after[i] != gone for i in on_gone)  # and they all found another endpoint
    others = sum(1 for a, b in zip(before, after, strict=True) if a != gone and a != b)
    assert others <= others_may_move * len(before), others
    # the keys that left the gone endpoint spread over the rest rather than piling on one
    assert len({after[i] for i in on_gone}) >= 5


@pytest.mark.parametrize("policy", sorted(HASHING))
def test_a_call_without_the_key_still_gets_an_endpoint(policy: str) -> None:
    endpoints = eps(10)
    picker = hashing(policy, endpoints)
    without = [CALL, call((("x-other", "user-1"),))]
    picked = set(owners(picker, without * 200))  # owners() asserts each pick is not None
    assert len(picked) > 5  # at random, not all on one endpoint
    assert picked <= {e.address for e in endpoints}


def test_a_big_ring_keeps_at_most_its_point_budget() -> None:
    ring = RingTable([f"10.{i // 250}.{i % 250}.1:80" for i in range(5000)], [1] * 5000)
    assert ring.size == 100_000  # 20 points each instead of 100: ~1 MB, not 5
    assert list(ring.points) == sorted(ring.points)


@pytest.mark.parametrize("policy", sorted(HASHING))
def test_a_key_whose_endpoint_is_out_walks_to_the_same_next_one(policy: str) -> None:
    endpoints = eps(10)
    picker = hashing(policy, endpoints)
    sample = KEYED[:2000]
    before = owners(picker, sample)
    gone = before[0]
    flags = [e.address != gone for e in endpoints]
    out = hashing(policy, endpoints, flags)
    after = owners(out, sample)
    assert all(b == a for a, b in zip(before, after, strict=True) if a != gone)  # nobody else moved
    moved = [b for a, b in zip(before, after, strict=True) if a == gone]
    assert moved and gone not in moved
    assert owners(out, sample) == after  # deterministic: the same next endpoint every time
    assert len(set(moved)) >= 3  # its keys spread over several others, not all onto one


@pytest.mark.parametrize("policy", sorted(HASHING))
def test_pick_other_walks_past_what_the_balancer_cannot_use(policy: str) -> None:
    endpoints = eps(10)
    picker = hashing(policy, endpoints)
    c = KEYED[42]
    first = picker.pick(c)
    assert first is not None
    second = picker.pick_other(c, lambda e: e != first)
    assert second is not None and second != first
    assert picker.pick_other(c, lambda e: e != first) == second  # the same next one each time
    third = picker.pick_other(c, lambda e: e not in (first, second))
    assert third not in (None, first, second)
    assert picker.pick_other(c, lambda e: False) is None  # nothing acceptable: say so
    # without the key: any acceptable endpoint
    assert picker.pick_other(CALL, lambda e: e == endpoints[3]) == endpoints[3]


def test_pick_first_falls_over_in_address_order() -> None:
    a, b, c = eps(3)
    picker = PickFirst([c, b, a])
    assert picker.pick_other(CALL, lambda e: e != a) == b
    assert picker.pick_other(CALL, lambda e: e not in (a, b)) == c
    assert picker.pick_other(CALL, lambda e: False) is None


def test_repicking_pickers_find_the_one_acceptable_endpoint() -> None:
    endpoints = eps(5)
    for policy in ("round_robin", "weighted_round_robin", "least_request", "peak_ewma", "random"):
        picker = make_picker(policy, endpoints, states_of(endpoints))
        assert picker.pick_other(CALL, lambda e: e == endpoints[4]) == endpoints[4], policy
        assert picker.pick_other(CALL, lambda e: False) is None, policy


def test_ring_hash_gives_heavier_endpoints_more_keys() -> None:
    endpoints = eps(3, weights=[1, 1, 2])
    counts = collections.Counter(owners(hashing("ring_hash", endpoints)))
    assert 0.40 <= counts[endpoints[2].address] / len(KEYED) <= 0.60, counts


# --------------------------------------------------------------------------- zones


class Fixed:
    """A picker that always answers the same endpoint (to tell which picker ZoneAware used)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def pick(self, call: Call[None]) -> Endpoint | None:
        return self.endpoint

    def pick_other(self, call: Call[None], ok: object) -> Endpoint | None:
        return None


def test_zone_aware_keeps_calls_in_the_callers_zone() -> None:
    zone_a = eps(2, zone="a", first=1)
    zone_b = eps(2, zone="b", first=3)
    everywhere = eps(1, first=9)[0]
    picker = ZoneAware(
        {"a": RoundRobin(zone_a), "b": RoundRobin(zone_b)},
        Fixed(everywhere),
    )
    assert count(picker, 100, call(zone="a")) == {e.address: 50 for e in zone_a}
    assert count(picker, 100, call(zone="b")) == {e.address: 50 for e in zone_b}
    # a zone without a picker of its own, and a caller that does not say its zone
    assert picker.pick(call(zone="c")) == everywhere
    assert picker.pick(call(zone="")) == everywhere
    assert picker.pick(CALL) == everywhere
