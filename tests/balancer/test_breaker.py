"""`BreakerState`: slots taken at once or after a FIFO wait, refusals, timeouts, no slot lost in a race."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import pytest

from gmesh.balancer.breaker import BreakerState
from gmesh.errors import CallError


async def turns_until(condition: Callable[[], bool], turns: int = 100) -> None:
    """Let the event loop run, one turn at a time, until `condition` holds (at most `turns` turns)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition(), f"still false after {turns} loop turns"


async def held(state: BreakerState, max_requests: int, n: int) -> None:
    """Take `n` slots at once (the breaker below its limit)."""
    for _ in range(n):
        await state.acquire(max_requests, 0, None)


# --------------------------------------------------------------------------- taking a slot


async def test_below_max_requests_a_slot_is_taken_at_once() -> None:
    state = BreakerState("orders")
    for expected in (1, 2, 3):
        await state.acquire(3, 0, 0.01)
        assert state.active == expected
    assert len(state.waiting) == 0
    assert state.rejected == 0


async def test_at_the_limit_without_room_to_wait_the_call_is_refused_as_unavailable() -> None:
    state = BreakerState("orders")
    await held(state, 2, 2)
    with pytest.raises(CallError) as refused:
        await state.acquire(2, 0, 1.0)
    assert refused.value.status == grpc.StatusCode.UNAVAILABLE
    assert "maxRequests" in refused.value.details
    assert "'orders'" in refused.value.details
    assert state.rejected == 1
    assert state.active == 2
    assert len(state.waiting) == 0
    with pytest.raises(CallError):
        await state.acquire(2, 0, 1.0)
    assert state.rejected == 2


async def test_when_the_line_is_full_the_next_caller_is_refused_and_the_line_is_unchanged() -> None:
    state = BreakerState("orders")
    await held(state, 1, 1)
    waiter = asyncio.ensure_future(state.acquire(1, 1, None))
    await turns_until(lambda: len(state.waiting) == 1)
    with pytest.raises(CallError) as refused:
        await state.acquire(1, 1, None)
    assert refused.value.status == grpc.StatusCode.UNAVAILABLE
    assert "maxPending 1" in refused.value.details
    assert state.rejected == 1
    assert len(state.waiting) == 1
    state.release()
    await waiter
    assert state.active == 1
    state.release()
    assert state.active == 0


async def test_a_released_slot_with_nobody_waiting_is_freed() -> None:
    state = BreakerState()
    await held(state, 2, 2)
    state.release()
    assert state.active == 1
    state.release()
    assert state.active == 0


# --------------------------------------------------------------------------- waiting in line


async def test_waiters_are_served_first_come_first_served_and_the_slot_passes_on() -> None:
    state = BreakerState("orders")
    await held(state, 1, 1)
    served: list[str] = []

    async def wait(name: str) -> None:
        await state.acquire(1, 5, None)
        served.append(name)

    tasks = []
    for name in ("first", "second", "third"):
        tasks.append(asyncio.ensure_future(wait(name)))
        await turns_until(lambda: len(state.waiting) == len(tasks))
    assert state.active == 1
    assert served == []

    state.release()
    assert state.active == 1  # handed over, not freed
    await turns_until(lambda: served == ["first"])
    assert len(state.waiting) == 2

    state.release()
    assert state.active == 1
    await turns_until(lambda: served == ["first", "second"])

    state.release()
    assert state.active == 1
    await turns_until(lambda: served == ["first", "second", "third"])
    assert len(state.waiting) == 0

    state.release()
    assert state.active == 0
    await asyncio.gather(*tasks)
    assert state.rejected == 0


async def test_a_waiter_whose_timeout_passes_gets_deadline_exceeded_and_leaves_the_line() -> None:
    state = BreakerState("orders")
    await held(state, 1, 1)
    with pytest.raises(CallError) as late:
        await state.acquire(1, 5, 0.01)
    assert late.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline exceeded waiting for a slot" in late.value.details
    assert len(state.waiting) == 0
    assert state.active == 1
    assert state.rejected == 0


async def test_a_timed_out_waiter_leaves_the_line_and_the_one_behind_it_still_gets_the_slot() -> None:
    state = BreakerState()
    await held(state, 1, 1)
    impatient = asyncio.ensure_future(state.acquire(1, 5, 0.01))
    await turns_until(lambda: len(state.waiting) == 1)
    patient = asyncio.ensure_future(state.acquire(1, 5, None))
    await turns_until(lambda: len(state.waiting) == 2)
    with pytest.raises(CallError) as late:
        await impatient
    assert late.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(state.waiting) == 1
    assert state.active == 1
    state.release()
    await patient
    assert state.active == 1
    assert len(state.waiting) == 0
    state.release()
    assert state.active == 0


