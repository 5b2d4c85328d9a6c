"""Compiled rate limits and the check every front door runs (the LIMIT-phase filter of the chain
in `gmesh proxy` and `gmesh:///` channels, and the inbound proxy).

A service's limits are compiled when its chain is (never per call); their buckets are kept
across config changes while the limit's rate, burst and key stay the same. Per call: match the
method and metadata (set lookups), compute the key (a metadata scan, or the caller), one GCRA
step. A refused call ends with RESOURCE_EXHAUSTED (or the limit's status) naming the limit,
`google.rpc.RetryInfo` (when a token will be there) and `QuotaFailure` in
`grpc-status-details-bin`, and `x-ratelimit-limit` / `-remaining` / `-reset` trailers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.chain.call import Call
from gmesh.chain.metadata import metadata_value
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import CallError, Origin
from gmesh.ratelimit.bucket import Bucket, Buckets, SharedBuckets, Verdict, buckets_for
from gmesh.ratelimit.spec import KIND, RateLimitSpec, format_rate

if TYPE_CHECKING:
    from gmesh.chain.filter import Handler
    from gmesh.config.kinds import Resource
    from gmesh.ratelimit.shares import GlobalLimits
    from gmesh.routing import match as m

log = logging.getLogger(__name__)

#: kinds whose caller sends exactly one request message (no stream of requests to limit)
_ONE_REQUEST = frozenset({MethodKind.UNARY, MethodKind.SERVER_STREAMING})

#: shadow-mode refusals are logged at most this often per limit (seconds)
SHADOW_LOG_EVERY = 10.0
_NO_KEY = None


def caller_key(call: Call[Any]) -> str:
    """`key: caller`: the verified identity, else the caller's labels, else its address."""
    caller = call.caller
    if caller.identity:
        return caller.identity
    if caller.labels:
        return ",".join(f"{k}={v}" for k, v in sorted(caller.labels.items()))
    peer = caller.peer
    # ipv4:127.0.0.1:5000 -> the host: one caller, whatever connection it used
    return peer.rpartition(":")[0] if peer.count(":") >= 2 else peer


#: keys longer than this are kept as a digest (a made-up key cannot make a bucket big)
LONG_KEY = 64


def _table_key(key: object) -> object:
    if isinstance(key, str) and len(key) > LONG_KEY:
        import hashlib

        return hashlib.blake2b(key.encode(), digest_size=16).digest()
    return key


class CallMatch:
    """Which calls a limit or quota counts: method paths (exact, or prefixes ending in `*`) and
    request metadata matches; compiled once."""

    __slots__ = ("always", "metadata", "method_prefixes", "methods")

    def __init__(self, methods: Sequence[str] | None, metadata: Mapping[str, Any] | None) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        for method in methods or ():
            (prefixes.append(method[:-1]) if method.endswith("*") else exact.add(method))
        self.methods: frozenset[str] | None = frozenset(exact) if methods is not None else None
        self.method_prefixes = tuple(prefixes)
        self.metadata: tuple[tuple[str, m.StringPredicate], ...] = tuple(
            (k, v.compile()) for k, v in (metadata or {}).items()
        )
        self.always = self.methods is None and not self.metadata

    def applies(self, method: str, metadata: Any) -> bool:
        if self.always:
            return True
        methods = self.methods
        if (
            methods is not None
            and method not in methods
            and not (self.method_prefixes and method.startswith(self.method_prefixes))
        ):
            return False
        return all(predicate(metadata_value(metadata, key)) for key, predicate in self.metadata)


