"""The orchestrator: verify, claim, locate, choose a region, issue, record. Collaborators are passed in."""
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from chalicelib import deadline as deadlines
from chalicelib.admission import Admission
from chalicelib.clock import timestamp, utcnow
from chalicelib.deadline import DEFAULT_BUDGET_SECONDS, LEASE_MARGIN_SECONDS, Deadline
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
from chalicelib.regions import Location, RegionChoice, RegionPolicy
from chalicelib.registry.base import PROVISIONED, Claim, Nonce, PendingIssue, Registry
from chalicelib.settle import Settler
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


class Reissued(Protocol):
    @property
    def choice(self) -> RegionChoice: ...

    @property
    def issued(self) -> IssuedCertificate: ...


class Rekeyer(Protocol):
    """Gives a device provisioned with a server-made key a new certificate and key (renewal.RenewalService)."""

    def rekey(self, thing_name: str, client_ip: str, fleet_key: bool, window_seconds: int,
              steps: Steps | None = None, deadline: Deadline | None = None) -> Reissued: ...


def key_fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo DER, hex: what the registry remembers of a device's key."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return digest.finalize().hex()


# What the steps after the claim may take at worst (seconds), each checked against the request's deadline
# before it starts; the rollback reserve comes on top (chalicelib/deadline.py).
ISSUE_SECONDS = 8.0      # AWS IoT: thing and certificate side by side, then two attachments
FINALIZE_SECONDS = 4.0   # one conditional registry write, one attempt


def no_checkpoint(boundary: str, thing_name: str) -> None:
    pass


