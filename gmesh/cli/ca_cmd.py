"""`gmesh ca`: the mesh's certificate authority — create it, make join tokens, serve it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

import click

from gmesh.cli.common import DURATION, MeshTarget, mesh_options, run
from gmesh.errors import Conflict, NotFound

ROOT_CERT, ROOT_KEY, SETTINGS, LOCAL_TOKEN = "root.pem", "root.key.pem", "ca.json", "local-token"
PREVIOUS_CERT, PREVIOUS_KEY = "previous-root.pem", "previous-root.key.pem"


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


def load_previous(directory: Path, trust_domain: str) -> object:
    """The root being rotated out (None when no rotation is under way)."""
    from gmesh.security.ca import Root

    try:
        return Root.load(
            (directory / PREVIOUS_CERT).read_bytes(), (directory / PREVIOUS_KEY).read_bytes(), trust_domain
        )
    except FileNotFoundError:
        return None


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
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="use this CA certificate (an intermediate your own root signed) instead of making a root",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="its ECDSA key (PEM)",
)
@click.option(
    "--bundle",
    "bundle_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="with --cert: the root certificate(s) above it, PEM (what every workload trusts)",
)
@mesh_options
def init(
    target: MeshTarget,
    trust_domain: str,
    directory: str | None,
    force: bool,
    cert_file: str | None,
    key_file: str | None,
    bundle_file: str | None,
) -> None:
    """Create the root: key and certificate in files (the key 0600), the trust bundle in etcd.

    With --cert/--key/--bundle, gmesh's CA is an intermediate of your own root instead: it signs
    leaves with that key, sends its certificate with every leaf, and workloads trust --bundle."""
    from gmesh.errors import InvalidArgument
    from gmesh.security.ca import Root, cert_pem, key_pem
    from gmesh.security.tokens import TrustBundle, write_bundle

    where = ca_dir(directory)
    if (where / ROOT_KEY).exists() and not force:
        raise Conflict(f"a CA exists in {where} already (--force replaces it)")
    external = cert_file is not None or key_file is not None
    roots: tuple[str, ...] = ()
    if external:
        if not (cert_file and key_file):
            raise InvalidArgument("--cert and --key go together")
        root = Root.load(Path(cert_file).read_bytes(), Path(key_file).read_bytes(), trust_domain)
        if root.intermediate and not bundle_file:
            raise InvalidArgument("--cert is an intermediate: give the root(s) above it with --bundle")
        if bundle_file:
            from cryptography import x509

            try:
                certs = x509.load_pem_x509_certificates(Path(bundle_file).read_bytes())
            except ValueError as exc:
                raise InvalidArgument(f"--bundle: not PEM certificates: {exc}") from None
            roots = tuple(cert_pem(c).decode() for c in certs)
    else:
        root = Root.create(trust_domain)
    where.mkdir(parents=True, exist_ok=True)
    os.chmod(where, 0o700)
    _write_private(where / ROOT_KEY, key_pem(root.key))
    (where / ROOT_CERT).write_bytes(cert_pem(root.cert))
    (where / SETTINGS).write_text(json.dumps({"trustDomain": trust_domain, "external": external}))
    # The local token: workloads of this user on this machine get certificates with it (no join
    # token needed); it never leaves the machine.
    import secrets

    _write_private(where / LOCAL_TOKEN, secrets.token_urlsafe(32).encode())

    async def go() -> None:
        async with target.store() as store:
            await write_bundle(
                store, target.keys, TrustBundle(trust_domain, roots or (cert_pem(root.cert).decode(),))
            )

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
    "--dir",
    "directory",
    default=None,
    help="where `gmesh ca init` put the root [default: the gmesh data dir]",
)
@click.option(
    "--propagation",
    type=DURATION,
    default="10s",
    show_default=True,
    help="how long every process gets to trust the new root before the CA signs with it",
)
@click.option(
    "--finish",
    is_flag=True,
    help="take the old root out of the bundle (refused while certificates it signed are valid)",
)
@click.option("--force", is_flag=True, help="with --finish: even though live certificates break")
@mesh_options
def rotate(target: MeshTarget, directory: str | None, propagation: float, finish: bool, force: bool) -> None:
    """Rotate the root: a new root joins the trust bundle and signs after --propagation; the old
    root leaves with --finish once no certificate it signed is still valid."""
    from gmesh.security import rotation
    from gmesh.security.ca import Root, cert_pem, key_pem

    where = ca_dir(directory)
    current = load_root(where)
    assert isinstance(current, Root)
    if json.loads((where / SETTINGS).read_text()).get("external"):
        raise Conflict(
            "this CA is an intermediate of your own root: replace it with a new intermediate from that "
            "root (`gmesh ca init --force --cert ... --key ... --bundle ...`: leaves of the old one keep "
            "verifying against the same bundle); gmesh rotates only roots it made"
        )

    async def go() -> str:
        async with target.store() as store:
            if finish:
                await rotation.finish(store, target.keys, force=force)
                for name in (PREVIOUS_KEY, PREVIOUS_CERT):
                    with contextlib.suppress(FileNotFoundError):
                        (where / name).unlink()
                return "old root removed from the trust bundle (and its key from disk)"
            new = Root.create(current.trust_domain)
            bundle = await rotation.begin(store, target.keys, new, propagation=propagation)
            # files: the current root becomes the previous one; the new one is the root
            _write_private(where / PREVIOUS_KEY, key_pem(current.key))
            (where / PREVIOUS_CERT).write_bytes(cert_pem(current.cert))
            _write_private(where / ROOT_KEY, key_pem(new.key))
            (where / ROOT_CERT).write_bytes(cert_pem(new.cert))
            return (
                f"new root in the trust bundle ({len(bundle.roots)} roots); the CA signs with it in "
                f"{propagation:.0f}s. Run `gmesh ca rotate --finish` once the old root's certificates "
                "have expired (`gmesh ca status` shows them)"
            )

    click.echo(run(go()))


@ca.command()
@mesh_options
def status(target: MeshTarget) -> None:
    """The roots of the trust bundle (expiry, rotation) and the live certificates the CA issued."""
    import datetime
    import time as clock

    from gmesh.cli.common import table
    from gmesh.security import rotation
    from gmesh.security.identity import root_id
    from gmesh.security.tokens import read_bundle

    async def go() -> tuple[object, list[rotation.Issued]]:
        async with target.store() as store:
            return await read_bundle(store, target.keys), await rotation.issued(store, target.keys)

    bundle, live = run(go())
    if bundle is None:
        raise NotFound("this mesh has no CA: run `gmesh ca init`")
    from gmesh.security.tokens import TrustBundle

    assert isinstance(bundle, TrustBundle)
    now = clock.time()

    def when(ts: float) -> str:
        return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    rows = []
    for index, cert in enumerate(rotation.roots_of(bundle)):
        rid = root_id(cert)
        role = "current" if index == 0 else "old (rotating out)"
        if index == 0 and bundle.rotating and now < bundle.signs_from:
            role = f"new (signs in {bundle.signs_from - now:.0f}s)"
        left = cert.not_valid_after_utc.timestamp() - now
        warn = "  EXPIRES SOON" if left < 30 * 86400 else ""
        rows.append([rid[:16], role, when(cert.not_valid_after_utc.timestamp()) + warn,
                     str(sum(1 for i in live if i.issuer == rid))])  # fmt: skip
    click.echo(f"trust domain {bundle.trust_domain}")
    click.echo(table(["ROOT", "ROLE", "EXPIRES", "LIVE CERTS"], rows))
    by_service: dict[str, list[rotation.Issued]] = {}
    for item in live:
        by_service.setdefault(item.service, []).append(item)
    click.echo("")
    click.echo(
        table(
            ["SERVICE", "LIVE CERTS", "NEXT EXPIRY", "LAST EXPIRY"],
            [
                [
                    name,
                    str(len(items)),
                    when(min(i.not_after for i in items)),
                    when(max(i.not_after for i in items)),
                ]
                for name, items in sorted(by_service.items())
            ],
        )
    )


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
    from gmesh.security.service import SERVICE_NAME, CaLeaf, CertificateAuthority, keep_leaf
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

        authority.previous = load_previous(where, root.trust_domain)  # type: ignore[assignment]
        seen = [(where / ROOT_CERT).stat().st_mtime]

        def reload() -> None:
            with contextlib.suppress(OSError):
                mtime = (where / ROOT_CERT).stat().st_mtime
                if mtime != seen[0]:
                    seen[0] = mtime
                    authority.root = load_root(where)  # type: ignore[assignment]
                    authority.previous = load_previous(where, root.trust_domain)  # type: ignore[assignment]
                    click.echo(
                        "gmesh ca: root rotated; the new root signs once every process trusts it", err=True
                    )

        renewing = asyncio.get_running_loop().create_task(keep_leaf(authority, leaf, reload=reload))
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
