"""Endpoint state (peak EWMA, errors, usability) and the per-mesh `EndpointStates`."""

from __future__ import annotations

import math

from gmesh.balancer.state import DEFAULT_RTT, EWMA_DECAY, EndpointState, EndpointStates

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


# --------------------------------------------------------------------------- EndpointStates


def test_one_state_per_service_and_address() -> None:
    r = EndpointStates()
    a = r.get("orders", "10.0.0.1:8080")
    assert r.get("orders", "10.0.0.1:8080") is a
    b = r.get("users", "10.0.0.1:8080")  # same address, another service: its own state
    assert b is not a
    assert (b.service, b.address) == ("users", "10.0.0.1:8080")
    assert r.of_service("orders", ["10.0.0.1:8080", "10.0.0.9:8080"]) == [a]  # none made for .9
    assert ("orders", "10.0.0.9:8080") not in r.states


def test_keep_only_drops_endpoints_that_left() -> None:
    r = EndpointStates()
    for address in ("a:1", "b:1", "c:1"):
        r.get("svc", address).inflight = 1
    kept = r.get("other", "a:1")
    r.keep_only("svc", ["b:1", "c:1"])  # a:1 left the service
    assert set(r.states) == {("svc", "b:1"), ("svc", "c:1"), ("other", "a:1")}
    assert r.get("svc", "b:1").inflight == 1  # kept states keep what they knew
    r.keep_only("svc", [])  # the service is no longer used here
    assert set(r.states) == {("other", "a:1")}
    assert r.get("other", "a:1") is kept


def test_changed_counts_per_service_and_tells_listeners_which() -> None:
    r = EndpointStates()
    seen: list[tuple[str, int]] = []
    other: list[str] = []
    r.listen(lambda service: seen.append((service, r.generation(service))))
    unlisten = r.listen(other.append)
    assert r.generation("orders") == r.generation("users") == 0
    r.changed("orders")
    r.changed("orders")
    r.changed("users")
    assert (r.generation("orders"), r.generation("users")) == (2, 1)
    assert seen == [("orders", 1), ("orders", 2), ("users", 1)]  # told after the count moved
    assert other == ["orders", "orders", "users"]
    unlisten()
    r.changed("orders")
    assert other == ["orders", "orders", "users"]  # no longer told
    unlisten()  # twice is harmless


def test_a_listener_may_unlisten_while_being_told() -> None:
    r = EndpointStates()
    calls: list[str] = []

    def once(service: str) -> None:
        calls.append("once")
        stop()

    stop = r.listen(once)
    r.listen(lambda service: calls.append("always"))
    r.changed("svc")
    r.changed("svc")
    assert calls == ["once", "always", "always"]
