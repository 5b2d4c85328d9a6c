"""Relaying one proxied call, as raw bytes, between the caller (a grpc.aio server context) and
an upstream endpoint (a pooled grpc.aio channel).

Two forwarders, chosen per method when the proxy resolves it:

- `forward_unary`: methods known to be unary (from the endpoints' reflection). One awaited
  upstream call; the cheapest path.
- `forward_stream`: everything else, all four RPC kinds through one stream-stream relay.

What the stream relay is designed for (each has a test in tests/integration):

* Upstream status relayed exactly. grpc.aio's client replaces a call's status with
  INTERNAL ("Internal error from Core") when one of *our* writes races the upstream
  ending the call — e.g. UNIMPLEMENTED arriving while the caller is still streaming
  requests. The real status arrives a moment later; `StatusWatch` waits for it.
* Cancellation both ways. A caller's cancel ends the server's request iterator quietly
  and cancels the handler only at its next await; a handler blocked writing to a slow
  reader may never get there. So the upstream call is cancelled from the server
  context's done callback, and again in `finally`.
* Flow control. One message in flight each way: `write` awaits the transport, so a slow
  side slows the other instead of filling memory.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, Metadata, mirror_metadata, mirror_timeout
from gmesh.chain.replay import RequestTape
from gmesh.channel.status import StatusWatch
from gmesh.config.types import format_duration
from gmesh.errors import CallError

#: Metadata that belongs to one HTTP/2 hop (or that grpc sets itself), never forwarded.
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
    }
)


def forwardable(metadata: Any) -> Metadata:
    """Request or response metadata minus hop-by-hop keys, as a tuple of pairs."""
    return tuple((k, v) for k, v in metadata if k not in HOP_BY_HOP)


async def forward_unary(call: Call) -> bytes:
    """Unary fast path: the request is already read; one upstream call; relay headers, trailers."""
    context, request, pool = call.downstream
    assert call.endpoint is not None
    upstream = pool.get(call.endpoint.address).unary_unary(call.method)(
        request, metadata=call.metadata, timeout=call.upstream_timeout()
    )
    try:
        response: bytes = await upstream
    except grpc.aio.AioRpcError as exc:
        initial = forwardable(exc.initial_metadata() or ())
        if initial:
            # The upstream answered with headers: the call is committed (no retry).
            call.committed = True
            await context.send_initial_metadata(initial)
        raise CallError(exc.code(), exc.details() or "", forwardable(exc.trailing_metadata() or ())) from None
    except asyncio.CancelledError:
        upstream.cancel()
        raise
    call.committed = True
    initial = forwardable(await upstream.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)
    context.set_trailing_metadata(forwardable(await upstream.trailing_metadata()))
    return response


async def mirror_unary(call: Call, address: str) -> None:
    """Send a copy of a unary call to `address` and drop the answer (route mirroring)."""
    _context, request, pool = call.downstream
    await pool.get(address).unary_unary(call.method)(
        request, metadata=mirror_metadata(call.metadata), timeout=mirror_timeout(call)
    )


#: How long a retryable stream with empty headers waits for its first message (or its end)
#: before sending the headers on, which commits it (no retry after that).
HEADER_GRACE = 0.005


async def forward_stream(call: Call) -> None:
    """Any RPC kind: pump requests up, relay headers, messages, trailers and status back."""
    context, requests, pool, max_age = call.downstream
    assert call.endpoint is not None
    if call.attempts:
        # Under a retry policy: keep what is sent, so a retry can send it again.
        if not isinstance(requests, RequestTape):
            requests = RequestTape(requests, call)
            call.downstream = (context, requests, pool, max_age)
        source: AsyncIterator[bytes] = requests.messages()
    else:
        source = requests
    upstream = pool.get(call.endpoint.address).stream_stream(call.method)(
        metadata=call.metadata, timeout=call.upstream_timeout()
    )
    status = StatusWatch(upstream)
    context.add_done_callback(lambda _ctx: upstream.cancel())
    loop = asyncio.get_running_loop()
    pump = loop.create_task(_pump(source, upstream, status))
    first: asyncio.Future[Any] | None = None
    aged: list[bool] = []
    if max_age is not None:
        # The Service's maxStreamAge: end the upstream side; the caller gets a clean status
        # between two messages (never a reset mid-message) telling it to reconnect.
        def expire() -> None:
            aged.append(True)
            upstream.cancel()

        # Up to 10% later at random: streams opened together do not all end together.
        timer = loop.call_later(max_age * (1 + random.random() / 10), expire)
        context.add_done_callback(lambda _ctx: timer.cancel())
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
            call.committed = True
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
                # by the max-age timer (a cancel of this task itself propagates as usual).
                task = asyncio.current_task()
                if aged and not (task is not None and task.cancelling()):
                    break
                raise
            if message is grpc.aio.EOF:
                break
            await context.write(message)
        code, details, trailing = await status.final()
    finally:
        pump.cancel()
        if first is not None:
            first.cancel()
        if not upstream.done():
            upstream.cancel()
    if aged:
        call.committed = True  # ended on purpose: never retried
        raise CallError(
            grpc.StatusCode.UNAVAILABLE,
            f"gmesh: stream reached its maximum age ({format_duration(max_age)}); reconnect",
            (("x-gmesh-stream-max-age", "1"),),
            endpoint_fault=False,
        )
    if code != grpc.StatusCode.OK:
        if not call.committed and initial:
            call.committed = True  # the upstream sent headers: no retry
            await context.send_initial_metadata(initial)
        raise CallError(code, details, forwardable(trailing))
    context.set_trailing_metadata(forwardable(trailing))


async def _pump(requests: AsyncIterator[bytes], upstream: Any, status: StatusWatch) -> None:
    try:
        async for message in requests:
            await upstream.write(message)
        await upstream.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        # The upstream ended the call (or was cancelled) while we still had requests:
        # stop sending; its status, not our failed write, is what the caller gets.
        status.write_failed = True
