"""What every registry backend offers. Status changes are conditional writes, never read-then-write.

The registry's records cross this port as frozen `DeviceRecord`s. The item form (the original sample's
attribute names, `thing_name`, `prov_status`, `prov_datetime`, `aws_region`, ...) is written here once:
`record_from_item` is how a backend turns what it stored into a record, `item_of` is the JSON operators see.
"""
from __future__ import annotations

import builtins
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
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


@dataclass(frozen=True)
class Claim:
    """Proof that this request, and no other, is provisioning the device until the lease ends."""

    thing_name: str
    token: str


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
                   "attributes")


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
    )


def item_of(record: DeviceRecord) -> dict[str, Any]:
    """The JSON operators see (admin show, list --json/--csv): the sample's names, absent values left out."""
    values: dict[str, Any] = {
        "thing_name": record.thing_name, "prov_status": record.status.value,
        "prov_datetime": record.provisioned_at and timestamp(record.provisioned_at), "aws_region": record.region,
        "certificate_id": record.certificate_id, "public_key_fingerprint": record.key_fingerprint,
        "public_key": record.public_key, "country": record.country, "region_reason": record.region_reason,
        "last_error": record.last_error, "attempts": record.attempts or None,
        "attributes": dict(record.attributes) or None}
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

def claim_refusal(thing_name: str, record: DeviceRecord | None, fleet_key: bool) -> ProvisioningError:
    """Why a conditional claim was refused, decided from the record as the refused write saw it (None: no item).

    Every backend raises what this returns: the rule lives here, the condition that enforces it in each backend.
    """
    if record is None:
        return NotRegistered(f"{thing_name} is not on the allow-list")
    if fleet_key and record.public_key:  # the device has its own key: the fleet key's signature does not count
        return SignatureInvalid(REFUSED)
    if record.status is PROVISIONED:
        return AlreadyProvisioned(f"{thing_name} is already provisioned", record=record)
    return ProvisioningInProgress(f"{thing_name} is being provisioned by another request")


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
        request (replayed-request). Other refusals are `claim_refusal`'s, from the record the write saw.
        """

    def finalize(self, claim: Claim, region: str, certificate_id: str, now: datetime,
                 fingerprint: str | None = None, country: str | None = None, reason: str | None = None) -> None:
        """provisioning -> provisioned, only while `claim` still holds; else raises ProvisioningInProgress.

        `fingerprint` is the SHA-256 of the certificate's public key (SubjectPublicKeyInfo DER), hex;
        `country` and `reason` say where the device was and why its region was chosen."""

    def release(self, claim: Claim, error: str) -> None:
        """provisioning -> unprovisioned after a failure, only while `claim` still holds; records the error."""

    def stuck(self, now: datetime) -> builtins.list[DeviceRecord]:
        """Records in provisioning whose lease has ended (a process died mid-way)."""

    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        """provisioning with an ended lease -> unprovisioned; False when it is no longer stuck."""

    def reset(self, thing_name: str) -> DeviceRecord | None:
        """Back to unprovisioned whatever the state, forgetting region and certificate; returns the record as
        it was, or None when the device is not registered."""
