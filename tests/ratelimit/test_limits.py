"""Compiled limits on plain `Call` objects: keys, overrides, message limits per stream and per key,
and the refusal a caller gets (pure logic; the doors are tested in tests/integration)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gmesh.chain.call import Call, Caller
from gmesh.config.kinds import Resource
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import CallError
from gmesh.ratelimit.limits import RateLimiter, caller_key, limits_of
from gmesh.ratelimit.spec import RateLimitSpec


async def _forward(call: Call[Any]) -> None:
    return None


def limiter(**spec: Any) -> RateLimiter:
    parsed = RateLimitSpec.model_validate({"service": "orders", **spec})
    states: dict[str, Any] = {}
    return RateLimiter(
        limits_of(
            {"l": Resource("RateLimit", "l", parsed)}, "orders", lambda k, make: states.setdefault(k, make())
        )
    )


def call(key: str = "", kind: MethodKind = MethodKind.UNARY, **caller: Any) -> Call[Any]:
    metadata = (("x-api-key", key),) if key else ()
    return Call(
        "/orders.v1.Orders/Get", metadata, None, "orders", _forward, kind=kind, caller=Caller(**caller)
    )


def admitted(rl: RateLimiter, calls: list[Call[Any]]) -> int:
    n = 0
    for c in calls:
        try:
            rl.check(c)
            n += 1
        except CallError:
            pass
    return n


def test_keys_and_overrides() -> None:
    rl = limiter(
        rate="1/h", burst=2, key="metadata:x-api-key", overrides=[{"key": "vip", "rate": "1/h", "burst": 5}]
    )
    assert admitted(rl, [call("a") for _ in range(10)]) == 2
    assert admitted(rl, [call("b") for _ in range(10)]) == 2
    assert admitted(rl, [call("vip") for _ in range(10)]) == 5
    assert admitted(rl, [call() for _ in range(10)]) == 2  # no key value: one shared bucket


def test_caller_key_is_the_identity_else_labels_else_host() -> None:
    assert caller_key(call(identity="spiffe://d/svc/web", peer="ipv4:10.0.0.1:5")) == "spiffe://d/svc/web"
    assert caller_key(call(labels={"team": "a", "app": "x"})) == "app=x,team=a"
    assert caller_key(call(peer="ipv4:10.0.0.1:50123")) == "ipv4:10.0.0.1"


def test_a_refusal_names_the_limit_and_carries_retry_info() -> None:
    rl = limiter(rate="2/s", burst=1, status="UNAVAILABLE")
    rl.check(call())
    with pytest.raises(CallError) as refused:
        rl.check(call())
    assert refused.value.status == grpc.StatusCode.UNAVAILABLE
    trailers = dict(refused.value.trailing_metadata)
    assert {
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "grpc-status-details-bin",
    } <= set(trailers)
    assert 0.4 < float(trailers["x-ratelimit-reset"]) <= 0.5


@pytest.mark.parametrize(("per", "second_stream"), [("stream", 3), ("key", 0)])
def test_message_limits_per_stream_or_per_key(per: str, second_stream: int) -> None:
    rl = limiter(rate="1000/s", key="metadata:x-api-key", messages={"rate": "1/h", "burst": 3, "per": per})

    errors: list[str] = []

    def messages(c: Call[Any]) -> int:
        sent = 0
        for _ in range(10):
            assert c.on_message is not None
            try:
                c.on_message()
            except CallError as exc:
                errors.append(exc.details)
                break
            sent += 1
        return sent

    first, second = call("a", MethodKind.BIDI_STREAMING), call("a", MethodKind.BIDI_STREAMING)
    rl.check(first)
    rl.check(second)
    assert messages(first) == 3
    assert messages(second) == second_stream  # its own bucket, or the key's (spent)
    unary = call("a")
    rl.check(unary)
    assert unary.on_message is None  # one request message: nothing to limit
    assert errors and all("stream messages 1/h (burst 3)" in e for e in errors)
