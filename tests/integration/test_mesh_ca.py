"""The mesh CA for real: `gmesh ca init` and `gmesh ca token` as a user runs them, the signing service
over gRPC with join tokens in etcd, and certificates it issued in a real mutual-TLS handshake."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from gmesh.discovery.keys import MeshKeys
from gmesh.security.ca import Root, cert_pem, key_pem, make_csr, new_key
from gmesh.security.identity import WorkloadIdentity
from gmesh.security.service import CertificateAuthority
from gmesh.security.tokens import create_token, digest, read_bundle
from gmesh.store.etcd import Store
from gmesh.testing.echo import EchoServicer
from gmesh.v1 import ca_pb2, ca_pb2_grpc, echo_pb2, echo_pb2_grpc

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]
TD = "shop.example"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=60)


def test_init_keeps_the_key_in_a_0600_file_and_only_certificates_in_etcd(
    gmesh_env: dict[str, str], tmp_path: Path, etcd_server: Any, mesh_keys: MeshKeys
) -> None:
    directory = tmp_path / "ca"
    done = cli(gmesh_env, "ca", "init", "--trust-domain", TD, "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    key_file = directory / "root.key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    again = cli(gmesh_env, "ca", "init", "--dir", str(directory))
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr
    token = cli(gmesh_env, "ca", "token", "--service", "orders", "--ttl", "10m")
    assert token.returncode == 0 and len(token.stdout.strip()) >= 40
    # every key and value in etcd: no private key anywhere, the token only as a digest
    dump = subprocess.run(
        [str(Path(sys.executable).parent / "python"), "-c", _DUMP, etcd_server.url, mesh_keys.prefix],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "PRIVATE KEY" not in dump and token.stdout.strip() not in dump
    assert "BEGIN CERTIFICATE" in dump and TD in dump


_DUMP = """
import asyncio, sys
from gmesh.store.etcd import EtcdConfig, Store
async def main():
    store = await Store.connect(EtcdConfig.parse(sys.argv[1]))
    kvs, _ = await store.get_prefix(sys.argv[2])
    for kv in kvs:
        print(kv.key, kv.value.decode(errors="replace"))
    await store.close()