class Limit:
    """One RateLimit resource, compiled. Its buckets (state) outlive recompiles (see `state_key`)."""

    __slots__ = (
        "_key_of",
        "_last_shadow_log",
        "buckets",
        "enforce",
        "match",
        "name",
        "overrides",
        "service",
        "spec",
        "state",
        "status",
    )

    def __init__(self, name: str, spec: RateLimitSpec, state: LimitState) -> None:
        self.name = name
        self.spec = spec
        self.service = spec.service
        self.enforce = spec.mode == "enforce"
        self.status = grpc.StatusCode[spec.status]
        self.match = CallMatch(spec.methods, spec.metadata)
        self._key_of = key_function(spec.key)
        self.buckets = state.buckets
        self.overrides = state.overrides
        self.state = state  # buckets and counts: they survive recompiles
        self._last_shadow_log = -math.inf

    def applies(self, method: str, metadata: Any) -> bool:
        return self.match.applies(method, metadata)

    def check(self, call: Call[Any], now: float) -> None:
        """Admit `call` or raise the refusal (shadow: count, log, admit)."""
        self.state.offered += 1
        key = self._key_of(call)
        buckets = self.overrides.get(key, self.buckets) if self.overrides else self.buckets
        if self.state.messages is not None and call.kind not in _ONE_REQUEST:
            self._watch_messages(call, key)
        if not self.state.blocked and buckets.take(_table_key(key), now):
            return
        state = self.state
        if not self.enforce:
            state.shadow_rejected += 1
            if now - self._last_shadow_log >= SHADOW_LOG_EVERY:
                self._last_shadow_log = now
                log.warning(
                    "rate limit %s (shadow) would refuse calls to %s%s (%d so far)",
                    self.name, self.service, f" from {key}" if key is not None else "", state.shadow_rejected,
                )  # fmt: skip
            return
        state.rejected += 1
        raise self.refusal(key, buckets.verdict(_table_key(key), now, False), buckets.bucket)

    def _watch_messages(self, call: Call[Any], key: object) -> None:
        """Count the stream's request messages as the front door relays them (`Call.on_message`)."""
        messages = self.state.messages
        assert messages is not None
        table = Buckets(messages.bucket, 1) if messages.per_stream else messages
        slot = None if messages.per_stream else _table_key(key)
        before = call.on_message
        state = self.state

        def on_message() -> None:
            if before is not None:
                before()
            now = time.monotonic()
            if table.take(slot, now):
                return
            if not self.enforce:
                state.shadow_rejected += 1
                return
            state.rejected += 1
            verdict = table.verdict(slot, now, False)
            error = self.refusal(key, verdict, table.bucket, what="stream messages")
            error.origin = Origin.DELIBERATE  # gmesh ended it on purpose: no endpoint's fault
            raise error

        call.on_message = on_message

    def refusal(self, key: object, verdict: Verdict, bucket: Bucket, what: str = "") -> CallError:
        retry = verdict.retry_after
        whose = f" for {self.spec.key} {key}" if key is not None else ""
        if self.state.shares is not None and not what:
            # a global limit: its share here is recomputed every second; say the mesh-wide rate
            from gmesh.ratelimit.shares import INTERVAL

            retry = min(retry, INTERVAL) if not self.state.blocked else INTERVAL
            share = self.state.share or 0.0
            shown = f"{format_rate(self.spec.rate)} across the mesh (this process: {share:.3g}/s)"
        else:
            shown = f"{what + ' ' if what else ''}{format_rate(bucket.rate)} (burst {bucket.burst})"
        details = f"gmesh: rate limit {self.name}: {shown}{whose} on {self.service}; retry in {_ms(retry)}"
        trailers = (
            ("x-ratelimit-limit", f"{self.spec.rate if self.state.shares is not None else bucket.rate:g}"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", f"{retry:.3f}"),
            ("grpc-status-details-bin", status_details(self.status, details, retry, self.name, key)),
        )
        return CallError(self.status, details, trailers)

    def describe(self, now: float | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "rate": format_rate(self.buckets.bucket.rate),
            "burst": self.buckets.bucket.burst,
            "key": self.spec.key,
            "mode": self.spec.mode,
            "keys": len(self.buckets),
            "rejected": self.state.rejected,
            "shadowRejected": self.state.shadow_rejected,
            "overflowed": self.buckets.overflowed,
        }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.0f}s"


def status_details(code: grpc.StatusCode, message: str, retry: float, name: str, key: object) -> bytes:
    """google.rpc.Status with RetryInfo and QuotaFailure, serialized (built on a refusal only)."""
    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(int(retry * 1e9), 1_000_000))  # at least 1 ms: "now" would spin
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    failure = error_details_pb2.QuotaFailure()
    failure.violations.add(
        subject=f"ratelimit:{name}" + (f":{key}" if key is not None else ""),
        description=message,
    )
    status.details.add().Pack(failure)
    serialized: bytes = status.SerializeToString()
    return serialized


def key_function(key: str | None) -> Callable[[Call[Any]], Any]:
    if key is None:
        return lambda call: _NO_KEY
    if key == "caller":
        return caller_key
    name = key.partition(":")[2]
    return lambda call: metadata_value(call.metadata, name)


class MessageBuckets(Buckets):
    """The message buckets of a limit: per key (shared by a key's streams), or only the
    parameters (`per_stream`: every stream gets a bucket of its own)."""

    __slots__ = ("per_stream",)

    def __init__(self, bucket: Bucket, per_stream: bool, max_keys: int) -> None:
        super().__init__(bucket, max_keys)
        self.per_stream = per_stream


