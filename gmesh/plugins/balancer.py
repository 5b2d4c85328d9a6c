"""Built-in plugin: the BALANCE phase — pick one endpoint of the call's backend per attempt.

A backend is `(service, subset)`: the ROUTE phase sets `call.backend`; without a route it
is every endpoint of the destination service. The picker comes from the mesh's live
backend table (`gmesh.balancer.backends`), built when the service is first called. An
endpoint whose connection fails, that an earlier attempt used, or that is at its
`maxRequestsPerEndpoint` is passed over for another (the next one, for ordered pickers).
With `wait_for_ready`, a call with no endpoint to go to waits for one up to its deadline.

The filter counts each attempt in the endpoint's state — calls in flight, peak-EWMA
latency of successful unary attempts, failures the endpoint is to blame for — which
least_request and peak_ewma read and outlier detection judges.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.balancer.backends import Backend, BackendKey, Backends, wait_ready
from gmesh.chain.call import Call
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import CallError, outcome_of
from gmesh.hookspecs import hookimpl

if TYPE_CHECKING:
    from gmesh.discovery.endpoint import Endpoint
    from gmesh.outbound.mesh import MeshState

_UNARY = MethodKind.UNARY


def _no_endpoints(call: Call[Any], key: BackendKey) -> CallError:
    service, subset = key
    what = f"service {service!r}" if subset is None else f"subset {subset!r} of service {service!r}"
    return CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: {what} has no endpoints")


def _waited_too_long(key: BackendKey) -> CallError:
    return CallError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"gmesh: deadline exceeded waiting for an endpoint of service {key[0]!r} (wait_for_ready)",
    )


class Balance:
    """Sets `call.endpoint` from the picker of the call's backend and counts the attempt there."""

    __slots__ = ("backends", "default", "mesh")

    def __init__(self, service: str, backends: Backends, mesh: MeshState) -> None:
        self.mesh = mesh
        self.default: BackendKey = (service, None)
        self.backends = backends

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        key = call.backend or self.default
        backend = self.backends.table.get(key)
        if backend is None or backend.ready is not None:
            backend = await self._backend(call, key)
        endpoint = backend.picker.pick(call)
        if endpoint is None or not _fits(endpoint, call, backend):
            endpoint, backend = await self._pick_slowly(call, key, backend, endpoint)
        call.endpoint = endpoint
        state = backend.states.get(endpoint.address)
        if state is None:  # a picker of a table being replaced, on an endpoint that just left
            return await next(call)
        state.inflight += 1
        started = time.perf_counter()
        try:
            result = await next(call)
        except BaseException as exc:
            state.inflight -= 1
            outcome = outcome_of(exc, call.committed)
            # Only answers measure speed: a fast failure must not attract more calls.
            state.observe(None, outcome.endpoint_fault, time.perf_counter())
            if outcome.endpoint_fault and backend.detector is not None:
                backend.detector.on_failure(state)
            raise
        state.inflight -= 1
        ended = time.perf_counter()  # also the EWMA's clock (perf_counter is monotonic)
        # A stream's length says nothing about the endpoint's speed: latency of unary calls only.
        state.observe(ended - started if call.kind is _UNARY else None, False, ended)
        return result

    async def _backend(self, call: Call[Any], key: BackendKey) -> Backend:
        backend = self.backends.get(key)
        while backend.ready is not None:  # its consistent-hash table is being built
            if not await wait_ready(backend, call.time_remaining()):
                raise _waited_too_long(key)
            backend = self.backends.get(key)
        return backend

    async def _pick_slowly(
        self, call: Call[Any], key: BackendKey, backend: Backend, first: Endpoint | None
    ) -> tuple[Endpoint, Backend]:
        """The first pick cannot take the call (or there is none): another endpoint, or the first
        one after all, or — with wait_for_ready — the first to come, up to the deadline."""
        while True:
            if first is not None:
                fits = _fitting(call, backend)
                other = backend.picker.pick_other(call, fits)
                if other is not None:
                    return other, backend
                limit = backend.per_endpoint
                state = backend.states.get(first.address)
                if limit is not None and state is not None and state.inflight >= limit:
                    self.mesh.breaker(backend.key[0]).endpoint_rejected += 1
                    raise CallError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"gmesh: circuit breaker: the endpoints of {backend.describe()} tried have "
                        f"{limit} calls in flight each (maxRequestsPerEndpoint)",
                    )
                if not (call.wait_for_ready and first.address in call.down):
                    # an earlier attempt's endpoint, or a failing connection with no better one:
                    # go ahead (a failing connection fails the attempt fast)
                    return first, backend
            elif not call.wait_for_ready:
                raise _no_endpoints(call, key)
            # wait_for_ready: for endpoints to appear or a connection to come up
            if not await self.backends.changed(call.time_remaining()):
                raise _waited_too_long(key)
            backend = await self._backend(call, key)
            first = backend.picker.pick(call)
            if first is not None and _fits(first, call, backend):
                return first, backend


def _fitting(call: Call[Any], backend: Backend) -> Callable[[Endpoint], bool]:
    return lambda endpoint: _fits(endpoint, call, backend)


def _fits(endpoint: Endpoint, call: Call[Any], backend: Backend) -> bool:
    """Whether `endpoint` can take this attempt: its connection works, no earlier attempt of the
    call used it, it is below its per-endpoint limit, and it is still an endpoint of the backend."""
    address = endpoint.address
    if address in call.down:
        return False
    tried = call.tried
    if tried is not None and address in tried:
        return False
    state = backend.states.get(address)
    if state is None:
        return False
    limit = backend.per_endpoint
    return limit is None or state.inflight < limit


class BalanceFactory:
    name = "balance"
    phase = Phase.BALANCE

    def build(self, ctx: BuildContext) -> Filter | None:
        return Balance(ctx.service, ctx.backends, ctx.mesh)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [BalanceFactory()]
