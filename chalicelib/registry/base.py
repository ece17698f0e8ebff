"""What every registry backend offers. Status changes are conditional writes, never read-then-write."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable, Iterator, Mapping, Protocol

UNPROVISIONED = "unprovisioned"
PROVISIONING = "provisioning"
PROVISIONED = "provisioned"
STATUSES = (UNPROVISIONED, PROVISIONING, PROVISIONED)


def attributes_json(attributes: Mapping[str, str] | None) -> str | None:
    """Operator attributes as stored: one JSON object string, the same text on both backends."""
    return json.dumps(dict(attributes), sort_keys=True, separators=(",", ":")) if attributes else None


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


@dataclass(frozen=True)
class Claim:
    """Proof that this request, and no other, is provisioning the device until the lease ends."""

    thing_name: str
    token: str
    previous: PendingIssue | None = None  # what a dead (or half rolled back) attempt left, to settle first


@dataclass(frozen=True)
class ClaimState:
    """A device in provisioning, or one whose last attempt left a write-ahead record (for the audit)."""

    thing_name: str
    status: str
    claimed_at: datetime | None
    lease_expires: datetime | None
    pending: PendingIssue | None

    def live(self, now: datetime) -> bool:
        return self.status == PROVISIONING and self.lease_expires is not None and self.lease_expires >= now


class Registry(Protocol):
    def create(self) -> None:
        """Make the table if it is missing; safe to repeat."""

    def register(self, thing_names: Iterable[str], public_keys: Mapping[str, str] | None = None,
                 attributes: Mapping[str, Mapping[str, str]] | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
        """Add devices as unprovisioned, with their own public key (PEM) and attributes where given; names
        already present are left as they are. Returns how many were new.

        `progress(done)` is called after each batch with how many distinct names have been dealt with so far."""

    def get(self, thing_name: str) -> dict | None:
        """The public item: `attempts` (claims so far) is an int, `attributes` a dict; absent fields are left out."""

    def list(self, status: str | None = None, region: str | None = None,
             since: datetime | None = None) -> Iterator[dict]:
        """Items sorted by name; only those in `status`, in `region`, provisioned at or after `since` when given."""

    def claim(self, thing_name: str, now: datetime, lease_seconds: int, fleet_key: bool = False,
              nonce: tuple[str, float] | None = None) -> Claim:
        """unprovisioned (or provisioning with an expired lease) -> provisioning, atomically.

        With `fleet_key` (the request was signed with the fleet key) the claim also requires that the device
        has no key of its own. Each successful claim adds one to the item's `attempts`. `nonce` (a v2
        request's nonce, and until when to remember it, epoch seconds) is recorded whatever becomes of the
        claim; one seen before refuses the request. The claim carries the write-ahead record a dead attempt
        left (`previous`), read in the same atomic write. Raises NotRegistered, AlreadyProvisioned,
        ProvisioningInProgress (with `retry_after` = the seconds left on the lease) or SignatureInvalid.
        """

    def finalize(self, claim: Claim, region: str, certificate_id: str, now: datetime,
                 fingerprint: str | None = None, country: str | None = None, reason: str | None = None) -> None:
        """provisioning -> provisioned, only while `claim` still holds; else raises ProvisioningInProgress.

        `fingerprint` is the SHA-256 of the certificate's public key (SubjectPublicKeyInfo DER), hex;
        `country` and `reason` say where the device was and why its region was chosen."""

    def release(self, claim: Claim, error: str, keep_pending: bool = False) -> None:
        """provisioning -> unprovisioned after a failure, only while `claim` still holds; records the error.

        `keep_pending` leaves the write-ahead record (a rollback that could not undo everything): the next
        claim, or the audit, settles it."""

    def record_intent(self, claim: Claim, pending: PendingIssue) -> None:
        """Write what is about to be issued on the claim (replacing a settled record); only while `claim` holds,
        else raises ProvisioningInProgress."""

    def record_certificate(self, claim: Claim, certificate_id: str, created_thing: bool) -> None:
        """Add the certificate id the issuer answered to the write-ahead record; only while `claim` holds."""

    def claims(self, now: datetime) -> list[ClaimState]:
        """Every device in provisioning or with a write-ahead record, sorted by name."""

    def stuck(self, now: datetime) -> list[dict]:
        """Items in provisioning whose lease has ended (a process died mid-way), with `lease_expires`."""

    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        """provisioning with an ended lease -> unprovisioned; False when it is no longer stuck."""

    def reset(self, thing_name: str) -> dict | None:
        """Back to unprovisioned whatever the state, forgetting region and certificate; returns the item as
        it was, or None when the device is not registered."""
