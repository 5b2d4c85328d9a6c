"""`gmesh.aio.channel("gmesh:///orders")`: a `grpc.aio.Channel` that runs the mesh chain in-process.

grpcio has no public resolver API (grpc/grpc#11685), so the `gmesh:///` scheme is a Channel
implementation: generated stubs use it as they are (they pass `_registered_method`), and
every call goes through the same compiled chain the proxy runs, picks an endpoint, and is
made on that endpoint's pooled grpc.aio channel. No proxy hop.

A channel is a view on the process's outbound stack for its mesh (`gmesh.outbound.stack`):
every channel and proxy of the process shares one catalog, one compiled chain per service,
one set of backends, breakers and budgets, and — for the same options, credentials and
interceptors — one connection per endpoint. What is the channel's own: the service it
calls, its caller labels and zone, its connection profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.chain.call import Caller, source_of
from gmesh.discovery.endpoint import check_service_name
from gmesh.discovery.keys import DEFAULT_PREFIX, MeshKeys
from gmesh.errors import InvalidArgument
from gmesh.outbound import stack
from gmesh.outbound.pool import EndpointPool, Profile
from gmesh.stats.backend import PROCESS
from gmesh.store.connect import resolve_etcd
from gmesh.store.etcd import EtcdConfig

if TYPE_CHECKING:
    from gmesh.channel.streaming import StreamingMultiCallable
    from gmesh.channel.unary import UnaryMultiCallable
    from gmesh.outbound.stack import Outbound

SCHEME = "gmesh:///"


def parse_target(target: str) -> str:
    """`gmesh:///orders` -> `orders`."""
    if not target.startswith(SCHEME):
        raise InvalidArgument(f"target {target!r}: expected gmesh:///SERVICE, e.g. gmesh:///orders")
    return check_service_name(target[len(SCHEME) :].strip("/"))


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
        idle_timeout: float | None = None,
        identity: str | None = None,
        token: str | None = None,
    ) -> None:
        self.service = service
        #: the mesh service this process calls as (mutual TLS to endpoints that offer it)
        self._identity_service = check_service_name(identity) if identity else None
        self._token = token
        self.identity: Any = None
        #: this process as route rules and zone-aware balancers see the caller
        zone = os.environ.get("GMESH_ZONE", "") if zone is None else zone
        labels = dict(caller_labels or {})
        self.caller = Caller(labels=labels, zone=zone, source=source_of("", labels, f"process:{PROCESS}"))
        self._etcd = etcd
        self._keys = MeshKeys(prefix or os.environ.get("GMESH_PREFIX") or DEFAULT_PREFIX)
        self._profile = Profile(options=options, credentials=credentials, interceptors=interceptors)
        self._idle_timeout = idle_timeout
        #: set once started: the shared stack, and the pool of this channel's profile
        self.outbound: Outbound | None = None
        self.pool: EndpointPool | None = None
        self._starting: asyncio.Task[Outbound] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def _start(self) -> Outbound:
        config = self._etcd if isinstance(self._etcd, EtcdConfig) else await resolve_etcd(self._etcd)
        outbound = await stack.acquire(config, self._keys, idle_timeout=self._idle_timeout)
        if self._identity_service is not None:
            from gmesh.security import identity as identities

            try:
                self.identity = await identities.acquire(
                    outbound.store, self._keys, self._identity_service, mesh=config.describe(),
                    token=self._token,
                )  # fmt: skip
            except BaseException:
                await stack.release(outbound)
                raise
            profile = self._profile
            self._profile = Profile(
                options=profile.options,
                credentials=profile.credentials,
                interceptors=profile.interceptors,
                identity=self.identity,
            )
            self.caller.identity = self.identity.spiffe_id
            self.caller.source = source_of(self.caller.identity, self.caller.labels, self.caller.source)
        self.pool = outbound.pool(self._profile)
        self.outbound = outbound
        return outbound

    def started(self) -> Outbound | asyncio.Task[Outbound]:
        """The stack when started, else the task starting it (started now if need be)."""
        if self.outbound is not None:
            return self.outbound
        if self._closed:
            raise grpc.aio.UsageError("Channel is closed.")
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        return self._starting

    async def ready_outbound(self) -> Outbound:
        """The started outbound stack (starts it: connects to etcd, loads the snapshot)."""
        found = self.started()
        return found if not isinstance(found, asyncio.Task) else await asyncio.shield(found)

    async def close(self, grace: float | None = None) -> None:
        """Give back this channel's share of the stack; connections close when no other channel
        or proxy of the process uses them (calls in flight get `grace` seconds)."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._starting
        outbound, self.outbound = self.outbound, None
        if outbound is not None:
            if self.pool is not None:
                await outbound.release_pool(self.pool, grace)
            if self.identity is not None:
                from gmesh.security import identity as identities

                await identities.release(self.identity)
            await stack.release(outbound)

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)

    # -- connectivity (of this channel's service only) ---------------------------------

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY when a connection to an endpoint of the service is READY; else the most hopeful
        state among them. With `try_to_connect`, connects to the service's endpoints (as its
        first call would)."""
        if self.outbound is None or self.pool is None:
            if try_to_connect and not self._closed:
                self.started()
            return grpc.ChannelConnectivity.IDLE
        if try_to_connect:
            self.outbound.activate(self.service)
            self.pool.use(self.service)
        states = [c.channel.get_state(try_to_connect) for c in self.pool.conns_of(self.service)]
        for state in (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.CONNECTING,
            grpc.ChannelConnectivity.IDLE,
        ):
            if state in states:
                return state
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE if states else grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        started = self.outbound is not None
        outbound = await self.ready_outbound()
        if not started:
            return  # the state seen was the channel's before it started: look again
        while self.get_state() == last_observed_state:
            assert self.pool is not None
            waits = [
                asyncio.ensure_future(c.channel.wait_for_state_change(c.channel.get_state()))
                for c in self.pool.conns_of(self.service)
            ]
            waits.append(asyncio.ensure_future(outbound.backends.changed(None)))
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()

    async def channel_ready(self) -> None:
        state = self.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            await self.wait_for_state_change(state)
            state = self.get_state(try_to_connect=True)

    # -- multicallables ----------------------------------------------------------------

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> UnaryMultiCallable:  # fmt: skip
        from gmesh.channel.unary import UnaryMultiCallable

        return UnaryMultiCallable(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> StreamingMultiCallable:  # fmt: skip
        from gmesh.channel.streaming import StreamingMultiCallable

        return StreamingMultiCallable(self, method, request_serializer, response_deserializer, "us")

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> StreamingMultiCallable:  # fmt: skip
        from gmesh.channel.streaming import StreamingMultiCallable

        return StreamingMultiCallable(self, method, request_serializer, response_deserializer, "su")

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> StreamingMultiCallable:  # fmt: skip
        from gmesh.channel.streaming import StreamingMultiCallable

        return StreamingMultiCallable(self, method, request_serializer, response_deserializer, "ss")


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
    idle_timeout: float | None = None,
    identity: str | None = None,
    token: str | None = None,
) -> MeshChannel:
    """A `grpc.aio.Channel` to the mesh service in `target` (`gmesh:///orders`).

    `etcd`: URLs (default `GMESH_ETCD`, else the embedded etcd); `options`, `interceptors`,
    `credentials`: as for `grpc.aio.secure_channel`, applied to every endpoint connection
    (channels asking for the same ones share connections); `prefix`: the mesh's key prefix
    (default `GMESH_PREFIX` or `/gmesh/v1/`); `caller_labels`: labels of this workload,
    which Route rules match with `match.caller.labels`; `zone`: where this process runs
    (default `GMESH_ZONE`), for zone-aware balancing; `idle_timeout`: seconds without calls
    after which a service's connections are closed (default `GMESH_IDLE_TIMEOUT` or 10
    minutes; the shortest asked for in a process applies); `identity`: the mesh service this
    process calls as — its certificate is fetched from the mesh CA at first use (a join token
    as `token` or GMESH_JOIN_TOKEN, or the local token on the CA's machine), renewed by
    itself, and presented in mutual TLS to every endpoint that offers it (endpoints must then
    present a mesh certificate of the service called). The channel connects on first use;
    `await channel.close()` releases its share.
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
        idle_timeout=idle_timeout,
        identity=identity,
        token=token,
    )
