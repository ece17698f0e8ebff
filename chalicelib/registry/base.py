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
class Claim:
    """Proof that this request, and no other, is provisioning the device until the lease ends."""

    thing_name: str
    token: str


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
        claim; one seen before refuses the request. Raises NotRegistered, AlreadyProvisioned,
        ProvisioningInProgress or SignatureInvalid.
        """

    def finalize(self, claim: Claim, region: str, certificate_id: str, now: datetime,
                 fingerprint: str | None = None, country: str | None = None, reason: str | None = None,
                 public_key: str | None = None, expires: str | None = None) -> None:
        """provisioning -> provisioned, only while `claim` still holds; else raises ProvisioningInProgress.

        `public_key` (PEM) is the certificate's key, which a renewal's signature is checked with; `expires` its
        end of validity (clock.timestamp form), for `admin list --expiring-within`.

        `fingerprint` is the SHA-256 of the certificate's public key (SubjectPublicKeyInfo DER), hex;
        `country` and `reason` say where the device was and why its region was chosen."""

    def release(self, claim: Claim, error: str) -> None:
        """provisioning -> unprovisioned after a failure, only while `claim` still holds; records the error."""

    def stuck(self, now: datetime) -> list[dict]:
        """Items in provisioning whose lease has ended (a process died mid-way), with `lease_expires`."""

    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        """provisioning with an ended lease -> unprovisioned; False when it is no longer stuck."""

    def reset(self, thing_name: str) -> dict | None:
        """Back to unprovisioned whatever the state, forgetting region and certificate; returns the item as
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


class RenewalRegistry(Protocol):
    def renewal_state(self, thing_name: str) -> RenewalState | None:
        """The device's renewal view; None when it is not registered."""

    def begin_renewal(self, thing_name: str, certificate_id: str, now: datetime, lease_seconds: int,
                      nonce: tuple[str, float] | None = None) -> Claim:
        """Take the renewal lease of a provisioned device whose current certificate is `certificate_id`, with no
        other renewal in flight and no previous certificate left to retire; records the nonce in the same step
        (one seen before refuses the request). Raises RenewalInProgress, RenewalRefused or SignatureInvalid."""

    def complete_renewal(self, claim: Claim, renewed: RenewedCertificate, now: datetime) -> None:
        """Make `renewed` the current certificate while `claim` holds: the old one becomes the previous one (to
        retire), the renewal count goes up by one. Else raises RenewalInProgress."""

    def abandon_renewal(self, claim: Claim, error: str) -> None:
        """Give the renewal lease back after a failure (the current certificate stays); records the error."""

    def previous_retired(self, thing_name: str, certificate_id: str) -> None:
        """The previous certificate `certificate_id` is revoked (and its thing removed after a move)."""

    def set_public_key(self, thing_name: str, certificate_id: str, public_key: str) -> None:
        """Keep the public key of the current certificate `certificate_id` (devices provisioned before keys were
        kept); nothing when the device has another certificate by now."""
