"""The filter contract, the phases that order filters, and the factories plugins give.

A filter is `async def __call__(call, next)`: it may reject (raise `CallError`), change the
call (metadata, destination, endpoint), or wrap what `next(call)` does (timing, retries).
Users configure policy, not order: a filter's phase places it, and the front door's
forwarder is always last.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

from gmesh.chain.call import Call

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot

Handler = Callable[[Call], Awaitable[Any]]


class Filter(Protocol):
    """One step of the chain. Concurrency: called for many calls at once; keep per-call
    state in `call` (or `call.stash`), never on the filter."""

    async def __call__(self, call: Call, next: Handler) -> Any: ...


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


class FilterFactory(Protocol):
    """What a plugin gives through `gmesh_filter_factories`: builds the filter of one service.

    `build` runs when the config or the endpoints change (never per request) and returns
    None when the filter has nothing to do for that service, so it costs nothing there.
    """

    name: str
    phase: Phase

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None: ...
