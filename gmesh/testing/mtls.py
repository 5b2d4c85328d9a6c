"""A running mesh CA for tests and benches: `gmesh ca init` + `gmesh ca serve` in this process.

async with running_ca(store, keys, lifetime=10) as ca:
    identity = await WorkloadIdentity.start(store, keys, "orders", token=ca.local_token)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc.aio

from gmesh.discovery.registry import Registration
from gmesh.proxy.server import bind
from gmesh.security.ca import Root, cert_pem
from gmesh.security.service import CaLeaf, CertificateAuthority, keep_leaf
from gmesh.security.tokens import TrustBundle, write_bundle
from gmesh.v1 import ca_pb2_grpc

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store


@dataclass
class RunningCa:
    root: Root
    authority: CertificateAuthority
    leaf: CaLeaf
    address: str
    local_token: str
    server: Any
    store: Any = None
    keys: Any = None

    async def rotate(self, *, propagation: float = 2.0) -> Root:
        """What `gmesh ca rotate` does: a new root in the bundle, signing after `propagation`."""
        from gmesh.security import rotation

        new = Root.create(self.root.trust_domain)
        await rotation.begin(self.store, self.keys, new, propagation=propagation)
        self.authority.previous, self.authority.root = self.authority.root, new
        self.root = new
        return new


@contextlib.asynccontextmanager
async def running_ca(
    store: Store,
    keys: MeshKeys,
    *,
    trust_domain: str = "gmesh.local",
    lifetime: float = 24 * 3600,
    root: Root | None = None,
    bundle: tuple[str, ...] | None = None,
    local_token: str | None = None,
) -> AsyncIterator[RunningCa]:
    """A CA signing leaves of `lifetime` seconds, registered as gmesh-ca, with a local token.
    `root` may be an intermediate, with `bundle` the PEM roots above it."""
    root = root or Root.create(trust_domain)
    roots = bundle or (cert_pem(root.cert).decode(),)
    await write_bundle(store, keys, TrustBundle(root.trust_domain, roots))
    token = local_token or secrets.token_urlsafe(16)
    life = datetime.timedelta(seconds=lifetime)
    authority = CertificateAuthority(root, store, keys, lifetime=life, local_token=token)
    server = grpc.aio.server()
    ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(authority, server)
    leaf = CaLeaf(root, max(life, datetime.timedelta(hours=1)))
    address = bind(server, "127.0.0.1:0", credentials=leaf.credentials())
    await server.start()

    renewing = asyncio.get_running_loop().create_task(keep_leaf(authority, leaf))
    registration = Registration(
        address, service="gmesh-ca", grpc_services=["gmesh.v1.CertificateAuthority"], reflection=False,
        store=store, prefix=keys.prefix, tls=True, handle_sigterm=False, drain_delay=0,
    )  # fmt: skip
    try:
        async with registration:
            yield RunningCa(root, authority, leaf, address, token, server, store, keys)
    finally:
        renewing.cancel()
        await server.stop(None)
