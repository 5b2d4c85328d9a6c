"""`gmesh.aio.channel("gmesh:///orders")`: a `grpc.aio.Channel` that runs the mesh chain in-process.

grpcio has no public resolver API (grpc/grpc#11685), so the `gmesh:///` scheme is a Channel
implementation: generated stubs use it as they are (they pass `_registered_method`), and
every call goes through the same compiled chain the proxy runs, picks an endpoint, and is
made on that endpoint's pooled grpc.aio channel. No proxy hop.

Channels of one process and event loop share one catalog (one etcd watch) per etcd and
mesh prefix; each channel has its own endpoint pool (its options, credentials,
interceptors). Unary calls run in the caller's task when awaited directly (no extra task:
the cheapest path); streaming calls run the chain in a task next to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, Caller, mirror_metadata, mirror_timeout
from gmesh.chain.replay import REPLAY_LIMIT, RequestTape, as_async
from gmesh.channel import runtime
from gmesh.channel.endpoint import EndpointPool
from gmesh.channel.outbound import Outbound
from gmesh.channel.status import StatusWatch
from gmesh.config.types import format_duration
from gmesh.discovery.endpoint import MethodKind, check_service_name
from gmesh.discovery.keys import DEFAULT_PREFIX, MeshKeys
from gmesh.errors import CallError, InvalidArgument
from gmesh.store.connect import resolve_etcd
from gmesh.store.etcd import EtcdConfig

SCHEME = "gmesh:///"
_UNSET: Any = object()


def parse_target(target: str) -> str:
    """`gmesh:///orders` -> `orders`."""
    if not target.startswith(SCHEME):
        raise InvalidArgument(f"target {target!r}: expected gmesh:///SERVICE, e.g. gmesh:///orders")
    return check_service_name(target[len(SCHEME) :].strip("/"))


# --------------------------------------------------------------------------- the channel


class MeshChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A `grpc.aio.Channel` to one mesh service. Create with `gmesh.aio.channel(...)`."""

    def __init__(
        self,
        service: str,
        *,
        etcd: str | EtcdConfig | None = None,
        prefix: str | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        interceptors: Sequence[Any] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        caller_labels: Mapping[str, str] | None = None,
        zone: str | None = None,
    ) -> None:
        self.service = service
        #: this process as route rules and zone-aware balancers see the caller
        zone = os.environ.get("GMESH_ZONE", "") if zone is None else zone
        self.caller = Caller(labels=dict(caller_labels or {}), zone=zone)
        self._etcd = etcd
        self._keys = MeshKeys(prefix or os.environ.get("GMESH_PREFIX") or DEFAULT_PREFIX)
        self._pool = EndpointPool(extra_options=options, interceptors=interceptors, credentials=credentials)
        self._outbound: Outbound | None = None
        self._shared: runtime.Shared | None = None
        self._starting: asyncio.Task[Outbound] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def _start(self) -> Outbound:
        config = self._etcd if isinstance(self._etcd, EtcdConfig) else await resolve_etcd(self._etcd)
        self._shared, self._outbound = await runtime.acquire(config, self._keys, self._pool, self.service)
        return self._outbound

    def _outbound_or_start(self) -> Outbound | asyncio.Task[Outbound]:
        if self._outbound is not None:
            return self._outbound
        if self._closed:
            raise grpc.aio.UsageError("Channel is closed.")
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        return self._starting

    async def outbound(self) -> Outbound:
        """The started outbound stack (starts it: connects to etcd, loads the snapshot)."""
        found = self._outbound_or_start()
        return found if isinstance(found, Outbound) else await asyncio.shield(found)

    async def close(self, grace: float | None = None) -> None:
        """Close every endpoint channel (calls in flight get `grace` seconds) and release the catalog."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._starting
        if self._outbound is not None:
            await self._outbound.close(grace)
        else:
            await self._pool.close(grace)
        if self._shared is not None:
            await runtime.release(self._shared)
            self._shared = None

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY when any endpoint channel is READY; else the most hopeful state among them."""
        if self._outbound is None:
            if try_to_connect and not self._closed:
                self._outbound_or_start()
            return grpc.ChannelConnectivity.IDLE
        states = [c.channel.get_state(try_to_connect) for c in self._pool.conns()]
        for state in (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.CONNECTING,
            grpc.ChannelConnectivity.IDLE,
        ):
            if state in states:
                return state
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE if states else grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.outbound()
        while self.get_state() == last_observed_state:
            conns = self._pool.conns()
            waits = [
                asyncio.ensure_future(c.channel.wait_for_state_change(c.channel.get_state())) for c in conns
            ]
            changed = asyncio.ensure_future(self._outbound_changed())
            _, pending = await asyncio.wait([*waits, changed], return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()

    async def _outbound_changed(self) -> None:
        assert self._outbound is not None
        catalog = self._outbound.catalog
        revision = catalog.snapshot.revision
        with contextlib.suppress(TimeoutError):
            await catalog.wait_for(lambda s: s.revision != revision, timeout=3600)

    async def channel_ready(self) -> None:
        state = self.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            await self.wait_for_state_change(state)
            state = self.get_state(try_to_connect=True)

    # -- multicallables ----------------------------------------------------------------

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _UnaryUnary:  # fmt: skip
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _Streaming:  # fmt: skip
        return _Streaming(self, method, request_serializer, response_deserializer, "us")

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _Streaming:  # fmt: skip
        return _Streaming(self, method, request_serializer, response_deserializer, "su")

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _Streaming:  # fmt: skip
        return _Streaming(self, method, request_serializer, response_deserializer, "ss")


def channel(
    target: str,
    *,
    etcd: str | EtcdConfig | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[Any] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    prefix: str | None = None,
    caller_labels: Mapping[str, str] | None = None,
    zone: str | None = None,
) -> MeshChannel:
    """A `grpc.aio.Channel` to the mesh service in `target` (`gmesh:///orders`).

    `etcd`: URLs (default `GMESH_ETCD`, else the embedded etcd); `options`, `interceptors`,
    `credentials`: as for `grpc.aio.secure_channel`, applied to every endpoint channel;
    `prefix`: the mesh's key prefix (default `GMESH_PREFIX` or `/gmesh/v1/`);
    `caller_labels`: labels of this workload, which Route rules match with
    `match.caller.labels`; `zone`: where this process runs (default `GMESH_ZONE`), for
    zone-aware balancing. The channel connects on first use; `await channel.close()`
    releases everything.
    """
    return MeshChannel(
        parse_target(target),
        etcd=etcd,
        prefix=prefix,
        options=options,
        interceptors=interceptors,
        credentials=credentials,
        caller_labels=caller_labels,
        zone=zone,
    )


# --------------------------------------------------------------------------- calls


def _to_rpc_error(exc: CallError) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        exc.status,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*exc.trailing_metadata),
        exc.details,
    )


