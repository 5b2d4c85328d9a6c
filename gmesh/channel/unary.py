"""Unary calls on a `MeshChannel`: the chain runs in the awaiting task (no extra task: the
cheapest path), its forwarder makes one call on the picked endpoint's pooled channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, mirror_metadata, mirror_timeout
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import CallError, UpstreamError

if TYPE_CHECKING:
    from gmesh.channel.channel import MeshChannel
    from gmesh.discovery.endpoint import Endpoint
    from gmesh.outbound.stack import CompiledService

_UNSET: Any = object()


def rpc_error(exc: CallError) -> grpc.aio.AioRpcError:
    """What the application sees for a call the chain ended: the endpoint's own error when an
    endpoint answered, else a grpc.aio error carrying the mesh's status."""
    if isinstance(exc, UpstreamError) and isinstance(exc.rpc_error, grpc.aio.AioRpcError):
        return exc.rpc_error
    initial = exc.initial_metadata if isinstance(exc, UpstreamError) else ()
    return grpc.aio.AioRpcError(
        exc.status,
        grpc.aio.Metadata(*initial),
        grpc.aio.Metadata(*exc.trailing_metadata),
        exc.details,
    )


def no_service(service: str) -> CallError:
    return CallError(grpc.StatusCode.UNAVAILABLE, f"gmesh: no mesh service {service!r}")


def compiled_of(mesh: MeshChannel) -> CompiledService:
    outbound = mesh.outbound
    assert outbound is not None
    found = outbound.services.get(mesh.service) or outbound.compiled(mesh.service)
    if found is None:
        raise no_service(mesh.service)
    return found


class UnaryMultiCallable:
    __slots__ = ("_deser", "_mesh", "_method", "_ser")

    def __init__(self, mesh: MeshChannel, method: str, ser: Any, deser: Any) -> None:
        self._mesh, self._method, self._ser, self._deser = mesh, method, ser, deser

    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None,
        credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
    ) -> UnaryUnaryCall:  # fmt: skip
        return UnaryUnaryCall(self, request, timeout, metadata, (credentials, wait_for_ready, compression))


