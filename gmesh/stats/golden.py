"""Golden signals of the whole mesh, read back from what every proxy and channel publishes: calls,
success rate, requests per second and latency quantiles per service, route rule, backend and
method, over a window (`gmesh stat`, `gmesh top`).

Each process publishes cumulative counters (`gmesh.stats.publish`); a window is the difference
between two readings, summed over processes. A process that first published inside the window
is left out (its counters may hold calls from before it), one that restarted counts from zero.
Quantiles are interpolated inside the histogram bucket that holds them, as Prometheus'
`histogram_quantile` does.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gmesh.errors import SERVER_ERRORS
from gmesh.stats.metrics import BOUNDS

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store

log = logging.getLogger(__name__)

_FAILURES = frozenset(code.name for code in SERVER_ERRORS)

#: (service, door, route, backend, method, caller): caller is the `Caller.source` of the calls
#: ("" from processes that published before it existed)
RowKey = tuple[str, str, str, str, str, str]


@dataclass
class Signals:
    """Calls of one group over a window: by code, and their duration histogram."""

    codes: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    sum: float = 0.0

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def failures(self) -> int:
        return sum(n for code, n in self.codes.items() if code in _FAILURES)

    @property
    def success_rate(self) -> float | None:
        """Share of calls the server side did not fail (None without calls)."""
        calls = self.calls
        return None if not calls else (calls - self.failures) / calls

    def quantile(self, q: float) -> float | None:
        """The q-quantile of durations in seconds, interpolated in its bucket (None without calls)."""
        total = sum(self.buckets)
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                lower = BOUNDS[i - 1] if i > 0 else 0.0
                if i >= len(BOUNDS):
                    return BOUNDS[-1]  # above the last bound: all we know
                return lower + (BOUNDS[i] - lower) * ((rank - seen) / n)
            seen += n
        return BOUNDS[-1]

    def add(self, other: Signals, sign: int = 1) -> None:
        for code, n in other.codes.items():
            self.codes[code] = self.codes.get(code, 0) + sign * n
        self.buckets = [a + sign * b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.sum += sign * other.sum

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Signals:
        """One published row (ValueError when a count is not a count: anyone may write etcd)."""
        buckets = [0] * (len(BOUNDS) + 1)
        for i, n in dict(row.get("buckets", {})).items():
            if 0 <= int(i) < len(buckets):
                buckets[int(i)] = _count(n)
        codes = {str(k): _count(v) for k, v in dict(row.get("codes", {})).items()}
        total = float(row.get("sum", 0.0))
        if not math.isfinite(total):
            raise ValueError(f"sum {total}")
        return cls(codes, buckets, total)


#: no process counts more calls than this (2**53: exact as a float)
MAX_COUNT = 1 << 53


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"not a count: {value!r:.40}")
    return value


#: process -> row key -> cumulative signals
Reading = dict[str, dict[RowKey, Signals]]


async def read_calls(store: Store, keys: MeshKeys, service: str | None = None) -> Reading:
    """Every process's published golden-signal counters now (of one service, or all)."""
    prefix = keys.stats_of(service) if service else keys.stats_root
    kvs, _ = await store.get_prefix(prefix)
    reading: Reading = {}
    for kv in kvs:
        rest = kv.key[len(keys.stats_root) :]
        name, _, process = rest.partition("/")
        try:
            reading.setdefault(process, {}).update(parse_rows(name, json.loads(kv.value)))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("ignoring malformed stats at %s", kv.key)
    return reading


def parse_rows(service: str, doc: Mapping[str, Any]) -> dict[RowKey, Signals]:
    """The golden-signal rows of one published document (ValueError, TypeError, KeyError or
    AttributeError when it is malformed)."""
    found: dict[RowKey, Signals] = {}
    for row in doc.get("calls", []):
        key = (
            service,
            str(row["door"]),
            str(row["route"]),
            str(row["backend"]),
            str(row["method"]),
            str(row.get("caller", "")),
        )
        found[key] = Signals.from_row(row)
    return found


def window(before: Reading, after: Reading) -> dict[RowKey, Signals]:
    """What every process counted between two readings, per row."""
    out: dict[RowKey, Signals] = {}
    for process, rows in after.items():
        earlier = before.get(process)
        if earlier is None:
            continue  # first published within the window: its counters may hold older calls
        for key, signals in rows.items():
            change = Signals()
            change.add(signals)
            before_row = earlier.get(key)
            # counters that went down started again from zero (a restart, or a service forgotten
            # and called again): what they hold now all happened since
            if before_row is not None and signals.calls >= before_row.calls:
                change.add(before_row, -1)
            if change.calls:
                out.setdefault(key, Signals()).add(change)
    return out


def group(
    rows: Mapping[RowKey, Signals], by: Callable[[RowKey], tuple[str, ...]]
) -> dict[tuple[str, ...], Signals]:
    """Rows summed by `by(key)`."""
    out: dict[tuple[str, ...], Signals] = {}
    for key, signals in rows.items():
        out.setdefault(by(key), Signals()).add(signals)
    return out


def summary(signals: Signals, seconds: float) -> dict[str, Any]:
    """The golden signals of one group as JSON-ready numbers (latencies in ms)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    rate = signals.success_rate
    return {
        "calls": signals.calls,
        "failures": signals.failures,
        "successRate": None if rate is None else round(rate, 6),
        "rps": round(signals.calls / seconds, 3) if seconds > 0 else None,
        "p50Ms": ms(signals.quantile(0.50)),
        "p95Ms": ms(signals.quantile(0.95)),
        "p99Ms": ms(signals.quantile(0.99)),
        "codes": dict(sorted(signals.codes.items())),
    }


def format_ms(value: float | None) -> str:
    """Milliseconds, readable: 12.3ms, 850µs ("-": nothing measured)."""
    return "-" if value is None else f"{value:.1f}ms" if value >= 1 else f"{value * 1000:.0f}µs"


def format_percent(value: float | None) -> str:
    """A share as a percentage: 99.95% ("-": nothing measured)."""
    return "-" if value is None else f"{value * 100:.2f}%"


def services_of(rows: Iterable[RowKey]) -> list[str]:
    return sorted({key[0] for key in rows})
