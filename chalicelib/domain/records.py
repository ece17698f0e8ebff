"""What every registry backend offers. Status changes are conditional writes, never read-then-write.

The registry's records cross this port as frozen `DeviceRecord`s. The item form (the original sample's
attribute names, `thing_name`, `prov_status`, `prov_datetime`, `aws_region`, ...) is written here once:
`record_from_item` is how a backend turns what it stored into a record, `item_of` is the JSON operators see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Mapping


class DeviceStatus(StrEnum):
    UNPROVISIONED = "unprovisioned"
    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"


UNPROVISIONED = DeviceStatus.UNPROVISIONED
PROVISIONING = DeviceStatus.PROVISIONING
PROVISIONED = DeviceStatus.PROVISIONED
STATUSES = tuple(DeviceStatus)


@dataclass(frozen=True)
class Revocation:
    """A certificate a reset revokes, with its thing when `delete_thing`: what the reset's intent records."""

    region: str
    certificate_id: str
    delete_thing: bool = True


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the registry holds it. `attempts` counts claims so far (0: never claimed)."""

    thing_name: str
    status: DeviceStatus = UNPROVISIONED
    provisioned_at: datetime | None = None
    region: str | None = None
    certificate_id: str | None = None
    key_fingerprint: str | None = None  # SHA-256 of the certificate's SubjectPublicKeyInfo DER, hex
    public_key: str | None = None  # the device's own signing key (PEM); then the fleet key is not accepted
    country: str | None = None
    region_reason: str | None = None
    last_error: str | None = None
    attempts: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)
    lease_expires: datetime | None = None  # while provisioning: when the claim may be taken over
    # Renewal (POST /device-renewal): the history, and what an interrupted renewal left to finish.
    certificate_expires: datetime | None = None
    renewal_count: int = 0
    last_renewal: datetime | None = None
    previous_certificate_id: str | None = None
    previous_region: str | None = None
    retire_pending: bool = False  # the previous certificate (and thing, after a move) is not removed yet
    renewal_lease: datetime | None = None  # while a renewal is in flight: when its lease ends
    # The current certificate's key was made by the service (no CSR): a lost answer lost the key with it, so the
    # device may ask again for a new one within the re-key window (services/renewal.py, RenewalService.rekey).
    server_key: bool = False
    # A reset begun (admin reset, audit --fix) and not finished: the certificates it revokes before the record is
    # reset. Whoever resets the device next revokes them again (it is harmless) and finishes it.
    reset_pending: tuple[Revocation, ...] = ()


@dataclass(frozen=True)
class PendingIssue:
    """Write-ahead record of an issuance: written with the claim (or right after it, once a dead attempt's record is
    settled) before the issuer is asked, cleared by the commit or by a complete rollback. Whoever finds one left by
    a dead attempt settles it before going on (chalicelib/services/settle.py): by the certificate id when the record
    names one, else by asking the issuer what it made for the device since then."""

    region: str
    since: datetime                      # when it was written: the certificate, if any, is not older
    fingerprint: str | None = None       # the device's key (its CSR's), when the key is the device's
    certificate_id: str | None = None    # recorded when a rollback could not undo what the issuer made
    created_thing: bool | None = None    # whether the attempt made the thing (None: not known yet)
    move: bool = False                   # a renewal moving the device to `region` (its thing made or adopted there)


@dataclass(frozen=True)
class Claim:
    """Proof that this request, and no other, is provisioning (or renewing) the device until the lease ends."""

    thing_name: str
    token: str
    previous: PendingIssue | None = None  # what a dead (or half rolled back) attempt left, to settle first
    renewal: bool = False  # the renewal lease of a provisioned device (begin_renewal), not a provisioning claim
    intent: PendingIssue | None = None  # the write-ahead record written by the claim's own write (none: `previous`)
    # The backend's own note of the record as the claim found it, so that `withdraw` can put it back; opaque here.
    restore: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ClaimState:
    """A device in provisioning or renewal, or one whose last attempt left a write-ahead record (for the audit).
    For a provisioned device the claim is a renewal's: `claimed_at` and `lease_expires` are its lease's."""

    thing_name: str
    status: DeviceStatus
    claimed_at: datetime | None
    lease_expires: datetime | None
    pending: PendingIssue | None

    @property
    def renewal(self) -> bool:
        return self.status is PROVISIONED

    def live(self, now: datetime) -> bool:
        return (self.status in (PROVISIONING, PROVISIONED) and self.lease_expires is not None
                and self.lease_expires >= now)


@dataclass(frozen=True)
class Nonce:
    """A v2 request's nonce and until when it must be remembered (after that its timestamp is stale anyway)."""

    value: str
    expires: datetime




# --- the item form: the one place that knows the sample's attribute names --------------------------------------













# --- the one refusal rule --------------------------------------------------------------------------------------







# --- renewal (POST /device-renewal) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RenewalState:
    """What a renewal needs to know of a device, read in one go."""

    thing_name: str
    provisioned: bool
    region: str | None = None
    certificate_id: str | None = None
    public_key: str | None = None  # PEM of the current certificate's key, kept at issue time
    fingerprint: str | None = None  # SHA-256 of that key's SubjectPublicKeyInfo DER, hex
    previous_certificate_id: str | None = None
    previous_public_key: str | None = None
    previous_region: str | None = None
    retire_pending: bool = False  # the previous certificate (and thing, after a move) is not yet removed
    renewing_until: float | None = None  # lease end (epoch seconds) of a renewal in flight
    renewal_count: int = 0
    last_renewal: str | None = None


@dataclass(frozen=True)
class RenewedCertificate:
    """The certificate a renewal records as the device's current one."""

    region: str
    certificate_id: str
    public_key: str
    fingerprint: str
    expires: str | None = None  # the certificate's end of validity, clock.timestamp form
    country: str | None = None
    reason: str | None = None  # set on a move: why the device now lives in `region`
    server_key: bool = False  # the key was made by the service (no CSR): DeviceRecord.server_key


