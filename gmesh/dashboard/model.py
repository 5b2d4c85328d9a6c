"""What the dashboard shows, kept current: the catalog (config and endpoints, watched) and, once a
second, one read each of what every process publishes (golden signals, endpoint views, process
records, proxy records, rollout states).

The dashboard never calls a proxy or a channel process: everything comes from etcd, where they
publish anyway. Its cost is one catalog watch plus four range reads a second for the whole
dashboard, however many pages are open (each open page is one server-sent-event stream fed from
this model).

Rates are measured per process from the counters it published and the time it published them
(`at`), over the last `WINDOW` seconds: a process publishes once a second while its counters
change and not at all while idle, so the end of its window is its last publish while it still
publishes, else now (no publish = no call).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gmesh.config.kinds import KindRegistry
from gmesh.discovery.catalog import Catalog, MeshSnapshot
from gmesh.discovery.keys import MeshKeys
from gmesh.errors import StoreUnavailable
from gmesh.rollout.controller import RolloutState
from gmesh.stats import golden
from gmesh.stats.golden import RowKey, Signals
from gmesh.store.etcd import Compacted, KeyValue, Store

log = logging.getLogger(__name__)

#: seconds of counters a rate is measured over
WINDOW = 10.0
#: how often the published counters are read
POLL = 1.0
#: a process that published within this many seconds may still be counting (it publishes every
#: second while its counters change): its window ends at its last publish, not now
ACTIVE = 2.5
#: points of a rollout's canary/baseline trend (one per poll: five minutes)
TREND_POINTS = 300
#: a process whose revision is behind the catalog's for longer than this is "behind"
BEHIND_AFTER = 3.0
#: versions of one resource shown on the config page
HISTORY = 20

UNKNOWN = "(unknown caller)"


@dataclass
class Sample:
    """One published document of one process for one service."""

    at: float
    rows: dict[RowKey, Signals]
    #: address -> (attempts, failures)
    attempts: dict[str, tuple[int, int]]
    #: this process's view of each endpoint (as published)
    endpoints: list[dict[str, Any]]


@dataclass
class Rate:
    """Calls of one group over the window, and their rate (summed over processes)."""

    signals: Signals = field(default_factory=Signals)
    rps: float = 0.0

    def add(self, signals: Signals, seconds: float) -> None:
        self.signals.add(signals)
        self.rps += signals.calls / seconds

    def merge(self, other: Rate) -> None:
        self.signals.add(other.signals)
        self.rps += other.rps

    def summary(self) -> dict[str, Any]:
        s = self.signals
        p99 = s.quantile(0.99)
        rate = s.success_rate
        return {
            "calls": s.calls,
            "rps": round(self.rps, 2),
            "successRate": None if rate is None else round(rate, 5),
            "p99Ms": None if p99 is None else round(p99 * 1000, 2),
        }


@dataclass
class EndpointView:
    """One endpoint as every process calling it sees it, combined."""

    address: str
    inflight: int = 0
    ewma_ms: float = 0.0
    healthy: bool = True
    ejected: bool = False
    down: bool = False
    seen_by: int = 0
    attempts: int = 0
    failures: int = 0

    @property
    def state(self) -> str:
        if not self.seen_by:
            return "not called"
        if self.down:
            return "unreachable"
        if self.ejected:
            return "ejected"
        if not self.healthy:
            return "unhealthy"
        return "healthy"

    @property
    def success_rate(self) -> float | None:
        return None if not self.attempts else (self.attempts - self.failures) / self.attempts


def _series_window(series: deque[Sample], now: float) -> tuple[Sample, Sample, float] | None:
    """(start, end, seconds) of a process's window, or None when it has nothing to measure."""
    if len(series) < 2:
        return None
    end = series[-1]
    until = end.at if now - end.at <= ACTIVE else now
    start = series[0]
    for sample in series:
        if sample.at <= until - WINDOW:
            start = sample
        else:
            break
    if start is end:
        return None
    seconds = until - start.at
    return (start, end, seconds) if seconds >= 0.5 else None


def _changed(after: Signals, before: Signals | None) -> Signals:
    change = Signals()
    change.add(after)
    if before is not None and after.calls >= before.calls:
        change.add(before, -1)  # counters that went down started again from zero
    return change


def _parse(service: str, doc: Mapping[str, Any]) -> Sample:
    rows = golden.parse_rows(service, doc)
    endpoints = [dict(e) for e in doc.get("endpoints", []) if isinstance(e, Mapping)]
    attempts = {
        str(e.get("address", "")): (int(e.get("attempts", 0)), int(e.get("failures", 0))) for e in endpoints
    }
    return Sample(float(doc.get("at", 0.0)), rows, attempts, endpoints)


