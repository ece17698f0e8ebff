"""Settling what a dead attempt's write-ahead record describes, for every kind of issuance: whoever takes the
device over next (a retry after the lease, the audit) settles it first. The same device key asking again gets that
certificate, made whole, and no second one; otherwise (a server-made key, which nobody kept, or another key) it is
revoked, with the thing the attempt made. A renewed device's own certificates are never the dead attempt's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Collection

from chalicelib.domain.certificates import CertificateRef, IssuedCertificate
from chalicelib.domain.errors import IssueIncomplete
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
