"""The operator's use cases (the admin CLI prints them): audit and repair, reset, fleet statistics, show.

Each takes the registry and the issuer it works on; nothing here parses arguments or prints.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.adapters.files import write_private
from chalicelib.domain.certificates import CertificateInfo, CertificateRef, certify
from chalicelib.domain.errors import AlreadyProvisioned, ProvisioningInProgress, RenewalInProgress, RenewalRefused
from chalicelib.domain.records import PROVISIONED, PROVISIONING, STATUSES, DeviceRecord, DeviceStatus, Revocation
from chalicelib.ports.issuer import CertificateInventory, Issuer, ThingInventory
from chalicelib.ports.registry import Registry, RenewalRegistry
from chalicelib.services.settle import Settler

GONE = "gone"  # a missing certificate's status when the issuer does not know it at all


class NotRegisteredDevice(Exception):
    """The operator named a device the registry does not have."""

    def __init__(self, thing_name: str) -> None:
        super().__init__(f"{thing_name} is not registered")
        self.thing_name = thing_name


class AuditedIssuer(Issuer, CertificateInventory, Protocol):
    """An issuer the audit can take stock of; where it also keeps things, it is a ThingInventory too."""


@dataclass(frozen=True)
class OrphanThing:
    thing_name: str
    region: str


@dataclass(frozen=True)
class MissingCertificate:
    """A provisioned device whose certificate is not active (revoked, inactive) or gone."""

    thing_name: str
    certificate_id: str | None
    region: str | None
    status: str


@dataclass(frozen=True)
class Attempt:
    """A device's claim or write-ahead record as the audit sees it: live (in flight), dead (its lease ended)
    or a rollback that could not finish, with the certificates its attempt issued."""

    thing_name: str
    region: str | None
    certificates: list[str]
    key: str | None  # "device" (a CSR's key), "server-made", None when nothing was about to be issued
    age_seconds: float | None = None        # in flight: since the claim
    lease_left_seconds: float | None = None  # in flight: until the claim may be taken over
    lease_expires: datetime | None = None    # stuck: when the lease ended
    renewal: bool = False                    # a renewal's (of a provisioned device), not a provisioning's


@dataclass(frozen=True)
class UnfinishedRenewal:
    """A renewal recorded but cut short before its previous certificate (and thing, after a move) was removed."""

    thing_name: str
    previous_certificate_id: str
    previous_region: str
    region: str | None

    @property
    def move(self) -> bool:
        return self.previous_region != self.region


@dataclass(frozen=True)
class UnfinishedReset:
    """A reset that recorded its intent and stopped (a storage fault, a crash) before the record was reset."""

    thing_name: str
    status: DeviceStatus
    certificates: tuple[Revocation, ...]  # revoked, or still to revoke: the next reset revokes them (again)


@dataclass(frozen=True)
class AuditReport:
    """What a crashed or half-failed provisioning or renewal can leave behind, on any backend. `in_flight` is
    work under a live claim: reported with its age, not a finding, never fixed."""

    stuck_claims: list[Attempt] = field(default_factory=list)
    orphan_certificates: list[CertificateInfo] = field(default_factory=list)
    orphan_things: list[OrphanThing] = field(default_factory=list)
    missing_certificates: list[MissingCertificate] = field(default_factory=list)
    unfinished_rollbacks: list[Attempt] = field(default_factory=list)
    in_flight: list[Attempt] = field(default_factory=list)
    unfinished_renewals: list[UnfinishedRenewal] = field(default_factory=list)
    unfinished_resets: list[UnfinishedReset] = field(default_factory=list)

    @property
    def findings(self) -> int:
        return (len(self.stuck_claims) + len(self.unfinished_rollbacks) + len(self.orphan_certificates)
                + len(self.orphan_things) + len(self.missing_certificates) + len(self.unfinished_renewals)
                + len(self.unfinished_resets))


def audit(registry: RenewalRegistry, issuer: AuditedIssuer, regions: Iterable[str], now: datetime) -> AuditReport:
    records = list(registry.list())
    regions = list(regions)
    settler = Settler(registry, issuer)
    current = {r.thing_name: (r.certificate_id, r.previous_certificate_id) for r in records}
    in_flight, stuck, unfinished = [], [], []
    for state in registry.claims(now):
        pending = state.pending
        if state.renewal and pending is None and not state.live(now):
            continue  # a renewal lease that ended before anything was about to be issued: nothing is left
        # A renewed device's own certificates are never counted as what its attempt left.
        attempt = Attempt(state.thing_name, pending.region if pending else None,
                          settler.left_by(state.thing_name, pending, current.get(state.thing_name, ())),
                          None if pending is None else ("device" if pending.fingerprint else "server-made"),
                          renewal=state.renewal)
        if state.live(now):
            in_flight.append(replace(
                attempt, age_seconds=round((now - state.claimed_at).total_seconds(), 1) if state.claimed_at else None,
                lease_left_seconds=round((state.lease_expires - now).total_seconds(), 1)
                if state.lease_expires else None))
        elif state.status is PROVISIONING or (state.renewal and state.lease_expires is not None):
            stuck.append(replace(attempt, lease_expires=state.lease_expires))
        else:
            unfinished.append(attempt)
    # A live claim (or renewal lease) owns what it is making; a dead attempt's write-ahead record the certificates
    # it points at, which settling it deals with: both are reported above, not as orphans.
    live_claims = {attempt.thing_name for attempt in in_flight}
    provisioned = [r for r in records if r.status is PROVISIONED]
    # An unfinished reset covers all the device holds (finishing it revokes its certificates): reported once, so.
    resets = [UnfinishedReset(r.thing_name, r.status, r.reset_pending) for r in records if r.reset_pending]
    resetting = {u.thing_name for u in resets}
    renewals = [UnfinishedRenewal(r.thing_name, r.previous_certificate_id, r.previous_region, r.region)
                for r in provisioned if r.retire_pending and r.previous_certificate_id and r.previous_region
                and r.thing_name not in resetting]
    referenced = {(r.region, r.certificate_id) for r in provisioned}
    referenced |= {(a.region, cert) for a in in_flight + stuck + unfinished for cert in a.certificates}
    referenced |= {(u.previous_region, u.previous_certificate_id) for u in renewals}
    referenced |= {(c.region, c.certificate_id) for u in resets for c in u.certificates}
    orphans = [cert for region in regions for cert in issuer.active_certificates(region)
               if (region, cert.certificate_id) not in referenced and cert.thing_name not in live_claims]
    things: list[OrphanThing] = []
    if isinstance(issuer, ThingInventory):
        placed = {(r.region, r.thing_name) for r in provisioned}
        placed |= {(a.region, a.thing_name) for a in stuck + unfinished if a.region}
        placed |= {(u.previous_region, u.thing_name) for u in renewals}
        things = [OrphanThing(name, region) for region in regions for name in issuer.things(region)
                  if (region, name) not in placed and name not in live_claims]
    missing = []
    for record in provisioned:
        if record.thing_name in resetting:
            continue
        cert = issuer.certificate(record.certificate_id or "", record.region)
        if cert is None or not cert.active:
            missing.append(MissingCertificate(record.thing_name, record.certificate_id, record.region,
                                              cert.status if cert else GONE))
    return AuditReport(stuck, orphans, things, missing, unfinished, in_flight, renewals, resets)


@dataclass(frozen=True)
class Repairs:
    fixed: list[str] = field(default_factory=list)  # one line per repair made
    failed: list[ResetIncomplete] = field(default_factory=list)  # resets that stopped part-way: run --fix again


def repair(registry: RenewalRegistry, issuer: AuditedIssuer, report: AuditReport, now: datetime,
           lease_seconds: int) -> Repairs:
    """audit --fix: settle stuck claims and unfinished rollbacks (as a retry would), revoke orphans, finish
    unfinished resets and reset devices whose certificate is gone (as `reset` does: a reset that stops part-way is
    reported and the others go on), finish unfinished renewals."""
    fixed: list[str] = []
    failed: list[ResetIncomplete] = []
    settler = Settler(registry, issuer)
    for attempt in report.stuck_claims + report.unfinished_rollbacks:
        try:
            if attempt.renewal:
                fixed.append(settle_renewal_for_audit(registry, settler, attempt.thing_name, now, lease_seconds))
                continue
            fixed.append(settle_for_audit(registry, settler, attempt.thing_name, now, lease_seconds,
                                          died=attempt in report.stuck_claims))
        except (AlreadyProvisioned, ProvisioningInProgress):  # its own retry settled it meanwhile
            fixed.append(f"{attempt.thing_name} was settled by its own retry meanwhile")
    in_use = {(r.region, r.thing_name) for r in registry.list(PROVISIONED)}
    for cert in report.orphan_certificates:
        # A renewal's leftover stays off the thing, which holds the current certificate; else the thing goes too.
        issuer.revoke(cert.ref(), delete_thing=(cert.region, cert.thing_name) not in in_use)
        fixed.append(f"revoked orphan certificate {cert.certificate_id} in {cert.region} (thing {cert.thing_name})")
    for thing in report.orphan_things:
        if isinstance(issuer, ThingInventory):
            issuer.delete_thing(thing.region, thing.thing_name)
            fixed.append(f"deleted orphan thing {thing.thing_name} in {thing.region}")
    resets: list[tuple[str, str | None, str]] = [
        (u.thing_name, None, f"finished the reset of {u.thing_name}: unprovisioned") for u in report.unfinished_resets]
    resets += [(m.thing_name, m.region, f"reset {m.thing_name} (its certificate is {m.status}) to unprovisioned")
               for m in report.missing_certificates]
    for thing_name, region, what in resets:
        try:
            outcome = reset(registry, issuer, thing_name)
        except ResetIncomplete as stopped:
            failed.append(stopped)
            continue
        if region and isinstance(issuer, ThingInventory):  # a certificate gone may have left its thing
            issuer.delete_thing(region, thing_name)
        revoked = ", ".join(r.certificate_id for r in outcome.revoked)
        fixed.append(what + (f" (revoked {revoked})" if revoked else ""))
    for unfinished in report.unfinished_renewals:
        issuer.revoke(CertificateRef(unfinished.previous_region, unfinished.previous_certificate_id,
                                     unfinished.thing_name), delete_thing=unfinished.move)
        registry.previous_retired(unfinished.thing_name, unfinished.previous_certificate_id)
        fixed.append(f"finished the {'move' if unfinished.move else 'renewal'} of {unfinished.thing_name}: revoked "
                     f"{unfinished.previous_certificate_id} in {unfinished.previous_region}"
                     + (" and deleted the thing there" if unfinished.move else ""))
    return Repairs(fixed, failed)


def settle_for_audit(registry: RenewalRegistry, settler: Settler, thing_name: str, now: datetime,
                     lease_seconds: int, died: bool = True) -> str:
    """Take the device over (its lease has ended, or a rollback left its record) and settle what is left.

    When the attempt `died` its device never got an answer: a certificate for the device's own key is
    finalized (asking again with that key returns it). After a rollback the device was told to try again,
    perhaps with a new key: what is left is revoked. Returns what was done, for the operator."""
    claim = registry.claim(thing_name, now, lease_seconds)
    pending = claim.previous
    try:
        settled = settler.settle(claim, pending.fingerprint if pending and died else None)
    except Exception:
        registry.release(claim, "the audit could not settle the last attempt", keep_pending=True)
        raise
    if settled.reused is not None:
        issued, certified = settled.reused, certify(settled.reused, None)
        # The key the device asks with (its CSR's) and, as provisioning keeps them, the certificate's key (a
        # renewal is checked with it) and its end of validity.
        registry.finalize(claim, issued.region, issued.certificate_id, now,
                          pending.fingerprint if pending else certified.fingerprint,
                          public_key=certified.public_key, expires=certified.expires)
        return (f"finalized {thing_name} with certificate {issued.certificate_id} in {issued.region}, issued "
                "by an attempt that died (the device gets it by asking again with the same key)")
    registry.release(claim, "claim expired; settled by audit")
    what = f"revoked {', '.join(settled.revoked)} and " if settled.revoked else ""
    return f"{what}released the expired claim on {thing_name}"


def settle_renewal_for_audit(registry: RenewalRegistry, settler: Settler, thing_name: str, now: datetime,
                             lease_seconds: int) -> str:
    """Take over a dead renewal's lease (or the record its rollback left) and revoke what it issued: unlike a
    device being provisioned, the device still holds its current certificate, which keeps working, and it may
    renew again with any key (recording the dead renewal instead would retire the certificate it holds).
    Returns what was done, for the operator."""
    state = registry.renewal_state(thing_name)
    if state is None or state.certificate_id is None:
        return f"{thing_name} was reset meanwhile; its next claim settles what is left"
    try:
        claim = registry.begin_renewal(thing_name, state.certificate_id, now, lease_seconds)
    except (RenewalInProgress, RenewalRefused):  # renewed, or being renewed, meanwhile: that request settles it
        return f"{thing_name} was settled by its own retry meanwhile"
    try:
        settled = settler.settle(claim, None, keep=(state.certificate_id, state.previous_certificate_id))
    except Exception:
        registry.release(claim, "the audit could not settle the last renewal", keep_pending=True)
        raise
    registry.release(claim, "renewal interrupted; settled by audit")
    what = f"revoked {', '.join(settled.revoked)} and " if settled.revoked else ""
    return f"{what}released the interrupted renewal of {thing_name} (its current certificate stays)"


def expiring_within(records: Iterable[DeviceRecord], days: float, now: datetime) -> list[DeviceRecord]:
    """Provisioned devices whose certificate ends within `days` from now, soonest first (unknown expiry first)."""
    limit = now + timedelta(days=days)
    due = [r for r in records if r.status is PROVISIONED and (r.certificate_expires is None
                                                              or r.certificate_expires <= limit)]
    return sorted(due, key=lambda r: r.certificate_expires or datetime.min.replace(tzinfo=timezone.utc))


@dataclass(frozen=True)
class ResetOutcome:
    before: DeviceRecord
    revoked: tuple[Revocation, ...]  # the certificates revoked (and things removed): what the device held


class ResetIncomplete(Exception):
    """A reset stopped part-way by `cause` (a storage fault, the issuer, ...): what it had done. Once its intent is
    recorded (`recorded`), the audit lists it and the next reset, or audit --fix, finishes it."""

    def __init__(self, thing_name: str, recorded: bool, revoked: tuple[Revocation, ...],
                 not_revoked: tuple[Revocation, ...], cause: BaseException) -> None:
        super().__init__(f"reset of {thing_name} stopped: {cause}")
        self.thing_name, self.recorded, self.cause = thing_name, recorded, cause
        self.revoked, self.not_revoked = revoked, not_revoked

    def done(self) -> str:
        """What was done, in words: 'certificate X in R revoked, registry not updated'."""
        if not self.recorded and not self.revoked:
            return "nothing changed"
        parts = [f"certificate {r.certificate_id} in {r.region} revoked" for r in self.revoked]
        parts += [f"certificate {r.certificate_id} in {r.region} not revoked" for r in self.not_revoked]
        return ", ".join(parts + ["registry not updated (the reset is recorded as pending)"])


RESET_ROUNDS = 3  # a device renewed during its reset is reset again with what it holds then; not forever


def reset(registry: Registry, issuer: Issuer, thing_name: str) -> ResetOutcome:
    """Deprovision a device so it can provision again, all or nothing from the operator's view.

    Every certificate it may still use is revoked: its current one, and the previous one while a renewal's
    retirement of it is pending (else the reset device would keep a working credential). The intent is recorded
    first (`begin_reset`), then the certificates are revoked, then the record is reset, which clears the intent, on
    the condition that the device holds nothing else (a renewal recorded meanwhile starts another round). A reset an
    earlier run left (a storage fault, a crash) is finished on the way: its certificates are revoked again. Raises
    ResetIncomplete, naming what was done, when it stops part-way."""
    record = registry.get(thing_name)
    if record is None:
        raise NotRegisteredDevice(thing_name)
    first, revoked = record, list[Revocation]()
    for _ in range(RESET_ROUNDS):
        revocations = _to_revoke(record)
        recorded, done = bool(record.reset_pending), list[Revocation]()
        try:
            if revocations:
                if not registry.begin_reset(thing_name, revocations):
                    raise NotRegisteredDevice(thing_name)
                recorded = True
            for revocation in revocations:
                issuer.revoke(CertificateRef(revocation.region, revocation.certificate_id, thing_name),
                              delete_thing=revocation.delete_thing)
                done.append(revocation)
            before = registry.reset(thing_name, [revocation.certificate_id for revocation in revocations])
        except NotRegisteredDevice:
            raise
        except Exception as exc:
            raise ResetIncomplete(thing_name, recorded, (*revoked, *done),
                                  tuple(r for r in revocations if r not in done), exc) from exc
        revoked += done
        if before is not None:
            return ResetOutcome(first, tuple(dict.fromkeys(revoked)))
        record = registry.get(thing_name)  # it holds another certificate now: again, with that one
        if record is None:
            raise NotRegisteredDevice(thing_name)
    raise ResetIncomplete(thing_name, True, tuple(dict.fromkeys(revoked)), (), RuntimeError(
        f"{thing_name} was renewed again during each of {RESET_ROUNDS} rounds of its reset"))


def _to_revoke(record: DeviceRecord) -> tuple[Revocation, ...]:
    """What a reset revokes: an unfinished reset's certificates, the previous certificate while its retirement is
    pending, the current one; each once (its thing removed if any of them says so)."""
    found = list(record.reset_pending)
    if record.retire_pending and record.previous_certificate_id and record.previous_region:
        # After a move its thing is the old region's; in place it is the current certificate's, which goes next.
        found.append(Revocation(record.previous_region, record.previous_certificate_id,
                                delete_thing=record.previous_region != record.region))
    if record.certificate_id and record.region:
        found.append(Revocation(record.region, record.certificate_id))
    merged: dict[tuple[str, str], Revocation] = {}
    for revocation in found:
        key = (revocation.region, revocation.certificate_id)
        if key in merged:
            revocation = replace(revocation, delete_thing=revocation.delete_thing or merged[key].delete_thing)
        merged[key] = revocation
    return tuple(merged.values())


@dataclass(frozen=True)
class FleetStats:
    total: int
    by_status: dict[DeviceStatus, int]
    provisioned_by_region: dict[str, int]
    stuck: list[DeviceRecord]


def fleet_stats(registry: Registry, now: datetime) -> FleetStats:
    """Counts from one pass over the registry, so they add up to its total."""
    records = list(registry.list())
    by_status = Counter(record.status for record in records)
    by_region = Counter(record.region or "-" for record in records if record.status is PROVISIONED)
    return FleetStats(len(records), {status: by_status[status] for status in STATUSES},
                      dict(sorted(by_region.items())), registry.stuck(now))


def show(registry: Registry, issuer: Issuer, thing_name: str) -> tuple[DeviceRecord, CertificateInfo | None]:
    """A device's record and, when it has one, what the issuer knows of its certificate."""
    record = registry.get(thing_name)
    if record is None:
        raise NotRegisteredDevice(thing_name)
    cert = None
    if record.certificate_id and record.region:
        cert = issuer.certificate(record.certificate_id, record.region)
    return record, cert


def make_fleet_key(private_path: Path, public_path: Path | None, bits: int) -> rsa.RSAPublicKey:
    """A new fleet signing key pair: the private half for device firmware (mode 0600), the public half where the
    service reads it (a file; None when the caller publishes it elsewhere, as prod does in SSM)."""
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    if public_path is not None:
        public_path.parent.mkdir(parents=True, exist_ok=True)
        public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return key.public_key()
