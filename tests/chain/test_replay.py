"""`RequestTape` and `WrittenTape` keep requests for retries, within a per-call limit and a shared budget."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import pytest

from gmesh.chain.call import Call
from gmesh.chain.replay import (
    REPLAY_LIMIT,
    ReplayBudget,
    RequestStreamBroken,
    RequestTape,
    WrittenTape,
    message_size,
)
from gmesh.v1 import echo_pb2

KIB = 1024


async def forward(call: Call[Any]) -> None:
    return None


def new_call() -> Call[Any]:
    call: Call[Any] = Call("/a.B/C", (), None, "svc", forward)
    call.replayable = True
    return call


class Source:
    """A caller's request stream that counts how many messages were pulled from it."""

    def __init__(self, items: list[Any], error: BaseException | None = None) -> None:
        self.items = items
        self.error = error
        self.pulled = 0

    async def stream(self) -> AsyncIterator[Any]:
        for item in self.items:
            self.pulled += 1
            yield item
        if self.error is not None:
            raise self.error


class LiveSource:
    """A caller's request stream fed by the test, one message at a time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.pulled = 0

    async def stream(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            self.pulled += 1
            yield item


async def turns_until(condition: Callable[[], bool], turns: int = 100) -> None:
    """Let the event loop run, one turn at a time, until `condition` holds (at most `turns` turns)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition(), f"still false after {turns} loop turns"


async def read_all(tape: RequestTape) -> list[Any]:
    return [message async for message in tape.messages()]


async def read_into(tape: RequestTape, got: list[Any]) -> None:
    """Read the tape to its end, noting each message as it comes (what was read before an error stays)."""
    async for message in tape.messages():
        got.append(message)


# --------------------------------------------------------------------------- replay and laziness


async def test_a_second_reader_gets_every_message_again_then_reads_on_live() -> None:
    source = Source([b"m1", b"m2", b"m3", b"m4", b"m5"])
    call = new_call()
    budget = ReplayBudget()
    tape = RequestTape(source.stream(), call, budget=budget)

    async with aclosing(tape.messages()) as first:
        assert source.pulled == 0  # nothing is read before a reader asks
        assert await anext(first) == b"m1"
        assert source.pulled == 1
        assert await anext(first) == b"m2"
        assert await anext(first) == b"m3"
        assert source.pulled == 3
    assert tape.kept_bytes == 6
    assert budget.used == 6

    async with aclosing(tape.messages()) as second:
        assert [await anext(second) for _ in range(3)] == [b"m1", b"m2", b"m3"]
        assert source.pulled == 3  # replayed from memory
        assert await anext(second) == b"m4"
        assert source.pulled == 4  # then read live, one at a time
        assert await anext(second) == b"m5"
        assert source.pulled == 5
        with pytest.raises(StopAsyncIteration):
            await anext(second)
    assert call.replayable is True
    assert tape.kept_bytes == 10
    assert budget.used == 10

    assert await read_all(tape) == [b"m1", b"m2", b"m3", b"m4", b"m5"]  # a third attempt: all from memory
    assert source.pulled == 5
    tape.close()
    assert budget.used == 0
    assert tape.kept_bytes == 0


async def test_a_reader_cancelled_while_waiting_does_not_lose_the_message_it_was_waiting_for() -> None:
    source = LiveSource()
    call = new_call()
    budget = ReplayBudget()
    tape = RequestTape(source.stream(), call, budget=budget)
    got: list[Any] = []

    async def attempt() -> None:
        async for message in tape.messages():
            got.append(message)

    first = asyncio.ensure_future(attempt())
    source.queue.put_nowait(b"a")
    await turns_until(lambda: got == [b"a"] and tape._reading is not None)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert tape._reading is not None and not tape._reading.done()  # the read itself goes on

    source.queue.put_nowait(b"b")
    await turns_until(lambda: source.pulled == 2)
    got.clear()
    second = asyncio.ensure_future(attempt())
    await turns_until(lambda: got == [b"a", b"b"])
    source.queue.put_nowait(b"c")
    source.queue.put_nowait(None)
    await second
    assert got == [b"a", b"b", b"c"]
    assert source.pulled == 3
    assert call.replayable is True
    assert budget.used == 3
    tape.close()
    assert budget.used == 0


