"""`StatusWatch` finds the real final status of a stream to a real gRPC server; `MaxAge` ends streams."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import pytest_asyncio

from gmesh.errors import SYNTHETIC_INTERNAL, CallError, Origin, outcome_of
from gmesh.outbound.upstream import MAX_AGE_TRAILER, REAL_STATUS_WAIT, MaxAge, Status, StatusWatch, synthetic
from gmesh.testing.echo import EchoServer, start_echo_server
from gmesh.v1 import echo_pb2

#: A method the Echo server does not have: it answers UNIMPLEMENTED at once, before reading a request.
MISSING = "/gmesh.v1.Echo/NoSuchMethod"
CHUNK = b"x" * 1024
#: Writes a client makes at most before giving up on the server's end (it comes long before).
MAX_WRITES = 10_000
#: "At once": far below the REAL_STATUS_WAIT a final status may take at worst.
AT_ONCE = 0.5


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[EchoServer]:
    server = await start_echo_server("up")
    yield server
    await server.stop(None)


@pytest_asyncio.fixture
async def channel(upstream: EchoServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(upstream.address) as opened:
        yield opened


async def write_until_refused(call: grpc.aio.Call, watch: StatusWatch) -> int:
    """Write requests as the proxy's pump does (counted in `writing`, `write_failed` on failure)
    until the server's end makes a write fail; returns how many writes succeeded."""
    written = 0
    try:
        while written < MAX_WRITES:
            watch.writing += 1
            try:
                await call.write(CHUNK)  # type: ignore[attr-defined]
            finally:
                watch.writing -= 1
            written += 1
        await call.done_writing()  # type: ignore[attr-defined]
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        watch.write_failed = True
    return written


async def timed_final(watch: StatusWatch) -> tuple[Status, float]:
    start = time.monotonic()
    status = await watch.final()
    return status, time.monotonic() - start