def _make_call(
    mesh: MeshChannel, outbound: Outbound, method: str, timeout: float | None, metadata: Any, forward: Any,
    downstream: Any, unary: bool = False,
) -> tuple[Call, Any]:  # fmt: skip
    service = mesh.service
    chain = outbound.state.chain(service)
    if chain is None:
        raise CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: no mesh service {service!r}")
    if timeout is None:
        timeout = outbound.state.defaults.get(service, _NO_DEFAULTS)[0]
    call = Call(
        method,
        tuple(metadata) if metadata else (),
        None if timeout is None else time.monotonic() + timeout,
        service,
        forward,
        kind=MethodKind.UNARY if unary else None,
        downstream=downstream,
        caller=mesh.caller,
        down=mesh._pool.down,
        replayable=True,  # unary: the request is in hand; streams: kept for replay (1 MiB)
        mirror=_mirror_unary if unary else None,
    )
    return call, chain.handler


class _UnaryUnary:
    __slots__ = ("_deser", "_mesh", "_method", "_ser")

    def __init__(self, mesh: MeshChannel, method: str, ser: Any, deser: Any) -> None:
        self._mesh, self._method, self._ser, self._deser = mesh, method, ser, deser

    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None,
        credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
    ) -> UnaryUnaryCall:  # fmt: skip
        return UnaryUnaryCall(self, request, timeout, metadata, (credentials, wait_for_ready, compression))


