"""The issuer port: the hot path (`Issuer`) and, apart, what the operator's audit reads."""
from __future__ import annotations

from datetime import datetime
from typing import Iterator, Protocol, runtime_checkable

from cryptography import x509

from chalicelib.domain.certificates import CertificateInfo, CertificateRef, Endpoint, IssuedCertificate


class Issuer(Protocol):
    """The hot path: what provisioning a device needs."""

    def endpoint(self, region: str) -> Endpoint:
        """Where devices of `region` connect (MQTT over mutual TLS)."""

    def issue(self, thing_name: str, region: str,
              csr: x509.CertificateSigningRequest | None) -> IssuedCertificate:
        """Create the device's identity in `region`: from the CSR's key, or with a new RSA-2048 key pair.

        A failure that could not undo all it made raises `errors.IssueIncomplete` naming what is left."""

    def revoke(self, issued: IssuedCertificate | CertificateRef, keep_thing: bool = False) -> None:
        """Undo `issue` (rollback, reset, audit): the certificate can no longer be used; parts gone are fine.
        `keep_thing`: the thing was not made by the attempt being undone, so it stays (detached)."""

    def find_issued(self, thing_name: str, region: str, since: datetime, fingerprint: str | None) -> list[str]:
        """Ids of the active certificates issued in `region` for `thing_name` at or after `since`: what an attempt
        that died before recording its certificate id may have left (write-ahead settle)."""

    def adopt(self, thing_name: str, region: str, certificate_id: str) -> IssuedCertificate:
        """A certificate a dead attempt issued, made whole (thing, policy, attachment) to be finalized with."""

    def certificate(self, certificate_id: str, region: str | None = None) -> CertificateInfo | None:
        """What the issuer knows of a certificate, with its PEM and validity; None when unknown."""


@runtime_checkable
class CertificateInventory(Protocol):
    """The audit's view of certificates: every backend keeps one."""

    def active_certificates(self, region: str) -> Iterator[CertificateInfo]:
        """Every active certificate in the region with the thing it belongs to (no PEM)."""


@runtime_checkable
class ThingInventory(Protocol):
    """Where a backend keeps things apart from certificates (AWS IoT), the audit finds and removes leftovers."""

    def things(self, region: str) -> Iterator[str]:
        """Every thing in the region."""

    def delete_thing(self, region: str, thing_name: str) -> None:
        """Detach and delete a thing left behind (audit --fix); gone already is fine."""


class RenewalIssuer(Issuer, Protocol):
    """What a renewal (POST /device-renewal) needs of an issuer besides the hot path."""

    def issue_renewal(self, thing_name: str, region: str, csr: x509.CertificateSigningRequest | None,
                      in_place: bool) -> IssuedCertificate:
        """A renewal's certificate: `in_place`, for the device's thing as it is (neither made nor deleted here,
        even on failure); else in another region, thing included, as `issue` does."""

    def adopt_renewal(self, thing_name: str, region: str, certificate_id: str, in_place: bool) -> IssuedCertificate:
        """A certificate a dead renewal issued, made whole to be recorded with: `in_place`, attached to the device's
        thing as it is (which holds the current certificate too); else as `adopt` does in the new region."""

    def retire(self, previous: CertificateRef, delete_thing: bool) -> None:
        """Revoke a renewed device's previous certificate, and delete its thing too after a move (`delete_thing`);
        parts gone already are fine. Raises ServiceUnavailable when something is left."""
