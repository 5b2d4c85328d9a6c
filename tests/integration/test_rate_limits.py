"""Rate limits for real: RateLimit resources in etcd, open-loop load through `gmesh proxy` and a
`gmesh:///` channel to a real Echo server; exact counts of what was admitted and refused, the
refusal's RetryInfo honoured, shadow mode counted in the Prometheus exposition."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.proxy.run import RunningProxy
from gmesh.store.etcd import Store
from gmesh.testing.echo import EchoServer
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

REQUEST = echo_pb2.EchoRequest(message="hi")


async def put_limit(store: Store, keys: MeshKeys, name: str, spec: dict[str, Any]) -> int:
    doc = {"kind": "RateLimit", "metadata": {"name": name}, "spec": {"service": "echo", **spec}}
    return await store.put(keys.config("RateLimit", name), json.dumps(doc).encode())


async def in_use(outbound: Any, revision: int) -> None:
    await outbound.catalog.wait_for(lambda s: s.revision >= revision, timeout=10)


async def open_loop(
    call: Callable[[], Awaitable[Any]], rate: float, seconds: float
) -> tuple[dict[str, int], float]:
    """`rate` calls/s started on schedule (not waiting for answers) for `seconds`: counts by
    status code, and the span from the first call's start to the last one's."""
    loop = asyncio.get_running_loop()
    n = round(rate * seconds)
    codes: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        try:
            await call()
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1

    tasks = []
    start = loop.time()
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the load's schedule, not a wait for a condition
        tasks.append(asyncio.ensure_future(one()))
    span = loop.time() - start
    await asyncio.gather(*tasks)
    return dict(codes), span


@pytest.mark.parametrize("door", ["proxy", "channel"])
async def test_rate_and_burst_hold_under_three_times_the_load(
    door: str, store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, proxy: RunningProxy,
    upstream: EchoServer,
) -> None:  # fmt: skip
    """rate 100/s, burst 20, 300 calls/s offered for 10 s: 20 + 100/s x the span admitted (±3%),
    every other call RESOURCE_EXHAUSTED."""
    revision = await put_limit(store, mesh_keys, "echo-total", {"rate": "100/s", "burst": 20})
    if door == "proxy":
        await in_use(proxy.outbound, revision)
        channel: Any = grpc.aio.insecure_channel(proxy.address)
    else:
        channel = gmesh.aio.channel("gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix)
        await in_use(await channel.ready_outbound(), revision)
    async with channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        codes, span = await open_loop(lambda: stub.Unary(REQUEST, timeout=10), 300, 10)
    expected = 20 + 100 * span
    print(f"\n{door}: {codes} over {span:.2f}s (expected {expected:.0f} admitted)")
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and sum(codes.values()) == 3000
    assert span < 10.5, "the load fell behind its schedule"
    assert abs(codes["OK"] - expected) <= 0.03 * expected
    assert abs(codes["OK"] - 1020) <= 0.03 * 1020


async def test_per_key_limits_are_fair(
    store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, upstream: EchoServer
) -> None:
    """Per key 60/s: caller A offers 200/s, caller B 30/s: B gets all of its calls, A 60/s."""
    revision = await put_limit(
        store, mesh_keys, "per-client", {"rate": "60/s", "burst": 6, "key": "metadata:x-client"}
    )
    async with gmesh.aio.channel("gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix) as channel:
        await in_use(await channel.ready_outbound(), revision)
        stub = echo_pb2_grpc.EchoStub(channel)
        (a, a_span), (b, _) = await asyncio.gather(
            open_loop(lambda: stub.Unary(REQUEST, metadata=(("x-client", "a"),), timeout=10), 200, 10),
            open_loop(lambda: stub.Unary(REQUEST, metadata=(("x-client", "b"),), timeout=10), 30, 10),
        )
    print(f"\nA {a} over {a_span:.2f}s, B {b}")
    assert b == {"OK": 300}
    assert abs(a["OK"] - (6 + 60 * a_span)) <= 0.03 * 606 and a["OK"] + a["RESOURCE_EXHAUSTED"] == 2000


async def refusal(call: Callable[[], Awaitable[Any]]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call()
    return refused.value


@pytest.mark.parametrize("door", ["proxy", "channel"])
async def test_a_refusal_says_when_to_come_back_and_that_is_true(
    door: str, store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, proxy: RunningProxy,
    upstream: EchoServer,
) -> None:  # fmt: skip
    revision = await put_limit(store, mesh_keys, "slow", {"rate": "2/s", "burst": 1})
    if door == "proxy":
        await in_use(proxy.outbound, revision)
        channel: Any = grpc.aio.insecure_channel(proxy.address)
    else:
        channel = gmesh.aio.channel("gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix)
        await in_use(await channel.ready_outbound(), revision)
    async with channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Unary(REQUEST, timeout=5)
        error = await refusal(lambda: stub.Unary(REQUEST, timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit slow: 2/s (burst 1) on echo" in (error.details() or "")
        trailers = dict(error.trailing_metadata() or ())
        assert trailers["x-ratelimit-limit"] == "2" and trailers["x-ratelimit-remaining"] == "0"
        status = rpc_status.from_call(error)
        assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        retry, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
        assert status.details[0].Unpack(retry) and status.details[1].Unpack(quota)
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0.3 < delay <= 0.5 and abs(float(trailers["x-ratelimit-reset"]) - delay) < 0.002
        assert quota.violations[0].subject == "ratelimit:slow"
        # a client that honours RetryInfo is admitted (sleeping the hint is what is tested here)
        await asyncio.sleep(delay)
        assert (await stub.Unary(REQUEST, timeout=5)).message == "hi"


async def test_shadow_mode_refuses_nothing_and_counts_what_it_would(
    store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, upstream: EchoServer
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gmesh.metrics import process_registry

    revision = await put_limit(store, mesh_keys, "trial", {"rate": "1/s", "burst": 5, "mode": "shadow"})
    async with gmesh.aio.channel("gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix) as channel:
        await in_use(await channel.ready_outbound(), revision)
        stub = echo_pb2_grpc.EchoStub(channel)
        started = time.monotonic()
        for _ in range(30):
            await stub.Unary(REQUEST, timeout=5)
        elapsed = time.monotonic() - started
        text = generate_latest(process_registry()).decode()
    counts = {
        s.labels["mode"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "gmesh_ratelimit_rejections"
        for s in family.samples
        if s.name == "gmesh_ratelimit_rejections_total" and s.labels["limit"] == "trial"
    }
    # 30 calls within `elapsed` seconds: 5 + 1/s x elapsed pass, the rest would have been refused
    would = 30 - (5 + int(elapsed))
    assert counts["enforce"] == 0 and abs(counts["shadow"] - would) <= 1, (counts, elapsed)


async def test_the_workers_of_one_proxy_together_admit_the_limit(
    store: Store, mesh_keys: MeshKeys, upstream: EchoServer, gmesh_env: dict[str, str]
) -> None:
    """`gmesh proxy --workers 2`, calls over 8 connections (spread over both workers): rate
    100/s burst 20 under 300/s for 10 s still admits 1020 (±3%), not twice that."""
    from test_load import proxy_process

    revision = await put_limit(store, mesh_keys, "shared", {"rate": "100/s", "burst": 20})
    async with proxy_process(gmesh_env, "--workers", "2") as (_proc, address):
        deadline = time.monotonic() + 30
        while True:  # both workers up, and both serving the limit's revision
            kvs, _ = await store.get_prefix(mesh_keys.proxies_root)
            records = [json.loads(kv.value) for kv in kvs]
            mine = [r for r in records if r["address"] == address and r["revision"] >= revision]
            if len(mine) == 2:
                break
            assert time.monotonic() < deadline, f"2 workers at revision {revision}: {records}"
            await asyncio.sleep(0.1)
        channels = [grpc.aio.insecure_channel(address, options=[("grpc.channel_id", i)]) for i in range(8)]
        stubs = [echo_pb2_grpc.EchoStub(c) for c in channels]
        turn = iter(range(10**9))
        try:
            codes, span = await open_loop(lambda: stubs[next(turn) % 8].Unary(REQUEST, timeout=10), 300, 10)
        finally:
            for channel in channels:
                await channel.close()
    print(f"\n--workers 2: {codes} over {span:.2f}s")
    assert sum(codes.values()) == 3000 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert abs(codes["OK"] - (20 + 100 * span)) <= 0.03 * 1020


async def test_a_global_limit_holds_across_processes_and_a_dead_one_gives_its_share_back(
    store: Store,
    mesh_keys: MeshKeys,
    upstream: EchoServer,
    gmesh_env: dict[str, str],
    etcd_server: EtcdMember,
) -> None:
    """200/s across 3 proxies and 2 channel processes, one of them offered 80% of the load
    (400/s of 500/s): from 3 s on, 200/s admitted over 20 s (-10%/+5%). Then the busiest is
    killed (-9): within its lease TTL the others' shares grow to take all of the rate."""
    import contextlib
    import signal
    import sys
    from pathlib import Path

    from test_load import proxy_process

    from gmesh.ratelimit.shares import TTL
    from gmesh.store.embedded import free_port
    from gmesh.v1 import admin_pb2, admin_pb2_grpc

    revision = await put_limit(
        store, mesh_keys, "mesh-wide", {"rate": "200/s", "burst": 20, "scope": "global"}
    )
    admins = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(proxy_process(gmesh_env, "--admin", a)) for a in admins]
        deadline = time.monotonic() + 30
        while True:  # every proxy serving the limit's revision
            kvs, _ = await store.get_prefix(mesh_keys.proxies_root)
            ready = [json.loads(kv.value) for kv in kvs]
            if sum(1 for r in ready if r["revision"] >= revision) >= 3:
                break
            assert time.monotonic() < deadline, ready
            await asyncio.sleep(0.1)
        script = str(Path(__file__).parent / "limit_load.py")
        plan = [(proxies[0][1], 400), (proxies[1][1], 25), (proxies[2][1], 25), ("gmesh:///echo", 25),
                ("gmesh:///echo", 25)]  # fmt: skip
        loads = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                script,
                target,
                str(rate),
                "32",
                etcd_server.url,
                mesh_keys.prefix,
                env=gmesh_env,
                stdout=asyncio.subprocess.PIPE,
            )
            for target, rate in plan
        ]
        for load in loads:
            assert load.stdout is not None
            assert b"ready" in await asyncio.wait_for(load.stdout.readline(), 30)
        began = time.time()
        outputs = [asyncio.ensure_future(load.stdout.read()) for load in loads]  # type: ignore[union-attr]

        async def shares_seen(admin: str) -> float:
            async with grpc.aio.insecure_channel(admin) as channel:
                dump = await admin_pb2_grpc.AdminStub(channel).ConfigDump(
                    admin_pb2.ConfigDumpRequest(service="echo"), timeout=5
                )
            limits = json.loads(dump.json)["services"]["echo"]["rateLimits"]
            return float(limits[0]["share"]) if limits else 0.0

        # the busiest proxy dies at 25 s; its lease (TTL 4 s) expires, the others share its part
        await asyncio.sleep(max(began + 25 - time.time(), 0))  # the test's timeline, not a sync
        proxies[0][0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        others = admins[1:]
        while True:
            # 4 processes left, each with a small demand: 200/s split evenly, 50/s each
            seen = [await shares_seen(a) for a in others]
            if all(abs(s - 50) < 5 for s in seen):
                taken_over = time.monotonic() - killed
                break
            assert time.monotonic() - killed < TTL + 3, f"shares after the kill: {seen}"
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*outputs)
        for load in loads:
            await load.wait()
    per_second: collections.Counter[int] = collections.Counter()
    for (target, rate), out in zip(plan, results, strict=True):
        rows = [json.loads(line) for line in out.decode().splitlines()]
        totals = {k: sum(r.get(k, 0) for r in rows) for k in ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE")}
        print(f"{target} offered {rate}/s: {totals}")
    for out in results:
        for line in out.decode().splitlines():
            row = json.loads(line)
            if "second" in row:
                per_second[row["second"]] += row.get("OK", 0)
    window = range(int(began) + 3, int(began) + 23)
    admitted = sum(per_second[s] for s in window)
    print(
        f"\nglobal 200/s: {admitted} admitted in 20 s from 3 s; "
        f"shares taken over {taken_over:.2f}s after kill -9"
    )
    assert 0.9 * 4000 <= admitted <= 1.05 * 4000
    assert taken_over <= TTL + 1.5


async def test_a_global_limit_follows_on_store_unavailable_while_etcd_is_down(tmp_path: Any) -> None:
    """A private etcd stops: a global limit with onStoreUnavailable deny refuses every call (the
    mesh serves on from its snapshot otherwise), and shares again once etcd is back."""
    from gmesh.store.etcd import EtcdConfig
    from gmesh.testing.echo import start_echo_server
    from gmesh.testing.etcd import single_member

    member = single_member(tmp_path / "etcd")
    member.start()
    keys = MeshKeys("/limits-down/")
    echo = await start_echo_server("solo")
    store = await Store.connect(EtcdConfig.parse(member.url))
    try:
        async with gmesh.register(
            echo.address, service="echo", store=store, prefix=keys.prefix, handle_sigterm=False, drain_delay=0
        ):
            await put_limit(
                store, keys, "careful", {"rate": "50/s", "scope": "global", "onStoreUnavailable": "deny"}
            )
            async with gmesh.aio.channel("gmesh:///echo", etcd=member.url, prefix=keys.prefix) as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                assert (await stub.Unary(REQUEST, timeout=5)).server == "solo"
                outbound = await channel.ready_outbound()
                shares = outbound.mesh.shares
                assert shares is not None and "careful" in shares.states
                member.stop()
                deadline = time.monotonic() + 15
                while shares.store_ok:
                    assert time.monotonic() < deadline, "etcd's absence never noticed"
                    await asyncio.sleep(0.05)
                refused = await refusal(lambda: stub.Unary(REQUEST, timeout=5))
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "rate limit careful" in (refused.details() or "")
                member.start()
                deadline = time.monotonic() + 30
                while not shares.store_ok:
                    assert time.monotonic() < deadline, "etcd's return never noticed"
                    await asyncio.sleep(0.05)
                assert (await stub.Unary(REQUEST, timeout=5)).server == "solo"
    finally:
        await store.close()
        await echo.stop(None)
        member.stop()


@pytest.mark.parametrize("door", ["proxy", "channel"])
async def test_a_stream_over_its_message_limit_ends_with_the_limits_status(
    door: str, store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, proxy: RunningProxy,
    upstream: EchoServer,
) -> None:  # fmt: skip
    """messages 10/s, burst 5 per stream: a bidi stream sending as fast as it can gets 5 echoes,
    then RESOURCE_EXHAUSTED naming the limit; a new stream has a bucket of its own."""
    revision = await put_limit(
        store, mesh_keys, "chatty", {"rate": "1000/s", "messages": {"rate": "10/s", "burst": 5}}
    )
    if door == "proxy":
        await in_use(proxy.outbound, revision)
        channel: Any = grpc.aio.insecure_channel(proxy.address)
    else:
        channel = gmesh.aio.channel("gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix)
        await in_use(await channel.ready_outbound(), revision)
    async with channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for _ in range(2):  # two streams, each with its own bucket
            call = stub.Bidi(timeout=10)
            echoed = 0

            async def chat(call: Any = call) -> None:
                nonlocal echoed
                for i in range(30):
                    await call.write(echo_pb2.EchoRequest(message=str(i)))
                    await call.read()
                    echoed += 1

            ended = await refusal(chat)
            assert ended.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit chatty: stream messages 10/s (burst 5)" in (ended.details() or "")
            assert echoed == 5, echoed
        # unary calls of the same limit count calls, not messages
        for _ in range(20):
            await stub.Unary(REQUEST, timeout=5)


async def test_a_message_limit_tripped_during_a_retry_backoff_ends_the_stream(
    store: Store, mesh_keys: MeshKeys, etcd_server: EtcdMember, upstream: EchoServer
) -> None:
    """The first attempt fails UNAVAILABLE, the route retries after 1 s; a message written during
    the backoff trips the limit: the stream ends with it at the next attempt, not at its deadline."""
    await put_limit(store, mesh_keys, "chatty", {"rate": "1000/s", "messages": {"rate": "1/h", "burst": 1}})
    retry = {"attempts": 3, "on": ["UNAVAILABLE"], "backoff": {"base": "1s", "max": "1s"}}
    route = {"kind": "Route", "metadata": {"name": "echo"},
             "spec": {"service": "echo", "rules": [{"name": "default", "retry": retry}]}}  # fmt: skip
    revision = await store.put(mesh_keys.config("Route", "echo"), json.dumps(route).encode())
    async with gmesh.aio.channel("gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix) as channel:
        await in_use(await channel.ready_outbound(), revision)
        stub = echo_pb2_grpc.EchoStub(channel)
        upstream.servicer.fail_share = 1.0
        call = stub.Bidi(timeout=30)
        await call.write(echo_pb2.EchoRequest(message="m0"))
        deadline = time.monotonic() + 10
        while upstream.servicer.calls.get("Bidi", 0) < 1:  # the first attempt was refused
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        upstream.servicer.fail_share = 0.0
        started = time.monotonic()
        error = await refusal(lambda: call.write(echo_pb2.EchoRequest(message="m1")))
        took = time.monotonic() - started
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "stream messages" in (error.details() or "")
    assert took < 5, took  # the next attempt (1 s backoff), never the 30 s deadline
