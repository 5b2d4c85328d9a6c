"""Outlier detection decisions (plain states, a real event loop for its timers, no sockets)."""

from __future__ import annotations

import time
from typing import Any

from gmesh.balancer.outlier import OutlierDetector
from gmesh.balancer.state import EndpointStates
from gmesh.config.service import OutlierDetectionSpec

ADDRESSES = tuple(f"10.0.0.{i}:80" for i in range(1, 11))


def detector(**spec: Any) -> tuple[OutlierDetector, EndpointStates]:
    registry = EndpointStates()
    found = OutlierDetector("svc", registry)
    found.configure(OutlierDetectionSpec.model_validate(spec), ADDRESSES)
    return found, registry


def ejected(registry: EndpointStates) -> list[str]:
    now = time.monotonic()
    return [a for a in ADDRESSES if registry.get("svc", a).ejected_until > now]


def fail(registry: EndpointStates, address: str, calls: int, errors: int) -> None:
    state = registry.get("svc", address)
    for i in range(calls):
        state.observe(0.001, i < errors, time.monotonic())


async def test_consecutive_errors_eject_at_the_threshold_and_growing_times() -> None:
    found, registry = detector(consecutiveErrors=3, baseEjectionTime="10s", maxEjectionTime="25s")
    state = registry.get("svc", ADDRESSES[0])
    generation = registry.generation("svc")
    for _ in range(2):
        state.observe(0.001, True, time.monotonic())
        found.on_failure(state)
    assert ejected(registry) == []
    state.observe(0.001, True, time.monotonic())
    found.on_failure(state)
    assert ejected(registry) == [ADDRESSES[0]]
    assert registry.generation("svc") > generation  # pickers get rebuilt
    assert 9.5 < state.ejected_until - time.monotonic() <= 10
    # the next ejections last 2x, then capped at maxEjectionTime
    for expected in (20, 25):
        state.ejected_until = time.monotonic() - 1  # its time is up
        for _ in range(3):
            state.observe(0.001, True, time.monotonic())
        found.on_failure(state)
        assert expected - 0.5 < state.ejected_until - time.monotonic() <= expected
    found.stop()


async def test_max_ejection_percent_caps_but_one_is_always_allowed() -> None:
    found, registry = detector(consecutiveErrors=1, maxEjectionPercent=20)
    for address in ADDRESSES[:5]:
        state = registry.get("svc", address)
        state.observe(0.001, True, time.monotonic())
        found.on_failure(state)
    assert ejected(registry) == list(ADDRESSES[:2])  # 20% of 10
    found.stop()
    found, registry = detector(consecutiveErrors=1, maxEjectionPercent=0)
    for address in ADDRESSES[:3]:
        state = registry.get("svc", address)
        state.observe(0.001, True, time.monotonic())
        found.on_failure(state)
    assert ejected(registry) == [ADDRESSES[0]]  # Envoy's rule: one ejection always allowed
    found.stop()


async def test_failure_percentage_mode_ejects_at_its_sweep_and_resets_counts() -> None:
    found, registry = detector(
        consecutiveErrors=None, maxEjectionPercent=50, failurePercentage={"threshold": 50, "minRequests": 20}
    )
    fail(registry, ADDRESSES[0], 40, 30)  # 75% failing
    fail(registry, ADDRESSES[1], 40, 10)  # 25%
    fail(registry, ADDRESSES[2], 10, 10)  # 100%, but too few calls to judge
    found.sweep()
    assert ejected(registry) == [ADDRESSES[0]]
    assert registry.get("svc", ADDRESSES[1]).interval_calls == 0
    found.stop()


async def test_success_rate_mode_ejects_outliers_below_mean_minus_stdevs() -> None:
    found, registry = detector(
        consecutiveErrors=None,
        maxEjectionPercent=50,
        successRate={"stdevFactor": 1.5, "minRequests": 50, "minHosts": 5},
    )
    for address in ADDRESSES[:9]:
        fail(registry, address, 100, 1)  # 99% success
    fail(registry, ADDRESSES[9], 100, 40)  # 60%
    found.sweep()
    assert ejected(registry) == [ADDRESSES[9]]
    found.stop()
    found, registry = detector(consecutiveErrors=None, successRate={"minRequests": 50, "minHosts": 6})
    for address in ADDRESSES[:4]:  # five qualify, below minHosts 6: no judgement
        fail(registry, address, 100, 1)
    fail(registry, ADDRESSES[4], 100, 90)
    fail(registry, ADDRESSES[5], 20, 20)  # too few calls to qualify
    found.sweep()
    assert ejected(registry) == []
    found.stop()
