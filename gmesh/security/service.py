"""The CA's gRPC service (`gmesh.v1.CertificateAuthority`): signs CSRs authenticated by a join
token (first certificate) or by the current certificate (renewal).

A CSR is checked before its token is spent, so a malformed request or one for another identity
leaves the token usable; the token is then spent with one conditional etcd transaction (single
use, even with several CAs). The local token (`gmesh ca init` writes it to a 0600 file next to
the root key, for one machine) is not spent: whoever can read that file is trusted like the CA's
own user. A renewal carries the current leaf, which must be valid now and directly signed by a
root of the trust bundle, and the CSR signed again with that leaf's key (proof of possession);
the new leaf names the same identity. Requests are small: above `MAX_CSR` bytes, refused unread.

The CA serves TLS with a leaf of its own (`CaLeaf`, service `gmesh-ca`) that workloads verify
with the trust bundle, so a token never crosses the network in the clear.
"""

from __future__ import annotations

import contextlib
import datetime
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gmesh.security.ca import (
    DEFAULT_LIFETIME,
    CsrRefused,
    Root,
    cert_pem,
    identity_of,
    key_pem,
    make_csr,
    new_key,
    parse_csr,
    requested_identity,
    spiffe_id,
)
from gmesh.security.tokens import TokenRefused, TrustBundle, check_token, read_bundle, spend
from gmesh.v1 import ca_pb2, ca_pb2_grpc

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store

log = logging.getLogger(__name__)

MAX_CSR = 16 * 1024
#: `gmesh ca serve` warns (daily) when its root expires within this many seconds
ROOT_WARNING = 30 * 86400
SERVICE_NAME = "gmesh.v1.CertificateAuthority"
CA_SERVICE = "gmesh-ca"


class RenewalRefused(Exception):
    pass


