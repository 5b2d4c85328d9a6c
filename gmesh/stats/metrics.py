"""Golden metrics of one mesh in this process, and their Prometheus exposition.

The hot path only adds to plain integers: a call's filter finds its method's counters in a
dict it built when the service was compiled (`ServiceMetrics.method`), then its route
rule's and backend's cell, and bumps a code counter and a histogram bucket. Labels are
resolved once, when a cell is first made; nothing is formatted per call. Everything else
(retries, budget refusals, breaker rejections, ejections, per-endpoint load and health) is
already counted by the state the data path keeps, and is read only when Prometheus scrapes.

Cardinality stays per service: the `method` label takes only methods the service's
endpoints reported (reflection) or its Route names exactly; any other method is `other`,
so callers cannot mint series. Per-endpoint series live in their own `gmesh_endpoint_*`
families, and only for services this process calls.

`COLLECTOR` is the one `prometheus_client` collector of the process: it sums the metrics of
every mesh stack alive in it (usually one). Scrapes run on prometheus-client's HTTP thread
while the event loop counts: they copy what they read (`list(...)`), which the GIL makes
atomic, and never lock the hot path.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.chain.call import Door, Meter
from gmesh.stats.traces import SPANS

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.outbound.mesh import MeshState


#: `door` label values, indexed by `Call.door` (`gmesh.chain.call.Door`).
DOORS: tuple[str, ...] = tuple(door.name.lower() for door in Door)

#: Bucket upper bounds (seconds) of the duration histograms: gRFC A66's latency buckets.
BOUNDS: tuple[float, ...] = (
    0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006,
    0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16, 0.2,
    0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
)  # fmt: skip
_LE: tuple[str, ...] = (*(repr(b) for b in BOUNDS), "+Inf")

OK = grpc.StatusCode.OK
OTHER = "other"

_bisect = bisect.bisect_left


class Cell:
    """Counters of one label set: calls by status code, and a duration histogram.

    `ok` counts OK (the common case, one attribute add); other codes go to `codes`.
    `buckets[i]` counts durations in (BOUNDS[i-1], BOUNDS[i]] (the last: above every bound)."""

    __slots__ = ("buckets", "codes", "ok", "sum")

    def __init__(self) -> None:
        self.ok = 0
        self.codes: dict[grpc.StatusCode, int] = {}
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0

    def record(self, code: grpc.StatusCode, seconds: float) -> None:
        if code is OK:
            self.ok += 1
        else:
            self.codes[code] = self.codes.get(code, 0) + 1
        self.buckets[_bisect(BOUNDS, seconds)] += 1
        self.sum += seconds

    @property
    def calls(self) -> int:
        return self.ok + sum(self.codes.values())

    def by_code(self) -> list[tuple[str, int]]:
        out = [(code.name, n) for code, n in list(self.codes.items())]
        if self.ok:
            out.append(("OK", self.ok))
        return out

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Prometheus buckets (`le`, cumulative count) and the sum."""
        counts = list(self.buckets)
        running = 0
        out: list[tuple[str, float]] = []
        for le, n in zip(_LE, counts, strict=True):
            running += n
            out.append((le, running))
        return out, self.sum


#: A backend key as the route sets it: (service, subset or None); None = the whole service.
BackendKey = tuple[str, str | None] | None


def backend_label(service: str, key: BackendKey) -> str:
    """`orders` for the whole service, `orders/v2` for a subset (another service: its name)."""
    if key is None:
        return service
    target, subset = key
    return target if subset is None else f"{target}/{subset}"


class MethodMetrics(Meter):
    """Counters of one method of one service, for one door.

    `calls`: caller source (`Caller.source`) -> route rule name ("" without a Route) -> backend
    key -> Cell, once per call as the caller saw it. `attempts`: backend key -> Cell, once per
    attempt (retries show here).
    `sent`, `received` (a `Meter`): stream messages from the caller and back to it, added by
    the front doors as they pass."""

    __slots__ = ("attempts", "calls", "name")

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.calls: dict[str, dict[str, dict[BackendKey, Cell]]] = {}
        self.attempts: dict[BackendKey, Cell] = {}

    def call_cell(self, source: str, rule: str, backend: BackendKey) -> Cell:
        by_rule = self.calls.get(source)
        if by_rule is None:
            by_rule = self.calls[source] = {}
        by_backend = by_rule.get(rule)
        if by_backend is None:
            by_backend = by_rule[rule] = {}
        cell = by_backend.get(backend)
        if cell is None:
            cell = by_backend[backend] = Cell()
        return cell

    def cells(self) -> list[tuple[str, str, BackendKey, Cell]]:
        """(caller source, route rule, backend key, cell) of every call counted (a copy: scrapes
        read it on another thread)."""
        return [
            (source, rule, key, cell)
            for source, by_rule in list(self.calls.items())
            for rule, by_backend in list(by_rule.items())
            for key, cell in list(by_backend.items())
        ]

    def attempt_cell(self, backend: BackendKey) -> Cell:
        cell = self.attempts.get(backend)
        if cell is None:
            cell = self.attempts[backend] = Cell()
        return cell


