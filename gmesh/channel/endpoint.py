"""The endpoint layer: one pooled `grpc.aio` channel per endpoint address, shared by every call.

Channels are created when an endpoint appears (and start connecting at once), reused by
proxy and in-process channel alike, and closed gracefully when the endpoint leaves: calls
already on it get `drain_timeout` to finish before they are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # HTTP/2 keepalive: notice a dead endpoint without waiting for a call to time out.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # gmesh does its own retries (grpc-core's would double them, and hedging is ignored).
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


class EndpointConn:
    """One endpoint's channel and its multicallables, cached by method and (de)serializer."""

    __slots__ = ("_calls", "address", "channel")

    def __init__(
        self,
        address: str,
        options: Sequence[tuple[str, Any]],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[Any] | None = None,
    ) -> None:
        self.address = address
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(
                address, credentials, list(options), interceptors=interceptors
            )
        else:
            self.channel = grpc.aio.insecure_channel(address, list(options), interceptors=interceptors)
        self._calls: dict[tuple[Any, ...], Any] = {}

    def unary_unary(self, method: str, serializer: Any = None, deserializer: Any = None) -> Any:
        key = ("uu", method, serializer, deserializer)
        mc = self._calls.get(key)
        if mc is None:
            mc = self._calls[key] = self.channel.unary_unary(
                method, serializer, deserializer, _registered_method=True
            )
        return mc

    def unary_stream(self, method: str, serializer: Any = None, deserializer: Any = None) -> Any:
        key = ("us", method, serializer, deserializer)
        mc = self._calls.get(key)
        if mc is None:
            mc = self._calls[key] = self.channel.unary_stream(
                method, serializer, deserializer, _registered_method=True
            )
        return mc

    def stream_unary(self, method: str, serializer: Any = None, deserializer: Any = None) -> Any:
        key = ("su", method, serializer, deserializer)
        mc = self._calls.get(key)
        if mc is None:
            mc = self._calls[key] = self.channel.stream_unary(
                method, serializer, deserializer, _registered_method=True
            )
        return mc

    def stream_stream(self, method: str, serializer: Any = None, deserializer: Any = None) -> Any:
        key = ("ss", method, serializer, deserializer)
        mc = self._calls.get(key)
        if mc is None:
            mc = self._calls[key] = self.channel.stream_stream(
                method, serializer, deserializer, _registered_method=True
            )
        return mc


class EndpointPool:
    """Channels by endpoint address. `sync()` follows the endpoint set; `get()` never awaits."""

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        drain_timeout: float = 30.0,
        extra_options: Sequence[tuple[str, Any]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[Any] | None = None,
    ) -> None:
        # Options given by the user replace gmesh's defaults of the same name (gRPC would
        # keep the first of two, silently).
        merged = dict(channel_options(max_message_bytes))
        merged.update(dict(extra_options or ()))
        self.options = list(merged.items())
        self.credentials = credentials
        self.interceptors = list(interceptors) if interceptors else None
        self.drain_timeout = drain_timeout
        self._conns: dict[str, EndpointConn] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        #: addresses whose channel cannot connect right now (TRANSIENT_FAILURE); the balancer
        #: skips them, as grpc's own round robin only picks READY subchannels. Live set: read it.
        self.down: set[str] = set()

    def get(self, address: str) -> EndpointConn:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = EndpointConn(
                address, self.options, credentials=self.credentials, interceptors=self.interceptors
            )
        return conn

    def conns(self) -> list[EndpointConn]:
        return list(self._conns.values())

    def sync(self, addresses: Iterable[str]) -> None:
        """Open channels to new addresses (connecting now and following their connectivity),
        drain and close the ones that left."""
        wanted = set(addresses)
        loop = asyncio.get_running_loop()
        for address in wanted - self._watchers.keys():
            self._watchers[address] = loop.create_task(self._follow(self.get(address)))
        for address in list(self._conns.keys() - wanted):
            conn = self._conns.pop(address)
            watcher = self._watchers.pop(address, None)
            if watcher is not None:
                watcher.cancel()
            self.down.discard(address)
            task = loop.create_task(self._drain(conn))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _follow(self, conn: EndpointConn) -> None:
        """Keep `down` in step with the channel's connectivity (and keep it connecting)."""
        channel = conn.channel
        state = channel.get_state(try_to_connect=True)
        while True:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                if conn.address not in self.down:
                    log.info("endpoint %s cannot be reached; picking others", conn.address)
                self.down.add(conn.address)
            elif state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE):
                self.down.discard(conn.address)
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    async def _drain(self, conn: EndpointConn) -> None:
        # close(grace): no new calls; calls in flight get the grace period, then are cancelled.
        await conn.channel.close(self.drain_timeout)
        log.debug("closed channel to %s", conn.address)

    async def close(self, grace: float | None = None) -> None:
        for watcher in self._watchers.values():
            watcher.cancel()
        self._watchers.clear()
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(c.channel.close(grace) for c in conns), return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