async def _forward_unary(call: Call) -> Any:
    meshcall, request = call.downstream
    assert call.endpoint is not None
    mc = meshcall._multi._mesh._pool.get(call.endpoint.address).unary_unary(
        call.method, meshcall._multi._ser, meshcall._multi._deser
    )
    credentials, wait_for_ready, compression = meshcall._extra
    upstream = mc(
        request,
        timeout=call.upstream_timeout(),
        metadata=call.metadata or None,
        credentials=credentials,
        wait_for_ready=wait_for_ready,
        compression=compression,
    )
    meshcall._upstream = upstream
    if meshcall._cancelled:
        upstream.cancel()
    try:
        result = await upstream
    except grpc.aio.AioRpcError as exc:
        if exc.initial_metadata():
            call.committed = True  # the upstream answered with headers: no retry
        raise
    call.committed = True
    return result


async def _mirror_unary(call: Call, address: str) -> None:
    meshcall, request = call.downstream
    multi = meshcall._multi
    mc = multi._mesh._pool.get(address).unary_unary(call.method, multi._ser, multi._deser)
    await mc(request, timeout=mirror_timeout(call), metadata=mirror_metadata(call.metadata))


class UnaryUnaryCall(grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    """A unary call on a MeshChannel. Awaited at once, it runs in the awaiting task (no extra
    task: the cheapest path); otherwise in a task of its own. Status accessors wait for it."""

    def __init__(
        self, multi: _UnaryUnary, request: Any, timeout: float | None, metadata: Any, extra: Any
    ) -> None:
        self._multi, self._request, self._timeout, self._metadata, self._extra = (
            multi,
            request,
            timeout,
            metadata,
            extra,
        )
        self._upstream: Any = None
        self._error: grpc.aio.AioRpcError | None = None
        self._result: Any = _UNSET
        self._cancelled = False
        self._started = False
        self._task: asyncio.Task[Any] | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        self._callbacks: list[Any] = []
        # Like grpc.aio, the call starts without being awaited: if the caller does not
        # await it right away (the usual `await stub.M(req)` runs it inline, in the
        # caller's task), it starts in a task of its own on the next loop turn.
        loop.call_soon(self._ensure_started)

    async def _run(self) -> Any:
        self._started = True
        try:
            found = self._multi._mesh._outbound_or_start()
            outbound = found if isinstance(found, Outbound) else await asyncio.shield(found)
            multi = self._multi
            call, handler = _make_call(
                multi._mesh, outbound, multi._method, self._timeout, self._metadata, _forward_unary,
                (self, self._request), True,
            )  # fmt: skip
            self._result = await handler(call)
            return self._result
        except CallError as exc:
            self._error = _to_rpc_error(exc)
            raise self._error from None
        except grpc.aio.AioRpcError as exc:
            self._error = exc
            raise
        except asyncio.CancelledError:
            self._cancelled = True
            if self._upstream is not None:
                self._upstream.cancel()
            raise
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)
            for callback in self._callbacks:
                callback(self)

    def _ensure_started(self) -> None:
        if not self._started:
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieve, never log

    def __await__(self) -> Generator[Any, None, Any]:
        if not self._started:
            return (yield from self._run().__await__())
        if self._task is not None:
            return (yield from self._task.__await__())
        yield from asyncio.shield(self._done).__await__()
        if self._error is not None:
            raise self._error
        return self._result

    async def _status(self) -> Any:
        self._ensure_started()
        await asyncio.shield(self._done)
        return self._error

    async def initial_metadata(self) -> grpc.aio.Metadata:
        error = await self._status()
        if error is not None:
            return error.initial_metadata()
        if self._upstream is None:  # cancelled before an endpoint was called
            return grpc.aio.Metadata()
        return await self._upstream.initial_metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        error = await self._status()
        if error is not None:
            return error.trailing_metadata()
        if self._upstream is None:
            return grpc.aio.Metadata()
        return await self._upstream.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        error = await self._status()
        if self._cancelled and error is None and self._result is _UNSET:
            return grpc.StatusCode.CANCELLED
        return error.code() if error is not None else grpc.StatusCode.OK

    async def details(self) -> str:
        error = await self._status()
        return (error.details() or "") if error is not None else ""

    async def wait_for_connection(self) -> None:
        self._ensure_started()
        await asyncio.shield(self._done)

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done.done()

    def time_remaining(self) -> float | None:
        return self._upstream.time_remaining() if self._upstream is not None else self._timeout

    def cancel(self) -> bool:
        if self.done():
            return False
        self._cancelled = True
        if self._upstream is not None:
            return bool(self._upstream.cancel())
        if self._task is not None:
            return self._task.cancel()
        return True

    def add_done_callback(self, callback: Any) -> None:
        if self.done():
            callback(self)
        else:
            self._callbacks.append(callback)