def public_key_pem(public_key: PublicKeyTypes) -> str:
    """What the registry keeps of a certificate's key, so a renewal's signature needs no issuer call."""
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class ProvisioningService:
    def __init__(self, registry: Registry, issuer: Issuer, locator: GeoLocator, regions: RegionPolicy,
                 verifier: FleetKeyVerifier, lease_seconds: int | None = None,
                 clock: Callable[[], datetime] = utcnow, allow_v1: bool = True, skew_seconds: int = 300,
                 budget_seconds: float = DEFAULT_BUDGET_SECONDS, lease_margin_seconds: int = LEASE_MARGIN_SECONDS,
                 checkpoint: Callable[[str, str], None] = no_checkpoint,
                 admission: Admission | None = None, rekeyer: Rekeyer | None = None,
                 rekey_window_seconds: int = 0) -> None:
        self._registry = registry
        self._issuer = issuer
        self._locator = locator
        self._regions = regions
        self._verifier = verifier
        self._lease_seconds = lease_seconds  # None: derived from the request's deadline
        self._lease_margin = lease_margin_seconds
        self._budget = budget_seconds
        self._clock = clock
        self._allow_v1 = allow_v1
        self._skew = skew_seconds
        self._settler = Settler(registry, issuer)
        # Called at each step boundary (claimed, issued, recorded, finalized): the crash tests stop the process
        # there; a no-op otherwise.
        self._checkpoint = checkpoint
        self._admission = admission
        self._rekeyer = rekeyer if rekey_window_seconds else None  # 0: no re-key, an operator resets
        self._rekey_window = rekey_window_seconds

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def issuer(self) -> Issuer:
        return self._issuer

    def provision(self, request: ProvisioningRequest, client_ip: str, steps: Steps | None = None,
                  deadline: Deadline | None = None) -> ProvisioningResult:
        deadline = deadline or Deadline(self._budget)
        with deadlines.running(deadline):
            return self._provision(request, client_ip, steps or Steps(), deadline)

    def _provision(self, request: ProvisioningRequest, client_ip: str, steps: Steps,
                   deadline: Deadline) -> ProvisioningResult:
        with steps.step("verify"):
            fleet_key = self._authenticate(request)
        # The region is known before the claim, so the request is admitted against that region's budget
        # (admission control) before it holds a claim or spends any IoT call.
        with steps.step("geo"):
            location = self._locator.locate(client_ip)
            choice = self._regions.choose(location)
        if self._admission is not None:
            with steps.step("admit"):
                # A request too late to issue anyway takes no slot of the region's budget.
                deadline.require("admitting the device", ISSUE_SECONDS + FINALIZE_SECONDS)
                try:
                    self._admission.admit(choice.region, server_key=request.csr is None)
                except ServiceUnavailable:
                    # An answer that issues nothing (a lost answer asked for again) is not kept waiting.
                    record = self._registry.get(request.thing_name)
                    if record is None or record.status is not PROVISIONED or request.csr is None:
                        raise  # a re-key issues: it waits for the region's budget like any issue
                    return self._earlier_answer(request, AlreadyProvisioned("", record=record), client_ip,
                                                fleet_key, steps, deadline)
        earlier: AlreadyProvisioned | None = None
        with steps.step("claim"):
            deadline.require("claiming the device", ISSUE_SECONDS + FINALIZE_SECONDS)
            now = self._clock()
            # The nonce is recorded only now, for a correctly signed request: nobody can use up a device's.
            nonce = (Nonce(request.nonce, now + timedelta(seconds=2 * self._skew))
                     if request.nonce is not None else None)
            lease = self._lease_seconds or deadline.lease_seconds(self._lease_margin)
            try:
                claim = self._registry.claim(request.thing_name, now, lease, fleet_key, nonce)
            except AlreadyProvisioned as refused:
                earlier = refused
        if earlier is not None:
            return self._earlier_answer(request, earlier, client_ip, fleet_key, steps, deadline)
        self._checkpoint("claimed", request.thing_name)
        issued, issuing = None, False
        # Whether the write-ahead record may describe something that still exists, and whether the issuer,
        # should it fail, can be trusted to have undone its own steps.
        left, issuer_cleans_up, intent = claim.previous is not None, False, None
        wanted = key_fingerprint(request.csr.public_key()) if request.csr is not None else None
        try:
            if claim.previous is not None:
                with steps.step("settle"):
                    settled = self._settler.settle(claim, wanted)
                left = settled.reused is not None  # the record describes it until finalize clears it
                if settled.reused is not None:
                    return self._finalize_reused(request, claim, settled.reused, wanted, location, steps)
            deadline.require("issuing the certificate", ISSUE_SECONDS + FINALIZE_SECONDS)
            intent = PendingIssue(choice.region, self._clock(), wanted)
            with steps.step("intent"):
                self._registry.record_intent(claim, intent)
            left, issuer_cleans_up = True, True
            with steps.step("issue"):
                issuing = True
                issued = self._issuer.issue(request.thing_name, choice.region, request.csr)
            issuer_cleans_up = False
            self._checkpoint("issued", request.thing_name)
            with steps.step("record"):
                self._registry.record_certificate(claim, issued.certificate_id, issued.created_thing)
            self._checkpoint("recorded", request.thing_name)
            deadline.require("recording the device", FINALIZE_SECONDS)
            with steps.step("finalize"):
                certificate = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
                public_key = request.csr.public_key() if request.csr is not None else certificate.public_key()
                self._registry.finalize(claim, choice.region, issued.certificate_id, self._clock(),
                                        key_fingerprint(public_key), choice.country, choice.reason,
                                        public_key_pem(public_key), timestamp(certificate.not_valid_after_utc),
                                        server_key=request.csr is None)
            self._checkpoint("finalized", request.thing_name)
        except Exception as exc:
            cause = exc.error if isinstance(exc, IssueIncomplete) else exc
            # An issuer's domain error means it undid its own steps (else it raises IssueIncomplete).
            trusted = issuer_cleans_up and isinstance(exc, ProvisioningError)
            with steps.step("rollback"), deadline.rolling_back():
                self._undo(claim, issued, exc, left and not trusted, intent)
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

    def _finalize_reused(self, request: ProvisioningRequest, claim: Claim, issued: IssuedCertificate,
                         fingerprint: str | None, location: Location | None, steps: Steps) -> ProvisioningResult:
        """The dead attempt's certificate for this very key: finalize with it, issue nothing."""
        choice = RegionChoice(issued.region, self._regions.distance_km(location, issued.region), "previous",
                              location.country if location else None)
        certificate = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
        with steps.step("finalize"):
            self._registry.finalize(claim, issued.region, issued.certificate_id, self._clock(),
                                    fingerprint or key_fingerprint(certificate.public_key()), choice.country,
                                    choice.reason, public_key_pem(certificate.public_key()),
                                    timestamp(certificate.not_valid_after_utc))
        self._checkpoint("finalized", request.thing_name)
        return ProvisioningResult(request.thing_name, choice, issued,
                                  "an earlier attempt with this key was interrupted: its certificate, not a second one")

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

    def _earlier_answer(self, request: ProvisioningRequest, refused: AlreadyProvisioned, client_ip: str,
                        fleet_key: bool, steps: Steps, deadline: Deadline) -> ProvisioningResult:
        """A provisioned device asks again: its earlier answer was lost. With the same key (CSR) it gets the
        same certificate, and nothing is created. A server-made key was never kept: within the re-key window the
        device gets a new certificate and key and the previous certificate is revoked (RenewalService.rekey);
        after it, an operator resets the device."""
        record = refused.record
        if request.csr is None:
            if self._rekeyer is not None and record is not None and record.server_key:
                if request.version == 1:  # never changes: whoever saw it once would get the key (README, "Security")
                    raise AlreadyProvisioned(f"{request.thing_name} is already provisioned; a request signed v1 can "
                                             "be replayed, so it is never re-keyed: ask again signed v2 within the "
                                             "re-key window, or an operator resets it (admin reset)")
                rekeyed = self._rekeyer.rekey(request.thing_name, client_ip, fleet_key, self._rekey_window,
                                              steps, deadline)
                self._checkpoint("rekeyed", request.thing_name)
                return ProvisioningResult(request.thing_name, rekeyed.choice, rekeyed.issued,
                                          "the earlier answer's key was made here and is not kept: a new certificate "
                                          "and key, the previous certificate revoked")
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

    def _undo(self, claim: Claim, issued: IssuedCertificate | None, failure: Exception, unsure: bool,
              intent: PendingIssue | None) -> None:
        """Compensate in reverse order. A failure here is logged and never hides the original error; the claim
        is released anyway (no stuck device) with last_error naming what is left, and the write-ahead record
        kept when something may be left, so the next claim or the audit settles it."""
        cause = failure.error if isinstance(failure, IssueIncomplete) else failure
        log.error("provisioning %s failed, rolling back: %s: %s", claim.thing_name, type(cause).__name__, cause)
        error = f"{type(cause).__name__}: {cause}"
        incomplete = self._settler.before_rollback(claim, intent, failure, unsure and issued is None, claim.thing_name)
        if isinstance(failure, IssueIncomplete):  # the issuer could not undo all of its own steps
            error = f"rollback incomplete, {failure.leftover}; {error}"
        if issued is not None:
            try:
                self._issuer.revoke(issued, keep_thing=not issued.created_thing)
            except Exception:
                log.exception("rollback of %s incomplete: certificate %s in %s may still be active",
                              claim.thing_name, issued.certificate_id, issued.region)
                error = f"rollback incomplete, certificate {issued.certificate_id} in {issued.region}; {error}"
                incomplete = True
        try:
            self._registry.release(claim, error[:500], keep_pending=incomplete)
        except Exception:
            log.exception("could not release the claim on %s; it frees itself when the lease ends",
                          claim.thing_name)
