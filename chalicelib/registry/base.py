"""What every registry backend offers. Status changes are conditional writes, never read-then-write.

The registry's records cross this port as frozen `DeviceRecord`s. The item form (the original sample's
attribute names, `thing_name`, `prov_status`, `prov_datetime`, `aws_region`, ...) is written here once:
`record_from_item` is how a backend turns what it stored into a record, `item_of` is the JSON operators see.
"""
from __future__ import annotations

import builtins
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from chalicelib.clock import timestamp
from chalicelib.errors import (
    REFUSED,
    AlreadyProvisioned,
    NotRegistered,
    ProvisioningError,
    ProvisioningInProgress,
    SignatureInvalid,
)


class DeviceStatus(StrEnum):
    UNPROVISIONED = "unprovisioned"
    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"


UNPROVISIONED = DeviceStatus.UNPROVISIONED
PROVISIONING = DeviceStatus.PROVISIONING
PROVISIONED = DeviceStatus.PROVISIONED
STATUSES = tuple(DeviceStatus)


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
    # device may ask again for a new one within the re-key window (chalicelib/renewal.py, RenewalService.rekey).
    server_key: bool = False


@dataclass(frozen=True)
class PendingIssue:
    """Write-ahead record of an issuance: written on the claim before the issuer is asked, completed with the
    certificate id as soon as the issuer answers, cleared by finalize or by a complete rollback. Whoever finds
    one left by a dead attempt settles it before going on (chalicelib/settle.py)."""

    region: str
    since: datetime                      # when it was written: the certificate, if any, is not older
    fingerprint: str | None = None       # the device's key (its CSR's), when the key is the device's
    certificate_id: str | None = None    # recorded right after the issuer answered
    created_thing: bool | None = None    # whether the attempt made the thing (None: not known yet)
    move: bool = False                   # a renewal moving the device to `region` (its thing made or adopted there)


@dataclass(frozen=True)
class Claim:
    """Proof that this request, and no other, is provisioning (or renewing) the device until the lease ends."""

    thing_name: str
    token: str
    previous: PendingIssue | None = None  # what a dead (or half rolled back) attempt left, to settle first
    renewal: bool = False  # the renewal lease of a provisioned device (begin_renewal), not a provisioning claim


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


def attributes_json(attributes: Mapping[str, str] | None) -> str | None:
    """Operator attributes as stored: one JSON object string, the same text on both backends."""
    return json.dumps(dict(attributes), sort_keys=True, separators=(",", ":")) if attributes else None


# --- the item form: the one place that knows the sample's attribute names --------------------------------------

ITEM_ATTRIBUTES = ("thing_name", "prov_status", "prov_datetime", "aws_region", "certificate_id",
                   "public_key_fingerprint", "public_key", "country", "region_reason", "last_error", "attempts",
                   "attributes", "certificate_expires", "renewal_count", "last_renewal", "previous_certificate_id",
                   "previous_region", "retire_pending", "renewal_lease", "server_key")


