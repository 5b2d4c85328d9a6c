"""Built-in plugin: per-backend counters of attempts (calls, failures, latency histogram).

It runs in the ATTEMPT phase, below retries: a release that fails every tenth call counts
as failing even when retries hide those failures from callers. It counts calls of
services that have a Route (the ones rollouts can move) into the mesh's counters
(`gmesh.stats.backend`), which the outbound stack publishes to etcd for canary rollouts.
A failure is what `gmesh.errors.outcome_of` calls one, in both front doors and for every
RPC kind: a stream that ends with an error counts as failed.
"""

from __future__ import annotations

import time
from typing import Any

from gmesh.chain.call import Call
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.errors import outcome_of
from gmesh.hookspecs import hookimpl
from gmesh.stats.backend import BackendStats, StatsRegistry


class CountCalls:
    """Times one attempt and counts its outcome against the backend it went to."""

    __slots__ = ("by_backend", "registry")

    def __init__(self, service: str, registry: StatsRegistry) -> None:
        self.registry = registry
        self.by_backend: dict[tuple[str, str | None] | None, BackendStats] = {
            None: registry.of(service, None)
        }

    def _stats(self, call: Call[Any]) -> BackendStats:
        key = call.backend
        stats = self.by_backend.get(key)
        if stats is None:
            assert key is not None
            stats = self.by_backend[key] = self.registry.of(*key)
        return stats

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        started = time.perf_counter()
        try:
            result = await next(call)
        except BaseException as exc:
            self._stats(call).record(time.perf_counter() - started, outcome_of(exc).failed)
            raise
        self._stats(call).record(time.perf_counter() - started, False)
        return result


class StatsFactory:
    """Counts calls of services that have a Route (the ones rollouts can move)."""

    name = "stats"
    phase = Phase.ATTEMPT

    def build(self, ctx: BuildContext) -> Filter | None:
        if ctx.route is None:
            return None
        return CountCalls(ctx.service, ctx.mesh.stats)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [StatsFactory()]
