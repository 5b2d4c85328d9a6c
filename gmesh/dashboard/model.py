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
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gmesh.config.kinds import KindRegistry
from gmesh.discovery.catalog import Catalog, EndpointTable, MeshSnapshot
from gmesh.discovery.keys import MeshKeys
from gmesh.errors import StoreUnavailable
from gmesh.rollout.controller import RolloutState
from gmesh.stats import golden
from gmesh.stats.golden import RowKey, Signals
from gmesh.stats.publish import ENDPOINT_VIEWS
from gmesh.store.etcd import Compacted, KeyValue, Store

log = logging.getLogger(__name__)

#: seconds of counters a rate is measured over
WINDOW = 10.0
#: how often the published counters are read
POLL = 1.0
#: a process that published within this many seconds may still be counting (it publishes every
#: second while its counters change): its window ends at its last publish, not now
ACTIVE = 2.5
#: a process publishes within this long of any change to its counters (its 1 s tick): for
#: publishers that do not say `since`
PUBLISH_LAG = 1.0
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

    #: when the process published it (its clock), when the dashboard first read it (ours), and when
    #: etcd last held the process's previous counters (its clock; None from older publishers)
    at: float
    seen: float
    rows: dict[RowKey, Signals]
    #: address -> (attempts, failures)
    attempts: dict[str, tuple[int, int]]
    #: this process's view of each endpoint (as published)
    endpoints: list[dict[str, Any]]
    since: float | None = None
    #: the etcd revision of the document (a new one is a new revision, whatever its clock says)
    revision: int = 0
    #: the process's first document for the service: its counters were zero at `since`
    first: bool = False


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
    """(start, end, seconds) of a process's window, or None when it has nothing to measure.

    Times are the publisher's (`at`), except how long it has been quiet, which is measured on the
    dashboard's clock (`seen`): machines' clocks differ. The window ends at the last publish while
    the process may still be counting, else now (no publish since: no call since). It starts at
    the last publish at least WINDOW before its end — or, when the next publish came more than a
    window later (a quiet spell), where etcd last held the counters before that publish (`since`:
    the process's previous tick), so a caller that resumes shows its rate at once, not a tenth."""
    if len(series) < 2:
        return None
    end = series[-1]
    quiet = now - end.seen
    until = end.at + (quiet if quiet > ACTIVE else 0.0)
    first = 0
    for i, sample in enumerate(series):
        if sample.at <= until - WINDOW:
            first = i
        else:
            break
    start = series[first]
    if start is end:
        return None
    following = series[first + 1]
    begins = start.at
    if following.at - start.at > WINDOW:  # quiet for longer than the window: calling resumed lately
        begins = following.since if following.since is not None else following.at - PUBLISH_LAG
        begins = max(begins, start.at)
    seconds = until - begins
    return (start, end, seconds) if seconds >= 0.5 else None


def _changed(after: Signals, before: Signals | None) -> Signals:
    change = Signals()
    change.add(after)
    if before is not None and after.calls >= before.calls:
        change.add(before, -1)  # counters that went down started again from zero
    return change


#: the largest magnitude a number from etcd may have here (beyond: bad data)
MAX_NUMBER = 1e15