def record_from_item(item: Mapping[str, Any]) -> DeviceRecord:
    """A record from an item as stored: absent or null attributes are absent; `attributes` is JSON text,
    `lease_expires` epoch seconds."""
    attributes = item.get("attributes")
    lease = item.get("lease_expires")
    when = item.get("prov_datetime")
    return DeviceRecord(
        thing_name=item["thing_name"],
        status=DeviceStatus(item.get("prov_status") or UNPROVISIONED),
        provisioned_at=datetime.fromisoformat(when) if when else None,
        region=item.get("aws_region"),
        certificate_id=item.get("certificate_id"),
        key_fingerprint=item.get("public_key_fingerprint"),
        public_key=item.get("public_key"),
        country=item.get("country"),
        region_reason=item.get("region_reason"),
        last_error=item.get("last_error"),
        attempts=int(item.get("attempts") or 0),
        attributes=json.loads(attributes) if attributes else {},
        lease_expires=datetime.fromtimestamp(float(lease), timezone.utc) if lease is not None else None,
        certificate_expires=_when(item.get("certificate_expires")),
        renewal_count=int(item.get("renewal_count") or 0),
        last_renewal=_when(item.get("last_renewal")),
        previous_certificate_id=item.get("previous_certificate_id"),
        previous_region=item.get("previous_region"),
        retire_pending=bool(item.get("retire_pending")),
        renewal_lease=(datetime.fromtimestamp(float(item["renewal_lease"]), timezone.utc)
                       if item.get("renewal_lease") is not None else None),
        server_key=bool(item.get("server_key")),
    )


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def item_of(record: DeviceRecord) -> dict[str, Any]:
    """The JSON operators see (admin show, list --json/--csv): the sample's names, absent values left out."""
    values: dict[str, Any] = {
        "thing_name": record.thing_name, "prov_status": record.status.value,
        "prov_datetime": record.provisioned_at and timestamp(record.provisioned_at), "aws_region": record.region,
        "certificate_id": record.certificate_id, "public_key_fingerprint": record.key_fingerprint,
        "public_key": record.public_key, "country": record.country, "region_reason": record.region_reason,
        "last_error": record.last_error, "attempts": record.attempts or None,
        "attributes": dict(record.attributes) or None,
        "certificate_expires": record.certificate_expires and timestamp(record.certificate_expires),
        "renewal_count": record.renewal_count or None,
        "last_renewal": record.last_renewal and timestamp(record.last_renewal),
        "previous_certificate_id": record.previous_certificate_id, "previous_region": record.previous_region,
        "retire_pending": record.retire_pending or None, "server_key": record.server_key or None}
    return {name: value for name, value in values.items() if value is not None}


# What `admin list` shows, in order: the table, and the CSV (attributes as one JSON cell).
TABLE_COLUMNS = ("thing_name", "prov_status", "aws_region", "prov_datetime")
CSV_COLUMNS = ("thing_name", "prov_status", "aws_region", "prov_datetime", "certificate_id", "country",
               "attempts", "last_error", "attributes")


def item_cells(record: DeviceRecord, columns: tuple[str, ...], missing: str = "") -> list[Any]:
    """One row of the item form, `missing` where a value is absent; attributes as one JSON object cell."""
    item = item_of(record)
    if "attributes" in item:  # one cell, however many attributes a device has
        item["attributes"] = json.dumps(item["attributes"], sort_keys=True, ensure_ascii=False)
    return [item.get(column, missing) for column in columns]


# --- the one refusal rule --------------------------------------------------------------------------------------

def claim_refusal(thing_name: str, record: DeviceRecord | None, fleet_key: bool,
                  now: datetime | None = None) -> ProvisioningError:
    """Why a conditional claim was refused, decided from the record as the refused write saw it (None: no item).

    Every backend raises what this returns: the rule lives here, the condition that enforces it in each backend.
    A device in progress is free again, at the latest, when its lease ends: that is its Retry-After.
    """
    if record is None:
        return NotRegistered(f"{thing_name} is not on the allow-list")
    if fleet_key and record.public_key:  # the device has its own key: the fleet key's signature does not count
        return SignatureInvalid(REFUSED)
    if record.status is PROVISIONED:
        return AlreadyProvisioned(f"{thing_name} is already provisioned", record=record)
    left = (record.lease_expires - now).total_seconds() if record.lease_expires and now else None
    return ProvisioningInProgress(f"{thing_name} is being provisioned by another request",
                                  retry_after=None if left is None else max(1, math.ceil(left)))