class _Streaming:
    __slots__ = ("_deser", "_kind", "_mesh", "_method", "_ser")

    def __init__(self, mesh: MeshChannel, method: str, ser: Any, deser: Any, kind: str) -> None:
        self._mesh, self._method, self._ser, self._deser, self._kind = mesh, method, ser, deser, kind

    def __call__(
        self, request: Any = None, *, timeout: float | None = None, metadata: Any = None,
        credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
    ) -> StreamingCall:  # fmt: skip
        return StreamingCall(self, request, timeout, metadata, (credentials, wait_for_ready, compression))


def _message_size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


async def _forward_streaming(call: Call) -> Any:
    meshcall, request = call.downstream
    multi: _Streaming = meshcall._multi
    assert call.endpoint is not None
    conn = multi._mesh._pool.get(call.endpoint.address)
    factory = {"us": conn.unary_stream, "su": conn.stream_unary, "ss": conn.stream_stream}[multi._kind]
    credentials, wait_for_ready, compression = meshcall._extra
    writes = request is None and multi._kind != "us"  # the application writes requests itself
    if multi._kind == "su":
        # Not retried: when the server refuses a client-streaming call while grpc-python is
        # still writing its requests, the status it reports is its own synthetic INTERNAL, so
        # a refusal cannot be told from a real failure (the proxy can: it relays raw streams).
        call.replayable = False
    retrying = bool(call.attempts) and call.replayable  # keep what is sent, for a replay
    if retrying:
        meshcall._call = call
        if not writes and multi._kind != "us":
            if meshcall._tape is None:
                meshcall._tape = RequestTape(as_async(request), call, _message_size)
            request = meshcall._tape.messages()
    args = () if writes else (request,)
    upstream = factory(call.method, multi._ser, multi._deser)(
        *args,
        timeout=call.upstream_timeout(),
        metadata=call.metadata or None,
        credentials=credentials,
        wait_for_ready=wait_for_ready,
        compression=compression,
    )
    watch = StatusWatch(upstream)
    if retrying and writes and call.attempts > 1:
        await _replay(meshcall, upstream)
    age = _max_stream_age(call)
    if age is not None:
        # The Service's maxStreamAge, as the proxy does it: end the upstream call, and tell the
        # application UNAVAILABLE (reconnect) instead of the cancel that ended it.
        def expire() -> None:
            meshcall._aged = grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(("x-gmesh-stream-max-age", "1")),
                f"gmesh: stream reached its maximum age ({format_duration(age)}); reconnect",
            )
            upstream.cancel()

        timer = asyncio.get_running_loop().call_later(age * (1 + random.random() / 10), expire)
        upstream.add_done_callback(lambda _c: timer.cancel())
    meshcall._publish(upstream, watch)
    # The chain (its filters' timing, retries...) spans the whole stream: wait for its end.
    code = await upstream.code()
    if retrying and code != grpc.StatusCode.OK and not meshcall._committed and meshcall._aged is None:
        # Nothing of this attempt reached the application: let the retry filter decide.
        status, details, trailing = await watch.final()
        raise CallError(status, details, tuple(trailing))
    call.committed = True
    return None


async def _replay(meshcall: StreamingCall, upstream: Any) -> None:
    """Send a new attempt what the application wrote so far (it may write more meanwhile)."""
    i = 0
    try:
        while i < len(meshcall._sent):
            await upstream.write(meshcall._sent[i])
            i += 1
        if meshcall._half_closed:
            await upstream.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        pass  # this attempt failed too: its status says so


_NO_DEFAULTS: tuple[float | None, float | None] = (None, None)


def _max_stream_age(call: Call) -> float | None:
    outbound = call.downstream[0]._multi._mesh._outbound
    return outbound.state.defaults.get(call.service, _NO_DEFAULTS)[1] if outbound is not None else None


