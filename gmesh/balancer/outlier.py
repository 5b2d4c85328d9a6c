"""Outlier detection: passive health of one service's endpoints, judged from the outcomes of the
calls this process made to them.

Ejects an endpoint at once after `consecutiveErrors` failures in a row, and every
`interval` on failure percentage or success rate; lets it back after the ejection time
(longer with each ejection), never ejecting more than `maxEjectionPercent` (one ejection is
always allowed, as in Envoy). A flip tells the mesh's `EndpointStates`, which rebuilds
only this service's pickers. Concurrency: event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from typing import Any

from gmesh.balancer.state import EndpointState, EndpointStates

log = logging.getLogger(__name__)


class OutlierDetector:
    """Ejects failing endpoints of one service (one per service and mesh, kept across config changes)."""

    def __init__(self, service: str, states: EndpointStates) -> None:
        self.service = service
        self.registry = states
        self.spec: Any = None
        self.endpoints: tuple[str, ...] = ()
        #: ejections so far (a counter for metrics; never reset)
        self.ejected_total = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._returns: set[asyncio.TimerHandle] = set()

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
        for handle in self._returns:
            handle.cancel()
        self._returns.clear()

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
        self.ejected_total += 1
        state.consecutive_errors = 0
        log.warning("ejected %s of %s for %.1fs: %s", state.address, self.service, length, why)
        handle: asyncio.TimerHandle | None = None

        def back() -> None:
            if handle is not None:
                self._returns.discard(handle)
            log.info("%s of %s back from ejection", state.address, self.service)
            self.registry.changed(self.service)

        handle = asyncio.get_running_loop().call_later(length, back)
        self._returns.add(handle)
        self.registry.changed(self.service)
        return True

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
