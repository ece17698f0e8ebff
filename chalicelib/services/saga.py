"""The one issuance sequence; provisioning, renewal and re-key are small plans over it (docs/architecture.md):
admit beside the claim, which writes the write-ahead intent; settle what a dead attempt left (then write ahead);
issue; commit (the certificate's record); what follows. A failure before the commit is undone in reverse. The
stages between the steps are named (below): the crash tests stop a real process at each. In steady state: one
registry round, the issuer's rounds, one registry write. Each step starts only when it fits in the deadline.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from datetime import datetime
from typing import Callable

from cryptography import x509

from chalicelib.domain import deadline as deadlines
from chalicelib.domain.certificates import CertificateRef, Certified, IssuedCertificate, certify
from chalicelib.domain.clock import utcnow
from chalicelib.domain.deadline import Deadline
from chalicelib.domain.errors import IssueIncomplete, ProvisioningError, ServiceUnavailable
from chalicelib.domain.keypolicy import key_fingerprint
from chalicelib.domain.records import Claim, PendingIssue
from chalicelib.domain.steps import Steps
from chalicelib.ports.issuer import Issuer
from chalicelib.ports.registry import RenewalRegistry
from chalicelib.services.admission import Admission
from chalicelib.services.settle import Settler

log = logging.getLogger(__name__)

# What the steps after the claim may take at worst (seconds), each checked against the request's deadline before
# it starts; the rollback reserve comes on top.
ISSUE_SECONDS = 8.0      # AWS IoT: thing and certificate side by side, then two attachments
COMMIT_SECONDS = 4.0     # one conditional registry write, one attempt
Checkpoint = Callable[[str, str], None]


# Where a sequence stands between two writes or calls (where a crash test may stop it).
CLAIMED, ISSUED, COMMITTED = "claimed", "issued", "committed"


def no_checkpoint(stage: str, thing_name: str) -> None:
    pass


class Plan:
    """One kind of issuance. `in_place`: the device's thing stays as it is (never made, never deleted); `keep`: the
    device's own certificates, never a dead attempt's; `admit`: pay admission's budget first."""

    kind = "issuance"       # in messages and last_error
    stages = ""             # the stages' names' prefix
    commit_step = "commit"  # the commit's and what follows it, by their names in the log line
    after_step = ""
    thing_name: str
    region: str             # where to issue
    csr: x509.CertificateSigningRequest | None = None
    in_place = False
    keep: tuple[str | None, ...] = ()
    admit = True
    moves = False           # the issuance moves a provisioned device to another region (its write-ahead record says)

    def claim(self, now: datetime, lease_seconds: int, intent: PendingIssue) -> Claim:
        """Take the device, writing `intent` ahead unless a dead attempt's record is there (then carried instead)."""
        raise NotImplementedError

    def reused(self, issued: IssuedCertificate) -> None:
        """A dead attempt's certificate for this very key is given instead of a new one."""

    def commit(self, claim: Claim, certified: Certified, now: datetime) -> None:
        """Record the certificate as the device's, only while `claim` holds."""
        raise NotImplementedError

    def after(self, issued: IssuedCertificate) -> None:
        """What follows the commit; a failure is left to the next request or the audit (the device has its answer)."""