def rekey_refusal(thing_name: str, record: DeviceRecord | None, fleet_key: bool, now: datetime,
                  quiet_seconds: int = 0) -> ProvisioningError:
    """Why a re-key claim (`begin_rekey`) was refused: claim_refusal's rule, then a re-key in flight or a
    provisioning, re-key or renewal that may still be answering (409 with the time left), else the device is
    provisioned for good (its window is over, or its key is its own)."""
    if record is None or (fleet_key and record.public_key) or record.status is not PROVISIONED:
        return claim_refusal(thing_name, record, fleet_key, now)
    if record.renewal_lease is not None and record.renewal_lease >= now:
        return ProvisioningInProgress(f"{thing_name} is being re-keyed by another request",
                                      retry_after=max(1, math.ceil((record.renewal_lease - now).total_seconds())))
    # The last certificate answered: the provisioning's, or a later re-key's (or renewal's).
    issued = max((at for at in (record.provisioned_at, record.last_renewal) if at is not None), default=None)
    opens = issued + timedelta(seconds=quiet_seconds) if issued is not None else None
    if record.server_key and opens is not None and opens > now:
        what = "provisioned" if issued == record.provisioned_at else "given a new certificate"
        return ProvisioningInProgress(f"{thing_name} was {what} just now; its answer may still be on the way",
                                      retry_after=max(1, math.ceil((opens - now).total_seconds())))
    return AlreadyProvisioned(f"{thing_name} is already provisioned; an operator must reset it (admin reset) before "
                              "it can provision again", record=record)