asyncio.run(main())
"""


@pytest_asyncio.fixture
async def authority(store: Store, mesh_keys: MeshKeys) -> AsyncIterator[tuple[Root, Any]]:
    from gmesh.security.tokens import TrustBundle, write_bundle

    root = Root.create(TD)
    await write_bundle(store, mesh_keys, TrustBundle(TD, (cert_pem(root.cert).decode(),)))
    server = grpc.aio.server()
    ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(
        CertificateAuthority(root, store, mesh_keys), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield root, ca_pb2_grpc.CertificateAuthorityStub(channel)
    await server.stop(None)


async def sign(stub: Any, csr: bytes, token: str) -> Any:
    return await stub.Sign(ca_pb2.SignRequest(csr=csr, token=token), timeout=10)


async def test_a_token_signs_once_and_refusals_leave_it_usable(
    authority: tuple[Root, Any], store: Store, mesh_keys: MeshKeys
) -> None:
    root, stub = authority
    token = await create_token(store, mesh_keys, "orders", 600)
    # refused CSRs do not spend the token
    for csr, code, words in (
        (b"garbage", grpc.StatusCode.INVALID_ARGUMENT, "not a PEM certificate signing request"),
        (make_csr(new_key(), "payments", TD), grpc.StatusCode.INVALID_ARGUMENT, "this token is for"),
        (b"x" * 20_000, grpc.StatusCode.INVALID_ARGUMENT, "at most"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sign(stub, csr, token)
        assert refused.value.code() == code and words in (refused.value.details() or "")
    key = new_key()
    signed = await sign(stub, make_csr(key, "orders", TD), token)
    assert signed.identity == "spiffe://shop.example/svc/orders"
    from cryptography import x509

    x509.load_pem_x509_certificate(signed.certificate).verify_directly_issued_by(root.cert)
    bundle = await read_bundle(store, mesh_keys)
    assert bundle is not None and signed.roots == bundle.pem()
    # used: refused, and so are unknown tokens and no token at all
    denied, unauthenticated = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
    for bad, code in ((token, denied), ("made-up", denied), ("", unauthenticated)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sign(stub, make_csr(new_key(), "orders", TD), bad)
        assert refused.value.code() == code


async def test_an_expired_token_is_refused(
    authority: tuple[Root, Any], store: Store, mesh_keys: MeshKeys
) -> None:
    _, stub = authority
    token = await create_token(store, mesh_keys, "orders", 1)
    key = mesh_keys.join_token(digest(token))
    deadline = time.monotonic() + 10
    while (found := await store.get(key)) is not None and json.loads(found.value)["expires"] >= time.time():
        assert time.monotonic() < deadline, "the token never expired"
        await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await sign(stub, make_csr(new_key(), "orders", TD), token)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_issued_certificates_make_a_real_mutual_tls_call(
    authority: tuple[Root, Any], store: Store, mesh_keys: MeshKeys
) -> None:
    _, stub = authority
    identities = {}
    for service in ("orders", "payments"):
        key = new_key()
        signed = await sign(
            stub, make_csr(key, service, TD), await create_token(store, mesh_keys, service, 600)
        )
        identities[service] = (key_pem(key), signed.certificate, signed.roots)
    server_key, server_cert, roots = identities["orders"]
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("orders"), server)
    credentials = grpc.ssl_server_credentials([(server_key, server_cert)], roots, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        client_key, client_cert, _ = identities["payments"]
        channel_credentials = grpc.ssl_channel_credentials(roots, client_key, client_cert)
        options = (("grpc.ssl_target_name_override", "orders"),)  # the DNS SAN of the orders leaf
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials, options) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Unary(
                echo_pb2.EchoRequest(message="hi"), timeout=10
            )
        assert reply.server == "orders"
        # a client certificate from another CA: the handshake fails
        other = Root.create("other.example")
        stranger_key = new_key()
        stranger = other.sign(make_csr(stranger_key, "payments", "other.example"), "payments")
        bad = grpc.ssl_channel_credentials(roots, key_pem(stranger_key), cert_pem(stranger))
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", bad, options) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # the client verifies the server: a server name the leaf does not carry is refused
        wrong = (("grpc.ssl_target_name_override", "inventory"),)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials, wrong) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(), timeout=5)
    finally:
        await server.stop(None)


async def test_ca_serve_registers_in_the_mesh_and_signs(
    gmesh_env: dict[str, str], tmp_path: Path, store: Store, mesh_keys: MeshKeys
) -> None:
    directory = tmp_path / "ca"
    assert cli(gmesh_env, "ca", "init", "--trust-domain", TD, "--dir", str(directory)).returncode == 0
    token = cli(gmesh_env, "ca", "token", "--service", "orders").stdout.strip()
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "ca", "serve", "--dir", str(directory), env=gmesh_env, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"gmesh ca serving on" not in (line := await proc.stderr.readline()):
                assert line, "gmesh ca serve exited"
        address = line.decode().split()[4]
        deadline = time.monotonic() + 10
        while not (await store.get_prefix(mesh_keys.endpoints_of("gmesh-ca")))[0]:
            assert time.monotonic() < deadline, "the CA never registered"
            await asyncio.sleep(0.05)
        # the CA serves TLS only: a plaintext client cannot even send a token
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await sign(
                    ca_pb2_grpc.CertificateAuthorityStub(channel), make_csr(new_key(), "orders", TD), token
                )
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        # garbage where a TLS hello should be: the CA goes on serving
        host, port = address.rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\x16\x03\x01\x00\x40" + os.urandom(64) + b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # a workload finds it in the mesh, verifies it with the bundle, spends its join token
        orders = await WorkloadIdentity.start(store, mesh_keys, "orders", token=token)
        assert orders.spiffe_id == f"spiffe://{TD}/svc/orders"
        # the local token file (0600) gets any service a certificate on this machine
        local = directory / "local-token"
        assert stat.S_IMODE(os.stat(local).st_mode) == 0o600
        web = await WorkloadIdentity.start(store, mesh_keys, "web", token_file=local)
        assert web.spiffe_id == f"spiffe://{TD}/svc/web"
        await orders.close()
        await web.close()
        # with certificates issued (and recorded), etcd still holds no private key
        kvs, _ = await store.get_prefix(mesh_keys.prefix)
        assert any(kv.key.startswith(mesh_keys.issued_root) for kv in kvs)
        assert not any(b"PRIVATE KEY" in kv.value for kv in kvs)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
