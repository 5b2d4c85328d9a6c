"""Pickers: choose one endpoint of a backend per call.

A picker is built for one set of endpoints and never changes; a change of endpoints builds
a new one (grpc-go's balancer/picker split). `pick` never blocks and never awaits.
Concurrency: used from one event loop; pickers keep a cursor, never shared state.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gmesh.chain.call import Call
    from gmesh.discovery.endpoint import Endpoint


class Picker(Protocol):
    """Chooses an endpoint for a call, or None when there is none to choose."""

    def pick(self, call: Call) -> Endpoint | None: ...


class NoEndpoints:
    """The picker of a backend with no endpoint that takes traffic."""

    def pick(self, call: Call) -> Endpoint | None:
        return None


class RoundRobin:
    """Weighted round robin: each endpoint gets calls in proportion to its `weight`, interleaved.

    Equal weights cycle through the endpoints (O(1) per pick, O(n) to build). Unequal
    weights use earliest-deadline-first over a heap (O(log n) per pick), which spreads an
    endpoint's share evenly rather than in bursts. Weight 0 drains an endpoint. Each
    picker starts at a random position so many proxies do not move in lockstep.
    """

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        live = [e for e in endpoints if e.weight > 0]
        self.endpoints = tuple(live)
        weights = {e.weight for e in live}
        self._heap: list[tuple[float, int, Endpoint]] | None = None
        if len(weights) <= 1:
            start = random.randrange(len(live)) if live else 0
            self._next = itertools.cycle(live[start:] + live[:start]).__next__
        else:
            divisor = reduce(math.gcd, weights)
            self._step = {id(e): divisor / e.weight for e in live}
            self._heap = [(random.random() * self._step[id(e)], i, e) for i, e in enumerate(live)]
            heapq.heapify(self._heap)

    def pick(self, call: Call) -> Endpoint | None:
        heap = self._heap
        if heap is None:
            return self._next() if self.endpoints else None
        due, order, endpoint = heap[0]
        heapq.heapreplace(heap, (due + self._step[id(endpoint)], order, endpoint))
        return endpoint
