"""Built-in plugin: the BALANCE phase — pick one endpoint of the call's backend per attempt.

A backend is `(service, subset)`: the ROUTE phase sets `call.backend`; without a route it
is every endpoint of the destination service. Each backend has one picker (weighted
round robin for now), built once per snapshot and shared by every chain that reaches it
(a route may send calls to another service's subset). The Service kind's `balancer` field
and other policies (least-request, consistent hashing) plug in here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.balancer import NoEndpoints, Picker, RoundRobin
from gmesh.chain.call import Call
from gmesh.chain.filter import Filter, FilterFactory, Handler, Phase
from gmesh.errors import CallError
from gmesh.hookspecs import hookimpl

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot
    from gmesh.discovery.endpoint import Endpoint

BackendKey = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class Backend:
    """The endpoints of one backend and the picker over them."""

    key: BackendKey
    picker: Picker
    size: int

    def describe(self) -> str:
        service, subset = self.key
        return f"service {service!r}" if subset is None else f"subset {subset!r} of service {service!r}"


def subset_endpoints(snapshot: MeshSnapshot, service: str, subset: str | None) -> tuple[Endpoint, ...]:
    """The endpoints of `service` whose labels carry every label of `subset` (all without one)."""
    endpoints = snapshot.endpoints_of(service)
    if subset is None:
        return endpoints
    resource = snapshot.resource("Service", service)
    selector: Mapping[str, str] | None = (
        getattr(resource.spec, "subsets", {}).get(subset) if resource else None
    )
    if selector is None:
        return ()
    return tuple(e for e in endpoints if all(e.labels.get(k) == v for k, v in selector.items()))


_cache: tuple[MeshSnapshot | None, Mapping[BackendKey, Backend]] = (None, MappingProxyType({}))


def backends(snapshot: MeshSnapshot) -> Mapping[BackendKey, Backend]:
    """Every backend of `snapshot`: each service whole, and each of its subsets.

    Computed once per snapshot (the balance and route filters of every service share it).
    """
    global _cache
    cached_snapshot, cached = _cache
    if cached_snapshot is snapshot:
        return cached
    table: dict[BackendKey, Backend] = {}
    for service in snapshot.services():
        resource = snapshot.resource("Service", service)
        subsets: list[str | None] = [None, *(getattr(resource.spec, "subsets", {}) if resource else ())]
        for subset in subsets:
            endpoints = subset_endpoints(snapshot, service, subset)
            picker: Picker = RoundRobin(endpoints) if endpoints else NoEndpoints()
            table[(service, subset)] = Backend((service, subset), picker, len(endpoints))
    result = MappingProxyType(table)
    _cache = (snapshot, result)
    return result


_NONE = Backend(("", None), NoEndpoints(), 0)


class Balance:
    """Sets `call.endpoint` from the picker of the call's backend, or fails the call UNAVAILABLE."""

    __slots__ = ("backends", "default")

    def __init__(self, default: Backend, table: Mapping[BackendKey, Backend]) -> None:
        self.default = default
        self.backends = table

    async def __call__(self, call: Call, next: Handler) -> Any:
        key = call.backend
        backend = self.default if key is None else self.backends.get(key, _NONE)
        picker = backend.picker
        endpoint = picker.pick(call)
        if endpoint is None:
            what = Backend(key, picker, 0).describe() if key is not None else f"service {call.service!r}"
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: {what} has no endpoints")
        avoid = call.tried
        if endpoint.address in call.down or (avoid is not None and endpoint.address in avoid):
            # Its connection is failing (or an earlier attempt used it): try the others
            # once each; if none is better, keep the first pick.
            for _ in range(backend.size):
                other = picker.pick(call)
                if (
                    other is not None
                    and other.address not in call.down
                    and (avoid is None or other.address not in avoid)
                ):
                    endpoint = other
                    break
        call.endpoint = endpoint
        return await next(call)


class BalanceFactory:
    name = "balance"
    phase = Phase.BALANCE

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None:
        table = backends(snapshot)
        return Balance(table[(service, None)], table)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [BalanceFactory()]
