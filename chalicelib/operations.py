"""The operator's use cases (the admin CLI prints them): audit and repair, reset, fleet statistics, show.

Each takes the registry and the issuer it works on; nothing here parses arguments or prints.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.files import write_private
from chalicelib.issuers.base import CertificateInfo, CertificateInventory, CertificateRef, Issuer, ThingInventory
from chalicelib.registry.base import PROVISIONED, PROVISIONING, STATUSES, DeviceRecord, DeviceStatus, Registry

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
class AuditReport:
    """What a crashed or half-failed provisioning can leave behind, on any backend."""

    stuck_claims: list[DeviceRecord] = field(default_factory=list)
    orphan_certificates: list[CertificateInfo] = field(default_factory=list)
    orphan_things: list[OrphanThing] = field(default_factory=list)
    missing_certificates: list[MissingCertificate] = field(default_factory=list)

    @property
    def findings(self) -> int:
        return (len(self.stuck_claims) + len(self.orphan_certificates) + len(self.orphan_things)
                + len(self.missing_certificates))


def audit(registry: Registry, issuer: AuditedIssuer, regions: Iterable[str], now: datetime) -> AuditReport:
    records = list(registry.list())
    stuck = registry.stuck(now)
    regions = list(regions)
    # A live claim may be about to record its certificate: that certificate is not an orphan yet.
    live_claims = ({r.thing_name for r in records if r.status is PROVISIONING} - {r.thing_name for r in stuck})
    provisioned = [r for r in records if r.status is PROVISIONED]
    referenced = {(r.region, r.certificate_id) for r in provisioned}
    orphans = [cert for region in regions for cert in issuer.active_certificates(region)
               if (region, cert.certificate_id) not in referenced and cert.thing_name not in live_claims]
    things: list[OrphanThing] = []
    if isinstance(issuer, ThingInventory):
        placed = {(r.region, r.thing_name) for r in provisioned}
        things = [OrphanThing(name, region) for region in regions for name in issuer.things(region)
                  if (region, name) not in placed and name not in live_claims]
    missing = []
    for record in provisioned:
        cert = issuer.certificate(record.certificate_id or "", record.region)
        if cert is None or not cert.active:
            missing.append(MissingCertificate(record.thing_name, record.certificate_id, record.region,
                                              cert.status if cert else GONE))
    return AuditReport(stuck, orphans, things, missing)


def repair(registry: Registry, issuer: AuditedIssuer, report: AuditReport, now: datetime) -> list[str]:
    """audit --fix: release stuck claims, revoke orphans, reset devices whose certificate is gone.
    Returns one line per repair made."""
    fixed = []
    for record in report.stuck_claims:
        if registry.release_stuck(record.thing_name, now):
            fixed.append(f"released the expired claim on {record.thing_name}")
    for cert in report.orphan_certificates:
        issuer.revoke(cert.ref())
        fixed.append(f"revoked orphan certificate {cert.certificate_id} in {cert.region} (thing {cert.thing_name})")
    for thing in report.orphan_things:
        if isinstance(issuer, ThingInventory):
            issuer.delete_thing(thing.region, thing.thing_name)
            fixed.append(f"deleted orphan thing {thing.thing_name} in {thing.region}")
    for missing in report.missing_certificates:
        region = missing.region or ""
        issuer.revoke(CertificateRef(region, missing.certificate_id or "", missing.thing_name))
        if isinstance(issuer, ThingInventory):
            issuer.delete_thing(region, missing.thing_name)
        registry.reset(missing.thing_name)
        fixed.append(f"reset {missing.thing_name} (its certificate is {missing.status}) to unprovisioned")
    return fixed


@dataclass(frozen=True)
class ResetOutcome:
    before: DeviceRecord
    revoked: CertificateRef | None  # the certificate revoked (and thing removed), if the device had one


def reset(registry: Registry, issuer: Issuer, thing_name: str) -> ResetOutcome:
    """Deprovision a device so it can provision again."""
    record = registry.get(thing_name)
    if record is None:
        raise NotRegisteredDevice(thing_name)
    revoked = None
    if record.certificate_id and record.region:
        # Revoke first: if that fails the device stays provisioned and the command can be run again.
        revoked = CertificateRef(record.region, record.certificate_id, thing_name)
        issuer.revoke(revoked)
    registry.reset(thing_name)
    return ResetOutcome(record, revoked)


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


def make_fleet_key(private_path: Path, public_path: Path, bits: int) -> None:
    """A new fleet signing key pair: the private half for device firmware (mode 0600), the public half
    where the service reads it."""
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
