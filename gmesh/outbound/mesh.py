"""`MeshState`: what one process knows and counts about one mesh, kept across config changes —
endpoint states, backends, outlier detectors, breakers, retry budgets, call counters, and
the state plugins keep per service. One per outbound stack; never a process global.

`Build` is the `BuildContext` a filter factory gets when a service's chain is compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from gmesh.balancer.backends import Backends
from gmesh.balancer.breaker import BreakerState
from gmesh.balancer.outlier import OutlierDetector
from gmesh.balancer.state import EndpointStates
from gmesh.routing.retry import RetryBudget, RetryStats
from gmesh.stats.backend import StatsRegistry
from gmesh.stats.edits import NO_EDITS, TelemetryEdits
from gmesh.stats.metrics import MeshMetrics
from gmesh.stats.tap import TapHub

if TYPE_CHECKING:
    from gmesh.chain.compose import PluginFactory, ServiceChain
    from gmesh.config.kinds import Resource
    from gmesh.config.service import ServiceSpec
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.ratelimit.shares import GlobalLimits
    from gmesh.routing.table import RouteTable

T = TypeVar("T")
_EMPTY: Mapping[str, Any] = MappingProxyType({})

#: A Service without `retryBudget`: retries up to 20% of calls + 10/s over 10 s.
DEFAULT_BUDGET = (0.2, 10.0, 10.0)


class MeshState:
    """Per-mesh state of this process. Event loop only."""

    def __init__(
        self,
        snapshot: Callable[[], MeshSnapshot],
        *,
        on_activate: Callable[[str], None] | None = None,
        edits: TelemetryEdits = NO_EDITS,
    ) -> None:
        self.states = EndpointStates()
        self.detectors: dict[str, OutlierDetector] = {}
        self.backends = Backends(self.states, snapshot, detectors=self.detectors, on_activate=on_activate)
        self.breakers: dict[str, BreakerState] = {}
        self.budgets: dict[str, tuple[RetryBudget, RetryStats]] = {}
        self.stats = StatsRegistry()
        self.metrics = MeshMetrics(self)
        #: plugins' metadata redactors and access log fields (telemetry filters read them)
        self.edits = edits
        #: open `gmesh tap`s of this mesh, by service
        self.taps = TapHub()
        #: this process's shares of the mesh's global rate limits (set by the outbound stack)
        self.shares: GlobalLimits | None = None
        self._kept: dict[tuple[str, str], Any] = {}

    def breaker(self, service: str) -> BreakerState:
        """The circuit-breaker counts of calls to `service`."""
        state = self.breakers.get(service)
        if state is None:
            state = self.breakers[service] = BreakerState(service)
        return state

    def budget(self, service: str, spec: ServiceSpec | None) -> tuple[RetryBudget, RetryStats]:
        """The retry budget of `service` per its spec (a new one when the spec's numbers
        change; the counts of retries made and refused carry over)."""
        policy = spec.retry_budget if spec is not None else None
        ratio, floor, window = (
            DEFAULT_BUDGET if policy is None else (policy.percent / 100, policy.min_per_second, policy.window)
        )
        found = self.budgets.get(service)
        if found is not None:
            budget, stats = found
            if (budget.ratio, budget.min_per_second, budget.window) == (ratio, floor, max(int(window), 1)):
                return found
            found = (RetryBudget(ratio, floor, window), stats)
        else:
            found = (RetryBudget(ratio, floor, window), RetryStats())
        self.budgets[service] = found
        return found

    def kept(self, service: str, key: str, make: Callable[[], T]) -> T:
        """Plugin state of `service` that outlives config changes (see `BuildContext.kept`)."""
        found = self._kept.get((service, key))
        if found is None:
            found = self._kept[(service, key)] = make()
        return found

    def kept_of(self, service: str, prefix: str) -> list[Any]:
        """Plugin state kept for `service` under keys starting with `prefix` (config dumps)."""
        return [
            value for (svc, key), value in self._kept.items() if svc == service and key.startswith(prefix)
        ]

    def kept_under(self, prefix: str) -> list[Any]:
        """Plugin state of every service kept under keys starting with `prefix` (closing)."""
        return [value for (_, key), value in self._kept.items() if key.startswith(prefix)]

    def prune(self, service: str, prefix: str, keep: set[str]) -> None:
        """Drop `service`'s kept state under `prefix` except the keys in `keep` (a plugin whose
        config changed lets go of what the old config needed)."""
        for key in [
            k for k in self._kept if k[0] == service and k[1].startswith(prefix) and k[1] not in keep
        ]:
            del self._kept[key]

    def forget(self, service: str) -> None:
        """`service` left the mesh: drop what was kept for it."""
        self.breakers.pop(service, None)
        self.budgets.pop(service, None)
        self.metrics.forget(service)
        for key in [k for k in self._kept if k[0] == service]:
            del self._kept[key]


def compile_chain(
    snapshot: MeshSnapshot, factories: Sequence[PluginFactory], service: str, mesh: MeshState | None = None
) -> ServiceChain:
    """`service`'s chain as the data path compiles it, outside any stack (`gmesh explain`,
    `gmesh plugins`): on a mesh state of its own unless one is given. `factories` in `order`."""
    from gmesh.balancer.backends import service_spec
    from gmesh.chain.compose import build_chain
    from gmesh.routing.table import compile_table

    mesh = mesh or MeshState(lambda: snapshot)
    ctx = Build(
        service,
        snapshot,
        service_spec(snapshot, service),
        compile_table(service, snapshot),
        mesh.backends,
        mesh,
    )
    return build_chain(ctx, factories)


@dataclass(slots=True)
class Build:
    """The `gmesh.chain.BuildContext` of one service at one snapshot."""

    service: str
    snapshot: MeshSnapshot
    spec: ServiceSpec | None
    route: RouteTable | None
    backends: Backends
    mesh: MeshState

    def resources(self, kind: str) -> Mapping[str, Resource]:
        return self.snapshot.resources.get(kind, _EMPTY)

    def kept(self, key: str, make: Callable[[], T]) -> T:
        return self.mesh.kept(self.service, key, make)
