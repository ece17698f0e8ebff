"""ProvisioningService built directly from real local parts: SQLite registry, local CAs, bundled DB-IP City Lite.

Failures are made by small wrappers around the real parts, passed in through the constructor.
"""
import hashlib
import logging
import sqlite3
import threading
from contextlib import closing
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from chalicelib.adapters.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.adapters.registry.items import item_of
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.domain.errors import (
    AlreadyProvisioned,
    NotRegistered,
    ProvisioningInProgress,
    ServiceUnavailable,
    SignatureInvalid,
)
from chalicelib.domain.regions import SAMPLE_REGIONS, RegionPolicy
from chalicelib.domain.requests import ProvisioningRequest
from chalicelib.domain.signatures import FleetKeyVerifier
from chalicelib.edge.wire import response_body
from chalicelib.services.provisioning import ProvisioningService
from tests.conftest import LONDON_IP, TOKYO_IP, make_csr, sign_v1, v2_body

LEASE = 300
T0 = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FailingIssuer:
    """A real LocalIssuer whose issue() (first `times` calls) or revoke() raises."""

    def __init__(self, real: LocalIssuer, issue_error: Exception | None = None, times: int = 1,
                 revoke_error: Exception | None = None):
        self.real = real
        self.issue_error = issue_error
        self.times = times
        self.revoke_error = revoke_error
        self.issued = []

    def __getattr__(self, name):  # everything else (settling a dead attempt's record) is the real issuer's
        return getattr(self.real, name)

    def issue(self, thing_name, region, csr, in_place=False):
        if self.issue_error is not None and self.times > 0:
            self.times -= 1
            raise self.issue_error
        issued = self.real.issue(thing_name, region, csr, in_place)
        self.issued.append(issued)
        return issued

    def revoke(self, issued, *, delete_thing):
        if self.revoke_error is not None:
            raise self.revoke_error
        self.real.revoke(issued, delete_thing=delete_thing)


class FailingFinalizeRegistry:
    """A real SqliteRegistry whose finalize() raises."""

    def __init__(self, real: SqliteRegistry, error: Exception):
        self.real = real
        self.error = error

    def __getattr__(self, name):
        return getattr(self.real, name)

    def finalize(self, *args, **kwargs):
        raise self.error


@pytest.fixture
def registry(tmp_path) -> SqliteRegistry:
    reg = SqliteRegistry(tmp_path / "registry.sqlite3")
    reg.create()
    reg.register(["dev-1", "dev-2", "dev-3"])
    yield reg
    reg.close()


@pytest.fixture
def issuer(tmp_path) -> LocalIssuer:
    return LocalIssuer(tmp_path / "ca", local_endpoints(SAMPLE_REGIONS, "localhost", 18883))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def build(registry, issuer, locator, fleet_key, clock):
    """Make a service from the real parts, replacing any of them by keyword."""

    def make(**parts) -> ProvisioningService:
        args = dict(registry=registry, issuer=issuer, locator=locator, regions=RegionPolicy(),
                    verifier=FleetKeyVerifier(fleet_key.public_key()), lease_seconds=LEASE, clock=clock)
        args.update(parts)
        return ProvisioningService(**args)

    return make


@pytest.fixture
def request_for(fleet_key):
    def make(thing_name: str, signed_name: str | None = None) -> ProvisioningRequest:
        csr_pem, _ = make_csr(thing_name)
        return ProvisioningRequest.from_body({
            "thing-name": thing_name, "thing-name-sig": sign_v1(fleet_key, signed_name or thing_name),
            "CSR": csr_pem})

    return make


def statuses(issuer: LocalIssuer, thing_name: str) -> list[str]:
    return sorted(record.status for record in issuer.certificates(thing_name))


def claim_token(registry_path, thing_name: str) -> str | None:
    with closing(sqlite3.connect(registry_path)) as db:
        return db.execute("SELECT claim_token FROM devices WHERE thing_name = ?", (thing_name,)).fetchone()[0]


# --- success ---------------------------------------------------------------------------------------------

