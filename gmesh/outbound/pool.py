"""The endpoint layer: one pooled `grpc.aio` channel per endpoint address and connection profile.

A profile is what a connection is made with (channel options, credentials, interceptors);
the proxy and every `gmesh.aio.channel` of a process that ask for the same one share its
pool, so N channels to a service never open N connections per endpoint.

Connections are lazy. A pool connects to a service's endpoints the first time a call of
that service needs one (all of them then, so balancing spreads from the first call, as
grpc's round_robin does), follows the service's endpoint set while it is in use, and
closes them when the service goes idle (`release`) or an endpoint leaves the mesh;
calls already on a closing channel get `drain_timeout` to finish.

Per-endpoint call objects (grpc multicallables) are cached only for methods known to the
endpoint (from its reflection), bounded (LRU); only those use grpc's registered-method path,
which grpc-core keeps for the channel's lifetime. A method a caller made up gets a call object
of its own, kept by nobody: endless made-up names cannot grow anything.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

if TYPE_CHECKING:
    from gmesh.discovery.endpoint import Endpoint
    from gmesh.security.identity import WorkloadIdentity

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
#: Call objects kept per endpoint connection (most recently used first to stay).
CALL_CACHE = 256


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


class Profile:
    """How a pool's connections are made: options, credentials, interceptors, and the workload
    identity they present (mutual TLS to endpoints that offer it). Profiles are the same when
    their options are equal and their credentials, interceptors and identity are the same
    objects."""

    __slots__ = ("credentials", "identity", "interceptors", "key", "options")

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        options: Sequence[tuple[str, Any]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[Any] | None = None,
        identity: WorkloadIdentity | None = None,
    ) -> None:
        # Options given by the user replace gmesh's defaults of the same name (gRPC would
        # keep the first of two, silently).
        merged = dict(channel_options(max_message_bytes))
        merged.update(dict(options or ()))
        self.options = list(merged.items())
        self.credentials = credentials
        self.interceptors = list(interceptors) if interceptors else None
        self.identity = identity
        self.key = (
            tuple(sorted((k, repr(v)) for k, v in merged.items())),
            id(credentials) if credentials is not None else None,
            tuple(id(i) for i in interceptors or ()),
            id(identity) if identity is not None else None,
        )


class EndpointConn:
    """One endpoint's channel and its call objects, cached by kind, method and (de)serializer.

    With an identity in the profile and `tls` (the endpoint's mTLS address), the channel goes
    there with mutual TLS: it presents the identity's current certificate and accepts only a
    mesh certificate naming `server_name` (the endpoint's service; grpc checks DNS SANs)."""

    __slots__ = ("_calls", "address", "channel", "tls")

    def __init__(self, address: str, profile: Profile, *, tls: str = "", server_name: str = "") -> None:
        self.address = address
        self.tls = tls if profile.identity is not None else ""
        if self.tls:
            assert profile.identity is not None
            self.channel = grpc.aio.secure_channel(
                self.tls,
                profile.identity.channel_credentials(),
                [*profile.options, ("grpc.ssl_target_name_override", server_name)],
                interceptors=profile.interceptors,
            )
        elif profile.credentials is not None:
            self.channel = grpc.aio.secure_channel(
                address, profile.credentials, list(profile.options), interceptors=profile.interceptors
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                address, list(profile.options), interceptors=profile.interceptors
            )
        self._calls: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()

    def _call(self, kind: str, method: str, ser: Any, deser: Any, known: bool) -> Any:
        if not known:
            # A method the endpoint never reported: a call object of its own, kept by nobody
            # (a caller making up names must not fill a cache per endpoint).
            return getattr(self.channel, kind)(method, ser, deser, _registered_method=False)
        key = (kind, method, ser, deser)
        calls = self._calls
        mc = calls.get(key)
        if mc is not None:
            calls.move_to_end(key)
            return mc
        make = getattr(self.channel, kind)
        mc = calls[key] = make(method, ser, deser, _registered_method=True)
        if len(calls) > CALL_CACHE:
            calls.popitem(last=False)
        return mc

    def unary_unary(self, method: str, ser: Any = None, deser: Any = None, *, known: bool = True) -> Any:
        return self._call("unary_unary", method, ser, deser, known)

    def unary_stream(self, method: str, ser: Any = None, deser: Any = None, *, known: bool = True) -> Any:
        return self._call("unary_stream", method, ser, deser, known)

    def stream_unary(self, method: str, ser: Any = None, deser: Any = None, *, known: bool = True) -> Any:
        return self._call("stream_unary", method, ser, deser, known)

    def stream_stream(self, method: str, ser: Any = None, deser: Any = None, *, known: bool = True) -> Any:
        return self._call("stream_stream", method, ser, deser, known)

    def cached_calls(self) -> int:
        return len(self._calls)


class EndpointPool:
    """Connections of one profile, by endpoint address. `get()` never awaits."""

    def __init__(
        self,
        profile: Profile | None = None,
        *,
        addresses_of: Callable[[str], Iterable[str]] = lambda service: (),
        tls_of: Callable[[str], Mapping[str, str]] = lambda service: {},
        drain_timeout: float = 30.0,
        on_state_change: Callable[[], None] | None = None,
    ) -> None:
        self.profile = profile or Profile()
        #: service -> {address: its mTLS address} (asked only when the profile has an identity)
        self._tls_of = tls_of
        self.rebuilds = 0
        self.drain_timeout = drain_timeout
        self._addresses_of = addresses_of
        self._on_state_change = on_state_change
        self._conns: dict[str, EndpointConn] = {}
        #: address -> the services in use here that have it as an endpoint
        self._users: dict[str, set[str]] = {}
        #: service -> its addresses connected here (services in use by this pool)
        self.services: dict[str, set[str]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        #: addresses whose channel cannot connect right now (TRANSIENT_FAILURE); the balancer
        #: skips them, as grpc's own round robin only picks READY subchannels. Live set: read it.
        self.down: set[str] = set()
        self.closed = False

    # -- per call ---------------------------------------------------------------------------

    def get(self, endpoint: Endpoint) -> EndpointConn:
        """The connection to `endpoint`: made now, with every endpoint of its service, the
        first time that service is called through this pool."""
        conn = self._conns.get(endpoint.address)
        if conn is None:
            self.use(endpoint.service)
            conn = self._conns.get(endpoint.address) or self._open(endpoint.address, endpoint.service)
        return conn

    def conn(self, address: str) -> EndpointConn | None:
        """The connection to `address` if there is one (health checks: never opens one)."""
        return self._conns.get(address)

    # -- following the mesh -----------------------------------------------------------------

    def use(self, service: str) -> None:
        """Connect to every endpoint of `service` (it is being called through this pool)."""
        if self.closed:
            raise RuntimeError("endpoint pool is closed")
        self.sync(service, self._addresses_of(service), start=True)

    def sync(self, service: str, addresses: Iterable[str], *, start: bool = False) -> None:
        """`service`'s endpoints are now `addresses`: connect new ones, let go of those that
        left. Services this pool does not use are ignored (unless `start`)."""
        if service not in self.services and not start:
            return
        wanted = set(addresses)
        had = self.services.setdefault(service, set())
        for address in wanted - had:
            self._users.setdefault(address, set()).add(service)
            if address not in self._conns:
                self._open(address, service)
        for address in had - wanted:
            self._let_go(address, service)
        self.services[service] = wanted
        if self.profile.identity is not None and had:
            # an endpoint that started (or stopped) offering mTLS: reconnect it the new way
            tls = self._tls_of(service)
            for address in wanted & had:
                conn = self._conns.get(address)
                if conn is not None and conn.tls != tls.get(address, ""):
                    self._replace(address, service, tls)

    def rebuild(self) -> None:
        """New connections for every endpoint (the identity's certificate or roots changed: grpc
        cannot rotate a channel's credentials). New calls take the new channels at once; calls
        on the old ones get `drain_timeout` to finish."""
        if self.closed:
            return
        self.rebuilds += 1
        tls_by_service: dict[str, Mapping[str, str]] = {}
        for address in list(self._conns):
            service = next(iter(self._users.get(address) or ()), "")
            if service not in tls_by_service:
                tls_by_service[service] = self._tls_of(service) if service else {}
            self._replace(address, service, tls_by_service[service])

    def _replace(self, address: str, service: str, tls: Mapping[str, str]) -> None:
        old = self._conns.get(address)
        conn = self._conns[address] = EndpointConn(
            address, self.profile, tls=tls.get(address, ""), server_name=service
        )
        watcher = self._watchers.pop(address, None)
        if watcher is not None:
            watcher.cancel()
        self._watch(conn)
        if old is not None:
            task = asyncio.get_running_loop().create_task(self._drain(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def release(self, service: str) -> None:
        """`service` is idle (or gone): close the connections no other service here needs."""
        for address in self.services.pop(service, ()):
            self._let_go(address, service)

    def _open(self, address: str, service: str) -> EndpointConn:
        tls = self._tls_of(service).get(address, "") if self.profile.identity is not None else ""
        conn = self._conns[address] = EndpointConn(address, self.profile, tls=tls, server_name=service)
        self._users.setdefault(address, set()).add(service)
        self.services.setdefault(service, set()).add(address)
        self._watch(conn)
        return conn

    def _watch(self, conn: EndpointConn) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: no connectivity to follow
            self._watchers[conn.address] = asyncio.get_running_loop().create_task(
                self._follow(conn), name=f"gmesh-endpoint {conn.address}"
            )

    def _let_go(self, address: str, service: str) -> None:
        users = self._users.get(address)
        if users is not None:
            users.discard(service)
            if users:
                return
            del self._users[address]
        conn = self._conns.pop(address, None)
        watcher = self._watchers.pop(address, None)
        if watcher is not None:
            watcher.cancel()
        self.down.discard(address)
        if conn is not None:
            task = asyncio.get_running_loop().create_task(self._drain(conn))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _follow(self, conn: EndpointConn) -> None:
        """Keep `down` in step with the channel's connectivity (and keep it connecting)."""
        channel = conn.channel
        state = channel.get_state(try_to_connect=True)
        while True:
            was_down = conn.address in self.down
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                if not was_down:
                    log.info("endpoint %s cannot be reached; picking others", conn.address)
                self.down.add(conn.address)
            elif state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE):
                self.down.discard(conn.address)
            if was_down != (conn.address in self.down) and self._on_state_change is not None:
                self._on_state_change()
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    async def _drain(self, conn: EndpointConn) -> None:
        # close(grace): no new calls; calls in flight get the grace period, then are cancelled.
        await conn.channel.close(self.drain_timeout)
        log.debug("closed channel to %s", conn.address)

    # -- reading ----------------------------------------------------------------------------

    def conns(self) -> list[EndpointConn]:
        return list(self._conns.values())

    def conns_of(self, service: str) -> list[EndpointConn]:
        return [c for a in self.services.get(service, ()) if (c := self._conns.get(a)) is not None]

    def describe(self) -> dict[str, Any]:
        return {
            "identity": self.profile.identity.spiffe_id if self.profile.identity is not None else None,
            "mtls": sum(1 for c in self._conns.values() if c.tls),
            "connections": len(self._conns),
            "down": sorted(self.down),
            "services": sorted(self.services),
            "callObjects": sum(c.cached_calls() for c in self._conns.values()),
        }

    async def close(self, grace: float | None = None) -> None:
        self.closed = True
        for watcher in self._watchers.values():
            watcher.cancel()
        self._watchers.clear()
        conns, self._conns = list(self._conns.values()), {}
        self._users.clear()
        self.services.clear()
        await asyncio.gather(*(c.channel.close(grace) for c in conns), return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
