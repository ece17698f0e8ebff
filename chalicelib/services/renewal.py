"""Day two, POST /device-renewal: a new certificate (and key) for a device, in the region that is now right for it;
and the re-key of a server-made key lost with its answer. Verified here (the timestamp; the lost-answer rule; the
one 403 for every mismatch; a new key), then issued by the one sequence (services/saga.py) with the renewal plan,
which retires the previous certificate once the new one is recorded (a failure there is finished by the next
renewal or `admin audit --fix`). A re-key is the same plan in place, without a CSR, with `begin_rekey`.
"""
from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from chalicelib.domain import deadline as deadlines
from chalicelib.domain.answers import Answer
from chalicelib.domain.certificates import CertificateInfo, CertificateRef, Certified, IssuedCertificate
from chalicelib.domain.clock import utcnow
from chalicelib.domain.deadline import DEFAULT_BUDGET_SECONDS, LEASE_MARGIN_SECONDS, Deadline
from chalicelib.domain.decoys import signed_by
from chalicelib.domain.errors import AlreadyProvisioned, MalformedRequest, RenewalInProgress, RenewalRefused
from chalicelib.domain.keypolicy import key_fingerprint, public_key_pem
from chalicelib.domain.records import Claim, PendingIssue, RenewalState, RenewedCertificate
from chalicelib.domain.regions import Location, RegionChoice, RegionPolicy
from chalicelib.domain.relocation import RELOCATED, RENEWAL, RelocationPolicy
from chalicelib.domain.requests import RenewalRequest, check_fresh, remembered
from chalicelib.domain.steps import Steps
from chalicelib.ports.geo import GeoLocator
from chalicelib.ports.issuer import Issuer
from chalicelib.ports.registry import RenewalRegistry
from chalicelib.services.admission import Admission
from chalicelib.services.saga import Checkpoint, Plan, Saga, again, no_checkpoint

log = logging.getLogger(__name__)
REKEYED = "rekeyed"  # the answer's reason for a re-key (a lost answer's new server-made key, in place)
Begin = Callable[[datetime, int, PendingIssue], Claim]  # takes the renewal lease, writing the intent ahead with it


class Renewal(Plan):
    """The renewal plan: a provisioned device's renewal lease (`begin`); the commit makes the new certificate current,
    then the previous one is retired."""

    kind, stages, commit_step, after_step = "renewal", "renewal-", "complete", "retire"

    def __init__(self, service: RenewalService, state: RenewalState, csr: x509.CertificateSigningRequest | None,
                 choice: RegionChoice, location: Location | None, begin: Begin, admit: bool, arn: str | None) -> None:
        assert state.certificate_id is not None
        self.thing_name, self.region, self.csr, self.choice = state.thing_name, choice.region, csr, choice
        self.in_place, self.admit = choice.region == state.region, admit
        self.moves = not self.in_place
        self.note: str | None = None
        self.keep = (state.certificate_id, state.previous_certificate_id)  # never what a dead renewal left
        self._service, self._state, self._location, self._begin, self._arn = service, state, location, begin, arn

    def claim(self, now: datetime, lease_seconds: int, intent: PendingIssue) -> Claim:
        return self._begin(now, lease_seconds, intent)

    def reused(self, issued: IssuedCertificate) -> None:
        """The dead renewal's certificate, for this very key: its region is where the device goes."""
        self.in_place = issued.region == self._state.region
        self.moves = not self.in_place
        if issued.region != self.choice.region:
            self.choice = self._service.regions.place(self._location, issued.region,
                                                      RENEWAL if self.in_place else RELOCATED)
        self.note = "an earlier renewal with this key was interrupted: its certificate, not a second one"

    def commit(self, claim: Claim, certified: Certified, now: datetime) -> None:
        issued, moved = certified.issued, not self.in_place
        self._service.registry.complete_renewal(claim, RenewedCertificate(
            issued.region, issued.certificate_id, certified.public_key, certified.fingerprint, certified.expires,
            self.choice.country if moved else None, RELOCATED if moved else None, certified.server_key), now)

    def after(self, issued: IssuedCertificate) -> None:
        state = self._state
        self._service.retire(RenewalState(state.thing_name, True, issued.region, issued.certificate_id,
                                          previous_certificate_id=state.certificate_id,
                                          previous_region=state.region, retire_pending=True), self._arn)


