"""Streaming calls on a `MeshChannel` (unary-stream, stream-unary, stream-stream).

The chain runs in a task next to the application. Its forwarder makes the call on the
picked endpoint (an *attempt*) and hands it to the application, which then reads, writes
and half-closes on it directly (no extra hop per message). The forwarder waits for the
attempt's end and turns it into the call's outcome, exactly as the proxy does: OK, or an
`UpstreamError` with the real status (`StatusWatch`: never grpc.aio's invented INTERNAL),
or the deliberate end of the Service's `maxStreamAge`. So stats, outlier detection,
breakers and rollouts see a stream that failed as failed, committed or not.

Under a route's retry policy, what the application sends is kept (request iterator:
`RequestTape`; `write()`: `WrittenTape`) until the application sees any part of the
answer (response headers or a message): the call is then committed and the buffer freed.
A failed attempt that nothing of reached the application is retried; the application's
call object follows the new attempt (a pending read continues there; what was written is
sent again). Client-streaming calls are not retried: grpc-python reports its own INTERNAL
when a server refuses one mid-write, so a refusal cannot be told from a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Generator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.chain.call import Call
from gmesh.chain.replay import RequestTape, WrittenTape, as_async, message_size
from gmesh.channel.unary import compiled_of, rpc_error
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import CallError, UpstreamError, grpc_status
from gmesh.outbound.upstream import MaxAge, StatusWatch

if TYPE_CHECKING:
    from gmesh.channel.channel import MeshChannel

log = logging.getLogger(__name__)

_KINDS = {
    "us": MethodKind.SERVER_STREAMING,
    "su": MethodKind.CLIENT_STREAMING,
    "ss": MethodKind.BIDI_STREAMING,
}
_OK = grpc.StatusCode.OK
#: How long empty response headers of a retryable attempt wait to be told from a refusal.
HEADER_GRACE = 0.005
_CANCELLED = (grpc.StatusCode.CANCELLED, "Locally cancelled by application!", ())


class StreamingMultiCallable:
    __slots__ = ("_deser", "_kind", "_mesh", "_method", "_ser")

    def __init__(self, mesh: MeshChannel, method: str, ser: Any, deser: Any, kind: str) -> None:
        self._mesh, self._method, self._ser, self._deser, self._kind = mesh, method, ser, deser, kind

    def __call__(
        self, request: Any = None, *, timeout: float | None = None, metadata: Any = None,
        credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
    ) -> StreamingCall:  # fmt: skip
        return StreamingCall(self, request, timeout, metadata, (credentials, wait_for_ready, compression))


async def forward_streaming(call: Call[StreamingCall]) -> None:
    """One attempt: the upstream call on the picked endpoint, handed to the application; returns
    when it ends OK, raises its real status otherwise."""
    sc = call.downstream
    if sc._stopped is not None:  # a message limit ended the stream (say, during a retry's backoff)
        call.committed = True
        raise sc._stopped
    multi = sc._multi
    mesh = multi._mesh
    assert call.endpoint is not None and mesh.pool is not None
    conn = mesh.pool.get(call.endpoint)
    kind = multi._kind
    make = {"us": conn.unary_stream, "su": conn.stream_unary, "ss": conn.stream_stream}[kind]
    known = sc._known
    if kind == "su":
        call.replayable = False  # see the module docstring
    retrying = call.attempts > 0 and call.replayable and not sc._committed
    request = sc._request
    if kind == "us":
        args: tuple[Any, ...] = (request,)
        if not call.sent:
            _sent(call)
    elif sc._writes:
        args = ()
        if retrying and sc._tape is None:
            sc._tape = WrittenTape(call, message_size(multi._ser))
    elif retrying:
        if sc._tape is None:
            sc._tape = RequestTape(_counted(request, call), call, message_size(multi._ser))
        assert isinstance(sc._tape, RequestTape)
        args = (sc._tape.messages(),)
    else:
        args = (_counted(request, call),)
    credentials, wait_for_ready, compression = sc._extra
    upstream = make(call.method, multi._ser, multi._deser, known=known)(
        *args,
        timeout=call.upstream_timeout(),
        metadata=call.metadata or None,
        credentials=credentials,
        wait_for_ready=wait_for_ready,
        compression=compression,
    )
    watch = StatusWatch(upstream, own_writes=sc._writes)
    replaying = sc._writes and isinstance(sc._tape, WrittenTape) and call.attempts > 1
    if replaying:
        sc._replayed = asyncio.get_running_loop().create_future()  # the application's writes wait
    sc._publish(upstream, watch)
    if replaying:
        assert isinstance(sc._tape, WrittenTape)
        try:
            await _replay(sc._tape, upstream, watch)
        finally:
            if sc._replayed is not None and not sc._replayed.done():
                sc._replayed.set_result(None)
    try:
        code, details, trailing = await watch.final()
    except asyncio.CancelledError:
        upstream.cancel()
        raise
    if sc._max_age is not None and sc._max_age.expired:
        call.committed = True  # ended on purpose: never retried
        raise sc._max_age.error()
    if sc._stopped is not None:
        call.committed = True  # a message limit ended it: never retried
        raise sc._stopped
    if sc._committed:
        call.committed = True
    if code == _OK:
        call.committed = True
        sc._ok = (code, details, trailing)
        return
    initial = upstream.initial_metadata()
    raise UpstreamError(code, details, tuple(trailing), initial_metadata=tuple(await initial or ()))


def _sent(call: Call[Any]) -> bool:
    """Count a request message; False when a filter's message limit ended the stream."""
    call.sent += 1
    meter = call.meter
    if meter is not None:
        meter.sent += 1
    hook = call.on_message
    if hook is not None:
        try:
            hook()
        except CallError as exc:
            call.downstream._stop(exc)
            return False
    return True


