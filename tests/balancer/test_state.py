"""Endpoint state (peak EWMA, errors, usability), the registry, and backends built from a snapshot."""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from gmesh.balancer import HASHING, POLICIES, Picker, ZoneAware
from gmesh.balancer.state import DEFAULT_RTT, EWMA_DECAY, EndpointState, Registry
from gmesh.chain.call import Call, Caller
from gmesh.config.kinds import Resource
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.discovery.endpoint import Endpoint
from gmesh.plugins.balancer import Backend, backends
from gmesh.plugins.service import ServiceSpec


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    saved = random.getstate()
    random.seed(7)
    yield
    random.setstate(saved)


# --------------------------------------------------------------------------- EndpointState


def test_a_new_endpoint_assumes_the_default_rtt() -> None:
    s = EndpointState("orders", "10.0.0.1:8080")
    assert s.ewma == DEFAULT_RTT
    assert s.cost() == DEFAULT_RTT
    s.inflight = 3
    assert math.isclose(s.cost(), DEFAULT_RTT * 4)


def test_the_first_answer_replaces_the_default_rtt() -> None:
    s = EndpointState("orders", "a:1")
    s.observe(0.002, False, now=100.0)
    assert s.ewma == 0.002
    assert s.ewma_at == 100.0


def test_peak_ewma_rises_at_once_on_a_slow_answer() -> None:
    s = EndpointState("orders", "a:1")
    s.observe(0.010, False, now=100.0)
    s.observe(0.500, False, now=100.001)  # a millisecond later: no time to average anything
    assert s.ewma == 0.500


def test_peak_ewma_decays_toward_faster_answers_with_time() -> None:
    s = EndpointState("orders", "a:1")
    s.observe(0.100, False, now=100.0)
    # one fast answer one decay time later: e^-1 of the old value is left
    s.observe(0.010, False, now=100.0 + EWMA_DECAY)
    expected = 0.100 * math.exp(-1) + 0.010 * (1 - math.exp(-1))
    assert math.isclose(s.ewma, expected)
    assert 0.040 < s.ewma < 0.046
    # more fast answers: it keeps falling, never below them, and ends close to them
    previous = s.ewma
    for k in range(2, 12):
        s.observe(0.010, False, now=100.0 + k * EWMA_DECAY)
        assert 0.010 < s.ewma < previous
        previous = s.ewma
    assert s.ewma < 0.0101


def test_peak_ewma_decay_depends_on_time_not_on_the_number_of_answers() -> None:
    # ten fast answers within a millisecond barely move a slow estimate
    quick = EndpointState("orders", "a:1")
    quick.observe(0.100, False, now=50.0)
    for i in range(1, 11):
        quick.observe(0.010, False, now=50.0 + i * 0.0001)
    assert quick.ewma > 0.099
    # one fast answer after a long quiet spell almost replaces it
    later = EndpointState("orders", "a:1")
    later.observe(0.100, False, now=50.0)
    later.observe(0.010, False, now=50.0 + 10 * EWMA_DECAY)
    assert later.ewma < 0.0101


def test_errors_are_counted_and_a_success_resets_the_streak() -> None:
    s = EndpointState("orders", "a:1")
    for i in range(3):
        s.observe(0.001, True, now=1.0 + i)
    assert (s.calls, s.errors, s.consecutive_errors) == (3, 3, 3)
    assert (s.interval_calls, s.interval_errors) == (3, 3)
    s.observe(0.001, False, now=10.0)
    assert (s.calls, s.errors, s.consecutive_errors) == (4, 3, 0)
    s.observe(0.001, True, now=11.0)
    assert s.consecutive_errors == 1
    assert (s.interval_calls, s.interval_errors) == (5, 4)


def test_an_answer_without_a_latency_counts_but_leaves_the_ewma() -> None:
    # e.g. a stream: how long it lasted says nothing about the endpoint's speed
    s = EndpointState("orders", "a:1")
    s.observe(0.020, False, now=10.0)
    s.observe(None, True, now=20.0)
    s.observe(None, False, now=30.0)
    assert (s.calls, s.errors, s.consecutive_errors) == (3, 1, 0)
    assert (s.ewma, s.ewma_at) == (0.020, 10.0)


