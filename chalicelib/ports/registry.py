"""The registry port: what every registry backend offers. Status changes are conditional writes, never
read-then-write."""
from __future__ import annotations

import builtins
from datetime import datetime
from typing import Callable, Collection, Iterable, Iterator, Mapping, Protocol, Sequence

from chalicelib.domain.records import (
    Claim,
    ClaimState,
    DeviceRecord,
    DeviceStatus,
    Nonce,
    PendingIssue,
    RenewalState,
    RenewedCertificate,
    Revocation,
)


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
              nonce: Nonce | None = None, intent: PendingIssue | None = None) -> Claim:
        """unprovisioned (or provisioning with a lease that ended before `now`) -> provisioning, atomically.

        With `fleet_key` (the request was signed with the fleet key) the claim also requires that the device
        has no key of its own (refused so, the request changes nothing). Each successful claim adds one to the
        record's `attempts`. `nonce` (a v2 request's) is recorded whatever else becomes of the claim, also for a
        device not registered yet; one seen before and not yet expired refuses the request (replayed-request)
        and changes nothing. Other refusals are `claim_refusal`'s, from the record the write saw.

        The claim carries the write-ahead record a dead attempt left (`previous`), read in the same atomic write.
        `intent` is written as the write-ahead record by that same write when no dead attempt left one
        (`claim.intent`); a record left is handed over instead and kept (the holder settles it, then
        `record_intent`).
        """

    def withdraw(self, claim: Claim) -> None:
        """Give back a claim (or renewal lease) that issued nothing and must leave no trace, because the request it
        was taken for was refused beside it (admission control): the record as the claim found it, attempts and
        write-ahead record included; only the request's nonce stays used up. Only while `claim` holds."""

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
        """Give the claim back after a failure, only while it still holds; records the error. A provisioning claim:
        provisioning -> unprovisioned. A renewal lease (`claim.renewal`): the lease ends, the device keeps its
        current certificate.

        `keep_pending` leaves the write-ahead record (a rollback that could not undo everything): the next
        claim, or the audit, settles it."""

    def record_intent(self, claim: Claim, pending: PendingIssue) -> None:
        """Write what is about to be issued on the claim (replacing a settled record); only while `claim` holds,
        else raises ProvisioningInProgress (RenewalInProgress for a renewal's claim)."""

    def record_certificate(self, claim: Claim, certificate_id: str, created_thing: bool) -> None:
        """Add a certificate id to the write-ahead record (what a rollback could not undo); only while `claim`
        holds."""

    def claims(self, now: datetime) -> builtins.list[ClaimState]:
        """Every device in provisioning, under a renewal lease (live or ended), or with a write-ahead record,
        sorted by name."""

    def check(self) -> None:
        """Raise unless the registry can be read and written now (GET /health, admin init)."""

    def stuck(self, now: datetime) -> builtins.list[DeviceRecord]:
        """Records in provisioning whose lease has ended (a process died mid-way)."""

    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        """provisioning with an ended lease -> unprovisioned; False when it is no longer stuck."""

    def begin_reset(self, thing_name: str, revocations: Sequence[Revocation]) -> bool:
        """Record a reset's intent on the device (`reset_pending`): the certificates it is about to revoke, in one
        conditional write (the device is registered; False when it is not), replacing an earlier intent. A reset cut
        short after it (a storage fault, a crash) leaves it there: the audit lists it, and the next reset (admin
        reset, audit --fix) revokes them again and finishes."""

    def reset(self, thing_name: str, revoked: Collection[str] | None = None) -> DeviceRecord | None:
        """Back to unprovisioned whatever the state, forgetting region, certificates, claim, last error and the
        reset's intent, in one conditional write; returns the record as it was. With `revoked` (certificate ids)
        only while every certificate the device may still use (its current one, a previous one waiting to be
        retired) is among them. None when nothing changed: the device is not registered, or it holds a certificate
        outside `revoked` (a renewal recorded meanwhile)."""


class RenewalRegistry(Registry, Protocol):
    """A registry that also keeps renewals (both backends are)."""

    def renewal_state(self, thing_name: str) -> RenewalState | None:
        """The device's renewal view; None when it is not registered."""

    def begin_renewal(self, thing_name: str, certificate_id: str, now: datetime, lease_seconds: int,
                      nonce: Nonce | None = None, intent: PendingIssue | None = None) -> Claim:
        """Take the renewal lease of a provisioned device whose current certificate is `certificate_id`, with no
        other renewal in flight and no previous certificate left to retire; records the nonce in the same step
        (one seen before refuses the request, which then changes nothing). Raises RenewalInProgress,
        RenewalRefused or SignatureInvalid.

        The claim (`renewal`) carries the write-ahead record a dead renewal left (`previous`), read in the same
        write; `intent` is written by that write when there is none, as `claim` does. `record_intent` and
        `record_certificate` take it as they take a provisioning claim."""

    def begin_rekey(self, thing_name: str, now: datetime, lease_seconds: int, window_seconds: int,
                    fleet_key: bool = False, quiet_seconds: int = 0, intent: PendingIssue | None = None) -> Claim:
        """Take the renewal lease of a device provisioned with a server-made key (`server_key`) between
        `now - window_seconds` and `now - quiet_seconds` (the provisioning request is over), whose last re-key or
        renewal (`last_renewal`), if any, completed by `now - quiet_seconds` too (its answer is over), with no
        renewal lease live and no previous certificate left to retire, in one conditional write, as `claim` (the
        fleet-key rule included). The claim carries what a dead re-key left (`previous`), or `intent` written with
        it. Refusals are `rekey_refusal`'s."""

    def complete_renewal(self, claim: Claim, renewed: RenewedCertificate, now: datetime) -> None:
        """Make `renewed` the current certificate while `claim` holds: the old one becomes the previous one (to
        retire), the renewal count goes up by one, the write-ahead record is cleared. Else raises
        RenewalInProgress."""

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
