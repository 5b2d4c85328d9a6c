"""Balancer micro-benchmark: the cost of one pick and of building a picker, per policy.

    python bench/pickers.py [--quick] [--picks 200000] [--repeat 3]

For every policy of `gmesh.balancer.POLICIES`, over 10 and over 1,000 endpoints (weights
1, 2, 3 in turn; random calls in flight and latency EWMAs for the load-aware policies),
prints the µs per `pick()` (best of --repeat runs of --picks picks, timeit-style) and the
ms to build the picker, which is what every change of endpoints or of their health costs
(a new picker per backend). ring_hash and maglev picks use calls carrying `x-user-id`
with values taken in turn from 4,096 different keys, so every pick really hashes. The
"loop" row is the cost of the measuring loop calling a function that does nothing:
subtract it for the picker's own share.

Then, for one service with 1,000 endpoints, what a health or ejection change costs: every
backend of the service (the whole service, and its subsets) rebuilt in the mesh's live
`Backends` table — consistent-hash tables are kept, only the pickers around them change.
Then what an endpoint-set change costs the hashing policies: building a ring or Maglev
table of 1,000 and 10,000 endpoints (done on a worker thread), and the longest the event
loop stalls while a 10,000-endpoint table is built that way (a probe task sleeping 1 ms).

Pure CPU, one thread, no sockets. As timeit does, the garbage collector is off while a
measurement runs (a full collection can land in any of them and add tens of ms). `--quick` runs 20,000 picks per measurement and fewer
builds, for a smoke run in a few seconds; the default run takes under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from gmesh.balancer import HASHING, POLICIES, hash_table, make_picker, table_order
from gmesh.balancer.backends import Backends, wait_ready
from gmesh.balancer.state import EndpointState, EndpointStates
from gmesh.chain.call import Call
from gmesh.config.kinds import Resource
from gmesh.config.service import ServiceSpec
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.discovery.endpoint import Endpoint

SERVICE = "orders"
HASH_KEY = "x-user-id"
KEYS = 4096
SIZES = (10, 1000)
ZONES = ("a", "b", "c")


async def _noop(call: Call[None]) -> None:
    return None


def endpoints_of(n: int) -> list[Endpoint]:
    return [
        Endpoint(
            SERVICE,
            f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:8080",
            labels={"version": "v1" if i % 4 else "v2"},
            zone=ZONES[i % len(ZONES)],
            weight=1 + i % 3,
        )
        for i in range(n)
    ]


def states_of(endpoints: Sequence[Endpoint]) -> list[EndpointState]:
    states = []
    for e in endpoints:
        s = EndpointState(SERVICE, e.address)
        s.inflight = random.randrange(8)
        s.ewma = random.uniform(0.001, 0.050)
        states.append(s)
    return states


def calls(count: int) -> list[Call[None]]:
    """`count` calls whose x-user-id cycles through KEYS different values."""
    keyed = [
        Call("/orders.v1.Orders/Get", ((HASH_KEY, f"user-{i}"),), None, SERVICE, _noop) for i in range(KEYS)
    ]
    return [keyed[i % KEYS] for i in range(count)]


def time_picks(pick: Callable[[Call[None]], Any], batch: Sequence[Call[None]], repeat: int) -> float:
    """Best seconds per pick over `repeat` runs through `batch`."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        for call in batch:
            pick(call)
        best = min(best, time.perf_counter() - start)
    return best / len(batch)


def time_builds(
    build: Callable[[], Any], budget: float, at_least: int, at_most: int
) -> tuple[float, int, Any]:
    """Best seconds per build, repeating for about `budget` seconds (`at_least` to `at_most`
    times); also how many builds that was, and the last thing built."""
    gc.collect()
    start = time.perf_counter()
    built = build()
    once = time.perf_counter() - start
    runs = max(at_least, min(at_most, int(budget / max(once, 1e-9))))
    best = once
    for _ in range(runs - 1):
        start = time.perf_counter()
        built = build()
        best = min(best, time.perf_counter() - start)
    return best, runs, built


def snapshot_of(endpoints: Sequence[Endpoint], spec: dict[str, Any]) -> MeshSnapshot:
    resource = Resource("Service", SERVICE, ServiceSpec.model_validate(spec))
    return MeshSnapshot(
        revision=1, endpoints={SERVICE: tuple(endpoints)}, resources={"Service": {SERVICE: resource}}
    )


BACKEND_SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("weighted_round_robin (default)", {}),
    ("least_request, 2 subsets", {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "balancer": {"policy": "least_request"},
    }),
    ("least_request, zoneAware, 3 zones", {"balancer": {"policy": "least_request", "zoneAware": {}}}),
    ("ring_hash", {"balancer": {"policy": "ring_hash", "hashKey": HASH_KEY}}),
    ("maglev", {"balancer": {"policy": "maglev", "hashKey": HASH_KEY}}),
    ("maglev, zoneAware, 3 zones", {"balancer": {"policy": "maglev", "hashKey": HASH_KEY, "zoneAware": {}}}),
    ("maglev, 2 subsets, zoneAware", {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "balancer": {"policy": "maglev", "hashKey": HASH_KEY, "zoneAware": {}},
    }),
)  # fmt: skip