class LimitState:
    """What a limit keeps across config changes: its buckets and counts (in the metrics as
    gmesh_ratelimit_rejections_total while it lives)."""

    __slots__ = (
        "__weakref__",
        "blocked",
        "buckets",
        "messages",
        "name",
        "offered",
        "overrides",
        "rejected",
        "service",
        "shadow_rejected",
        "share",
        "shares",
        "spec",
    )

    def __init__(
        self, name: str, spec: RateLimitSpec, shared_name: str = "", shares: GlobalLimits | None = None
    ) -> None:
        from gmesh.stats.metrics import COLLECTOR

        self.name, self.service, self.spec = name, spec.service, spec
        shared_name = shared_name or name
        burst = spec.burst_of(spec.rate, spec.burst)
        self.buckets: Buckets | SharedBuckets
        if spec.scope == "global" and shares is not None:
            # its own share of the mesh-wide rate (each worker of a proxy takes part on its own)
            self.buckets = Buckets(Bucket(spec.rate, burst), 1)
        else:
            self.buckets = buckets_for(Bucket(spec.rate, burst), spec.max_keys, shared_name)
        self.overrides: dict[object, Buckets | SharedBuckets] = {
            o.key: buckets_for(Bucket(o.rate, spec.burst_of(o.rate, o.burst)), 1, f"{shared_name}|{o.key}")
            for o in spec.overrides
        }
        self.rejected = 0
        self.shadow_rejected = 0
        #: calls this limit counted here (admitted or not): a global limit's demand
        self.offered = 0
        m = spec.messages
        self.messages = (
            MessageBuckets(Bucket(m.rate, spec.burst_of(m.rate, m.burst)), m.per == "stream", spec.max_keys)
            if m is not None
            else None
        )
        #: a global limit's share of the rate here (None: a process-scope limit)
        self.share: float | None = None
        #: a global limit refusing every call (etcd away, onStoreUnavailable deny)
        self.blocked = False
        self.shares = shares if spec.scope == "global" else None
        COLLECTOR.add_source(self)
        if self.shares is not None:
            self.shares.register(self)

    def set_share(self, share: float, *, burst: int | None = None, blocked: bool = False) -> None:
        """A global limit's share changed: this process may admit `share` calls/s (`blocked`:
        none at all, onStoreUnavailable deny)."""
        self.share = 0.0 if blocked else share
        self.blocked = blocked
        rate = self.spec.rate
        if burst is None:
            burst = max(1, round(self.spec.burst_of(rate, self.spec.burst) * min(share / rate, 1.0)))
        buckets = self.buckets
        if isinstance(buckets, Buckets):
            buckets.rescale(share, burst, time.monotonic())
        else:  # not reached: global limits keep their buckets in the process
            buckets.bucket.reset(share, burst)

    def describe(self) -> dict[str, Any]:
        bucket = self.buckets.bucket
        return {
            "name": self.name,
            "rate": format_rate(bucket.rate),
            "burst": bucket.burst,
            "keys": len(self.buckets),
            "shared": isinstance(self.buckets, SharedBuckets),
            "rejected": self.rejected,
            "shadowRejected": self.shadow_rejected,
            "overflowed": self.buckets.overflowed,
            "evicted": self.buckets.evicted,
            **(
                {"scope": "global", **self.shares.describe(self.name)}
                if self.shares is not None
                else {"scope": "process"}
            ),
        }

    def metric_samples(self, out: Any) -> None:
        labels = (self.service, self.name)
        out.counter("ratelimit_rejections", (*labels, "enforce"), self.rejected)
        out.counter("ratelimit_rejections", (*labels, "shadow"), self.shadow_rejected)
        out.gauge("ratelimit_keys", labels, len(self.buckets))
        out.counter("ratelimit_overflowed", labels, self.buckets.overflowed)
        if self.shares is not None and self.share is not None:
            out.gauge("ratelimit_share", labels, self.share)
            out.gauge("ratelimit_store_unavailable", labels, 0 if self.shares.store_ok else 1)


def state_key(name: str, spec: RateLimitSpec) -> str:
    """Buckets carry over a recompile only while what they mean is the same."""
    overrides = ",".join(f"{o.key}={o.rate}/{o.burst}" for o in spec.overrides)
    messages = spec.messages.model_dump_json() if spec.messages is not None else ""
    return (
        f"ratelimit:{name}:{spec.rate}:{spec.burst}:{spec.key}:{spec.max_keys}:{spec.scope}:"
        f"{spec.on_store_unavailable}:{overrides}:{messages}"
    )


def limits_of(
    resources: Mapping[str, Resource],
    service: str,
    kept: Callable[[str, Callable[[], LimitState]], LimitState],
    shares: GlobalLimits | None = None,
) -> tuple[Limit, ...]:
    """The compiled limits of `service` (by resource name), state from `kept`; global limits take
    part in `shares` (None: they count as process-scope ones, as `gmesh explain` shows them)."""
    out = []
    for name in sorted(resources):
        spec: RateLimitSpec = resources[name].spec  # type: ignore[assignment]
        if spec.service != service:
            continue
        key = state_key(name, spec)
        state = kept(key, lambda name=name, spec=spec, key=key: LimitState(name, spec, key, shares))  # type: ignore[misc]
        out.append(Limit(name, spec, state))
    return tuple(out)


class RateLimiter:
    """The LIMIT-phase filter (and the inbound proxy's check): every limit of the service."""

    __slots__ = ("limits",)

    def __init__(self, limits: Sequence[Limit]) -> None:
        self.limits = tuple(limits)

    def check(self, call: Call[Any]) -> None:
        now = time.monotonic()
        for limit in self.limits:
            if limit.match.applies(call.method, call.metadata):
                limit.check(call, now)

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        now = time.monotonic()
        for limit in self.limits:
            if limit.match.applies(call.method, call.metadata):
                limit.check(call, now)
        return await next(call)


__all__ = ["KIND", "Limit", "LimitState", "RateLimiter", "caller_key", "limits_of"]
