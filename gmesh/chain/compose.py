"""Composing filters into one callable per service, when the service's config changes.

The composed chain is plain nested calls: no hook dispatch, no sorting, no lookups per
request. A change builds the service's new chain and swaps one reference; a call in flight
keeps the handler it started with. A factory that fails to build makes that service's
chain refuse every call (fail closed): an authorization filter that cannot be built must
never let calls through without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from gmesh.chain.call import Call
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.errors import CallError

log = logging.getLogger(__name__)


async def forward(call: Call[Any]) -> Any:
    """The end of every chain: the front door's own forwarder."""
    return await call.forward(call)


def _bind(f: Filter, next: Handler) -> Handler:
    # A plain function that returns the filter's coroutine: one small frame per filter,
    # and filters receive `next` positionally (any parameter name works).
    def step(call: Call[Any]) -> Any:
        return f(call, next)

    return step


def compose(filters: Sequence[Filter]) -> Handler:
    """One handler running `filters` in order, then the forwarder."""
    handler: Handler = forward
    for f in reversed(filters):
        handler = _bind(f, handler)
    return handler


@dataclass(frozen=True, slots=True)
class PluginFactory:
    """A filter factory and the plugin that gave it (for error messages and `gmesh plugins`)."""

    plugin: str
    factory: FilterFactory

    @property
    def name(self) -> str:
        return self.factory.name

    @property
    def phase(self) -> Phase:
        return self.factory.phase


@dataclass(frozen=True, slots=True)
class ServiceChain:
    """The compiled chain of one service: its handler, the names of its filters (for config
    dumps), and why it refuses calls when a filter failed to build (`error`, else None)."""

    handler: Handler
    filters: tuple[str, ...]
    error: str | None = None


def order(factories: Sequence[PluginFactory]) -> list[PluginFactory]:
    """Phase order, then plugin order within a phase."""
    return [f for _, f in sorted(enumerate(factories), key=lambda item: (item[1].phase, item[0]))]


def build_chain(ctx: BuildContext, factories: Sequence[PluginFactory]) -> ServiceChain:
    """Call every factory (already in `order`) for `ctx.service` and compose what they give."""
    filters: list[Filter] = []
    names: list[str] = []
    for pf in factories:
        try:
            built = pf.factory.build(ctx)
        except Exception as exc:
            error = (
                f"filter {pf.name!r} of plugin {pf.plugin!r} failed to build for service "
                f"{ctx.service!r}: {type(exc).__name__}: {exc}"
            )
            log.error("%s; refusing its calls until it builds", error, exc_info=True)
            return ServiceChain(_refuse(ctx.service, error), (*names, f"{pf.name} (failed)"), error)
        if built is not None:
            filters.append(built)
            names.append(pf.name)
    return ServiceChain(compose(filters), (*names, "forward"))


def _refuse(service: str, error: str) -> Handler:
    async def refuse(call: Call[Any]) -> Any:
        raise CallError(
            grpc.StatusCode.UNAVAILABLE, f"gmesh: {error}; calls to {service!r} are refused until it builds"
        )

    return refuse
