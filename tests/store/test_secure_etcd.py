"""The Store against a production-style etcd: mutual TLS, and user/password auth with expiring tokens."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gmesh.errors import StoreUnavailable
from gmesh.store.embedded import etcd_binary
from gmesh.store.etcd import EtcdConfig, Resync, Store, WatchBatch
from gmesh.testing.certs import TlsFiles, write_test_pki
from gmesh.testing.etcd import EtcdMember, single_member

PREFIX = "/gmesh-test/secure/"


@pytest.fixture
def pki(tmp_path: Path) -> TlsFiles:
    return write_test_pki(tmp_path / "pki")


@pytest.fixture
def tls_member(tmp_path: Path, pki: TlsFiles) -> Iterator[EtcdMember]:
    member = single_member(tmp_path, tls=pki)
    member.start()
    yield member
    member.kill()


async def test_mutual_tls(tls_member: EtcdMember, pki: TlsFiles) -> None:
    assert tls_member.url.startswith("https://")
    config = EtcdConfig.parse(
        tls_member.url, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
    )
    async with await Store.connect(config) as store:
        rev = await store.put(f"{PREFIX}k", b"v")
        got = await store.get(f"{PREFIX}k")
        assert got is not None and got.value == b"v" and got.mod_revision == rev
        watch = store.watch(PREFIX)
        first = await anext(watch)
        assert isinstance(first, Resync) and [kv.key for kv in first.kvs] == [f"{PREFIX}k"]
        rev = await store.put(f"{PREFIX}k2", b"v")
        batch = await anext(watch)
        assert isinstance(batch, WatchBatch) and batch.revision == rev
        await watch.aclose()


async def test_tls_without_a_client_certificate_is_refused_clearly(
    tls_member: EtcdMember, pki: TlsFiles
) -> None:
    async with await Store.connect(EtcdConfig.parse(tls_member.url, ca_file=pki.ca, timeout=2)) as store:
        with pytest.raises(StoreUnavailable, match=r"^etcd at https://127\.0\.0\.1:\d+ is unreachable"):
            await store.get(f"{PREFIX}k")


async def test_missing_certificate_file_is_a_clear_error(tls_member: EtcdMember, tmp_path: Path) -> None:
    from gmesh.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"cannot read .*nope\.pem"):
        await Store.connect(EtcdConfig.parse(tls_member.url, ca_file=tmp_path / "nope.pem"))


def etcdctl(member: EtcdMember, *args: str, user: str | None = None) -> None:
    cmd = [str(etcd_binary().with_name("etcdctl")), "--endpoints", member.url, *args]
    if user:
        cmd[1:1] = ["--user", user]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def auth_member(tmp_path: Path) -> Iterator[EtcdMember]:
    # Simple tokens that expire after 2 s without use, so re-login can be observed.
    member = single_member(tmp_path, extra_args=("--auth-token", "simple", "--auth-token-ttl", "2"))
    member.start()
    etcdctl(member, "user", "add", "root:rootpw")
    etcdctl(member, "user", "add", "mesh:meshpw")
    etcdctl(member, "role", "add", "mesh")
    etcdctl(member, "role", "grant-permission", "mesh", "--prefix=true", "readwrite", PREFIX)
    etcdctl(member, "user", "grant-role", "mesh", "mesh")
    etcdctl(member, "auth", "enable")
    yield member
    member.kill()


async def test_user_password_and_relogin_after_token_expiry(auth_member: EtcdMember) -> None:
    config = EtcdConfig.parse(auth_member.url, user="mesh", password="meshpw")
    async with await Store.connect(config) as store:
        await store.put(f"{PREFIX}a", b"1")
        token = store._metadata
        # Not synchronisation: the only way to see a token expire is to let its TTL (2 s) pass unused.
        await asyncio.sleep(3.5)
        got = await store.get(f"{PREFIX}a")  # refused with the old token, then logged in again
        assert got is not None and got.value == b"1"
        assert store._metadata != token


async def test_wrong_password_and_missing_permission_are_clear(auth_member: EtcdMember) -> None:
    with pytest.raises(StoreUnavailable, match="login as 'mesh' failed"):
        await Store.connect(EtcdConfig.parse(auth_member.url, user="mesh", password="wrong"))
    async with await Store.connect(
        EtcdConfig.parse(auth_member.url, user="mesh", password="meshpw")
    ) as store:
        with pytest.raises(StoreUnavailable, match="permission denied"):
            await store.put("/elsewhere/x", b"1")


def test_cli_options_reach_a_tls_etcd(
    tls_member: EtcdMember, pki: TlsFiles, gmesh_env: dict[str, str]
) -> None:
    import sys

    env = {**gmesh_env, "GMESH_ETCD": tls_member.url}
    base = [sys.executable, "-P", "-m", "gmesh.cli", "get", "endpoints"]
    tls = ["--etcd-ca", str(pki.ca), "--etcd-cert", str(pki.client_cert), "--etcd-key", str(pki.client_key)]
    ok = subprocess.run([*base, *tls], env=env, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout.strip()) == (0, "no endpoints"), ok.stderr
    half = subprocess.run([*base, *tls[:4]], env=env, capture_output=True, text=True, timeout=60)
    assert half.returncode == 1 and half.stderr.strip() == "error: --etcd-cert and --etcd-key go together"