def test_usable_unless_ejected_or_unhealthy() -> None:
    s = EndpointState("orders", "a:1")
    assert s.usable(now=1000.0)
    s.ejected_until = 1030.0
    assert not s.usable(now=1000.0)
    assert not s.usable(now=1029.999)
    assert s.usable(now=1030.0)  # the ejection is over at its end
    assert s.usable(now=1031.0)
    s.healthy = False
    assert not s.usable(now=2000.0)
    s.healthy = True
    assert s.usable(now=2000.0)


def test_describe_reports_what_an_operator_needs() -> None:
    s = EndpointState("orders", "a:1")
    s.observe(0.0125, True, now=5.0)
    s.inflight = 2
    s.ejected_until = 15.0
    d = s.describe(now=10.0)
    assert d["address"] == "a:1"
    assert d["ewma_ms"] == 12.5
    assert (d["inflight"], d["calls"], d["errors"], d["healthy"]) == (2, 1, 1, True)
    assert d["ejected_for_s"] == 5.0
    assert s.describe(now=20.0)["ejected_for_s"] == 0.0


# --------------------------------------------------------------------------- Registry


def test_registry_keeps_one_state_per_service_and_address() -> None:
    r = Registry()
    a = r.get("orders", "10.0.0.1:8080")
    assert r.get("orders", "10.0.0.1:8080") is a
    b = r.get("users", "10.0.0.1:8080")  # same address, another service: its own state
    assert b is not a
    assert (b.service, b.address) == ("users", "10.0.0.1:8080")
    assert r.of_service("orders") == [a]
    r.forget({("users", "10.0.0.1:8080")})
    assert r.of_service("orders") == []
    assert r.get("users", "10.0.0.1:8080") is b


def test_changed_bumps_the_generation_and_tells_listeners() -> None:
    r = Registry()
    seen: list[int] = []
    other: list[int] = []
    r.listen(lambda: seen.append(r.generation))
    unlisten = r.listen(lambda: other.append(r.generation))
    assert r.generation == 0
    r.changed()
    r.changed()
    assert r.generation == 2
    assert seen == [1, 2]  # called after the bump: a listener sees the new generation
    assert other == [1, 2]
    unlisten()
    r.changed()
    assert r.generation == 3
    assert seen == [1, 2, 3]
    assert other == [1, 2]  # no longer told
    unlisten()  # twice is harmless
    r.changed()
    assert other == [1, 2]


def test_generations_per_service() -> None:
    r = Registry()
    assert r.service_generation("orders") == r.service_generation("users") == 0
    r.changed("orders")
    assert r.generation == 1
    assert (r.service_generation("orders"), r.service_generation("users")) == (1, 0)
    r.changed("users")
    r.changed("users")
    assert (r.service_generation("orders"), r.service_generation("users")) == (1, 3)
    r.changed()  # no service named: every service's pickers are stale
    assert (r.service_generation("orders"), r.service_generation("users")) == (4, 4)
    assert r.service_generation("never-seen") == 4
    seen: list[int] = []
    r.listen(lambda: seen.append(r.generation))
    r.changed("orders")  # listeners are told of per-service changes too
    assert seen == [5]
    assert (r.service_generation("orders"), r.service_generation("users")) == (5, 4)


def test_a_listener_may_unlisten_while_being_told() -> None:
    r = Registry()
    calls: list[str] = []

    def once() -> None:
        calls.append("once")
        stop()

    stop = r.listen(once)
    r.listen(lambda: calls.append("always"))
    r.changed()
    r.changed()
    assert calls == ["once", "always", "always"]


# --------------------------------------------------------------------------- backends()


SERVICE = "orders"


async def _noop(call: Call) -> None:
    return None


def call(zone: str = "", metadata: tuple[tuple[str, str], ...] = ()) -> Call:
    return Call("/orders.v1.Orders/Get", metadata, None, SERVICE, _noop, caller=Caller(zone=zone))


def endpoint(i: int, zone: str = "", **labels: str) -> Endpoint:
    return Endpoint(SERVICE, f"10.0.0.{i}:8080", labels=labels, zone=zone)


