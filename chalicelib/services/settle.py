"""Settling what a dead attempt left behind (write-ahead issuance), for every kind of issuance.

Before the issuer is asked for a certificate the claim records what is about to be issued (region, time, the
device's key fingerprint when the key is the device's); the certificate id follows as soon as the issuer answers.
A process that dies in between leaves that record on the device. Whoever takes the device over next (a retry once
the lease has ended, or the audit) settles it first:
- the same device key asks again: the certificate already issued is made whole and given, no second one;
- otherwise (a server-made key, which nobody kept, or another key): that certificate is revoked, with the thing
  the attempt made, and the sequence goes on as if nothing had happened.
Under a renewal lease the device is provisioned: its current and previous certificates are never the dead
attempt's, and its thing stays unless the dead renewal made it in a new region.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Collection

from chalicelib.domain.certificates import CertificateRef, IssuedCertificate, certify
from chalicelib.domain.errors import IssueIncomplete, RenewalInProgress, RenewalRefused
from chalicelib.domain.records import Claim, PendingIssue
from chalicelib.ports.issuer import Issuer
from chalicelib.ports.registry import RenewalRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    reused: IssuedCertificate | None  # the dead attempt's certificate, made whole, to commit with
    revoked: tuple[str, ...]          # ids of the dead attempt's certificates revoked


class Settler:
    def __init__(self, registry: RenewalRegistry, issuer: Issuer):
        self._registry = registry
        self._issuer = issuer

    def left_by(self, thing_name: str, pending: PendingIssue | None, keep: Collection[str | None] = ()) -> list[str]:
        """Ids of the certificates a dead attempt's write-ahead record points at (found by the issuer when the
        attempt died before recording the id), never one in `keep` (a renewed device's own certificates)."""
        if pending is None:
            return []
        if pending.certificate_id:
            return [pending.certificate_id] if pending.certificate_id not in keep else []
        return [certificate_id for certificate_id in self._issuer.find_issued(
            thing_name, pending.region, pending.since, pending.fingerprint) if certificate_id not in keep]

    def before_rollback(self, claim: Claim, intent: PendingIssue | None, failure: Exception, search: bool,
                        keep: Collection[str | None] = ()) -> bool:
        """What a failed attempt may have left, put right before its rollback: an issuer that failed in an unknown
        way and returned nothing (`search`) is searched for what it made, which is settled; an issuer that could not
        undo its own steps has its certificate put on the write-ahead record. Returns whether something may still be
        left (the record is then kept for the next claim or the audit)."""
        incomplete = search
        if search and intent is not None:
            try:
                self.settle(replace(claim, previous=intent), None, keep)
                incomplete = False
            except Exception:
                log.exception("rollback of %s could not look for what the issuer made", claim.thing_name)
        if isinstance(failure, IssueIncomplete):
            incomplete = True
            if failure.certificate is not None:  # on the write-ahead record: the settler need not search
                try:
                    self._registry.record_certificate(claim, *failure.certificate)
                except Exception:
                    log.exception("could not record what the rollback of %s left", claim.thing_name)
        return incomplete

    def settle(self, claim: Claim, wanted: str | None, keep: Collection[str | None] = ()) -> Settled:
        """Settle `claim.previous`. `wanted`: the fingerprint of the key the holder of the claim asks a certificate
        for (None: a server-made key). `keep`: certificates that are not the dead attempt's."""
        pending = claim.previous
        if pending is None:
            return Settled(None, ())
        reused, revoked = None, []
        for certificate_id in self.left_by(claim.thing_name, pending, keep):
            found = self._issuer.certificate(certificate_id, pending.region)
            if found is None or not found.active:
                continue
            # The record's fingerprint is the key of the CSR the issuer signed: the same key asks again.
            if reused is None and wanted is not None and wanted == pending.fingerprint:
                try:  # in place: attached to the device's thing as it is, which holds its current certificate
                    reused = self._issuer.adopt(claim.thing_name, pending.region, certificate_id,
                                                in_place=claim.renewal and not pending.move)
                    continue
                except LookupError:  # revoked meanwhile: issue a new one
                    pass
            # Only a thing the dead attempt is known to have made goes with its certificate.
            self._issuer.revoke(CertificateRef(pending.region, certificate_id, claim.thing_name),
                                delete_thing=bool(pending.created_thing))
            revoked.append(certificate_id)
            log.warning("settled a dead attempt on %s: revoked certificate %s in %s", claim.thing_name,
                        certificate_id, pending.region)
        return Settled(reused, tuple(revoked))

    def settle_for_audit(self, thing_name: str, now: datetime, lease_seconds: int, died: bool = True) -> str:
        """Take the device over (its lease has ended, or a rollback left its record) and settle what is left.

        When the attempt `died` its device never got an answer: a certificate for the device's own key is
        finalized (asking again with that key returns it). After a rollback the device was told to try again,
        perhaps with a new key: what is left is revoked. Returns what was done, for the operator."""
        claim = self._registry.claim(thing_name, now, lease_seconds)
        pending = claim.previous
        try:
            settled = self.settle(claim, pending.fingerprint if pending and died else None)
        except Exception:
            self._registry.release(claim, "the audit could not settle the last attempt", keep_pending=True)
            raise
        if settled.reused is not None:
            issued, certified = settled.reused, certify(settled.reused, None)
            # The key the device asks with (its CSR's) and, as provisioning keeps them, the certificate's key (a
            # renewal is checked with it) and its end of validity.
            self._registry.finalize(claim, issued.region, issued.certificate_id, now,
                                    pending.fingerprint if pending else certified.fingerprint,
                                    public_key=certified.public_key, expires=certified.expires)
            return (f"finalized {thing_name} with certificate {issued.certificate_id} in {issued.region}, issued "
                    "by an attempt that died (the device gets it by asking again with the same key)")
        self._registry.release(claim, "claim expired; settled by audit")
        what = f"revoked {', '.join(settled.revoked)} and " if settled.revoked else ""
        return f"{what}released the expired claim on {thing_name}"

    def settle_renewal_for_audit(self, thing_name: str, now: datetime, lease_seconds: int) -> str:
        """Take over a dead renewal's lease (or the record its rollback left) and revoke what it issued: unlike a
        device being provisioned, the device still holds its current certificate, which keeps working, and it may
        renew again with any key (recording the dead renewal instead would retire the certificate it holds).
        Returns what was done, for the operator."""
        state = self._registry.renewal_state(thing_name)
        if state is None or state.certificate_id is None:
            return f"{thing_name} was reset meanwhile; its next claim settles what is left"
        try:
            claim = self._registry.begin_renewal(thing_name, state.certificate_id, now, lease_seconds)
        except (RenewalInProgress, RenewalRefused):  # renewed, or being renewed, meanwhile: that request settles it
            return f"{thing_name} was settled by its own retry meanwhile"
        try:
            settled = self.settle(claim, None, keep=(state.certificate_id, state.previous_certificate_id))
        except Exception:
            self._registry.release(claim, "the audit could not settle the last renewal", keep_pending=True)
            raise
        self._registry.release(claim, "renewal interrupted; settled by audit")
        what = f"revoked {', '.join(settled.revoked)} and " if settled.revoked else ""
        return f"{what}released the interrupted renewal of {thing_name} (its current certificate stays)"