class MeshView:
    """The dashboard's model of one mesh. `version` goes up after every change; `wait()`
    returns after the next one."""

    def __init__(self, store: Store, keys: MeshKeys, kinds: KindRegistry) -> None:
        self.store, self.keys, self.kinds = store, keys, kinds
        self.catalog = Catalog(store, keys, kinds)
        self.version = 0
        self._changed = asyncio.Event()
        #: (service, process) -> published samples, oldest first
        self.series: dict[tuple[str, str], deque[Sample]] = {}
        #: process -> its record (processes/); proxy id -> its record (proxies/)
        self.processes: dict[str, dict[str, Any]] = {}
        self.proxies: dict[str, dict[str, Any]] = {}
        self.rollouts: dict[str, RolloutState] = {}
        #: service -> (wall time, {"canary": summary, "baseline": summary}) per poll while a rollout runs
        self.trends: dict[str, deque[tuple[float, dict[str, Any]]]] = {}
        #: computed each poll
        self.rows: dict[RowKey, Rate] = {}
        self.endpoint_views: dict[str, dict[str, EndpointView]] = {}
        #: process -> since when its revision is behind the catalog's
        self._behind_since: dict[str, float] = {}
        #: "" while etcd answers; else what failed, and since when (wall time)
        self.error = ""
        self.error_since = 0.0
        self.read_at = 0.0
        self.notice = ("", 0.0)
        self._history: dict[tuple[str, str, int], tuple[list[KeyValue], bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: etcd reads made by the poll loop (the bench and tests)
        self.reads = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._unsubscribe = self.catalog.subscribe(lambda _snapshot: self._bump())
        await self.catalog.start(wait=5.0)
        await self.poll()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gmesh-dashboard-poll")

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.catalog.close()

    @property
    def snapshot(self) -> MeshSnapshot:
        return self.catalog.snapshot

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, version: int, timeout: float) -> None:
        """Return once `version` is out of date, or after `timeout` seconds."""
        if self.version != version:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad read end the dashboard
                log.exception("dashboard poll failed")

    # -- reading -----------------------------------------------------------------------------

    async def poll(self) -> None:
        """Read what every process published, and recompute."""
        keys = self.keys
        try:
            stats, processes, proxies, rollouts = await asyncio.gather(
                self.store.get_prefix(keys.stats_root),
                self.store.get_prefix(keys.processes_root),
                self.store.get_prefix(keys.proxies_root),
                self.store.get_prefix(keys.rollouts_root),
            )
        except StoreUnavailable as exc:
            if not self.error:
                self.error_since = time.time()
            self.error = str(exc)
            self._bump()
            return
        self.reads += 4
        self.error = ""
        now = time.time()
        self.read_at = now
        self._take_stats(stats[0], now)
        self.processes = _records(processes[0], "process")
        self.proxies = _records(proxies[0], "id")
        states: dict[str, RolloutState] = {}
        for kv in rollouts[0]:
            try:
                state = RolloutState.from_json(kv.value)
                states[state.service] = state
            except (ValueError, TypeError, KeyError):
                log.warning("ignoring malformed rollout state at %s", kv.key)
        self.rollouts = states
        self._compute(now)
        self._bump()

    def _take_stats(self, kvs: Iterable[KeyValue], now: float) -> None:
        seen: set[tuple[str, str]] = set()
        root = self.keys.stats_root
        for kv in kvs:
            service, _, process = kv.key[len(root) :].partition("/")
            key = (service, process)
            seen.add(key)
            series = self.series.get(key)
            try:
                doc = json.loads(kv.value)
                at = float(doc.get("at", 0.0))
                if series is not None and series and series[-1].at >= at:
                    continue  # nothing new from it
                sample = _parse(service, doc)
            except (ValueError, TypeError, KeyError, AttributeError):
                log.warning("ignoring malformed stats at %s", kv.key)
                continue
            if series is None:
                series = self.series[key] = deque()
            series.append(sample)
            # keep one sample older than the window (its start) and what is inside it
            while len(series) > 2 and series[1].at <= now - WINDOW - ACTIVE:
                series.popleft()
        for key in list(self.series):
            if key not in seen:  # the process is gone (its lease went with it)
                del self.series[key]

    def _compute(self, now: float) -> None:
        rows: dict[RowKey, Rate] = {}
        views: dict[str, dict[str, EndpointView]] = {}
        for (service, _process), series in self.series.items():
            mine = views.setdefault(service, {})
            latest = series[-1]
            if now - latest.at <= 60:  # a process idle for long says nothing current about them
                for e in latest.endpoints:
                    address = str(e.get("address", ""))
                    view = mine.get(address) or mine.setdefault(address, EndpointView(address))
                    view.seen_by += 1
                    view.inflight += int(e.get("inflight", 0))
                    view.ewma_ms = max(view.ewma_ms, float(e.get("ewmaMs", 0.0)))
                    view.healthy = view.healthy and bool(e.get("healthy", True))
                    view.ejected = view.ejected or bool(e.get("ejected", False))
                    view.down = view.down or bool(e.get("down", False))
            found = _series_window(series, now)
            if found is None:
                continue
            start, end, seconds = found
            for key, signals in end.rows.items():
                change = _changed(signals, start.rows.get(key))
                if change.calls:
                    rows.setdefault(key, Rate()).add(change, seconds)
            for address, (attempts, failures) in end.attempts.items():
                before = start.attempts.get(address, (0, 0))
                if attempts >= before[0]:
                    attempts, failures = attempts - before[0], failures - before[1]
                view = mine.get(address) or mine.setdefault(address, EndpointView(address))
                view.attempts += attempts
                view.failures += failures
        self.rows = rows
        self.endpoint_views = views
        for service, state in self.rollouts.items():
            trend = self.trends.get(service)
            if state.phase not in ("running", "abort-requested"):
                continue
            if trend is None or (trend and trend[-1][1].get("started") != state.started_at):
                trend = self.trends[service] = deque(maxlen=TREND_POINTS)
            point: dict[str, Any] = {"started": state.started_at, "weight": state.weight}
            for role, subset in (("canary", state.canary), ("baseline", state.baseline)):
                backend = f"{service}/{subset}"
                rate = Rate()
                for key, r in rows.items():
                    if key[0] == service and key[3] == backend:
                        rate.merge(r)
                point[role] = rate.summary()
            trend.append((now, point))
        revision = self.snapshot.revision
        for process, record in self.processes.items():
            if int(record.get("revision", 0)) < revision:
                self._behind_since.setdefault(process, now)
            else:
                self._behind_since.pop(process, None)
        for process in list(self._behind_since):
            if process not in self.processes:
                del self._behind_since[process]

    # -- questions pages ask ----------------------------------------------------------------

    def behind(self, process: str, now: float | None = None) -> bool:
        since = self._behind_since.get(process)
        return since is not None and (now or time.time()) - since > BEHIND_AFTER

    def services(self) -> list[str]:
        """Every service the mesh knows: configured, registered, or called."""
        names = set(self.snapshot.services())
        names.update(key[0] for key in self.rows)
        return sorted(names)

    def edges(self) -> dict[tuple[str, str], Rate]:
        """(caller, service) -> calls over the window."""
        out: dict[tuple[str, str], Rate] = {}
        for key, rate in self.rows.items():
            out.setdefault((key[5] or UNKNOWN, key[0]), Rate()).merge(rate)
        return out

    def grouped(self, service: str, index: int) -> dict[str, Rate]:
        """The calls to `service` grouped by one part of the row key (4: method, 3: backend...)."""
        out: dict[str, Rate] = {}
        for key, rate in self.rows.items():
            if key[0] == service:
                out.setdefault(key[index], Rate()).merge(rate)
        return out

    def total(self, service: str) -> Rate:
        out = Rate()
        for key, rate in self.rows.items():
            if key[0] == service:
                out.merge(rate)
        return out

    def attached(self, service: str) -> list[Any]:
        """Every config resource that names `service` in its spec (Route, limits, policies...)."""
        out = []
        for kind, by_name in sorted(self.snapshot.resources.items()):
            if kind == "Service":
                continue
            for _, resource in sorted(by_name.items()):
                if getattr(resource.spec, "service", None) == service:
                    out.append(resource)
        return out

    async def history(self, kind: str, name: str) -> tuple[list[KeyValue], bool]:
        """The stored versions of one resource, newest first (cached per current revision)."""
        key = self.keys.config(kind, name)
        current = self.snapshot.resource(kind, name)
        revision = current.revision if current is not None else 0
        cached = self._history.get((kind, name, revision))
        if cached is not None and revision:
            return cached
        try:
            found = await self.store.history(key, HISTORY)
        except Compacted:
            found = ([], True)
        if len(self._history) > 256:
            self._history.clear()
        self._history[(kind, name, revision)] = found
        return found


def _records(kvs: Iterable[KeyValue], id_field: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kv in kvs:
        try:
            doc = json.loads(kv.value)
            if isinstance(doc, dict):
                out[str(doc.get(id_field) or kv.key.rsplit("/", 1)[-1])] = doc
        except ValueError:
            log.warning("ignoring malformed record at %s", kv.key)
    return out
