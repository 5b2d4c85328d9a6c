"""The `Quota` kind: calls per long window (minute, hour, day), per key, shared by every process.

kind: Quota
metadata: {name: orders-daily}
spec:
  service: orders
  limit: 10000            # calls per window and key
  window: 1d              # a duration: windows are calendar-aligned (UTC) multiples of it
  key: metadata:x-api-key # none: one quota for all calls; caller; metadata:<key>
  chunk: 50               # tokens a process takes at a time (default: limit / 100, at least 1)

The count lives in etcd, one counter per window and key (`<prefix>quotas/<name>/<window>/<key>`,
leased until the window is over). A process takes `chunk` tokens at a time with a
compare-and-swap on that counter, spends them locally (no etcd round trip per call), takes the
next chunk when they run low, and gives back what it did not spend when a key goes quiet or the
process stops. Every admitted call was taken from the counter first, so the quota is never
exceeded while etcd answers; a process killed while holding tokens takes at most one chunk per
key with it (calls that will not be admitted: under, never over). When etcd cannot be reached,
`onStoreUnavailable` decides: `share` and `deny` spend what the process holds (taken from the
counter already) and then refuse, `allow` admits (counted locally, never written back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import grpc
from pydantic import Field, field_validator, model_validator

from gmesh.chain.call import Call
from gmesh.config.kinds import ConfigView, Kind, Resource
from gmesh.config.types import MetadataKey, MethodPattern, Name, PositiveDuration, SpecModel, format_duration
from gmesh.errors import CallError, GmeshError
from gmesh.ratelimit.spec import LimitKey
from gmesh.routing.spec import MetadataMatch
from gmesh.store.etcd import Compare, Put

if TYPE_CHECKING:
    from gmesh.chain.filter import Handler
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store

log = logging.getLogger(__name__)

KIND = "Quota"
#: a key that took no token for this long gives back what its process holds
IDLE_RETURN = 5.0
#: after etcd failed to answer, the next try waits this long (calls do not each wait for it)
STORE_BACKOFF = 1.0
#: an exhausted key asks etcd again at most this often (tokens may have been given back)
EXHAUSTED_RECHECK = 1.0


class QuotaSpec(SpecModel):
    """Calls per window and key, shared by every gmesh process through counters in etcd."""

    service: Name = Field(description="The mesh service whose calls this quota counts.")
    methods: list[MethodPattern] | None = Field(
        default=None, min_length=1, description="Method paths, or prefixes ending in '*' (default: all)."
    )
    metadata: dict[MetadataKey, MetadataMatch] | None = Field(
        default=None, description="Only calls whose request metadata match."
    )
    limit: int = Field(ge=1, description="Calls per window (and key).")
    window: PositiveDuration = Field(
        description="The window: a duration (1m, 1h, 24h); windows are aligned to multiples of it, UTC."
    )
    align: Literal["calendar", "rolling"] = Field(
        default="calendar",
        description="calendar: the count starts again with each window; rolling: the last `window` "
        "counts (the previous window's calls weighted by how much of them is still inside it).",
    )
    key: LimitKey | None = Field(
        default=None, description="What a quota is per: none, `caller`, or `metadata:<key>` (as RateLimit)."
    )
    chunk: int | None = Field(
        default=None, ge=1, description="Tokens a process takes from etcd at a time (default: limit/100)."
    )
    mode: Literal["enforce", "shadow"] = Field(default="enforce", description="shadow: count, never refuse.")
    status: Literal["RESOURCE_EXHAUSTED", "UNAVAILABLE"] = Field(default="RESOURCE_EXHAUSTED")
    on_store_unavailable: Literal["share", "allow", "deny"] = Field(
        default="share",
        description="While etcd cannot be reached: spend what this process holds, then refuse "
        "(share, deny); admit everything (allow).",
    )
    max_keys: int = Field(default=10_000, ge=1, le=1_000_000, description="Keys held per process.")

    @field_validator("window")
    @classmethod
    def _window(cls, window: float) -> float:
        if window < 1:
            raise ValueError("a quota window is at least 1s (use a RateLimit for shorter ones)")
        return window

    @model_validator(mode="after")
    def _chunk(self) -> QuotaSpec:
        if self.chunk is not None and self.chunk > self.limit:
            raise ValueError(f"chunk {self.chunk} is larger than the limit {self.limit}")
        return self

    @property
    def chunk_size(self) -> int:
        return self.chunk if self.chunk is not None else max(1, self.limit // 100)


def window_of(spec: QuotaSpec, now: float) -> tuple[int, float]:
    """(the window's number, when it ends) for wall-clock `now`: aligned multiples of the window."""
    number = int(now // spec.window)
    return number, (number + 1) * spec.window


class _Held:
    """What this process holds of one key's quota in one window."""

    __slots__ = ("exhausted_until", "idle_since", "refill", "tokens", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.tokens = 0
        self.refill: asyncio.Future[int] | None = None
        self.exhausted_until = 0.0
        self.idle_since = time.monotonic()


class QuotaState:
    """One Quota in this process: tokens held per key, the etcd counters, counts. Kept across
    recompiles while the quota's parameters stay the same."""

    def __init__(self, name: str, spec: QuotaSpec, store: Store | None, keys: MeshKeys | None) -> None:
        from gmesh.stats.metrics import COLLECTOR

        self.name, self.spec, self.store, self.keys = name, spec, store, keys
        self.held: dict[Any, _Held] = {}
        self.admitted = 0
        self.rejected = 0
        self.shadow_rejected = 0
        self.taken = 0  # tokens taken from etcd
        self.returned = 0  # tokens given back
        self.store_ok = True
        self._store_retry = 0.0
        self._leases: dict[int, int] = {}
        self._previous: dict[tuple[int, Any], int] = {}
        self._last_room = -1e9
        self._sweeper: asyncio.Task[None] | None = None
        COLLECTOR.add_source(self)

    # -- per call ------------------------------------------------------------------------------

    async def admit(self, key: Any) -> bool:
        """Take one token for `key` (from what this process holds, else from etcd)."""
        now = time.time()
        window, _ = window_of(self.spec, now)
        held = self.held.get(key)
        if held is None and len(self.held) >= self.spec.max_keys and not self._make_room():
            # no room to hold tokens for another key: take exactly one from its own counter
            return await self._one(key, window)
        if held is None or held.window != window:
            held = self.held[key] = _Held(window)
        held.idle_since = time.monotonic()
        while True:
            if held.tokens > 0:
                held.tokens -= 1
                if held.tokens <= self.spec.chunk_size // 2 and held.refill is None:
                    self._start_refill(key, held)  # prefetch: the next chunk before it is needed
                return True
            if held.exhausted_until > now:
                return False
            if held.refill is None:
                self._start_refill(key, held)
            assert held.refill is not None
            got = await asyncio.shield(held.refill)
            if got <= 0 and held.tokens <= 0:
                return self._without_store(got)

    async def _one(self, key: Any, window: int) -> bool:
        """One token straight from `key`'s counter (a key this process has no room to hold)."""
        if time.monotonic() < self._store_retry:
            return self._without_store(-1)
        try:
            got = await self.take(key, window, 1)
            self._store_up()
        except GmeshError as exc:
            self._store_down(str(exc))
            return self._without_store(-1)
        return got > 0

    def _without_store(self, got: int) -> bool:
        """No token: the quota is used up (got 0), or etcd could not be asked (got -1)."""
        if got == 0 or self.spec.on_store_unavailable == "share":
            return False
        return self.spec.on_store_unavailable == "allow"

    def _start_refill(self, key: Any, held: _Held) -> None:
        held.refill = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._refill(key, held))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._ensure_sweeper()

    async def _refill(self, key: Any, held: _Held) -> None:
        future = held.refill
        assert future is not None
        got = -1
        try:
            if time.monotonic() >= self._store_retry:
                # never hold more than one chunk (what a killed process can take with it)
                got = await self.take(key, held.window, max(self.spec.chunk_size - held.tokens, 1))
                self._store_up()
                if got == 0:
                    held.exhausted_until = time.time() + EXHAUSTED_RECHECK
                held.tokens += got
        except GmeshError as exc:
            self._store_down(str(exc))
        finally:
            held.refill = None
            if not future.done():
                future.set_result(got)

    # -- etcd ----------------------------------------------------------------------------------

    def _counter(self, window: int, key: Any) -> str:
        assert self.keys is not None
        return self.keys.quota_counter(self.name, str(window), counter_name(key))

    async def take(self, key: Any, window: int, want: int) -> int:
        """Take up to `want` tokens of `key`'s counter in `window` (compare-and-swap); how many."""
        if self.store is None:
            raise GmeshError("no store")
        counter = self._counter(window, key)
        for attempt in range(20):  # other holders race for the same counter: read again and retry
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            found = await self.store.get(counter)
            used = int(found.value) if found is not None else 0
            free = self.spec.limit - used - await self.carried(key, window)
            if free <= 0:
                return 0
            take = min(want, free)
            if found is not None:
                compare, lease = Compare(counter, "mod", found.mod_revision), found.lease
            else:
                compare, lease = Compare(counter, "version", 0), await self._lease(window)
            result = await self.store.txn([compare], [Put(counter, str(used + take).encode(), lease)])
            if result.succeeded:
                self.taken += take
                return take
        return 0

    async def carried(self, key: Any, window: int) -> int:
        """A rolling quota: the previous window's calls still inside the last `window` (that
        window's count times the share of it that is still inside, the usual sliding-window
        estimate). 0 for a calendar-aligned quota."""
        if self.spec.align != "rolling":
            return 0
        cache = self._previous
        used = cache.get((window - 1, key))
        if used is None:
            assert self.store is not None
            found = await self.store.get(self._counter(window - 1, key))
            used = int(found.value) if found is not None else 0
            if len(cache) > 4 * self.spec.max_keys:
                cache.clear()
            cache[(window - 1, key)] = used  # that window is over: its count no longer changes
        inside = 1.0 - (time.time() / self.spec.window - window)
        return math.ceil(used * max(min(inside, 1.0), 0.0))

    async def give_back(self, key: Any, window: int, tokens: int) -> None:
        """Return `tokens` not spent to the counter (so other processes may spend them)."""
        if self.store is None or tokens <= 0:
            return
        counter = self._counter(window, key)
        for _ in range(20):
            found = await self.store.get(counter)
            if found is None:
                return
            used = int(found.value)
            back = min(tokens, used)
            result = await self.store.txn(
                [Compare(counter, "mod", found.mod_revision)],
                [Put(counter, str(used - back).encode(), found.lease)],
            )
            if result.succeeded:
                self.returned += back
                return

    async def _lease(self, window: int) -> int:
        """One lease per window: its counters vanish a minute after the window ends."""
        lease = self._leases.get(window)
        if lease is None:
            assert self.store is not None
            _, ends = window_of(self.spec, window * self.spec.window)
            if self.spec.align == "rolling":
                ends += self.spec.window  # the next window still reads this one
            ttl = max(int(ends - time.time()) + 60, 60)
            lease = self._leases[window] = await self.store.grant_lease(ttl)
            for old in [w for w in self._leases if w < window]:
                del self._leases[old]
        return lease

    def _store_down(self, why: str) -> None:
        self._store_retry = time.monotonic() + STORE_BACKOFF
        if self.store_ok:
            self.store_ok = False
            log.warning(
                "quota %s: etcd cannot be reached (%s): following onStoreUnavailable=%s",
                self.name, why, self.spec.on_store_unavailable,
            )  # fmt: skip

    def _store_up(self) -> None:
        if not self.store_ok:
            self.store_ok = True
            log.info("quota %s: etcd answers again", self.name)

    # -- giving back ---------------------------------------------------------------------------

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name=f"gmesh-quota {self.name}"
            )

    async def _sweep(self) -> None:
        """Give back what quiet keys hold; forget keys of windows that are over."""
        while self.held:
            await asyncio.sleep(IDLE_RETURN / 2)
            try:
                await self._sweep_once()
            except Exception:
                log.exception("quota %s: giving tokens back failed", self.name)

    async def _sweep_once(self) -> None:
        now, wall = time.monotonic(), time.time()
        window, _ = window_of(self.spec, wall)
        for key, held in list(self.held.items()):
            if held.window != window:
                del self.held[key]  # the window is over: what it held is worth nothing now
            elif held.tokens and held.refill is None and now - held.idle_since >= IDLE_RETURN:
                tokens, held.tokens = held.tokens, 0
                with contextlib.suppress(GmeshError):
                    await self.give_back(key, held.window, tokens)

    def _make_room(self) -> bool:
        """Forget keys that hold nothing (at most once a second: a flood of new keys must not scan
        the table per call); whether there is room now."""
        now = time.monotonic()
        if now - self._last_room >= 1.0:
            self._last_room = now
            for key in [k for k, h in self.held.items() if h.tokens == 0 and h.refill is None]:
                del self.held[key]
        return len(self.held) < self.spec.max_keys

    async def close(self) -> None:
        """Give back everything held (the process is stopping)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for key, held in list(self.held.items()):
            if held.tokens:
                tokens, held.tokens = held.tokens, 0
                with contextlib.suppress(GmeshError):
                    await self.give_back(key, held.window, tokens)

    # -- reading -------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "limit": self.spec.limit,
            "window": format_duration(self.spec.window),
            "keysHeld": len(self.held),
            "tokensHeld": sum(h.tokens for h in self.held.values()),
            "admitted": self.admitted,
            "rejected": self.rejected,
            "shadowRejected": self.shadow_rejected,
            "taken": self.taken,
            "returned": self.returned,
            "storeReachable": self.store_ok,
        }

    def metric_samples(self, out: Any) -> None:
        labels = (self.spec.service, self.name)
        out.counter("quota_rejections", (*labels, "enforce"), self.rejected)
        out.counter("quota_rejections", (*labels, "shadow"), self.shadow_rejected)
        out.gauge("quota_tokens_held", labels, sum(h.tokens for h in self.held.values()))
        out.gauge("quota_store_unavailable", labels, 0 if self.store_ok else 1)


class QuotaCheck:
    """One Quota, compiled for a service's chain (its state kept across recompiles)."""

    __slots__ = ("enforce", "key_of", "match", "state", "status")

    def __init__(self, name: str, state: QuotaState) -> None:
        from gmesh.ratelimit.limits import CallMatch, key_function

        spec = state.spec
        self.state = state
        self.enforce = spec.mode == "enforce"
        self.status = grpc.StatusCode[spec.status]
        self.key_of = key_function(spec.key)
        self.match = CallMatch(spec.methods, spec.metadata)

    async def check(self, call: Call[Any]) -> None:
        if not self.match.applies(call.method, call.metadata):
            return
        key = self.key_of(call)
        state = self.state
        if await state.admit(key):
            state.admitted += 1
            return
        if not self.enforce:
            state.shadow_rejected += 1
            return
        state.rejected += 1
        raise self.refusal(key)

    def refusal(self, key: Any) -> CallError:
        from gmesh.ratelimit.limits import status_details

        spec = self.state.spec
        _, ends = window_of(spec, time.time())
        retry = max(ends - time.time(), 0.001)
        if spec.align == "rolling":  # old calls slide out of the window one by one
            retry = min(retry, spec.window / spec.limit)
        if not self.state.store_ok and spec.on_store_unavailable != "allow":
            retry = STORE_BACKOFF
        whose = f" for {spec.key} {key}" if key is not None else ""
        details = (
            f"gmesh: quota {self.state.name}: {spec.limit} per {format_duration(spec.window)}{whose} on "
            f"{spec.service} used up; retry in {format_duration(round(retry, 3))}"
        )
        trailers = (
            ("x-ratelimit-limit", str(spec.limit)),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", f"{retry:.3f}"),
            ("grpc-status-details-bin", status_details(self.status, details, retry, self.state.name, key)),
        )
        return CallError(self.status, details, trailers)


class QuotaChecker:
    """The LIMIT-phase filter for a service's quotas."""

    __slots__ = ("checks",)

    def __init__(self, checks: list[QuotaCheck]) -> None:
        self.checks = tuple(checks)

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        for check in self.checks:
            await check.check(call)
        return await next(call)


def counter_name(key: Any) -> str:
    """A counter's name for a key value (`~all` without a key: no value can collide with it)."""
    return "~all" if key is None else f"={key}"


def quota_key(name: str, spec: QuotaSpec) -> str:
    """What a holder's state is for: what it counts (a change of mode or status keeps it)."""
    return (
        f"quota:{name}:{spec.limit}:{spec.window}:{spec.align}:{spec.key}:{spec.chunk_size}:"
        f"{spec.max_keys}:{spec.methods}:{spec.metadata}"
    )


def quotas_of(
    resources: Mapping[str, Resource], service: str, kept: Any, store: Store | None, keys: MeshKeys | None
) -> list[QuotaCheck]:
    out = []
    for name in sorted(resources):
        spec: QuotaSpec = resources[name].spec  # type: ignore[assignment]
        if spec.service != service:
            continue
        state = kept(quota_key(name, spec), lambda name=name, spec=spec: QuotaState(name, spec, store, keys))
        state.spec = spec  # mode, status, onStoreUnavailable as written now
        out.append(QuotaCheck(name, state))
    return out


def _check(resource: Resource, view: ConfigView) -> Iterator[tuple[tuple[str | int, ...], str]]:
    spec: QuotaSpec = resource.spec  # type: ignore[assignment]
    if spec.service == "gmesh-ca":
        yield ("spec", "service"), "the CA is not limited by quotas"


def _summary(spec: QuotaSpec) -> str:
    per = f" per {spec.key}" if spec.key else ""
    rolling = " rolling" if spec.align == "rolling" else ""
    window = format_duration(spec.window)
    return f"{spec.service} {spec.limit}/{window}{rolling}{per} (chunks of {spec.chunk_size})"


QUOTA = Kind(
    name=KIND,
    spec=QuotaSpec,
    description="Calls per long window (minute, hour, day) and key, shared by every gmesh process "
    "through counters in etcd taken in chunks.",
    summary=_summary,
    check=_check,
)

__all__ = ["KIND", "QUOTA", "QuotaChecker", "QuotaSpec", "QuotaState", "quotas_of", "window_of"]