def test_success_records_provisioned_region_and_an_active_certificate(build, registry, issuer, request_for, clock):
    request = request_for("dev-1")
    result = build().provision(request, LONDON_IP)

    assert result.thing_name == "dev-1"
    assert result.choice.region == "eu-west-2" and result.choice.reason == "nearest"
    assert result.note is None
    assert result.issued.private_key_pem is None  # CSR mode: the server never sees the device's key
    cert = x509.load_pem_x509_certificate(result.issued.certificate_pem.encode())
    assert cert.public_key() == request.csr.public_key()

    item = item_of(registry.get("dev-1"))
    spki = request.csr.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    assert item == {"thing_name": "dev-1", "prov_status": "provisioned", "prov_datetime": "2026-11-28T12:00:00Z",
                    "aws_region": "eu-west-2", "certificate_id": result.issued.certificate_id,
                    "public_key_fingerprint": hashlib.sha256(spki).hexdigest(), "country": "GB",
                    "region_reason": "nearest", "attempts": 1,
                    "certificate_expires": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}
    record = issuer.certificate(result.issued.certificate_id)
    assert record.status == "ACTIVE"
    assert record.thing_name == "dev-1" and record.region == "eu-west-2"
    assert format(cert.serial_number, "x") == record.serial
    # The other devices were not touched.
    assert registry.get("dev-2").status == "unprovisioned"


def test_a_second_provisioning_is_refused_and_keeps_the_first_certificate(build, registry, issuer, request_for):
    service = build()
    first = service.provision(request_for("dev-1"), LONDON_IP)
    with pytest.raises(AlreadyProvisioned):
        service.provision(request_for("dev-1"), TOKYO_IP)
    assert registry.get("dev-1").certificate_id == first.issued.certificate_id
    assert statuses(issuer, "dev-1") == ["ACTIVE"]


# --- failures after the claim ----------------------------------------------------------------------------

def test_issuer_failure_releases_the_claim_and_a_retry_succeeds(build, registry, issuer, request_for):
    failing = FailingIssuer(issuer, issue_error=RuntimeError("CA backend unreachable at 10.0.0.7"))
    service = build(issuer=failing)

    with pytest.raises(ServiceUnavailable) as raised:
        service.provision(request_for("dev-1"), LONDON_IP)
    error = raised.value
    assert error.code == "service-unavailable"
    assert isinstance(error.retry_after, int) and error.retry_after > 0
    assert isinstance(error.__cause__, RuntimeError)
    assert "10.0.0.7" not in error.message  # the device is not told about our internals

    item = registry.get("dev-1")
    assert item.status == "unprovisioned"
    assert "RuntimeError" in item.last_error and "CA backend unreachable" in item.last_error
    assert issuer.certificates("dev-1") == []

    result = service.provision(request_for("dev-1"), LONDON_IP)
    item = registry.get("dev-1")
    assert item.status == "provisioned"
    assert item.certificate_id == result.issued.certificate_id
    assert item.last_error is None
    assert statuses(issuer, "dev-1") == ["ACTIVE"]


def test_finalize_failure_revokes_the_issued_certificate_and_releases(build, registry, issuer, request_for,
                                                                     tmp_path):
    failing_registry = FailingFinalizeRegistry(registry, RuntimeError("disk I/O error"))
    spy = FailingIssuer(issuer)
    with pytest.raises(ServiceUnavailable) as raised:
        build(registry=failing_registry, issuer=spy).provision(request_for("dev-1"), LONDON_IP)
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert str(raised.value.__cause__) == "disk I/O error"

    [issued] = spy.issued
    assert issuer.certificate(issued.certificate_id).status == "REVOKED"
    item = registry.get("dev-1")
    assert item.status == "unprovisioned" and "disk I/O error" in item.last_error
    assert claim_token(tmp_path / "registry.sqlite3", "dev-1") is None

    # The device can try again; the revoked certificate stays revoked next to the new one.
    result = build().provision(request_for("dev-1"), LONDON_IP)
    assert registry.get("dev-1").certificate_id == result.issued.certificate_id
    assert statuses(issuer, "dev-1") == ["ACTIVE", "REVOKED"]
    assert issuer.certificate(result.issued.certificate_id).status == "ACTIVE"


def test_a_lease_lost_during_issue_revokes_our_certificate_and_leaves_the_new_claim_alone(
        build, registry, issuer, request_for, clock, tmp_path):
    """The issuer is so slow that the lease runs out and another request claims the device meanwhile."""
    competitor = {}

    class SlowIssuer(FailingIssuer):
        def issue(self, thing_name, region, csr, in_place=False):
            issued = super().issue(thing_name, region, csr, in_place)
            clock.advance(LEASE + 1)
            competitor["claim"] = registry.claim(thing_name, clock(), LEASE)
            return issued

    slow = SlowIssuer(issuer)
    with pytest.raises(ProvisioningInProgress):
        build(issuer=slow).provision(request_for("dev-1"), LONDON_IP)

    [ours] = slow.issued
    assert issuer.certificate(ours.certificate_id).status == "REVOKED"
    # Our rollback did not release the competitor's claim: it still holds the device...
    item = registry.get("dev-1")
    assert item.status == "provisioning"
    assert claim_token(tmp_path / "registry.sqlite3", "dev-1") == competitor["claim"].token
    # ...and can finish its own provisioning.
    registry.finalize(competitor["claim"], "ap-northeast-1", "competitor-cert", clock())
    assert registry.get("dev-1").certificate_id == "competitor-cert"