class ServiceMetrics:
    """The counters of calls to one service in one mesh stack (both doors); kept across
    config changes. `known`: the method names that get a label of their own."""

    __slots__ = ("by_door", "in_flight", "known", "other", "service")

    def __init__(self, service: str) -> None:
        self.service = service
        self.known: frozenset[str] = frozenset()
        self.by_door: tuple[dict[str, MethodMetrics], ...] = tuple({} for _ in DOORS)
        self.other = tuple(MethodMetrics(OTHER) for _ in DOORS)
        self.in_flight = [0] * len(DOORS)

    def method(self, door: int, name: str) -> MethodMetrics:
        """The counters of method `name` through `door`: its own when known, else `other`
        (never remembered: a caller inventing names must not grow anything)."""
        found = self.by_door[door].get(name)
        if found is not None:
            return found
        if name not in self.known:
            return self.other[door]
        found = self.by_door[door][name] = MethodMetrics(name)
        return found


def known_methods(snapshot: MeshSnapshot, service: str, reflected: Iterable[str]) -> frozenset[str]:
    """Methods of `service` that may have a label of their own: what its endpoints reported
    through reflection, and the exact method matches of its Route."""
    names = set(reflected)
    route = snapshot.routes.get(service)
    if route is not None:
        for rule in getattr(route.spec, "rules", ()):
            match = getattr(rule, "match", None)
            method = getattr(match, "method", None) if match is not None else None
            if method is not None and method.exact:
                names.add(method.exact)
    return frozenset(names)


class MeshMetrics:
    """The golden metrics of one mesh stack: `ServiceMetrics` per service called, plus the
    mesh state read at scrape time. Counting happens on the event loop only."""

    def __init__(self, mesh: MeshState) -> None:
        self.services: dict[str, ServiceMetrics] = {}
        self._mesh = weakref.ref(mesh)
        COLLECTOR.add(self)

    def service(self, name: str) -> ServiceMetrics:
        found = self.services.get(name)
        if found is None:
            found = self.services[name] = ServiceMetrics(name)
        return found

    def published(self) -> dict[str, list[dict[str, Any]]]:
        """service -> one row per (caller, door, route rule, backend, method) counted so far:
        codes, sparse duration buckets and their sum — what `gmesh stat`, `gmesh top` and the
        dashboard read back."""
        out: dict[str, list[dict[str, Any]]] = {}
        for service, sm in list(self.services.items()):
            rows: list[dict[str, Any]] = []
            for door, methods in enumerate(sm.by_door):
                for mm in [*list(methods.values()), sm.other[door]]:
                    for source, rule, key, cell in mm.cells():
                        rows.append(
                            {
                                "caller": source,
                                "door": DOORS[door],
                                "route": rule,
                                "backend": backend_label(service, key),
                                "method": mm.name,
                                "codes": dict(cell.by_code()),
                                "buckets": {str(i): n for i, n in enumerate(list(cell.buckets)) if n},
                                "sum": round(cell.sum, 6),
                            }
                        )
            if rows:
                out[service] = rows
        return out

    def set_known(self, name: str, methods: frozenset[str]) -> None:
        """The methods of `name` that get a label of their own (when it is counted at all)."""
        found = self.services.get(name)
        if found is not None:
            found.known = methods

    def close(self) -> None:
        """The stack closed: its series leave the process's exposition."""
        COLLECTOR.discard(self)

    def forget(self, name: str) -> None:
        """`name` left the mesh: its series go (as Prometheus expects of a target that vanished)."""
        self.services.pop(name, None)

    # ------------------------------------------------------------------ scrape (any thread)

    def samples(self, out: Families) -> None:
        for service, sm in list(self.services.items()):
            for door, methods in enumerate(sm.by_door):
                d = DOORS[door]
                other = sm.other[door]
                if not (methods or other.calls or sm.in_flight[door]):
                    continue  # never called through this door
                out.gauge("calls_in_flight", (d, service), sm.in_flight[door])
                for mm in [*list(methods.values()), other]:
                    _method_samples(out, d, service, mm)
        mesh = self._mesh()
        if mesh is None:
            return
        for service, (_budget, stats) in list(mesh.budgets.items()):
            out.counter("retries", (service,), stats.retries)
            out.counter("retry_budget_refusals", (service,), stats.denied)
        for service, breaker in list(mesh.breakers.items()):
            out.counter("breaker_rejections", (service, "service"), breaker.rejected)
            out.counter("breaker_rejections", (service, "endpoint"), breaker.endpoint_rejected)
        for service, detector in list(mesh.detectors.items()):
            out.counter("outlier_ejections", (service,), detector.ejected_total)
        now = time.monotonic()
        for state in mesh.states.all():
            labels = (state.service, state.address)
            out.counter("endpoint_attempts", labels, state.calls)
            out.counter("endpoint_failures", labels, state.errors)
            out.gauge("endpoint_in_flight", labels, state.inflight)
            out.gauge("endpoint_latency_ewma_seconds", labels, state.ewma)
            out.gauge("endpoint_healthy", labels, 1 if state.healthy else 0)
            out.gauge("endpoint_ejected", labels, 1 if state.ejected_until > now else 0)


