"""Route rules end to end, through the proxy and through `gmesh:///` channels: real etcd, real servers."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from conftest import Door, Mesh, by_version, many, route, rule, split, start_proxy, until

import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc


async def test_weighted_split_is_exact_and_sticky_keys_stay_on_one_side(mesh: Mesh, door: Door) -> None:
    await route(
        mesh,
        door,
        [{"name": "default", "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}],
    )
    results = await many(door, 10_000, concurrency=64)
    versions = by_version(results)
    assert sum(versions.values()) == 10_000
    assert abs(versions["v2"] / 10_000 - 0.10) <= 0.01, versions
    counts = mesh.counts()
    assert abs(counts["v1a"] - counts["v1b"]) <= 0.05 * counts["v1a"], counts  # round robin inside v1

    await route(mesh, door, [rule("default", stickyKey="x-user-id", backends=split(90, 10))])
    users = [f"user-{i}" for i in range(300)]
    results = await many(door, 1500, metadata=lambda i: (("x-user-id", users[i % 300]),))
    sides: dict[str, set[str]] = collections.defaultdict(set)
    for i, (server, code, _) in enumerate(results):
        assert code == grpc.StatusCode.OK
        sides[users[i % 300]].add(server[:2])
    assert all(len(s) == 1 for s in sides.values()), "a sticky key reached both sides"
    on_v2 = sum(1 for s in sides.values() if s == {"v2"})
    assert 10 <= on_v2 <= 55, f"{on_v2} of 300 users on v2 for a 10% split"


async def test_header_rule_first_match_wins_and_regex(mesh: Mesh, door: Door) -> None:
    rules = [
        rule("beta", backends=[{"subset": "v2"}],
             match={"method": {"prefix": "/gmesh.v1.Echo/"}, "metadata": {"x-tier": {"exact": "beta"}}}),
        rule("beta-ish", match={"metadata": {"x-tier": {"prefix": "be"}}}, backends=[{"subset": "v1"}]),
        rule("canary-ids", match={"metadata": {"x-user-id": {"regex": "canary-[0-9]+"}}},
             backends=[{"subset": "v2"}]),
        rule("default", backends=split(50, 50)),
    ]  # fmt: skip
    await route(mesh, door, rules)
    beta = by_version(await many(door, 50, metadata=lambda i: (("x-tier", "beta"),)))
    assert beta == {"v2": 50}
    bet = by_version(await many(door, 50, metadata=lambda i: (("x-tier", "bet"),)))
    assert bet == {"v1": 50}  # the second rule (beta matched the first one, before it)
    canary = by_version(await many(door, 50, metadata=lambda i: (("x-user-id", f"canary-{i}"),)))
    assert canary == {"v2": 50}
    not_full = by_version(await many(door, 50, metadata=lambda i: (("x-user-id", f"canary-{i}x"),)))
    assert not_full == {"v1": 25, "v2": 25}  # a regex matches the whole value: default rule
    plain = by_version(await many(door, 50))
    assert plain == {"v1": 25, "v2": 25}


async def test_rule_adds_and_removes_request_metadata(mesh: Mesh, door: Door) -> None:
    rules = [{"name": "default", "backends": [{"subset": "v2"}],
              "requestMetadata": {"add": {"x-routed": "gmesh"}, "remove": ["x-debug"]}}]  # fmt: skip
    await route(mesh, door, rules)
    await door.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-debug", "1"), ("x-keep", "k")), timeout=5)
    seen = mesh.servers["v2"].servicer.seen_metadata[-1]
    assert seen.get("x-routed") == "gmesh" and seen.get("x-keep") == "k" and "x-debug" not in seen


async def test_fault_abort_rate_and_delay_share(mesh: Mesh, door: Door) -> None:
    await route(
        mesh, door, [{"name": "default", "fault": {"abort": {"percent": 10, "code": "RESOURCE_EXHAUSTED"}}}]
    )
    results = await many(door, 5000, concurrency=64)
    aborted = sum(1 for _, code, _ in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert (
        sum(
            1
            for _, code, _ in results
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
        )
        == 0
    )
    assert abs(aborted / 5000 - 0.10) <= 0.02, aborted
    assert sum(mesh.counts().values()) == 5000 - aborted  # aborted calls never reach an endpoint

    await route(mesh, door, [{"name": "default", "fault": {"delay": {"percent": 25, "duration": "150ms"}}}])
    results = await many(door, 400, concurrency=40)
    delayed = sum(1 for _, code, took in results if code == grpc.StatusCode.OK and took >= 0.15)
    assert all(code == grpc.StatusCode.OK for _, code, _ in results)
    assert 60 <= delayed <= 140, f"{delayed} of 400 calls delayed for a 25% delay fault"


async def test_route_timeout_cuts_a_slow_call(mesh: Mesh, door: Door) -> None:
    await route(mesh, door, [{"name": "default", "timeout": "200ms"}])
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await door.stub.Unary(echo_pb2.EchoRequest(delay_ms=2000), timeout=5)
    took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 <= took < 1.0, took


async def test_retry_on_unavailable_gets_past_a_refusing_endpoint(mesh: Mesh, door: Door) -> None:
    mesh.servers["v1b"].servicer.fail_share = 1.0  # one of three refuses every call with UNAVAILABLE
    await route(mesh, door, [rule("default")])
    without = await many(door, 300)
    failed = sum(1 for _, code, _ in without if code == grpc.StatusCode.UNAVAILABLE)
    assert 70 <= failed <= 130, "without retries about a third of the calls must fail"

    await route(mesh, door, [rule("default", retry={"attempts": 3, "on": ["UNAVAILABLE"]})])
    results = await many(door, 300)
    assert [code for _, code, _ in results if code != grpc.StatusCode.OK] == []
    assert {server for server, _, _ in results} == {"v1a", "v2"}


async def test_no_retry_once_response_headers_were_sent(mesh: Mesh, door: Door) -> None:
    await route(mesh, door, [{"name": "default", "backends": [{"subset": "v2"}],
                              "retry": {"attempts": 3, "on": ["UNAVAILABLE"]}}])  # fmt: skip
    v2 = mesh.servers["v2"].servicer
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await door.stub.Unary(echo_pb2.EchoRequest(fail_code=14), timeout=5)  # trailers only
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert v2.calls["Unary"] == 3
    headers = [echo_pb2.Header(key="x-early", value=b"1")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await door.stub.Unary(echo_pb2.EchoRequest(fail_code=14, initial_metadata=headers), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert v2.calls["Unary"] == 4, "a call whose headers were sent must not be retried"


async def test_retry_budget_caps_extra_load_when_everything_fails(mesh: Mesh, door: Door) -> None:
    for server in mesh.servers.values():
        server.servicer.fail_share = 1.0
    rules = [
        {
            "name": "default",
            "retry": {"attempts": 5, "on": ["UNAVAILABLE"], "backoff": {"base": "1ms", "max": "2ms"}},
        }
    ]
    await route(mesh, door, rules, retryBudget={"percent": 20, "minPerSecond": 0, "window": "10s"})
    results = await many(door, 500)
    assert all(code == grpc.StatusCode.UNAVAILABLE for _, code, _ in results)
    upstream = sum(mesh.counts().values())
    # Without a budget: 2,500 attempts. With it: the calls plus at most 20% more.
    assert 500 < upstream <= 500 * 1.2 + 1, upstream


async def test_per_try_timeout_retries_a_slow_attempt(mesh: Mesh, door: Door) -> None:
    rules = [{"name": "default", "backends": [{"subset": "v1"}],
              "retry": {"attempts": 3, "on": ["UNAVAILABLE"], "perTryTimeout": "100ms"}}]  # fmt: skip
    await route(mesh, door, rules)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await door.stub.Unary(echo_pb2.EchoRequest(delay_ms=1000), timeout=5)
    took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.3 <= took < 0.9, took
    await until(lambda: sum(mesh.counts().values()) == 3, 2, "three attempts reach the endpoints")


async def test_mirror_copies_a_share_without_touching_the_caller(mesh: Mesh, door: Door) -> None:
    mesh.servers["v2"].servicer.fail_share = 1.0  # the mirror fails every copy: the caller must not notice
    await route(mesh, door, [{"name": "default", "backends": [{"subset": "v1"}]}])
    plain = await many(door, 600, concurrency=1)
    await route(mesh, door, [{"name": "default", "backends": [{"subset": "v1"}],
                              "mirror": {"backend": {"subset": "v2"}, "percent": 50}}])  # fmt: skip
    mirrored = await many(door, 600, concurrency=1)
    assert all(code == grpc.StatusCode.OK and server.startswith("v1") for server, code, _ in mirrored)
    v2 = mesh.servers["v2"].servicer
    await until(lambda: v2.active == 0, 5, "mirrored copies finish")
    copies = v2.calls.get("Unary", 0)
    assert 240 <= copies <= 360, f"{copies} copies for a 50% mirror of 600 calls"
    assert all(md.get("x-gmesh-mirror") == "1" for md in v2.seen_metadata)
    p50_plain = statistics.median(t for _, _, t in plain)
    p50_mirrored = statistics.median(t for _, _, t in mirrored)
    assert p50_mirrored <= p50_plain * 2 + 0.001, (p50_plain, p50_mirrored)


async def test_route_changes_under_load_fail_no_call(mesh: Mesh, door: Door) -> None:
    splits = [(100, 0), (90, 10), (50, 50), (0, 100), (100, 0)]
    stop = asyncio.Event()
    results: list[grpc.StatusCode] = []

    async def load() -> None:
        while not stop.is_set():
            try:
                await door.stub.Unary(echo_pb2.EchoRequest(), timeout=5)
                results.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                results.append(exc.code())

    workers = [asyncio.ensure_future(load()) for _ in range(16)]
    try:
        for v1, v2 in splits:
            await route(mesh, door, [rule("default", backends=split(v1, v2))])
            target = len(results) + 200
            await until(lambda t=target: len(results) >= t, 10, "calls flow after the change")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert len(results) >= 1000
    assert collections.Counter(results) == {grpc.StatusCode.OK: len(results)}
    # the last split (100/0) is in force: recent calls all on v1
    tail = await many(door, 50)
    assert by_version(tail) == {"v1": 50}


async def test_streams_are_retried_from_a_replay_buffer_up_to_its_limit(mesh: Mesh, door: Door) -> None:
    mesh.servers["v1b"].servicer.fail_share = 1.0  # refuses every stream before reading a message
    retry = {"attempts": 3, "on": ["UNAVAILABLE"], "backoff": {"base": "1ms", "max": "2ms"}}
    await route(mesh, door, [rule("default", retry=retry)])

    async def requests(n: int, size: int) -> AsyncIterator[echo_pb2.EchoRequest]:
        for i in range(n):
            yield echo_pb2.EchoRequest(message=f"m{i}", payload=b"x" * size)

    for _ in range(30):
        if door.name == "proxy":  # channel: client-streaming calls are not retried (see docs)
            reply = await door.stub.ClientStream(requests(5, 100), timeout=10)
            assert reply.index == 5 and reply.message == "m4" and reply.server in ("v1a", "v2")
        replies = [r async for r in door.stub.Bidi(requests(3, 100), timeout=10)]
        assert [r.message for r in replies] == ["m0", "m1", "m2"]
        # the application writes and reads itself (ping-pong): a refused attempt is replayed
        bidi = door.stub.Bidi(timeout=10)
        for i in range(3):
            await bidi.write(echo_pb2.EchoRequest(message=f"w{i}"))
            assert (await bidi.read()).message == f"w{i}"
        await bidi.done_writing()
        assert await bidi.read() is grpc.aio.EOF and await bidi.code() == grpc.StatusCode.OK
    refused = mesh.servers["v1b"].servicer.calls
    assert refused.get("ClientStream", 0) + refused.get("Bidi", 0) >= 10, "the refusing endpoint was tried"
    if door.name != "proxy":
        return

    # A stream that fails after the server read it all: retried while its requests fit the
    # 1 MiB replay buffer (3 attempts), not once they do not (5 x 300 KiB = 1.5 MiB: 1 attempt).
    def attempts() -> int:
        return sum(server.servicer.calls.get("ClientStream", 0) for server in mesh.servers.values())

    async def failing(size: int) -> AsyncIterator[echo_pb2.EchoRequest]:
        for i in range(5):
            yield echo_pb2.EchoRequest(message=f"m{i}", payload=b"x" * size, fail_code=14)

    mesh.servers["v1b"].servicer.fail_share = 0.0
    for size, expected in ((100, 3), (300 * 1024, 1)):
        before = attempts()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await door.stub.ClientStream(failing(size), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await until(lambda b=before, e=expected: attempts() - b >= e, 5, "attempts reach the endpoints")
        assert attempts() - before == expected, (size, attempts() - before)


async def test_caller_labels_of_a_proxy_and_of_a_channel_match_rules(
    mesh: Mesh, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    rules = [
        rule("web-team", match={"caller": {"labels": {"team": "web"}}}, backends=[{"subset": "v2"}]),
        rule("default", backends=[{"subset": "v1"}]),
    ]
    revision = await mesh.put("Route", "orders", {"service": "orders", "rules": rules})
    for labels, expected in (({"team": "web"}, "v2"), ({"team": "batch"}, "v1"), ({}, "v1")):
        proxy = await start_proxy(etcd_server, mesh_keys, tmp_path, caller_labels=labels)
        try:
            await proxy.catalog.wait_for(lambda s: s.revision >= revision, timeout=5)
            async with grpc.aio.insecure_channel(proxy.address) as ch:
                reply = await echo_pb2_grpc.EchoStub(ch).Unary(echo_pb2.EchoRequest(), timeout=5)
            assert reply.server[:2] == expected, (labels, reply.server)
        finally:
            await proxy.stop(0)
        async with gmesh.aio.channel(
            "gmesh:///orders", etcd=etcd_server.url, prefix=mesh_keys.prefix, caller_labels=labels
        ) as ch:
            outbound = await ch.ready_outbound()
            await outbound.catalog.wait_for(lambda s: s.revision >= revision, timeout=5)
            reply = await echo_pb2_grpc.EchoStub(ch).Unary(echo_pb2.EchoRequest(), timeout=5)
        assert reply.server[:2] == expected, (labels, reply.server)
