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
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from gmesh.chain.call import Call, Metadata, mirror_metadata, mirror_timeout
from gmesh.channel.status import StatusWatch
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


async def forward_stream(call: Call) -> None:
    """Any RPC kind: pump requests up, relay headers, messages, trailers and status back."""
    context, requests, pool = call.downstream
    assert call.endpoint is not None
    upstream = pool.get(call.endpoint.address).stream_stream(call.method)(
        metadata=call.metadata, timeout=call.upstream_timeout()
    )
    status = StatusWatch(upstream)
    context.add_done_callback(lambda _ctx: upstream.cancel())
    pump = asyncio.get_running_loop().create_task(_pump(requests, upstream, status))
    try:
        initial = forwardable(await upstream.initial_metadata())
        if not (upstream.done() and await upstream.code() != grpc.StatusCode.OK):
            # Headers first, before any message; an upstream that fails without a message
            # answers trailers-only, and so do we (headers go with the status below).
            await context.send_initial_metadata(initial)
            call.committed = True
        while True:
            try:
                message = await upstream.read()
            except grpc.aio.AioRpcError:
                break
            if message is grpc.aio.EOF:
                break
            await context.write(message)
        code, details, trailing = await status.final()
    finally:
        pump.cancel()
        if not upstream.done():
            upstream.cancel()
    if code != grpc.StatusCode.OK:
        if not call.committed and initial:
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