async def wait_for(condition: Callable[[], bool], limit: float = 2.0) -> None:
    """Poll `condition` until it holds, for at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"condition still false after {limit}s"
        await asyncio.sleep(0.005)


async def real_status_arrival(watch: StatusWatch) -> float:
    """When (time.monotonic()) a real status of a finished `watch`'s call was first to be had: the
    call holds it, or it landed first and was seen by the done callback before the invented one
    overwrote it (grpc.aio sets them in either order)."""
    for _ in range(int(REAL_STATUS_WAIT * 1000)):
        if not synthetic(watch._current()) or any(not synthetic(s) for s in watch.seen):
            break
        await asyncio.sleep(0.001)
    return time.monotonic()


async def missing_method_status(channel: grpc.aio.Channel) -> Status:
    """The status the server really sends for MISSING, seen on a call that writes nothing."""
    call = channel.stream_stream(MISSING)()
    watch = StatusWatch(call)
    return await watch.final()


# --------------------------------------------------------------------------- calls with no race


async def test_a_call_answered_ok_gets_ok_at_once(channel: grpc.aio.Channel) -> None:
    request = echo_pb2.EchoRequest(message="hi").SerializeToString()
    call = channel.unary_unary("/gmesh.v1.Echo/Unary")(request)
    watch = StatusWatch(call)
    response = echo_pb2.EchoResponse.FromString(await call)
    assert response.message == "hi"
    (code, details, _), took = await timed_final(watch)
    assert code == grpc.StatusCode.OK
    assert details == ""
    assert took < AT_ONCE
    assert [s[0] for s in watch.seen] == [grpc.StatusCode.OK]


async def test_a_stream_that_wrote_everything_and_ended_ok_gets_ok_at_once(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream("/gmesh.v1.Echo/Bidi")()
    watch = StatusWatch(call)
    for i in range(3):
        watch.writing += 1
        await call.write(echo_pb2.EchoRequest(message=f"m{i}").SerializeToString())
        watch.writing -= 1
    await call.done_writing()
    replies = []
    while (message := await call.read()) is not grpc.aio.EOF:
        replies.append(echo_pb2.EchoResponse.FromString(message).message)
    assert replies == ["m0", "m1", "m2"]
    (code, _, _), took = await timed_final(watch)
    assert code == grpc.StatusCode.OK
    assert took < AT_ONCE
    assert watch.write_failed is False


async def test_a_real_error_with_no_write_failed_or_under_way_is_final_at_once(
    channel: grpc.aio.Channel,
) -> None:
    call = channel.stream_stream(MISSING)()
    watch = StatusWatch(call, own_writes=True)
    (code, details, _), took = await timed_final(watch)
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert details != SYNTHETIC_INTERNAL
    assert took < AT_ONCE < REAL_STATUS_WAIT
    assert watch.write_failed is False
    assert watch.writing == 0


async def test_an_error_status_with_trailers_comes_whole_and_at_once(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream("/gmesh.v1.Echo/Bidi")()
    watch = StatusWatch(call)
    request = echo_pb2.EchoRequest(
        fail_code=grpc.StatusCode.PERMISSION_DENIED.value[0],
        fail_details="not you",
        trailing_metadata=[echo_pb2.Header(key="x-why", value=b"because")],
    )
    await call.write(request.SerializeToString())
    await call.done_writing()
    (code, details, trailing), took = await timed_final(watch)
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "not you")
    assert ("x-why", "because") in trailing
    assert took < AT_ONCE


# --------------------------------------------------------------------------- a write racing the server's end


async def test_a_bidi_stream_refused_while_writing_always_gets_the_real_status(
    channel: grpc.aio.Channel,
) -> None:
    real = await missing_method_status(channel)
    assert real[0] == grpc.StatusCode.UNIMPLEMENTED
    finals: Counter[tuple[grpc.StatusCode, str]] = Counter()
    failed_writes = 0
    raced = 0  # calls where grpc.aio itself ended up holding its invented INTERNAL
    for _ in range(200):
        call = channel.stream_stream(MISSING)()
        watch = StatusWatch(call)
        await write_until_refused(call, watch)
        failed_writes += watch.write_failed
        (code, details, _), took = await timed_final(watch)
        finals[(code, details)] += 1
        assert took < AT_ONCE
        now = watch._current()
        # code and details always come from one status, never half of each
        assert (now[0] == grpc.StatusCode.INTERNAL) == (now[1] == SYNTHETIC_INTERNAL)
        raced += synthetic(now)
    assert finals == Counter({(grpc.StatusCode.UNIMPLEMENTED, real[1]): 200})
    assert failed_writes == 200
    assert raced > 0, "no call met the race: the test proved nothing"


async def test_a_client_stream_refused_while_writing_gets_the_real_status_without_waiting_it_out(
    channel: grpc.aio.Channel,
) -> None:
    # Here grpc.aio sets its invented INTERNAL first (running the done callbacks, once) and the
    # real status overwrites it a moment later without running them again.
    real = await missing_method_status(channel)
    for _ in range(20):
        call = channel.stream_unary(MISSING)()
        watch = StatusWatch(call)
        await write_until_refused(call, watch)
        assert watch.write_failed is True
        start = time.monotonic()
        arrival = asyncio.ensure_future(real_status_arrival(watch))
        (code, details, _), took = await timed_final(watch)
        assert (code, details) == (grpc.StatusCode.UNIMPLEMENTED, real[1])
        assert details != SYNTHETIC_INTERNAL
        arrived = await arrival - start
        assert arrived < AT_ONCE  # the real status was there almost at once...
        assert took < AT_ONCE, f"final() took {took:.2f}s for a status there after {arrived * 1000:.1f}ms"


async def test_a_client_stream_fed_by_an_iterator_gets_the_real_status_without_waiting_it_out(
    channel: grpc.aio.Channel,
) -> None:
    async def requests() -> AsyncIterator[bytes]:
        for _ in range(MAX_WRITES):
            yield CHUNK

    real = await missing_method_status(channel)
    for _ in range(20):
        call = channel.stream_unary(MISSING)(requests())
        watch = StatusWatch(call, own_writes=False)  # grpc.aio writes: a failed write is invisible
        (code, details, _), took = await timed_final(watch)
        assert (code, details) == (grpc.StatusCode.UNIMPLEMENTED, real[1])
        assert took < AT_ONCE, f"final() took {took:.2f}s for a status that had already arrived"


# --------------------------------------------------------------------------- MaxAge


async def test_max_age_expires_once_after_its_age() -> None:
    fired: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    age = MaxAge(0.05, lambda: fired.append(loop.time()))
    assert age.expired is False
    await wait_for(lambda: age.expired)
    assert len(fired) == 1
    assert fired[0] - start >= 0.05 - 1e-6  # (the loop may run a timer within its clock resolution)
    later = MaxAge(0.1, lambda: None)  # a sentinel due well after any second firing would be
    await wait_for(lambda: later.expired)
    assert len(fired) == 1


async def test_max_age_fires_between_its_age_and_ten_percent_later() -> None:
    loop = asyncio.get_running_loop()
    before = loop.time()
    ages = [MaxAge(10.0, lambda: None) for _ in range(50)]
    after = loop.time()
    try:
        whens = [age._timer.when() for age in ages]  # type: ignore[attr-defined]
        assert all(before + 10.0 <= when <= after + 11.0 for when in whens)
        assert len(set(whens)) > 1  # spread, so streams opened together do not end together
    finally:
        for age in ages:
            age.cancel()


async def test_a_cancelled_max_age_never_fires() -> None:
    fired: list[str] = []
    age = MaxAge(0.05, lambda: fired.append("expired"))
    age.cancel()
    sentinel = MaxAge(0.06, lambda: None)  # due after the latest moment `age` could have fired
    await wait_for(lambda: sentinel.expired)
    assert fired == []
    assert age.expired is False


async def test_the_max_age_error_is_a_deliberate_unavailable_with_the_reconnect_trailer() -> None:
    age = MaxAge(0.05, lambda: None)
    age.cancel()
    error = age.error()
    assert isinstance(error, CallError)
    assert error.status == grpc.StatusCode.UNAVAILABLE
    assert error.trailing_metadata == (("x-gmesh-stream-max-age", "1"),)
    assert error.trailing_metadata == (MAX_AGE_TRAILER,)
    assert "maximum age (50ms)" in error.details
    assert error.origin == Origin.DELIBERATE
    assert error.endpoint_fault is False
    outcome = outcome_of(error)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert outcome.failed is False
    assert outcome.endpoint_fault is False
    assert outcome.committed is False
    assert outcome_of(error, committed=True).committed is True


async def test_max_age_ends_a_live_stream_and_the_caller_gets_its_error(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream("/gmesh.v1.Echo/Bidi")()
    watch = StatusWatch(call)
    age = MaxAge(0.05, call.cancel)
    await call.write(echo_pb2.EchoRequest(message="first").SerializeToString())
    assert echo_pb2.EchoResponse.FromString(await call.read()).message == "first"
    await wait_for(lambda: age.expired)
    (code, _, _), took = await timed_final(watch)
    assert code == grpc.StatusCode.CANCELLED
    assert took < AT_ONCE
    error = age.error()
    assert error.status == grpc.StatusCode.UNAVAILABLE
    assert outcome_of(error).endpoint_fault is False
