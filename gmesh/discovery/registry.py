"""Registrations: an endpoint record kept in etcd under a lease for as long as its server lives.

    async with gmesh.register("127.0.0.1:50051", service="orders", labels={"version": "v2"}):
        await server.wait_for_termination()

The record vanishes on exit (lease revoked: watchers see it within a second), on SIGTERM,
and, if the process dies, when the lease expires (TTL, default 10 s). With a health check
the record is withdrawn while the server is not SERVING and comes back when it is.

Leaving is a drain: the record is withdrawn first, then the registration waits
`drain_delay` (default 2 s) before it returns — or, on SIGTERM, before the process ends —
so calls that were already routed here (clients see the withdrawal within milliseconds,
but a call may have picked this endpoint just before) still find the server serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from gmesh.discovery import probe
from gmesh.discovery.endpoint import (
    Endpoint,
    check_grpc_service,
    check_labels,
    check_service_name,
    parse_address,
)
from gmesh.discovery.keys import DEFAULT_PREFIX, MeshKeys
from gmesh.discovery.lease import LeasedKey
from gmesh.errors import InvalidArgument, StoreUnavailable
from gmesh.store.connect import open_store
from gmesh.store.etcd import EtcdConfig, Store

log = logging.getLogger(__name__)

DEFAULT_TTL = 10
MIN_TTL = 2
#: After withdrawing, keep serving this long before stopping (calls already routed here land).
DEFAULT_DRAIN_DELAY = 2.0


class Registration:
    """One endpoint of one service, registered while the context is open. See `register`."""

    def __init__(
        self,
        address: str,
        *,
        service: str,
        labels: Mapping[str, str] | None = None,
        grpc_services: Sequence[str] | None = None,
        zone: str = "",
        weight: int = 1,
        ttl: int = DEFAULT_TTL,
        etcd: str | EtcdConfig | None = None,
        store: Store | None = None,
        prefix: str | None = None,
        reflection: bool = True,
        health_check: bool = False,
        health_service: str = "",
        health_interval: float = 2.0,
        handle_sigterm: bool = True,
        drain_delay: float = DEFAULT_DRAIN_DELAY,
        tls: bool = False,
        tls_address: str | None = None,
        identity: Any = None,
        methods: Mapping[str, Any] | None = None,
    ) -> None:
        parse_address(address)
        if tls_address is not None:
            parse_address(tls_address)
        #: where the endpoint serves mutual TLS ('' = nowhere); `tls=True`: `address` itself
        self.tls_address = tls_address or (address if tls else "")
        #: a `WorkloadIdentity` to probe an mTLS-only address with (reflection, health)
        self._identity = identity
        self.given_methods = dict(methods or {})
        check_service_name(service)
        if ttl < MIN_TTL:
            raise InvalidArgument(f"ttl must be at least {MIN_TTL} seconds, got {ttl}")
        if weight < 0:
            raise InvalidArgument(f"weight must be >= 0, got {weight}")
        if health_interval <= 0:
            raise InvalidArgument("health interval must be positive")
        if drain_delay < 0:
            raise InvalidArgument(f"drain delay must be >= 0 seconds, got {drain_delay}")
        self.drain_delay = drain_delay
        self.address = address
        self.service = service
        self.labels = check_labels(labels or {})
        self.given_services = tuple(check_grpc_service(s) for s in grpc_services or ())
        self.zone, self.weight, self.ttl = zone, weight, ttl
        self.keys = MeshKeys(prefix or os.environ.get("GMESH_PREFIX") or DEFAULT_PREFIX)
        self._etcd, self._store, self._owns_store = etcd, store, store is None
        self._reflection = reflection
        self._health = (health_check, health_service, health_interval)
        self._handle_sigterm = handle_sigterm
        self.endpoint: Endpoint | None = None
        self._leased: LeasedKey | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def key(self) -> str:
        return self.keys.endpoint(self.service, self.address)

    @property
    def store(self) -> Store:
        assert self._store is not None, "registration is not open"
        return self._store

    async def __aenter__(self) -> Registration:
        if self._store is None:
            self._store = await open_store(self._etcd)
        try:
            self.endpoint = await self._describe()
            self._leased = LeasedKey(self.store, self.key, self.ttl)
            await self._leased.open()
            check, _, _ = self._health
            if not check or await self._is_serving():
                await self.publish()
            if check:
                self._spawn(self._health_loop())
            if self._handle_sigterm:
                _SigtermWithdraw.add(self)
        except BaseException:
            await self._close(drain=False)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _describe(self) -> Endpoint:
        services, methods, source = self.given_services, dict(self.given_methods), "given"
        if self._reflection:
            api = await probe.reflect(self.address, secure=self._secure())
            if api is not None and api.services:
                missing = set(self.given_services) - set(api.services)
                if missing:
                    log.warning(
                        "%s does not serve %s (per reflection); using what it serves",
                        self.address,
                        ", ".join(sorted(missing)),
                    )
                services, methods, source = api.services, api.methods, "reflection"
        return Endpoint(
            service=self.service,
            address=self.address,
            labels=MappingProxyType(dict(self.labels)),
            grpc_services=tuple(services),
            methods=MappingProxyType(methods),
            zone=self.zone,
            weight=self.weight,
            grpc_services_from=source,
            registered_at=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
            tls=self.tls_address,
        )

    def _secure(self) -> probe.Secure | None:
        """How to reach `address` when it serves only mTLS (probes present this identity)."""
        if self.tls_address != self.address:
            return None
        if self._identity is None:
            return None
        return (self._identity.channel_credentials(), self.service)

    @property
    def published(self) -> bool:
        return self._leased is not None and self._leased.published

    async def publish(self) -> None:
        """Make the endpoint visible (again)."""
        assert self._leased is not None and self.endpoint is not None
        await self._leased.put(self.endpoint.to_json())

    async def withdraw(self) -> None:
        """Take the endpoint out of discovery but keep the lease (it may come back)."""
        assert self._leased is not None
        await self._leased.withdraw()

    async def update(self, **changes: Any) -> None:
        """Change labels, weight or zone of the live record (e.g. to drain by weight 0)."""
        assert self.endpoint is not None and self._leased is not None
        if "labels" in changes:
            changes["labels"] = MappingProxyType(check_labels(changes["labels"]))
        self.endpoint = replace(self.endpoint, **changes)
        if self._leased.published:
            await self._leased.put(self.endpoint.to_json())

    async def _is_serving(self) -> bool:
        _, service, interval = self._health
        status = await probe.health(
            self.address, service=service, timeout=max(interval, 1.0), secure=self._secure()
        )
        return status == "SERVING"

    async def _health_loop(self) -> None:
        _, _, interval = self._health
        while True:
            await asyncio.sleep(interval)
            serving = await self._is_serving()
            try:
                if serving and not self.published:
                    log.info("%s is SERVING again: publishing", self.address)
                    await self.publish()
                elif not serving and self.published:
                    log.info("%s is not SERVING: withdrawing", self.address)
                    await self.withdraw()
            except StoreUnavailable as exc:
                log.warning("health change of %s not written: %s", self.address, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deregister(self, *, drain: bool = True) -> None:
        """Withdraw now by revoking the lease, then (with `drain`) wait the drain delay while the
        server keeps serving the calls already routed here (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _SigtermWithdraw.remove(self)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        published = self.published
        if self._leased is not None:
            await self._leased.close()
        if drain and published and self.drain_delay > 0:
            log.info("withdrew %s of %s; serving %.1fs more", self.address, self.service, self.drain_delay)
            await asyncio.sleep(self.drain_delay)

    async def _close(self, *, drain: bool = True) -> None:
        await self.deregister(drain=drain)
        if self._owns_store and self._store is not None:
            await self._store.close()
            self._store = None


def register(address: str, *, service: str, **options: Any) -> Registration:
    """Register `address` as an endpoint of `service` for the life of an `async with` block.

    Options: `labels` (dict), `grpc_services` (used when the server offers no reflection),
    `zone`, `weight` (default 1), `ttl` (lease seconds, default 10), `etcd` (URLs; default
    `GMESH_ETCD` or the embedded etcd), `prefix` (mesh key prefix), `health_check` (poll
    `grpc.health.v1` and withdraw while not SERVING), `health_service`, `health_interval`,
    `handle_sigterm` (default True: on SIGTERM, withdraw first, then terminate as before —
    only when the process has no SIGTERM handler of its own), `drain_delay` (seconds to keep
    serving after withdrawing, before the block ends or SIGTERM ends the process; default 2),
    `tls=True` (`address` serves only mutual TLS with this service's mesh certificate: callers
    with an identity dial it with mTLS) or `tls_address` (another address of this server that
    serves mTLS, next to the plaintext `address`: PERMISSIVE), `identity` (the server's
    `WorkloadIdentity`: reflection and health probes of an mTLS-only address present it).
    """
    return Registration(address, service=service, **options)


class _SigtermWithdraw:
    """On SIGTERM, withdraw every open registration, then die of SIGTERM as if unhandled."""

    active: set[Registration] = set()
    installed_on: asyncio.AbstractEventLoop | None = None
    dying: asyncio.Task[None] | None = None  # held so the task is not garbage-collected

    @classmethod
    def add(cls, registration: Registration) -> None:
        cls.active.add(registration)
        loop = asyncio.get_running_loop()
        if cls.installed_on is loop:
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application handles SIGTERM itself; __aexit__ will withdraw
        try:
            loop.add_signal_handler(signal.SIGTERM, cls._on_sigterm)
        except (RuntimeError, ValueError, NotImplementedError):
            return  # not the main thread
        cls.installed_on = loop

    @classmethod
    def remove(cls, registration: Registration) -> None:
        cls.active.discard(registration)

    @classmethod
    def _on_sigterm(cls) -> None:
        loop = asyncio.get_running_loop()

        async def withdraw_all_then_die() -> None:
            registrations = list(cls.active)
            drain = max((r.drain_delay for r in registrations), default=0.0)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3.0 + drain):
                    await asyncio.gather(*(r.deregister() for r in registrations))
            loop.remove_signal_handler(signal.SIGTERM)
            cls.installed_on = None
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        cls.dying = loop.create_task(withdraw_all_then_die())
