"""The state a workload identity keeps without the network: when a certificate is renewed, its
credentials built once, server credentials that follow renewals, `describe()` and listeners."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from gmesh.discovery.keys import MeshKeys
from gmesh.errors import InvalidArgument
from gmesh.security import identity as identity_module
from gmesh.security.ca import Root, cert_pem, identity_of, key_pem, make_csr, new_key
from gmesh.security.identity import JITTER, RENEW_AT, Material, WorkloadIdentity, issuer_id, root_id

TD = "gmesh.local"
ORDERS = f"spiffe://{TD}/svc/orders"


@pytest.fixture(scope="module")
def root() -> Root:
    return Root.create(TD)


def leaf_of(
    root: Root, lifetime: datetime.timedelta = datetime.timedelta(hours=1)
) -> tuple[Any, x509.Certificate]:
    key = new_key()
    return key, root.sign(make_csr(key, "orders", TD), "orders", lifetime=lifetime)


def material_of(
    root: Root,
    *,
    lifetime: datetime.timedelta = datetime.timedelta(hours=1),
    received: float | None = None,
    version: int = 1,
) -> Material:
    """A Material as `WorkloadIdentity._obtain` builds one from the CA's answer."""
    key, leaf = leaf_of(root, lifetime)
    return Material(
        service="orders",
        identity=identity_of(leaf) or "",
        key_pem=key_pem(key),
        cert_pem=cert_pem(leaf),
        roots_pem=cert_pem(root.cert),
        not_after=leaf.not_valid_after_utc.timestamp(),
        received=time.time() if received is None else received,
        serial=leaf.serial_number,
        issuer=issuer_id(leaf),
        version=version,
    )


def synthetic(received: float, not_after: float, version: int = 1) -> Material:
    return Material(
        service="orders",
        identity=ORDERS,
        key_pem=b"key",
        cert_pem=b"cert",
        roots_pem=b"roots",
        not_after=not_after,
        received=received,
        serial=0xABC,
        issuer="feed",
        version=version,
    )


def new_identity() -> WorkloadIdentity:
    return WorkloadIdentity(None, MeshKeys(), "orders")  # type: ignore[arg-type]  # no store: no I/O here


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- when to renew -----------------------------------------------------------------------------


def test_renew_at_two_thirds_of_the_lifetime_left_at_receipt() -> None:
    material = synthetic(received=1_000.0, not_after=1_000.0 + 3_600.0)
    assert pytest.approx(2 / 3) == RENEW_AT
    assert material.renew_at() == pytest.approx(1_000.0 + 2_400.0)


@pytest.mark.parametrize("jitter", [-JITTER, -0.01, 0.0, 0.01, JITTER])
def test_jitter_shifts_the_renewal_by_that_share_of_the_lifetime(jitter: float) -> None:
    material = synthetic(received=1_000.0, not_after=1_000.0 + 3_600.0)
    assert material.renew_at(jitter) == pytest.approx(1_000.0 + 3_600.0 * (2 / 3 + jitter))
    assert material.renew_at(jitter) - material.renew_at() == pytest.approx(3_600.0 * jitter)


def test_renew_at_counts_from_receipt_not_from_issue() -> None:
    """A leaf received late in its life is renewed 2/3 into what was left, not at a time past."""
    material = synthetic(received=5_000.0, not_after=5_000.0 + 300.0)
    assert material.renew_at() == pytest.approx(5_200.0)


def test_an_already_expired_leaf_renews_at_receipt() -> None:
    material = synthetic(received=1_000.0, not_after=900.0)
    assert material.renew_at() == 1_000.0
    assert material.renew_at(JITTER) == 1_000.0


def test_a_short_leaf_started_early_for_clock_skew_does_not_renew_at_once(root: Root) -> None:
    _, leaf = leaf_of(root, datetime.timedelta(seconds=10))
    before = time.time()
    material = material_of(root, lifetime=datetime.timedelta(seconds=10))
    # The leaf started a minute early (clock skew): measured from not_before, 2/3 of its
    # 70 s would already be past.
    assert leaf.not_valid_before_utc.timestamp() < before - 59
    not_before = leaf.not_valid_before_utc.timestamp()
    assert not_before + (material.not_after - not_before) * RENEW_AT < before
    for jitter in (-JITTER, 0.0, JITTER):
        renew = material.renew_at(jitter)
        assert renew > time.time()
        assert renew == pytest.approx(
            material.received + (material.not_after - material.received) * (RENEW_AT + jitter)
        )
        assert 5.0 < renew - material.received < 7.5  # ~2/3 of the 10 s left


