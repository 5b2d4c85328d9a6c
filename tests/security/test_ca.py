"""The CA's X.509 logic without I/O: roots, leaves from CSRs, and what it refuses."""

from __future__ import annotations

import datetime
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gmesh.errors import InvalidArgument
from gmesh.security.ca import CsrRefused, Root, identity_of, make_csr, new_key

TD = "example.org"


@pytest.fixture(scope="module")
def root() -> Root:
    return Root.create(TD)


def test_a_leaf_names_its_service_twice_and_verifies_against_the_root(root: Root) -> None:
    leaf = root.sign(make_csr(new_key(), "orders", TD), "orders")
    leaf.verify_directly_issued_by(root.cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/svc/orders"]
    assert sans.get_values_for_type(x509.DNSName) == ["orders"]  # what grpc clients check
    assert identity_of(leaf) == "spiffe://example.org/svc/orders"
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == datetime.timedelta(hours=24, minutes=1)  # 24 h, started a minute early (skew)


def test_a_csr_for_another_identity_is_refused(root: Root) -> None:
    with pytest.raises(CsrRefused, match=re.escape("asks for 'spiffe://example.org/svc/payments'")):
        root.sign(make_csr(new_key(), "payments", TD), "orders")


def test_the_csr_cannot_widen_its_names(root: Root) -> None:
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("*.example.org")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    leaf = root.sign(csr, "orders")
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["orders"]  # the CA sets the names


def test_malformed_and_weak_csrs_are_refused_clearly(root: Root) -> None:
    with pytest.raises(CsrRefused, match="not a PEM certificate signing request"):
        root.sign(
            b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n", "orders"
        )
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders")]))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrRefused, match="ECDSA P-256"):
        root.sign(rsa_csr, "orders")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CsrRefused, match="ECDSA P-256"):
        root.sign(make_csr(p384, "orders", TD), "orders")


def test_a_root_reloads_from_its_files_and_a_mismatched_key_is_refused(root: Root) -> None:
    from gmesh.security.ca import cert_pem, key_pem

    again = Root.load(cert_pem(root.cert), key_pem(root.key), TD)
    again.sign(make_csr(new_key(), "orders", TD), "orders").verify_directly_issued_by(root.cert)
    with pytest.raises(InvalidArgument, match="do not belong together"):
        Root.load(cert_pem(root.cert), key_pem(new_key()), TD)
    with pytest.raises(InvalidArgument, match="trust domain"):
        Root.create("Not A Domain!")
