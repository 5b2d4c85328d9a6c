"""What this process knows about each endpoint: load, latency, health, ejection — shared by pickers.

One `EndpointState` per (service, address) per process, kept across config changes so a
recompile does not forget that an endpoint is slow, failing or ejected. Pickers read it
(in-flight counts, EWMA latency); the BALANCE filter writes it after each attempt; active
health checks and outlier detection flip `healthy` / `ejected_until`. A flip bumps
`Registry.generation` and tells listeners, which build new pickers without that endpoint
(pickers themselves stay immutable: grpc-go's balancer/picker split).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

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


class Registry:
    """Every endpoint state of this process, and who to tell when health or ejection changes."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], EndpointState] = {}
        #: bumped on every change that should rebuild pickers; per service in `generations`
        self.generation = 0
        self.generations: dict[str, int] = {}
        self.everything = 0
        #: (service, address) -> the health checker that probes it (one per process)
        self.health_owners: dict[tuple[str, str], object] = {}
        self._listeners: list[Callable[[], None]] = []
        self._retained: dict[int, set[tuple[str, str]]] = {}

    def get(self, service: str, address: str) -> EndpointState:
        key = (service, address)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = EndpointState(service, address)
        return state

    def of_service(self, service: str) -> list[EndpointState]:
        return [s for (svc, _), s in self.states.items() if svc == service]

    def forget(self, keep: set[tuple[str, str]]) -> None:
        """Drop the states of endpoints no longer in the mesh."""
        for key in [k for k in self.states if k not in keep]:
            del self.states[key]

    def retain(self, owner: object, keys: set[tuple[str, str]] | None) -> None:
        """`owner` (an outbound) needs the states of `keys` (None: nothing any more); states no
        owner needs are dropped, so endpoints that come and go do not pile up in a long-lived
        process."""
        if keys is None:
            self._retained.pop(id(owner), None)
        else:
            self._retained[id(owner)] = keys
        needed: set[tuple[str, str]] = set().union(*self._retained.values()) if self._retained else set()
        self.forget(needed)

    def changed(self, service: str | None = None) -> None:
        """Health or ejection changed (of `service`'s endpoints, None: of any): rebuild pickers
        (listeners debounce)."""
        self.generation += 1
        if service is not None:
            self.generations[service] = self.generation
        else:
            self.everything = self.generation
        for listener in list(self._listeners):
            listener()

    def service_generation(self, service: str) -> int:
        """Changes so far that concern `service` (its pickers are rebuilt when this moves)."""
        return max(self.generations.get(service, 0), self.everything)

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None


#: The registry of this process.
REGISTRY = Registry()