# -- credentials -------------------------------------------------------------------------------


def test_credentials_are_built_once_and_kept(root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real_server, real_channel = grpc.ssl_server_certificate_configuration, grpc.ssl_channel_credentials

    def server_config(*args: Any, **kwargs: Any) -> Any:
        built.append("server")
        return real_server(*args, **kwargs)

    def channel(*args: Any, **kwargs: Any) -> Any:
        built.append("channel")
        return real_channel(*args, **kwargs)

    monkeypatch.setattr(grpc, "ssl_server_certificate_configuration", server_config)
    monkeypatch.setattr(grpc, "ssl_channel_credentials", channel)
    material = material_of(root)
    creds = material.channel_credentials
    assert isinstance(creds, grpc.ChannelCredentials)
    assert material.channel_credentials is creds
    config = material.server_config
    assert config is not None
    assert material.server_config is config
    assert built == ["server", "channel"]  # one build for both, on first use


def rebuilt(material: Material, **changes: Any) -> Material:
    """A copy with `changes`, made as `_watch_bundle` makes one (the fields, not the cache)."""
    return Material(
        **{
            **{k: getattr(material, k) for k in identity_module._FIELDS},
            "version": material.version,
            **changes,
        }
    )


def test_credentials_are_not_part_of_equality(root: Root) -> None:
    material = material_of(root)
    _ = material.server_config
    copy = rebuilt(material)
    assert copy == material
    assert copy.server_config is not material.server_config  # each builds its own


def test_issuer_id_names_the_root_that_signed_the_leaf(root: Root) -> None:
    _, leaf = leaf_of(root)
    assert issuer_id(leaf) == root_id(root.cert)
    assert len(issuer_id(leaf)) == 40  # a SHA-1 key identifier, hex
    assert material_of(root).issuer == root_id(root.cert)
    other = Root.create(TD)
    _, stranger = leaf_of(other)
    assert issuer_id(stranger) == root_id(other.cert) != root_id(root.cert)


def test_ids_of_certificates_without_key_identifiers() -> None:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")])
    now = datetime.datetime.now(datetime.UTC)
    bare = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    assert issuer_id(bare) == ""
    assert root_id(bare) == bare.fingerprint(hashes.SHA256()).hex()[:16]


# -- WorkloadIdentity, without the CA ---------------------------------------------------------


def test_the_service_name_is_checked() -> None:
    with pytest.raises(InvalidArgument, match="service"):
        WorkloadIdentity(None, MeshKeys(), "Orders")  # type: ignore[arg-type]


def test_nothing_to_read_before_the_first_certificate() -> None:
    identity = new_identity()
    with pytest.raises(AssertionError, match="identity not started"):
        _ = identity.material
    assert identity.describe() == {"service": "orders", "renewals": 0, "failures": 0, "state": "fresh"}


class Captured:
    """What `WorkloadIdentity.server_credentials` gives grpc's dynamic credentials."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, dict[str, Any]]] = []

    def __call__(self, initial: Any, fetch: Any, **kwargs: Any) -> str:
        self.calls.append((initial, fetch, kwargs))
        return "server-credentials"


def test_server_credentials_fetch_only_what_changed(root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    captured = Captured()
    monkeypatch.setattr(grpc, "dynamic_ssl_server_credentials", captured)
    identity = new_identity()
    first = material_of(root, version=1)
    identity._install(first)
    assert identity.server_credentials() == "server-credentials"
    [(initial, fetch, kwargs)] = captured.calls
    assert initial is first.server_config
    assert kwargs == {"require_client_authentication": True}
    assert fetch() is None  # unchanged: grpc keeps the config it has
    assert fetch() is None

    renewed = material_of(root, version=2)
    identity._install(renewed)
    assert fetch() is renewed.server_config
    assert fetch() is None  # handed over once

    rebundled = rebuilt(renewed, roots_pem=renewed.roots_pem + cert_pem(Root.create(TD).cert), version=3)
    identity._install(rebundled)  # a trust bundle change: same leaf, more roots
    config = fetch()
    assert config is rebundled.server_config
    assert config is not renewed.server_config
    assert fetch() is None


def test_server_credentials_made_after_a_renewal_start_from_it(
    root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = Captured()
    monkeypatch.setattr(grpc, "dynamic_ssl_server_credentials", captured)
    identity = new_identity()
    identity._install(material_of(root, version=1))
    second = material_of(root, version=2)
    identity._install(second)
    identity.server_credentials(require_client_auth=False)
    [(initial, fetch, kwargs)] = captured.calls
    assert initial is second.server_config
    assert kwargs == {"require_client_authentication": False}
    assert fetch() is None


def test_server_credentials_are_real_grpc_credentials(root: Root) -> None:
    identity = new_identity()
    identity._install(material_of(root))
    assert isinstance(identity.server_credentials(), grpc.ServerCredentials)
    assert isinstance(identity.channel_credentials(), grpc.ChannelCredentials)
    assert identity.channel_credentials() is identity.material.channel_credentials
    assert identity.spiffe_id == ORDERS


# -- describe ----------------------------------------------------------------------------------


def test_describe_fresh(root: Root) -> None:
    identity = new_identity()
    material = material_of(root)
    identity._install(material)
    identity.next_renewal = material.renew_at()
    out = identity.describe()
    assert out["state"] == "fresh"
    assert "lastError" not in out
    assert out["identity"] == ORDERS
    assert out["serial"] == format(material.serial, "x")
    assert out["issuer"] == root_id(root.cert)
    assert out["expires"] == iso(material.not_after)
    assert 3_590 < out["expiresInSeconds"] <= 3_600
    assert 2_390 < out["renewsInSeconds"] <= 2_400
    assert out["roots"] is None  # no bundle read (no store here)
    assert (out["renewals"], out["failures"]) == (0, 0)


def test_describe_while_the_ca_is_unreachable_and_the_certificate_still_valid(root: Root) -> None:
    identity = new_identity()
    identity._install(material_of(root))
    identity.stale_since = 1_700_000_000.0
    identity.last_error = "UNAVAILABLE: connection refused"
    identity.failures = 3
    out = identity.describe()
    assert out["state"] == ("CA unreachable since 2023-11-14T22:13:20Z: serving on the current certificate")
    assert out["lastError"] == "UNAVAILABLE: connection refused"
    assert out["failures"] == 3


def test_describe_when_the_certificate_has_expired() -> None:
    identity = new_identity()
    now = time.time()
    identity._install(synthetic(received=now - 100, not_after=now - 10))
    identity.stale_since = now - 50
    identity.last_error = "no CA endpoint in the mesh (service gmesh-ca)"
    out = identity.describe()
    assert out["state"] == "EXPIRED: peers refuse this certificate until the CA can be reached"
    assert out["lastError"] == "no CA endpoint in the mesh (service gmesh-ca)"
    assert out["expiresInSeconds"] < 0
    assert out["renewsInSeconds"] == 0.0
    assert "CA unreachable" not in out["state"]


def test_describe_stale_without_a_certificate_says_unreachable() -> None:
    identity = new_identity()
    identity.stale_since = 1_700_000_000.0
    assert identity.describe()["state"].startswith("CA unreachable since 2023-11-14T22:13:20Z")


# -- listeners ---------------------------------------------------------------------------------


def test_listeners_hear_every_material_and_one_failing_stops_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    identity = new_identity()
    first_heard: list[Material] = []
    last_heard: list[Material] = []

    def broken(material: Material) -> None:
        raise RuntimeError("listener bug")

    identity.on_change(first_heard.append)
    identity.on_change(broken)
    identity.on_change(last_heard.append)
    materials = [synthetic(received=0.0, not_after=100.0, version=v) for v in (1, 2, 3)]
    with caplog.at_level(logging.ERROR, logger=identity_module.__name__):
        for material in materials:
            identity._install(material)
    assert first_heard == materials
    assert last_heard == materials
    assert all(a is b for a, b in zip(last_heard, materials, strict=True))
    assert identity.material is materials[-1]
    failures = [r for r in caplog.records if r.message.startswith("identity listener")]
    assert len(failures) == 3
    assert all(r.exc_info is not None and isinstance(r.exc_info[1], RuntimeError) for r in failures)


def test_a_removed_listener_hears_nothing_more() -> None:
    identity = new_identity()
    heard: list[int] = []
    remove = identity.on_change(lambda m: heard.append(m.version))
    identity._install(synthetic(0.0, 100.0, version=1))
    remove()
    remove()  # twice is harmless
    identity._install(synthetic(0.0, 100.0, version=2))
    assert heard == [1]


def test_material_is_immutable() -> None:
    material = synthetic(0.0, 100.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        material.version = 2  # type: ignore[misc]