class CertificateAuthority(ca_pb2_grpc.CertificateAuthorityServicer):  # type: ignore[misc]
    def __init__(
        self,
        root: Root,
        store: Store,
        keys: MeshKeys,
        *,
        lifetime: datetime.timedelta = DEFAULT_LIFETIME,
        local_token: str | None = None,
    ) -> None:
        self.root, self.store, self.keys, self.lifetime = root, store, keys, lifetime
        #: during a root rotation: the root that signs until the bundle's `signs_from`
        self.previous: Root | None = None
        self.local_token = local_token
        self.signed = 0
        self.renewed = 0

    async def Sign(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if len(request.csr) > MAX_CSR or len(request.certificate) > MAX_CSR or len(request.proof) > 1024:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"gmesh ca: CSRs and certificates are at most {MAX_CSR} bytes",
            )
        if request.certificate:
            try:
                service = await self._renewal(request)
            except RenewalRefused as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"gmesh ca: renewal refused: {exc}")
            except CsrRefused as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gmesh ca: {exc}")
            self.renewed += 1
            return await self._issue(request.csr, service)
        if not request.token:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "gmesh ca: a join token (first certificate) or the current certificate (renewal) is required",
            )
        if self.local_token is not None and hmac.compare_digest(
            request.token.encode(), self.local_token.encode()
        ):
            try:
                csr = parse_csr(request.csr)
                service = _service_of(requested_identity(csr) or "", self.root.trust_domain)
            except CsrRefused as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gmesh ca: {exc}")
            return await self._issue(request.csr, service)
        try:
            held = await check_token(self.store, self.keys, request.token)
            # the CSR first: a malformed one, or one for another identity, leaves the token usable
            csr = parse_csr(request.csr)
            asked = requested_identity(csr)
            want = spiffe_id(self.root.trust_domain, held.service)
            if asked is not None and asked not in (want, held.service):
                raise CsrRefused(f"the CSR asks for {asked!r}, but this token is for {want}")
            await spend(self.store, held)
        except TokenRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"gmesh ca: {exc}")
        except CsrRefused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gmesh ca: {exc}")
        return await self._issue(request.csr, held.service)

    async def _renewal(self, request: Any) -> str:
        """The service a renewal is for, once its certificate and proof check out."""
        try:
            current = x509.load_pem_x509_certificate(request.certificate)
        except ValueError:
            raise RenewalRefused("the current certificate is not a PEM certificate") from None
        now = time.time()
        if not current.not_valid_before_utc.timestamp() <= now <= current.not_valid_after_utc.timestamp():
            raise RenewalRefused("the current certificate is not valid now (expired?): use a join token")
        bundle = await read_bundle(self.store, self.keys)
        roots = [x509.load_pem_x509_certificate(r.encode()) for r in bundle.roots] if bundle else []
        # signed by a root of the bundle, or by this CA itself (an intermediate under the bundle)
        roots += [r.cert for r in (self.root, self.previous) if r is not None]
        if not any(_issued_by(current, root) for root in roots):
            raise RenewalRefused("the current certificate is not signed by a root of this mesh")
        identity = identity_of(current) or ""
        service = _service_of(identity, self.root.trust_domain, refuse=RenewalRefused)
        public = current.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise RenewalRefused("the current certificate's key is not ECDSA")
        try:
            public.verify(request.proof, request.csr, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise RenewalRefused(
                "the proof is not the CSR signed with the current certificate's key"
            ) from None
        csr = parse_csr(request.csr)
        asked = requested_identity(csr)
        if asked is not None and asked not in (identity, service):
            raise CsrRefused(f"the CSR asks for {asked!r}, but the current certificate is {identity}")
        return service

    def signer(self, bundle: TrustBundle | None) -> Root:
        """The root that signs now: the previous one until every process trusts the new one."""
        if (
            self.previous is not None
            and bundle is not None
            and bundle.rotating
            and time.time() < bundle.signs_from
        ):
            return self.previous
        return self.root

    async def _issue(self, csr: bytes, service: str) -> Any:
        bundle = await read_bundle(self.store, self.keys)
        signer = self.signer(bundle)
        leaf = signer.sign(csr, service, lifetime=self.lifetime)
        self.signed += 1
        await self._record(leaf, service, signer)
        roots = bundle.pem() if bundle is not None else cert_pem(self.root.cert)
        return ca_pb2.SignResponse(
            certificate=signer.chain_pem(leaf),
            roots=roots,
            identity=identity_of(leaf) or "",
            expires=leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    async def _record(self, leaf: x509.Certificate, service: str, signer: Root) -> None:
        """Note the leaf in etcd until it expires (`gmesh ca status`, `gmesh ca rotate --finish`)."""
        from gmesh.errors import GmeshError
        from gmesh.security.identity import root_id

        not_after = leaf.not_valid_after_utc.timestamp()
        record = {
            "service": service,
            "identity": identity_of(leaf),
            "issuer": root_id(signer.cert),
            "notAfter": not_after,
            "signedAt": time.time(),
        }
        try:
            lease = await self.store.grant_lease(max(int(not_after - time.time()) + 2, 2))
            await self.store.put(
                self.keys.issued(format(leaf.serial_number, "x")), json.dumps(record).encode(), lease=lease
            )
        except GmeshError as exc:  # the leaf is signed; only the bookkeeping is missing
            log.warning("issued certificate of %s not recorded: %s", service, exc)


def _issued_by(cert: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _service_of(identity: str, trust_domain: str, refuse: type[Exception] = CsrRefused) -> str:
    from gmesh.discovery.endpoint import dns_label_problem

    prefix = f"spiffe://{trust_domain}/svc/"
    service = identity[len(prefix) :] if identity.startswith(prefix) else ""
    if not service or dns_label_problem(service):
        raise refuse(f"{identity!r} is not an identity of this mesh ({prefix}<service>)")
    return service


class CaLeaf:
    """The CA's own serving certificate (identity gmesh-ca), signed by its root, renewed at 2/3."""

    def __init__(self, root: Root, lifetime: datetime.timedelta) -> None:
        self.root, self.lifetime = root, lifetime
        self.version = 0
        self.not_after = 0.0
        self.renew_at = 0.0
        self.config: Any = None
        self.refresh()

    def refresh(self, roots_pem: bytes | None = None) -> None:
        key = new_key()
        leaf = self.root.sign(
            make_csr(key, CA_SERVICE, self.root.trust_domain), CA_SERVICE, lifetime=self.lifetime
        )
        now = time.time()
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self.renew_at = now + (self.not_after - now) * 2 / 3
        self.config = grpc.ssl_server_certificate_configuration(
            [(key_pem(key), self.root.chain_pem(leaf))], roots_pem or cert_pem(self.root.cert)
        )
        self.version += 1

    def credentials(self) -> grpc.ServerCredentials:
        seen = [self.version]

        def fetch() -> Any:
            if self.version == seen[0]:
                return None
            seen[0] = self.version
            return self.config

        return grpc.dynamic_ssl_server_credentials(self.config, fetch, require_client_authentication=False)


async def keep_leaf(
    authority: CertificateAuthority, leaf: CaLeaf, *, reload: Callable[[], None] | None = None
) -> None:
    """Every second: `reload` (take up a rotated root), then keep the CA's own serving leaf signed
    by whichever root signs now, renewed at 2/3 of its lifetime."""
    import asyncio

    from gmesh.errors import GmeshError

    warned = 0.0
    while True:
        await asyncio.sleep(1.0)
        if reload is not None:
            reload()
        left = authority.root.cert.not_valid_after_utc.timestamp() - time.time()
        if left < ROOT_WARNING and time.time() - warned > 86400:
            warned = time.time()
            log.warning(
                "the mesh's root expires in %.0f days: rotate it (`gmesh ca rotate`) before it does",
                left / 86400,
            )
        bundle = None
        with contextlib.suppress(GmeshError):
            bundle = await read_bundle(authority.store, authority.keys)
        signer = authority.signer(bundle)
        if leaf.root is not signer or time.time() >= leaf.renew_at:
            leaf.root = signer
            leaf.refresh()
