"""The rollout state, the lock, route weight changes, and the canary controller loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gmesh.config.kinds import KindRegistry
from gmesh.config.types import format_duration
from gmesh.config.validate import parse_stored
from gmesh.discovery.keys import MeshKeys
from gmesh.errors import Conflict, InvalidArgument, NotFound
from gmesh.stats.backend import Sample, delta, read_stats, read_stats_at
from gmesh.store.etcd import Compare, Put, Store

log = logging.getLogger(__name__)

RUNNING, PROMOTED, ROLLED_BACK, ABORTED = "running", "promoted", "rolled-back", "aborted"
ABORT_REQUESTED = "abort-requested"
LOCK_TTL = 5
#: Longest wait, after a step's interval, for every process's counters up to its end.
PUBLISH_WAIT = 1.5


@dataclass
class Thresholds:
    max_error_rate: float = 0.01
    #: seconds added to the baseline's p99 (relative) or the p99 limit itself (absolute)
    max_latency_p99: float | None = None
    latency_relative: bool = True
    min_calls: int = 20

    def describe(self) -> str:
        text = f"error rate <= {self.max_error_rate:.2%}"
        if self.max_latency_p99 is not None:
            limit = format_duration(self.max_latency_p99)
            text += f", p99 <= {'baseline + ' if self.latency_relative else ''}{limit}"
        return text + f", judged on >= {self.min_calls} canary calls per step"


@dataclass
class RolloutState:
    """What a rollout is doing, as stored in etcd."""

    service: str
    baseline: str
    canary: str
    steps: list[int]
    interval: float
    thresholds: Thresholds
    step: int = 0
    phase: str = RUNNING
    reason: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    controller: str = ""

    @property
    def weight(self) -> int:
        return self.steps[min(self.step, len(self.steps) - 1)]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RolloutState:
        doc = json.loads(raw)
        doc["thresholds"] = Thresholds(**doc["thresholds"])
        return cls(**doc)

    def note(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.history = [*self.history[-49:], f"{stamp} {text}"]


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidArgument(f"--steps {text!r}: write percentages like 5,25,50,100") from None
    if not steps or steps[-1] != 100 or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
        raise InvalidArgument(f"--steps {text!r}: increasing percentages in (0, 100], ending at 100")
    return steps


# ---------------------------------------------------------------------------------------------
# Routes: find, change the default rule's weights, write conditionally
# ---------------------------------------------------------------------------------------------


async def route_document(
    store: Store, keys: MeshKeys, kinds: KindRegistry, service: str
) -> tuple[str, dict[str, Any], int]:
    """(route name, document, mod revision); a new document (revision 0) when no Route names it."""
    kvs, _ = await store.get_prefix(keys.config_kind("Route"))
    for kv in kvs:
        try:
            doc = json.loads(kv.value)
        except ValueError:
            continue
        if doc.get("spec", {}).get("service") == service:
            return str(doc["metadata"]["name"]), doc, kv.mod_revision
    doc = {"kind": "Route", "metadata": {"name": service}, "spec": {"service": service, "rules": []}}
    return service, doc, 0


def _catch_all(rule: dict[str, Any]) -> bool:
    match = rule.get("match")
    if not match:
        return True
    caller = match.get("caller") or {}
    return (
        not match.get("method")
        and not match.get("metadata")
        and not caller.get("labels")
        and not caller.get("identity")
    )


def with_weights(doc: dict[str, Any], weights: dict[str, int]) -> dict[str, Any]:
    """`doc` with its default rule sending `weights` (subset -> percent); the rule is added if missing."""
    doc = json.loads(json.dumps(doc))
    rules: list[dict[str, Any]] = doc["spec"]["rules"]
    backends = [{"subset": subset, "weight": w} for subset, w in weights.items() if w > 0]
    if rules and _catch_all(rules[-1]):
        rules[-1]["backends"] = backends
    else:
        rules.append({"name": "default", "backends": backends})
    return doc


def default_weights(doc: dict[str, Any]) -> dict[str, int]:
    rules = doc["spec"]["rules"]
    if not rules or not _catch_all(rules[-1]):
        return {}
    return {b.get("subset") or "": int(b.get("weight", 100)) for b in rules[-1].get("backends", [{}])}


async def set_weights(
    store: Store,
    keys: MeshKeys,
    kinds: KindRegistry,
    service: str,
    weights: dict[str, int],
    *,
    guard: Compare | None = None,
) -> int:
    """Write the service's Route with the default rule at `weights`, atomically (conditional on the
    Route not having changed since read, and on `guard`). Validated like `gmesh apply`."""
    for _ in range(5):
        name, doc, revision = await route_document(store, keys, kinds, service)
        new = with_weights(doc, weights)
        if revision and new == doc:
            return revision  # already so: no write, no new revision for every watcher
        raw = json.dumps(new, sort_keys=True, separators=(",", ":")).encode()
        key = keys.config("Route", name)
        parse_stored(raw, kinds, key=key)  # a clear error before anything is written
        compares = [Compare(key, "mod", revision)]
        if guard is not None:
            compares.append(guard)
        result = await store.txn(compares, [Put(key, raw)])
        if result.succeeded:
            return result.revision
        if guard is not None:
            current = await store.get(guard.key)
            if current is None or current.value != guard.value:
                raise Conflict(f"lost the rollout lock of {service!r} to another controller")
    raise Conflict(f"Route of {service!r} kept changing while being written; try again")


async def check_service(store: Store, keys: MeshKeys, service: str) -> None:
    """NotFound unless `service` has a Service resource or registered endpoints."""
    if await store.get(keys.config("Service", service)) is not None:
        return
    kvs, _ = await store.get_prefix(keys.endpoints_of(service))
    if not kvs:
        raise NotFound(f"no mesh service {service!r} (no Service resource, no endpoints)")


async def check_subsets(store: Store, keys: MeshKeys, service: str, *subsets: str) -> None:
    kv = await store.get(keys.config("Service", service))
    defined = json.loads(kv.value).get("spec", {}).get("subsets", {}) if kv is not None else {}
    for subset in subsets:
        if subset not in defined:
            known = ", ".join(defined) or "none"
            raise NotFound(f"Service/{service} has no subset {subset!r} (defined: {known})")


# ---------------------------------------------------------------------------------------------
# State and lock
# ---------------------------------------------------------------------------------------------


async def load_state(store: Store, keys: MeshKeys, service: str) -> tuple[RolloutState | None, int]:
    kv = await store.get(keys.rollout(service))
    if kv is None:
        return None, 0
    return RolloutState.from_json(kv.value), kv.mod_revision


class RolloutLock:
    """The service's rollout lock: a key under a short lease, created only if absent."""

    def __init__(self, store: Store, keys: MeshKeys, service: str) -> None:
        self.store, self.service = store, service
        self.key = keys.lock(f"rollout-{service}")
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease = 0
        self.lost = asyncio.Event()
        self._keeper: Any = None

    @property
    def guard(self) -> Compare:
        return Compare(self.key, "value", self.owner.encode())

    async def holder(self) -> str | None:
        kv = await self.store.get(self.key)
        return kv.value.decode() if kv is not None else None

    async def try_acquire(self) -> bool:
        if not self.lease:
            self.lease = await self.store.grant_lease(LOCK_TTL)
            self._keeper = self.store.keep_alive(self.lease, LOCK_TTL, self.lost.set)
        result = await self.store.txn(
            [Compare(self.key, "create", 0)], [Put(self.key, self.owner.encode(), lease=self.lease)]
        )
        return result.succeeded

    async def acquire(self, on_wait: Callable[[str], None] | None = None) -> None:
        told = False
        while not await self.try_acquire():
            if not told and on_wait is not None:
                on_wait(await self.holder() or "?")
                told = True
            await asyncio.sleep(0.25)

    async def release(self) -> None:
        if self._keeper is not None:
            await self._keeper.stop()
        if self.lease:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self.lease, timeout=2.0)
        self.lease = 0


