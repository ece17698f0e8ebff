"""The issuer port: the hot path (`Issuer`) and, apart, what the operator's audit reads."""
from __future__ import annotations

from datetime import datetime
from typing import Iterable, Iterator, Protocol, runtime_checkable

from cryptography import x509

from chalicelib.domain.certificates import CertificateInfo, CertificateRef, Endpoint, IssuedCertificate


class Issuer(Protocol):
    """What the issuance sequence and the settler need of an issuer. `in_place`: a renewal in the device's region,
    whose thing holds its current certificate: the thing is neither made nor deleted (elsewhere it is made, or
    adopted when it exists with no other certificate attached)."""

    def endpoint(self, region: str) -> Endpoint:
        """Where devices of `region` connect (MQTT over mutual TLS)."""

    def check(self, regions: Iterable[str]) -> None:
        """Raise unless every region's issuer can be used now (GET /health, admin init)."""

    def issue(self, thing_name: str, region: str, csr: x509.CertificateSigningRequest | None,
              in_place: bool = False) -> IssuedCertificate:
        """Create the device's identity in `region`: from the CSR's key, or with a new RSA-2048 key pair.

        A failure that could not undo all it made raises `errors.IssueIncomplete` naming what is left."""

    def adopt(self, thing_name: str, region: str, certificate_id: str, in_place: bool = False) -> IssuedCertificate:
        """A certificate a dead attempt issued, made whole (thing, policy, attachment) to be committed with; raises
        LookupError when it is no longer active."""

    def revoke(self, certificate: IssuedCertificate | CertificateRef, *, delete_thing: bool) -> None:
        """The certificate can no longer be used (detached, REVOKED, deleted where the backend deletes); with
        `delete_thing` its thing goes too (only a thing the attempt being undone made, or the old region's after a
        move). Parts gone already are fine; raises ServiceUnavailable when something is left."""

    def find_issued(self, thing_name: str, region: str, since: datetime, fingerprint: str | None) -> list[str]:
        """Ids of the active certificates issued in `region` for `thing_name` at or after `since`: what an attempt
        that died before recording its certificate id may have left (write-ahead settle)."""

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