class Saga:
    def __init__(self, registry: RenewalRegistry, issuer: Issuer, admission: Admission | None = None,
                 lease_seconds: int | None = None, lease_margin_seconds: int = deadlines.LEASE_MARGIN_SECONDS,
                 clock: Callable[[], datetime] = utcnow, checkpoint: Checkpoint = no_checkpoint) -> None:
        self._registry, self._issuer, self._admission, self._clock = registry, issuer, admission, clock
        self._lease_seconds, self._lease_margin = lease_seconds, lease_margin_seconds  # None: from the deadline
        self._checkpoint, self.settler = checkpoint, Settler(registry, issuer)

    def run(self, plan: Plan, steps: Steps, deadline: Deadline) -> tuple[IssuedCertificate, bool]:
        """Issue exactly once for `plan`; returns the certificate and whether a dead attempt made it (reused)."""
        admitting = None
        if plan.admit and self._admission is not None:
            # A request too late to issue anyway takes no slot of the region's budget.
            deadline.require("admitting the device", ISSUE_SECONDS + COMMIT_SECONDS)
            admitting = self._admission.begin(plan.region, server_key=plan.csr is None)
        wanted = key_fingerprint(plan.csr.public_key()) if plan.csr is not None else None
        with steps.step("claim"):
            claim = self._claim(plan, wanted, deadline, admitting)
        self._stage(plan, CLAIMED)
        issued, intent, reused, issuing = None, claim.intent, False, False
        # Whether the write-ahead record may describe something that still exists, and whether the issuer, should
        # it fail, can be trusted to have undone its own steps (a domain error; else it raises IssueIncomplete).
        left, issuer_cleans_up = claim.previous is not None, False
        try:
            if claim.previous is not None:
                with steps.step("settle"):
                    issued = self.settler.settle(claim, wanted, plan.keep).reused
                left = reused = issued is not None  # the record describes it until the commit clears it
                if issued is not None:
                    plan.reused(issued)
            if issued is None:
                deadline.require("issuing the certificate", ISSUE_SECONDS + COMMIT_SECONDS)
                if intent is None:  # the claim took a dead attempt's record over, settled now: write ahead anew
                    intent = PendingIssue(plan.region, self._clock(), wanted, move=plan.moves)
                    with steps.step("intent"):
                        self._registry.record_intent(claim, intent)
                left, issuer_cleans_up, issuing = True, True, True
                with steps.step("issue"):
                    issued = self._issuer.issue(plan.thing_name, plan.region, plan.csr, in_place=plan.in_place)
                issuer_cleans_up = False
                self._stage(plan, ISSUED)
            deadline.require("recording the certificate", COMMIT_SECONDS)
            with steps.step(plan.commit_step):  # the certificate's record and the commit, in one write
                plan.commit(claim, certify(issued, plan.csr), self._clock())
            self._stage(plan, COMMITTED)
        except Exception as exc:
            with deadline.rolling_back():
                if issued is None or not self._committed(plan, issued):
                    with steps.step("rollback"):
                        trusted = issuer_cleans_up and isinstance(exc, ProvisioningError)
                        # A dead attempt's certificate adopted for this key stays on the record for the next try.
                        self._undo(plan, claim, None if reused else issued, exc, left and not trusted, intent)
                        if issuing and plan.admit and self._admission is not None:  # the undo's IoT calls
                            self._admission.rollback(plan.region)
                    cause = exc.error if isinstance(exc, IssueIncomplete) else exc
                    if isinstance(cause, ProvisioningError):
                        raise cause from (exc if cause is not exc else None)
                    raise ServiceUnavailable(f"{plan.kind} failed on the server side; try again later") from cause
            log.warning("%s of %s: the commit's answer failed (%s) but it is recorded", plan.kind, plan.thing_name,
                        type(exc).__name__)
        assert issued is not None
        if plan.after_step:
            with steps.step(plan.after_step), deadline.rolling_back():  # nothing is left to undo: the reserve is free
                try:
                    plan.after(issued)
                except Exception:
                    log.exception("%s of %s: %s is not done yet", plan.kind, plan.thing_name, plan.after_step)
        return issued, reused

    def _claim(self, plan: Plan, wanted: str | None, deadline: Deadline, admitting: Future[None] | None) -> Claim:
        """The claim and its write-ahead intent, beside admission's decision (`admitting`), which is the answer when
        it refuses: a claim taken for a refused request is withdrawn and leaves no trace."""
        try:
            deadline.require("claiming the device", ISSUE_SECONDS + COMMIT_SECONDS)
            now = self._clock()
            claim = plan.claim(now, self._lease_seconds or deadline.lease_seconds(self._lease_margin),
                               PendingIssue(plan.region, now, wanted, move=plan.moves))
        except BaseException:
            if admitting is not None:
                admitting.result()  # admission refused too: its answer (with the device's own slot) is the one
            raise
        if admitting is not None:
            try:
                admitting.result()
            except BaseException:
                try:
                    self._registry.withdraw(claim)
                except Exception:
                    log.exception("could not withdraw the claim on %s; it frees itself when the lease ends",
                                  plan.thing_name)
                raise
        return claim

    def _stage(self, plan: Plan, stage: str) -> None:
        self._checkpoint(f"{plan.stages}{stage}", plan.thing_name)

    def _committed(self, plan: Plan, issued: IssuedCertificate) -> bool:
        """Whether a commit whose answer failed (a timeout, a lost connection) was written after all."""
        try:
            record = self._registry.get(plan.thing_name)
        except Exception as exc:
            # Undoing a certificate that may be recorded could leave the device with none: the audit and the
            # device's retry (a lost answer asked for again) settle it.
            log.exception("%s: cannot tell whether certificate %s was recorded", plan.thing_name, issued.certificate_id)
            raise ServiceUnavailable("the service could not record the certificate; try again later") from exc
        return record is not None and record.certificate_id == issued.certificate_id

    def _undo(self, plan: Plan, claim: Claim, issued: IssuedCertificate | None, failure: Exception, unsure: bool,
              intent: PendingIssue | None) -> None:
        """Compensate in reverse order; a failure here is logged and never hides the original error. The claim is
        given back with last_error naming what is left, keeping the write-ahead record when something may be."""
        cause = failure.error if isinstance(failure, IssueIncomplete) else failure
        log.error("%s of %s failed, rolling back: %s: %s", plan.kind, plan.thing_name, type(cause).__name__, cause)
        error = f"{plan.kind}: {type(cause).__name__}: {cause}"
        incomplete = self.settler.before_rollback(claim, intent, failure, unsure and issued is None, plan.keep)
        if isinstance(failure, IssueIncomplete):  # the issuer could not undo all of its own steps
            error = f"rollback incomplete, {failure.leftover}; {error}"
        if issued is not None:
            try:  # a thing this attempt did not make stays (in place it holds the device's current certificate)
                self._issuer.revoke(CertificateRef(issued.region, issued.certificate_id, issued.thing_name,
                                                   issued.certificate_arn), delete_thing=issued.created_thing)
            except Exception:
                log.exception("rollback of %s incomplete: certificate %s in %s may still be active", plan.thing_name,
                              issued.certificate_id, issued.region)
                error = f"rollback incomplete, certificate {issued.certificate_id} in {issued.region}; {error}"
                incomplete = True
        try:
            self._registry.release(claim, error[:500], keep_pending=incomplete)
        except Exception:
            log.exception("could not give back the claim on %s; it frees itself when the lease ends", plan.thing_name)


def again(issuer: Issuer, thing_name: str, region: str, certificate_id: str) -> IssuedCertificate | None:
    """The device's current certificate answered again (a lost answer asked for); None unless it is still active."""
    cert = issuer.certificate(certificate_id, region)
    if cert is None or not cert.active or cert.certificate_pem is None:
        return None
    return IssuedCertificate(region, certificate_id, cert.certificate_pem, issuer.endpoint(region),
                             thing_name=thing_name)
