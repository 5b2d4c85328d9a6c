"""Built-in plugin: the BALANCE phase — pick one endpoint of the call's service per attempt.

Round robin honouring endpoint weights for now; the Service kind's `balancer` field and
other policies (least-request, consistent hashing) plug in here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from gmesh.balancer import NoEndpoints, Picker, RoundRobin
from gmesh.chain.call import Call
from gmesh.chain.filter import Filter, FilterFactory, Handler, Phase
from gmesh.errors import CallError
from gmesh.hookspecs import hookimpl

if TYPE_CHECKING:
    from gmesh.discovery.catalog import MeshSnapshot


class Balance:
    """Sets `call.endpoint` from the service's picker, or fails the call UNAVAILABLE."""

    __slots__ = ("picker", "service", "size")

    def __init__(self, service: str, picker: Picker, size: int) -> None:
        self.service = service
        self.picker = picker
        self.size = size

    async def __call__(self, call: Call, next: Handler) -> Any:
        endpoint = self.picker.pick(call)
        if endpoint is None:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: service {call.service!r} has no endpoints")
        if endpoint.address in call.down:
            # Its connection is failing: try the others once each; if all fail, use the
            # first pick (the call then fails with the real connection error).
            for _ in range(self.size):
                other = self.picker.pick(call)
                if other is not None and other.address not in call.down:
                    endpoint = other
                    break
        call.endpoint = endpoint
        return await next(call)


class BalanceFactory:
    name = "balance"
    phase = Phase.BALANCE

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None:
        endpoints = snapshot.endpoints_of(service)
        picker: Picker = RoundRobin(endpoints) if endpoints else NoEndpoints()
        return Balance(service, picker, len(endpoints))


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [BalanceFactory()]
