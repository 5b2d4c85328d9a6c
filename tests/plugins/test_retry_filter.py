"""The RETRY filter on plain objects: what it retries, per-try deadlines, budget and breaker limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

import gmesh.plugins.retry as retry_plugin
from gmesh.balancer.breaker import BreakerState
from gmesh.chain.call import Call
from gmesh.discovery.endpoint import Endpoint
from gmesh.errors import CallError, Origin, UpstreamError
from gmesh.plugins.retry import Retry
from gmesh.routing.retry import RetryBudget, RetryStats
from gmesh.routing.table import CompiledRetry

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
A = Endpoint("svc", "10.0.0.1:80")
B = Endpoint("svc", "10.0.0.2:80")
C = Endpoint("svc", "10.0.0.3:80")


@dataclass
class Rule:
    """The matched route rule, as the ROUTE phase leaves it in `call.route`."""

    retry: CompiledRetry | None


def policy(
    attempts: int = 3,
    *,
    per_try: float | None = None,
    base: float = 0.0,
    cap: float = 0.0,
    on: frozenset[grpc.StatusCode] = frozenset({UNAVAILABLE}),
) -> Rule:
    return Rule(CompiledRetry(attempts, on, per_try, base, cap))


async def never_forward(call: Call[None]) -> Any:
    raise AssertionError("the forwarder is the script's business")


def make_call(rule: Rule | None, deadline: float | None = None, *, replayable: bool = True) -> Call[None]:
    call: Call[None] = Call("/a.B/C", (), deadline, "svc", never_forward)
    call.replayable = replayable
    call.route = rule
    return call


def unavailable(details: str = "refused") -> UpstreamError:
    return UpstreamError(UNAVAILABLE, details)


@dataclass
class Seen:
    """What the rest of the chain saw at the start of one attempt."""

    number: int
    endpoint: Endpoint | None
    tried: frozenset[str] | None
    deadline: float | None
    at: float
    breaker_retries: int | None


Step = BaseException | str | Callable[[Call[None]], None]


@dataclass
class Script:
    """The rest of the chain: per attempt, picks an endpoint (as the balancer does), then raises
    or returns what the script says (a callable step runs first, then the attempt returns "ok")."""

    steps: list[Step]
    endpoints: list[Endpoint] = field(default_factory=lambda: [A, B, C])
    breaker: BreakerState | None = None
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, call: Call[None]) -> Any:
        number = len(self.seen) + 1
        self.seen.append(
            Seen(
                number,
                call.endpoint,
                frozenset(call.tried) if call.tried is not None else None,
                call.deadline,
                time.monotonic(),
                self.breaker.retries if self.breaker is not None else None,
            )
        )
        call.endpoint = self.endpoints[(number - 1) % len(self.endpoints)]
        step = self.steps[number - 1]
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            step(call)
            return "ok"
        return step


def filter_(
    budget: RetryBudget | None = None,
    stats: RetryStats | None = None,
    breaker: BreakerState | None = None,
    max_retries: int | None = None,
) -> Retry:
    return Retry(budget or RetryBudget(), stats or RetryStats(), breaker, max_retries)


# -- retried, or not --------------------------------------------------------------------


async def test_a_call_that_succeeds_at_once_is_attempted_once() -> None:
    stats, budget = RetryStats(), RetryBudget()
    call = make_call(policy())
    script = Script(["answer"])
    assert await Retry(budget, stats)(call, script) == "answer"
    assert len(script.seen) == 1
    assert call.attempts == 1
    assert (stats.retries, stats.denied) == (0, 0)
    assert budget.usage() == (1, 0)
    assert call.endpoint == A
    assert call.tried is None


async def test_a_retryable_failure_then_success_takes_two_attempts_and_one_retry() -> None:
    stats, budget = RetryStats(), RetryBudget()
    call = make_call(policy(3))
    script = Script([unavailable(), "answer"])
    assert await Retry(budget, stats)(call, script) == "answer"
    assert [s.number for s in script.seen] == [1, 2]
    assert call.attempts == 2
    assert (stats.retries, stats.denied) == (1, 0)
    assert budget.usage() == (1, 1)


async def test_a_raw_grpc_aio_error_with_a_policy_code_is_retried_too() -> None:
    stats = RetryStats()
    error = grpc.aio.AioRpcError(UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "conn reset")
    script = Script([error, "answer"])
    assert await filter_(stats=stats)(make_call(policy(2)), script) == "answer"
    assert len(script.seen) == 2
    assert stats.retries == 1


async def test_a_call_without_a_retry_policy_runs_once_and_fails_as_it_failed() -> None:
    stats = RetryStats()
    error = unavailable()
    for rule in (None, Rule(None)):
        script = Script([error])
        with pytest.raises(UpstreamError) as raised:
            await filter_(stats=stats)(make_call(rule), script)
        assert raised.value is error
        assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 0)


async def test_an_attempt_that_committed_part_of_its_answer_is_not_retried() -> None:
    stats = RetryStats()
    error = unavailable("after the first message")

    def commit_then_fail(call: Call[None]) -> None:
        call.committed = True
        raise error

    script = Script([commit_then_fail, "never"])
    with pytest.raises(UpstreamError) as raised:
        await filter_(stats=stats)(make_call(policy(3)), script)
    assert raised.value is error
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 0)


async def test_a_call_the_front_door_cannot_replay_is_not_retried() -> None:
    stats = RetryStats()
    script = Script([unavailable(), "never"])
    with pytest.raises(UpstreamError):
        await filter_(stats=stats)(make_call(policy(3), replayable=False), script)
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 0)


async def test_an_attempt_whose_requests_outgrew_the_replay_buffer_is_not_retried() -> None:
    stats = RetryStats()

    def overflow_then_fail(call: Call[None]) -> None:
        call.replayable = False  # what a front door does when its replay buffer overflows
        raise unavailable()

    script = Script([overflow_then_fail, "never"])
    with pytest.raises(UpstreamError):
        await filter_(stats=stats)(make_call(policy(3)), script)
    assert len(script.seen) == 1
    assert stats.retries == 0


async def test_a_status_the_policy_does_not_name_is_not_retried() -> None:
    stats = RetryStats()
    error = UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    script = Script([error, "never"])
    with pytest.raises(UpstreamError) as raised:
        await filter_(stats=stats)(make_call(policy(3)), script)
    assert raised.value is error
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 0)


async def test_a_bug_in_the_chain_is_not_retried() -> None:
    script = Script([RuntimeError("a filter's bug"), "never"])
    with pytest.raises(RuntimeError, match="a filter's bug"):
        await filter_()(make_call(policy(3)), script)
    assert len(script.seen) == 1


async def test_attempts_stop_at_the_policys_count_and_the_last_failure_is_raised() -> None:
    stats = RetryStats()
    errors = [unavailable("first"), unavailable("second"), unavailable("third")]
    script = Script([*errors, "never"])
    call = make_call(policy(3))
    with pytest.raises(UpstreamError) as raised:
        await filter_(stats=stats)(call, script)
    assert raised.value is errors[2]
    assert len(script.seen) == 3
    assert call.attempts == 3
    assert (stats.retries, stats.denied) == (2, 0)


async def test_a_deliberate_end_is_never_retried_even_with_a_policy_code() -> None:
    stats = RetryStats()
    error = CallError(UNAVAILABLE, "stream reached its maximum age", origin=Origin.DELIBERATE)
    script = Script([error, "never"])
    with pytest.raises(CallError) as raised:
        await filter_(stats=stats)(make_call(policy(3)), script)
    assert raised.value is error
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 0)


async def test_a_mesh_refusal_with_a_policy_code_is_retried() -> None:
    script = Script([CallError(UNAVAILABLE, "gmesh: no endpoint"), "answer"])
    assert await filter_()(make_call(policy(2)), script) == "answer"
    assert len(script.seen) == 2


async def test_no_retry_when_the_backoff_would_end_after_the_calls_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(retry_plugin, "backoff", lambda attempt, base, cap: 5.0)
    stats, budget = RetryStats(), RetryBudget()
    error = unavailable()
    script = Script([error, "never"])
    started = time.monotonic()
    with pytest.raises(UpstreamError) as raised:
        await Retry(budget, stats)(make_call(policy(3), time.monotonic() + 2.0), script)
    assert raised.value is error
    assert time.monotonic() - started < 1.0, "it waited for a backoff it could not finish"
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 0)
    assert budget.usage() == (1, 0), "the budget was spent on a retry that was not made"


async def test_a_backoff_that_ends_before_the_deadline_is_waited_and_the_call_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[tuple[int, float, float]] = []

    def fixed(attempt: int, base: float, cap: float) -> float:
        pauses.append((attempt, base, cap))
        return 0.05

    monkeypatch.setattr(retry_plugin, "backoff", fixed)
    script = Script([unavailable(), unavailable(), "answer"])
    call = make_call(policy(3, base=0.025, cap=0.5), time.monotonic() + 10)
    assert await filter_()(call, script) == "answer"
    assert pauses == [(1, 0.025, 0.5), (2, 0.025, 0.5)]
    gaps = [b.at - a.at for a, b in zip(script.seen, script.seen[1:], strict=False)]
    assert len(gaps) == 2
    assert all(gap >= 0.045 for gap in gaps), gaps


# -- per-try timeouts --------------------------------------------------------------------


async def test_each_attempt_gets_its_per_try_deadline_and_the_calls_deadline_is_restored() -> None:
    deadline = time.monotonic() + 10.0
    call = make_call(policy(3, per_try=0.5), deadline)
    script = Script([unavailable(), unavailable(), "answer"])
    assert await filter_()(call, script) == "answer"
    assert len(script.seen) == 3
    for seen in script.seen:
        assert seen.deadline is not None
        # set to now + per_try just before the attempt started
        assert seen.at - 0.1 <= seen.deadline - 0.5 <= seen.at, (seen.at, seen.deadline)
        assert seen.deadline < deadline
    assert call.deadline == deadline


async def test_a_per_try_timeout_never_extends_the_calls_own_deadline() -> None:
    deadline = time.monotonic() + 0.3
    call = make_call(policy(2, per_try=5.0), deadline)
    script = Script([unavailable(), "answer"])
    assert await filter_()(call, script) == "answer"
    assert [s.deadline for s in script.seen] == [deadline, deadline]
    assert call.deadline == deadline


async def test_a_per_try_timeout_without_a_call_deadline_sets_one_per_attempt_then_none_again() -> None:
    call = make_call(policy(2, per_try=0.2), None)
    script = Script([unavailable(), "answer"])
    assert await filter_()(call, script) == "answer"
    for seen in script.seen:
        assert seen.deadline is not None
        assert seen.at - 0.1 <= seen.deadline - 0.2 <= seen.at
    assert call.deadline is None


async def test_the_calls_deadline_is_restored_after_a_failed_call() -> None:
    deadline = time.monotonic() + 10.0
    call = make_call(policy(2, per_try=0.5), deadline)
    script = Script([unavailable(), unavailable()])
    with pytest.raises(UpstreamError):
        await filter_()(call, script)
    assert len(script.seen) == 2
    assert call.deadline == deadline


async def test_an_attempt_past_its_per_try_timeout_is_retried_while_the_call_has_time() -> None:
    stats = RetryStats()
    timed_out = UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    script = Script([timed_out, "answer"])
    call = make_call(policy(3, per_try=0.01), time.monotonic() + 10.0)
    assert await filter_(stats=stats)(call, script) == "answer"
    assert len(script.seen) == 2
    assert stats.retries == 1


async def test_deadline_exceeded_is_not_retried_without_a_per_try_timeout() -> None:
    script = Script([UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "never"])
    with pytest.raises(UpstreamError):
        await filter_()(make_call(policy(3), time.monotonic() + 10.0), script)
    assert len(script.seen) == 1


async def test_deadline_exceeded_is_not_retried_once_the_calls_own_deadline_passed() -> None:
    stats = RetryStats()
    script = Script([UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "never"])
    with pytest.raises(UpstreamError):
        await filter_(stats=stats)(make_call(policy(3, per_try=0.01), time.monotonic() - 0.01), script)
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 0)


# -- the budget and the breaker's maxRetries -----------------------------------------------


async def test_an_empty_retry_budget_refuses_the_retry_and_counts_it_denied() -> None:
    stats = RetryStats()
    budget = RetryBudget(ratio=0, min_per_second=0)
    error = unavailable()
    script = Script([error, "never"])
    with pytest.raises(UpstreamError) as raised:
        await Retry(budget, stats)(make_call(policy(3)), script)
    assert raised.value is error
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 1)
    assert budget.usage() == (1, 0)


async def test_a_budget_with_room_for_one_retry_allows_exactly_one() -> None:
    stats = RetryStats()
    budget = RetryBudget(ratio=1.0, min_per_second=0)  # one retry per request made
    script = Script([unavailable(), unavailable(), "never"])
    with pytest.raises(UpstreamError):
        await Retry(budget, stats)(make_call(policy(5)), script)
    assert len(script.seen) == 2
    assert (stats.retries, stats.denied) == (1, 1)
    assert budget.usage() == (1, 1)


async def test_the_breakers_max_retries_in_flight_refuses_the_retry() -> None:
    stats, budget = RetryStats(), RetryBudget()
    breaker = BreakerState("svc")
    breaker.retries = 2
    script = Script([unavailable(), "never"], breaker=breaker)
    with pytest.raises(UpstreamError):
        await Retry(budget, stats, breaker, max_retries=2)(make_call(policy(3)), script)
    assert len(script.seen) == 1
    assert (stats.retries, stats.denied) == (0, 1)
    assert budget.usage() == (1, 0), "a retry the breaker refused must not spend the budget"
    assert breaker.retries == 2


async def test_a_retry_attempt_counts_in_the_breakers_retries_while_it_runs() -> None:
    breaker = BreakerState("svc")
    script = Script([unavailable(), unavailable(), "answer"], breaker=breaker)
    assert await filter_(breaker=breaker, max_retries=5)(make_call(policy(3)), script) == "answer"
    assert [s.breaker_retries for s in script.seen] == [0, 1, 1]
    assert breaker.retries == 0


async def test_a_failed_retry_attempt_gives_its_breaker_slot_back() -> None:
    breaker = BreakerState("svc")
    script = Script([unavailable(), unavailable()], breaker=breaker)
    with pytest.raises(UpstreamError):
        await filter_(breaker=breaker, max_retries=5)(make_call(policy(2)), script)
    assert [s.breaker_retries for s in script.seen] == [0, 1]
    assert breaker.retries == 0


# -- endpoints of earlier attempts ---------------------------------------------------------


async def test_retries_record_each_failed_endpoint_as_tried_and_let_the_balancer_pick_anew() -> None:
    call = make_call(policy(3))
    script = Script([unavailable(), unavailable(), "answer"], endpoints=[A, B, C])
    assert await filter_()(call, script) == "answer"
    assert [s.endpoint for s in script.seen] == [None, None, None]
    assert [s.tried for s in script.seen] == [None, frozenset({A.address}), frozenset({A.address, B.address})]
    assert call.tried == {A.address, B.address}
    assert call.endpoint == C
    assert call.attempts == 3


async def test_an_attempt_that_failed_before_picking_an_endpoint_adds_nothing_to_tried() -> None:
    call = make_call(policy(2))
    script = Script([unavailable(), "answer"], endpoints=[A])

    async def no_pick_first(c: Call[None]) -> Any:
        if not script.seen:
            script.seen.append(Seen(1, c.endpoint, None, c.deadline, time.monotonic(), None))
            raise CallError(UNAVAILABLE, "gmesh: no endpoints")
        return await script(c)

    assert await filter_()(call, no_pick_first) == "answer"
    assert len(script.seen) == 2
    assert script.seen[1].tried is None
    assert call.tried is None


# -- cancellation --------------------------------------------------------------------------


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    limit = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < limit, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.001)


async def test_cancelling_the_call_during_the_backoff_ends_it_at_once_without_another_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[int] = []

    def long(attempt: int, base: float, cap: float) -> float:
        pauses.append(attempt)
        return 30.0

    monkeypatch.setattr(retry_plugin, "backoff", long)
    stats = RetryStats()
    script = Script([unavailable(), "never"])
    call = make_call(policy(3), time.monotonic() + 60.0)
    handler: Callable[[Call[None]], Awaitable[Any]] = script
    task = asyncio.ensure_future(filter_(stats=stats)(call, handler))
    # from choosing the pause to sleeping it, the filter does not yield: once the backoff is
    # chosen and the task has yielded, it waits in the backoff
    await until(lambda: task.done() or pauses == [1], 5.0, "the backoff after the first attempt")
    assert not task.done()
    assert len(script.seen) == 1
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1.0):
            await task
    assert time.monotonic() - cancelled_at < 0.5
    assert task.cancelled()
    assert len(script.seen) == 1
    assert pauses == [1]
