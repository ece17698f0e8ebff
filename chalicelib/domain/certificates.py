"""What every issuer backend offers: the hot path (`Issuer`) and, apart, what the operator's audit reads."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

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








