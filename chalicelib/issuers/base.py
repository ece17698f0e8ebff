"""What every issuer backend offers."""
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Protocol

from cryptography import x509


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


class Issuer(Protocol):
    def endpoint(self, region: str) -> Endpoint:
        """Where devices of `region` connect (MQTT over mutual TLS)."""

    def issue(self, thing_name: str, region: str,
              csr: x509.CertificateSigningRequest | None) -> IssuedCertificate:
        """Create the device's identity in `region`: from the CSR's key, or with a new RSA-2048 key pair."""

    def revoke(self, issued: IssuedCertificate | CertificateRef, keep_thing: bool = False) -> None:
        """Undo `issue` (rollback, reset, audit): the certificate can no longer be used; parts gone are fine.
        `keep_thing`: the thing was not made by the attempt being undone, so it stays (detached)."""

    def find_issued(self, thing_name: str, region: str, since: datetime, fingerprint: str | None) -> list[str]:
        """Ids of the active certificates issued in `region` for `thing_name` at or after `since`: what an attempt
        that died before recording its certificate id may have left (write-ahead settle)."""

    def adopt(self, thing_name: str, region: str, certificate_id: str) -> IssuedCertificate:
        """A certificate a dead attempt issued, made whole (thing, policy, attachment) to be finalized with."""

    def certificate(self, certificate_id: str, region: str | None = None) -> dict | None:
        """What the issuer knows of a certificate (status, validity, certificate_pem); None when unknown."""

    def active_certificates(self, region: str) -> Iterator[dict]:
        """Every active certificate in the region with the thing it belongs to (for the audit)."""

    def things(self, region: str) -> Iterator[str]:
        """Every thing in the region (for the audit); none where the backend has no things."""

    def delete_thing(self, region: str, thing_name: str) -> None:
        """Detach and delete a thing left behind (audit --fix)."""
