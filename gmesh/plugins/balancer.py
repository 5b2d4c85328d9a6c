"""Built-in plugin: the BALANCE phase — pick one endpoint of the call's backend per attempt.

A backend is `(service, subset)`: the ROUTE phase sets `call.backend`; without a route it
is every endpoint of the destination service. Each backend has one immutable picker per
snapshot and health generation, shared by every chain that reaches it, built from the
Service kind's `balancer` over the endpoints that are usable now (healthy, not ejected —
or all of them in panic mode, when too few are usable). The filter counts each attempt
in the endpoint's state (in flight, latency EWMA, errors), which least_request and
peak_ewma pickers read and outlier detection judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.balancer import NoEndpoints, Picker, ZoneAware, make_picker
from gmesh.balancer.state import REGISTRY, EndpointState, Registry
from gmesh.chain.call import Call
from gmesh.chain.filter import Filter, FilterFactory, Handler, Phase
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import CallError
from gmesh.hookspecs import hookimpl
from gmesh.plugins.retry import endpoint_failed
from gmesh.plugins.stats import SERVER_ERRORS

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.discovery.endpoint import Endpoint

log = logging.getLogger(__name__)

BackendKey = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class Backend:
    """The usable endpoints of one backend, the picker over them, and their states."""

    key: BackendKey
    picker: Picker
    size: int
    states: Mapping[str, EndpointState] = field(default_factory=lambda: MappingProxyType({}))
    total: int = 0
    panic: bool = False
    #: the backend's own service's limits and passive health (a route may lead to another service)
    per_endpoint: int | None = None
    detector: OutlierDetector | None = None

    def describe(self) -> str:
        service, subset = self.key
        return f"service {service!r}" if subset is None else f"subset {subset!r} of service {service!r}"


def subset_endpoints(snapshot: MeshSnapshot, service: str, subset: str | None) -> tuple[Endpoint, ...]:
    """The endpoints of `service` whose labels carry every label of `subset` (all without one)."""
    endpoints = snapshot.endpoints_of(service)
    if subset is None:
        return endpoints
    resource = snapshot.resource("Service", service)
    subsets: Mapping[str, Mapping[str, str]] = getattr(resource.spec, "subsets", {}) if resource else {}
    selector = subsets.get(subset)
    if selector is None:
        return ()
    return tuple(e for e in endpoints if all(e.labels.get(k) == v for k, v in selector.items()))


def _build_backend(
    snapshot: MeshSnapshot, service: str, subset: str | None, spec: Any, registry: Registry, now: float
) -> Backend:
    # weight 0 drains an endpoint under every policy
    endpoints = tuple(e for e in subset_endpoints(snapshot, service, subset) if e.weight > 0)
    states = {e.address: registry.get(service, e.address) for e in endpoints}
    usable = [e for e in endpoints if states[e.address].usable(now)]
    panic_threshold = spec.panic_threshold if spec is not None else 50.0
    panic = bool(endpoints) and len(usable) * 100 < panic_threshold * len(endpoints)
    if panic:
        log.warning(
            "panic mode for %s: %d of %d endpoints usable (< %g%%); balancing over all of them",
            service if subset is None else f"{service}/{subset}",
            len(usable), len(endpoints), panic_threshold,
        )  # fmt: skip
    picked = list(endpoints) if panic else usable  # too few left: spread over all rather than crush them
    balancer = spec.balancer if spec is not None else None
    policy = balancer.subsets.get(subset, balancer) if balancer is not None and subset else balancer
    name = policy.policy if policy is not None else "weighted_round_robin"
    key = policy.hash_key if policy is not None else None
    picker = make_picker(name, picked, [states[e.address] for e in picked], key)
    zone = balancer.zone_aware if balancer is not None else None
    if zone is not None and usable:
        # Judged on the endpoints really usable (panic or not): a zone whose endpoints are
        # out sends its callers elsewhere.
        by_zone: dict[str, Picker] = {}
        for z in {e.zone for e in endpoints if e.zone}:
            local = [e for e in usable if e.zone == z]
            in_zone = sum(1 for e in endpoints if e.zone == z)
            if local and len(local) * 100 >= zone.min_healthy_percent * in_zone:
                by_zone[z] = make_picker(name, local, [states[e.address] for e in local], key)
        everywhere = picker  # over `usable` (or, in panic, over all)
        picker = ZoneAware(by_zone, everywhere)
    breaker = getattr(spec, "circuit_breaker", None)
    return Backend(
        (service, subset), picker, len(picked), MappingProxyType(states), len(endpoints), panic,
        breaker.max_requests_per_endpoint if breaker is not None else None, DETECTORS.get(service),
    )  # fmt: skip


_cache: tuple[
    MeshSnapshot | None, Registry | None, dict[str, tuple[int, list[Backend]]], Mapping[BackendKey, Backend]
] = (None, None, {}, MappingProxyType({}))


def backends(snapshot: MeshSnapshot, registry: Registry = REGISTRY) -> Mapping[BackendKey, Backend]:
    """Every backend of `snapshot`: each service whole, and each of its subsets.

    Computed once per snapshot, and again only for the services whose endpoints changed
    health or ejection since (the balance and route filters of every service share it).
    """
    global _cache
    cached_snapshot, cached_registry, per_service, cached = _cache
    if cached_snapshot is not snapshot or cached_registry is not registry:
        per_service = {}
    now = time.monotonic()
    fresh: dict[str, tuple[int, list[Backend]]] = {}
    rebuilt = False
    for service in snapshot.services():
        generation = registry.service_generation(service)
        known = per_service.get(service)
        if known is not None and known[0] == generation:
            fresh[service] = known
            continue
        rebuilt = True
        _configure_detector(snapshot, service, registry)
        resource = snapshot.resource("Service", service)
        spec = resource.spec if resource is not None else None
        subsets: list[str | None] = [None, *(getattr(spec, "subsets", {}) if spec is not None else ())]
        fresh[service] = (
            generation,
            [_build_backend(snapshot, service, subset, spec, registry, now) for subset in subsets],
        )
    if not rebuilt and cached_snapshot is snapshot and cached_registry is registry:
        return cached
    table = {b.key: b for _, built in fresh.values() for b in built}
    result = MappingProxyType(table)
    _cache = (snapshot, registry, fresh, result)
    return result


#: service -> its outlier detector (one per process, kept across config changes)
DETECTORS: dict[str, OutlierDetector] = {}


def _configure_detector(snapshot: MeshSnapshot, service: str, registry: Registry) -> None:
    resource = snapshot.resource("Service", service)
    outlier = getattr(resource.spec, "outlier_detection", None) if resource is not None else None
    if outlier is None:
        if service in DETECTORS:
            DETECTORS.pop(service).stop()
        return
    detector = DETECTORS.get(service)
    if detector is None or detector.registry is not registry:
        detector = DETECTORS[service] = OutlierDetector(service, registry)
    detector.configure(outlier, tuple(e.address for e in snapshot.endpoints_of(service)))


_NONE = Backend(("", None), NoEndpoints(), 0)


class OutlierDetector:
    """Passive health of one service's endpoints: ejects on consecutive errors at once, and on
    failure percentage or success rate every `interval`; lets them back after the ejection
    time (longer with each ejection), never ejecting more than `maxEjectionPercent`."""

    def __init__(self, service: str, registry: Registry) -> None:
        self.service = service
        self.registry = registry
        self.spec: Any = None
        self.endpoints: tuple[str, ...] = ()
        self._sweep: asyncio.TimerHandle | None = None

    def configure(self, spec: Any, endpoints: tuple[str, ...]) -> None:
        self.spec = spec
        self.endpoints = endpoints
        if self._sweep is None and (spec.failure_percentage is not None or spec.success_rate is not None):
            # outside a loop (gmesh explain) there is nothing to sweep
            with contextlib.suppress(RuntimeError):
                self._sweep = asyncio.get_running_loop().call_later(spec.interval, self.sweep)

    def stop(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _states(self) -> list[EndpointState]:
        return [self.registry.get(self.service, a) for a in self.endpoints]

    def on_failure(self, state: EndpointState) -> None:
        limit = self.spec.consecutive_errors if self.spec is not None else None
        if limit is not None and state.consecutive_errors >= limit:
            self.eject(state, f"{state.consecutive_errors} errors in a row")

    def eject(self, state: EndpointState, why: str) -> bool:
        spec = self.spec
        now = time.monotonic()
        if state.ejected_until > now:
            return False
        states = self._states()
        ejected = sum(1 for s in states if s.ejected_until > now)
        # Envoy's rule: the cap may round down to zero, but one ejection is always allowed.
        if ejected and (ejected + 1) * 100 > spec.max_ejection_percent * max(len(states), 1):
            return False
        if state.ejected_until and now - state.ejected_until > spec.max_ejection_time:
            state.ejections = 0  # healthy for long: back to the base time
        state.ejections += 1
        length = min(spec.base_ejection_time * state.ejections, spec.max_ejection_time)
        state.ejected_until = now + length
        state.consecutive_errors = 0
        log.warning("ejected %s of %s for %.1fs: %s", state.address, self.service, length, why)
        asyncio.get_running_loop().call_later(length, self._back, state)
        self.registry.changed(self.service)
        return True

    def _back(self, state: EndpointState) -> None:
        log.info("%s of %s back from ejection", state.address, self.service)
        self.registry.changed(self.service)

    def sweep(self) -> None:
        """The percentage modes, once per interval."""
        spec = self.spec
        states = self._states()
        try:
            fp = spec.failure_percentage
            if fp is not None:
                for s in states:
                    if (
                        s.interval_calls >= fp.min_requests
                        and s.interval_errors * 100 >= fp.threshold * s.interval_calls
                    ):
                        self.eject(s, f"{s.interval_errors}/{s.interval_calls} calls failed")
            sr = spec.success_rate
            if sr is not None:
                qualified = [s for s in states if s.interval_calls >= sr.min_requests]
                if len(qualified) >= sr.min_hosts:
                    rates = [1 - s.interval_errors / s.interval_calls for s in qualified]
                    floor = statistics.fmean(rates) - sr.stdev_factor * statistics.pstdev(rates)
                    for s, rate in zip(qualified, rates, strict=True):
                        if rate < floor:
                            self.eject(s, f"success rate {rate:.1%} < {floor:.1%}")
        finally:
            for s in states:
                s.interval_calls = s.interval_errors = 0
            self._sweep = asyncio.get_running_loop().call_later(spec.interval, self.sweep)


class Balance:
    """Sets `call.endpoint` from the picker of the call's backend and counts the attempt there."""

    __slots__ = ("backends", "default")

    def __init__(self, default: Backend, table: Mapping[BackendKey, Backend]) -> None:
        self.default = default
        self.backends = table

    def _pick(self, call: Call) -> tuple[Endpoint, Backend]:
        key = call.backend
        backend = self.default if key is None else self.backends.get(key, _NONE)
        picker = backend.picker
        endpoint = picker.pick(call)
        if endpoint is None:
            what = Backend(key, picker, 0).describe() if key is not None else f"service {call.service!r}"
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: {what} has no endpoints")
        avoid = call.tried
        limit = backend.per_endpoint
        if (
            endpoint.address in call.down
            or (avoid is not None and endpoint.address in avoid)
            or (limit is not None and backend.states[endpoint.address].inflight >= limit)
        ):
            # Its connection is failing, an earlier attempt used it, or it is at its limit:
            # try the others once each; if none is better, keep the first pick.
            for _ in range(backend.size):
                other = picker.pick(call)
                if (
                    other is not None
                    and other.address not in call.down
                    and (avoid is None or other.address not in avoid)
                    and (limit is None or backend.states[other.address].inflight < limit)
                ):
                    return other, backend
            if limit is not None and backend.states[endpoint.address].inflight >= limit:
                raise CallError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"gmesh: circuit breaker: the endpoints of {backend.describe()} tried have "
                    f"{limit} calls in flight each (maxRequestsPerEndpoint)",
                )
        return endpoint, backend

    async def __call__(self, call: Call, next: Handler) -> Any:
        endpoint, backend = self._pick(call)
        call.endpoint = endpoint
        state = backend.states.get(endpoint.address)
        if state is None:  # cannot happen for a picked endpoint; stay safe
            return await next(call)
        state.inflight += 1
        started = time.perf_counter()
        # A stream's length says nothing about the endpoint's speed: latency only from unary calls.
        timed = call.kind is MethodKind.UNARY
        try:
            result = await next(call)
        except BaseException as exc:
            state.inflight -= 1
            failed = endpoint_failed(exc, SERVER_ERRORS)
            ended = time.perf_counter()  # also the EWMA's clock (perf_counter is monotonic)
            state.observe(ended - started if timed else None, failed, ended)
            if failed and backend.detector is not None:
                backend.detector.on_failure(state)
            raise
        state.inflight -= 1
        ended = time.perf_counter()
        state.observe(ended - started if timed else None, False, ended)
        return result


class BalanceFactory:
    name = "balance"
    phase = Phase.BALANCE

    def __init__(self, registry: Registry = REGISTRY) -> None:
        self.registry = registry

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None:
        table = backends(snapshot, self.registry)
        return Balance(table[(service, None)], table)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [BalanceFactory()]
