"""Workload identity: this process's certificate for one mesh service, kept fresh.

    identity = await WorkloadIdentity.start(store, keys, "orders")   # first CSR: a join token
    server.add_secure_port(addr, identity.server_credentials())      # rotates by itself
    channel = grpc.aio.secure_channel(addr, identity.channel_credentials(), ...)

The key is made here and never leaves the process; the CA (`gmesh ca serve`, found in the
mesh as service `gmesh-ca`, reached over TLS verified with the trust bundle from etcd) gets a
CSR. The first one is authenticated by a join token (`token=`, GMESH_JOIN_TOKEN, or the local
token file of `gmesh ca init` on a single machine); renewals by the current certificate: the
CSR is signed again with the current key as proof. A leaf is renewed at 2/3 of its lifetime
(with a little jitter, so a fleet started together does not renew together). While the CA is
unreachable the current certificate stays in use (retried with backoff, said in the log and
in `describe()`); once it has expired, peers refuse it, and the log says that too.

The trust bundle is watched in etcd: a new root is trusted as soon as it joins the bundle.
Whoever holds credentials hears of every change through `on_change` (servers need not:
`server_credentials()` is dynamic, its fetcher an in-memory lookup per handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gmesh.errors import GmeshError, InvalidArgument, StoreUnavailable

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.security.tokens import TrustBundle
    from gmesh.store.etcd import Store

log = logging.getLogger(__name__)

CA_SERVICE = "gmesh-ca"
TOKEN_ENV = "GMESH_JOIN_TOKEN"
LOCAL_TOKEN = "local-token"
#: renew at this share of the leaf's remaining lifetime at receipt, +- JITTER of the lifetime
RENEW_AT = 2 / 3
JITTER = 0.05
#: the CA's answer must come within this (per CA endpoint tried)
SIGN_TIMEOUT = 5.0
RETRY_MIN, RETRY_MAX = 0.5, 30.0


class IdentityError(GmeshError):
    """No certificate could be had (no CA, no token, refused)."""


class _Unreachable(GmeshError):
    """No CA to ask right now (retried)."""


def local_token_file() -> Path:
    from gmesh.store.embedded import data_dir

    return data_dir() / "ca" / LOCAL_TOKEN


def read_local_token(path: Path | None = None) -> str | None:
    """The local token, if this user can read it (single-machine setups)."""
    try:
        return (path or local_token_file()).read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class Material:
    """One certificate with its key and the roots it is verified against. Immutable."""

    service: str
    identity: str
    key_pem: bytes
    cert_pem: bytes
    roots_pem: bytes
    not_after: float
    received: float
    serial: int
    issuer: str
    version: int
    #: built on first use; never copied by `dataclasses.replace` (init=False)
    _credentials: list[Any] = field(default_factory=list, init=False, compare=False, repr=False)

    @property
    def server_config(self) -> Any:
        if not self._credentials:
            self._build()
        return self._credentials[0]

    @property
    def channel_credentials(self) -> grpc.ChannelCredentials:
        if not self._credentials:
            self._build()
        creds: grpc.ChannelCredentials = self._credentials[1]
        return creds

    def _build(self) -> None:
        self._credentials[:] = [
            grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)], self.roots_pem),
            grpc.ssl_channel_credentials(self.roots_pem, self.key_pem, self.cert_pem),
        ]

    def renew_at(self, jitter: float = 0.0) -> float:
        """Wall-clock time to renew: 2/3 into the lifetime left when it was received."""
        life = max(self.not_after - self.received, 0.0)
        return self.received + life * (RENEW_AT + jitter)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()[:16]


def issuer_id(cert: x509.Certificate) -> str:
    """Identifies the root that signed `cert` (its authority key id, hex), '' when absent."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return ""
    return (aki.key_identifier or b"").hex()


