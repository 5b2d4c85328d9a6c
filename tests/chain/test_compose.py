"""Composing filters: phase order, the forwarder last, `next` positional, broken factories fail closed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from gmesh.chain import BuildContext, Call, Filter, Handler, Phase, PluginFactory, build_chain, compose
from gmesh.chain.compose import order
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.discovery.endpoint import Endpoint
from gmesh.errors import CallError
from gmesh.outbound.mesh import Build, MeshState
from gmesh.plugins.balancer import BalanceFactory


class Tag:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        self.seen.append(self.name)
        return await next(call)


class OtherNames:
    """A third party's filter that names its parameters its own way: `next` comes positionally."""

    async def __call__(self, c: Call[Any], proceed: Handler) -> Any:
        c.stash["seen"] = True
        return await proceed(c)


class Factory:
    def __init__(
        self, name: str, phase: Phase, seen: list[str], *, skip: str = "", broken: bool = False
    ) -> None:
        self.name, self.phase, self.seen, self.skip, self.broken = name, phase, seen, skip, broken

    def build(self, ctx: BuildContext) -> Filter | None:
        if self.broken and ctx.service != self.skip:
            raise RuntimeError("plugin bug")
        return None if ctx.service == self.skip else Tag(self.name, self.seen)


def make_call(forward: Any, service: str = "orders") -> Call[None]:
    return Call("/shop.Orders/Get", (), time.monotonic() + 5, service, forward)


async def answer(call: Call[None]) -> str:
    return f"forwarded {call.service}"


def snapshot(*services: str) -> MeshSnapshot:
    return MeshSnapshot(revision=7, endpoints={s: (Endpoint(s, "127.0.0.1:1"),) for s in services})


def context(service: str, snap: MeshSnapshot) -> Build:
    mesh = MeshState(lambda: snap)
    return Build(service, snap, None, None, mesh.backends, mesh)


def plugin(*factories: Any, name: str = "example") -> list[PluginFactory]:
    return order([PluginFactory(name, f) for f in factories])


def test_compose_runs_filters_in_order_then_forwards() -> None:
    seen: list[str] = []
    handler = compose([Tag("a", seen), Tag("b", seen)])
    assert asyncio.run(handler(make_call(answer))) == "forwarded orders"
    assert seen == ["a", "b"]
    assert asyncio.run(compose([])(make_call(answer))) == "forwarded orders"


def test_next_is_passed_positionally_whatever_the_filter_calls_it() -> None:
    call = make_call(answer)
    assert asyncio.run(compose([OtherNames()])(call)) == "forwarded orders"
    assert call.stash == {"seen": True}


def test_chain_orders_by_phase_and_skips_unneeded_filters() -> None:
    seen: list[str] = []
    factories = plugin(
        Factory("limit", Phase.LIMIT, seen),
        Factory("observe", Phase.OBSERVE, seen, skip="payments"),
        Factory("authz", Phase.AUTHORIZE, seen),
    )
    snap = snapshot("orders", "payments")
    orders = build_chain(context("orders", snap), factories)
    payments = build_chain(context("payments", snap), factories)
    assert orders.filters == ("observe", "authz", "limit", "forward") and orders.error is None
    assert payments.filters == ("authz", "limit", "forward")
    asyncio.run(orders.handler(make_call(answer)))
    assert seen == ["observe", "authz", "limit"]


def test_a_factory_that_fails_to_build_makes_the_chain_refuse_every_call() -> None:
    seen: list[str] = []
    factories = [
        *plugin(Factory("observe", Phase.OBSERVE, seen)),
        *plugin(Factory("authz", Phase.AUTHORIZE, seen, broken=True, skip="payments"), name="acme-authz"),
    ]
    snap = snapshot("orders", "payments")
    chain = build_chain(context("orders", snap), order(factories))
    assert chain.error is not None
    assert "filter 'authz' of plugin 'acme-authz' failed to build for service 'orders'" in chain.error
    assert "RuntimeError: plugin bug" in chain.error
    assert chain.filters == ("observe", "authz (failed)")
    with pytest.raises(CallError) as err:
        asyncio.run(chain.handler(make_call(answer)))
    assert err.value.status == grpc.StatusCode.UNAVAILABLE
    assert "acme-authz" in err.value.details and "refused until it builds" in err.value.details
    assert seen == []  # fail closed: no filter ran, nothing was forwarded
    # the other service, whose build works, is not affected
    assert build_chain(context("payments", snap), order(factories)).error is None


def test_balance_picks_an_endpoint_or_fails_unavailable() -> None:
    snap = MeshSnapshot(revision=1, endpoints={"orders": (Endpoint("orders", "127.0.0.1:9"),)})

    async def where(call: Call[None]) -> str:
        assert call.endpoint is not None
        return call.endpoint.address

    chain = build_chain(context("orders", snap), plugin(BalanceFactory()))
    assert asyncio.run(chain.handler(make_call(where))) == "127.0.0.1:9"
    ghost = MeshSnapshot(revision=2, resources={"Service": {"ghost": None}})  # type: ignore[dict-item]
    empty = build_chain(context("ghost", ghost), plugin(BalanceFactory()))
    with pytest.raises(CallError) as err:
        asyncio.run(empty.handler(make_call(where, "ghost")))
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


def test_call_header_reads_request_metadata() -> None:
    call = Call(
        "/a.B/C", (("x-user", "alice"), ("x-trace-bin", b"\x01"), ("x-user", "bob")), None, "s", answer
    )
    assert call.header("x-user") == "alice"
    assert call.header("x-trace-bin") == "\x01"
    assert call.header("missing") is None