async def save(store: Store, keys: MeshKeys, state: RolloutState, lock: RolloutLock) -> None:
    state.updated_at = time.time()
    result = await store.txn([lock.guard], [Put(keys.rollout(state.service), state.to_json())])
    if not result.succeeded:
        raise Conflict(f"lost the rollout lock of {state.service!r} to another controller")


# ---------------------------------------------------------------------------------------------
# Canary
# ---------------------------------------------------------------------------------------------


def judge(state: RolloutState, change: dict[str, Sample]) -> tuple[str | None, dict[str, Any]]:
    """(why to roll back or None, what was measured) for one interval's counters."""
    canary = change.get(state.canary, Sample())
    baseline = change.get(state.baseline, Sample())
    t = state.thresholds
    measured = {
        "canary": {"calls": canary.calls, "error_rate": canary.error_rate, "p99": canary.quantile(0.99)},
        "baseline": {
            "calls": baseline.calls,
            "error_rate": baseline.error_rate,
            "p99": baseline.quantile(0.99),
        },
    }
    if canary.calls < t.min_calls:
        return None, measured
    if canary.error_rate > t.max_error_rate:
        return (
            f"canary error rate {canary.error_rate:.2%} over {canary.calls} calls > {t.max_error_rate:.2%}",
            measured,
        )
    if t.max_latency_p99 is not None:
        base_p99 = (
            baseline.quantile(0.99)
            if baseline.calls >= t.min_calls
            else state.measured.get("baseline_p99", 0.0)
        )
        limit = base_p99 + t.max_latency_p99 if t.latency_relative else t.max_latency_p99
        if canary.quantile(0.99) > limit:
            return (
                f"canary p99 {canary.quantile(0.99) * 1000:.1f} ms > limit {limit * 1000:.1f} ms",
                measured,
            )
    return None, measured


