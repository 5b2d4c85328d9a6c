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
    maglev                O(1)      consistent hash through a Maglev lookup table (65537 slots)
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
from array import array
from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

if TYPE_CHECKING:
    from gmesh.balancer.state import EndpointState
    from gmesh.chain.call import Call
    from gmesh.discovery.endpoint import Endpoint


class Picker(Protocol):
    """Chooses an endpoint for a call, or None when there is none to choose.

    `pick_other` is asked when the first pick cannot take the call (its connection fails,
    an earlier attempt used it, it is at its per-endpoint limit): another endpoint that
    `ok` accepts, or None when there is none. Ordered pickers (ring hash, Maglev, pick
    first) answer the next one in their order, so a key keeps falling over to the same
    endpoint; the others pick again.
    """

    def pick(self, call: Call[Any]) -> Endpoint | None: ...

    def pick_other(self, call: Call[Any], ok: Callable[[Endpoint], bool]) -> Endpoint | None: ...


class _Repick:
    """`pick_other` for pickers whose next pick is as good as any: pick again, n times at most."""

    __slots__ = ()

    endpoints: tuple[Endpoint, ...]

    def pick(self, call: Call[Any]) -> Endpoint | None:
        raise NotImplementedError

    def pick_other(self, call: Call[Any], ok: Callable[[Endpoint], bool]) -> Endpoint | None:
        for _ in range(len(self.endpoints)):
            endpoint = self.pick(call)
            if endpoint is not None and ok(endpoint):
                return endpoint
        for endpoint in self.endpoints:  # unlucky draws: look at each once
            if ok(endpoint):
                return endpoint
        return None


class NoEndpoints:
    """The picker of a backend with no endpoint that takes traffic."""

    __slots__ = ()

    endpoints: tuple[Endpoint, ...] = ()

    def pick(self, call: Call[Any]) -> Endpoint | None:
        return None

    def pick_other(self, call: Call[Any], ok: Callable[[Endpoint], bool]) -> Endpoint | None:
        return None


class RoundRobin(_Repick):
    """Weighted round robin: each endpoint gets calls in proportion to its `weight`, interleaved.

    Equal weights cycle through the endpoints (O(1) per pick, O(n) to build). Unequal
    weights use earliest-deadline-first over a heap (O(log n) per pick), which spreads an
    endpoint's share evenly rather than in bursts. Weight 0 drains an endpoint. Each
    picker starts at a random position so many proxies do not move in lockstep.
    """

    __slots__ = ("_heap", "_next", "_step", "endpoints")

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
            # one step per distinct weight (a few), not per endpoint: cheap to build at 10,000
            self._step = {w: divisor / w for w in weights}
            step, rand = self._step, random.random
            self._heap = [(rand() * step[e.weight], i, e) for i, e in enumerate(live)]
            heapq.heapify(self._heap)

    def pick(self, call: Call[Any]) -> Endpoint | None:
        heap = self._heap
        if heap is None:
            return self._next() if self.endpoints else None
        due, order, endpoint = heap[0]
        heapq.heapreplace(heap, (due + self._step[endpoint.weight], order, endpoint))
        return endpoint


def _index_pair(n: int) -> tuple[int, int]:
    """Two different random indexes in range(n), n >= 2."""
    i = random.randrange(n)
    j = random.randrange(n - 1)
    return i, j + 1 if j >= i else j


class LeastRequest(_Repick):
    """Power of two choices: of two random endpoints, the one with fewer calls in flight.

    Nearly as good as looking at all of them, at O(1), and it never herds every caller onto
    the one idle endpoint (Mitzenmacher; Envoy's and Linkerd's choice)."""

    __slots__ = ("endpoints", "n", "states")

    def __init__(self, endpoints: Sequence[Endpoint], states: Sequence[EndpointState]) -> None:
        self.endpoints = tuple(endpoints)
        self.states = tuple(states)
        self.n = len(self.endpoints)

    def pick(self, call: Call[Any]) -> Endpoint | None:
        n = self.n
        if n < 2:
            return self.endpoints[0] if n else None
        i, j = _index_pair(n)
        return self.endpoints[i] if self.states[i].inflight <= self.states[j].inflight else self.endpoints[j]


class PeakEwma(LeastRequest):
    """Power of two choices on cost = peak-EWMA latency x (calls in flight + 1), as Linkerd balances:
    a slow endpoint gets fewer calls even when few are in flight."""

    __slots__ = ()

    def pick(self, call: Call[Any]) -> Endpoint | None:
        n = self.n
        if n < 2:
            return self.endpoints[0] if n else None
        i, j = _index_pair(n)
        return self.endpoints[i] if self.states[i].cost() <= self.states[j].cost() else self.endpoints[j]


class Random(_Repick):
    __slots__ = ("endpoints",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)

    def pick(self, call: Call[Any]) -> Endpoint | None:
        return random.choice(self.endpoints) if self.endpoints else None