def _method_samples(out: Families, door: str, service: str, mm: MethodMetrics) -> None:
    method = mm.name
    for _source, rule, key, cell in mm.cells():  # callers summed: Families adds equal label sets
        backend = backend_label(service, key)
        for code, n in cell.by_code():
            out.counter("calls", (door, service, rule, backend, method, code), n)
        out.histogram("call_duration_seconds", (door, service, rule, backend, method), cell)
    for key, cell in list(mm.attempts.items()):
        backend = backend_label(service, key)
        for code, n in cell.by_code():
            out.counter("attempts", (door, service, backend, method, code), n)
        out.histogram("attempt_duration_seconds", (door, service, backend, method), cell)
    if mm.sent or mm.received:
        out.counter("stream_messages_sent", (door, service, method), mm.sent)
        out.counter("stream_messages_received", (door, service, method), mm.received)


# ---------------------------------------------------------------------------------- families

#: name (without `gmesh_`, `_total`) -> (type, help, label names)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "calls": (
        "counter",
        "Calls as their callers saw them (after retries), by gRPC status code.",
        ("door", "service", "route", "backend", "method", "code"),
    ),
    "call_duration_seconds": (
        "histogram",
        "Duration of calls as their callers saw them, retries and backoff included.",
        ("door", "service", "route", "backend", "method"),
    ),
    "calls_in_flight": ("gauge", "Calls started and not yet ended.", ("door", "service")),
    "attempts": (
        "counter",
        "Attempts sent to endpoints (a retried call makes several), by gRPC status code.",
        ("door", "service", "backend", "method", "code"),
    ),
    "attempt_duration_seconds": (
        "histogram",
        "Duration of each attempt, from picking an endpoint to its end.",
        ("door", "service", "backend", "method"),
    ),
    "stream_messages_sent": (
        "counter",
        "Messages callers sent on streaming calls.",
        ("door", "service", "method"),
    ),
    "stream_messages_received": (
        "counter",
        "Messages callers received on streaming calls.",
        ("door", "service", "method"),
    ),
    "retries": ("counter", "Retries made (attempts after the first).", ("service",)),
    "retry_budget_refusals": (
        "counter",
        "Retries not made because the retry budget (or the breaker's maxRetries) was spent.",
        ("service",),
    ),
    "breaker_rejections": (
        "counter",
        "Calls failed fast by a circuit breaker; limit=service (maxRequests/maxPending) or "
        "endpoint (maxRequestsPerEndpoint).",
        ("service", "limit"),
    ),
    "outlier_ejections": ("counter", "Endpoints ejected by outlier detection.", ("service",)),
    "endpoint_attempts": ("counter", "Attempts sent to one endpoint.", ("service", "endpoint")),
    "endpoint_failures": (
        "counter",
        "Attempts that failed by the endpoint's fault (server-class codes it sent, broken connections).",
        ("service", "endpoint"),
    ),
    "endpoint_in_flight": ("gauge", "Attempts in flight on one endpoint.", ("service", "endpoint")),
    "endpoint_latency_ewma_seconds": (
        "gauge",
        "Peak-EWMA latency of an endpoint's unary answers, as the balancer sees it.",
        ("service", "endpoint"),
    ),
    "endpoint_healthy": (
        "gauge",
        "1 while active health checks pass (or none are configured), else 0.",
        ("service", "endpoint"),
    ),
    "endpoint_ejected": (
        "gauge",
        "1 while outlier detection keeps the endpoint out.",
        ("service", "endpoint"),
    ),
    "received_calls": (
        "counter",
        "Calls received where authorization is enforced (inbound proxies, gmesh.server_interceptors, "
        "admin ports with mTLS), by transport (mtls, plaintext), result (allowed, denied, refused: "
        "plaintext to a STRICT service, audited: an AUDIT policy matched) and deciding policy.",
        ("service", "transport", "result", "policy"),
    ),
    "ratelimit_rejections": (
        "counter",
        "Calls refused by a RateLimit (mode=enforce), or that it would have refused (mode=shadow).",
        ("service", "limit", "mode"),
    ),
    "ratelimit_keys": (
        "gauge",
        "Buckets a RateLimit keeps in this process (one per key).",
        ("service", "limit"),
    ),
    "ratelimit_overflowed": (
        "counter",
        "Calls of new keys that found the RateLimit's key table full of active keys and shared its "
        "overflow bucket.",
        ("service", "limit"),
    ),
    "spans_exported": ("counter", "Trace spans this process sent to its OTLP collector.", ()),
    "spans_dropped": (
        "counter",
        "Trace spans dropped: reason=queue_full (the export queue was full: collector slow or away) "
        "or export_failed (the collector refused or could not be reached).",
        ("reason",),
    ),
}