class Registry(Protocol):
    def create(self) -> None:
        """Make the table if it is missing; safe to repeat."""

    def register(self, thing_names: Iterable[str], public_keys: Mapping[str, str] | None = None,
                 attributes: Mapping[str, Mapping[str, str]] | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
        """Add devices as unprovisioned, with their own public key (PEM) and attributes where given; names
        already present are left as they are. Returns how many were new.

        `progress(done)` is called after each batch with how many distinct names have been dealt with so far."""

    def get(self, thing_name: str) -> DeviceRecord | None:
        """The device's record, None when it is not registered."""

    def list(self, status: DeviceStatus | None = None, region: str | None = None,
             since: datetime | None = None) -> Iterator[DeviceRecord]:
        """Records sorted by name; only those in `status`, in `region`, provisioned at or after `since` when given."""

    def claim(self, thing_name: str, now: datetime, lease_seconds: int, fleet_key: bool = False,
              nonce: Nonce | None = None) -> Claim:
        """unprovisioned (or provisioning with a lease that ended before `now`) -> provisioning, atomically.

        With `fleet_key` (the request was signed with the fleet key) the claim also requires that the device
        has no key of its own. Each successful claim adds one to the record's `attempts`. `nonce` (a v2
        request's) is recorded whatever becomes of the claim; one seen before and not yet expired refuses the
        request (replayed-request). Other refusals are `claim_refusal`'s, from the record the write saw. The
        claim carries the write-ahead record a dead attempt left (`previous`), read in the same atomic write.
        """

    def finalize(self, claim: Claim, region: str, certificate_id: str, now: datetime,
                 fingerprint: str | None = None, country: str | None = None, reason: str | None = None,
                 public_key: str | None = None, expires: str | None = None, server_key: bool = False) -> None:
        """provisioning -> provisioned, only while `claim` still holds; else raises ProvisioningInProgress.

        `server_key`: the certificate's key was made by the service (no CSR), which allows a re-key.

        `public_key` (PEM) is the certificate's key, which a renewal's signature is checked with; `expires` its
        end of validity (clock.timestamp form), for `admin list --expiring-within`.

        `fingerprint` is the SHA-256 of the certificate's public key (SubjectPublicKeyInfo DER), hex;
        `country` and `reason` say where the device was and why its region was chosen."""

    def release(self, claim: Claim, error: str, keep_pending: bool = False) -> None:
        """provisioning -> unprovisioned after a failure, only while `claim` still holds; records the error.

        `keep_pending` leaves the write-ahead record (a rollback that could not undo everything): the next
        claim, or the audit, settles it."""

    def record_intent(self, claim: Claim, pending: PendingIssue) -> None:
        """Write what is about to be issued on the claim (replacing a settled record); only while `claim` holds,
        else raises ProvisioningInProgress (RenewalInProgress for a renewal's claim)."""

    def record_certificate(self, claim: Claim, certificate_id: str, created_thing: bool) -> None:
        """Add the certificate id the issuer answered to the write-ahead record; only while `claim` holds."""

    def claims(self, now: datetime) -> builtins.list[ClaimState]:
        """Every device in provisioning, under a renewal lease (live or ended), or with a write-ahead record,
        sorted by name."""

    def check(self) -> None:
        """Raise unless the registry can be read and written now (GET /health, admin init)."""

    def stuck(self, now: datetime) -> builtins.list[DeviceRecord]:
        """Records in provisioning whose lease has ended (a process died mid-way)."""

    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        """provisioning with an ended lease -> unprovisioned; False when it is no longer stuck."""

    def reset(self, thing_name: str) -> DeviceRecord | None:
        """Back to unprovisioned whatever the state, forgetting region and certificate; returns the record as
        it was, or None when the device is not registered."""


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


class RenewalRegistry(Registry, Protocol):
    """A registry that also keeps renewals (both backends are)."""

    def renewal_state(self, thing_name: str) -> RenewalState | None:
        """The device's renewal view; None when it is not registered."""

    def begin_renewal(self, thing_name: str, certificate_id: str, now: datetime, lease_seconds: int,
                      nonce: Nonce | None = None) -> Claim:
        """Take the renewal lease of a provisioned device whose current certificate is `certificate_id`, with no
        other renewal in flight and no previous certificate left to retire; records the nonce in the same step
        (one seen before refuses the request). Raises RenewalInProgress, RenewalRefused or SignatureInvalid.

        The claim (`renewal`) carries the write-ahead record a dead renewal left (`previous`), read in the same
        write; `record_intent` and `record_certificate` take it as they take a provisioning claim."""

    def begin_rekey(self, thing_name: str, now: datetime, lease_seconds: int, window_seconds: int,
                    fleet_key: bool = False, quiet_seconds: int = 0) -> Claim:
        """Take the renewal lease of a device provisioned with a server-made key (`server_key`) between
        `now - window_seconds` and `now - quiet_seconds` (the provisioning request is over), whose last re-key or
        renewal (`last_renewal`), if any, completed by `now - quiet_seconds` too (its answer is over), with no
        renewal lease live and no previous certificate left to retire, in one conditional write, as `claim` (the
        fleet-key rule included). The claim carries what a dead re-key left (`previous`). Refusals are
        `rekey_refusal`'s."""

    def complete_renewal(self, claim: Claim, renewed: RenewedCertificate, now: datetime) -> None:
        """Make `renewed` the current certificate while `claim` holds: the old one becomes the previous one (to
        retire), the renewal count goes up by one, the write-ahead record is cleared. Else raises
        RenewalInProgress."""

    def abandon_renewal(self, claim: Claim, error: str, keep_pending: bool = False) -> None:
        """Give the renewal lease back after a failure (the current certificate stays); records the error.
        `keep_pending` leaves the write-ahead record (something may be left): the next renewal, or the audit,
        settles it."""

    def reopen_renewal(self, thing_name: str, certificate_id: str, previous_fingerprint: str, now: datetime) -> bool:
        """The renewal that made `certificate_id` current was never answered (it died before retiring the
        previous certificate): the previous certificate is current again, and `certificate_id` goes to the
        write-ahead record for the next renewal lease to settle. Only while the previous certificate waits to be
        retired and no renewal lease is live; False otherwise (nothing changed)."""

    def previous_retired(self, thing_name: str, certificate_id: str) -> None:
        """The previous certificate `certificate_id` is revoked (and its thing removed after a move)."""

    def set_public_key(self, thing_name: str, certificate_id: str, public_key: str) -> None:
        """Keep the public key of the current certificate `certificate_id` (devices provisioned before keys were
        kept); nothing when the device has another certificate by now."""