def test_a_failing_rollback_does_not_hide_the_original_error(build, registry, issuer, request_for, caplog):
    failing_registry = FailingFinalizeRegistry(registry, RuntimeError("the original failure"))
    failing_issuer = FailingIssuer(issuer, revoke_error=RuntimeError("revoke failed too"))
    with caplog.at_level(logging.ERROR, logger="chalicelib.services.provisioning"):
        with pytest.raises(ServiceUnavailable) as raised:
            build(registry=failing_registry, issuer=failing_issuer).provision(request_for("dev-1"), LONDON_IP)
    assert str(raised.value.__cause__) == "the original failure"
    [issued] = failing_issuer.issued
    # The operator is told which certificate may be left active.
    assert any(issued.certificate_id in record.getMessage() for record in caplog.records)
    assert issuer.certificate(issued.certificate_id).status == "ACTIVE"  # revoke really did not happen
    # The device is not stuck, and the item names what the audit must clean up.
    item = registry.get("dev-1")
    assert item.status == "unprovisioned"
    assert "rollback incomplete" in item.last_error and issued.certificate_id in item.last_error


def test_a_domain_error_inside_propagates_unchanged(build, registry, issuer, request_for):
    inner = ProvisioningInProgress("the region is busy with this thing")
    with pytest.raises(ProvisioningInProgress) as raised:
        build(issuer=FailingIssuer(issuer, issue_error=inner)).provision(request_for("dev-1"), LONDON_IP)
    assert raised.value is inner
    assert not isinstance(raised.value, ServiceUnavailable)
    item = registry.get("dev-1")
    assert item.status == "unprovisioned"
    assert "the region is busy" in item.last_error


# --- lease -----------------------------------------------------------------------------------------------

def test_a_device_stuck_past_its_lease_can_be_claimed_again(build, registry, issuer, request_for, clock):
    crashed = registry.claim("dev-1", clock(), LEASE)  # a request that died without releasing
    clock.advance(LEASE + 1)
    result = build().provision(request_for("dev-1"), LONDON_IP)
    item = registry.get("dev-1")
    assert item.status == "provisioned" and item.certificate_id == result.issued.certificate_id
    # The dead request's claim no longer counts.
    with pytest.raises(ProvisioningInProgress):
        registry.finalize(crashed, "eu-west-1", "stale", clock())
    assert registry.get("dev-1").certificate_id == result.issued.certificate_id


def test_within_the_lease_a_second_claim_is_in_progress(build, registry, issuer, request_for, clock):
    registry.claim("dev-1", clock(), LEASE)
    clock.advance(LEASE - 1)
    with pytest.raises(ProvisioningInProgress):
        build().provision(request_for("dev-1"), LONDON_IP)
    assert registry.get("dev-1").status == "provisioning"
    assert issuer.certificates("dev-1") == []


# --- concurrency -----------------------------------------------------------------------------------------

def test_concurrent_requests_for_one_device_provision_it_once(build, registry, issuer, request_for):
    service = build()
    threads_n = 8
    requests = [request_for("dev-1") for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)
    outcomes: list = [None] * threads_n

    def run(i):
        barrier.wait()
        try:
            outcomes[i] = service.provision(requests[i], LONDON_IP)
        except Exception as exc:  # collected and checked below
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)

    successes = [o for o in outcomes if not isinstance(o, Exception)]
    refusals = [o for o in outcomes if isinstance(o, Exception)]
    assert len(successes) == 1, outcomes
    assert all(isinstance(o, (AlreadyProvisioned, ProvisioningInProgress)) for o in refusals), refusals
    [winner] = successes
    active = [r.certificate_id for r in issuer.certificates("dev-1") if r.status == "ACTIVE"]
    assert active == [winner.issued.certificate_id]
    assert registry.get("dev-1").certificate_id == winner.issued.certificate_id


# --- signature and location ------------------------------------------------------------------------------