async def test_close_stops_a_read_in_flight_and_frees_everything() -> None:
    source = LiveSource()
    budget = ReplayBudget()
    tape = RequestTape(source.stream(), new_call(), budget=budget)
    reader = tape.messages()
    source.queue.put_nowait(b"abc")
    assert await anext(reader) == b"abc"
    pending = asyncio.ensure_future(anext(reader))
    await turns_until(lambda: tape._reading is not None)
    reading = tape._reading
    assert reading is not None
    tape.close()
    assert budget.used == 0
    assert tape.kept_bytes == 0
    with pytest.raises(StopAsyncIteration):
        await pending  # the read was cancelled: the stream is over for the reader
    assert reading.cancelled()
    await reader.aclose()


# --------------------------------------------------------------------------- the per-call limit


async def test_past_the_per_call_limit_nothing_is_kept_and_the_reader_still_gets_every_message() -> None:
    chunk = 300 * KIB
    messages = [bytes([i]) * chunk for i in range(6)]
    source = Source(messages)
    call = new_call()
    budget = ReplayBudget()
    tape = RequestTape(source.stream(), call, budget=budget)

    got: list[bytes] = []
    async with aclosing(tape.messages()) as reader:
        for _ in range(3):
            got.append(await anext(reader))
        assert 3 * chunk <= REPLAY_LIMIT
        assert call.replayable is True
        assert tape.kept_bytes == 3 * chunk
        assert budget.used == 3 * chunk

        got.append(await anext(reader))  # 4 * 300 KiB > 1 MiB
        assert call.replayable is False
        assert tape.keeping is False
        assert tape.kept_bytes == 0
        assert budget.used == 0
        assert budget.refused == 0  # the call's own limit, not the process budget

        async for message in reader:
            got.append(message)
            assert tape.kept_bytes == 0
            assert budget.used == 0
    assert got == messages
    assert source.pulled == 6

    with pytest.raises(RuntimeError, match="past its replay limit"):
        await anext(tape.messages())  # nothing is left to replay
    tape.close()
    assert budget.used == 0


async def test_a_single_message_over_the_per_call_limit_is_still_delivered() -> None:
    big = b"x" * (REPLAY_LIMIT + 1)
    source = Source([b"small", big, b"after"])
    call = new_call()
    budget = ReplayBudget()
    tape = RequestTape(source.stream(), call, budget=budget)
    assert await read_all(tape) == [b"small", big, b"after"]
    assert call.replayable is False
    assert budget.used == 0
    assert tape.kept_bytes == 0


# --------------------------------------------------------------------------- the process-wide budget


async def test_when_the_shared_budget_is_spent_the_next_tape_stops_keeping_but_delivers_everything() -> None:
    budget = ReplayBudget(limit=250)
    call_a, call_b = new_call(), new_call()
    source_a = Source([b"a" * 100, b"a" * 100])
    source_b = Source([b"b" * 30, b"b" * 30, b"b" * 30, b"b" * 30])
    tape_a = RequestTape(source_a.stream(), call_a, budget=budget)
    tape_b = RequestTape(source_b.stream(), call_b, budget=budget)

    assert await read_all(tape_a) == [b"a" * 100, b"a" * 100]
    assert budget.used == 200 == tape_a.kept_bytes

    async with aclosing(tape_b.messages()) as reader_b:
        assert await anext(reader_b) == b"b" * 30
        assert budget.used == 230 == tape_a.kept_bytes + tape_b.kept_bytes
        assert call_b.replayable is True
        assert await anext(reader_b) == b"b" * 30  # 260 > 250: refused
        assert call_b.replayable is False
        assert budget.refused == 1
        assert tape_b.kept_bytes == 0
        assert budget.used == 200 == tape_a.kept_bytes + tape_b.kept_bytes  # b's 30 bytes given back
        rest = [message async for message in reader_b]
    assert rest == [b"b" * 30, b"b" * 30]
    assert budget.refused == 1  # counted once: a tape that stopped keeping asks no more
    assert call_a.replayable is True
    assert budget.used == 200

    tape_a.release()
    assert budget.used == 0
    assert call_a.replayable is False
    tape_a.close()
    tape_b.close()
    tape_b.release()
    assert budget.used == 0
    assert tape_a.kept_bytes == tape_b.kept_bytes == 0


