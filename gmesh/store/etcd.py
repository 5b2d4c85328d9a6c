"""The one async interface gmesh has to etcd: reads, writes, transactions, watches and leases.

Built on `etcd3aio` (its gRPC stubs, retries and auth), with gmesh's own rules on top:
every call has a deadline of at least 5 s so it survives a leader election; watches resume
from the next unseen revision after any failure (no gap, no duplicate) and turn a
compaction or a rewound store into a full re-read (`Resync`), never a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import grpc
import grpc.aio
from etcd3aio import (
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
)
from etcd3aio._protobuf import (
    Compare as _PbCompare,
)
from etcd3aio._protobuf import (
    DeleteRangeRequest,
    LeaseKeepAliveRequest,
    LeaseStub,
    PutRequest,
    RequestOp,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

from gmesh.errors import Conflict, InvalidArgument, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Deadline of one store call, retries included. etcd elects a new leader in about a
#: second; 5 s leaves room for that and a slow disk.
DEFAULT_TIMEOUT = 5.0


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """How to reach an etcd cluster: endpoints, and TLS or user/password where it needs them."""

    endpoints: tuple[str, ...]
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def parse(cls, urls: str, **options: Any) -> EtcdConfig:
        """From `URL[,URL...]` as users write it (`http://h:p`, `https://h:p` or `h:p`)."""
        endpoints = tuple(u.strip() for u in urls.split(",") if u.strip())
        if not endpoints:
            raise InvalidArgument("no etcd endpoint given (expected URL[,URL...])")
        for url in endpoints:
            _split_url(url)  # validates
        return cls(endpoints=endpoints, **options)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or any(u.startswith("https://") for u in self.endpoints)

    def describe(self) -> str:
        return ",".join(self.endpoints)


def _split_url(url: str) -> tuple[str, int]:
    rest = url
    for scheme in ("http://", "https://"):
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    else:
        if "://" in rest:
            raise InvalidArgument(f"etcd endpoint {url!r}: only http:// and https:// are supported")
    rest = rest.rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"etcd endpoint {url!r}: expected HOST:PORT, e.g. http://127.0.0.1:2379")
    return host.strip("[]"), int(port)


def _channel_target(config: EtcdConfig) -> tuple[str, str | None]:
    """A gRPC target that balances over every endpoint, and the TLS name to verify."""
    hosts = [_split_url(u) for u in config.endpoints]
    resolved_v4: list[str] = []
    resolved_v6: list[str] = []
    first_name: str | None = None
    for host, port in hosts:
        try:
            ip = ipaddress.ip_address(host)
            ips = [ip]
        except ValueError:
            first_name = first_name or host
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise StoreUnavailable(f"cannot resolve etcd host {host!r}: {exc}") from exc
            ips = [ipaddress.ip_address(info[4][0]) for info in infos]
        for ip in dict.fromkeys(ips):
            if ip.version == 4:
                resolved_v4.append(f"{ip}:{port}")
            else:
                resolved_v6.append(f"[{ip}]:{port}")
    # gRPC takes one address family per static target; prefer IPv4 when both exist.
    target = f"ipv4:{','.join(resolved_v4)}" if resolved_v4 else f"ipv6:{','.join(resolved_v6)}"
    return target, config.server_name or first_name


# --------------------------------------------------------------------------- data


class Compacted(Exception):
    """The revision asked for is older than etcd's compaction point."""


