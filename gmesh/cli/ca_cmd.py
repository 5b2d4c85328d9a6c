"""`gmesh ca`: the mesh's certificate authority — create it, make join tokens, serve it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import click

from gmesh.cli.common import DURATION, MeshTarget, mesh_options, run
from gmesh.errors import Conflict, NotFound

ROOT_CERT, ROOT_KEY, SETTINGS, LOCAL_TOKEN = "root.pem", "root.key.pem", "ca.json", "local-token"


def ca_dir(given: str | None) -> Path:
    from gmesh.store.embedded import data_dir

    return Path(given) if given else data_dir() / "ca"


def _write_private(path: Path, data: bytes) -> None:
    """A file only its owner can read, from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def load_root(directory: Path) -> object:
    from gmesh.security.ca import Root

    try:
        settings = json.loads((directory / SETTINGS).read_text())
        return Root.load(
            (directory / ROOT_CERT).read_bytes(), (directory / ROOT_KEY).read_bytes(), settings["trustDomain"]
        )
    except FileNotFoundError:
        raise NotFound(f"no CA in {directory}: run `gmesh ca init` first") from None


@click.group()
def ca() -> None:
    """The mesh's certificate authority: a root (key in a file, never in etcd), join tokens, signing.

    Workloads make their own keys and send CSRs; the CA signs leaves (ECDSA P-256, 24 h) naming
    spiffe://<trust-domain>/svc/<service>. The trust bundle (certificates only) is in etcd.
    """


@ca.command()
@click.option("--trust-domain", default="gmesh.local", show_default=True, help="the SPIFFE trust domain")
@click.option(
    "--dir",
    "directory",
    default=None,
    help="where the root key and certificate go [default: the gmesh data dir]",
)
@click.option(
    "--force", is_flag=True, help="replace an existing CA (every certificate it signed stops verifying)"
)
@mesh_options
def init(target: MeshTarget, trust_domain: str, directory: str | None, force: bool) -> None:
    """Create the root: key and certificate in files (the key 0600), the trust bundle in etcd."""
    from gmesh.security.ca import Root, cert_pem, key_pem
    from gmesh.security.tokens import TrustBundle, write_bundle

    where = ca_dir(directory)
    if (where / ROOT_KEY).exists() and not force:
        raise Conflict(f"a CA exists in {where} already (--force replaces it)")
    root = Root.create(trust_domain)
    where.mkdir(parents=True, exist_ok=True)
    os.chmod(where, 0o700)
    _write_private(where / ROOT_KEY, key_pem(root.key))
    (where / ROOT_CERT).write_bytes(cert_pem(root.cert))
    (where / SETTINGS).write_text(json.dumps({"trustDomain": trust_domain}))
    # The local token: workloads of this user on this machine get certificates with it (no join
    # token needed); it never leaves the machine.
    import secrets

    _write_private(where / LOCAL_TOKEN, secrets.token_urlsafe(32).encode())

    async def go() -> None:
        async with target.store() as store:
            await write_bundle(store, target.keys, TrustBundle(trust_domain, (cert_pem(root.cert).decode(),)))

    run(go())
    click.echo(
        f"CA for trust domain {trust_domain} in {where} (key and local token 0600); "
        "trust bundle written to etcd"
    )


@ca.command()
@click.option("--service", required=True, help="the mesh service the token may get a certificate for")
@click.option("--ttl", type=DURATION, default="1h", show_default=True, help="how long the token is valid")
@mesh_options
def token(target: MeshTarget, service: str, ttl: float) -> None:
    """Print a single-use join token for SERVICE's first certificate (stored hashed, under a lease)."""
    from gmesh.discovery.endpoint import dns_label_problem
    from gmesh.errors import InvalidArgument
    from gmesh.security.tokens import create_token

    problem = dns_label_problem(service)
    if problem:
        raise InvalidArgument(f"--service: {problem}")

    async def go() -> str:
        async with target.store() as store:
            return await create_token(store, target.keys, service, ttl)

    click.echo(run(go()))


@ca.command()
@click.option(
    "--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to serve on (port 0: any free)"
)
@click.option(
    "--dir",
    "directory",
    default=None,
    help="where `gmesh ca init` put the root [default: the gmesh data dir]",
)
@click.option(
    "--lifetime", type=DURATION, default="24h", show_default=True, help="lifetime of the leaves it signs"
)
@click.option(
    "--local-token/--no-local-token",
    default=True,
    show_default=True,
    help="accept the local token file of `gmesh ca init` (workloads of this user on this machine)",
)
@mesh_options
def serve(target: MeshTarget, listen: str, directory: str | None, lifetime: float, local_token: bool) -> None:
    """Serve the CA (gmesh.v1.CertificateAuthority) over TLS, registered in the mesh as service
    gmesh-ca. Workloads verify it with the trust bundle; it signs first certificates for join
    tokens (or the local token) and renewals for the current certificate."""
    import datetime

    import grpc.aio

    from gmesh.discovery.registry import register
    from gmesh.proxy.server import bind
    from gmesh.security.ca import Root
    from gmesh.security.service import SERVICE_NAME, CaLeaf, CertificateAuthority
    from gmesh.store.connect import resolve_etcd
    from gmesh.store.etcd import Store
    from gmesh.v1 import ca_pb2_grpc

    where = ca_dir(directory)
    root = load_root(where)
    assert isinstance(root, Root)
    token = None
    if local_token:
        with contextlib.suppress(OSError):
            token = (where / LOCAL_TOKEN).read_text().strip() or None

    async def go() -> None:
        config = await resolve_etcd(target.etcd, **target.options)
        store = await Store.connect(config)
        server = grpc.aio.server()
        life = datetime.timedelta(seconds=lifetime)
        authority = CertificateAuthority(root, store, target.keys, lifetime=life, local_token=token)
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(authority, server)
        leaf = CaLeaf(root, life)
        address = bind(server, listen, credentials=leaf.credentials())
        await server.start()

        async def renew_own_leaf() -> None:
            while True:
                await asyncio.sleep(max(leaf.renew_at - time.time(), 0.5))
                leaf.refresh()

        renewing = asyncio.get_running_loop().create_task(renew_own_leaf())
        try:
            async with register(
                address, service="gmesh-ca", grpc_services=[SERVICE_NAME], reflection=False, etcd=config,
                prefix=target.keys.prefix, tls=True,
            ):  # fmt: skip
                click.echo(f"gmesh ca serving on {address} (trust domain {root.trust_domain})", err=True)
                await server.wait_for_termination()
        finally:
            renewing.cancel()
            await server.stop(1)
            await store.close()

    run(go())
