"""The CA's gRPC service (`gmesh.v1.CertificateAuthority`): signs CSRs authenticated by join tokens.

A CSR is checked before its token is spent, so a malformed request or one for another identity
leaves the token usable; the token is then spent with one conditional etcd transaction (single
use, even with several CAs). Requests are small: a CSR above `MAX_CSR` bytes is refused unread.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from gmesh.security.ca import (
    DEFAULT_LIFETIME,
    CsrRefused,
    Root,
    cert_pem,
    identity_of,
    parse_csr,
    requested_identity,
    spiffe_id,
)
from gmesh.security.tokens import TokenRefused, check_token, read_bundle, spend
from gmesh.v1 import ca_pb2, ca_pb2_grpc

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store

MAX_CSR = 16 * 1024
SERVICE_NAME = "gmesh.v1.CertificateAuthority"


class CertificateAuthority(ca_pb2_grpc.CertificateAuthorityServicer):  # type: ignore[misc]
    def __init__(
        self, root: Root, store: Store, keys: MeshKeys, *, lifetime: datetime.timedelta = DEFAULT_LIFETIME
    ) -> None:
        self.root, self.store, self.keys, self.lifetime = root, store, keys, lifetime
        self.signed = 0

    async def Sign(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if len(request.csr) > MAX_CSR:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"gmesh ca: CSRs are at most {MAX_CSR} bytes"
            )
        if not request.token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "gmesh ca: a join token is required")
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
        leaf = self.root.sign(request.csr, held.service, lifetime=self.lifetime)
        self.signed += 1
        bundle = await read_bundle(self.store, self.keys)
        roots = bundle.pem() if bundle is not None else cert_pem(self.root.cert)
        return ca_pb2.SignResponse(
            certificate=cert_pem(leaf),
            roots=roots,
            identity=identity_of(leaf) or "",
            expires=leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
