"""The registry's item form: the original sample's attribute names, written once for both backends."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from chalicelib.domain.clock import timestamp
from chalicelib.domain.records import UNPROVISIONED, DeviceRecord, DeviceStatus, Revocation


def attributes_json(attributes: Mapping[str, str] | None) -> str | None:
    """Operator attributes as stored: one JSON object string, the same text on both backends."""
    return json.dumps(dict(attributes), sort_keys=True, separators=(",", ":")) if attributes else None


def revocations_json(revocations: Iterable[Revocation]) -> str:
    """A reset's intent as stored (`reset_pending`): one JSON array string, the same text on both backends."""
    return json.dumps([_revocation_item(revocation) for revocation in revocations], sort_keys=True,
                      separators=(",", ":"))


def _revocation_item(revocation: Revocation) -> dict[str, Any]:
    return {"region": revocation.region, "certificate_id": revocation.certificate_id,
            "delete_thing": revocation.delete_thing}


def _revocations(text: str | None) -> tuple[Revocation, ...]:
    return tuple(Revocation(item["region"], item["certificate_id"], bool(item["delete_thing"]))
                 for item in json.loads(text)) if text else ()


ITEM_ATTRIBUTES = ("thing_name", "prov_status", "prov_datetime", "aws_region", "certificate_id",
                   "public_key_fingerprint", "public_key", "country", "region_reason", "last_error", "attempts",
                   "attributes", "certificate_expires", "renewal_count", "last_renewal", "previous_certificate_id",
                   "previous_region", "retire_pending", "renewal_lease", "server_key", "reset_pending")


# Reading a device that is not registered goes through the same steps as reading one that is, on this stand-in
# (then answers None), so that it costs the same: the refusals of an unknown and of a registered device take the
# same time (domain/decoys.py, bench/timing.py). Its name is no thing name; its values have a typical device's
# sizes (provisioned, renewed once, with a signing key of its own); the backends' own columns are included.
STAND_IN_NAME = "*not-registered*"
_PEM = ("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEJm7h50X1JEeH9PlOvbEbgXS1roS/\n"
        "fucOdLoVjkavQnDYLx93UZK0LbAPnbaM68xKK0OTlKcAbrUGYSdV2mTcvA==\n-----END PUBLIC KEY-----\n")
STAND_IN_ITEM: dict[str, str | int | float] = {
    "thing_name": STAND_IN_NAME, "prov_status": "provisioned", "prov_datetime": "2026-01-01T00:00:00Z",
    "aws_region": "eu-west-2", "certificate_id": "0" * 64, "public_key_fingerprint": "0" * 64, "public_key": _PEM,
    "country": "GB", "region_reason": "nearest", "attempts": 1, "certificate_expires": "2027-01-01T00:00:00Z",
    "renewal_count": 1, "last_renewal": "2026-06-01T00:00:00Z", "previous_certificate_id": "1" * 64,
    "previous_region": "eu-west-2", "certificate_public_key": _PEM, "previous_public_key": _PEM}


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
        reset_pending=_revocations(item.get("reset_pending")),
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
        "retire_pending": record.retire_pending or None, "server_key": record.server_key or None,
        "reset_pending": [_revocation_item(revocation) for revocation in record.reset_pending] or None}
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