def root_id(cert: x509.Certificate) -> str:
    """A root's subject key id, hex (what its leaves name as authority key id)."""
    try:
        return str(cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex())
    except x509.ExtensionNotFound:
        return _fingerprint(cert)


class WorkloadIdentity:
    """A certificate for `service`, fetched at `start()` and renewed until `close()`."""

    def __init__(
        self,
        store: Store,
        keys: MeshKeys,
        service: str,
        *,
        token: str | None = None,
        token_file: Path | None = None,
    ) -> None:
        from gmesh.discovery.endpoint import check_service_name

        self.store, self.keys, self.service = store, keys, check_service_name(service)
        self._token = token or os.environ.get(TOKEN_ENV) or None
        self._token_file = token_file
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._material: Material | None = None
        self._bundle: TrustBundle | None = None
        self._ca_addresses: list[str] = []
        self._listeners: list[Callable[[Material], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._version = 0
        self._renewed = asyncio.Event()
        self.renewals = 0
        self.failures = 0
        #: why the last renewal failed ('' when the last one worked)
        self.last_error = ""
        self.stale_since: float | None = None
        self.next_renewal = 0.0
        self.users = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def start(
        cls, store: Store, keys: MeshKeys, service: str, *, timeout: float = 15.0, **options: Any
    ) -> WorkloadIdentity:
        """A running identity: its first certificate in hand (or `IdentityError` after `timeout`)."""
        identity = cls(store, keys, service, **options)
        await identity.open(timeout=timeout)
        return identity

    async def open(self, *, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        delay = RETRY_MIN
        while True:
            try:
                await self._obtain(first=True)
                break
            except IdentityError:
                raise
            except (_Unreachable, StoreUnavailable, OSError, grpc.aio.AioRpcError) as exc:
                self.last_error = _why(exc)
                if time.monotonic() + delay > deadline:
                    raise IdentityError(
                        f"no certificate for {self.service}: the CA could not be reached "
                        f"({self.last_error}); is `gmesh ca serve` running?"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._renew_loop(), name=f"gmesh-identity {self.service}"),
            loop.create_task(self._watch_bundle(), name=f"gmesh-bundle {self.service}"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # -- reading -----------------------------------------------------------------------------

    @property
    def material(self) -> Material:
        assert self._material is not None, "identity not started"
        return self._material

    @property
    def spiffe_id(self) -> str:
        return self.material.identity

    def on_change(self, listener: Callable[[Material], None]) -> Callable[[], None]:
        """Call `listener(material)` after each new certificate or trust bundle."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials with the current certificate (grpc cannot rotate these: rebuild
        channels on `on_change`, as gmesh's endpoint pools do)."""
        return self.material.channel_credentials

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Server credentials that follow every renewal and bundle change (grpc's dynamic
        credentials: the fetcher runs before each handshake and only compares a number)."""
        seen = [self.material.version]

        def fetch() -> Any:
            material = self._material
            if material is None or material.version == seen[0]:
                return None
            seen[0] = material.version
            return material.server_config

        return grpc.dynamic_ssl_server_credentials(
            self.material.server_config, fetch, require_client_authentication=require_client_auth
        )

    def describe(self) -> dict[str, Any]:
        material = self._material
        now = time.time()
        out: dict[str, Any] = {"service": self.service}
        if material is not None:
            out.update(
                identity=material.identity,
                serial=format(material.serial, "x"),
                issuer=material.issuer,
                expires=_iso(material.not_after),
                expiresInSeconds=round(material.not_after - now, 1),
                renewsInSeconds=round(max(self.next_renewal - now, 0.0), 1),
                roots=(self._bundle.roots.__len__() if self._bundle else None),
            )
        out["renewals"], out["failures"] = self.renewals, self.failures
        if self.stale_since is not None:
            out["state"] = (
                f"CA unreachable since {_iso(self.stale_since)}: serving on the current certificate"
                if material is None or material.not_after > now
                else "EXPIRED: peers refuse this certificate until the CA can be reached"
            )
            out["lastError"] = self.last_error
        else:
            out["state"] = "fresh"
        return out

    async def wait_renewed(self, timeout: float) -> None:
        """Until the next renewal (tests and benches)."""
        self._renewed.clear()
        await asyncio.wait_for(self._renewed.wait(), timeout)

    # -- obtaining ---------------------------------------------------------------------------

    async def _obtain(self, *, first: bool) -> None:
        from gmesh.security.ca import make_csr, new_key

        bundle = await self._read_bundle()
        key = new_key()
        csr = make_csr(key, self.service, bundle.trust_domain)
        request: dict[str, Any] = {"csr": csr}
        current = self._material
        if current is not None and current.not_after > time.time() and self._key is not None:
            request["certificate"] = current.cert_pem
            request["proof"] = self._key.sign(csr, ec.ECDSA(hashes.SHA256()))
        else:
            token = self._token or read_local_token(self._token_file)
            if not token:
                raise IdentityError(
                    f"no certificate for {self.service}: give a join token (`gmesh ca token --service "
                    f"{self.service}`) as token= or {TOKEN_ENV}, or run on the CA's machine (local token)"
                )
            request["token"] = token
        response = await self._sign(request, bundle)
        leaf = x509.load_pem_x509_certificate(response.certificate)
        self._key = key
        self._version += 1
        self._install(
            Material(
                service=self.service,
                identity=response.identity,
                key_pem=_key_pem(key),
                cert_pem=bytes(response.certificate),
                roots_pem=bytes(response.roots) or bundle.pem(),
                not_after=leaf.not_valid_after_utc.timestamp(),
                received=time.time(),
                serial=leaf.serial_number,
                issuer=issuer_id(leaf),
                version=self._version,
            )
        )
        if not first:
            self.renewals += 1
            log.info(
                "renewed the certificate of %s (expires %s)", self.service, _iso(self.material.not_after)
            )

    def _install(self, material: Material) -> None:
        self._material = material
        for listener in list(self._listeners):
            try:
                listener(material)
            except Exception:
                log.exception("identity listener %r failed", listener)

    async def _read_bundle(self) -> TrustBundle:
        from gmesh.security.tokens import read_bundle

        try:
            bundle = await read_bundle(self.store, self.keys)
        except GmeshError:
            if self._bundle is None:
                raise
            return self._bundle  # etcd down: the last bundle seen
        if bundle is None:
            raise IdentityError("this mesh has no CA: run `gmesh ca init` (and `gmesh ca serve`)")
        self._bundle = bundle
        return bundle

    async def _ca_endpoints(self) -> list[str]:
        from gmesh.discovery.endpoint import Endpoint

        try:
            kvs, _ = await self.store.get_prefix(self.keys.endpoints_of(CA_SERVICE))
        except GmeshError:
            return self._ca_addresses  # etcd down: the CAs seen last
        found = []
        for kv in kvs:
            with contextlib.suppress(ValueError):
                endpoint = Endpoint.from_json(CA_SERVICE, kv.value)
                found.append(endpoint.tls or endpoint.address)
        random.shuffle(found)
        self._ca_addresses = found
        return found

    async def _sign(self, request: dict[str, Any], bundle: TrustBundle) -> Any:
        from gmesh.v1 import ca_pb2, ca_pb2_grpc

        addresses = await self._ca_endpoints()
        if not addresses:
            raise _Unreachable("no CA endpoint in the mesh (service gmesh-ca)")
        last: BaseException | None = None
        for address in addresses:
            channel = grpc.aio.secure_channel(
                address,
                grpc.ssl_channel_credentials(bundle.pem()),
                [("grpc.ssl_target_name_override", CA_SERVICE), ("grpc.enable_retries", 0)],
            )
            try:
                stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
                return await stub.Sign(ca_pb2.SignRequest(**request), timeout=SIGN_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    raise IdentityError(
                        f"the CA refused a certificate for {self.service}: {exc.details()}"
                    ) from None
                last = exc
            finally:
                await channel.close()
        assert last is not None
        raise last

    # -- keeping it fresh -------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        delay = RETRY_MIN
        while True:
            self.next_renewal = self.material.renew_at(random.uniform(-JITTER, JITTER))
            await asyncio.sleep(max(self.next_renewal - time.time(), 0.0))
            while True:
                try:
                    await self._obtain(first=False)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failures += 1
                    self.last_error = _why(exc)
                    if self.stale_since is None:
                        self.stale_since = time.time()
                    left = self.material.not_after - time.time()
                    if left > 0:
                        log.warning(
                            "cannot renew the certificate of %s (%s); serving on the current one, "
                            "valid %.0fs more",
                            self.service, self.last_error, left,
                        )  # fmt: skip
                    else:
                        log.error(
                            "the certificate of %s EXPIRED %.0fs ago and cannot be renewed (%s): "
                            "peers refuse it",
                            self.service, -left, self.last_error,
                        )  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    if left > 0:  # never sleep past a good share of what is left
                        delay = min(delay, max(left / 4, RETRY_MIN))
                    continue
                delay = RETRY_MIN
                if self.stale_since is not None:
                    log.info("the CA answers again: %s has a new certificate", self.service)
                self.stale_since, self.last_error = None, ""
                self._renewed.set()
                break

    async def _watch_bundle(self) -> None:
        from gmesh.security.tokens import parse_bundle
        from gmesh.store.etcd import Resync, WatchBatch

        key = self.keys.trust_bundle
        async for item in self.store.watch(key, key + "\0"):
            raws: list[bytes] = []
            if isinstance(item, Resync):
                raws = [kv.value for kv in item.kvs]
            elif isinstance(item, WatchBatch):
                raws = [e.kv.value for e in item.events if e.kv.value]
            for raw in raws[-1:]:
                try:
                    bundle = parse_bundle(raw)
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a malformed trust bundle in etcd")
                    continue
                self._bundle = bundle
                material = self._material
                if material is not None and bundle.pem() != material.roots_pem:
                    log.info("trust bundle of %s now has %d roots", self.service, len(bundle.roots))
                    self._version += 1
                    self._install(
                        dataclasses.replace(material, roots_pem=bundle.pem(), version=self._version)
                    )


_FIELDS = (
    "service",
    "identity",
    "key_pem",
    "cert_pem",
    "roots_pem",
    "not_after",
    "received",
    "serial",
    "issuer",
)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from gmesh.security.ca import key_pem

    return key_pem(key)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- one per process


_IDENTITIES: dict[tuple[int, str, str, str], WorkloadIdentity] = {}
_LOCK: dict[tuple[int, str, str, str], asyncio.Lock] = {}


async def acquire(
    store: Store, keys: MeshKeys, service: str, *, mesh: str = "", **options: Any
) -> WorkloadIdentity:
    """The identity of `service` in this process and mesh, started if new (shared; give it back
    with `release`). `mesh` names the etcd the store talks to."""
    key = (id(asyncio.get_running_loop()), mesh, keys.prefix, service)
    lock = _LOCK.setdefault(key, asyncio.Lock())
    async with lock:
        identity = _IDENTITIES.get(key)
        if identity is None:
            identity = await WorkloadIdentity.start(store, keys, service, **options)
            _IDENTITIES[key] = identity
        identity.users += 1
        return identity


async def release(identity: WorkloadIdentity) -> None:
    identity.users -= 1
    if identity.users > 0:
        return
    for key, value in list(_IDENTITIES.items()):
        if value is identity:
            del _IDENTITIES[key]
            _LOCK.pop(key, None)
    await identity.close()


def check_identity_service(service: str) -> str:
    from gmesh.discovery.endpoint import dns_label_problem

    problem = dns_label_problem(service)
    if problem:
        raise InvalidArgument(f"identity: {problem}")
    return service