async def loop_stall(policy: str, size: int) -> tuple[float, float, float]:
    """For a service of `size` endpoints under `policy`, first called: the seconds its activation
    held the loop (states, orders: O(n), on the loop), the longest the loop was then late (a
    task sleeping 1 ms) while `Backends` built the table on its worker thread, and the seconds
    until the table served."""
    snap = snapshot_of(endpoints_of(size), {"balancer": {"policy": policy, "hashKey": HASH_KEY}})
    table = Backends(EndpointStates(), lambda: snap)
    late: list[tuple[float, float]] = []  # (when the probe went to sleep, how late it woke)

    async def probe() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((start, time.perf_counter() - start - 0.001))

    prober = asyncio.ensure_future(probe())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    backend = table.get((SERVICE, None))
    activated = time.perf_counter()
    assert await wait_ready(backend, 30.0)
    ready = time.perf_counter() - start
    prober.cancel()
    table.close()
    # only sleeps begun once the activation had returned (the one it delayed is the activation)
    return activated - start, max(lag for began, lag in late if began >= activated), ready


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer picks and builds: a smoke run of a few seconds"
    )
    parser.add_argument("--picks", type=int, help="picks per measurement (default 200000, --quick 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per pick measurement; the best counts")
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the random module (pickers draw from it)"
    )
    args = parser.parse_args()
    picks = args.picks or (20_000 if args.quick else 200_000)
    budget, at_least, at_most = (0.05, 1, 5) if args.quick else (0.4, 2, 50)
    random.seed(args.seed)
    began = time.perf_counter()
    gc.disable()

    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()} ({platform.python_implementation()}, {platform.machine()}), "
        f"{picks} picks x best of {args.repeat}"
    )
    print(f"{'policy':22} {'endpoints':>9} {'µs/pick':>8} {'ms/build':>9} {'builds':>6}")
    batch = calls(picks)
    loop = time_picks(lambda call: None, batch, args.repeat)
    print(f"{'(loop)':22} {'-':>9} {loop * 1e6:8.3f} {'-':>9} {'-':>6}")
    for policy in POLICIES:
        for n in SIZES:
            endpoints = endpoints_of(n)
            states = states_of(endpoints)
            key = HASH_KEY if policy in HASHING else None
            build = functools.partial(make_picker, policy, endpoints, states, key)
            seconds, runs, picker = time_builds(build, budget, at_least, at_most)
            per_pick = time_picks(picker.pick, batch, args.repeat)
            print(f"{policy:22} {n:>9} {per_pick * 1e6:8.3f} {seconds * 1e3:9.3f} {runs:>6}")
        sys.stdout.flush()

    n = 1000
    endpoints = endpoints_of(n)
    print(f"\na health change: every backend of one service with {n} endpoints rebuilt")
    print(f"{'Service spec':36} {'backends':>8} {'ms/rebuild':>10} {'builds':>6}")
    for label, spec in BACKEND_SPECS:
        snap = snapshot_of(endpoints, spec)
        table = Backends(EndpointStates(), lambda snap=snap: snap)  # type: ignore[misc]
        table.get((SERVICE, None))  # in use: tables built once, outside the measure
        seconds, runs, _ = time_builds(functools.partial(table.build, SERVICE), budget, at_least, at_most)
        print(f"{label:36} {len(table.table):>8} {seconds * 1e3:10.3f} {runs:>6}")
        sys.stdout.flush()
    print("\nan endpoint-set change: a consistent-hash table built (on a worker thread)")
    print(f"{'policy':22} {'endpoints':>9} {'ms/build':>9}")
    for policy in sorted(HASHING):
        for size in (1000, 10_000):
            ordered = table_order(policy, endpoints_of(size))
            seconds, _, _ = time_builds(functools.partial(hash_table, policy, ordered), budget, 1, 3)
            print(f"{policy:22} {size:>9} {seconds * 1e3:9.1f}")
    gc.enable()
    print("\nthe event loop when a service of 10,000 endpoints is first called (hashing policies)")
    print(f"{'policy':22} {'activation ms':>13} {'longest stall ms':>16} {'table serves after ms':>21}")
    for policy in sorted(HASHING):
        gc.collect()
        activation, stall, ready = asyncio.run(loop_stall(policy, 10_000))
        print(f"{policy:22} {activation * 1e3:13.1f} {stall * 1e3:16.1f} {ready * 1e3:21.0f}")
    print(f"\n({time.perf_counter() - began:.1f}s)")


if __name__ == "__main__":
    main()
