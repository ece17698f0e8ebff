"""Certificates as the issuer port and the registry see them: issued, referred to, known, certified."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from chalicelib.domain.clock import timestamp
from chalicelib.domain.keypolicy import key_fingerprint, public_key_pem

ACTIVE = "ACTIVE"  # a certificate's status that lets a device connect (AWS IoT's word; the local CA's too)


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int


@dataclass(frozen=True)
class CertificateRef:
    """Enough to find and revoke a certificate that an earlier request issued (operators, audit)."""

    region: str
    certificate_id: str
    thing_name: str | None = None
    certificate_arn: str | None = None


@dataclass(frozen=True)
class IssuedCertificate:
    region: str
    certificate_id: str
    certificate_pem: str
    endpoint: Endpoint
    private_key_pem: str | None = None  # only when the issuer made the key pair; never stored
    thing_name: str | None = None
    certificate_arn: str | None = None  # AWS IoT only
    created_thing: bool = False  # this attempt made the thing (a rollback deletes only what it made)


@dataclass(frozen=True)
class CertificateInfo:
    """What an issuer knows of a certificate it issued. Listings (the audit's) leave out the PEM."""

    certificate_id: str
    region: str | None
    status: str  # ACTIVE, REVOKED (local CA), INACTIVE, PENDING_TRANSFER... (AWS IoT)
    thing_name: str | None = None
    certificate_pem: str | None = None
    issued_at: datetime | None = None
    not_after: datetime | None = None
    serial: str | None = None  # local CA (hex)
    arn: str | None = None  # AWS IoT

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    def ref(self) -> CertificateRef:
        return CertificateRef(self.region or "", self.certificate_id, self.thing_name, self.arn)


@dataclass(frozen=True)
class Certified:
    """An issued certificate as a commit records it: its key (the CSR's, or the one the issuer made)."""

    issued: IssuedCertificate
    public_key: str     # PEM: a renewal's signature is checked with it
    fingerprint: str    # SHA-256 of its SubjectPublicKeyInfo DER, hex
    expires: str        # its end of validity, clock.timestamp form (`admin list --expiring-within`)
    server_key: bool    # the service made the key (no CSR): a lost answer may be re-keyed


def certify(issued: IssuedCertificate, csr: x509.CertificateSigningRequest | None) -> Certified:
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    key = csr.public_key() if csr is not None else certificate.public_key()
    return Certified(issued, public_key_pem(key), key_fingerprint(key), timestamp(certificate.not_valid_after_utc),
                     csr is None)
