"""Relaying one proxied call, as raw bytes, between the caller (a grpc.aio server context) and
an upstream endpoint (a pooled grpc.aio channel).

Two forwarders, chosen per method when the proxy resolves it:

- `forward_unary`: methods the destination's endpoints report as unary (reflection). One
  awaited upstream call; the cheapest path.
- `forward_stream`: everything else, all four RPC kinds through one stream-stream relay.

What the stream relay is designed for (each has a test in tests/integration):

* Upstream status relayed exactly. grpc.aio's client replaces a call's status with
  INTERNAL ("Internal error from Core") when one of *our* writes races the upstream
  ending the call — e.g. UNIMPLEMENTED arriving while the caller is still streaming
  requests. The real status arrives a moment later; `StatusWatch` waits for it.
* Cancellation both ways. A caller's cancel ends the server's request iterator quietly
  and cancels the handler only at its next await; a handler blocked writing to a slow
  reader may never get there. So the current attempt's upstream call is cancelled from
  the server context's done callback (registered once per call), and again in `finally`.
* Flow control. One message in flight each way: `write` awaits the transport, so a slow
  side slows the other instead of filling memory.
* Retries replay what was sent (`RequestTape`, freed when the call commits), the stream's
  max age counts from the call's start (not each attempt's), and a failure reading the
  caller's requests ends the call with its own status instead of being lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, mirror_metadata, mirror_timeout
from gmesh.chain.metadata import Metadata
from gmesh.chain.replay import RequestTape
from gmesh.errors import CallError, UpstreamError, grpc_status
from gmesh.outbound.upstream import MaxAge, StatusWatch

if TYPE_CHECKING:
    from gmesh.discovery.endpoint import Endpoint
    from gmesh.outbound.pool import EndpointPool

#: Metadata that belongs to one HTTP/2 hop (or that grpc sets itself, or that is addressed to
#: the proxy), never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-type",
        "content-length",
        "user-agent",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-internal-encoding-request",
        "x-gmesh-service",
        "x-gmesh-wait-for-ready",
    }
)


def forwardable(metadata: Any) -> Metadata:
    """Request or response metadata minus hop-by-hop keys, as a tuple of pairs."""
    return tuple((k, v) for k, v in metadata if k not in HOP_BY_HOP)


class ProxyUnary:
    """The caller's side of a proxied unary call: its server context and request bytes."""

    __slots__ = ("context", "known", "pool", "request")

    def __init__(
        self, context: grpc.aio.ServicerContext, request: bytes, pool: EndpointPool, known: bool
    ) -> None:
        self.context = context
        self.request = request
        self.pool = pool
        #: the method is one the destination's endpoints reported (reflection)
        self.known = known

    def request_bytes(self) -> bytes:
        """The request as relayed (for taps with bodies)."""
        return self.request

    def response_bytes(self, response: bytes) -> bytes:
        return response


async def forward_unary(call: Call[ProxyUnary]) -> bytes:
    """Unary fast path: the request is already read; one upstream call; relay headers, trailers."""
    down = call.downstream
    context = down.context
    assert call.endpoint is not None
    upstream = down.pool.get(call.endpoint).unary_unary(call.method, known=down.known)(
        down.request, metadata=call.metadata, timeout=call.upstream_timeout()
    )
    try:
        response: bytes = await upstream
    except grpc.aio.AioRpcError as exc:
        initial = forwardable(exc.initial_metadata() or ())
        if initial:
            # The upstream answered with headers: the call is committed (no retry).
            call.committed = True
            await context.send_initial_metadata(initial)
        raise UpstreamError(
            exc.code(),
            exc.details() or "",
            forwardable(exc.trailing_metadata() or ()),
            initial_metadata=initial,
        ) from None
    except asyncio.CancelledError:
        upstream.cancel()
        raise
    call.committed = True
    call.received_bytes = len(response)
    initial = forwardable(await upstream.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)
    context.set_trailing_metadata(forwardable(await upstream.trailing_metadata()))
    return response


async def mirror_unary(call: Call[ProxyUnary], endpoint: Endpoint) -> None:
    """Send a copy of a unary call to `endpoint` and drop the answer (route mirroring)."""
    down = call.downstream
    await down.pool.get(endpoint).unary_unary(call.method, known=down.known)(
        down.request, metadata=mirror_metadata(call.metadata), timeout=mirror_timeout(call)
    )