async def forward_unary(call: Call[UnaryUnaryCall]) -> Any:
    """The channel's unary forwarder: one call on the picked endpoint's pooled channel."""
    meshcall = call.downstream
    multi = meshcall._multi
    mesh = multi._mesh
    assert call.endpoint is not None and mesh.pool is not None
    mc = mesh.pool.get(call.endpoint).unary_unary(
        call.method, multi._ser, multi._deser, known=meshcall._known
    )
    credentials, wait_for_ready, compression = meshcall._extra
    upstream = mc(
        meshcall._request,
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
        initial = exc.initial_metadata()
        if initial:
            call.committed = True  # the upstream answered with headers: no retry
        raise UpstreamError(
            exc.code(),
            exc.details() or "",
            tuple(exc.trailing_metadata() or ()),
            initial_metadata=tuple(initial or ()),
            rpc_error=exc,
        ) from None
    call.committed = True
    return result


async def mirror_unary(call: Call[UnaryUnaryCall], endpoint: Endpoint) -> None:
    """Send a copy of the call to `endpoint` and drop the answer (route mirroring)."""
    meshcall = call.downstream
    multi = meshcall._multi
    assert multi._mesh.pool is not None
    mc = multi._mesh.pool.get(endpoint).unary_unary(
        call.method, multi._ser, multi._deser, known=meshcall._known
    )
    await mc(meshcall._request, timeout=mirror_timeout(call), metadata=mirror_metadata(call.metadata))


def _serialized(message: Any) -> bytes | None:
    if isinstance(message, bytes):
        return message
    serialize = getattr(message, "SerializeToString", None)
    return serialize() if serialize is not None else None


class UnaryUnaryCall(grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    """A unary call on a MeshChannel. Awaited at once, it runs in the awaiting task (no extra
    task: the cheapest path); otherwise in a task of its own. Status accessors wait for it.
    `cancel()` ends it wherever it is: in the upstream call, a retry's backoff, a breaker's
    queue."""

    def __init__(
        self, multi: UnaryMultiCallable, request: Any, timeout: float | None, metadata: Any, extra: Any
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
        self._runner: asyncio.Task[Any] | None = None
        self._interrupted = False
        self._known = False
        self._task: asyncio.Task[Any] | None = None
        self._deadline: float | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        self._callbacks: list[Any] = []
        # Like grpc.aio, the call starts without being awaited: if the caller does not
        # await it right away (the usual `await stub.M(req)` runs it inline, in the
        # caller's task), it starts in a task of its own on the next loop turn.
        loop.call_soon(self._ensure_started)

    async def _run(self) -> Any:
        self._started = True
        self._runner = asyncio.current_task()
        try:
            mesh = self._multi._mesh
            if mesh.outbound is None:
                await mesh.ready_outbound()
            compiled = compiled_of(mesh)
            # grpc-core keeps a registered method for the channel's lifetime: only reflected ones
            self._known = self._multi._method in compiled.methods
            timeout = self._timeout if self._timeout is not None else compiled.timeout
            if timeout is not None:
                self._deadline = time.monotonic() + timeout
            assert mesh.pool is not None
            call = Call(
                self._multi._method,
                tuple(self._metadata) if self._metadata else (),
                self._deadline,
                mesh.service,
                forward_unary,
                self,
                kind=MethodKind.UNARY,
                caller=mesh.caller,
                down=mesh.pool.down,
                replayable=True,  # the request is in hand
                mirror=mirror_unary,
                wait_for_ready=bool(self._extra[1]),
            )
            self._result = await compiled.chain.handler(call)
            return self._result
        except CallError as exc:
            self._error = rpc_error(exc)
            raise self._error from None
        except grpc.aio.AioRpcError as exc:
            self._error = exc
            raise
        except asyncio.CancelledError:
            self._cancelled = True
            if self._upstream is not None:
                self._upstream.cancel()
            if self._interrupted:
                # cancel() interrupted a wait of the chain by cancelling this task: undo that
                # count, so a caller running the call inline sees what grpc.aio gives (a
                # CancelledError from the call, its own task not marked cancelled).
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    task.uncancel()
            raise
        finally:
            self._runner = None
            self._finish()

    def request_bytes(self) -> bytes | None:
        """The request serialized as sent (for taps with bodies; costs a serialization)."""
        ser = self._multi._ser
        return ser(self._request) if ser is not None else _serialized(self._request)

    def response_bytes(self, response: Any) -> bytes | None:
        return _serialized(response)

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
        if self._cancelled and self._error is None and self._result is _UNSET:
            raise asyncio.CancelledError()
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
        if self._cancelled and error is None and self._result is _UNSET:
            return "Locally cancelled by application!"
        return (error.details() or "") if error is not None else ""

    async def wait_for_connection(self) -> None:
        self._ensure_started()
        await asyncio.shield(self._done)

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done.done()

    def time_remaining(self) -> float | None:
        if self._deadline is not None:
            return max(self._deadline - time.monotonic(), 0.0)
        return self._timeout

    def cancel(self) -> bool:
        """Cancel the call: its upstream call if one is in flight, and whatever the chain waits
        for meanwhile (a retry's backoff, a breaker slot, an endpoint)."""
        if self.done():
            return False
        self._cancelled = True
        upstream = self._upstream
        if upstream is not None and not upstream.done():
            upstream.cancel()  # the attempt in flight ends; the chain sees its end
            return True
        runner = self._runner or self._task
        if runner is not None and not runner.done():
            # Between attempts (backoff), waiting for a breaker slot or an endpoint: only
            # cancelling the task running the chain interrupts that wait.
            self._interrupted = True
            runner.cancel()
        return True

    def add_done_callback(self, callback: Any) -> None:
        if self.done():
            callback(self)
        else:
            self._callbacks.append(callback)