class KeyValue(NamedTuple):
    """One key as etcd stores it. A named tuple, not a frozen dataclass: a catalog of 10,000
    endpoints makes 10,000 of them on every full read, and this is 3x cheaper to create."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    """One change: for DELETE, `kv.value` is empty and `kv.mod_revision` is the deletion's revision."""

    type: EventType
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events of one or more revisions, in order; the watcher has now seen everything up to `revision`."""

    revision: int
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Resync:
    """The whole watched range as it is at `revision`: replace what you had with `kvs`.

    Sent first, and again whenever the watch could not resume exactly (history compacted
    past the point reached, or a store that went back in time).
    """

    revision: int
    kvs: tuple[KeyValue, ...]


@dataclass(frozen=True, slots=True)
class WatchLost:
    """The watch is down and retrying; what the consumer holds is now possibly stale."""

    error: str


WatchItem = WatchBatch | Resync | WatchLost


@dataclass(frozen=True, slots=True)
class Compare:
    """A condition of a transaction on one key; `mod`=0 or `version`=0 mean "does not exist"."""

    key: str
    target: Literal["mod", "version", "create", "value"]
    value: int | bytes
    op: Literal["==", "!=", "<", ">"] = "=="


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


TxnOp = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


_COMPARE_OPS = {
    "==": _PbCompare.EQUAL,
    "!=": _PbCompare.NOT_EQUAL,
    "<": _PbCompare.LESS,
    ">": _PbCompare.GREATER,
}


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=pb.key.decode(),
        value=bytes(pb.value),
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        version=pb.version,
        lease=pb.lease,
    )


def _pb_compare(c: Compare) -> Any:
    pb = _PbCompare(key=c.key.encode(), result=_COMPARE_OPS[c.op])
    if c.target == "mod":
        pb.target, pb.mod_revision = _PbCompare.MOD, int(c.value)
    elif c.target == "version":
        pb.target, pb.version = _PbCompare.VERSION, int(c.value)
    elif c.target == "create":
        pb.target, pb.create_revision = _PbCompare.CREATE, int(c.value)
    else:
        pb.target, pb.value = _PbCompare.VALUE, bytes(c.value)
    return pb


def _pb_op(op: TxnOp) -> Any:
    if isinstance(op, Put):
        return RequestOp(request_put=PutRequest(key=op.key.encode(), value=op.value, lease=op.lease))
    end = prefix_range_end(op.key.encode()) if op.prefix else b""
    return RequestOp(request_delete_range=DeleteRangeRequest(key=op.key.encode(), range_end=end))


class Backoff:
    """Exponential backoff with full jitter, for reconnect loops."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial, self.maximum, self._next = initial, maximum, initial

    def reset(self) -> None:
        self._next = self.initial

    async def sleep(self) -> None:
        delay = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, self.maximum)
        await asyncio.sleep(delay)


# --------------------------------------------------------------------------- store


