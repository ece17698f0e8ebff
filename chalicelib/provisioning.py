"""The orchestrator: verify, claim, locate, choose a region, issue, record. Collaborators are passed in."""
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from chalicelib.errors import AlreadyProvisioned, MalformedRequest, ProvisioningError, ServiceUnavailable
from chalicelib.geo import GeoLocator
from chalicelib.issuers.base import IssuedCertificate, Issuer
from chalicelib.regions import CATALOGUE, Location, RegionChoice, RegionPolicy, great_circle_km
from chalicelib.registry.base import Registry
from chalicelib.signatures import FleetKeyVerifier, decode_signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProvisioningRequest:
    thing_name: str
    signature: bytes
    csr: x509.CertificateSigningRequest | None

    @classmethod
    def from_body(cls, body: Any) -> "ProvisioningRequest":
        """Check the wire format (design.md); anything wrong is a MalformedRequest naming the field."""
        if not isinstance(body, Mapping):
            raise MalformedRequest("the body must be a JSON object")
        thing_name = _required_text(body, "thing-name")
        signature = decode_signature(_required_text(body, "thing-name-sig"))
        csr_pem = body.get("CSR")
        if csr_pem is None or csr_pem == "":
            return cls(thing_name, signature, None)
        if not isinstance(csr_pem, str):
            raise MalformedRequest("CSR must be a PEM string", "malformed-csr")
        return cls(thing_name, signature, parse_csr(csr_pem))


def _required_text(body: Mapping, field: str) -> str:
    value = body.get(field)
    if value is None or value == "":
        raise MalformedRequest(f"{field} is missing", "missing-field")
    if not isinstance(value, str):
        raise MalformedRequest(f"{field} must be a string", "malformed-request")
    return value


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
    except ValueError:
        raise MalformedRequest("CSR is not a PEM certificate signing request", "malformed-csr") from None
    if not csr.is_signature_valid:
        raise MalformedRequest("CSR's self-signature is not valid", "malformed-csr")
    return csr


@dataclass(frozen=True)
class ProvisioningResult:
    thing_name: str
    choice: RegionChoice
    issued: IssuedCertificate
    note: str | None = None

    def response_body(self) -> dict:
        body = {
            "status": "success",
            "thingName": self.thing_name,
            "region": self.choice.region,
            "distance": self.choice.distance_km,
            "reason": self.choice.reason,
            "endpointAddress": self.issued.endpoint.address,
            "endpointPort": self.issued.endpoint.port,
            "certificateId": self.issued.certificate_id,
            "certificatePem": self.issued.certificate_pem,
        }
        if self.issued.private_key_pem is not None:
            body["PrivateKey"] = self.issued.private_key_pem
        if self.note:
            body["message"] = self.note
        return body


def key_fingerprint(public_key) -> str:
    """SHA-256 of the SubjectPublicKeyInfo DER, hex: what the registry remembers of a device's key."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return digest.finalize().hex()


def _distance(location: Location | None, region: str) -> float | None:
    if location is None or not location.known:
        return None
    metro = CATALOGUE[region]
    return round(great_circle_km(location.latitude, location.longitude, metro.latitude, metro.longitude), 1)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ProvisioningService:
    def __init__(self, registry: Registry, issuer: Issuer, locator: GeoLocator, regions: RegionPolicy,
                 verifier: FleetKeyVerifier, lease_seconds: int = 300,
                 clock: Callable[[], datetime] = _utcnow):
        self._registry = registry
        self._issuer = issuer
        self._locator = locator
        self._regions = regions
        self._verifier = verifier
        self._lease_seconds = lease_seconds
        self._clock = clock

    def provision(self, request: ProvisioningRequest, client_ip: str) -> ProvisioningResult:
        # Signature first: an unsigned caller learns nothing about the allow-list and changes nothing.
        self._verifier.verify(request.thing_name, request.signature)
        try:
            claim = self._registry.claim(request.thing_name, self._clock(), self._lease_seconds)
        except AlreadyProvisioned as refused:
            return self._earlier_answer(request, refused, client_ip)
        issued = None
        try:
            location = self._locator.locate(client_ip)
            choice = self._regions.choose(location)
            issued = self._issuer.issue(request.thing_name, choice.region, request.csr)
            public_key = (request.csr.public_key() if request.csr is not None
                          else x509.load_pem_x509_certificate(issued.certificate_pem.encode()).public_key())
            self._registry.finalize(claim, choice.region, issued.certificate_id, self._clock(),
                                    key_fingerprint(public_key))
        except Exception as exc:
            self._undo(claim, issued, exc)
            if isinstance(exc, ProvisioningError):
                raise
            raise ServiceUnavailable("provisioning failed on the server side; try again later") from exc
        note = None if choice.reason != "default" else (
            f"location of {client_ip} is unknown; using the default region {choice.region}")
        return ProvisioningResult(request.thing_name, choice, issued, note)

    def _earlier_answer(self, request: ProvisioningRequest, refused: AlreadyProvisioned,
                        client_ip: str) -> ProvisioningResult:
        """A provisioned device asks again: its earlier answer was lost. With the same key (CSR) it gets the
        same certificate, and nothing is created; a server-made key was never kept, so that needs a reset."""
        item = refused.item
        if request.csr is None:
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned and its server-made key is not "
                                     "kept; an operator must reset it (admin reset) before it can provision again")
        if item.get("public_key_fingerprint") != key_fingerprint(request.csr.public_key()):
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned with another key")
        region, certificate_id = item["aws_region"], item["certificate_id"]
        cert = self._issuer.certificate(certificate_id, region)
        if cert is None or cert["status"] != "ACTIVE":
            raise AlreadyProvisioned(f"{request.thing_name} is provisioned but its certificate is no longer active; "
                                     "an operator must reset it (admin reset)")
        choice = RegionChoice(region, _distance(self._locator.locate(client_ip), region), "previous")
        issued = IssuedCertificate(region, certificate_id, cert["certificate_pem"], self._issuer.endpoint(region),
                                   thing_name=request.thing_name)
        return ProvisioningResult(request.thing_name, choice, issued,
                                  "already provisioned with this key: the same certificate again")

    def _undo(self, claim, issued: IssuedCertificate | None, cause: Exception) -> None:
        """Compensate in reverse order. A failure here is logged and never hides the original error; the claim
        is released anyway (no stuck device) with last_error naming what is left for the audit."""
        log.error("provisioning %s failed, rolling back: %s: %s", claim.thing_name, type(cause).__name__, cause)
        error = f"{type(cause).__name__}: {cause}"
        if issued is not None:
            try:
                self._issuer.revoke(issued)
            except Exception:
                log.exception("rollback of %s incomplete: certificate %s in %s may still be active",
                              claim.thing_name, issued.certificate_id, issued.region)
                error = f"rollback incomplete, certificate {issued.certificate_id} in {issued.region}; {error}"
        try:
            self._registry.release(claim, error[:500])
        except Exception:
            log.exception("could not release the claim on %s; it frees itself when the lease ends",
                          claim.thing_name)