class StreamingCall(grpc.aio.StreamStreamCall):  # type: ignore[misc]
    """A streaming call on a MeshChannel (any of unary-stream, stream-unary, stream-stream).

    The chain runs in a task; once it has picked an endpoint, reads, writes and statuses go
    to the upstream call made there. Statuses come through `StatusWatch`, so a write that
    raced the server's end does not turn its status into INTERNAL.
    """

    def __init__(
        self, multi: _Streaming, request: Any, timeout: float | None, metadata: Any, extra: Any
    ) -> None:
        self._multi, self._extra = multi, extra
        loop = asyncio.get_running_loop()
        self._upstream: asyncio.Future[Any] = loop.create_future()
        self._watch: StatusWatch | None = None
        self._error: grpc.aio.AioRpcError | None = None
        # Retries (a route's retry policy): what the application wrote, whether it saw anything
        # of the answer yet (then no retry), and a signal for each new attempt or the end.
        self._call: Call | None = None
        self._tape: RequestTape | None = None
        self._sent: list[Any] = []
        self._sent_size = 0
        self._half_closed = False
        self._committed = False
        self._moved = asyncio.Event()
        #: set when the stream reached the Service's maxStreamAge (what the application sees)
        self._aged: grpc.aio.AioRpcError | None = None
        self._task = loop.create_task(self._run(request, timeout, metadata))

    def _aged_instead(self) -> grpc.aio.AioRpcError | None:
        """The max-age status, when a cancel of the upstream came from the max-age timer."""
        if self._aged is None:
            return None
        task = asyncio.current_task()
        return None if task is not None and task.cancelling() else self._aged

    async def _run(self, request: Any, timeout: float | None, metadata: Any) -> None:
        try:
            found = self._multi._mesh._outbound_or_start()
            outbound = found if isinstance(found, Outbound) else await asyncio.shield(found)
            call, handler = _make_call(
                self._multi._mesh, outbound, self._multi._method, timeout, metadata, _forward_streaming,
                (self, request),
            )  # fmt: skip
            await handler(call)
            self._moved.set()  # readers waiting for another attempt: there is none
        except CallError as exc:
            self._fail(_to_rpc_error(exc))
        except grpc.aio.AioRpcError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            current = self._current()
            if current is not None:
                current.cancel()
            elif not self._upstream.done():
                self._upstream.cancel()
            self._moved.set()
            raise

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        self._error = error
        if not self._upstream.done():
            self._upstream.set_exception(error)
        self._moved.set()

    def _publish(self, upstream: Any, watch: StatusWatch) -> None:
        """This attempt's call is the one the application talks to now."""
        if self._upstream.done():
            self._upstream = asyncio.get_running_loop().create_future()
        self._watch = watch
        self._upstream.set_result(upstream)
        self._moved.set()

    def _retrying(self) -> bool:
        call = self._call
        return call is not None and call.replayable and not self._committed

    async def _next_after(self, failed: Any) -> Any | None:
        """After `failed` (an attempt) ended: the next attempt's call, or None when the chain
        ended without one (no retry)."""
        while not self._task.done():
            current = self._current()
            if current is not None and current is not failed:
                return current
            self._moved.clear()
            await self._moved.wait()
        current = self._current()
        return current if current is not None and current is not failed else None

    def _current(self) -> Any | None:
        future = self._upstream
        if not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    async def _up(self) -> Any:
        return await asyncio.shield(self._upstream)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        upstream = await self._up()
        if self._call is None:
            # No retry policy: grpc.aio's own iteration (at the end it waits for the real status,
            # where a bare read() may raise grpc.aio's synthetic INTERNAL after a write race).
            try:
                async for message in upstream:
                    yield message
            except asyncio.CancelledError:
                aged = self._aged_instead()
                if aged is None:
                    raise
                raise aged from None
            return
        while True:
            message = await self.read()
            if message is grpc.aio.EOF:
                return
            yield message

    async def read(self) -> Any:
        upstream = await self._up()
        while True:
            try:
                message = await upstream.read()
            except asyncio.CancelledError:
                aged = self._aged_instead()
                if aged is None:
                    raise
                raise aged from None
            except grpc.aio.AioRpcError:
                if not self._retrying():
                    raise
                following = await self._next_after(upstream)
                if following is None:
                    raise
                upstream = following
                continue
            if message is not grpc.aio.EOF:
                self._committed = True  # the application saw the answer: no retry any more
            elif self._retrying() and upstream.done() and await upstream.code() != grpc.StatusCode.OK:
                following = await self._next_after(upstream)
                if following is not None:
                    upstream = following
                    continue
            return message

    async def write(self, request: Any) -> None:
        upstream = await self._up()
        call = self._call
        if call is not None and call.replayable and not self._committed:
            self._sent.append(request)  # a retry sends it again
            self._sent_size += _message_size(request)
            if self._sent_size > REPLAY_LIMIT:
                call.replayable = False
                self._sent.clear()
        try:
            await upstream.write(request)
        except (asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.AioRpcError) as exc:
            aged = self._aged_instead()
            if aged is not None:
                raise aged from None
            if isinstance(exc, asyncio.CancelledError) or not self._retrying():
                raise
            if await self._next_after(upstream) is None:
                raise  # no retry: this attempt's failure is the call's
            # the next attempt got everything written so far, this message included

    async def done_writing(self) -> None:
        self._half_closed = True
        upstream = await self._up()
        try:
            await upstream.done_writing()
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            if not self._retrying() or await self._next_after(upstream) is None:
                raise

    def __await__(self) -> Generator[Any, None, Any]:  # stream-unary
        return (yield from self._response().__await__())

    async def _response(self) -> Any:
        # Stream-unary calls through the channel are never retried (see _forward_streaming).
        return await (await self._up())

    async def _final(self) -> tuple[grpc.StatusCode, str, Any]:
        if self._aged is not None:
            return self._aged.code(), self._aged.details() or "", self._aged.trailing_metadata()
        if self._call is not None and self._call.replayable:
            # Under a retry policy the status is the last attempt's: wait for the chain to end.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)
            if self._error is not None:
                return self._error.code(), self._error.details() or "", self._error.trailing_metadata()
        try:
            await self._up()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", exc.trailing_metadata()
        except asyncio.CancelledError:
            if not self._upstream.cancelled():
                raise  # our caller is being cancelled, not the call
            return grpc.StatusCode.CANCELLED, "Locally cancelled by application!", grpc.aio.Metadata()
        assert self._watch is not None
        code, details, trailing = await self._watch.final()
        return (
            code,
            details,
            grpc.aio.Metadata(*trailing) if not isinstance(trailing, grpc.aio.Metadata) else trailing,
        )

    async def initial_metadata(self) -> grpc.aio.Metadata:
        try:
            upstream = await self._up()
        except grpc.aio.AioRpcError as exc:
            return exc.initial_metadata()
        except asyncio.CancelledError:
            if not self._upstream.cancelled():
                raise
            return grpc.aio.Metadata()
        while True:
            metadata = await upstream.initial_metadata()
            if metadata:
                self._committed = True  # headers reached the application: no retry
                return metadata
            if not (self._retrying() and upstream.done() and await upstream.code() != grpc.StatusCode.OK):
                return metadata
            following = await self._next_after(upstream)  # a refusal: the next attempt's headers
            if following is None:
                return metadata
            upstream = following

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return (await self._final())[2]

    async def code(self) -> grpc.StatusCode:
        return (await self._final())[0]

    async def details(self) -> str:
        return (await self._final())[1]

    async def wait_for_connection(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await (await self._up()).wait_for_connection()

    def cancelled(self) -> bool:
        if self._upstream.done() and not self._upstream.cancelled() and self._upstream.exception() is None:
            return bool(self._upstream.result().cancelled())
        return self._task.cancelled()

    def done(self) -> bool:
        if self._upstream.done() and not self._upstream.cancelled() and self._upstream.exception() is None:
            return bool(self._upstream.result().done())
        return self._task.done()

    def time_remaining(self) -> float | None:
        if self._upstream.done() and not self._upstream.cancelled() and self._upstream.exception() is None:
            return self._upstream.result().time_remaining()  # type: ignore[no-any-return]
        return None

    def cancel(self) -> bool:
        if self._upstream.done() and not self._upstream.cancelled() and self._upstream.exception() is None:
            return bool(self._upstream.result().cancel())
        return self._task.cancel()

    def add_done_callback(self, callback: Any) -> None:
        self._task.add_done_callback(lambda _t: callback(self))
