"""Built-in plugin: per-backend counters of attempts (calls, server errors, latency histogram).

It runs in the ATTEMPT phase, below retries: a release that fails every tenth call counts
as failing even when retries hide those failures from callers.

Every process keeps cumulative counters per backend `(service, subset)` of services that
have a Route, and publishes them to etcd (`stats/<service>/<process>`, leased) once a
second while they change. Canary rollouts read them from there: the controller compares
the canary's success and latency with the baseline's, as every proxy and channel saw them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.chain.call import Call
from gmesh.chain.filter import Filter, FilterFactory, Handler, Phase
from gmesh.hookspecs import hookimpl
from gmesh.plugins.retry import endpoint_failed

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import LeaseKeeper, Store

log = logging.getLogger(__name__)

#: Codes that count as the server's failure (the caller's mistakes do not count against a backend).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

#: Upper bounds (seconds) of the latency buckets: 0.1 ms to ~60 s, 15% apart (p99 within 15%).
BOUNDS: tuple[float, ...] = tuple(0.0001 * 1.15**i for i in range(96))

#: This process, as it names itself in stats keys.
PROCESS = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BackendStats:
    """Cumulative counters of one backend in this process."""

    __slots__ = ("buckets", "calls", "errors")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.buckets = [0] * (len(BOUNDS) + 1)

    def record(self, seconds: float, failed: bool) -> None:
        self.calls += 1
        if failed:
            self.errors += 1
        self.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1

    def to_json(self) -> dict[str, Any]:
        # Sparse buckets: most are zero.
        return {
            "calls": self.calls,
            "errors": self.errors,
            "buckets": {str(i): n for i, n in enumerate(self.buckets) if n},
        }


#: (service, subset or "") -> counters; one registry per process, shared by every front door.
REGISTRY: dict[tuple[str, str], BackendStats] = {}


def stats_of(service: str, subset: str | None) -> BackendStats:
    key = (service, subset or "")
    stats = REGISTRY.get(key)
    if stats is None:
        stats = REGISTRY[key] = BackendStats()
    return stats


class CountCalls:
    """Times one attempt and counts its outcome against the backend it went to."""

    __slots__ = ("by_backend", "whole")

    def __init__(self, service: str) -> None:
        self.whole = stats_of(service, None)
        self.by_backend: dict[tuple[str, str | None] | None, BackendStats] = {None: self.whole}

    def _stats(self, call: Call) -> BackendStats:
        key = call.backend
        stats = self.by_backend.get(key)
        if stats is None:
            assert key is not None
            stats = self.by_backend[key] = stats_of(*key)
        return stats

    async def __call__(self, call: Call, next: Handler) -> Any:
        started = time.perf_counter()
        try:
            result = await next(call)
        except BaseException as exc:
            self._stats(call).record(time.perf_counter() - started, endpoint_failed(exc, SERVER_ERRORS))
            raise
        self._stats(call).record(time.perf_counter() - started, False)
        return result


class StatsFactory:
    """Counts calls of services that have a Route (the ones rollouts can move)."""

    name = "stats"
    phase = Phase.ATTEMPT

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None:
        from gmesh.plugins.router import route_of

        if route_of(service, snapshot) is None:
            return None
        return CountCalls(service)


# ---------------------------------------------------------------------------------------------
# Reading counters back: sums and differences across processes, error rates, quantiles
# ---------------------------------------------------------------------------------------------


class Sample:
    """Counters of one backend: calls, errors, latency buckets (dense list)."""

    __slots__ = ("buckets", "calls", "errors")

    def __init__(self, calls: int = 0, errors: int = 0, buckets: list[int] | None = None) -> None:
        self.calls = calls
        self.errors = errors
        self.buckets = buckets or [0] * (len(BOUNDS) + 1)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Sample:
        buckets = [0] * (len(BOUNDS) + 1)
        for i, n in doc.get("buckets", {}).items():
            if 0 <= int(i) < len(buckets):
                buckets[int(i)] = int(n)
        return cls(int(doc.get("calls", 0)), int(doc.get("errors", 0)), buckets)

    def minus(self, earlier: Sample) -> Sample:
        """What happened since `earlier` (a restarted process starts again from zero)."""
        if self.calls < earlier.calls:
            return self
        return Sample(
            self.calls - earlier.calls,
            self.errors - earlier.errors,
            [a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)],
        )

    def add(self, other: Sample) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (seconds); 0 without calls."""
        if not self.calls:
            return 0.0
        rank = q * self.calls
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return BOUNDS[min(i, len(BOUNDS) - 1)]
        return BOUNDS[-1]


