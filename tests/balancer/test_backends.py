"""The live backend table of a mesh: built when a service is first needed, rebuilt per service on
endpoint, spec and health changes; panic mode, zones, subsets, consistent-hash tables."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from gmesh.balancer import HASHING, POLICIES, ConsistentHash, Picker, ZoneAware
from gmesh.balancer.backends import Backends, wait_ready
from gmesh.balancer.state import EndpointStates
from gmesh.chain.call import Call, Caller
from gmesh.config.kinds import Resource
from gmesh.config.service import ServiceSpec
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.discovery.endpoint import Endpoint


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    saved = random.getstate()
    random.seed(7)
    yield
    random.setstate(saved)


def backends(snap: MeshSnapshot, states: EndpointStates, activated: list[str] | None = None) -> Backends:
    """A backend table over one fixed snapshot (no event loop: hash tables are built at once)."""
    return Backends(states, lambda: snap, on_activate=None if activated is None else activated.append)


SERVICE = "orders"


async def _noop(call: Call[None]) -> None:
    return None


def call(
    zone: str = "", metadata: tuple[tuple[str, str], ...] = (), down: frozenset[str] = frozenset()
) -> Call[None]:
    return Call("/orders.v1.Orders/Get", metadata, None, SERVICE, _noop, caller=Caller(zone=zone), down=down)


def endpoint(i: int, zone: str = "", **labels: str) -> Endpoint:
    return Endpoint(SERVICE, f"10.0.0.{i}:8080", labels=labels, zone=zone)


def snapshot(endpoints: Sequence[Endpoint], spec: Mapping[str, Any] | None = None) -> MeshSnapshot:
    resources: dict[str, dict[str, Resource]] = {}
    if spec is not None:
        resources["Service"] = {SERVICE: Resource("Service", SERVICE, ServiceSpec.model_validate(spec))}
    return MeshSnapshot(revision=1, endpoints={SERVICE: tuple(endpoints)}, resources=resources)


def spread(picker: Picker, n: int, c: Call[None] | None = None) -> collections.Counter[str]:
    c = c if c is not None else call()
    out: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        ep = picker.pick(c)
        assert ep is not None
        out[ep.address] += 1
    return out


def eject(registry: EndpointStates, *endpoints: Endpoint, seconds: float = 60.0) -> None:
    for e in endpoints:
        registry.get(SERVICE, e.address).ejected_until = time.monotonic() + seconds


ROUND_ROBIN = {"balancer": {"policy": "round_robin"}}


def test_an_ejected_endpoint_is_not_picked() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = EndpointStates()
    eject(registry, eps[1])
    backend = backends(snapshot(eps, ROUND_ROBIN), registry).get((SERVICE, None))
    assert (backend.size, backend.total, backend.panic) == (3, 4, False)
    assert spread(backend.picker, 300) == {eps[i].address: 100 for i in (0, 2, 3)}
    # the backend hands out the registry's states (the ones the balance filter counts in)
    assert backend.states[eps[1].address] is registry.get(SERVICE, eps[1].address)


def test_an_unhealthy_endpoint_is_not_picked() -> None:
    eps = [endpoint(i) for i in range(1, 4)]
    registry = EndpointStates()
    registry.get(SERVICE, eps[0].address).healthy = False
    backend = backends(snapshot(eps), registry).get((SERVICE, None))  # no Service resource: defaults
    assert set(spread(backend.picker, 100)) == {eps[1].address, eps[2].address}


def test_an_expired_ejection_no_longer_counts() -> None:
    eps = [endpoint(i) for i in range(1, 4)]
    registry = EndpointStates()
    eject(registry, eps[0], seconds=-1.0)  # ended a second ago
    backend = backends(snapshot(eps, ROUND_ROBIN), registry).get((SERVICE, None))
    assert backend.size == 3
    assert set(spread(backend.picker, 30)) == {e.address for e in eps}


def test_panic_when_too_few_endpoints_are_usable() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = EndpointStates()
    eject(registry, *eps[:3])  # 1 of 4 usable: 25% < the default 50%
    backend = backends(snapshot(eps, ROUND_ROBIN), registry).get((SERVICE, None))
    assert backend.panic
    assert (backend.size, backend.total) == (4, 4)
    assert spread(backend.picker, 400) == {e.address: 100 for e in eps}


def test_no_panic_at_exactly_the_threshold() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = EndpointStates()
    eject(registry, *eps[:2])  # 2 of 4 usable: 50% is not below 50%
    backend = backends(snapshot(eps, ROUND_ROBIN), registry).get((SERVICE, None))
    assert not backend.panic
    assert spread(backend.picker, 100) == {eps[2].address: 50, eps[3].address: 50}


def test_panic_threshold_is_configurable() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = EndpointStates()
    eject(registry, *eps[:2])  # 50% usable: panic below 60%, not below 50% (test above)
    spec = {**ROUND_ROBIN, "panicThreshold": 60}
    backend = backends(snapshot(eps, spec), registry).get((SERVICE, None))
    assert backend.panic
    assert set(spread(backend.picker, 100)) == {e.address for e in eps}
    # 0 turns panic off: even with none usable, none is picked
    registry2 = EndpointStates()
    eject(registry2, *eps)
    off = backends(snapshot(eps, {**ROUND_ROBIN, "panicThreshold": 0}), registry2).get((SERVICE, None))
    assert not off.panic
    assert off.size == 0
    assert off.picker.pick(call()) is None


ZONES = {"balancer": {"policy": "round_robin", "zoneAware": {"minHealthyPercent": 70}}}


def zoned() -> tuple[list[Endpoint], list[Endpoint]]:
    return [endpoint(i, zone="a") for i in (1, 2, 3)], [endpoint(i, zone="b") for i in (4, 5, 6)]


def test_zone_aware_keeps_calls_in_the_callers_zone() -> None:
    a, b = zoned()
    backend = backends(snapshot(a + b, ZONES), EndpointStates()).get((SERVICE, None))
    assert isinstance(backend.picker, ZoneAware)
    assert spread(backend.picker, 300, call(zone="a")) == {e.address: 100 for e in a}
    assert spread(backend.picker, 300, call(zone="b")) == {e.address: 100 for e in b}
    # a caller from a zone without endpoints, or one that does not say: every endpoint
    assert spread(backend.picker, 600, call(zone="c")) == {e.address: 100 for e in a + b}
    assert spread(backend.picker, 600, call()) == {e.address: 100 for e in a + b}


def test_zone_aware_stays_in_zone_while_enough_are_usable() -> None:
    a = [endpoint(i, zone="a") for i in range(1, 11)]
    b = [endpoint(i, zone="b") for i in range(11, 21)]
    registry = EndpointStates()
    eject(registry, *a[:3])  # 7 of 10 usable in zone a: exactly the 70% asked for
    backend = backends(snapshot(a + b, ZONES), registry).get((SERVICE, None))
    assert spread(backend.picker, 700, call(zone="a")) == {e.address: 100 for e in a[3:]}


def test_zone_aware_spills_over_to_every_zone_when_too_few_are_usable() -> None:
    a, b = zoned()
    registry = EndpointStates()
    eject(registry, a[0])  # 2 of 3 usable in zone a: 67% < 70%
    backend = backends(snapshot(a + b, ZONES), registry).get((SERVICE, None))
    assert not backend.panic  # 5 of 6 usable overall
    from_a = spread(backend.picker, 500, call(zone="a"))
    assert from_a == {e.address: 100 for e in a[1:] + b}  # every usable endpoint, not the ejected one
    assert spread(backend.picker, 300, call(zone="b")) == {e.address: 100 for e in b}  # b is fine


def test_zone_aware_in_panic_keeps_healthy_zones_local_and_spreads_the_rest() -> None:
    a, b = zoned()
    c = [endpoint(i, zone="c") for i in (7, 8, 9)]
    registry = EndpointStates()
    eject(registry, *a, *c)  # 3 of 9 usable: panic
    backend = backends(snapshot(a + b + c, ZONES), registry).get((SERVICE, None))
    assert backend.panic
    assert spread(backend.picker, 300, call(zone="b")) == {e.address: 100 for e in b}
    # zone a has nothing usable: its callers go over every endpoint, as panic mode says
    assert spread(backend.picker, 900, call(zone="a")) == {e.address: 100 for e in a + b + c}


def test_without_zone_awareness_zones_are_ignored() -> None:
    a, b = zoned()
    backend = backends(snapshot(a + b, ROUND_ROBIN), EndpointStates()).get((SERVICE, None))
    assert not isinstance(backend.picker, ZoneAware)
    assert spread(backend.picker, 600, call(zone="a")) == {e.address: 100 for e in a + b}


def test_subsets_get_their_own_backend_and_policy() -> None:
    eps = [endpoint(1, version="v1"), endpoint(2, version="v1"), endpoint(3, version="v2")]
    spec = {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "balancer": {"policy": "round_robin", "subsets": {"v1": {"policy": "pick_first"}}},
    }
    table = backends(snapshot(eps, spec), EndpointStates())
    table.get((SERVICE, None))
    assert set(table.table) == {(SERVICE, None), (SERVICE, "v1"), (SERVICE, "v2")}
    assert spread(table.get((SERVICE, None)).picker, 300) == {e.address: 100 for e in eps}
    assert spread(table.get((SERVICE, "v1")).picker, 50) == {eps[0].address: 50}  # pick_first
    assert spread(table.get((SERVICE, "v2")).picker, 5) == {eps[2].address: 5}


def test_hashing_policy_reaches_the_picker() -> None:
    eps = [endpoint(i) for i in range(1, 11)]
    spec = {"balancer": {"policy": "maglev", "hashKey": "x-user-id"}}
    picker = backends(snapshot(eps, spec), EndpointStates()).get((SERVICE, None)).picker
    for user in ("alice", "bob", "carol"):
        c = call(metadata=(("x-user-id", user),))
        assert len(spread(picker, 20, c)) == 1  # sticky


@pytest.mark.parametrize("policy", POLICIES)
def test_weight_zero_drains_under_every_policy(policy: str) -> None:
    drained = Endpoint(SERVICE, "10.0.0.1:8080", weight=0)  # the lowest address: pick_first's choice
    eps = [drained, endpoint(2), endpoint(3)]
    balancer = {"policy": policy, **({"hashKey": "x-user-id"} if policy in HASHING else {})}
    backend = backends(snapshot(eps, {"balancer": balancer}), EndpointStates()).get((SERVICE, None))
    assert (backend.size, backend.total) == (2, 2)
    picked = set()
    for i in range(300):
        ep = backend.picker.pick(call(metadata=(("x-user-id", f"user-{i}"),)))
        assert ep is not None
        picked.add(ep.address)
    assert picked == ({eps[1].address} if policy == "pick_first" else {eps[1].address, eps[2].address})


# --------------------------------------------------------------------------- lifecycle


def test_nothing_is_built_until_a_backend_is_asked_for() -> None:
    orders = [endpoint(i) for i in range(1, 4)]
    users = [Endpoint("users", f"10.0.1.{i}:8080") for i in range(1, 4)]
    snap = MeshSnapshot(revision=1, endpoints={SERVICE: tuple(orders), "users": tuple(users)})
    activated: list[str] = []
    table = backends(snap, EndpointStates(), activated)
    assert table.table == {} and table.active == {} and activated == []
    assert table.get((SERVICE, None)).size == 3
    assert set(table.active) == {SERVICE} and activated == [SERVICE]  # users: untouched
    assert set(table.states.states) == {(SERVICE, e.address) for e in orders}
    # an unknown service or subset gets no endpoints, and nothing is kept for it
    assert table.get(("ghost", None)).size == 0 and table.get((SERVICE, "nope")).size == 0
    assert set(table.table) == {(SERVICE, None)} and activated == [SERVICE]


def test_backends_are_kept_until_something_of_their_service_changes() -> None:
    eps = [endpoint(i) for i in range(1, 5)]
    registry = EndpointStates()
    table = backends(snapshot(eps, ROUND_ROBIN), registry)
    first = table.get((SERVICE, None))
    assert table.get((SERVICE, None)) is first
    eject(registry, eps[0])
    assert table.get((SERVICE, None)) is first  # the ejection alone is not seen until changed()
    registry.changed(SERVICE)  # no event loop: rebuilt at once
    second = table.get((SERVICE, None))
    assert second is not first
    assert (first.size, second.size) == (4, 3)
    assert eps[0].address not in spread(second.picker, 300)
    assert eps[0].address in spread(first.picker, 300)  # pickers never change once built


def test_a_change_of_one_service_rebuilds_only_its_backends() -> None:
    orders = [endpoint(i) for i in range(1, 4)]
    users = [Endpoint("users", f"10.0.1.{i}:8080") for i in range(1, 4)]
    snap = MeshSnapshot(revision=1, endpoints={SERVICE: tuple(orders), "users": tuple(users)})
    registry = EndpointStates()
    table = backends(snap, registry)
    o, u = table.get((SERVICE, None)), table.get(("users", None))
    eject(registry, orders[0])
    registry.changed(SERVICE)
    assert table.get(("users", None)) is u  # untouched: the same picker
    assert table.get((SERVICE, None)) is not o
    assert table.get((SERVICE, None)).size == 2
    registry.changed("payments")  # not in use here: nothing to do
    assert table.get(("users", None)) is u


def test_refresh_rebuilds_services_in_use_and_drops_those_that_left() -> None:
    current = {"snap": snapshot([endpoint(1)])}
    table = Backends(EndpointStates(), lambda: current["snap"])
    assert table.get((SERVICE, None)).size == 1
    current["snap"] = snapshot([endpoint(1), endpoint(2)])
    table.refresh(["users"])  # another service: nothing happens
    assert table.get((SERVICE, None)).size == 1
    table.refresh([SERVICE])
    assert table.get((SERVICE, None)).size == 2
    current["snap"] = MeshSnapshot(revision=3)
    table.refresh([SERVICE])
    assert table.active == {} and table.table == {} and table.states.states == {}


def test_drop_forgets_a_service_until_it_is_needed_again() -> None:
    activated: list[str] = []
    spec = {"outlierDetection": {"consecutiveErrors": 3}}
    table = backends(snapshot([endpoint(1), endpoint(2)], spec), EndpointStates(), activated)
    table.get((SERVICE, None))
    assert SERVICE in table.detectors
    table.drop(SERVICE)
    assert table.active == {} and table.table == {} and table.detectors == {}
    assert table.get((SERVICE, None)).size == 2
    assert activated == [SERVICE, SERVICE]


@pytest.mark.parametrize("policy", sorted(HASHING))
def test_a_health_change_keeps_the_consistent_hash_table(policy: str) -> None:
    eps = [endpoint(i) for i in range(1, 11)]
    registry = EndpointStates()
    table = backends(snapshot(eps, {"balancer": {"policy": policy, "hashKey": "x-user-id"}}), registry)
    first = table.get((SERVICE, None)).picker
    assert isinstance(first, ConsistentHash)
    keyed = [call(metadata=(("x-user-id", f"u{i}"),)) for i in range(300)]
    before = [first.pick(c) for c in keyed]
    owner = before[0]
    assert owner is not None
    eject(registry, owner)
    registry.changed(SERVICE)
    second = table.get((SERVICE, None)).picker
    assert isinstance(second, ConsistentHash)
    assert second is not first and second.table is first.table  # a new picker, the same table
    after = [second.pick(c) for c in keyed]
    # only the ejected endpoint's keys moved, each to the next endpoint of the table
    assert all(b == a for a, b in zip(before, after, strict=True) if a != owner)
    assert all(b is not None and b != owner for a, b in zip(before, after, strict=True) if a == owner)
    # a new endpoint set: a new table
    table.refresh([SERVICE])  # same snapshot: same endpoint set, same table
    assert table.get((SERVICE, None)).picker.table is first.table  # type: ignore[attr-defined]


async def test_a_big_table_is_built_off_the_loop_and_calls_wait_for_the_first() -> None:
    eps = [Endpoint(SERVICE, f"10.{i // 250}.{i % 250}.1:8080") for i in range(2000)]
    current = {"snap": snapshot(eps, {"balancer": {"policy": "maglev", "hashKey": "x-user-id"}})}
    table = Backends(EndpointStates(), lambda: current["snap"])
    first = table.get((SERVICE, None))
    assert first.ready is not None and first.picker.pick(call()) is None  # not built yet
    # the loop keeps turning while the table is built: no stall beyond a few ms
    lags: list[float] = []

    async def probe() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    prober = asyncio.ensure_future(probe())
    assert await wait_ready(first, 10.0)
    prober.cancel()
    built = table.get((SERVICE, None))
    assert built.ready is None and isinstance(built.picker, ConsistentHash)
    assert built.picker.pick(call(metadata=(("x-user-id", "alice"),))) is not None
    assert len(lags) > 10 and max(lags) < 0.05, max(lags)  # 2-core CI box: generous, not 100+ ms
    # an endpoint leaves: the old table serves (the gone one is out) while the new one builds
    current["snap"] = snapshot(eps[1:], {"balancer": {"policy": "maglev", "hashKey": "x-user-id"}})
    table.refresh([SERVICE])
    interim = table.get((SERVICE, None))
    assert interim.ready is None and isinstance(interim.picker, ConsistentHash)
    assert interim.picker.table is built.picker.table
    keyed = [call(metadata=(("x-user-id", f"u{i}"),)) for i in range(2000)]
    assert all(interim.picker.pick(c) != eps[0] for c in keyed)
    for _ in range(1000):
        if table.get((SERVICE, None)).picker.table is not built.picker.table:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    final = table.get((SERVICE, None)).picker
    assert isinstance(final, ConsistentHash) and final.table is not built.picker.table
    assert len(final.endpoints) == 1999
    table.close()