async def _counts_since(
    store: Store, keys: MeshKeys, service: str, since: float, before: dict[str, dict[str, Sample]]
) -> dict[str, dict[str, Sample]]:
    """The counters once every process counted before has published what it counted up to
    `since` (they publish once a second, and only when their counts changed: a process with
    nothing new never does, hence the deadline)."""
    deadline = time.monotonic() + PUBLISH_WAIT
    while True:
        after, published = await read_stats_at(store, keys, service)
        if all(published.get(p, 0.0) >= since for p in before) or time.monotonic() >= deadline:
            return after
        await asyncio.sleep(0.1)


async def run_canary(
    store: Store,
    keys: MeshKeys,
    kinds: KindRegistry,
    state: RolloutState,
    *,
    say: Callable[[str], None] = lambda text: None,
) -> RolloutState:
    """Drive `state` (new or resumed) to promoted, rolled back or aborted; returns the final state."""
    lock = RolloutLock(store, keys, state.service)
    await lock.acquire(lambda holder: say(f"another controller ({holder}) holds {state.service}; waiting"))
    try:
        stored, _ = await load_state(store, keys, state.service)
        if stored is not None and stored.phase in (RUNNING, ABORT_REQUESTED):
            state = stored  # resume where the last controller was
            say(f"resuming the rollout of {state.service} at step {state.step + 1} ({state.weight}%)")
        state.controller = lock.owner
        state.note(f"controller {lock.owner} took over")
        await save(store, keys, state, lock)
        return await _drive(store, keys, kinds, state, lock, say)
    finally:
        await lock.release()