async def test_closing_both_tapes_gives_the_whole_budget_back() -> None:
    budget = ReplayBudget(limit=1000)
    tape_a = RequestTape(Source([b"1" * 100, b"2" * 200]).stream(), new_call(), budget=budget)
    tape_b = RequestTape(Source([b"3" * 300]).stream(), new_call(), budget=budget)
    await read_all(tape_a)
    await read_all(tape_b)
    assert budget.used == 600 == tape_a.kept_bytes + tape_b.kept_bytes
    tape_a.close()
    assert budget.used == 300
    tape_b.close()
    assert budget.used == 0
    tape_b.close()  # twice is harmless
    assert budget.used == 0
    assert budget.refused == 0


# --------------------------------------------------------------------------- release at commit


async def test_release_frees_the_kept_bytes_at_once_and_later_messages_still_arrive() -> None:
    source = Source([b"one", b"two", b"three", b"four"])
    call = new_call()
    budget = ReplayBudget()
    tape = RequestTape(source.stream(), call, budget=budget)
    async with aclosing(tape.messages()) as reader:
        assert await anext(reader) == b"one"
        assert await anext(reader) == b"two"
        assert budget.used == 6
        tape.release()  # the call committed
        assert budget.used == 0
        assert tape.kept_bytes == 0
        assert call.replayable is False
        assert [message async for message in reader] == [b"three", b"four"]
    assert budget.used == 0
    assert budget.refused == 0
    assert source.pulled == 4