async def test_a_cancelled_waiter_leaves_the_line_without_taking_a_slot() -> None:
    state = BreakerState()
    await held(state, 1, 1)
    waiter = asyncio.ensure_future(state.acquire(1, 5, 10.0))
    await turns_until(lambda: len(state.waiting) == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(state.waiting) == 0
    assert state.active == 1
    state.release()
    assert state.active == 0


# --------------------------------------------------------------------------- the hand-over race


async def _release_and_cancel_in_one_turn(release_first: bool) -> BreakerState:
    """A holder at the limit (1), one waiter in line; then release and cancel in one callback."""
    state = BreakerState("orders")
    await held(state, 1, 1)
    waiter_task = asyncio.ensure_future(state.acquire(1, 5, 10.0))
    await turns_until(lambda: len(state.waiting) == 1)
    assert state.active == 1

    def both() -> None:
        if release_first:
            state.release()
            waiter_task.cancel()
        else:
            waiter_task.cancel()
            state.release()

    ran = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_soon(both)
    loop.call_soon(ran.set)
    await ran.wait()
    with pytest.raises(asyncio.CancelledError):
        await waiter_task
    assert waiter_task.cancelled()
    return state


async def test_a_slot_handed_to_a_waiter_cancelled_in_the_same_turn_is_not_leaked() -> None:
    state = await _release_and_cancel_in_one_turn(release_first=True)
    assert state.active == 0
    assert len(state.waiting) == 0
    assert state.describe() == {"active": 0, "waiting": 0, "retries": 0, "rejected": 0, "endpointRejected": 0}


async def test_a_waiter_cancelled_just_before_a_release_in_the_same_turn_leaks_no_slot() -> None:
    state = await _release_and_cancel_in_one_turn(release_first=False)
    assert state.active == 0
    assert len(state.waiting) == 0
    assert state.describe() == {"active": 0, "waiting": 0, "retries": 0, "rejected": 0, "endpointRejected": 0}


async def test_a_slot_handed_to_a_cancelled_waiter_passes_on_to_the_next_in_line() -> None:
    state = BreakerState()
    await held(state, 1, 1)
    first = asyncio.ensure_future(state.acquire(1, 5, 10.0))
    await turns_until(lambda: len(state.waiting) == 1)
    second = asyncio.ensure_future(state.acquire(1, 5, 10.0))
    await turns_until(lambda: len(state.waiting) == 2)

    def both() -> None:
        state.release()  # to `first`
        first.cancel()  # which gives it up at once: it must reach `second`

    asyncio.get_running_loop().call_soon(both)
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert state.active == 1
    assert len(state.waiting) == 0
    state.release()
    assert state.active == 0


async def test_a_slot_handed_over_as_the_waiters_deadline_fires_is_not_leaked() -> None:
    state = BreakerState()
    await held(state, 1, 1)
    waiter_task = asyncio.ensure_future(state.acquire(1, 5, 10.0))
    await turns_until(lambda: len(state.waiting) == 1)
    loop = asyncio.get_running_loop()
    # The waiter's own timeout handle: make it due now, and release in the same turn before it runs.
    timeout_handles = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert len(timeout_handles) == 1
    on_timeout, args = timeout_handles[0]._callback, timeout_handles[0]._args  # type: ignore[attr-defined]
    timeout_handles[0].cancel()

    def both() -> None:
        state.release()
        on_timeout(*args)  # the deadline fires in the very turn the slot was handed over

    loop.call_soon(both)
    with pytest.raises(CallError) as late:
        await waiter_task
    assert late.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert state.active == 0
    assert len(state.waiting) == 0


# --------------------------------------------------------------------------- stress


async def _stress(seed: int, cancel_every: int = 0) -> tuple[BreakerState, dict[str, int]]:
    """200 callers at a breaker of 2 slots and 50 places in line, each with a random short
    timeout and a random short hold; every `cancel_every`-th caller is cancelled at a random time."""
    rng = random.Random(seed)
    state = BreakerState("stress")
    most_active = 0

    async def one(timeout: float, hold: float) -> str:
        nonlocal most_active
        try:
            await state.acquire(2, 50, timeout)
        except CallError as error:
            return "rejected" if error.status == grpc.StatusCode.UNAVAILABLE else "timed_out"
        most_active = max(most_active, state.active)
        try:
            await asyncio.sleep(hold)  # the call's work, not synchronisation
        finally:
            state.release()
        return "ok"

    tasks = [asyncio.ensure_future(one(rng.uniform(0.0, 0.02), rng.uniform(0.0, 0.003))) for _ in range(200)]
    if cancel_every:
        loop = asyncio.get_running_loop()
        for task in tasks[::cancel_every]:
            loop.call_later(rng.uniform(0.0, 0.02), task.cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    counts = {"ok": 0, "rejected": 0, "timed_out": 0, "cancelled": 0}
    for result in results:
        if isinstance(result, asyncio.CancelledError):
            counts["cancelled"] += 1
        else:
            assert isinstance(result, str), f"unexpected outcome {result!r}"
            counts[result] += 1
    assert most_active <= 2
    return state, counts


async def test_two_hundred_callers_with_short_timeouts_leave_no_slot_and_no_waiter_behind() -> None:
    state, counts = await _stress(seed=20240611)
    assert state.active == 0
    assert len(state.waiting) == 0
    assert counts["cancelled"] == 0
    assert counts["ok"] + counts["rejected"] + counts["timed_out"] == 200
    assert state.rejected == counts["rejected"]
    assert counts["ok"] >= 2


async def test_two_hundred_callers_some_cancelled_leave_no_slot_and_no_waiter_behind() -> None:
    state, counts = await _stress(seed=7, cancel_every=5)
    assert state.active == 0
    assert len(state.waiting) == 0
    assert counts["ok"] + counts["rejected"] + counts["timed_out"] + counts["cancelled"] == 200
    assert counts["cancelled"] <= 40
    assert state.rejected == counts["rejected"]


# --------------------------------------------------------------------------- describe


async def test_describe_reports_the_five_counts() -> None:
    state = BreakerState("orders")
    assert state.describe() == {"active": 0, "waiting": 0, "retries": 0, "rejected": 0, "endpointRejected": 0}
    await held(state, 2, 2)
    state.retries = 3
    waiter = asyncio.ensure_future(state.acquire(2, 1, None))
    await turns_until(lambda: len(state.waiting) == 1)
    with pytest.raises(CallError):
        await state.acquire(2, 1, None)
    assert state.describe() == {"active": 2, "waiting": 1, "retries": 3, "rejected": 1, "endpointRejected": 0}
    state.release()
    await waiter
    assert state.describe() == {"active": 2, "waiting": 0, "retries": 3, "rejected": 1, "endpointRejected": 0}