class Store:
    """An open connection to one etcd cluster. Create with `await Store.connect(config)`.

    Every method is safe to call concurrently from one event loop. Errors: `StoreUnavailable`
    when etcd cannot be reached within the deadline, `Conflict` is left to callers of `txn`.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService
        self._lease: LeaseService
        self._auth: AuthService
        self._watch_stub: WatchStub
        self._lease_stub: LeaseStub
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._auth_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, config: EtcdConfig) -> Store:
        """Open a channel to every endpoint (round robin, keepalive) and log in if a user is set.

        Does not wait for etcd to answer: a catalog must start while etcd is down. Call
        `ping()` to find out now.
        """
        store = cls(config)
        store._open()
        if config.user is not None:
            await store._authenticate()
        return store

    def _open(self) -> None:
        target, tls_name = _channel_target(self.config)
        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # Reconnect quickly to a member that comes back (default backoff reaches 120 s).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if self.config.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(self.config.ca_file),
                private_key=_read(self.config.key_file),
                certificate_chain=_read(self.config.cert_file),
            )
            if tls_name:
                options.append(("grpc.ssl_target_name_override", tls_name))
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        # Retries back off 0.05 s doubling to 1 s: 8 attempts span ~4.5 s, inside the 5 s
        # deadline, so a dead etcd ends with its real error rather than a bare timeout.
        attempts = 8
        self._kv = KVService(self._channel, max_attempts=attempts)
        self._lease = LeaseService(self._channel, max_attempts=attempts)
        self._auth = AuthService(self._channel, max_attempts=attempts)
        self._watch_stub = WatchStub(self._channel)
        self._lease_stub = LeaseStub(self._channel)

    async def _authenticate(self) -> None:
        assert self.config.user is not None
        async with self._auth_lock:
            try:
                resp = await self._auth.authenticate(
                    self.config.user, self.config.password or "", timeout=self.config.timeout
                )
            except (EtcdError, grpc.aio.AioRpcError) as exc:
                reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                raise StoreUnavailable(
                    f"etcd at {self.config.describe()}: login as {self.config.user!r} failed: {reason}"
                ) from exc
            self._metadata = (("token", resp.token),)
            for svc in (self._kv, self._lease, self._auth):
                svc.set_token(resp.token)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- calls -------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in (1, 2):
            try:
                return await fn()
            except (EtcdUnauthenticatedError, grpc.aio.AioRpcError) as exc:
                # Tokens expire (5 min by default) and die when the auth store changes: log in
                # again once, then give up.
                if self.config.user is not None and attempt == 1 and _needs_login(exc):
                    await self._authenticate()
                    continue
                if isinstance(exc, grpc.aio.AioRpcError):
                    raise StoreUnavailable(
                        f"etcd at {self.config.describe()}: {what} failed: {exc.code().name} {exc.details()}"
                    ) from exc
                raise StoreUnavailable(f"etcd at {self.config.describe()}: {what}: {exc}") from exc
            except (EtcdConnectionError, EtcdTransientError, TimeoutError) as exc:
                cause = exc.__cause__
                detail = (
                    cause.details()
                    if isinstance(cause, grpc.aio.AioRpcError) and cause.details()
                    else str(exc) or f"no answer within {self.config.timeout:g}s"
                )
                raise StoreUnavailable(
                    f"etcd at {self.config.describe()} is unreachable ({what}: {detail})"
                ) from exc
            except EtcdPermissionDeniedError as exc:
                raise StoreUnavailable(f"etcd at {self.config.describe()}: {what}: {exc}") from exc
        raise AssertionError("unreachable")

    async def unreachable(self) -> None:
        """Return once the connection to etcd has failed (every endpoint refused or timed out):
        a starting catalog with a persisted snapshot need not wait any longer."""
        channel = self._channel
        assert channel is not None, "store is not open"
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    async def ping(self) -> int:
        """The cluster's current revision; raises `StoreUnavailable` if etcd does not answer."""
        resp = await self._call(
            "ping", lambda: self._kv.get(b"\0", count_only=True, timeout=self.config.timeout)
        )
        return int(resp.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call("get", lambda: self._kv.get(key.encode(), timeout=self.config.timeout))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_at(self, key: str, revision: int) -> KeyValue | None:
        """`key` as it was at `revision` (None: absent then). Raises `Compacted` when etcd has
        compacted that revision away."""

        async def read() -> Any:
            try:
                return await self._kv.get(key.encode(), revision=revision, timeout=self.config.timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:  # "required revision has been compacted"
                    raise Compacted(f"etcd compacted revision {revision}") from exc
                raise

        resp = await self._call("get", read)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def history(self, key: str, limit: int = 20) -> tuple[list[KeyValue], bool]:
        """The versions of `key` since it was last created, newest first, at most `limit`; and
        whether older ones exist that etcd compacted away (or that `limit` left out)."""
        versions: list[KeyValue] = []
        found = await self.get(key)
        while found is not None:
            versions.append(found)
            if found.version <= 1:
                return versions, False  # created here
            if len(versions) >= limit:
                return versions, True
            try:
                found = await self.get_at(key, found.mod_revision - 1)
            except Compacted:
                return versions, True
        return versions, False

    async def get_range(self, start: str, end: str | None = None) -> tuple[list[KeyValue], int]:
        """Every key in [start, end) (end None = all keys with prefix `start`), and the revision read at."""
        range_end = end.encode() if end is not None else prefix_range_end(start.encode())
        kvs: list[KeyValue] = []
        key = start.encode()
        revision = 0
        page = 5000  # a few large pages: each costs a round trip
        while True:

            async def read(key: bytes = key, revision: int = revision) -> Any:
                return await self._kv.get(
                    key, range_end, revision=revision, limit=page, timeout=self.config.timeout
                )

            resp = await self._call("range", read)
            revision = revision or int(resp.header.revision)  # later pages read at the same revision
            kvs.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return kvs, revision
            key = resp.kvs[-1].key + b"\0"

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self.get_range(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write one key; returns the revision of the write."""
        resp = await self._call(
            "put", lambda: self._kv.put(key.encode(), value, lease=lease, timeout=self.config.timeout)
        )
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete one key (or every key under a prefix); returns how many were deleted."""
        end = prefix_range_end(key.encode()) if prefix else None
        resp = await self._call(
            "delete", lambda: self._kv.delete(key.encode(), end, timeout=self.config.timeout)
        )
        return int(resp.deleted)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp] = ()
    ) -> TxnResult:
        """Atomically: if every compare holds, run `success`, else `failure`."""
        resp = await self._call(
            "txn",
            lambda: self._kv.txn(
                [_pb_compare(c) for c in compares],
                [_pb_op(o) for o in success],
                [_pb_op(o) for o in failure],
                timeout=self.config.timeout,
            ),
        )
        return TxnResult(bool(resp.succeeded), int(resp.header.revision))

    async def compare_and_swap(self, compares: Sequence[Compare], ops: Sequence[TxnOp]) -> int:
        """Run `ops` if every compare holds; raise `Conflict` otherwise. Returns the revision."""
        result = await self.txn(compares, ops)
        if not result.succeeded:
            raise Conflict("the keys changed since they were read; read again and retry")
        return result.revision

    async def compact(self, revision: int) -> None:
        """Drop history before `revision` (watchers asking for it get a `Resync`)."""
        await self._call("compact", lambda: self._kv.compact(revision, timeout=self.config.timeout))

    # -- leases ------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._call("lease grant", lambda: self._lease.grant(ttl, timeout=self.config.timeout))
        return int(resp.ID)

    async def revoke_lease(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke a lease, deleting every key attached to it. A lease already gone is not an error."""

        async def revoke() -> None:
            try:
                await self._lease.revoke(lease_id, timeout=timeout or self.config.timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call("lease revoke", revoke)

    def keep_alive(self, lease_id: int, ttl: int, on_lost: Callable[[], None]) -> LeaseKeeper:
        """Keep a lease alive in the background until `LeaseKeeper.stop()`; see `LeaseKeeper`."""
        return LeaseKeeper(self, lease_id, ttl, on_lost)

    # -- watches -----------------------------------------------------------------------

    async def watch(
        self, start: str, end: str | None = None, *, start_revision: int | None = None
    ) -> AsyncGenerator[WatchItem, None]:
        """Follow every change to keys in [start, end) (end None = the prefix `start`).

        Without `start_revision`, the first item is a `Resync` of the whole range. Then
        `WatchBatch`es, in revision order, each revision exactly once, across member
        failures and reconnects. `WatchLost` is yielded when the stream breaks (the loop
        keeps retrying with backoff); a `Resync` follows whenever history could not be
        replayed. The iterator never ends on its own; stop it with `aclose()` or by
        cancelling the task that iterates.
        """
        range_end = end if end is not None else prefix_range_end(start.encode()).decode()
        next_rev: int | None = start_revision
        backoff = Backoff()
        lost = False
        while True:
            if next_rev is None:
                try:
                    kvs, revision = await self.get_range(start, range_end)
                except StoreUnavailable as exc:
                    if not lost:
                        lost = True
                        yield WatchLost(str(exc))
                    await backoff.sleep()
                    continue
                yield Resync(revision, tuple(kvs))
                next_rev = revision + 1
            stream_state = _WatchState(next_rev)
            try:
                # aclosing: when our consumer stops, the inner stream is cancelled now, not at GC
                async with contextlib.aclosing(self._watch_stream(start, range_end, stream_state)) as items:
                    async for item in items:
                        backoff.reset()
                        lost = False
                        yield item
                next_rev = stream_state.next_rev
            except _WatchMustResync as exc:
                log.warning("watch on %s: %s; reading the range again", start, exc)
                next_rev = None
                continue
            except (grpc.aio.AioRpcError, _WatchCanceled) as exc:
                next_rev = stream_state.next_rev
                if not lost:
                    lost = True
                    yield WatchLost(_describe(exc))
                log.info("watch on %s lost (%s); resuming at revision %d", start, _describe(exc), next_rev)
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    with contextlib.suppress(StoreUnavailable):
                        await self._authenticate()
                await backoff.sleep()

    async def _watch_stream(
        self, start: str, end: str, state: _WatchState
    ) -> AsyncGenerator[WatchItem, None]:
        closed = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield WatchRequest(
                create_request=WatchCreateRequest(
                    key=start.encode(),
                    range_end=end.encode(),
                    start_revision=state.next_rev,
                    progress_notify=True,
                )
            )
            await closed.wait()

        # `hasleader`: a member cut off from its cluster ends our watch instead of going quiet.
        metadata = (*self._metadata, ("hasleader", "true"))
        stream = self._watch_stub.Watch(requests(), metadata=metadata)
        try:
            async for resp in stream:
                if resp.compact_revision:
                    raise _WatchMustResync(f"revision {state.next_rev} was compacted")
                if resp.canceled:
                    raise _WatchCanceled(resp.cancel_reason or "canceled by etcd")
                if resp.created:
                    if resp.header.revision < state.next_rev - 1:
                        raise _WatchMustResync(
                            f"etcd is at revision {resp.header.revision}, behind {state.next_rev - 1}"
                            " already seen (restored or replaced store)"
                        )
                    continue
                if resp.events:
                    events = tuple(
                        Event(EventType.DELETE if ev.type == 1 else EventType.PUT, _kv(ev.kv))
                        for ev in resp.events
                    )
                    last = events[-1].kv.mod_revision
                    state.next_rev = last + 1
                    yield WatchBatch(last, events)
                elif resp.header.revision >= state.next_rev:
                    # Progress notification: only sent to a watcher that is in sync.
                    state.next_rev = resp.header.revision + 1
                    yield WatchBatch(int(resp.header.revision), ())
        finally:
            closed.set()
            stream.cancel()


@dataclass
class _WatchState:
    next_rev: int


class _WatchMustResync(Exception):
    pass


class _WatchCanceled(Exception):
    pass


def _needs_login(exc: BaseException) -> bool:
    """An etcd refusal that a fresh token cures (expired token, or one older than the auth store)."""
    if isinstance(exc, EtcdUnauthenticatedError):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or ""
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED or "revision of auth store is old" in details
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc


class LeaseKeeper:
    """Keeps one lease alive over a long-lived keepalive stream.

    Pings every ttl/3 seconds (and every second while etcd does not answer). When etcd
    says the lease is gone (it expired while we were cut off), calls `on_lost` once and
    stops: the owner grants a new lease and writes its keys again.
    """

    def __init__(self, store: Store, lease_id: int, ttl: int, on_lost: Callable[[], None]) -> None:
        self.store, self.lease_id, self.ttl, self._on_lost = store, lease_id, ttl, on_lost
        self._stopped = False
        self._task = asyncio.create_task(self._run(), name=f"lease-keepalive-{lease_id:x}")

    async def stop(self) -> None:
        self._stopped = True  # also ends the loop if a cancel is ever lost in a race
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        interval = max(self.ttl / 3, 0.5)
        while not self._stopped:
            queue: asyncio.Queue[None] = asyncio.Queue()

            async def requests(queue: asyncio.Queue[None] = queue) -> AsyncIterator[Any]:
                while True:
                    await queue.get()
                    yield LeaseKeepAliveRequest(ID=self.lease_id)

            stream = self.store._lease_stub.LeaseKeepAlive(requests(), metadata=self.store._metadata)
            try:
                while not self._stopped:
                    queue.put_nowait(None)
                    # asyncio.timeout, not wait_for: wait_for can swallow a cancel (CPython gh-86296)
                    async with asyncio.timeout(self.store.config.timeout):
                        resp = await stream.read()
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("keepalive stream ended")
                    if resp.TTL <= 0:
                        log.warning("lease %x expired on the etcd side", self.lease_id)
                        self._on_lost()
                        return
                    await asyncio.sleep(interval)
            except (grpc.aio.AioRpcError, ConnectionError, TimeoutError) as exc:
                log.info("lease %x keepalive failed (%s); retrying", self.lease_id, _describe(exc))
                await asyncio.sleep(1.0)
            finally:
                stream.cancel()
