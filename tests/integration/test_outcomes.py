"""Exact outcomes in both front doors: a stream that fails after the caller has read from it is a
failure to stats, outlier detection and canaries alike — through the proxy and through
`gmesh.aio.channel` (which used to count such a stream as a success)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from conftest import Door, Mesh, route, rule, split, until

from gmesh.outbound import stack
from gmesh.outbound.stack import Outbound
from gmesh.outbound.upstream import StatusWatch
from gmesh.pluginmanager import Plugins
from gmesh.rollout import controller as rc
from gmesh.v1 import echo_pb2

V2 = echo_pb2.EchoRequest(message="ping")


def outbound() -> Outbound:
    (found,) = stack.running()  # one process, one loop, one mesh: one stack
    return found


async def one_stream(door: Door) -> grpc.StatusCode:
    """A bidi stream that reads its first answer (committed), then asks for another."""
    call = door.stub.Bidi(timeout=10)
    # A plain grpc.aio client (the proxy door's) reports its own INTERNAL when its write races
    # the server's end; the status the server sent is what counts.
    watch = StatusWatch(call)
    try:
        await call.write(V2)
        first = await call.read()
        assert first is not grpc.aio.EOF
        await call.write(V2)
        await call.read()
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        watch.write_failed = True
    return (await watch.final())[0]


async def streams(door: Door, n: int, concurrency: int = 4) -> collections.Counter[str]:
    codes: collections.Counter[str] = collections.Counter()
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            codes[(await one_stream(door)).name] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


async def test_committed_stream_failures_count_as_failures(mesh: Mesh, door: Door) -> None:
    v2 = mesh.servers["v2"]
    v2.servicer.stream_fail_share = 0.10
    await route(mesh, door, [rule("default", backends=split(0, 100))])
    codes = await streams(door, 100)
    assert codes == {"OK": 90, "UNAVAILABLE": 10}, codes
    counted = outbound().mesh.stats.of("orders", "v2")
    assert (counted.calls, counted.errors) == (100, 10)  # the canary's counters
    state = outbound().mesh.states.get("orders", v2.address)
    assert (state.calls, state.errors) == (100, 10)  # what outlier detection judges


@pytest.mark.parametrize("door", ["channel"], indirect=True)
async def test_an_endpoint_failing_its_streams_is_ejected(mesh: Mesh, door: Door) -> None:
    v2 = mesh.servers["v2"]
    v2.servicer.stream_fail_share = 0.25
    outlier = {
        "consecutiveErrors": None,
        "interval": "500ms",
        "baseEjectionTime": "30s",
        "maxEjectionPercent": 50,
        "failurePercentage": {"threshold": 15, "minRequests": 12},
    }
    await route(mesh, door, [rule("default", backends=[{"weight": 100}])], outlierDetection=outlier,
                balancer={"policy": "round_robin"})  # fmt: skip
    state = outbound().mesh.states.get("orders", v2.address)
    deadline = time.monotonic() + 20
    while state.ejected_until <= time.monotonic():
        assert time.monotonic() < deadline, "v2 was not ejected"
        await streams(door, 30)
    seen = v2.servicer.calls.get("Bidi", 0)
    codes = await streams(door, 60)
    assert v2.servicer.calls.get("Bidi", 0) == seen, "streams still reach the ejected endpoint"
    assert codes == {"OK": 60}


class StreamLoad:
    """Bidi streams through a door until stopped."""

    def __init__(self, door: Door) -> None:
        self.door = door
        self.codes: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(6)]

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.codes[(await one_stream(self.door)).name] += 1
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@contextlib.asynccontextmanager
async def stream_load(door: Door) -> AsyncIterator[StreamLoad]:
    running = StreamLoad(door)
    try:
        yield running
    finally:
        await running.stop()


@pytest.mark.parametrize("door", ["channel"], indirect=True)
async def test_a_canary_failing_its_streams_rolls_back(mesh: Mesh, door: Door) -> None:
    mesh.servers["v2"].servicer.stream_fail_share = 0.10
    await route(mesh, door, [rule("default", backends=split(100, 0))])
    kinds = Plugins.builtin_only().config_kinds()
    thresholds = rc.Thresholds(max_error_rate=0.01, min_calls=20)
    state = rc.RolloutState("orders", "v1", "v2", [20, 50, 100], 1.0, thresholds)
    async with stream_load(door) as running:
        final = await asyncio.wait_for(rc.run_canary(mesh.store, mesh.keys, kinds, state, say=print), 60)
        await until(lambda: running.codes["OK"] > 0, 5, "streams flowing")
    assert final.phase == rc.ROLLED_BACK, final.history
    assert "error rate" in final.reason
    _, doc, _ = await rc.route_document(mesh.store, mesh.keys, kinds, "orders")
    assert rc.default_weights(doc) == {"v1": 100}
