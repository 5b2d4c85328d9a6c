"""Composing filters: phase order, the forwarder last, broken factories left out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from gmesh.chain.call import Call
from gmesh.chain.compose import build_table, compose
from gmesh.chain.filter import Filter, Handler, Phase
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.discovery.endpoint import Endpoint
from gmesh.errors import CallError
from gmesh.plugins.balancer import BalanceFactory


class Tag:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.seen.append(self.name)
        return await next(call)


class Factory:
    def __init__(
        self, name: str, phase: Phase, seen: list[str], *, skip: str = "", broken: bool = False
    ) -> None:
        self.name, self.phase, self.seen, self.skip, self.broken = name, phase, seen, skip, broken

    def build(self, service: str, snapshot: MeshSnapshot) -> Filter | None:
        if self.broken:
            raise RuntimeError("plugin bug")
        return None if service == self.skip else Tag(self.name, self.seen)


def make_call(forward: Any, service: str = "orders") -> Call:
    return Call("/shop.Orders/Get", (), time.monotonic() + 5, service, forward)


async def answer(call: Call) -> str:
    return f"forwarded {call.service}"


def snapshot(*services: str) -> MeshSnapshot:
    return MeshSnapshot(revision=7, endpoints={s: (Endpoint(s, "127.0.0.1:1"),) for s in services})


def test_compose_runs_filters_in_order_then_forwards() -> None:
    seen: list[str] = []
    handler = compose([Tag("a", seen), Tag("b", seen)])
    assert asyncio.run(handler(make_call(answer))) == "forwarded orders"
    assert seen == ["a", "b"]
    assert asyncio.run(compose([])(make_call(answer))) == "forwarded orders"


def test_table_orders_by_phase_skips_unneeded_and_broken_filters() -> None:
    seen: list[str] = []
    factories = [
        Factory("limit", Phase.LIMIT, seen),
        Factory("observe", Phase.OBSERVE, seen, skip="payments"),
        Factory("broken", Phase.ROUTE, seen, broken=True),
        Factory("authz", Phase.AUTHORIZE, seen),
    ]
    table = build_table(snapshot("orders", "payments"), factories)
    assert table.revision == 7
    assert table.describe() == {
        "orders": ["observe", "authz", "limit", "forward"],
        "payments": ["authz", "limit", "forward"],
    }
    asyncio.run(table.chains["orders"].handler(make_call(answer)))
    assert seen == ["observe", "authz", "limit"]


def test_balance_picks_an_endpoint_or_fails_unavailable() -> None:
    table = build_table(
        MeshSnapshot(revision=1, endpoints={"orders": (Endpoint("orders", "127.0.0.1:9"),)}),
        [BalanceFactory()],
    )

    async def where(call: Call) -> str:
        assert call.endpoint is not None
        return call.endpoint.address

    assert asyncio.run(table.chains["orders"].handler(make_call(where))) == "127.0.0.1:9"
    empty = build_table(MeshSnapshot(revision=2, resources={"Service": {"ghost": None}}), [BalanceFactory()])  # type: ignore[dict-item]
    with pytest.raises(CallError) as err:
        asyncio.run(empty.chains["ghost"].handler(make_call(where, "ghost")))
    assert err.value.status == grpc.StatusCode.UNAVAILABLE and "'ghost' has no endpoints" in err.value.details


@pytest.mark.parametrize(
    ("left", "ceiling"),
    [(0.5, 0.5), (2.998, 2.99), (9.999, 9.99), (12.34, 12.3), (150.7, 150.0)],
)
def test_upstream_timeout_never_exceeds_what_grpc_can_carry(left: float, ceiling: float) -> None:
    call = Call("/a.B/C", (), time.monotonic() + left, "s", answer)
    timeout = call.upstream_timeout()
    assert timeout is not None
    assert ceiling - 0.01 <= timeout <= ceiling - 0.001
    assert Call("/a.B/C", (), None, "s", answer).upstream_timeout() is None