class RenewalService:
    def __init__(self, registry: RenewalRegistry, issuer: Issuer, locator: GeoLocator, regions: RegionPolicy,
                 relocation: RelocationPolicy, lease_seconds: int | None = None,
                 clock: Callable[[], datetime] = utcnow, skew_seconds: int = 300,
                 admission: Admission | None = None, budget_seconds: float = DEFAULT_BUDGET_SECONDS,
                 lease_margin_seconds: int = LEASE_MARGIN_SECONDS, checkpoint: Checkpoint = no_checkpoint) -> None:
        self.registry, self._issuer, self._locator, self.regions = registry, issuer, locator, regions
        self._relocation, self._clock, self._skew, self._budget = relocation, clock, skew_seconds, budget_seconds
        self._lease_seconds, self._lease_margin = lease_seconds, lease_margin_seconds
        self._saga = Saga(registry, issuer, admission, lease_seconds, lease_margin_seconds, clock, checkpoint)

    def renew(self, request: RenewalRequest, client_ip: str, steps: Steps | None = None,
              deadline: Deadline | None = None) -> Answer:
        deadline, steps = deadline or Deadline(self._budget), steps or Steps()
        with deadlines.running(deadline):
            with steps.step("verify"):
                check_fresh(request.timestamp, self._clock(), self._skew)
                found = self.registry.renewal_state(request.thing_name)
                state = found if found and found.provisioned and found.region and found.certificate_id else None
                if state is not None:
                    recovered = self._lost_answer(request, state, client_ip)
                    if recovered is not None:
                        return recovered
                    state = self._unanswered(request, state)
                try:  # an unknown device is refused by the same work as a wrong certificate id or key
                    current = self._verify(request, state)
                except RenewalRefused:
                    return self._recovered_meanwhile(request, state, client_ip)
                assert state is not None and state.certificate_id is not None and state.region is not None
                certificate_id, region = state.certificate_id, state.region

            def begin(now: datetime, lease: int, intent: PendingIssue) -> Claim:
                return self.registry.begin_renewal(request.thing_name, certificate_id, now, lease,
                                                   remembered(request.nonce, now, self._skew), intent)
            try:
                return self._reissue(state, request.csr, client_ip, steps, deadline, begin, admit=True,
                                     arn=current.arn, decide=lambda location: self._relocation.decide(
                                         region, location, self.regions))
            except RenewalRefused:  # only the lease refuses so: another renewal may have been recorded meanwhile
                return self._recovered_meanwhile(request, state, client_ip)

    def rekey(self, thing_name: str, client_ip: str, fleet_key: bool, window_seconds: int,
              steps: Steps | None = None, deadline: Deadline | None = None) -> Answer:
        """A server-made key lost with its answer: the device asks again (checked, admitted, its nonce used up by
        provisioning) within `window_seconds`: a renewal in place with a new key pair."""
        deadline = deadline or Deadline(self._budget)
        state = self.registry.renewal_state(thing_name)
        if state is None or not state.provisioned or not state.region or not state.certificate_id:
            raise AlreadyProvisioned(f"{thing_name} is not provisioned any more; ask again")
        region = state.region

        def begin(now: datetime, lease: int, intent: PendingIssue) -> Claim:
            # Not while the provisioning request may still be answering (a lease's time): a duplicate request
            # then waits (409) instead of revoking the certificate that answer carries.
            return self.registry.begin_rekey(thing_name, now, lease, window_seconds, fleet_key,
                                             math.ceil(self._lease_window()), intent)

        with deadlines.running(deadline):
            return self._reissue(state, None, client_ip, steps or Steps(), deadline, begin, admit=False, arn=None,
                                 decide=lambda location: self.regions.place(location, region, REKEYED))

    def _reissue(self, state: RenewalState, csr: x509.CertificateSigningRequest | None, client_ip: str,
                 steps: Steps, deadline: Deadline, begin: Begin, admit: bool,
                 arn: str | None, decide: Callable[[Location | None], RegionChoice]) -> Answer:
        """A renewal's and a re-key's issuance: finish what an earlier renewal left, choose, then the sequence."""
        assert state.certificate_id is not None
        if state.retire_pending:  # an earlier renewal was cut short after its record: finish it first
            with steps.step("retire"):
                self.retire(state)
        with steps.step("geo"):
            location = self._locator.locate(client_ip)
            plan = Renewal(self, state, csr, decide(location), location, begin, admit, arn)
        issued, _ = self._saga.run(plan, steps, deadline)
        return Answer(state.thing_name, plan.choice, issued, plan.note, previous_certificate_id=state.certificate_id)

    def _verify(self, request: RenewalRequest, state: RenewalState | None) -> CertificateInfo:
        """The one 403 for every mismatch, each after the same signature work: an unknown or unprovisioned device
        (`state` None) and a wrong certificate id are checked against a decoy key. Then the CSR's key must be new.
        Returns the current certificate."""
        known = (state if state is not None and state.provisioned and state.region
                 and state.certificate_id == request.certificate_id else None)
        current, pem = None, known.public_key if known is not None else None
        if known is not None and pem is None:
            # provisioned before the registry kept keys: read it once from the certificate, keep it
            current = self._issuer.certificate(request.certificate_id, known.region)
            if current is None or current.certificate_pem is None:
                raise RenewalRefused()
            pem = public_key_pem(x509.load_pem_x509_certificate(current.certificate_pem.encode()).public_key())
            self.registry.set_public_key(known.thing_name, request.certificate_id, pem)
        if not _signed_by(pem, request) or known is None:
            raise RenewalRefused()
        # Revocation is the issuer's to know (an operator may have revoked the certificate there).
        current = current or self._issuer.certificate(request.certificate_id, known.region)
        if current is None or not current.active:
            raise RenewalRefused()
        if request.csr is not None and key_fingerprint(request.csr.public_key()) == known.fingerprint:
            raise MalformedRequest("CSR refused: the new key must differ from the current certificate's key",
                                   "malformed-csr")
        return current

    def _lost_answer(self, request: RenewalRequest, state: RenewalState, client_ip: str) -> Answer | None:
        """The device lost the answer to its renewal: it still holds only its previous certificate and key, and
        asks again with the key it sent. It gets the current certificate back; nothing is created."""
        if (request.csr is None or state.previous_certificate_id is None
                or request.certificate_id != state.previous_certificate_id or state.previous_public_key is None
                or key_fingerprint(request.csr.public_key()) != state.fingerprint
                or not _signed_by(state.previous_public_key, request)):
            return None
        assert state.region is not None and state.certificate_id is not None
        issued = again(self._issuer, state.thing_name, state.region, state.certificate_id)
        if issued is None:
            raise RenewalRefused()
        if state.retire_pending:  # the renewal whose answer was lost may have died before retiring its previous
            try:
                self.retire(state)
            except Exception:
                log.exception("renewal of %s: the previous certificate %s in %s is not retired yet",
                              state.thing_name, state.previous_certificate_id, state.previous_region)
        return Answer(state.thing_name, self.regions.place(self._locator.locate(client_ip), state.region, RENEWAL),
                      issued, previous_certificate_id=state.previous_certificate_id, recovered=True)

    def _unanswered(self, request: RenewalRequest, state: RenewalState) -> RenewalState:
        """The previous certificate and key ask for another key than the last renewal recorded, which never retired
        the previous certificate: it died before answering. A lease's time later its certificate goes to the
        write-ahead record (the settler revokes it) and the previous one is current again; returns that state."""
        if (not state.retire_pending or state.previous_certificate_id is None or state.previous_public_key is None
                or state.previous_region is None or state.certificate_id is None or state.last_renewal is None
                or request.certificate_id != state.previous_certificate_id or self._just_renewed(state)
                or not _signed_by(state.previous_public_key, request)):
            return state
        previous = self._issuer.certificate(state.previous_certificate_id, state.previous_region)
        if previous is None or not previous.active:  # revoked meanwhile (an operator, the audit): nothing to go on
            raise RenewalRefused()
        fingerprint = key_fingerprint(serialization.load_pem_public_key(state.previous_public_key.encode()))
        if self.registry.reopen_renewal(state.thing_name, state.certificate_id, fingerprint, self._clock()):
            log.warning("renewal of %s: certificate %s was recorded but never answered; set aside for the settler",
                        state.thing_name, state.certificate_id)
        return self.registry.renewal_state(state.thing_name) or state

    def _recovered_meanwhile(self, request: RenewalRequest, seen: RenewalState | None, client_ip: str) -> Answer:
        """A refused request may have lost a race with a renewal recorded meanwhile: the same request is then a lost
        answer; another one, signed for the certificate current until just now, is told 409; else the 403. Every
        refusal comes this way, an unknown device's too (`seen` None): the same reads whatever the cause."""
        later = self.registry.renewal_state(request.thing_name)
        if later is None:
            raise RenewalRefused()
        if later.certificate_id != (seen.certificate_id if seen else None):
            recovered = self._lost_answer(request, later, client_ip)
            if recovered is not None:
                return recovered
        if (request.certificate_id == later.previous_certificate_id and later.previous_public_key is not None
                and self._just_renewed(later) and _signed_by(later.previous_public_key, request)):
            raise RenewalInProgress(f"{request.thing_name} was renewed by another request just now", retry_after=1)
        raise RenewalRefused()

    def retire(self, state: RenewalState, arn: str | None = None) -> None:
        """Revoke the previous certificate, and after a move delete the old region's thing; then say so."""
        assert state.previous_certificate_id is not None and state.previous_region is not None
        self._issuer.revoke(CertificateRef(state.previous_region, state.previous_certificate_id, state.thing_name,
                                           arn), delete_thing=state.previous_region != state.region)
        self.registry.previous_retired(state.thing_name, state.previous_certificate_id)

    def _lease_window(self) -> float:
        """How long a renewal can hold its lease: a request's whole time plus the margin."""
        return self._lease_seconds or self._budget + self._lease_margin

    def _just_renewed(self, state: RenewalState) -> bool:
        """A renewal completed less than a lease's time ago: its request may still be answering."""
        return state.last_renewal is not None and (
            self._clock() - datetime.fromisoformat(state.last_renewal)).total_seconds() <= self._lease_window()


def _signed_by(public_key_pem_text: str | None, request: RenewalRequest) -> bool:
    """Whether the request is signed by the key (None: no key; a decoy does the same work, domain/decoys.py)."""
    try:
        return signed_by(public_key_pem_text, request.signed_text(), request.signature)
    except ValueError:
        log.error("the certificate key kept for %s cannot be read", request.thing_name)
        return False
