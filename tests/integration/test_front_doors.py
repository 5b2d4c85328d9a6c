"""Through the proxy and through `gmesh.aio.channel`, every RPC kind behaves as a direct call."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from calls import KINDS, call_unimplemented, outcome, reqs
from conftest import BIG_OPTIONS, start_proxy, until

import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.testing.echo import EchoServer
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

H = echo_pb2.Header


@pytest_asyncio.fixture(params=["proxy", "channel"])
async def door(
    request: pytest.FixtureRequest, etcd_server: EtcdMember, mesh_keys: MeshKeys, upstream: EchoServer,
    tmp_path: Path,
) -> AsyncIterator[grpc.aio.Channel]:  # fmt: skip
    """A channel whose calls reach the `echo` service through the proxy or in-process."""
    if request.param == "proxy":
        proxy = await start_proxy(etcd_server, mesh_keys, tmp_path)
        await proxy.catalog.wait_for(lambda s: bool(s.endpoints_of("echo")), timeout=5)
        try:
            async with grpc.aio.insecure_channel(proxy.address, options=BIG_OPTIONS) as channel:
                yield channel
        finally:
            await proxy.stop(0)
    else:
        async with gmesh.aio.channel(
            "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, options=BIG_OPTIONS
        ) as channel:
            await channel.channel_ready()
            yield channel


@pytest.mark.parametrize("kind", KINDS)
async def test_every_kind_matches_a_direct_call(
    kind: str, direct: echo_pb2_grpc.EchoStub, door: grpc.aio.Channel
) -> None:
    expected = await outcome(kind, direct)
    got = await outcome(kind, echo_pb2_grpc.EchoStub(door))
    assert got == expected
    assert expected["code"] == grpc.StatusCode.OK and expected["messages"]
    assert ("x-init-bin", b"\x01\x02") in got["initial"] and ("x-trail-bin", b"\xfe") in got["trailing"]


@pytest.mark.parametrize("kind", KINDS)
async def test_errors_with_details_and_trailers_match(
    kind: str, direct: echo_pb2_grpc.EchoStub, door: grpc.aio.Channel
) -> None:
    kw = {"fail_code": grpc.StatusCode.NOT_FOUND.value[0], "fail_details": "no such thing"}
    expected = await outcome(kind, direct, **kw)
    got = await outcome(kind, echo_pb2_grpc.EchoStub(door), **kw)
    assert got == expected
    assert (got["code"], got["details"]) == (grpc.StatusCode.NOT_FOUND, "no such thing")


async def test_status_details_bin_passes_untouched(door: grpc.aio.Channel) -> None:
    status_bin = b"\x08\x05\x12\x04gone"  # a google.rpc.Status, as bytes
    request = echo_pb2.EchoRequest(
        fail_code=5, fail_details="x", trailing_metadata=[H(key="grpc-status-details-bin", value=status_bin)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo_pb2_grpc.EchoStub(door).Unary(request, timeout=5)
    assert ("grpc-status-details-bin", status_bin) in tuple(err.value.trailing_metadata())


async def test_unimplemented_upstream_method_is_relayed_exactly(door: grpc.aio.Channel) -> None:
    """The upstream answers UNIMPLEMENTED while requests are still streaming in: a naive
    relay turns a share of these into INTERNAL (its own write races the upstream's end)."""
    codes: collections.Counter[tuple[str, str]] = collections.Counter()
    for kind in KINDS:
        for _ in range(10):
            for code in await asyncio.gather(*(call_unimplemented(door, kind) for _ in range(30))):
                codes[(kind, code.name)] += 1
    assert codes == {(kind, "UNIMPLEMENTED"): 300 for kind in KINDS}


async def test_upstream_sees_the_callers_remaining_deadline(
    direct: echo_pb2_grpc.EchoStub, door: grpc.aio.Channel
) -> None:
    stub = echo_pb2_grpc.EchoStub(door)
    seen_direct = (await direct.Unary(echo_pb2.EchoRequest(), timeout=3.0)).deadline_ms
    # The caller's grpc-core rounds its 3 s timeout *up* to 3 significant digits when it sends
    # it (one 10 ms step, measured: a hop can receive 3.0095 s), so any first hop may see up to
    # 3010 ms; a hop costs a few ms and never adds to what it received (2 ms of clock jitter).
    ceiling = max(seen_direct, 3000) + 10 + 2
    response = await stub.Unary(echo_pb2.EchoRequest(), timeout=3.0)
    assert seen_direct - 100 < response.deadline_ms <= ceiling
    streamed = [r async for r in stub.ServerStream(echo_pb2.EchoRequest(count=1), timeout=3.0)]
    assert seen_direct - 100 < streamed[0].deadline_ms <= ceiling


async def test_slow_upstream_gives_deadline_exceeded_on_time(door: grpc.aio.Channel) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo_pb2_grpc.EchoStub(door).Unary(echo_pb2.EchoRequest(delay_ms=3000), timeout=0.5)
    elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.45 < elapsed < 0.7


@pytest.mark.parametrize("kind", ["unary", "server_stream", "bidi", "slow_reader"])
async def test_caller_cancel_reaches_the_upstream_within_100ms(
    kind: str, upstream: EchoServer, door: grpc.aio.Channel
) -> None:
    stub = echo_pb2_grpc.EchoStub(door)
    before = len(upstream.servicer.cancelled_at)
    if kind == "unary":
        call: Any = stub.Unary(echo_pb2.EchoRequest(delay_ms=10_000), timeout=30)
    elif kind == "server_stream":
        call = stub.ServerStream(echo_pb2.EchoRequest(count=1000, delay_ms=100), timeout=30)
    elif kind == "bidi":
        call = stub.Bidi(reqs(1000, delay_ms=100), timeout=30)
    else:  # a reader that never reads while big responses pile up behind flow control
        call = stub.ServerStream(echo_pb2.EchoRequest(count=100_000, payload=b"x" * 65536), timeout=30)
    sent = upstream.servicer.sent
    await until(lambda: upstream.servicer.active == 1, 5, "the call reaching the upstream")
    if kind != "unary":  # streaming for real (the slow reader: megabytes queued behind flow control)
        await until(lambda: upstream.servicer.sent >= sent + 3, 5, "responses flowing")
    cancelled = time.monotonic()
    call.cancel()
    await until(lambda: len(upstream.servicer.cancelled_at) > before, 2, "the upstream seeing the cancel")
    assert upstream.servicer.cancelled_at[-1] - cancelled < 0.1


async def test_16_mib_messages_with_the_limit_raised(door: grpc.aio.Channel) -> None:
    payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    response = await echo_pb2_grpc.EchoStub(door).Unary(echo_pb2.EchoRequest(payload=payload), timeout=30)
    assert response.payload == payload
