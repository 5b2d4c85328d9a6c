"""Blue-green switches and canary rollouts against real etcd, real servers, real traffic."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
import pytest
from conftest import Door, Mesh, route, rule, split, until

from gmesh.pluginmanager import Plugins
from gmesh.rollout import controller as rc
from gmesh.v1 import echo_pb2

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


async def poll(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Wait (with a deadline) until an async condition holds."""
    async with asyncio.timeout(timeout):
        while not await condition():  # noqa: ASYNC110 (the condition is a read from etcd)
            await asyncio.sleep(0.05)
    assert await condition(), what


class Load:
    """Steady unary calls through a door until stopped; counts outcomes."""

    def __init__(self, door: Door, workers: int = 8) -> None:
        self.door = door
        self.codes: collections.Counter[grpc.StatusCode] = collections.Counter()
        self.servers: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(workers)]

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = await self.door.stub.Unary(echo_pb2.EchoRequest(), timeout=5)
                self.codes[grpc.StatusCode.OK] += 1
                self.servers[reply.server[:2]] += 1
            except grpc.aio.AioRpcError as exc:
                self.codes[exc.code()] += 1
            await asyncio.sleep(0.002)  # a steady trickle, leaving CPU for etcd and the controller

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@contextlib.asynccontextmanager
async def load(door: Door, workers: int = 8) -> AsyncIterator[Load]:
    running = Load(door, workers)
    try:
        yield running
    finally:
        await running.stop()


async def test_blue_green_switch_under_load_fails_no_call(mesh: Mesh, door: Door) -> None:
    kinds = Plugins.builtin_only().config_kinds()
    await route(mesh, door, [rule("default", backends=split(100, 0))])
    async with load(door) as running:
        for to in ("v2", "v1", "v2"):
            revision = await rc.switch(mesh.store, mesh.keys, kinds, "orders", to)
            await door.wait(revision)
            mark = running.servers[to]
            await until(lambda t=to, m=mark: running.servers[t] >= m + 100, 10, f"traffic on {to}")
            before = dict(running.servers)
            await until(lambda b=before: running.total >= sum(b.values()) + 100, 10, "more calls")
            other = "v1" if to == "v2" else "v2"
            assert running.servers[other] == before.get(other, 0), (
                f"calls still reach {other} after the switch"
            )
    assert set(running.codes) == {grpc.StatusCode.OK}, running.codes


async def _canary(mesh: Mesh, **fields: object) -> rc.RolloutState:
    kinds = Plugins.builtin_only().config_kinds()
    thresholds = rc.Thresholds(max_error_rate=0.01, min_calls=20)
    state = rc.RolloutState("orders", "v1", "v2", [10, 50, 100], 1.0, thresholds)
    for key, value in fields.items():
        setattr(state, key, value)
    return await asyncio.wait_for(rc.run_canary(mesh.store, mesh.keys, kinds, state, say=print), timeout=60)


async def test_canary_with_a_failing_v2_rolls_back_by_itself(mesh: Mesh, door: Door) -> None:
    mesh.servers["v2"].servicer.fail_share = 0.10
    await route(mesh, door, [rule("default", backends=split(100, 0))])
    async with load(door):
        final = await _canary(mesh)
        assert final.phase == rc.ROLLED_BACK, final.history
        assert "error rate" in final.reason
        _, doc, _ = await rc.route_document(
            mesh.store, mesh.keys, Plugins.builtin_only().config_kinds(), "orders"
        )
        assert rc.default_weights(doc) == {"v1": 100}
    stored, _ = await rc.load_state(mesh.store, mesh.keys, "orders")
    assert stored is not None and stored.phase == rc.ROLLED_BACK