class PickFirst:
    """Every call to the first usable endpoint (in address order); the rest are spares that take
    over, in order, when it is ejected, unhealthy, its connection fails or it is busy."""

    __slots__ = ("endpoints",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(sorted(endpoints, key=lambda e: e.address))

    def pick(self, call: Call[Any]) -> Endpoint | None:
        for endpoint in self.endpoints:
            if endpoint.address not in call.down:
                return endpoint
        return self.endpoints[0] if self.endpoints else None

    def pick_other(self, call: Call[Any], ok: Callable[[Endpoint], bool]) -> Endpoint | None:
        for endpoint in self.endpoints:
            if ok(endpoint):
                return endpoint
        return None


def hash64(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _key_of(call: Call[Any], key: str) -> str | None:
    for k, v in call.metadata:
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


# --------------------------------------------------------------------------- consistent hashing
#
# A hashing policy has two parts. Its table (ring points or Maglev slots -> endpoint index)
# depends only on the endpoint set (addresses and weights), costs O(n) to O(n log n) to
# build, and is rebuilt only when that set changes: big ones are built off the event loop
# (`Backends` does it). Its picker is cheap: the table, plus which endpoints are usable now
# (health, ejection); it is rebuilt on every health change, and a key whose endpoint is out
# walks on to the next endpoint of the table, the same one every time.

#: Most ring points in all: ~100 per weight unit up to 1,000 endpoints, fewer per endpoint
#: beyond (at 10,000 endpoints, 10 each), so a ring stays ~1 MB however big the service.
RING_POINTS = 100_000


class HashTable(Protocol):
    """An immutable lookup from a 64-bit hash to an endpoint index, and its walk order."""

    size: int

    def start(self, point: int) -> int:
        """The table position a hash lands on."""
        ...

    def owner(self, position: int) -> int:
        """The endpoint index at `position` (positions wrap around)."""
        ...


class RingTable:
    """Consistent hashing on a ring (ketama): each endpoint owns points in proportion to its
    weight; a hash goes to the owner of the first point at or after it. Adding one endpoint
    to n moves about 1/(n+1) of the keys, all to the new one."""

    __slots__ = ("owners", "points", "size")

    def __init__(self, addresses: Sequence[str], weights: Sequence[int]) -> None:
        total = sum(max(w, 1) for w in weights) or 1
        per_weight = max(1, min(100, RING_POINTS // total))
        # Each endpoint's points come from a generator seeded with its address's stable hash:
        # the same in every process, and far cheaper than hashing each point. Entries are
        # point << 20 | endpoint index (ints sort much faster than tuples), sorted in 256
        # buckets by their top byte (small sorts; a thread building this stays preemptible).
        buckets: list[list[int]] = [[] for _ in range(256)]
        for n, (address, weight) in enumerate(zip(addresses, weights, strict=True)):
            bits = random.Random(hash64(address)).getrandbits
            for _ in range(per_weight * max(weight, 1)):
                entry = bits(64) << 20 | n
                buckets[entry >> 76].append(entry)
        points = array("Q")
        owners = array("I")
        for bucket in buckets:
            bucket.sort()
            points.extend(entry >> 20 for entry in bucket)
            owners.extend(entry & 0xFFFFF for entry in bucket)
        self.points = points
        self.owners = owners
        self.size = len(points)

    def start(self, point: int) -> int:
        i = bisect.bisect_left(self.points, point)
        return i if i < self.size else 0

    def owner(self, position: int) -> int:
        return self.owners[position % self.size]


#: Maglev table size (prime; Envoy's default). Fixed: a size that changed with the number of
#: endpoints would remap nearly every key when it changed.
MAGLEV_SIZE = 65537


class MaglevTable:
    """Google's Maglev lookup table: O(1) lookups, an even spread, and minimal remapping when
    the endpoint set changes. Endpoints are indexed in address order."""

    __slots__ = ("size", "table")

    def __init__(self, addresses: Sequence[str]) -> None:
        n = len(addresses)
        size = MAGLEV_SIZE
        table = array("i", [-1]) * size
        if n:
            offsets = [hash64(a + "#offset") % size for a in addresses]
            skips = [hash64(a + "#skip") % (size - 1) + 1 for a in addresses]
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
        self.size = size

    def start(self, point: int) -> int:
        return point % self.size

    def owner(self, position: int) -> int:
        return self.table[position % self.size]


def hash_table(policy: str, endpoints: Sequence[Endpoint]) -> HashTable:
    """The table of a hashing policy over `endpoints` (ring: as given; Maglev: in address order)."""
    if policy == "ring_hash":
        return RingTable([e.address for e in endpoints], [e.weight for e in endpoints])
    return MaglevTable([e.address for e in endpoints])


def table_order(policy: str, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """The endpoint order a hashing policy's table indexes."""
    return tuple(sorted(endpoints, key=lambda e: e.address)) if policy == "maglev" else tuple(endpoints)


class ConsistentHash:
    """Ring hash or Maglev picker: the call's key (a request metadata value) through the table.

    A key whose endpoint is out (unhealthy, ejected: `usable` says, except in panic mode)
    walks on through the table to the next endpoint that is in; `pick_other` walks past the
    ones the balancer cannot use either (connection failing, tried, busy). Calls without the
    key go to a random usable endpoint.
    """

    __slots__ = ("_spare", "endpoints", "key", "table", "usable")

    def __init__(
        self, table: HashTable, endpoints: Sequence[Endpoint], key: str, usable: Sequence[bool] | None = None
    ) -> None:
        self.table = table
        self.endpoints = tuple(endpoints)
        self.key = key
        #: per endpoint (table order): may it take calls now? None: every one may
        self.usable = None if usable is None or all(usable) else tuple(usable)
        spare = [e for i, e in enumerate(self.endpoints) if self.usable is None or self.usable[i]]
        self._spare = tuple(spare or self.endpoints)

    def pick(self, call: Call[Any]) -> Endpoint | None:
        if not self.endpoints:
            return None
        value = _key_of(call, self.key)
        if value is None:
            return random.choice(self._spare)
        position = self.table.start(hash64(value))
        index = self.table.owner(position)
        usable = self.usable
        if usable is None or usable[index]:
            return self.endpoints[index]
        return self._walk(position, None) or self.endpoints[index]

    def pick_other(self, call: Call[Any], ok: Callable[[Endpoint], bool]) -> Endpoint | None:
        if not self.endpoints:
            return None
        value = _key_of(call, self.key)
        if value is None:
            return _Repick.pick_other(self, call, ok)  # type: ignore[arg-type]
        return self._walk(self.table.start(hash64(value)), ok)

    def _walk(self, position: int, ok: Callable[[Endpoint], bool] | None) -> Endpoint | None:
        """The first endpoint from `position` on that is usable and `ok`; None when none is."""
        table, endpoints, usable = self.table, self.endpoints, self.usable
        seen: set[int] = set()
        for step in range(table.size):
            index = table.owner(position + step)
            if index in seen:
                continue
            seen.add(index)
            if (usable is None or usable[index]) and (ok is None or ok(endpoints[index])):
                return endpoints[index]
            if len(seen) == len(endpoints):
                break
        return None


def RingHash(endpoints: Sequence[Endpoint], key: str) -> ConsistentHash:
    """A ring-hash picker over `endpoints`, its table built here (tests, small backends)."""
    return ConsistentHash(hash_table("ring_hash", endpoints), endpoints, key)


def Maglev(endpoints: Sequence[Endpoint], key: str) -> ConsistentHash:
    """A Maglev picker over `endpoints`, its table built here (tests, small backends)."""
    ordered = table_order("maglev", endpoints)
    return ConsistentHash(hash_table("maglev", ordered), ordered, key)


class ZoneAware:
    """Calls from a zone go to that zone's picker when it has one (enough usable endpoints
    there), else to the picker over every zone."""

    __slots__ = ("by_zone", "everywhere")

    def __init__(self, by_zone: Mapping[str, Picker], everywhere: Picker) -> None:
        self.by_zone = dict(by_zone)
        self.everywhere = everywhere

    def pick(self, call: Call[Any]) -> Endpoint | None:
        return self.by_zone.get(call.caller.zone, self.everywhere).pick(call)

    def pick_other(self, call: Call[Any], ok: Callable[[Endpoint], bool]) -> Endpoint | None:
        local = self.by_zone.get(call.caller.zone)
        if local is not None:
            found = local.pick_other(call, ok)
            if found is not None:
                return found
        return self.everywhere.pick_other(call, ok)


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
    policy: str,
    endpoints: Sequence[Endpoint],
    states: Sequence[EndpointState],
    hash_key: str | None = None,
    table: HashTable | None = None,
    usable: Sequence[bool] | None = None,
) -> Picker:
    """The picker of `policy` over `endpoints` (`states` aligned with them).

    Hashing policies take every endpoint with its `table` (built here when not given) and
    `usable` flags; the others take only the endpoints usable now.
    """
    if not endpoints:
        return NoEndpoints()
    if policy in HASHING:
        ordered = table_order(policy, endpoints)
        if ordered != tuple(endpoints) and usable is not None:
            flags = dict(zip((e.address for e in endpoints), usable, strict=True))
            usable = [flags[e.address] for e in ordered]
        return ConsistentHash(table or hash_table(policy, ordered), ordered, hash_key or "", usable)
    if policy == "round_robin":
        return RoundRobin(endpoints, weighted=False)
    if policy == "weighted_round_robin":
        return RoundRobin(endpoints)
    if policy == "least_request":
        return LeastRequest(endpoints, states)
    if policy == "peak_ewma":
        return PeakEwma(endpoints, states)
    if policy == "random":
        return Random(endpoints)
    if policy == "pick_first":
        return PickFirst(endpoints)
    raise ValueError(f"unknown balancer policy {policy!r}")