def snapshot(endpoints: Sequence[Endpoint], spec: Mapping[str, Any] | None = None) -> MeshSnapshot:
    resources: dict[str, dict[str, Resource]] = {}
    if spec is not None:
        resources["Service"] = {SERVICE: Resource("Service", SERVICE, ServiceSpec.model_validate(spec))}
    return MeshSnapshot(revision=1, endpoints={SERVICE: tuple(endpoints)}, resources=resources)


def spread(picker: Picker, n: int, c: Call | None = None) -> collections.Counter[str]:
    c = c if c is not None else call()
    out: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        ep = picker.pick(c)
        assert ep is not None
        out[ep.address] += 1
    return out


def eject(registry: Registry, *endpoints: Endpoint, seconds: float = 60.0) -> None:
    for e in endpoints:
        registry.get(SERVICE, e.address).ejected_until = time.monotonic() + seconds


ROUND_ROBIN = {"balancer": {"policy": "round_robin"}}


def test_an_ejected_endpoint_is_not_picked() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = Registry()
    eject(registry, eps[1])
    backend = backends(snapshot(eps, ROUND_ROBIN), registry)[(SERVICE, None)]
    assert (backend.size, backend.total, backend.panic) == (3, 4, False)
    assert spread(backend.picker, 300) == {eps[i].address: 100 for i in (0, 2, 3)}
    # the backend hands out the registry's states (the ones the balance filter counts in)
    assert backend.states[eps[1].address] is registry.get(SERVICE, eps[1].address)


def test_an_unhealthy_endpoint_is_not_picked() -> None:
    eps = [endpoint(i) for i in range(1, 4)]
    registry = Registry()
    registry.get(SERVICE, eps[0].address).healthy = False
    backend = backends(snapshot(eps), registry)[(SERVICE, None)]  # no Service resource: defaults
    assert set(spread(backend.picker, 100)) == {eps[1].address, eps[2].address}


def test_an_expired_ejection_no_longer_counts() -> None:
    eps = [endpoint(i) for i in range(1, 4)]
    registry = Registry()
    eject(registry, eps[0], seconds=-1.0)  # ended a second ago
    backend = backends(snapshot(eps, ROUND_ROBIN), registry)[(SERVICE, None)]
    assert backend.size == 3
    assert set(spread(backend.picker, 30)) == {e.address for e in eps}


def test_panic_when_too_few_endpoints_are_usable() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = Registry()
    eject(registry, *eps[:3])  # 1 of 4 usable: 25% < the default 50%
    backend = backends(snapshot(eps, ROUND_ROBIN), registry)[(SERVICE, None)]
    assert backend.panic
    assert (backend.size, backend.total) == (4, 4)
    assert spread(backend.picker, 400) == {e.address: 100 for e in eps}


def test_no_panic_at_exactly_the_threshold() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = Registry()
    eject(registry, *eps[:2])  # 2 of 4 usable: 50% is not below 50%
    backend = backends(snapshot(eps, ROUND_ROBIN), registry)[(SERVICE, None)]
    assert not backend.panic
    assert spread(backend.picker, 100) == {eps[2].address: 50, eps[3].address: 50}


def test_panic_threshold_is_configurable() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = Registry()
    eject(registry, *eps[:2])  # 50% usable: panic below 60%, not below 50% (test above)
    spec = {**ROUND_ROBIN, "panicThreshold": 60}
    backend = backends(snapshot(eps, spec), registry)[(SERVICE, None)]
    assert backend.panic
    assert set(spread(backend.picker, 100)) == {e.address for e in eps}
    # 0 turns panic off: even with none usable, none is picked
    registry2 = Registry()
    eject(registry2, *eps)
    off = backends(snapshot(eps, {**ROUND_ROBIN, "panicThreshold": 0}), registry2)[(SERVICE, None)]
    assert not off.panic
    assert off.size == 0
    assert off.picker.pick(call()) is None


ZONES = {"balancer": {"policy": "round_robin", "zoneAware": {"minHealthyPercent": 70}}}


def zoned() -> tuple[list[Endpoint], list[Endpoint]]:
    return [endpoint(i, zone="a") for i in (1, 2, 3)], [endpoint(i, zone="b") for i in (4, 5, 6)]