class Families:
    """Samples of one scrape, summed per label set across mesh stacks."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], Any]] = {name: {} for name in FAMILIES}

    def counter(self, name: str, labels: tuple[str, ...], value: float) -> None:
        found = self.values[name]
        found[labels] = found.get(labels, 0) + value

    gauge = counter

    def histogram(self, name: str, labels: tuple[str, ...], cell: Cell) -> None:
        buckets, total = cell.cumulative()
        found = self.values[name].get(labels)
        if found is not None:
            old_buckets, old_total = found
            buckets = [(le, a + b) for (le, a), (_, b) in zip(buckets, old_buckets, strict=True)]
            total += old_total
        self.values[name][labels] = (buckets, total)

    def families(self) -> Iterator[Any]:
        # imported here: prometheus_client costs ~35 ms to import, which a process that never
        # serves or scrapes metrics (most channel applications) should not pay at start
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for name, (kind, doc, labels) in FAMILIES.items():
            full = f"gmesh_{name}"
            family: Any
            if kind == "counter":
                family = CounterMetricFamily(full, doc, labels=labels)
            elif kind == "gauge":
                family = GaugeMetricFamily(full, doc, labels=labels)
            else:
                family = HistogramMetricFamily(full, doc, labels=labels)
            for label_values, value in self.values[name].items():
                if kind == "histogram":
                    buckets, total = value
                    family.add_metric(list(label_values), buckets=buckets, sum_value=total)
                else:
                    family.add_metric(list(label_values), value)
            yield family


class MeshCollector:
    """The process's one Prometheus collector (prometheus_client's `Collector` protocol: `collect`
    and `describe`): every live mesh stack's metrics, summed."""

    def __init__(self) -> None:
        self._meshes: weakref.WeakSet[MeshMetrics] = weakref.WeakSet()
        #: other sources of samples (authorization gates, rate limits): `metric_samples(out)`
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        # stacks come and go on event loops while a scrape thread lists them
        self._lock = threading.Lock()

    def add(self, metrics: MeshMetrics) -> None:
        with self._lock:
            self._meshes.add(metrics)

    def discard(self, metrics: MeshMetrics) -> None:
        with self._lock:
            self._meshes.discard(metrics)

    def add_source(self, source: Any) -> None:
        """Collect `source.metric_samples(families)` too, while `source` lives (held weakly)."""
        with self._lock:
            self._sources.add(source)

    def collect(self) -> Iterable[Any]:
        out = Families()
        with self._lock:
            meshes = list(self._meshes)
            sources = list(self._sources)
        for metrics in meshes:
            metrics.samples(out)
        for source in sources:
            source.metric_samples(out)
        if SPANS.active:
            out.counter("spans_exported", (), SPANS.exported)
            out.counter("spans_dropped", ("queue_full",), SPANS.queue_full)
            out.counter("spans_dropped", ("export_failed",), SPANS.export_failed)
        return list(out.families())

    def describe(self) -> Iterable[Any]:
        # Names only (a registry checks them for clashes without collecting).
        return list(Families().families())


COLLECTOR = MeshCollector()