async def test_canary_with_a_healthy_v2_reaches_100_percent(mesh: Mesh, door: Door) -> None:
    await route(mesh, door, [rule("default", backends=split(100, 0))])
    async with load(door) as running:
        final = await _canary(mesh)
        assert final.phase == rc.PROMOTED, final.history
        written = await mesh.store.get(mesh.keys.config("Route", "orders"))
        assert written is not None
        await door.wait(written.mod_revision)
        mark = dict(running.servers)
        await until(lambda: running.total >= sum(mark.values()) + 100, 10, "calls after promotion")
        assert running.servers["v1"] == mark.get("v1", 0), "v1 still gets calls after promotion"
    assert set(running.codes) == {grpc.StatusCode.OK}
    steps_passed = [line for line in final.history if "passed" in line]
    assert len(steps_passed) == 3, final.history


@pytest.mark.parametrize("door", ["channel"], indirect=True)
async def test_a_new_controller_resumes_where_a_killed_one_was(
    mesh: Mesh, door: Door, gmesh_env: dict[str, str]
) -> None:
    await route(mesh, door, [rule("default", backends=split(100, 0))])
    args = ["rollout", "canary", "orders", "--to", "v2", "--steps", "10,20,30,100", "--interval", "2s",
            "--min-calls", "10"]  # fmt: skip
    async with load(door):
        first = await asyncio.create_subprocess_exec(
            *GMESH, *args, env=gmesh_env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        try:

            async def at_step(n: int) -> bool:
                state, _ = await rc.load_state(mesh.store, mesh.keys, "orders")
                return state is not None and state.step >= n

            await poll(lambda: at_step(1), 30, "the first controller reaches step 2")
            first.send_signal(signal.SIGKILL)
            await asyncio.wait_for(first.wait(), 10)
            killed_at, _ = await rc.load_state(mesh.store, mesh.keys, "orders")
            assert killed_at is not None and killed_at.phase == rc.RUNNING
            second = await asyncio.create_subprocess_exec(
                *GMESH, *args, env=gmesh_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await asyncio.wait_for(second.communicate(), 90)
        finally:
            if first.returncode is None:
                first.kill()
    stdout = out.decode()
    assert second.returncode == 0, stdout
    resumed = f"resuming the rollout of orders at step {killed_at.step + 1}"
    assert resumed in stdout, stdout
    final, _ = await rc.load_state(mesh.store, mesh.keys, "orders")
    assert final is not None and final.phase == rc.PROMOTED
    # the second controller measured from the killed one's step on, never from step 1
    steps = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == f"step {killed_at.step + 1}/4", stdout


async def test_abort_rolls_back_a_running_canary(mesh: Mesh, door: Door) -> None:
    kinds = Plugins.builtin_only().config_kinds()
    await route(mesh, door, [rule("default", backends=split(100, 0))])
    async with load(door):
        task = asyncio.ensure_future(_canary(mesh, steps=[50, 100], interval=30.0))

        async def running() -> bool:
            state, _ = await rc.load_state(mesh.store, mesh.keys, "orders")
            return state is not None and state.phase == rc.RUNNING and state.controller != ""

        await poll(running, 10, "the controller starts")
        message = await rc.abort(mesh.store, mesh.keys, kinds, "orders")
        assert "abort requested" in message
        final = await asyncio.wait_for(task, timeout=10)
    assert final.phase == rc.ABORTED
    _, doc, _ = await rc.route_document(mesh.store, mesh.keys, kinds, "orders")
    assert rc.default_weights(doc) == {"v1": 100}


@pytest.mark.parametrize("door", ["proxy"], indirect=True)
async def test_canary_sees_failures_that_retries_hide_from_callers(mesh: Mesh, door: Door) -> None:
    mesh.servers["v2"].servicer.fail_share = 0.10
    retry = {"attempts": 3, "on": ["UNAVAILABLE"], "backoff": {"base": "1ms", "max": "5ms"}}
    await route(mesh, door, [rule("default", backends=split(100, 0), retry=retry)])
    async with load(door) as running:
        final = await _canary(mesh)
    assert final.phase == rc.ROLLED_BACK, final.history
    assert set(running.codes) == {grpc.StatusCode.OK}, "retries should have hidden v2's failures"