def test_zone_aware_keeps_calls_in_the_callers_zone() -> None:
    a, b = zoned()
    backend = backends(snapshot(a + b, ZONES), Registry())[(SERVICE, None)]
    assert isinstance(backend.picker, ZoneAware)
    assert spread(backend.picker, 300, call(zone="a")) == {e.address: 100 for e in a}
    assert spread(backend.picker, 300, call(zone="b")) == {e.address: 100 for e in b}
    # a caller from a zone without endpoints, or one that does not say: every endpoint
    assert spread(backend.picker, 600, call(zone="c")) == {e.address: 100 for e in a + b}
    assert spread(backend.picker, 600, call()) == {e.address: 100 for e in a + b}


def test_zone_aware_stays_in_zone_while_enough_are_usable() -> None:
    a = [endpoint(i, zone="a") for i in range(1, 11)]
    b = [endpoint(i, zone="b") for i in range(11, 21)]
    registry = Registry()
    eject(registry, *a[:3])  # 7 of 10 usable in zone a: exactly the 70% asked for
    backend = backends(snapshot(a + b, ZONES), registry)[(SERVICE, None)]
    assert spread(backend.picker, 700, call(zone="a")) == {e.address: 100 for e in a[3:]}


def test_zone_aware_spills_over_to_every_zone_when_too_few_are_usable() -> None:
    a, b = zoned()
    registry = Registry()
    eject(registry, a[0])  # 2 of 3 usable in zone a: 67% < 70%
    backend = backends(snapshot(a + b, ZONES), registry)[(SERVICE, None)]
    assert not backend.panic  # 5 of 6 usable overall
    from_a = spread(backend.picker, 500, call(zone="a"))
    assert from_a == {e.address: 100 for e in a[1:] + b}  # every usable endpoint, not the ejected one
    assert spread(backend.picker, 300, call(zone="b")) == {e.address: 100 for e in b}  # b is fine


def test_zone_aware_in_panic_keeps_healthy_zones_local_and_spreads_the_rest() -> None:
    a, b = zoned()
    c = [endpoint(i, zone="c") for i in (7, 8, 9)]
    registry = Registry()
    eject(registry, *a, *c)  # 3 of 9 usable: panic
    backend = backends(snapshot(a + b + c, ZONES), registry)[(SERVICE, None)]
    assert backend.panic
    assert spread(backend.picker, 300, call(zone="b")) == {e.address: 100 for e in b}
    # zone a has nothing usable: its callers go over every endpoint, as panic mode says
    assert spread(backend.picker, 900, call(zone="a")) == {e.address: 100 for e in a + b + c}


def test_without_zone_awareness_zones_are_ignored() -> None:
    a, b = zoned()
    backend = backends(snapshot(a + b, ROUND_ROBIN), Registry())[(SERVICE, None)]
    assert not isinstance(backend.picker, ZoneAware)
    assert spread(backend.picker, 600, call(zone="a")) == {e.address: 100 for e in a + b}


def test_subsets_get_their_own_backend_and_policy() -> None:
    eps = [endpoint(1, version="v1"), endpoint(2, version="v1"), endpoint(3, version="v2")]
    spec = {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "balancer": {"policy": "round_robin", "subsets": {"v1": {"policy": "pick_first"}}},
    }
    table = backends(snapshot(eps, spec), Registry())
    assert set(table) == {(SERVICE, None), (SERVICE, "v1"), (SERVICE, "v2")}
    assert spread(table[(SERVICE, None)].picker, 300) == {e.address: 100 for e in eps}
    assert spread(table[(SERVICE, "v1")].picker, 50) == {eps[0].address: 50}  # pick_first
    assert spread(table[(SERVICE, "v2")].picker, 5) == {eps[2].address: 5}


def test_hashing_policy_reaches_the_picker() -> None:
    eps = [endpoint(i) for i in range(1, 11)]
    spec = {"balancer": {"policy": "maglev", "hashKey": "x-user-id"}}
    picker = backends(snapshot(eps, spec), Registry())[(SERVICE, None)].picker
    for user in ("alice", "bob", "carol"):
        c = call(metadata=(("x-user-id", user),))
        assert len(spread(picker, 20, c)) == 1  # sticky


