"""The orchestrator: verify, claim, locate, choose a region, issue, record. Collaborators are passed in."""
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from chalicelib.admission import Admission
from chalicelib.clock import utcnow
from chalicelib.errors import (
    REFUSED,
    AlreadyProvisioned,
    IssueIncomplete,
    ProvisioningError,
    ServiceUnavailable,
    SignatureInvalid,
)
from chalicelib.geo import GeoLocator
from chalicelib.issuers.base import IssuedCertificate, Issuer
from chalicelib.observability import Steps
from chalicelib.regions import RegionChoice, RegionPolicy
from chalicelib.registry.base import PROVISIONED, Claim, Nonce, Registry
from chalicelib.signatures import FleetKeyVerifier, load_device_key, verifies
from chalicelib.wire import ProvisioningRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProvisioningResult:
    """What a provisioning produced; `wire.response_body` says it to the device."""

    thing_name: str
    choice: RegionChoice
    issued: IssuedCertificate
    note: str | None = None


def key_fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo DER, hex: what the registry remembers of a device's key."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return digest.finalize().hex()


class ProvisioningService:
    def __init__(self, registry: Registry, issuer: Issuer, locator: GeoLocator, regions: RegionPolicy,
                 verifier: FleetKeyVerifier, lease_seconds: int = 300,
                 clock: Callable[[], datetime] = utcnow, allow_v1: bool = True, skew_seconds: int = 300,
                 admission: Admission | None = None) -> None:
        self._registry = registry
        self._issuer = issuer
        self._locator = locator
        self._regions = regions
        self._verifier = verifier
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._allow_v1 = allow_v1
        self._skew = skew_seconds
        self._admission = admission

    def provision(self, request: ProvisioningRequest, client_ip: str,
                  steps: Steps | None = None) -> ProvisioningResult:
        steps = steps or Steps()
        with steps.step("verify"):
            fleet_key = self._authenticate(request)
        # The region is known before the claim, so the request is admitted against that region's budget
        # (admission control) before it holds a claim or spends any IoT call.
        with steps.step("geo"):
            location = self._locator.locate(client_ip)
            choice = self._regions.choose(location)
        if self._admission is not None:
            with steps.step("admit"):
                try:
                    self._admission.admit(choice.region, server_key=request.csr is None)
                except ServiceUnavailable:
                    # An answer that issues nothing (a lost answer asked for again) is not kept waiting.
                    record = self._registry.get(request.thing_name)
                    if record is None or record.status is not PROVISIONED:
                        raise
                    return self._earlier_answer(request, AlreadyProvisioned("", record=record), client_ip)
        with steps.step("claim"):
            now = self._clock()
            # The nonce is recorded only now, for a correctly signed request: nobody can use up a device's.
            nonce = (Nonce(request.nonce, now + timedelta(seconds=2 * self._skew))
                     if request.nonce is not None else None)
            try:
                claim = self._registry.claim(request.thing_name, now, self._lease_seconds, fleet_key, nonce)
            except AlreadyProvisioned as refused:
                return self._earlier_answer(request, refused, client_ip)
        issued, issuing = None, False
        try:
            with steps.step("issue"):
                issuing = True
                issued = self._issuer.issue(request.thing_name, choice.region, request.csr)
            with steps.step("finalize"):
                public_key = (request.csr.public_key() if request.csr is not None
                              else x509.load_pem_x509_certificate(issued.certificate_pem.encode()).public_key())
                self._registry.finalize(claim, choice.region, issued.certificate_id, self._clock(),
                                        key_fingerprint(public_key), choice.country, choice.reason)
        except Exception as exc:
            cause, leftover = (exc.error, exc.leftover) if isinstance(exc, IssueIncomplete) else (exc, None)
            with steps.step("rollback"):
                self._undo(claim, issued, cause, leftover)
                if issuing and self._admission is not None:  # the undo's IoT calls are paid from the budget
                    self._admission.rollback(choice.region)
            if cause is exc and isinstance(exc, ProvisioningError):
                raise
            if isinstance(cause, ProvisioningError):
                raise cause from exc
            raise ServiceUnavailable("provisioning failed on the server side; try again later") from cause
        note = None if choice.reason != "default" else (
            f"location of {client_ip} is unknown; using the default region {choice.region}")
        return ProvisioningResult(request.thing_name, choice, issued, note)

    def _authenticate(self, request: ProvisioningRequest) -> bool:
        """Check the signature before anything changes; returns whether the fleet key made it.

        A request the fleet key did not sign may be signed by the device's own key; an unknown device and a
        wrong signature get the same answer, so a caller cannot learn which devices exist.
        """
        now = self._clock()
        if request.version == 1 and not self._allow_v1:
            raise SignatureInvalid("this service accepts only signed requests v2 (timestamp, nonce)", "v1-refused")
        if request.timestamp is not None:
            skew = abs((now - request.timestamp).total_seconds())
            if skew > self._skew:
                raise SignatureInvalid(f"the timestamp is {skew:.0f} s away from the server's clock "
                                       f"(at most {self._skew} s allowed)", "stale-timestamp")
        text = request.signed_text()
        fleet_key = self._verifier.verifies(text, request.signature)
        if not fleet_key:
            record = self._registry.get(request.thing_name)
            pem = record.public_key if record else None
            try:
                device_key = load_device_key(pem) if pem else None
            except ValueError:  # registered with a key the CLI would have refused: say so, refuse the device
                log.error("the registered public key of %s cannot be used", request.thing_name)
                device_key = None
            if device_key is None or not verifies(device_key, text, request.signature):
                raise SignatureInvalid(REFUSED)
        return fleet_key

    def _earlier_answer(self, request: ProvisioningRequest, refused: AlreadyProvisioned,
                        client_ip: str) -> ProvisioningResult:
        """A provisioned device asks again: its earlier answer was lost. With the same key (CSR) it gets the
        same certificate, and nothing is created; a server-made key was never kept, so that needs a reset."""
        record = refused.record
        if request.csr is None:
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned and its server-made key is not "
                                     "kept; an operator must reset it (admin reset) before it can provision again")
        if record is None or record.key_fingerprint != key_fingerprint(request.csr.public_key()):
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned with another key")
        region, certificate_id = record.region, record.certificate_id
        cert = self._issuer.certificate(certificate_id, region) if region and certificate_id else None
        if region is None or cert is None or not cert.active or cert.certificate_pem is None:
            raise AlreadyProvisioned(f"{request.thing_name} is provisioned but its certificate is no longer active; "
                                     "an operator must reset it (admin reset)")
        location = self._locator.locate(client_ip)
        choice = RegionChoice(region, self._regions.distance_km(location, region), "previous",
                              location.country if location else None)
        issued = IssuedCertificate(region, cert.certificate_id, cert.certificate_pem, self._issuer.endpoint(region),
                                   thing_name=request.thing_name)
        return ProvisioningResult(request.thing_name, choice, issued,
                                  "already provisioned with this key: the same certificate again")

    def _undo(self, claim: Claim, issued: IssuedCertificate | None, cause: Exception, leftover: str | None) -> None:
        """Compensate in reverse order. A failure here is logged and never hides the original error; the claim
        is released anyway (no stuck device) with last_error naming what is left for the audit."""
        log.error("provisioning %s failed, rolling back: %s: %s", claim.thing_name, type(cause).__name__, cause)
        error = f"{type(cause).__name__}: {cause}"
        if leftover:  # the issuer could not undo all of its own steps
            error = f"rollback incomplete, {leftover}; {error}"
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
