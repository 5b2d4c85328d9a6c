"""Per-backend call counters of one mesh in this process (calls, failures, latency histogram),
and reading them back from etcd: sums and differences across processes, error rates, quantiles.

The ATTEMPT-phase stats filter counts every attempt against the backend `(service,
subset)` it went to, below retries, so a release failing every tenth call counts as
failing even when retries hide it from callers. `StatsPublisher` writes the counters to
etcd; canary rollouts compare the canary's with the baseline's from there.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store

log = logging.getLogger(__name__)

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


class StatsRegistry:
    """(service, subset or "") -> counters, for one mesh in this process."""

    def __init__(self) -> None:
        self.backends: dict[tuple[str, str], BackendStats] = {}

    def of(self, service: str, subset: str | None) -> BackendStats:
        key = (service, subset or "")
        stats = self.backends.get(key)
        if stats is None:
            stats = self.backends[key] = BackendStats()
        return stats

    def by_service(self) -> dict[str, dict[str, dict[str, Any]]]:
        """service -> subset ("" = whole service) -> counters as JSON, for publishing."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (service, subset), stats in list(self.backends.items()):
            out.setdefault(service, {})[subset] = stats.to_json()
        return out


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