async def _drive(
    store: Store, keys: MeshKeys, kinds: KindRegistry, state: RolloutState, lock: RolloutLock,
    say: Callable[[str], None],
) -> RolloutState:  # fmt: skip
    async def finish(phase: str, weights: dict[str, int], reason: str) -> RolloutState:
        await set_weights(store, keys, kinds, state.service, weights, guard=lock.guard)
        state.phase, state.reason = phase, reason
        state.note(f"{phase}: {reason}")
        await save(store, keys, state, lock)
        say(f"{phase}: {reason}")
        return state

    while True:
        current, _ = await load_state(store, keys, state.service)
        if current is not None and current.phase == ABORT_REQUESTED:
            return await finish(ABORTED, {state.baseline: 100}, "aborted by request")
        w = state.weight
        await set_weights(
            store, keys, kinds, state.service, {state.baseline: 100 - w, state.canary: w}, guard=lock.guard
        )
        say(f"step {state.step + 1}/{len(state.steps)}: {state.canary} {w}%, {state.baseline} {100 - w}%")
        before = await read_stats(store, keys, state.service)
        # Wait out the interval, but see an abort request within half a second.
        deadline = time.monotonic() + state.interval
        aborted = False
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.5))
            current, _ = await load_state(store, keys, state.service)
            if current is not None and current.phase == ABORT_REQUESTED:
                aborted = True
                break
        if aborted:
            return await finish(ABORTED, {state.baseline: 100}, "aborted by request")
        after = await _counts_since(store, keys, state.service, time.time(), before)
        why, measured = judge(state, delta(before, after))
        if measured["baseline"]["calls"] >= state.thresholds.min_calls:
            measured["baseline_p99"] = measured["baseline"]["p99"]
        elif "baseline_p99" in state.measured:
            measured["baseline_p99"] = state.measured["baseline_p99"]
        state.measured = measured
        canary = measured["canary"]
        summary = (
            f"canary {canary['calls']} calls, {canary['error_rate']:.2%} errors,"
            f" p99 {canary['p99'] * 1000:.1f} ms"
        )
        if why is not None:
            return await finish(ROLLED_BACK, {state.baseline: 100}, f"{why} at {w}%")
        if canary["calls"] < state.thresholds.min_calls:
            state.note(f"step {state.step + 1}: only {summary}; waiting for traffic")
            say(f"  only {canary['calls']} canary calls (< {state.thresholds.min_calls}); measuring again")
            await save(store, keys, state, lock)
            continue
        state.note(f"step {state.step + 1} ({w}%) passed: {summary}")
        say(f"  passed: {summary}")
        if state.step >= len(state.steps) - 1:
            return await finish(PROMOTED, {state.canary: 100}, f"{state.canary} takes all traffic")
        state.step += 1
        await save(store, keys, state, lock)


# ---------------------------------------------------------------------------------------------
# Switch and abort
# ---------------------------------------------------------------------------------------------


async def switch(store: Store, keys: MeshKeys, kinds: KindRegistry, service: str, to: str) -> int:
    """All traffic to subset `to` in one write (blue-green). Refused while a canary runs."""
    await check_subsets(store, keys, service, to)
    state, _ = await load_state(store, keys, service)
    if state is not None and state.phase in (RUNNING, ABORT_REQUESTED):
        raise Conflict(f"a canary rollout of {service!r} is running; `gmesh rollout abort {service}` first")
    return await set_weights(store, keys, kinds, service, {to: 100})


async def abort(store: Store, keys: MeshKeys, kinds: KindRegistry, service: str) -> str:
    """Ask the running controller to roll back; with no controller alive, roll back here."""
    state, revision = await load_state(store, keys, service)
    if state is None or state.phase not in (RUNNING, ABORT_REQUESTED):
        raise NotFound(f"no rollout of {service!r} is running")
    lock = RolloutLock(store, keys, service)
    if await lock.try_acquire():
        try:
            await set_weights(store, keys, kinds, service, {state.baseline: 100}, guard=lock.guard)
            state.phase, state.reason = ABORTED, "aborted by request (no controller was running)"
            state.note(state.reason)
            await save(store, keys, state, lock)
            return f"aborted: all traffic back to {state.baseline}"
        finally:
            await lock.release()
    state.phase = ABORT_REQUESTED
    result = await store.txn(
        [Compare(keys.rollout(service), "mod", revision)], [Put(keys.rollout(service), state.to_json())]
    )
    if not result.succeeded:
        raise Conflict("the rollout changed meanwhile; run abort again")
    return "abort requested: the controller rolls back within a second"