def _num(value: Any, default: float = 0.0) -> float:
    """A number from a published document, whatever was written there (bad data: `default`)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    try:
        number = float(value)
    except OverflowError:
        return default
    return number if math.isfinite(number) and abs(number) <= MAX_NUMBER else default


def _parse(service: str, doc: Mapping[str, Any], seen: float, revision: int = 0) -> Sample:
    """One published document, its endpoint views reduced to the fields shown, with their types
    (a record with wrong types counts as zeros and healthy: it cannot break a page)."""
    rows = golden.parse_rows(service, doc)
    raw = doc.get("endpoints", [])
    endpoints: list[dict[str, Any]] = [
        {
            "address": str(e.get("address", "")),
            "inflight": int(_num(e.get("inflight"))),
            "ewmaMs": _num(e.get("ewmaMs")),
            "attempts": int(_num(e.get("attempts"))),
            "failures": int(_num(e.get("failures"))),
            "healthy": e.get("healthy") is not False,
            "ejected": e.get("ejected") is True,
            "down": e.get("down") is True,
        }
        for e in (raw if isinstance(raw, list) else [])
        if isinstance(e, Mapping)
    ]
    attempts = {e["address"]: (e["attempts"], e["failures"]) for e in endpoints}
    at = _num(doc.get("at"), -1.0)
    if at < 0:
        raise ValueError("no publish time")
    since = _num(doc.get("since"), -1.0)
    known = since if 0 <= since <= at else None
    return Sample(at, seen, rows, attempts, endpoints, known, revision, doc.get("first") is True)


def _rollout(raw: bytes) -> RolloutState:
    """A stored rollout state, its fields checked (ValueError when one has the wrong type)."""
    state = RolloutState.from_json(raw)
    steps = state.steps
    ints = isinstance(steps, list) and steps and all(type(s) is int and 0 < s <= 100 for s in steps)
    texts = (state.service, state.baseline, state.canary, state.phase, state.reason, state.controller)
    t = state.thresholds
    numbers = (state.interval, state.started_at, t.max_error_rate)

    def number(x: Any) -> bool:
        return _num(x, math.nan) == _num(x, 0.0)  # a finite, bounded number

    if (
        not ints
        or type(state.step) is not int
        or not 0 <= state.step <= MAX_NUMBER
        or not all(isinstance(x, str) for x in texts)
        or not isinstance(state.history, list)
        or not all(isinstance(x, str) for x in state.history)
        or not isinstance(state.measured, dict)
        or not all(number(x) for x in numbers)
        or type(t.min_calls) is not int
        or not (t.max_latency_p99 is None or number(t.max_latency_p99))
    ):
        raise ValueError("a field has the wrong type")
    return state


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
        self.totals: dict[str, Rate] = {}
        self._latest: tuple[MeshSnapshot | None, int] = (None, 0)
        self.endpoint_views: dict[str, dict[str, EndpointView]] = {}
        #: (when the dashboard saw it, revision) of the newest config or endpoint change, recent ones
        self._changes: deque[tuple[float, int]] = deque()
        #: service -> (when read, live state of its global limits and quotas)
        self._limit_state: dict[str, tuple[float, dict[str, Any]]] = {}
        #: "" while etcd answers; else what failed, and since when (wall time)
        self.error = ""
        self.error_since = 0.0
        self.read_at = 0.0
        self.notice = ("", 0.0)
        self._history: dict[tuple[str, str, int], tuple[float, tuple[list[KeyValue], bool]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: etcd reads made by the poll loop (the bench and tests)
        self.reads = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._unsubscribe = self.catalog.subscribe(lambda _snapshot: self._bump())
        await self.catalog.start(wait=5.0)
        try:
            await self.poll()
        except Exception:  # bad data must not keep the dashboard from starting
            log.exception("dashboard poll failed")
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

    def touch(self) -> None:
        """Something pages show changed outside the model (a notice): render them again."""
        self._bump()

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
        try:
            self._take_stats(stats[0], now)
            self.processes = _records(processes[0], "process")
            self.proxies = _records(proxies[0], "id")
            states: dict[str, RolloutState] = {}
            for kv in rollouts[0]:
                try:
                    state = _rollout(kv.value)
                    states[state.service] = state
                except Exception:  # wrong types, huge numbers, deep nesting: skip it
                    log.warning("ignoring malformed rollout state at %s", kv.key)
            self.rollouts = states
            self._compute(now)
        finally:
            self._bump()  # whatever happened, pages show the time and the error state

    def _take_stats(self, kvs: Iterable[KeyValue], now: float) -> None:
        seen: set[tuple[str, str]] = set()
        root = self.keys.stats_root
        for kv in kvs:
            service, _, process = kv.key[len(root) :].partition("/")
            key = (service, process)
            seen.add(key)
            series = self.series.get(key)
            if series and series[-1].revision == kv.mod_revision:
                continue  # nothing new from it
            try:
                sample = _parse(service, json.loads(kv.value), now, kv.mod_revision)
            except Exception:  # anything at all (wrong types, huge numbers, deep nesting): skip it
                log.warning("ignoring malformed stats at %s", kv.key)
                continue
            if series is None or (series and sample.at <= series[-1].at):
                series = self.series[key] = deque()  # new, or its clock went back: start again
                if sample.first and sample.since is not None and sample.since < sample.at:
                    # its first document: nothing was counted at `since` (a burst shows at once)
                    zero = Sample(sample.since, sample.seen - (sample.at - sample.since), {}, {}, [])
                    series.append(zero)
            series.append(sample)
            # keep one sample older than the window (its start) and what is inside it
            while len(series) > 2 and series[1].seen <= now - WINDOW - 2 * ACTIVE:
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
            if now - latest.seen <= 60:  # a process idle for long says nothing current about them
                for e in latest.endpoints:
                    address = e["address"]
                    view = mine.get(address) or mine.setdefault(address, EndpointView(address))
                    view.seen_by += 1
                    view.inflight += e["inflight"]
                    view.ewma_ms = max(view.ewma_ms, e["ewmaMs"])
                    view.healthy = view.healthy and e["healthy"]
                    view.ejected = view.ejected or e["ejected"]
                    view.down = view.down or e["down"]
            found = _series_window(series, now)
            if found is None:
                continue
            start, end, seconds = found
            for key, signals in end.rows.items():
                change = _changed(signals, start.rows.get(key))
                if change.calls:
                    rows.setdefault(key, Rate()).add(change, seconds)
            capped = len(start.endpoints) >= ENDPOINT_VIEWS
            for address, (attempts, failures) in end.attempts.items():
                before = start.attempts.get(address)
                if before is None:
                    if capped:  # left out of that publish, not new: its counts are not all recent
                        continue
                    before = (0, 0)
                if attempts >= before[0]:
                    attempts, failures = attempts - before[0], failures - before[1]
                view = mine.get(address) or mine.setdefault(address, EndpointView(address))
                view.attempts += attempts
                view.failures += failures
        self.rows = rows
        self.endpoint_views = views
        totals: dict[str, Rate] = {}
        for key, rate in rows.items():
            totals.setdefault(key[0], Rate()).merge(rate)
        self.totals = totals
        for service in [s for s in self.trends if s not in self.rollouts]:
            del self.trends[service]  # its state was deleted
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
        newest = self.latest_change()
        changes = self._changes
        if not changes or changes[-1][1] != newest:
            changes.append((now, newest))
        while len(changes) > 1 and changes[1][0] <= now - BEHIND_AFTER:
            changes.popleft()  # the oldest one still needed: the newest at least BEHIND_AFTER old

    # -- questions pages ask ----------------------------------------------------------------

    def behind(self, process: str, now: float | None = None) -> bool:
        """Whether `process` misses a change the dashboard has known for BEHIND_AFTER seconds (a
        process records its revision at most once a second: a fresh change is not missed yet)."""
        record = self.processes.get(process)
        if record is None:
            return False
        now = time.time() if now is None else now
        known = [revision for seen, revision in self._changes if seen <= now - BEHIND_AFTER]
        return bool(known) and record["revision"] < known[-1]

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
        return self.totals.get(service) or Rate()

    def latest_change(self) -> int:
        """The etcd revision of the newest config resource or endpoint record the catalog holds: a
        process serving a snapshot at least this recent has every change (a snapshot's own revision
        may be etcd's revision at a read, higher than any change: not comparable across processes)."""
        snapshot = self.snapshot
        if self._latest[0] is not snapshot:
            latest = 0
            for by_name in snapshot.resources.values():
                for resource in by_name.values():
                    latest = max(latest, resource.revision)
            table = snapshot.endpoints
            for service in list(table):
                members = table.members(service) if isinstance(table, EndpointTable) else None
                if members is not None:  # the stored records: no need to parse them
                    latest = max([latest, *(kv.mod_revision for kv in members.kvs)])
                else:
                    latest = max([latest, *(ep.revision for ep in snapshot.endpoints_of(service))])
            self._latest = (snapshot, latest)
        return self._latest[1]

    async def limit_state(self, service: str) -> dict[str, Any]:
        """What etcd says now of `service`'s global rate limits (each process's demand and share)
        and quotas (tokens taken per key in the current window, the most used first), by resource
        name. Read only for a service whose page is open, at most once a second."""
        cached = self._limit_state.get(service)
        if cached is not None and time.monotonic() - cached[0] < POLL:
            return cached[1]
        from urllib.parse import unquote

        from gmesh.ratelimit.quota import window_of
        from gmesh.ratelimit.shares import HEADROOM, max_min_shares

        out: dict[str, Any] = {}
        now = time.time()
        for resource in self.attached(service):
            spec: Any = resource.spec
            if resource.kind == "RateLimit" and getattr(spec, "scope", "") == "global":
                kvs, _ = await self.store.get_prefix(f"{self.keys.limits_root}{resource.name}/")
                demands: dict[str, float] = {}
                for kv in kvs:
                    try:
                        demands[unquote(kv.key.rsplit("/", 1)[1])] = _num(json.loads(kv.value)["demand"])
                    except Exception:
                        continue
                shares = max_min_shares(spec.rate, {p: d * HEADROOM for p, d in demands.items()})
                out[resource.ref] = {
                    "processes": [(p, demands[p], shares.get(p, 0.0)) for p in sorted(demands)][:20]
                }
            elif resource.kind == "Quota":
                window, ends = window_of(spec, now)
                prefix = self.keys.quota_window(resource.name, str(window))
                kvs, _ = await self.store.get_prefix(prefix)
                used = []
                for kv in kvs:
                    name = unquote(kv.key[len(prefix) :])
                    used.append(
                        (name[1:] if name.startswith("=") else "(all calls)", int(_num(_int_of(kv.value))))
                    )
                used.sort(key=lambda item: -item[1])
                out[resource.ref] = {
                    "limit": spec.limit,
                    "used": used[:10],
                    "keys": len(used),
                    "endsIn": ends - now,
                }
        if len(self._limit_state) > 64:
            self._limit_state.clear()
        self._limit_state[service] = (time.monotonic(), out)
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
        """The stored versions of one resource, newest first, and whether older ones exist (cached
        per current revision; one the catalog does not hold — deleted, refused — for 5 s)."""
        key = self.keys.config(kind, name)
        current = self.snapshot.resource(kind, name)
        revision = current.revision if current is not None else 0
        cached = self._history.get((kind, name, revision))
        if cached is not None and (revision or time.monotonic() - cached[0] < 5.0):
            return cached[1]
        try:
            found = await self.store.history(key, HISTORY)
        except Compacted:
            found = ([], True)
        if len(self._history) > 256:
            self._history.clear()
        self._history[(kind, name, revision)] = (time.monotonic(), found)
        return found


def _int_of(raw: bytes) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


def _records(kvs: Iterable[KeyValue], id_field: str) -> dict[str, dict[str, Any]]:
    """Process or proxy records, the fields pages use coerced to their types."""
    out: dict[str, dict[str, Any]] = {}
    for kv in kvs:
        try:
            doc = json.loads(kv.value)
        except Exception:  # not JSON, or nested too deep
            doc = None
        if not isinstance(doc, dict):
            log.warning("ignoring malformed record at %s", kv.key)
            continue
        services = doc.get("services")
        doc["services"] = [str(s) for s in services] if isinstance(services, list) else []
        doc["revision"] = int(_num(doc.get("revision")))
        doc["startedAt"] = _num(doc.get("startedAt"), time.time())
        out[str(doc.get(id_field) or kv.key.rsplit("/", 1)[-1])] = doc
    return out