def test_the_signature_is_checked_before_the_allow_list(build, registry, request_for):
    with pytest.raises(SignatureInvalid):
        build().provision(request_for("ghost", signed_name="dev-1"), LONDON_IP)
    # The same unknown name with a good signature gets the allow-list's answer: the order is what differs.
    with pytest.raises(NotRegistered):
        build().provision(request_for("ghost"), LONDON_IP)
    assert registry.get("ghost") is None


def test_a_bad_signature_for_a_registered_device_changes_nothing(build, registry, issuer, request_for):
    with pytest.raises(SignatureInvalid):
        build().provision(request_for("dev-1", signed_name="dev-2"), LONDON_IP)
    assert item_of(registry.get("dev-1")) == {"thing_name": "dev-1", "prov_status": "unprovisioned"}
    assert issuer.certificates("dev-1") == []


def test_an_unknown_location_gets_the_default_region_with_a_note(build, registry, request_for):
    service = build(regions=RegionPolicy(SAMPLE_REGIONS, default="us-east-1"))
    result = service.provision(request_for("dev-1"), "10.1.2.3")
    assert result.choice.region == "us-east-1"
    assert result.choice.reason == "default" and result.choice.distance_km is None
    assert "10.1.2.3" in result.note and "unknown" in result.note
    body = response_body(result)
    assert body["reason"] == "default" and body["message"] == result.note
    assert registry.get("dev-1").region == "us-east-1"


@pytest.fixture
def rekeying(build, registry, issuer, locator, clock):
    """The service with re-keys on (a 900 s window), as the container builds it: a RenewalService in place."""
    from chalicelib.domain.relocation import RelocationPolicy
    from chalicelib.services.renewal import RenewalService

    def make(rekey_issuer=issuer) -> ProvisioningService:
        rekeyer = RenewalService(registry=registry, issuer=rekey_issuer, locator=locator, regions=RegionPolicy(),
                                 relocation=RelocationPolicy.parse("never"), lease_seconds=LEASE, clock=clock)
        return build(rekeyer=rekeyer, rekey_window_seconds=900)

    return make


@pytest.fixture
def server_key_request(fleet_key, clock):
    """A device's request without a CSR, signed v2 at the service's time (each one with a nonce of its own)."""
    return lambda: ProvisioningRequest.from_body(v2_body(fleet_key, "dev-1", at=clock()))


def test_concurrent_retries_of_a_lost_server_made_key_rekey_it_once(rekeying, registry, issuer, server_key_request,
                                                                      clock):
    """Eight retries without a CSR at once, in the re-key window: one re-key wins (one conditional write), the
    others are told 409 in progress, also those that come after the winner completed (its answer may still be on
    the way); one certificate stays ACTIVE, the registry's, and the first is revoked."""
    service = rekeying()
    first = service.provision(server_key_request(), LONDON_IP)
    clock.advance(LEASE + 1)  # the first answer is surely over (else: 409 in progress, nothing revoked)
    threads_n = 8
    requests = [server_key_request() for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)
    outcomes: list = [None] * threads_n

    def run(i):
        barrier.wait()
        try:
            outcomes[i] = service.provision(requests[i], LONDON_IP)
        except Exception as exc:  # collected and checked below
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    [winner] = [o for o in outcomes if not isinstance(o, Exception)]
    assert all(isinstance(o, ProvisioningInProgress) for o in outcomes if o is not winner), outcomes
    assert winner.choice.reason == "rekeyed" and winner.issued.private_key_pem
    statuses = {r.certificate_id: r.status for r in issuer.certificates("dev-1")}
    assert statuses == {first.issued.certificate_id: "REVOKED", winner.issued.certificate_id: "ACTIVE"}
    assert registry.get("dev-1").certificate_id == winner.issued.certificate_id
    clock.advance(900)  # the window counts from the provisioning: over
    with pytest.raises(AlreadyProvisioned, match="operator must reset"):
        service.provision(server_key_request(), LONDON_IP)


