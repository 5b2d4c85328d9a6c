"""Built-in plugin: the `Route` kind and the ROUTE phase — ordered rules that send each call to a backend.

The kind's model is `gmesh.routing.spec` (what users write); its compiled form is
`gmesh.routing.table` (predicates, a `Split`, policies), built once per config change and
handed to this filter as `ctx.route`. The filter matches the first rule, applies its
timeout, fault and metadata edits, sets `call.route` (read by later phases) and
`call.backend`, and mirrors a share of unary calls (at most 64 copies in flight per
service; the copies' answers are dropped). `gmesh explain` runs the same compiled table.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc

from gmesh.balancer.backends import Backends
from gmesh.chain.call import Call
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.config.kinds import KindRegistry
from gmesh.errors import CallError
from gmesh.hookspecs import hookimpl
from gmesh.routing.spec import ROUTE
from gmesh.routing.table import BackendKey, CompiledFault, CompiledRule, RouteTable

#: At most this many mirrored calls in flight per service; more are dropped (and counted).
MIRROR_IN_FLIGHT = 64


class MirrorState:
    """Mirrored calls in flight and dropped for one service (kept across config changes)."""

    __slots__ = ("dropped", "failed", "in_flight", "sent", "tasks")

    def __init__(self) -> None:
        self.in_flight = 0
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self.tasks: set[asyncio.Task[Any]] = set()


class Route:
    """Matches the call to a rule and applies it: fault, metadata edits, timeout, backend, mirror."""

    __slots__ = ("backends", "mirrors", "table")

    def __init__(self, table: RouteTable, backends: Backends, mirrors: MirrorState) -> None:
        self.table = table
        self.backends = backends
        self.mirrors = mirrors

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        rule = self.table.match(call)
        if rule is None:
            return await next(call)
        call.route = rule
        if rule.timeout is not None:
            limit = call.started + rule.timeout
            if call.deadline is None or limit < call.deadline:
                call.deadline = limit
        fault = rule.fault
        if fault is not None:
            await _inject(fault, rule, call)
        if rule.remove:
            call.metadata = rule.edit(call.metadata)
        call.backend = rule.choose(call)
        if rule.mirror is not None and call.mirror is not None and random.random() < rule.mirror_share:
            self._mirror(call, rule.mirror)
        return await next(call)

    def _mirror(self, call: Call[Any], key: BackendKey) -> None:
        state = self.mirrors
        if state.in_flight >= MIRROR_IN_FLIGHT or call.mirror is None:
            state.dropped += 1
            return
        backend = self.backends.get(key)
        endpoint = backend.picker.pick(call) if backend.ready is None else None
        if endpoint is None:
            state.dropped += 1
            return
        state.in_flight += 1
        state.sent += 1
        task: asyncio.Task[Any] = asyncio.ensure_future(call.mirror(call, endpoint))
        state.tasks.add(task)
        task.add_done_callback(self._mirror_done)

    def _mirror_done(self, task: asyncio.Task[Any]) -> None:
        state = self.mirrors
        state.in_flight -= 1
        state.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            state.failed += 1


async def _inject(fault: CompiledFault, rule: CompiledRule, call: Call[Any]) -> None:
    if fault.delay_share and random.random() < fault.delay_share:
        left = call.time_remaining()
        if left is not None and left <= fault.delay:
            await asyncio.sleep(left)
            raise CallError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"gmesh: deadline exceeded (fault delay of rule {rule.name!r})",
            )
        await asyncio.sleep(fault.delay)
    if fault.abort_share and random.random() < fault.abort_share:
        raise CallError(fault.abort_code, f"gmesh: fault injected by route rule {rule.name!r}")


class RouteFactory:
    """Builds the Route filter of services that have a Route (nothing for the others)."""

    name = "route"
    phase = Phase.ROUTE

    def build(self, ctx: BuildContext) -> Filter | None:
        if ctx.route is None:
            return None
        return Route(ctx.route, ctx.backends, ctx.kept("route.mirrors", MirrorState))


@hookimpl(trylast=True)
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(ROUTE)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [RouteFactory()]
