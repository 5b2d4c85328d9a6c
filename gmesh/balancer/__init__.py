"""Pickers: choose one endpoint of a backend per call.

A picker is built for one set of endpoints and never changes; a change of endpoints (or of
their health) builds a new one (grpc-go's balancer/picker split). `pick` never blocks and
never awaits. Concurrency: used from one event loop; pickers keep a cursor or read the
endpoints' shared load counters (`gmesh.balancer.state`), nothing else.

Policies (the Service kind's `balancer.policy`), cost per pick with n endpoints:

    round_robin           O(1)      equal turns
    weighted_round_robin  O(1) / O(log n)   turns in proportion to endpoint weight (EDF)
    least_request         O(1)      power of two choices on calls in flight
    peak_ewma             O(1)      power of two choices on latency EWMA x (in flight + 1)
    ring_hash             O(log n)  consistent hash of a metadata value on a ring (~100 points each)
    maglev                O(1)      consistent hash through a Maglev lookup table
    random                O(1)
    pick_first            O(1)      the first usable endpoint (by address), the others as spares
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import TYPE_CHECKING, Literal, Protocol, get_args

if TYPE_CHECKING:
    from gmesh.balancer.state import EndpointState
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

    def __init__(self, endpoints: Sequence[Endpoint], *, weighted: bool = True) -> None:
        live = [e for e in endpoints if e.weight > 0]
        self.endpoints = tuple(live)
        weights = {e.weight for e in live} if weighted else set()
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


def _index_pair(n: int) -> tuple[int, int]:
    """Two different random indexes in range(n), n >= 2."""
    i = random.randrange(n)
    j = random.randrange(n - 1)
    return i, j + 1 if j >= i else j


class LeastRequest:
    """Power of two choices: of two random endpoints, the one with fewer calls in flight.

    Nearly as good as looking at all of them, at O(1), and it never herds every caller onto
    the one idle endpoint (Mitzenmacher; Envoy's and Linkerd's choice)."""

    __slots__ = ("endpoints", "n", "states")

    def __init__(self, endpoints: Sequence[Endpoint], states: Sequence[EndpointState]) -> None:
        self.endpoints = tuple(endpoints)
        self.states = tuple(states)
        self.n = len(self.endpoints)

    def pick(self, call: Call) -> Endpoint | None:
        n = self.n
        if n < 2:
            return self.endpoints[0] if n else None
        i, j = _index_pair(n)
        return self.endpoints[i] if self.states[i].inflight <= self.states[j].inflight else self.endpoints[j]


class PeakEwma(LeastRequest):
    """Power of two choices on cost = peak-EWMA latency x (calls in flight + 1), as Linkerd balances:
    a slow endpoint gets fewer calls even when few are in flight."""

    __slots__ = ()

    def pick(self, call: Call) -> Endpoint | None:
        n = self.n
        if n < 2:
            return self.endpoints[0] if n else None
        i, j = _index_pair(n)
        return self.endpoints[i] if self.states[i].cost() <= self.states[j].cost() else self.endpoints[j]


class Random:
    __slots__ = ("endpoints",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)

    def pick(self, call: Call) -> Endpoint | None:
        return random.choice(self.endpoints) if self.endpoints else None


class PickFirst:
    """Every call to the first usable endpoint (in address order); the rest are spares that take
    over when it is ejected, unhealthy or its connection fails."""

    __slots__ = ("endpoints",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(sorted(endpoints, key=lambda e: e.address))

    def pick(self, call: Call) -> Endpoint | None:
        for endpoint in self.endpoints:
            if endpoint.address not in call.down:
                return endpoint
        return self.endpoints[0] if self.endpoints else None


def hash64(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _key_of(call: Call, key: str) -> str | None:
    for k, v in call.metadata:
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class _ConsistentHash:
    """What ring_hash and maglev share: the key from the call's metadata, a random endpoint
    for calls without it, and `_owner(hash)` for the rest."""

    __slots__ = ("endpoints", "key")

    endpoints: tuple[Endpoint, ...]
    key: str

    def _owner(self, point: int) -> Endpoint:
        raise NotImplementedError

    def pick(self, call: Call) -> Endpoint | None:
        if not self.endpoints:
            return None
        value = _key_of(call, self.key)
        if value is None:
            return random.choice(self.endpoints)
        return self._owner(hash64(value))


class RingHash(_ConsistentHash):
    """Consistent hashing on a ring (ketama): each endpoint owns ~100 x weight points; a call's
    key goes to the owner of the first point at or after its hash. Adding one endpoint to n
    moves about 1/(n+1) of the keys. Calls without the key go to a random endpoint."""

    __slots__ = ("owners", "points")

    POINTS_PER_WEIGHT = 100

    def __init__(self, endpoints: Sequence[Endpoint], key: str) -> None:
        self.endpoints = tuple(endpoints)
        self.key = key
        # Each ring entry is one int, point << 20 | endpoint index (ints sort much faster than
        # tuples). An endpoint's points come from a generator seeded with its address's stable
        # hash: the same in every process, and far cheaper than hashing each point.
        ring: list[int] = []
        for n, e in enumerate(self.endpoints):
            bits = random.Random(hash64(e.address)).getrandbits
            ring.extend(bits(64) << 20 | n for _ in range(self.POINTS_PER_WEIGHT * max(e.weight, 1)))
        ring.sort()
        self.points = [entry >> 20 for entry in ring]
        self.owners = [self.endpoints[entry & 0xFFFFF] for entry in ring]

    def _owner(self, point: int) -> Endpoint:
        i = bisect.bisect_left(self.points, point)
        return self.owners[i if i < len(self.owners) else 0]


#: Maglev table size (prime; Envoy's default). Fixed: a size that changed with the number of
#: endpoints would remap nearly every key when it changed.
MAGLEV_SIZE = 65537


class Maglev(_ConsistentHash):
    """Consistent hashing through Google's Maglev lookup table: O(1) picks, even spread, and
    minimal remapping when the endpoint set changes. Calls without the key pick at random."""

    __slots__ = ("table",)

    def __init__(self, endpoints: Sequence[Endpoint], key: str) -> None:
        self.endpoints = tuple(sorted(endpoints, key=lambda e: e.address))
        self.key = key
        n = len(self.endpoints)
        size = MAGLEV_SIZE
        table = [-1] * size
        if n:
            offsets = [hash64(e.address + "#offset") % size for e in self.endpoints]
            skips = [hash64(e.address + "#skip") % (size - 1) + 1 for e in self.endpoints]
            nexts = [0] * n
            filled = 0
            while filled < size:
                for i in range(n):
                    c = (offsets[i] + nexts[i] * skips[i]) % size
                    while table[c] >= 0:
                        nexts[i] += 1
                        c = (offsets[i] + nexts[i] * skips[i]) % size
                    table[c] = i
                    nexts[i] += 1
                    filled += 1
                    if filled == size:
                        break
        self.table = table

    def _owner(self, point: int) -> Endpoint:
        return self.endpoints[self.table[point % len(self.table)]]


class ZoneAware:
    """Calls from a zone go to that zone's picker when it has one (enough usable endpoints
    there), else to the picker over every zone."""

    __slots__ = ("by_zone", "everywhere")

    def __init__(self, by_zone: Mapping[str, Picker], everywhere: Picker) -> None:
        self.by_zone = dict(by_zone)
        self.everywhere = everywhere

    def pick(self, call: Call) -> Endpoint | None:
        return self.by_zone.get(call.caller.zone, self.everywhere).pick(call)


Policy = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_request",
    "peak_ewma",
    "ring_hash",
    "maglev",
    "random",
    "pick_first",
]
POLICIES: tuple[str, ...] = get_args(Policy)
HASHING = frozenset({"ring_hash", "maglev"})


def make_picker(
    policy: str, endpoints: Sequence[Endpoint], states: Sequence[EndpointState], hash_key: str | None = None
) -> Picker:
    """The picker of `policy` over `endpoints` (`states` aligned with them)."""
    if not endpoints:
        return NoEndpoints()
    if policy == "round_robin":
        return RoundRobin(endpoints, weighted=False)
    if policy == "weighted_round_robin":
        return RoundRobin(endpoints)
    if policy == "least_request":
        return LeastRequest(endpoints, states)
    if policy == "peak_ewma":
        return PeakEwma(endpoints, states)
    if policy == "ring_hash":
        return RingHash(endpoints, hash_key or "")
    if policy == "maglev":
        return Maglev(endpoints, hash_key or "")
    if policy == "random":
        return Random(endpoints)
    if policy == "pick_first":
        return PickFirst(endpoints)
    raise ValueError(f"unknown balancer policy {policy!r}")