def _received(call: Call[Any] | None) -> None:
    if call is not None:
        call.received += 1
        meter = call.meter
        if meter is not None:
            meter.received += 1


async def _counted(requests: Any, call: Call[Any]) -> AsyncIterator[Any]:
    """The application's request iterator, each message counted once as it is taken."""
    async for message in as_async(requests):
        if not _sent(call):
            return  # a message limit ended the stream (its attempt is cancelled)
        yield message


async def _replay(tape: WrittenTape, upstream: Any, watch: StatusWatch) -> None:
    """Send a new attempt what the application wrote so far (it may write more meanwhile)."""
    i = 0
    try:
        kept = tape.kept()
        while i < len(kept):
            await upstream.write(kept[i])
            i += 1
        if tape.half_closed:
            await upstream.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        watch.write_failed = True  # this attempt failed too: its status says so


class StreamingCall(grpc.aio.StreamStreamCall):  # type: ignore[misc]
    """A streaming call on a MeshChannel (any of unary-stream, stream-unary, stream-stream).

    The chain runs in a task; once it has picked an endpoint, reads, writes and statuses go
    to the attempt made there. Final statuses are the chain's outcome (exact: see the
    module docstring). `cancel()` ends the call wherever it is.
    """

    def __init__(
        self, multi: StreamingMultiCallable, request: Any, timeout: float | None, metadata: Any, extra: Any
    ) -> None:
        self._multi, self._extra, self._request = multi, extra, request
        #: the application writes requests itself (no request iterator given)
        self._writes = request is None and multi._kind != "us"
        loop = asyncio.get_running_loop()
        self._attempt: Any = None  # the upstream call of the current attempt
        self._watch: StatusWatch | None = None
        self._moved = asyncio.Event()  # a new attempt was published, or the chain ended
        self._call: Call[StreamingCall] | None = None
        self._tape: RequestTape | WrittenTape | None = None
        #: the application saw part of the answer (headers or a message): no retry after that
        self._committed = False
        self._max_age: MaxAge | None = None
        self._ok: tuple[grpc.StatusCode, str, Any] | None = None
        #: a filter ended the stream on purpose (a message limit): the status the caller gets
        self._stopped: CallError | None = None
        #: set when the chain ended with an error: what the application gets
        self._error: CallError | None = None
        self._cancelled = False
        #: while a new attempt is sent what was written so far, the application's writes wait
        self._replayed: asyncio.Future[None] | None = None
        self._known = False  # the method is one the service's endpoints reported (reflection)
        self._task = loop.create_task(self._run(timeout, metadata))
        # However the chain ends — even cancelled before it ran — whoever waits for an attempt wakes.
        self._task.add_done_callback(lambda _t: self._moved.set())

    # -- the chain ------------------------------------------------------------------------

    async def _run(self, timeout: float | None, metadata: Any) -> None:
        try:
            mesh = self._multi._mesh
            if mesh.outbound is None:
                await mesh.ready_outbound()
            compiled = compiled_of(mesh)
            self._known = self._multi._method in compiled.methods
            if timeout is None:
                timeout = compiled.timeout
            assert mesh.pool is not None
            call = self._call = Call(
                self._multi._method,
                tuple(metadata) if metadata else (),
                None if timeout is None else time.monotonic() + timeout,
                mesh.service,
                forward_streaming,
                self,
                kind=_KINDS[self._multi._kind],
                caller=mesh.caller,
                down=mesh.pool.down,
                replayable=True,  # under a retry policy, what is sent is kept (1 MiB)
                wait_for_ready=bool(self._extra[1]),
            )
            if compiled.max_stream_age is not None:
                self._max_age = MaxAge(compiled.max_stream_age, self._expire)
            await compiled.chain.handler(call)
        except CallError as exc:
            self._error = exc
        except asyncio.CancelledError:
            self._cancelled = True
            if self._attempt is not None:
                self._attempt.cancel()
            raise
        except Exception as exc:
            log.exception("streaming call %s failed in gmesh", self._multi._method)
            code, details = grpc_status(exc)
            self._error = CallError(code, details)
        finally:
            if self._max_age is not None:
                self._max_age.cancel()
            if self._tape is not None:
                self._tape.release()
            self._moved.set()

    def _expire(self) -> None:
        if self._attempt is not None:
            self._attempt.cancel()

    def _stop(self, error: CallError) -> None:
        """End the stream with `error` (as the max age ends it: the attempt is cancelled)."""
        if self._stopped is None:
            self._stopped = error
        self._expire()

    def _publish(self, upstream: Any, watch: StatusWatch) -> None:
        """This attempt is the one the application talks to now."""
        self._attempt = upstream
        self._watch = watch
        if self._stopped is not None:  # stopped while this attempt was being made
            upstream.cancel()
        self._moved.set()

    def _commit(self) -> None:
        """The application saw part of the answer: the call can no longer be retried."""
        self._committed = True
        call = self._call
        if call is not None:
            call.committed = True
        if self._tape is not None:
            self._tape.release()

    async def _first(self) -> Any:
        """The first attempt's call (waits for the chain to make it)."""
        while self._attempt is None:
            if self._task.done():
                raise self._final_error()
            self._moved.clear()
            await self._moved.wait()
        return self._attempt

    async def _after(self, failed: Any) -> Any | None:
        """After the attempt `failed` ended: the next attempt's call, or None when the chain
        ended without one (the call's final status is then known)."""
        while True:
            if self._attempt is not failed:
                return self._attempt
            if self._task.done():
                return None
            self._moved.clear()
            await self._moved.wait()

    def _retrying(self) -> bool:
        call = self._call
        return call is not None and call.attempts > 0 and call.replayable and not self._committed

    def _aged(self) -> bool:
        """A cancel of the attempt came from the max-age timer or a message limit (not from our
        caller)."""
        if self._stopped is None and (self._max_age is None or not self._max_age.expired):
            return False
        task = asyncio.current_task()
        return not (task is not None and task.cancelling())

    async def _final(self) -> tuple[grpc.StatusCode, str, Any]:
        """The call's final status: the chain's outcome."""
        if not self._task.done():
            try:
                await asyncio.shield(self._task)
            except asyncio.CancelledError:
                if not self._task.done():
                    raise  # our caller is being cancelled, not the call
        if self._error is not None:
            return self._error.status, self._error.details, self._error.trailing_metadata
        if self._ok is not None:
            return self._ok
        return _CANCELLED

    def _final_error(self) -> BaseException:
        """The call's end as the exception the application gets (the chain has ended)."""
        if self._error is not None:
            error: BaseException = rpc_error(self._error)
            return error
        if self._cancelled or self._task.cancelled():
            return asyncio.CancelledError()
        return asyncio.InvalidStateError("RPC already finished.")

    async def _ended_with_error(self, failed: Any) -> BaseException | None:
        """An operation on attempt `failed` failed: None when a new attempt took over (go on
        there), else the call's final error."""
        following = await self._after(failed)
        if following is not None:
            return None
        await self._final()
        return self._final_error()

    # -- reading ---------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is grpc.aio.EOF:
                return
            yield message

    async def read(self) -> Any:
        upstream = self._attempt or await self._first()
        while True:
            try:
                message = await upstream.read()
            except asyncio.CancelledError:
                if not self._aged():
                    raise
                await self._final()
                raise self._final_error() from None
            except grpc.aio.AioRpcError:
                error = await self._ended_with_error(upstream)
                if error is not None:
                    raise error from None
                upstream = self._attempt
                continue
            if message is grpc.aio.EOF:
                await self._final()
                if self._error is not None:  # ended OK upstream, failed in the chain (rare)
                    raise self._final_error()
                return message
            if not self._committed:
                self._commit()
            _received(self._call)
            return message

    async def initial_metadata(self) -> grpc.aio.Metadata:
        try:
            upstream = self._attempt or await self._first()
        except grpc.aio.AioRpcError as exc:
            return exc.initial_metadata()
        except (asyncio.CancelledError, asyncio.InvalidStateError):
            if not self._task.done():
                raise
            return grpc.aio.Metadata()
        while True:
            metadata = await upstream.initial_metadata()
            if metadata:
                self._commit()  # headers reached the application: no retry
                return metadata
            if not upstream.done() and self._retrying():
                # Empty headers under a retry policy: a refusal (trailers only) looks the same
                # until its status lands a moment later (as in the proxy's relay).
                ended = asyncio.ensure_future(upstream.code())
                await asyncio.wait((ended,), timeout=HEADER_GRACE)
                ended.cancel()
            if not (upstream.done() and await upstream.code() != _OK):
                return metadata
            following = await self._after(upstream)  # a refusal: the next attempt's headers
            if following is None:
                return metadata
            upstream = following

    # -- writing ---------------------------------------------------------------------------

    async def _replay_done(self) -> None:
        replayed = self._replayed
        if replayed is not None and not replayed.done():
            await asyncio.shield(replayed)

    async def write(self, request: Any) -> None:
        await self._replay_done()  # first what was written before, on a new attempt
        upstream = self._attempt or await self._first()
        if self._call is not None and not _sent(self._call):
            await self._final()  # a message limit ended the stream: its status
            raise self._final_error() from None
        tape = self._tape
        if isinstance(tape, WrittenTape) and not self._committed:
            tape.record(request)  # a retry sends it again
        watch = self._watch if self._watch is not None and self._watch.call is upstream else None
        if watch is not None:
            watch.writing += 1
        try:
            await upstream.write(request)
        except asyncio.CancelledError:
            if not self._aged():
                raise
            await self._final()
            raise self._final_error() from None
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            if watch is not None:
                watch.write_failed = True
                watch.writing -= 1
                watch = None
            error = await self._ended_with_error(upstream)
            if error is not None:
                raise error from None
            # the next attempt got everything written so far, this message included
        finally:
            if watch is not None:
                watch.writing -= 1

    async def done_writing(self) -> None:
        await self._replay_done()
        if isinstance(self._tape, WrittenTape):
            self._tape.half_closed = True
        upstream = self._attempt or await self._first()
        watch = self._watch if self._watch is not None and self._watch.call is upstream else None
        if watch is not None:
            watch.writing += 1  # a half-close can race the upstream's end too
        try:
            await upstream.done_writing()
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            if watch is not None:
                watch.write_failed = True
            error = await self._ended_with_error(upstream)
            if error is not None:
                raise error from None
        finally:
            if watch is not None:
                watch.writing -= 1

    # -- stream-unary ----------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Any]:
        return (yield from self._response().__await__())

    async def _response(self) -> Any:
        upstream = self._attempt or await self._first()
        try:
            response = await upstream
        except asyncio.CancelledError:
            if not self._aged():
                raise
            await self._final()
            raise self._final_error() from None
        except grpc.aio.AioRpcError:
            await self._final()
            raise self._final_error() from None
        self._commit()
        _received(self._call)
        return response

    # -- status ----------------------------------------------------------------------------

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        trailing = (await self._final())[2]
        return trailing if isinstance(trailing, grpc.aio.Metadata) else grpc.aio.Metadata(*trailing)

    async def code(self) -> grpc.StatusCode:
        return (await self._final())[0]

    async def details(self) -> str:
        return (await self._final())[1]

    async def wait_for_connection(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await (self._attempt or await self._first()).wait_for_connection()

    def cancelled(self) -> bool:
        return self._cancelled or self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        call = self._call
        return call.time_remaining() if call is not None else None

    def cancel(self) -> bool:
        """Cancel the call: the attempt in flight, and whatever the chain waits for meanwhile
        (a retry's backoff, a breaker slot, an endpoint)."""
        if self._task.done():
            return False
        self._cancelled = True
        if self._attempt is not None:
            self._attempt.cancel()
        self._task.cancel()
        return True

    def add_done_callback(self, callback: Any) -> None:
        self._task.add_done_callback(lambda _t: callback(self))