@pytest.mark.parametrize("policy", POLICIES)
def test_weight_zero_drains_under_every_policy(policy: str) -> None:
    drained = Endpoint(SERVICE, "10.0.0.1:8080", weight=0)  # the lowest address: pick_first's choice
    eps = [drained, endpoint(2), endpoint(3)]
    balancer = {"policy": policy, **({"hashKey": "x-user-id"} if policy in HASHING else {})}
    backend = backends(snapshot(eps, {"balancer": balancer}), Registry())[(SERVICE, None)]
    assert (backend.size, backend.total) == (2, 2)
    picked = set()
    for i in range(300):
        ep = backend.picker.pick(call(metadata=(("x-user-id", f"user-{i}"),)))
        assert ep is not None
        picked.add(ep.address)
    assert picked == ({eps[1].address} if policy == "pick_first" else {eps[1].address, eps[2].address})


def test_backends_are_cached_until_the_registry_changes() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    snap = snapshot(eps, ROUND_ROBIN)
    registry = Registry()
    first = backends(snap, registry)
    assert backends(snap, registry) is first  # same snapshot, same generation: no rebuild
    eject(registry, eps[0])
    assert backends(snap, registry) is first  # the ejection alone is not seen until changed()
    registry.changed()
    second = backends(snap, registry)
    assert second is not first
    old: Backend = first[(SERVICE, None)]
    new: Backend = second[(SERVICE, None)]
    assert new.picker is not old.picker
    assert (old.size, new.size) == (4, 3)
    assert eps[0].address not in spread(new.picker, 300)
    assert eps[0].address in spread(old.picker, 300)  # pickers never change once built
    assert backends(snap, registry) is second


def test_a_change_of_one_service_rebuilds_only_its_backends() -> None:
    orders = [endpoint(i) for i in range(1, 4)]
    users = [Endpoint("users", f"10.0.1.{i}:8080") for i in range(1, 4)]
    snap = MeshSnapshot(revision=1, endpoints={SERVICE: tuple(orders), "users": tuple(users)})
    registry = Registry()
    first = backends(snap, registry)
    eject(registry, orders[0])
    registry.changed(SERVICE)
    second = backends(snap, registry)
    assert second is not first
    assert second[("users", None)] is first[("users", None)]  # untouched: the same picker
    assert second[(SERVICE, None)] is not first[(SERVICE, None)]
    assert second[(SERVICE, None)].size == 2
    registry.changed()  # every service
    third = backends(snap, registry)
    assert third[("users", None)] is not second[("users", None)]
    assert third[(SERVICE, None)] is not second[(SERVICE, None)]


def test_a_new_snapshot_rebuilds_backends() -> None:
    registry = Registry()
    one = backends(snapshot([endpoint(1)]), registry)
    two = backends(snapshot([endpoint(1), endpoint(2)]), registry)
    assert two is not one
    assert two[(SERVICE, None)].size == 2


def test_backends_of_another_registry_are_not_mixed_up() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    snap = snapshot(eps, ROUND_ROBIN)
    assert backends(snap, Registry())[(SERVICE, None)].size == 4
    other = Registry()
    eject(other, eps[0])
    backend = backends(snap, other)[(SERVICE, None)]
    assert backend.states[eps[0].address] is other.get(SERVICE, eps[0].address)
    assert backend.size == 3


def test_retain_drops_states_no_owner_needs() -> None:
    registry = Registry()
    first, second = object(), object()
    registry.retain(first, {("svc", "a:1"), ("svc", "b:1")})
    registry.retain(second, {("svc", "b:1"), ("svc", "c:1")})
    for address in ("a:1", "b:1", "c:1", "gone:1"):
        registry.get("svc", address).inflight = 1
    registry.retain(second, {("svc", "b:1"), ("svc", "c:1")})
    assert set(registry.states) == {("svc", "a:1"), ("svc", "b:1"), ("svc", "c:1")}
    registry.retain(first, {("svc", "b:1")})  # a:1 left the mesh
    assert set(registry.states) == {("svc", "b:1"), ("svc", "c:1")}
    assert registry.get("svc", "b:1").inflight == 1  # kept states keep what they knew
    registry.retain(second, None)  # an owner closed
    assert set(registry.states) == {("svc", "b:1")}