class Message:
    """A request message that can be watched for being freed."""

    __slots__ = ("__weakref__", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data


async def test_release_frees_the_messages_the_reader_has_already_passed() -> None:
    async def stream() -> AsyncIterator[Message]:
        for i in range(4):
            yield Message(bytes([i]) * 1000)

    budget = ReplayBudget()
    tape = RequestTape(stream(), new_call(), lambda m: len(m.data), budget)
    async with aclosing(tape.messages()) as reader:
        passed = [weakref.ref(await anext(reader)) for _ in range(3)]
        assert budget.used == 3000
        tape.release()  # the call committed: these will never be sent again
        assert budget.used == 0
        gc.collect()
        # (the third is still the reader's current message; the first two are behind it)
        assert [ref() is None for ref in passed[:2]] == [True, True], "released messages are still held"
        last = await anext(reader)
        assert last.data == bytes([3]) * 1000
    tape.close()


# --------------------------------------------------------------------------- the source's end


async def test_an_error_from_the_request_stream_reaches_the_reader() -> None:
    source = Source([b"a"], error=ValueError("caller broke"))
    tape = RequestTape(source.stream(), new_call(), budget=ReplayBudget())
    got: list[Any] = []
    with pytest.raises(ValueError, match="caller broke"):
        await read_into(tape, got)
    assert got == [b"a"]

    got.clear()
    with pytest.raises(ValueError, match="caller broke"):  # a retry replays, then meets it too
        await read_into(tape, got)
    assert got == [b"a"]
    tape.close()


async def test_a_request_stream_that_raises_cancelled_error_does_not_look_finished() -> None:
    # The caller's stream broke off (its iterator raised CancelledError): a reader must not see
    # a clean end, or the upstream is half-closed with a truncated request as if it were whole.
    # (Without a tape, grpc.aio cancels the RPC when a request iterator raises.)
    async def stream() -> AsyncIterator[bytes]:
        yield b"part 1"
        raise asyncio.CancelledError()

    tape = RequestTape(stream(), new_call(), budget=ReplayBudget())
    got: list[bytes] = []
    # an error of its own (not CancelledError: the reader's task is not being cancelled), which
    # the proxy's pump turns into the call's failure
    with pytest.raises(RequestStreamBroken, match="cancelled"):
        await read_into(tape, got)
    assert got == [b"part 1"]
    tape.close()


async def test_a_finished_request_stream_ends_every_reader() -> None:
    source = Source([b"x", b"y"])
    tape = RequestTape(source.stream(), new_call(), budget=ReplayBudget())
    assert await read_all(tape) == [b"x", b"y"]
    assert await read_all(tape) == [b"x", b"y"]
    assert source.pulled == 2
    tape.close()


async def test_an_empty_request_stream_ends_at_once() -> None:
    budget = ReplayBudget()
    tape = RequestTape(Source([]).stream(), new_call(), budget=budget)
    assert await read_all(tape) == []
    assert budget.used == 0


# --------------------------------------------------------------------------- WrittenTape


def test_a_written_tape_keeps_what_was_written_in_order() -> None:
    budget = ReplayBudget()
    call = new_call()
    tape = WrittenTape(call, len, budget)
    assert tape.kept() == []
    assert tape.half_closed is False
    for message in (b"a" * 10, b"b" * 20, b"c" * 30):
        tape.record(message)
    assert tape.kept() == [b"a" * 10, b"b" * 20, b"c" * 30]
    assert tape.kept_bytes == 60
    assert budget.used == 60
    tape.half_closed = True  # the application called done_writing()
    assert tape.kept() == [b"a" * 10, b"b" * 20, b"c" * 30]
    assert call.replayable is True


def test_a_written_tape_past_the_per_call_limit_keeps_nothing_and_its_call_is_not_replayable() -> None:
    budget = ReplayBudget()
    call = new_call()
    tape = WrittenTape(call, len, budget)
    chunk = b"z" * (600 * KIB)
    tape.record(chunk)
    assert tape.kept() == [chunk]
    assert budget.used == 600 * KIB
    tape.record(chunk)  # 1200 KiB > 1 MiB
    assert tape.kept() == []
    assert call.replayable is False
    assert tape.kept_bytes == 0
    assert budget.used == 0
    tape.record(b"later")
    assert tape.kept() == []
    assert tape._messages == []  # nothing kept behind the scenes either
    assert budget.used == 0


def test_a_written_tape_stops_keeping_when_the_shared_budget_is_spent() -> None:
    budget = ReplayBudget(limit=250)
    call = new_call()
    tape = WrittenTape(call, len, budget)
    tape.record(b"1" * 100)
    tape.record(b"2" * 100)
    assert budget.used == 200
    tape.record(b"3" * 100)
    assert budget.refused == 1
    assert tape.kept() == []
    assert call.replayable is False
    assert budget.used == 0
    tape.record(b"4" * 10)
    assert budget.refused == 1
    assert budget.used == 0


def test_a_released_written_tape_keeps_nothing() -> None:
    budget = ReplayBudget()
    call = new_call()
    tape = WrittenTape(call, len, budget)
    tape.record(b"abc")
    tape.release()
    assert tape.kept() == []
    assert budget.used == 0
    assert call.replayable is False
    tape.record(b"def")
    assert tape.kept() == []
    assert budget.used == 0


def test_a_written_tape_measures_messages_with_its_size_function() -> None:
    budget = ReplayBudget()
    tape = WrittenTape(new_call(), message_size(None), budget)
    request = echo_pb2.EchoRequest(payload=b"x" * 100)
    tape.record(request)
    assert budget.used == len(request.SerializeToString())
    assert tape.kept() == [request]


# --------------------------------------------------------------------------- message_size


def test_bytes_are_measured_by_their_length() -> None:
    def never(_: Any) -> bytes:
        raise AssertionError("the serializer is not needed for bytes")

    size = message_size(never)
    assert size(b"x" * 17) == 17
    assert size(bytearray(b"y" * 5)) == 5
    assert size(memoryview(b"z" * 9)) == 9
    assert size(b"") == 0


def test_protobuf_messages_are_measured_by_their_encoded_size() -> None:
    def never(_: Any) -> bytes:
        raise AssertionError("the serializer is not needed for protobuf messages")

    request = echo_pb2.EchoRequest(payload=b"x" * 100)
    encoded = len(request.SerializeToString())
    assert encoded == 102  # 1 tag byte, 1 length byte, 100 payload bytes
    assert message_size(never)(request) == encoded
    assert message_size(None)(request) == encoded
    assert message_size(None)(echo_pb2.EchoRequest()) == 0


def test_other_messages_are_measured_by_what_their_serializer_makes() -> None:
    calls: list[Any] = []

    def serializer(message: Any) -> bytes:
        calls.append(message)
        return json.dumps(message).encode()

    message = {"name": "orders", "n": 12}
    assert message_size(serializer)(message) == len(json.dumps(message).encode())
    assert calls == [message]


def test_without_a_serializer_other_messages_are_measured_by_their_size_in_memory() -> None:
    message = {"a": 1}
    assert message_size(None)(message) == sys.getsizeof(message)