def test_a_duplicate_right_after_a_rekey_waits_and_only_a_retry_after_its_answer_rekeys(
        rekeying, registry, issuer, server_key_request, clock):
    """The re-key's answer is protected as provisioning's is: a duplicate one second later gets 409 with the time
    left, and the certificate the re-key answered with stays ACTIVE; a retry a lease's time later re-keys."""
    service = rekeying()
    first = service.provision(server_key_request(), LONDON_IP)
    clock.advance(LEASE + 1)
    rekeyed = service.provision(server_key_request(), LONDON_IP)
    assert rekeyed.choice.reason == "rekeyed"
    clock.advance(1)
    with pytest.raises(ProvisioningInProgress) as duplicate:
        service.provision(server_key_request(), LONDON_IP)
    assert duplicate.value.retry_after == LEASE - 1
    assert {r.certificate_id: r.status for r in issuer.certificates("dev-1")} == {
        first.issued.certificate_id: "REVOKED", rekeyed.issued.certificate_id: "ACTIVE"}
    assert registry.get("dev-1").certificate_id == rekeyed.issued.certificate_id
    clock.advance(LEASE - 1)  # that answer is over: the device asking again lost it too
    again = service.provision(server_key_request(), LONDON_IP)
    assert again.choice.reason == "rekeyed"
    assert [r.certificate_id for r in issuer.certificates("dev-1") if r.status == "ACTIVE"] == [
        again.issued.certificate_id]


def test_a_request_signed_v1_is_never_rekeyed(rekeying, registry, issuer, fleet_key, server_key_request, clock):
    """A v1 signature is the same for every request of the device: replayed in the window it would hand whoever
    saw it once a new key for the device and revoke the device's own. It is refused; a v2 request re-keys."""
    service = rekeying()
    v1 = {"thing-name": "dev-1", "thing-name-sig": sign_v1(fleet_key, "dev-1")}
    first = service.provision(ProvisioningRequest.from_body(v1), LONDON_IP)
    clock.advance(LEASE + 1)
    with pytest.raises(AlreadyProvisioned, match="signed v1 can be replayed, so it is never re-keyed"):
        service.provision(ProvisioningRequest.from_body(v1), LONDON_IP)
    assert statuses(issuer, "dev-1") == ["ACTIVE"] and registry.get("dev-1").renewal_count == 0
    assert service.provision(server_key_request(), LONDON_IP).choice.reason == "rekeyed"
    assert issuer.certificate(first.issued.certificate_id, first.issued.region).active is False


class FailingRetire:
    """A real LocalIssuer whose revoke() (here: of the previous certificate after a re-key) fails."""

    def __init__(self, real: LocalIssuer):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def revoke(self, ref, *, delete_thing):
        raise ServiceUnavailable("injected: revoking the previous certificate failed")


def test_a_rekey_whose_revocation_fails_answers_and_the_audit_finishes_it(rekeying, registry, issuer,
                                                                          server_key_request, clock):
    """The new certificate is recorded first; the old one's revocation failing leaves it marked to retire:
    `audit` lists it (an unfinished renewal) and `audit --fix` revokes it."""
    from admin import operations

    service = rekeying(FailingRetire(issuer))
    first = service.provision(server_key_request(), LONDON_IP)
    clock.advance(LEASE + 1)
    again = service.provision(server_key_request(), LONDON_IP)
    assert again.choice.reason == "rekeyed" and registry.get("dev-1").retire_pending
    assert statuses(issuer, "dev-1") == ["ACTIVE", "ACTIVE"]  # until the audit finishes it
    report = operations.audit(registry, issuer, SAMPLE_REGIONS, clock())
    assert [u.previous_certificate_id for u in report.unfinished_renewals] == [first.issued.certificate_id]
    operations.repair(registry, issuer, report, clock(), LEASE)
    assert {r.certificate_id: r.status for r in issuer.certificates("dev-1")} == {
        first.issued.certificate_id: "REVOKED", again.issued.certificate_id: "ACTIVE"}
    assert operations.audit(registry, issuer, SAMPLE_REGIONS, clock()).findings == 0


def test_a_v2_nonce_is_remembered_for_as_long_as_its_timestamp_is_accepted(build, registry, issuer, fleet_key, clock):
    """A request dated the skew (300 s) ahead passes the timestamp check until twice the skew later, so its nonce is
    kept that long: a captured request without a CSR (its answer would carry the device's private key) whose first use
    failed after the claim is refused when replayed just before then, and nothing is issued. (Kills: the nonce kept
    for 1x the skew.)"""
    captured = ProvisioningRequest.from_body(v2_body(fleet_key, "dev-1", at=clock() + timedelta(seconds=300)))
    with pytest.raises(ServiceUnavailable):
        build(issuer=FailingIssuer(issuer, issue_error=RuntimeError("injected"))).provision(captured, LONDON_IP)
    clock.advance(2 * 300 - 1)  # the timestamp is now 299 s old
    with pytest.raises(SignatureInvalid) as replay:
        build().provision(captured, LONDON_IP)
    assert replay.value.code == "replayed-request"
    assert registry.get("dev-1").status == "unprovisioned" and issuer.certificates("dev-1") == []
