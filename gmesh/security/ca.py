"""The mesh's certificate authority, without I/O: a root, and leaf certificates signed from CSRs.

Workloads generate their own keys and send certificate signing requests; the CA never sees a
private key but its own. A leaf is ECDSA P-256, valid for `DEFAULT_LIFETIME` (24 h), and names
its workload twice: a SPIFFE ID URI SAN `spiffe://<trust-domain>/svc/<service>` (what policies
match) and a DNS SAN `<service>` (what grpc clients verify: they check DNS SANs only). Every
X.509 operation is the `cryptography` library's.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gmesh.errors import InvalidArgument

DEFAULT_LIFETIME = datetime.timedelta(hours=24)
ROOT_LIFETIME = datetime.timedelta(days=3650)
#: leaves start this long before they are signed: clocks of a mesh are never quite in step
CLOCK_SKEW = datetime.timedelta(minutes=1)
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")


class CsrRefused(InvalidArgument):
    """A CSR the CA will not sign (malformed, a bad key, or asking for another identity)."""


def spiffe_id(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/svc/{service}"


def check_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidArgument(
            f"trust domain {trust_domain!r}: lowercase letters, digits, '.' and '-', like example.org"
        )
    return trust_domain


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Root:
    """The CA's signing certificate and key (a self-signed root, or an external intermediate)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    trust_domain: str

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        lifetime: datetime.timedelta = ROOT_LIFETIME,
        parent: Root | None = None,
        path_length: int = 0,
    ) -> Root:
        """A self-signed root, or with `parent` an intermediate it signs (an organisation's own
        root signing gmesh's CA: what `gmesh ca init --cert --key --bundle` takes)."""
        check_trust_domain(trust_domain)
        key = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gmesh"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"gmesh {'intermediate' if parent else 'root'} CA for {trust_domain}",
                ),
            ]
        )
        now = _now()
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(parent.cert.subject if parent else name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(
                min(now + lifetime, parent.cert.not_valid_after_utc) if parent else now + lifetime
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
        )
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
            )
        cert = builder.sign(parent.key if parent else key, hashes.SHA256())
        return cls(cert, key, trust_domain)

    @property
    def intermediate(self) -> bool:
        """Signed by another CA (an external root): its certificate goes with every leaf."""
        return self.cert.issuer != self.cert.subject

    def chain_pem(self, leaf: x509.Certificate) -> bytes:
        """What a workload presents: the leaf, and this CA's certificate when it is an intermediate."""
        return cert_pem(leaf) + (cert_pem(self.cert) if self.intermediate else b"")

    @classmethod
    def load(cls, cert_pem_bytes: bytes, key_pem_bytes: bytes, trust_domain: str) -> Root:
        cert = x509.load_pem_x509_certificate(cert_pem_bytes)
        key = serialization.load_pem_private_key(key_pem_bytes, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument("the CA key must be an ECDSA key")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise InvalidArgument("the CA certificate and key do not belong together")
        return cls(cert, key, check_trust_domain(trust_domain))

    def sign(
        self, csr_pem: bytes, service: str, *, lifetime: datetime.timedelta = DEFAULT_LIFETIME
    ) -> x509.Certificate:
        """A leaf for `service` from `csr_pem`. The CSR must be well-formed and self-signed with an
        ECDSA P-256 key; if it names an identity (a SPIFFE URI SAN, or a common name), that must be
        `service`'s. The CA sets the names itself: a CSR cannot ask for more."""
        csr = parse_csr(csr_pem)
        want = spiffe_id(self.trust_domain, service)
        asked = requested_identity(csr)
        if asked is not None and asked not in (want, service):
            raise CsrRefused(f"the CSR asks for {asked!r}, but this token is for {want}")
        public = csr.public_key()
        now = _now()
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(want), x509.DNSName(service)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )


def parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR the CA can sign, or `CsrRefused` saying what is wrong with it."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError) as exc:
        raise CsrRefused(f"not a PEM certificate signing request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except InvalidSignature:
        valid = False
    if not valid:
        raise CsrRefused("the CSR's signature does not verify (it must be signed by the key it carries)")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise CsrRefused("the CSR's key must be ECDSA P-256")
    return csr


def requested_identity(csr: x509.CertificateSigningRequest) -> str | None:
    """The identity a CSR names (its first URI SAN, else its common name), or None."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            return str(uris[0])
    except x509.ExtensionNotFound:
        pass
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def make_csr(key: ec.EllipticCurvePrivateKey, service: str, trust_domain: str) -> bytes:
    """A CSR for `service` (what workloads send; the key stays with them)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id(trust_domain, service)), x509.DNSName(service)]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def identity_of(cert: x509.Certificate) -> str | None:
    """The SPIFFE ID of a certificate (its first `spiffe://` URI SAN), or None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return str(uri)
    return None
