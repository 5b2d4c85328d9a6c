"""Composing filters into one callable per service, once per snapshot, and swapping it in.

The composed chain is plain nested calls: no hook dispatch, no sorting, no lookups per
request. A change builds a whole new `ChainTable` and swaps one reference; a call in
flight keeps the handler it started with.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gmesh.chain.call import Call
from gmesh.chain.filter import Filter, FilterFactory, Handler

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot

log = logging.getLogger(__name__)


async def forward(call: Call) -> Any:
    """The end of every chain: the front door's own forwarder."""
    return await call.forward(call)


def compose(filters: Sequence[Filter]) -> Handler:
    """One handler running `filters` in order, then the forwarder."""
    handler: Handler = forward
    for f in reversed(filters):
        # partial, not a closure: calling it returns the filter's coroutine directly,
        # one frame per filter instead of two.
        handler = functools.partial(f, next=handler)
    return handler


@dataclass(frozen=True, slots=True)
class ServiceChain:
    """The compiled chain of one service, and the names of its filters (for config dumps)."""

    handler: Handler
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ChainTable:
    """Compiled chains by destination service, for one snapshot revision."""

    revision: int
    chains: Mapping[str, ServiceChain] = field(default_factory=lambda: MappingProxyType({}))

    def describe(self) -> dict[str, list[str]]:
        return {service: list(chain.filters) for service, chain in sorted(self.chains.items())}


def build_table(snapshot: MeshSnapshot, factories: Iterable[FilterFactory]) -> ChainTable:
    """Call every factory for every service of `snapshot` and compose the results."""
    ordered = sorted(enumerate(factories), key=lambda item: (item[1].phase, item[0]))
    chains: dict[str, ServiceChain] = {}
    for service in snapshot.services():
        filters: list[Filter] = []
        names: list[str] = []
        for _, factory in ordered:
            try:
                built = factory.build(service, snapshot)
            except Exception:
                # A broken plugin must not take the data path down: skip its filter for
                # this service and say so (the previous table stays in force elsewhere).
                log.exception(
                    "filter factory %s failed for service %s; leaving it out", factory.name, service
                )
                continue
            if built is not None:
                filters.append(built)
                names.append(factory.name)
        chains[service] = ServiceChain(compose(filters), (*names, "forward"))
    return ChainTable(snapshot.revision, MappingProxyType(chains))
