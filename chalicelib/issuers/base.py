"""What every issuer backend offers."""
from dataclasses import dataclass
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


class Issuer(Protocol):
    def endpoint(self, region: str) -> Endpoint:
        """Where devices of `region` connect (MQTT over mutual TLS)."""

    def issue(self, thing_name: str, region: str,
              csr: x509.CertificateSigningRequest | None) -> IssuedCertificate:
        """Create the device's identity in `region`: from the CSR's key, or with a new RSA-2048 key pair."""

    def revoke(self, issued: IssuedCertificate | CertificateRef) -> None:
        """Undo `issue` (rollback, reset, audit): the certificate can no longer be used; parts gone are fine."""

    def certificate(self, certificate_id: str, region: str | None = None) -> dict | None:
        """What the issuer knows of a certificate (status, validity, certificate_pem); None when unknown."""

    def active_certificates(self, region: str) -> Iterator[dict]:
        """Every active certificate in the region with the thing it belongs to (for the audit)."""

    def things(self, region: str) -> Iterator[str]:
        """Every thing in the region (for the audit); none where the backend has no things."""

    def delete_thing(self, region: str, thing_name: str) -> None:
        """Detach and delete a thing left behind (audit --fix)."""

    def issue_renewal(self, thing_name: str, region: str, csr: x509.CertificateSigningRequest | None,
                      in_place: bool) -> IssuedCertificate:
        """A renewal's certificate: `in_place`, for the device's thing as it is (neither made nor deleted here,
        even on failure); else in another region, thing included, as `issue` does."""

    def retire(self, previous: CertificateRef, delete_thing: bool) -> None:
        """Revoke a renewed device's previous certificate, and delete its thing too after a move (`delete_thing`);
        parts gone already are fine. Raises ServiceUnavailable when something is left."""
