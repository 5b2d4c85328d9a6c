"""The filter contract, the phases that order filters, and the factories plugins give.

A filter is `async def __call__(call, next)`: it may reject (raise `CallError`), change the
call (metadata, destination, endpoint), or wrap what `next(call)` does (timing, retries).
Users configure policy, not order: a filter's phase places it, and the front door's
forwarder is always last.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from gmesh.chain.call import Call

if TYPE_CHECKING:
    from gmesh.balancer.backends import Backends
    from gmesh.config.kinds import Resource
    from gmesh.config.service import ServiceSpec
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.outbound.mesh import MeshState
    from gmesh.routing.table import RouteTable

Handler = Callable[[Call[Any]], Awaitable[Any]]
T = TypeVar("T")


class Filter(Protocol):
    """One step of the chain, called as ``await filter(call, next)`` (both positional).

    Concurrency: called for many calls at once; keep per-call state in `call` (or
    `call.stash`), never on the filter. Per-service state that must outlive a config change
    (counters, budgets) comes from `BuildContext.kept` when the filter is built.
    """

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any: ...


class Phase(IntEnum):
    """Where a filter runs, in this order, before the forwarder."""

    OBSERVE = 100  # tracing, metrics, access log: see everything, including rejections
    AUTHENTICATE = 200  # who is calling
    AUTHORIZE = 300  # may they
    LIMIT = 400  # rate limits, quotas
    ROUTE = 500  # pick the backend (subset, other service), fault injection, mirroring
    RETRY = 600  # retries and per-try timeouts wrap everything below
    ATTEMPT = 650  # sees each attempt: per-backend counters, passive health
    BALANCE = 700  # pick one endpoint of the backend (per attempt)


class BuildContext(Protocol):
    """What a filter factory gets to build one service's filter (never per request).

    `service`: the destination mesh service. `snapshot`: the whole mesh (config and
    endpoints) at this revision. `spec`: the service's `Service` spec (None without one).
    `route`: its compiled `Route` (None without one). `backends`: the mesh's live table of
    backends (`(service, subset)` -> pickers), looked up per attempt. `mesh`: this process's
    state of the mesh (endpoint states, breakers, retry budgets, counters).
    """

    service: str
    snapshot: MeshSnapshot
    spec: ServiceSpec | None
    route: RouteTable | None
    backends: Backends
    mesh: MeshState

    def resources(self, kind: str) -> Mapping[str, Resource]:
        """Every resource of `kind` (name -> resource), e.g. a plugin's own config kind."""
        ...

    def kept(self, key: str, make: Callable[[], T]) -> T:
        """Per-service state that outlives config changes: the object made by `make()` the first
        time `key` is asked for this service in this mesh, the same object every time after."""
        ...


class FilterFactory(Protocol):
    """What a plugin gives through `gmesh_filter_factories`: builds the filter of one service.

    `build` runs when the service is first called and again when its config changes (never
    per request), and returns None when the filter has nothing to do for that service, so
    it costs nothing there. A `build` that raises makes the service's chain fail closed:
    its calls end UNAVAILABLE naming the plugin until a build succeeds.
    """

    name: str
    phase: Phase

    def build(self, ctx: BuildContext) -> Filter | None: ...
