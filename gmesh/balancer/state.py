"""What this process knows about each endpoint: load, latency, health, ejection — shared by pickers.

One `EndpointState` per (service, address) per process, kept across config changes so a
recompile does not forget that an endpoint is slow, failing or ejected. Pickers read it
(in-flight counts, EWMA latency); the BALANCE filter writes it after each attempt; active
health checks and outlier detection flip `healthy` / `ejected_until`. A flip tells the
mesh's `EndpointStates` listeners, which build new pickers for that service only (pickers
themselves stay immutable: grpc-go's balancer/picker split). One `EndpointStates` per mesh
and process (`gmesh.outbound.mesh.MeshState`), never a process global.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

#: Latency assumed for an endpoint that has not answered yet (Linkerd's default RTT is similar).
DEFAULT_RTT = 0.010
#: Decay time of the latency EWMA (peak EWMA as in Finagle and Linkerd).
EWMA_DECAY = 10.0


class EndpointState:
    """Load and health of one endpoint, as this process sees it. Mutated on the event loop only."""

    __slots__ = (
        "address",
        "calls",
        "consecutive_errors",
        "ejected_until",
        "ejections",
        "errors",
        "ewma",
        "ewma_at",
        "hc_failures",
        "hc_successes",
        "healthy",
        "inflight",
        "interval_calls",
        "interval_errors",
        "service",
    )

    def __init__(self, service: str, address: str) -> None:
        self.service = service
        self.address = address
        self.inflight = 0
        self.ewma = DEFAULT_RTT
        self.ewma_at = 0.0
        self.calls = 0
        self.errors = 0
        self.consecutive_errors = 0
        #: calls and server errors since the outlier detector last looked
        self.interval_calls = 0
        self.interval_errors = 0
        #: active health (True until a health check says otherwise)
        self.healthy = True
        self.hc_failures = 0
        self.hc_successes = 0
        #: monotonic time until which outlier detection keeps it out (0: not ejected)
        self.ejected_until = 0.0
        self.ejections = 0

    def observe(self, seconds: float | None, failed: bool, now: float) -> None:
        """Record one finished attempt: latency (None: not a measure of speed, e.g. a stream)
        into the peak EWMA, outcome into the counters. `now` is any monotonic clock in seconds
        (the same one every time: it only measures the time between two observations)."""
        self.calls += 1
        self.interval_calls += 1
        if failed:
            self.errors += 1
            self.interval_errors += 1
            self.consecutive_errors += 1
        else:
            self.consecutive_errors = 0
        if seconds is None:
            return
        if seconds > self.ewma:
            self.ewma = seconds  # peak: a slow answer counts at once
        else:
            weight = math.exp(-(now - self.ewma_at) / EWMA_DECAY) if self.ewma_at else 0.0
            self.ewma = self.ewma * weight + seconds * (1 - weight)
        self.ewma_at = now

    def cost(self) -> float:
        """Peak-EWMA cost: expected latency scaled by the calls already waiting on it."""
        return self.ewma * (self.inflight + 1)

    def usable(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now

    def describe(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        return {
            "address": self.address,
            "inflight": self.inflight,
            "ewma_ms": round(self.ewma * 1000, 3),
            "calls": self.calls,
            "errors": self.errors,
            "healthy": self.healthy,
            "ejected_for_s": round(max(self.ejected_until - now, 0.0), 3),
            "ejections": self.ejections,
        }


class EndpointStates:
    """Every endpoint state of one mesh in this process, and who to tell when health or
    ejection changes (per service: only that service's pickers are rebuilt)."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], EndpointState] = {}
        #: per service, bumped on every change that should rebuild its pickers
        self.generations: dict[str, int] = {}
        self._listeners: list[Callable[[str], None]] = []

    def get(self, service: str, address: str) -> EndpointState:
        key = (service, address)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = EndpointState(service, address)
        return state

    def all(self) -> list[EndpointState]:
        """Every endpoint state (a copy: safe to read from another thread, e.g. a metrics scrape)."""
        return list(self.states.values())

    def of_service(self, service: str, addresses: Iterable[str]) -> list[EndpointState]:
        """The states of `service`'s endpoints at `addresses` (those not created yet are not made)."""
        found = []
        for address in addresses:
            state = self.states.get((service, address))
            if state is not None:
                found.append(state)
        return found

    def keep_only(self, service: str, addresses: Iterable[str]) -> None:
        """Drop `service`'s states other than those at `addresses` (endpoints that left, or all of
        them when the service is no longer used), so a long-lived process does not grow."""
        keep = set(addresses)
        for key in [k for k in self.states if k[0] == service and k[1] not in keep]:
            del self.states[key]

    def changed(self, service: str) -> None:
        """Health or ejection of `service`'s endpoints changed: rebuild its pickers (listeners debounce)."""
        self.generations[service] = self.generations.get(service, 0) + 1
        for listener in list(self._listeners):
            listener(service)

    def generation(self, service: str) -> int:
        """Changes so far that concern `service`."""
        return self.generations.get(service, 0)

    def listen(self, listener: Callable[[str], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None