async def read_stats(store: Store, keys: MeshKeys, service: str) -> dict[str, dict[str, Sample]]:
    """process -> subset ("" = whole service) -> counters, as published now."""
    return (await read_stats_at(store, keys, service))[0]


async def read_stats_at(
    store: Store, keys: MeshKeys, service: str
) -> tuple[dict[str, dict[str, Sample]], dict[str, float]]:
    """`read_stats`, and when each process published (wall-clock seconds)."""
    kvs, _ = await store.get_prefix(keys.stats_of(service))
    out: dict[str, dict[str, Sample]] = {}
    times: dict[str, float] = {}
    for kv in kvs:
        process = kv.key.rsplit("/", 1)[-1]
        try:
            doc = json.loads(kv.value)
            out[process] = {subset: Sample.from_json(v) for subset, v in doc.get("backends", {}).items()}
            times[process] = float(doc.get("at", 0.0))
        except (ValueError, TypeError, AttributeError):
            log.warning("ignoring malformed stats at %s", kv.key)
    return out, times


def delta(
    before: Mapping[str, Mapping[str, Sample]], after: Mapping[str, Mapping[str, Sample]]
) -> dict[str, Sample]:
    """subset -> what every process counted between two readings, summed.

    A process missing from `before` is left out: its counters may hold calls from long
    before (it had not published yet), and counting them would blame this interval.
    """
    total: dict[str, Sample] = {}
    for process, subsets in after.items():
        earlier_subsets = before.get(process)
        if earlier_subsets is None:
            continue
        for subset, sample in subsets.items():
            earlier = earlier_subsets.get(subset)
            change = sample.minus(earlier) if earlier is not None else sample
            total.setdefault(subset, Sample()).add(change)
    return total


# ---------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------


class StatsPublisher:
    """Writes this process's counters to etcd once a second while they change (one per mesh)."""

    INTERVAL = 1.0
    TTL = 15
    _running: dict[tuple[int, str], StatsPublisher] = {}

    def __init__(self, store: Store, keys: MeshKeys) -> None:
        self.store, self.keys = store, keys
        self.users = 0
        self._task: asyncio.Task[None] | None = None
        self._lease = 0
        self._keeper: LeaseKeeper | None = None
        self._published: dict[str, str] = {}

    @classmethod
    def acquire(cls, store: Store, keys: MeshKeys) -> StatsPublisher:
        """The publisher of this store and mesh, started on first use (call `release` when done)."""
        key = (id(store), keys.prefix)
        publisher = cls._running.get(key)
        if publisher is None:
            publisher = cls._running[key] = cls(store, keys)
            publisher._task = asyncio.get_running_loop().create_task(publisher._run(), name="gmesh-stats")
        publisher.users += 1
        return publisher

    async def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        self._running.pop((id(self.store), self.keys.prefix), None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._keeper is not None:
            await self._keeper.stop()
        if self._lease:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self._lease, timeout=1.0)

    def _lost(self) -> None:
        self._lease = 0
        self._published.clear()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL)
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down: counters keep counting; publish later
                log.debug("publishing stats failed: %s", exc)

    async def publish(self) -> None:
        by_service: dict[str, dict[str, Any]] = {}
        for (service, subset), stats in list(REGISTRY.items()):
            by_service.setdefault(service, {})[subset] = stats.to_json()
        for service, backends in by_service.items():
            body = json.dumps({"process": PROCESS, "at": time.time(), "backends": backends}, sort_keys=True)
            unchanged = body.partition('"backends"')[2]
            if self._published.get(service) == unchanged:
                continue
            if not self._lease:
                self._lease = await self.store.grant_lease(self.TTL)
                if self._keeper is not None:
                    await self._keeper.stop()
                self._keeper = self.store.keep_alive(self._lease, self.TTL, self._lost)
            await self.store.put(self.keys.stats(service, PROCESS), body.encode(), lease=self._lease)
            self._published[service] = unchanged


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [StatsFactory()]
