"""Global rate limits with no rate-limit service: every process takes a share of the limit.

Every process that enforces a `scope: global` RateLimit measures the calls it is offered (its
demand, calls/s over the last second) and publishes it under a lease of its own at
`<prefix>limits/<limit>/<process>`, once a second while it changes. Every process watches
`<prefix>limits/` and computes, from the same data, the same max-min fair shares of the
limit's rate: processes that want less than an equal share get what they want, the rest
split what remains, and capacity nobody wants is split evenly (so a process whose demand
grows is not starved until the next round). Each process then enforces its own share with a
local bucket (rate = its share, burst = its share of the burst). A process that dies stops
renewing its lease; when the lease expires (TTL 4 s) its key is deleted, every watcher
recomputes at once, and the others take its share.

Bounds. The shares always sum to the limit's rate; while they change, processes switch at
the moment each sees the change (a watch delivers it within milliseconds), so the total in
force exceeds the rate only for that spread; the burst is split the same way. Demand is
measured over one second, so a shift of load takes about two seconds to be followed
(under-admission, never over). A new process has no share until its demand is published (up
to 1 s). When etcd cannot be reached, each limit follows `onStoreUnavailable`: `share` keeps
the last share (default), `allow` stops limiting, `deny` refuses every call; said in the log,
the metrics (`gmesh_ratelimit_store_unavailable`) and the config dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gmesh.errors import GmeshError
from gmesh.store.etcd import Delete, Put, Resync, WatchBatch, WatchLost

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.ratelimit.limits import LimitState
    from gmesh.store.etcd import LeaseKeeper, Store

log = logging.getLogger(__name__)

INTERVAL = 1.0
TTL = 4
#: a share never quite 0: a bucket needs a rate (this refuses all but a call a day)
MIN_SHARE = 1e-5
#: shares are computed from demands this much higher than measured (still summing to the rate)
HEADROOM = 1.1


def max_min_shares(capacity: float, demands: Mapping[str, float]) -> dict[str, float]:
    """Max-min fair shares of `capacity` for `demands` (process -> calls/s), deterministic: the
    same answer in every process. Shares sum to `capacity`."""
    if not demands:
        return {}
    n = len(demands)
    remaining = capacity
    shares: dict[str, float] = {}
    for i, (process, demand) in enumerate(sorted(demands.items(), key=lambda item: (item[1], item[0]))):
        give = min(max(demand, 0.0), remaining / (n - i))
        shares[process] = give
        remaining -= give
    if remaining > 0:  # nobody wants it now: everyone may grow into an even slice
        for process in shares:
            shares[process] += remaining / n
    return shares


class GlobalLimits:
    """The demands and shares of this process for every global limit of one mesh. One per stack."""

    def __init__(self, store: Store, keys: MeshKeys, process: str | None = None) -> None:
        from gmesh.stats.backend import PROCESS

        self.store, self.keys = store, keys
        self.process = process or f"{PROCESS}-{uuid.uuid4().hex[:4]}"
        #: limit name -> its state here (registered by the limits that run here; a state whose
        #: limit changed or went away leaves with it)
        self.states: weakref.WeakValueDictionary[str, LimitState] = weakref.WeakValueDictionary()
        #: limit name -> process -> published demand (what every process computes from)
        self.view: dict[str, dict[str, float]] = {}
        self.store_ok = True
        #: the watch follows etcd / the last write that was needed succeeded / demands were read
        self._watch_ok = True
        self._publish_ok = True
        self.loaded = False
        self._published: dict[str, float] = {}
        self._counted: dict[str, tuple[int, float]] = {}
        self._lease = 0
        self._keeper: LeaseKeeper | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.rebalances = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._publish_loop(), name="gmesh-limit-demand"),
            loop.create_task(self._watch(), name="gmesh-limit-shares"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._keeper is not None:
            await self._keeper.stop()
        if self._lease:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self._lease, timeout=1.0)

    def register(self, state: LimitState) -> None:
        """A global limit runs here: take part in its shares (from the next round)."""
        self.states[state.name] = state
        self._apply(state.name)
        with contextlib.suppress(RuntimeError):  # no running loop (explain): nothing to follow
            self.start()

    # -- demand ------------------------------------------------------------------------------

    def demand(self, name: str, now: float) -> float:
        """Calls/s offered to limit `name` here since the last look (admitted or not)."""
        state = self.states[name]
        offered, since = self._counted.get(name, (state.offered, now - INTERVAL))
        self._counted[name] = (state.offered, now)
        return max(state.offered - offered, 0) / max(now - since, 1e-3)

    async def publish(self) -> bool:
        """Write this process's changed demands; whether etcd was asked at all."""
        now = time.monotonic()
        ops: list[Any] = []
        for name in list(self.states):
            demand = round(self.demand(name, now), 2)
            previous = self._published.get(name)
            if previous is not None and abs(demand - previous) <= max(0.05 * previous, 0.5):
                continue  # within 5%: not worth a write
            body = json.dumps({"demand": demand, "at": time.time()}).encode()
            ops.append((name, demand, body))
        for name in [n for n in self._published if n not in self.states]:
            ops.append((name, None, b""))
        if not ops:
            return False
        if not self._lease:
            self._lease = await self.store.grant_lease(TTL)
            if self._keeper is not None:
                await self._keeper.stop()
            self._keeper = self.store.keep_alive(self._lease, TTL, self._lost)
        txn = [
            Put(self.keys.limit_demand(name, self.process), body, self._lease)
            if demand is not None
            else Delete(self.keys.limit_demand(name, self.process))
            for name, demand, body in ops
        ]
        await self.store.txn((), txn)
        for name, demand, _ in ops:
            if demand is None:
                self._published.pop(name, None)
            else:
                self._published[name] = demand
        return True

    def _lost(self) -> None:
        self._lease = 0
        self._published.clear()

    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                if await self.publish():
                    self._publish_ok = True
                    self._refresh()
            except asyncio.CancelledError:
                raise
            except GmeshError as exc:
                self._publish_ok = False
                self._refresh(str(exc))
            except Exception:
                log.exception("publishing rate-limit demand failed")

    # -- shares ------------------------------------------------------------------------------

    async def _watch(self) -> None:
        root = self.keys.limits_root
        while True:
            try:
                async for item in self.store.watch(root):
                    if isinstance(item, WatchLost):
                        self._watch_ok = False
                        self._refresh(item.error)
                        continue
                    if isinstance(item, Resync):
                        self.view = {}
                        for kv in item.kvs:
                            self._index(kv.key, kv.value)
                        self.loaded = True
                    elif isinstance(item, WatchBatch):
                        for event in item.events:
                            self._index(event.kv.key, event.kv.value)
                    self._watch_ok = True
                    if not self._refresh():
                        for name in list(self.states):
                            self._apply(name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following rate-limit demands failed; again in 1s")
                await asyncio.sleep(1.0)

    def _index(self, key: str, value: bytes) -> None:
        name, _, process = key[len(self.keys.limits_root) :].partition("/")
        if not name or not process:
            return
        demands = self.view.setdefault(name, {})
        if not value:
            demands.pop(process, None)
            return
        try:
            demands[process] = float(json.loads(value)["demand"])
        except (ValueError, KeyError, TypeError):
            demands.pop(process, None)

    def shares(self, name: str) -> dict[str, float]:
        state = self.states[name]
        demands = dict(self.view.get(name, {}))
        demands.setdefault(self.process, self._published.get(name, 0.0))
        # a little headroom: a demand measured over one second is a little off, and may grow
        return max_min_shares(state.spec.rate, {p: d * HEADROOM for p, d in demands.items()})

    def _apply(self, name: str) -> None:
        state = self.states.get(name)
        if state is None:
            return
        spec = state.spec
        rate = spec.rate
        if not self.store_ok and spec.on_store_unavailable != "share":
            if spec.on_store_unavailable == "deny":
                state.set_share(rate, blocked=True)
            else:  # allow: no limit while etcd is away
                state.set_share(1e12)
        elif not self.loaded:
            # start-up, the demands not read yet (milliseconds): the full rate, a burst of one
            state.set_share(rate, burst=1)
        else:
            state.set_share(max(self.shares(name).get(self.process, 0.0), MIN_SHARE))
        self.rebalances += 1

    def _refresh(self, why: str = "") -> bool:
        """Follow etcd's reachability (the watch, and the writes that were needed); whether it
        changed (every limit's share is then applied again)."""
        ok = self._watch_ok and self._publish_ok
        if ok == self.store_ok:
            return False
        self.store_ok = ok
        if ok:
            log.info("etcd answers again: global rate limits share again")
        else:
            log.warning("etcd cannot be reached (%s): global rate limits follow onStoreUnavailable", why)
        for name in list(self.states):
            self._apply(name)
        return True

    def describe(self, name: str) -> dict[str, Any]:
        shares = self.shares(name) if name in self.states else {}
        return {
            "process": self.process,
            "share": round(shares.get(self.process, 0.0), 3),
            "processes": len(shares),
            "demands": dict(sorted(self.view.get(name, {}).items())),
            "storeReachable": self.store_ok,
        }