class ProxyStream:
    """The caller's side of a proxied stream, across its attempts: the server context, the
    request stream (kept on a tape under a retry policy), the attempt in flight, the max age.

    Its `end` runs once, when the caller's call ends (the context's done callback): it
    cancels the attempt in flight, the max-age timer, and frees the tape."""

    __slots__ = ("context", "known", "max_age", "pool", "pump_error", "requests", "tape", "upstream")

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        requests: AsyncIterator[bytes],
        pool: EndpointPool,
        known: bool,
        max_age: float | None,
    ) -> None:
        self.context = context
        self.requests = requests
        self.pool = pool
        self.known = known
        self.tape: RequestTape | None = None
        self.upstream: Any = None
        self.pump_error: BaseException | None = None
        self.max_age = MaxAge(max_age, self._expire) if max_age is not None else None
        context.add_done_callback(self.end)

    def _expire(self) -> None:
        if self.upstream is not None:
            self.upstream.cancel()

    def end(self, _context: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.cancel()
        if self.max_age is not None:
            self.max_age.cancel()
        if self.tape is not None:
            self.tape.close()
        # The server context keeps this callback (and so this object) until a garbage
        # collection breaks their cycle; an upstream call held meanwhile would keep its
        # endpoint connection open after the pool closed it.
        self.upstream = None
        self.tape = None


#: How long a retryable stream with empty headers waits for its first message (or its end)
#: before sending the headers on, which commits it (no retry after that).
HEADER_GRACE = 0.005


async def forward_stream(call: Call[ProxyStream]) -> None:
    """Any RPC kind: pump requests up, relay headers, messages, trailers and status back."""
    stream = call.downstream
    context = stream.context
    assert call.endpoint is not None
    if call.attempts and call.replayable and stream.tape is None:
        # Under a retry policy: keep what is sent, so a retry can send it again.
        stream.tape = RequestTape(stream.requests, call)
    source: AsyncIterator[bytes] = stream.tape.messages() if stream.tape is not None else stream.requests
    upstream = stream.pool.get(call.endpoint).stream_stream(call.method, known=stream.known)(
        metadata=call.metadata, timeout=call.upstream_timeout()
    )
    stream.upstream = upstream
    status = StatusWatch(upstream)
    pump = asyncio.get_running_loop().create_task(_pump(source, upstream, status, stream, call))
    first: asyncio.Future[Any] | None = None
    aged = stream.max_age
    initial: Metadata = ()
    try:
        initial = forwardable(await upstream.initial_metadata())
        if not initial and call.attempts and not upstream.done():
            # Retryable, and the headers are empty: a trailers-only answer (a refusal: retry)
            # looks the same until its status lands a moment later. Wait for the first
            # message or the end, briefly, before committing by sending headers.
            first = asyncio.ensure_future(upstream.read())
            await asyncio.wait((first,), timeout=HEADER_GRACE)
            if first.done() and (first.exception() is not None or first.result() is grpc.aio.EOF):
                await upstream.code()  # ended: let the status land (done() is then true)
        if not (upstream.done() and await upstream.code() != grpc.StatusCode.OK):
            # Headers first, before any message; an upstream that fails without a message
            # answers trailers-only, and so do we (headers go with the status below).
            await context.send_initial_metadata(initial)
            _commit(call, stream)
        while True:
            try:
                if first is not None:
                    message, first = await first, None
                else:
                    message = await upstream.read()
            except grpc.aio.AioRpcError:
                break
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError from a read of a call cancelled locally: here,
                # by the max-age timer or a failed request pump (a cancel of this task itself
                # propagates as usual).
                task = asyncio.current_task()
                if ((aged is not None and aged.expired) or stream.pump_error is not None) and not (
                    task is not None and task.cancelling()
                ):
                    break
                raise
            if message is grpc.aio.EOF:
                break
            call.received += 1
            call.received_bytes += len(message)
            meter = call.meter
            if meter is not None:
                meter.received += 1
            await context.write(message)
        code, details, trailing = await status.final()
    finally:
        pump.cancel()
        if first is not None:
            first.cancel()
        if not upstream.done():
            upstream.cancel()
        if stream.upstream is upstream:
            stream.upstream = None  # see ProxyStream.end
    if aged is not None and aged.expired:
        call.committed = True  # ended on purpose: never retried
        raise aged.error()
    if stream.pump_error is not None:
        call.committed = True
        if isinstance(stream.pump_error, CallError):  # a filter ended the stream (a message limit)
            raise stream.pump_error
        code, details = grpc_status(stream.pump_error)
        raise CallError(code, f"gmesh: reading the caller's requests failed: {details}")
    if code != grpc.StatusCode.OK:
        if not call.committed and initial:
            # The upstream sent headers: send them on (no retry), then its status.
            await context.send_initial_metadata(initial)
            _commit(call, stream)
        raise UpstreamError(code, details, forwardable(trailing), initial_metadata=initial)
    context.set_trailing_metadata(forwardable(trailing))


def _commit(call: Call[ProxyStream], stream: ProxyStream) -> None:
    call.committed = True
    if stream.tape is not None:
        stream.tape.release()  # never replayed now: free what it keeps


async def _pump(
    source: AsyncIterator[bytes], upstream: Any, status: StatusWatch, stream: ProxyStream, call: Call[Any]
) -> None:
    sent = 0
    try:
        async for message in source:
            sent += 1
            if sent > call.sent:  # a retry's replay is not counted again
                call.sent = sent
                call.sent_bytes += len(message)
                meter = call.meter
                if meter is not None:
                    meter.sent += 1
                hook = call.on_message
                if hook is not None:
                    hook()  # may raise CallError: the stream ends with it
            status.writing += 1
            try:
                await upstream.write(message)
            finally:
                status.writing -= 1
        status.writing += 1  # a half-close can race the upstream's end too
        try:
            await upstream.done_writing()
        finally:
            status.writing -= 1
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        # The upstream ended the call (or was cancelled) while we still had requests:
        # stop sending; its status, not our failed write, is what the caller gets.
        status.write_failed = True
    except Exception as exc:
        # Reading the caller's requests failed: end this attempt; the relay reports it.
        stream.pump_error = exc
        upstream.cancel()
