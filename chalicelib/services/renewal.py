"""Day two: POST /device-renewal renews a device's certificate, rotates its key and moves it to the region
that is now right for it, exactly once (design.md, "Wire protocol"; README, "Renewal").

Order of a renewal: check the timestamp; read the device; the lost-answer rule; the one 403 for every
mismatch; the CSR's key must be new; finish an earlier renewal's retirement; choose the region; take the
renewal lease (with the nonce); settle what a dead renewal left (chalicelib/services/settle.py); write what is about to
be issued (write-ahead); issue (in the new region first when moving); record its certificate id at once;
complete; retire the previous certificate (and the old region's thing). Every step starts only when it fits in
the request's deadline (chalicelib/domain/deadline.py), as provisioning's do. A failure before the completion undoes
the new certificate and gives the lease back; a failure after it leaves the previous certificate marked for
retirement, which the next renewal or `admin audit --fix` finishes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from chalicelib.domain import deadline as deadlines
from chalicelib.domain.certificates import CertificateInfo, CertificateRef, IssuedCertificate
from chalicelib.domain.clock import timestamp, utcnow
from chalicelib.domain.deadline import DEFAULT_BUDGET_SECONDS, LEASE_MARGIN_SECONDS, Deadline
from chalicelib.domain.errors import (
    RENEWAL_REFUSED,
    AlreadyProvisioned,
    IssueIncomplete,
    MalformedRequest,
    ProvisioningError,
    RenewalInProgress,
    RenewalRefused,
    ServiceUnavailable,
    SignatureInvalid,
)
from chalicelib.domain.keypolicy import key_fingerprint, public_key_pem
from chalicelib.domain.records import Claim, Nonce, PendingIssue, RenewalState, RenewedCertificate
from chalicelib.domain.regions import Location, RegionChoice, RegionPolicy
from chalicelib.domain.relocation import RELOCATED, RENEWAL, RelocationPolicy
from chalicelib.domain.requests import RenewalRequest
from chalicelib.domain.signatures import verifies
from chalicelib.domain.steps import Steps
from chalicelib.ports.geo import GeoLocator
from chalicelib.ports.issuer import RenewalIssuer
from chalicelib.ports.registry import RenewalRegistry
from chalicelib.services.admission import Admission
from chalicelib.services.provisioning import FINALIZE_SECONDS, ISSUE_SECONDS, no_checkpoint
from chalicelib.services.settle import RenewalSettler

log = logging.getLogger(__name__)
REKEYED = "rekeyed"  # the answer's reason for a re-key (a lost answer's new server-made key, in place)

@dataclass(frozen=True)
class RenewalResult:
    thing_name: str
    choice: RegionChoice
    issued: IssuedCertificate
    previous_certificate_id: str
    recovered: bool = False  # the lost-answer rule gave back the current certificate; nothing was created
    note: str | None = None  # wire.response_body's `message`: set when a dead renewal's certificate is given


class _Recovered(Exception):
    """A refused renewal lease turned out to be a lost answer: the answer, carried out of `_reissue`."""

    def __init__(self, result: RenewalResult) -> None:
        super().__init__(result.thing_name)
        self.result = result


def refused() -> RenewalRefused:
    return RenewalRefused(RENEWAL_REFUSED)


class RenewalService:
    def __init__(self, registry: RenewalRegistry, issuer: RenewalIssuer, locator: GeoLocator, regions: RegionPolicy,
                 relocation: RelocationPolicy, lease_seconds: int | None = None,
                 clock: Callable[[], datetime] = utcnow, skew_seconds: int = 300,
                 admission: Admission | None = None, budget_seconds: float = DEFAULT_BUDGET_SECONDS,
                 lease_margin_seconds: int = LEASE_MARGIN_SECONDS,
                 checkpoint: Callable[[str, str], None] = no_checkpoint) -> None:
        self._registry = registry
        self._issuer = issuer
        self._locator = locator
        self._regions = regions
        self._relocation = relocation
        self._lease_seconds = lease_seconds  # None: derived from the request's deadline, as provisioning's
        self._lease_margin = lease_margin_seconds
        self._budget = budget_seconds
        self._clock = clock
        self._skew = skew_seconds
        self._admission = admission
        self._settler = RenewalSettler(registry, issuer)
        # Called at each step boundary (renewal-claimed, -issued, -recorded, -completed): the crash tests stop the
        # process there; a no-op otherwise.
        self._checkpoint = checkpoint

    def renew(self, request: RenewalRequest, client_ip: str, steps: Steps | None = None,
              deadline: Deadline | None = None) -> RenewalResult:
        deadline = deadline or Deadline(self._budget)
        with deadlines.running(deadline):
            return self._renew(request, client_ip, steps or Steps(), deadline)

    def _renew(self, request: RenewalRequest, client_ip: str, steps: Steps, deadline: Deadline) -> RenewalResult:
        with steps.step("verify"):
            self._check_timestamp(request)
            state = self._registry.renewal_state(request.thing_name)
            if state is None or not state.provisioned or not state.region or not state.certificate_id:
                raise refused()
            recovered = self._lost_answer(request, state, client_ip)
            if recovered is not None:
                return recovered
            state = self._unanswered(request, state)
            if not state.provisioned or not state.region or not state.certificate_id:  # reset meanwhile
                raise refused()
            try:
                current = self._verify(request, state)
            except RenewalRefused:
                recovered = self._recovered_meanwhile(request, state, client_ip)
                if recovered is not None:
                    return recovered
                raise
        certificate_id, region = state.certificate_id, state.region

        def begin(now: datetime, lease: int) -> Claim:
            try:
                return self._registry.begin_renewal(request.thing_name, certificate_id, now, lease,
                                                    Nonce(request.nonce, now + timedelta(seconds=2 * self._skew)))
            except RenewalRefused:
                recovered = self._recovered_meanwhile(request, state, client_ip)
                if recovered is not None:
                    raise _Recovered(recovered) from None
                raise

        try:
            return self._reissue(state, request.csr, client_ip, steps, deadline, begin,
                                 lambda location: self._relocation.decide(region, location, self._regions),
                                 admit=True, arn=current.arn)
        except _Recovered as done:
            return done.result

    def rekey(self, thing_name: str, client_ip: str, fleet_key: bool, window_seconds: int,
              steps: Steps | None = None, deadline: Deadline | None = None) -> RenewalResult:
        """A device provisioned with a server-made key lost the answer (and the key with it) and asks again, signed
        as for provisioning, without a CSR, within `window_seconds` of its provisioning: a new certificate and key in
        its region, the previous certificate revoked once the new one is recorded, exactly as a renewal in place
        (the lease, the write-ahead record, the settler, the retirement the audit finishes). The caller checked the
        signature and admitted the request; its nonce is used up already."""
        deadline = deadline or Deadline(self._budget)
        state = self._registry.renewal_state(thing_name)
        if state is None or not state.provisioned or not state.region or not state.certificate_id:
            raise AlreadyProvisioned(f"{thing_name} is not provisioned any more; ask again")
        region = state.region

        def begin(now: datetime, lease: int) -> Claim:
            # Not while the provisioning request may still be answering (a lease's time): a duplicate request
            # then waits (409) instead of revoking the certificate that answer carries.
            return self._registry.begin_rekey(thing_name, now, lease, window_seconds, fleet_key,
                                              math.ceil(self._lease_window()))

        def decide(location: Location | None) -> RegionChoice:
            return RegionChoice(region, self._regions.distance_km(location, region), REKEYED,
                                location.country if location else None)

        with deadlines.running(deadline):
            return self._reissue(state, None, client_ip, steps or Steps(), deadline, begin, decide, admit=False,
                                 arn=None)

    def _reissue(self, state: RenewalState, csr: x509.CertificateSigningRequest | None, client_ip: str,
                 steps: Steps, deadline: Deadline, begin: Callable[[datetime, int], Claim],
                 decide: Callable[[Location | None], RegionChoice], admit: bool, arn: str | None) -> RenewalResult:
        """From the lease to the retirement: what a renewal and a re-key share."""
        thing_name = state.thing_name
        assert state.region is not None and state.certificate_id is not None
        if state.retire_pending:  # an earlier renewal was cut short after its record: finish it first
            with steps.step("retire"):
                self._retire(state)
        with steps.step("geo"):
            location = self._locator.locate(client_ip)
            choice = decide(location)
        if admit and self._admission is not None:  # a renewal spends the same IoT quotas as provisioning
            with steps.step("admit"):
                deadline.require("admitting the renewal", ISSUE_SECONDS + FINALIZE_SECONDS)
                self._admission.admit(choice.region, server_key=csr is None)
        with steps.step("claim"):
            deadline.require("taking the renewal lease", ISSUE_SECONDS + FINALIZE_SECONDS)
            claim = begin(self._clock(), self._lease_seconds or deadline.lease_seconds(self._lease_margin))
        self._checkpoint("renewal-claimed", thing_name)
        in_place = choice.region == state.region
        wanted = key_fingerprint(csr.public_key()) if csr is not None else None
        own = (state.certificate_id, state.previous_certificate_id)  # never what a dead renewal left
        issued, intent, reused = None, None, False
        # Whether the write-ahead record may describe something that still exists, and whether the issuer, should
        # it fail, can be trusted to have undone its own steps (as in provisioning).
        left, issuer_cleans_up, issuing = claim.previous is not None, False, False
        try:
            if claim.previous is not None:
                with steps.step("settle"):
                    settled = self._settler.settle(claim, wanted, own)
                left = reused = settled.reused is not None  # the record describes it until the completion clears it
                if settled.reused is not None:  # the dead renewal's certificate, for this very key: no second one
                    issued = settled.reused
                    choice = self._choice_of(issued.region, state, location, choice)
                    in_place = issued.region == state.region
            if issued is None:
                deadline.require("issuing the certificate", ISSUE_SECONDS + FINALIZE_SECONDS)
                intent = PendingIssue(choice.region, self._clock(), wanted, move=not in_place)
                with steps.step("intent"):
                    self._registry.record_intent(claim, intent)
                left, issuer_cleans_up = True, True
                with steps.step("issue"):
                    issuing = True
                    issued = self._issuer.issue_renewal(thing_name, choice.region, csr, in_place)
                issuer_cleans_up = False
                self._checkpoint("renewal-issued", thing_name)
                with steps.step("record"):
                    self._registry.record_certificate(claim, issued.certificate_id, issued.created_thing)
                self._checkpoint("renewal-recorded", thing_name)
            deadline.require("recording the renewal", FINALIZE_SECONDS)
            with steps.step("complete"):
                certificate = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
                key = csr.public_key() if csr is not None else certificate.public_key()
                self._registry.complete_renewal(claim, RenewedCertificate(
                    choice.region, issued.certificate_id, public_key_pem(key), key_fingerprint(key),
                    timestamp(certificate.not_valid_after_utc), choice.country if not in_place else None,
                    RELOCATED if not in_place else None, csr is None), self._clock())
            self._checkpoint("renewal-completed", thing_name)
        except Exception as exc:
            cause = exc.error if isinstance(exc, IssueIncomplete) else exc
            with deadline.rolling_back():
                if issued is None or not self._recorded(thing_name, issued):
                    # An issuer's domain error means it undid its own steps (else it raises IssueIncomplete).
                    trusted = issuer_cleans_up and isinstance(exc, ProvisioningError)
                    with steps.step("rollback"):
                        # A dead renewal's certificate adopted for this key stays on the record for the next try.
                        self._undo(claim, None if reused else issued, in_place, exc, left and not trusted, intent, own)
                        if issuing and admit and self._admission is not None:  # the undo's IoT calls are paid for
                            self._admission.rollback(choice.region)
                    if isinstance(cause, ProvisioningError):
                        raise cause from (exc if cause is not exc else None)
                    raise ServiceUnavailable("renewal failed on the server side; try again later") from cause
            log.warning("renewal of %s: the record's answer failed (%s) but the record is there",
                        thing_name, type(exc).__name__)
        assert issued is not None
        with steps.step("retire"), deadline.rolling_back():  # nothing is left to roll back: the reserve is free
            try:
                self._retire(RenewalState(thing_name, True, choice.region, issued.certificate_id,
                                          previous_certificate_id=state.certificate_id, previous_region=state.region,
                                          retire_pending=True), arn)
            except Exception:  # the device has its new certificate; the next renewal or the audit finishes this
                log.exception("renewal of %s: the previous certificate %s in %s is not retired yet",
                              thing_name, state.certificate_id, state.region)
        note = "an earlier renewal with this key was interrupted: its certificate, not a second one" if reused else None
        return RenewalResult(thing_name, choice, issued, state.certificate_id, note=note)

    def _choice_of(self, region: str, state: RenewalState, location: Location | None,
                   chosen: RegionChoice) -> RegionChoice:
        """Where a dead renewal's certificate puts the device: its region, a move when it is not the current one."""
        if region == chosen.region:
            return chosen
        return RegionChoice(region, self._regions.distance_km(location, region),
                            RENEWAL if region == state.region else RELOCATED, location.country if location else None)

    # -- steps ----------------------------------------------------------------------------------------------

    def _check_timestamp(self, request: RenewalRequest) -> None:
        now = self._clock()
        skew = abs((now - request.timestamp).total_seconds())
        if skew > self._skew:
            raise SignatureInvalid(f"the timestamp is {skew:.0f} s away from the server's clock, "
                                   f"{timestamp(now)} (at most {self._skew} s allowed)", "stale-timestamp")

    def _verify(self, request: RenewalRequest, state: RenewalState) -> CertificateInfo:
        """The one 403 for every mismatch; then the CSR's key must be new. Returns the current certificate."""
        if request.certificate_id != state.certificate_id:
            raise refused()
        current = None
        pem = state.public_key
        if pem is None:  # provisioned before the registry kept keys: read it once from the certificate, keep it
            current = self._issuer.certificate(state.certificate_id, state.region)
            if current is None or current.certificate_pem is None:
                raise refused()
            pem = public_key_pem(x509.load_pem_x509_certificate(current.certificate_pem.encode()).public_key())
            self._registry.set_public_key(state.thing_name, state.certificate_id, pem)
        if not _signed_by(pem, request):
            raise refused()
        # Revocation is the issuer's to know (an operator may have revoked the certificate there).
        current = current or self._issuer.certificate(state.certificate_id, state.region)
        if current is None or not current.active:
            raise refused()
        if request.csr is not None and key_fingerprint(request.csr.public_key()) == state.fingerprint:
            raise MalformedRequest("CSR refused: the new key must differ from the current certificate's key",
                                   "malformed-csr")
        return current

    def _lost_answer(self, request: RenewalRequest, state: RenewalState, client_ip: str) -> RenewalResult | None:
        """The device lost the answer to its renewal: it still holds only its previous certificate and key, and
        asks again with the key it sent. It gets the current certificate back; nothing is created."""
        if (request.csr is None or state.previous_certificate_id is None
                or request.certificate_id != state.previous_certificate_id or state.previous_public_key is None
                or key_fingerprint(request.csr.public_key()) != state.fingerprint
                or not _signed_by(state.previous_public_key, request)):
            return None
        assert state.region is not None and state.certificate_id is not None
        cert = self._issuer.certificate(state.certificate_id, state.region)
        if cert is None or not cert.active or cert.certificate_pem is None:
            raise refused()
        if state.retire_pending:  # the renewal whose answer was lost may have died before retiring its previous
            try:
                self._retire(state)
            except Exception:
                log.exception("renewal of %s: the previous certificate %s in %s is not retired yet",
                              state.thing_name, state.previous_certificate_id, state.previous_region)
        location = self._locator.locate(client_ip)
        choice = RegionChoice(state.region, self._regions.distance_km(location, state.region), RENEWAL,
                              location.country if location else None)
        issued = IssuedCertificate(state.region, state.certificate_id, cert.certificate_pem,
                                   self._issuer.endpoint(state.region), thing_name=state.thing_name)
        return RenewalResult(state.thing_name, choice, issued, state.previous_certificate_id, recovered=True)

    def _unanswered(self, request: RenewalRequest, state: RenewalState) -> RenewalState:
        """The device asks again with its previous certificate and key, for another key than the one its last
        renewal recorded, and that renewal never retired the previous certificate: it died before answering (an
        answered renewal retires it at once). A lease's time after that renewal (a request still answering is
        over by then), its certificate is set aside on the write-ahead record, for the settler to revoke, and the
        previous certificate is current again; this renewal goes on from there. Returns the state to go on with."""
        if (not state.retire_pending or state.previous_certificate_id is None or state.previous_public_key is None
                or state.previous_region is None or state.certificate_id is None or state.last_renewal is None
                or request.certificate_id != state.previous_certificate_id
                or (self._clock() - datetime.fromisoformat(state.last_renewal)).total_seconds() <= self._lease_window()
                or not _signed_by(state.previous_public_key, request)):
            return state
        previous = self._issuer.certificate(state.previous_certificate_id, state.previous_region)
        if previous is None or not previous.active:  # revoked meanwhile (an operator, the audit): nothing to go on
            raise refused()
        fingerprint = key_fingerprint(serialization.load_pem_public_key(state.previous_public_key.encode()))
        if self._registry.reopen_renewal(state.thing_name, state.certificate_id, fingerprint, self._clock()):
            log.warning("renewal of %s: certificate %s was recorded but never answered; set aside for the settler",
                        state.thing_name, state.certificate_id)
        return self._registry.renewal_state(state.thing_name) or state

    def _recorded(self, thing_name: str, issued: IssuedCertificate) -> bool:
        """Whether a record whose answer failed (a timeout, a lost connection) was written after all."""
        try:
            state = self._registry.renewal_state(thing_name)
        except Exception as exc:
            # Undoing a certificate that may be recorded could leave the device with none: leave it to the
            # audit (an orphan once the lease ends) and to the device's retry (a lost-answer recovery).
            log.exception("renewal of %s: cannot tell whether certificate %s was recorded", thing_name,
                          issued.certificate_id)
            raise ServiceUnavailable("renewal failed on the server side; try again later") from exc
        return state is not None and state.certificate_id == issued.certificate_id

    def _recovered_meanwhile(self, request: RenewalRequest, seen: RenewalState,
                             client_ip: str) -> RenewalResult | None:
        """The request was refused: maybe another renewal of the device was recorded meanwhile (and revoked the
        certificate this request names). An identical request is then a lost-answer recovery; another one,
        correctly signed for the certificate that was current until just now, lost the race: 409, as while the
        winner was at work (a lease's time after that renewal it is just a stale certificate id: 403)."""
        later = self._registry.renewal_state(request.thing_name)
        if later is None:
            return None
        if later.certificate_id != seen.certificate_id:
            recovered = self._lost_answer(request, later, client_ip)
            if recovered is not None:
                return recovered
        if (request.certificate_id == later.previous_certificate_id and later.previous_public_key is not None
                and later.last_renewal is not None
                and (self._clock() - datetime.fromisoformat(later.last_renewal)).total_seconds() <= self._lease_window()
                and _signed_by(later.previous_public_key, request)):
            raise RenewalInProgress(f"{request.thing_name} was renewed by another request just now", retry_after=1)
        return None

    def _retire(self, state: RenewalState, arn: str | None = None) -> None:
        """Revoke the previous certificate, and after a move delete the old region's thing; then say so."""
        assert state.previous_certificate_id is not None and state.previous_region is not None
        self._issuer.retire(CertificateRef(state.previous_region, state.previous_certificate_id, state.thing_name,
                                           arn), delete_thing=state.previous_region != state.region)
        self._registry.previous_retired(state.thing_name, state.previous_certificate_id)

    def _lease_window(self) -> float:
        """How long a renewal can hold its lease: a request's whole time plus the margin."""
        return self._lease_seconds or self._budget + self._lease_margin

    def _undo(self, claim: Claim, issued: IssuedCertificate | None, in_place: bool, failure: Exception, unsure: bool,
              intent: PendingIssue | None, own: tuple[str | None, ...]) -> None:
        """Compensate, as provisioning does: retire the new certificate (and a thing this attempt made), give the
        lease back with last_error, and keep the write-ahead record when something may be left, so the next
        renewal or the audit settles it."""
        cause = failure.error if isinstance(failure, IssueIncomplete) else failure
        log.error("renewal of %s failed, rolling back: %s: %s", claim.thing_name, type(cause).__name__, cause)
        error = f"renewal: {type(cause).__name__}: {cause}"
        incomplete = self._settler.before_rollback(claim, intent, failure, unsure and issued is None,
                                                   f"the renewal of {claim.thing_name}", own)
        if isinstance(failure, IssueIncomplete):  # the issuer could not undo all of its own steps
            error = f"rollback incomplete, {failure.leftover}; {error}"
        if issued is not None:
            try:  # in place the device's thing holds its current certificate: only a thing this attempt made goes
                self._issuer.retire(CertificateRef(issued.region, issued.certificate_id, issued.thing_name,
                                                   issued.certificate_arn), delete_thing=issued.created_thing)
            except Exception:
                log.exception("rollback of the renewal of %s incomplete: certificate %s in %s may still be active",
                              claim.thing_name, issued.certificate_id, issued.region)
                error = f"rollback incomplete, certificate {issued.certificate_id} in {issued.region}; {error}"
                incomplete = True
        try:
            self._registry.abandon_renewal(claim, error[:500], keep_pending=incomplete)
        except Exception:
            log.exception("could not give back the renewal lease of %s; it ends by itself", claim.thing_name)


def _signed_by(public_key_pem_text: str, request: RenewalRequest) -> bool:
    try:
        key = serialization.load_pem_public_key(public_key_pem_text.encode())
    except ValueError:
        log.error("the certificate key kept for %s cannot be read", request.thing_name)
        return False
    return verifies(key, request.signed_text(), request.signature)
