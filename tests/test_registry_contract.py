"""One contract for every registry backend: SQLite (real file) and DynamoDB (moto).

DynamoDB failures are made with botocore event hooks on the injected client, never by patching our modules.
"""
import json
import re
import threading
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import boto3
import pytest
from moto import mock_aws

from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
from chalicelib.adapters.registry.items import item_of
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.domain.errors import (
    AlreadyProvisioned,
    NotRegistered,
    ProvisioningInProgress,
    RenewalInProgress,
    RenewalRefused,
    ServiceUnavailable,
    SignatureInvalid,
)
from chalicelib.domain.records import (
    PROVISIONED,
    PROVISIONING,
    UNPROVISIONED,
    Claim,
    DeviceRecord,
    Nonce,
    PendingIssue,
    RenewedCertificate,
    Revocation,
)

LEASE = 300
T0 = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)
TABLE = "iot-global-provisioning"


@pytest.fixture
def dynamodb_client(monkeypatch):
    """A DynamoDB client that only ever talks to moto: dummy credentials, no profile or config file."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield boto3.client("dynamodb", region_name="eu-west-2")


@pytest.fixture(params=["sqlite", "dynamodb"])
def registry(request, tmp_path):
    if request.param == "sqlite":
        registry = SqliteRegistry(tmp_path / "r.sqlite3")
        registry.create()
        yield registry
        registry.close()
    else:
        registry = DynamoDbRegistry(request.getfixturevalue("dynamodb_client"), TABLE,
                                    executor=request.getfixturevalue("executor"))
        registry.create()
        yield registry


def item(record: DeviceRecord | None) -> dict | None:
    """The record as operators see it (the sample's attribute names), None for none."""
    return None if record is None else item_of(record)


def provisioned(registry, name: str, at: datetime = T0) -> None:
    registry.finalize(registry.claim(name, at, LEASE), "eu-west-2", f"cert-{name}", at)


def answer(status: int, body: dict):
    """What a before-call hook returns to stand in for DynamoDB's HTTP answer."""
    return SimpleNamespace(status_code=status, headers={}), body


# --- the contract, for both backends ---------------------------------------------------------------------------

def test_create_is_idempotent_and_keeps_items(registry):
    registry.register(["dev1"])
    registry.create()
    assert item(registry.get("dev1")) == {"thing_name": "dev1", "prov_status": UNPROVISIONED}


def test_register_counts_new_and_leaves_existing_unchanged(registry):
    assert registry.register(["dev1", "dev2"]) == 2
    provisioned(registry, "dev1")
    before = item(registry.get("dev1"))

    assert registry.register(["dev1", "dev2", "dev3"]) == 1

    assert item(registry.get("dev1")) == before
    assert before["prov_status"] == PROVISIONED
    assert [record.thing_name for record in registry.list()] == ["dev1", "dev2", "dev3"]


def test_register_counts_duplicates_in_the_input_once(registry):
    assert registry.register(["dev1", "dev2", "dev1", "dev2", "dev1"]) == 2
    assert [record.thing_name for record in registry.list()] == ["dev1", "dev2"]


def test_get_unknown_is_none(registry):
    assert item(registry.get("nobody")) is None
    assert registry.renewal_state("nobody") is None
    registry.register(["somebody"])  # an unknown device is read through a stand-in: it never leaks out
    assert [record.thing_name for record in registry.list()] == ["somebody"]
    assert registry.get("nobody") is None and registry.renewal_state("nobody") is None
    assert registry.renewal_state("somebody").thing_name == "somebody"


def test_list_is_sorted_and_filtered_by_status(registry):
    registry.register(["c", "a", "d", "b"])
    provisioned(registry, "d")
    registry.claim("b", T0, LEASE)

    assert [record.thing_name for record in registry.list()] == ["a", "b", "c", "d"]
    assert [record.thing_name for record in registry.list(UNPROVISIONED)] == ["a", "c"]
    assert [record.thing_name for record in registry.list(PROVISIONING)] == ["b"]
    assert list(registry.list(PROVISIONED)) == [registry.get("d")] != [None]


def test_claim_then_finalize_gives_the_public_item_shape(registry):
    registry.register(["dev1"])
    claim = registry.claim("dev1", T0, LEASE)
    assert claim.thing_name == "dev1" and len(claim.token) == 32
    # The claim's token and lease stay private.
    assert item(registry.get("dev1")) == {"thing_name": "dev1", "prov_status": PROVISIONING, "attempts": 1}

    registry.finalize(claim, "ap-northeast-1", "cert-123", T0 + timedelta(seconds=5))

    expected = {"thing_name": "dev1", "prov_status": PROVISIONED, "prov_datetime": "2026-11-28T12:00:05Z",
                "aws_region": "ap-northeast-1", "certificate_id": "cert-123", "attempts": 1}
    assert item(registry.get("dev1")) == expected
    assert [item(record) for record in registry.list()] == [expected]


def test_claim_of_unknown_device_is_not_registered(registry):
    with pytest.raises(NotRegistered, match="nobody is not on the allow-list"):
        registry.claim("nobody", T0, LEASE)
    assert item(registry.get("nobody")) is None  # the refused write made nothing


def test_claim_within_the_lease_is_in_progress(registry):
    registry.register(["dev1"])
    registry.claim("dev1", T0, LEASE)
    with pytest.raises(ProvisioningInProgress, match="dev1 is being provisioned by another request"):
        registry.claim("dev1", T0 + timedelta(seconds=LEASE - 1), LEASE)


def test_claim_after_the_lease_ran_out_takes_over_with_a_new_token(registry):
    registry.register(["dev1"])
    first = registry.claim("dev1", T0, LEASE)
    second = registry.claim("dev1", T0 + timedelta(seconds=LEASE + 1), LEASE)
    assert second.token != first.token
    registry.finalize(second, "eu-west-2", "cert-2", T0 + timedelta(seconds=LEASE + 2))
    assert item(registry.get("dev1"))["certificate_id"] == "cert-2"


def test_finalize_with_a_stale_claim_is_refused_and_the_new_claim_holds(registry):
    registry.register(["dev1"])
    stale = registry.claim("dev1", T0, LEASE)
    current = registry.claim("dev1", T0 + timedelta(seconds=LEASE + 1), LEASE)

    with pytest.raises(ProvisioningInProgress, match="dev1: the claim's lease ran out"):
        registry.finalize(stale, "eu-west-2", "cert-stale", T0 + timedelta(seconds=LEASE + 2))

    assert item(registry.get("dev1")) == {"thing_name": "dev1", "prov_status": PROVISIONING, "attempts": 2}
    with pytest.raises(ProvisioningInProgress):  # still within the new claim's lease
        registry.claim("dev1", T0 + timedelta(seconds=LEASE + 3), LEASE)
    registry.finalize(current, "eu-west-2", "cert-current", T0 + timedelta(seconds=LEASE + 4))
    assert item(registry.get("dev1"))["certificate_id"] == "cert-current"


def test_finalize_of_unknown_device_is_refused(registry):
    with pytest.raises(ProvisioningInProgress):
        registry.finalize(Claim("nobody", "0" * 32), "eu-west-2", "cert", T0)
    assert item(registry.get("nobody")) is None


def test_release_returns_to_unprovisioned_with_the_error(registry):
    registry.register(["dev1"])
    registry.release(registry.claim("dev1", T0, LEASE), "issuer down")
    assert item(registry.get("dev1")) == {"thing_name": "dev1", "prov_status": UNPROVISIONED, "last_error": "issuer down",
                                     "attempts": 1}
    registry.claim("dev1", T0 + timedelta(seconds=1), LEASE)  # claimable again at once, lease or not


def test_stale_release_changes_nothing(registry):
    registry.register(["dev1"])
    stale = registry.claim("dev1", T0, LEASE)
    current = registry.claim("dev1", T0 + timedelta(seconds=LEASE + 1), LEASE)

    registry.release(stale, "too late")

    assert item(registry.get("dev1")) == {"thing_name": "dev1", "prov_status": PROVISIONING, "attempts": 2}
    registry.finalize(current, "eu-west-2", "cert-1", T0 + timedelta(seconds=LEASE + 2))
    registry.release(current, "after the fact")  # a finished claim cannot be undone either
    assert item(registry.get("dev1"))["prov_status"] == PROVISIONED
    assert "last_error" not in item(registry.get("dev1"))


def test_claim_of_provisioned_device_is_already_provisioned(registry):
    registry.register(["dev1"])
    provisioned(registry, "dev1")
    with pytest.raises(AlreadyProvisioned, match="dev1 is already provisioned"):
        registry.claim("dev1", T0 + timedelta(days=1), LEASE)


def test_successful_finalize_clears_the_last_error(registry):
    registry.register(["dev1"])
    registry.release(registry.claim("dev1", T0, LEASE), "issuer down")
    provisioned(registry, "dev1", T0 + timedelta(seconds=10))
    record = item(registry.get("dev1"))
    assert record["prov_status"] == PROVISIONED and "last_error" not in record


def test_register_a_thousand_devices_in_batches(registry):
    names = [f"dev{i:04d}" for i in range(1000)]
    assert registry.register(names) == 1000
    assert registry.register(reversed(names)) == 0
    assert [record.thing_name for record in registry.list(UNPROVISIONED)] == names


def test_register_stores_keys_and_attributes_and_reports_progress(registry):
    done = []
    names = [f"dev{i:03d}" for i in range(250)]
    added = registry.register(names + ["dev000"], {"dev001": "PEM"}, {"dev002": {"site": "Köln", "line": "2"}},
                              progress=done.append)
    assert added == 250
    assert done == sorted(done) and done[-1] == 250 and len(done) >= 1
    assert item(registry.get("dev001")) == {"thing_name": "dev001", "prov_status": UNPROVISIONED, "public_key": "PEM"}
    assert item(registry.get("dev002"))["attributes"] == {"line": "2", "site": "Köln"}
    # Present names keep what they had, attributes included.
    assert registry.register(["dev002"], attributes={"dev002": {"site": "other"}}) == 0
    assert item(registry.get("dev002"))["attributes"] == {"line": "2", "site": "Köln"}


def test_attempts_count_successful_claims_only_and_survive_reset(registry):
    registry.register(["dev1"])
    assert "attempts" not in item(registry.get("dev1"))
    registry.release(registry.claim("dev1", T0, LEASE), "issuer down")
    provisioned(registry, "dev1", T0 + timedelta(seconds=1))
    with pytest.raises(AlreadyProvisioned):
        registry.claim("dev1", T0 + timedelta(seconds=2), LEASE)  # refused: not an attempt
    assert item(registry.get("dev1"))["attempts"] == 2
    registry.reset("dev1")
    assert item(registry.get("dev1"))["attempts"] == 2  # history, kept for the operator


def test_list_filters_by_status_region_and_since_together(registry):
    registry.register(["a", "b", "c", "d", "e"])
    for name, region, at in (("a", "eu-west-2", T0), ("b", "us-east-1", T0 + timedelta(hours=1)),
                             ("c", "eu-west-2", T0 + timedelta(days=1))):
        registry.finalize(registry.claim(name, at, LEASE), region, f"cert-{name}", at)
    registry.claim("d", T0 + timedelta(days=2), LEASE)

    def names(**filters):
        return [record.thing_name for record in registry.list(**filters)]

    assert names(region="eu-west-2") == ["a", "c"]
    assert names(since=T0 + timedelta(minutes=30)) == ["b", "c"]
    assert names(since=T0) == ["a", "b", "c"]  # at or after
    # An aware time in another zone means the same instant: 13:30+01:00 is 12:30Z.
    assert names(since=datetime(2026, 11, 28, 13, 30, tzinfo=timezone(timedelta(hours=1)))) == ["b", "c"]
    assert names(status=PROVISIONED, region="eu-west-2", since=T0 + timedelta(seconds=1)) == ["c"]
    assert names(status=UNPROVISIONED, region="eu-west-2") == []
    assert names(status=PROVISIONING) == ["d"]


def test_a_fleet_key_claim_of_a_device_with_its_own_key_is_refused_and_changes_nothing(registry):
    registry.register(["own", "plain"], {"own": "PEM"})
    before = registry.get("own")

    with pytest.raises(SignatureInvalid) as refused:
        registry.claim("own", T0, LEASE, fleet_key=True)

    assert refused.value.code == "invalid-signature"
    assert registry.get("own") == before and before.attempts == 0  # not claimed, no attempt counted
    registry.claim("plain", T0, LEASE, fleet_key=True)  # a device without a key of its own: the fleet key does
    provisioned_by_own_key = registry.claim("own", T0, LEASE)  # the device's own key does
    registry.finalize(provisioned_by_own_key, "eu-west-2", "cert-own", T0)
    with pytest.raises(SignatureInvalid):  # and once provisioned, the fleet key learns nothing more either
        registry.claim("own", T0 + timedelta(seconds=1), LEASE, fleet_key=True)
    assert registry.get("own").attempts == 1


def nonce(value: str, at: datetime, window: int = 600) -> Nonce:
    return Nonce(value, at + timedelta(seconds=window))


def replayed(registry, name: str, value: str, at: datetime) -> bool:
    try:
        registry.claim(name, at, LEASE, nonce=nonce(value, at))
    except SignatureInvalid as refused:
        assert refused.code == "replayed-request"
        return True
    return False


def test_a_nonce_is_accepted_once_also_after_a_release_and_a_reset(registry):
    registry.register(["dev1", "dev2"])
    registry.release(registry.claim("dev1", T0, LEASE, nonce=nonce("n-1", T0)), "issuer down")

    assert replayed(registry, "dev1", "n-1", T0 + timedelta(seconds=1))  # after a release
    assert registry.get("dev1").status == UNPROVISIONED  # the replay holds no claim
    registry.finalize(registry.claim("dev1", T0 + timedelta(seconds=2), LEASE, nonce=nonce("n-2", T0)),
                      "eu-west-2", "cert-1", T0 + timedelta(seconds=3))
    registry.reset("dev1")
    assert replayed(registry, "dev1", "n-1", T0 + timedelta(seconds=4))  # after a reset
    assert replayed(registry, "dev1", "n-2", T0 + timedelta(seconds=5))
    assert not replayed(registry, "dev2", "n-1", T0 + timedelta(seconds=6))  # nonces are per device
    assert not replayed(registry, "dev1", "n-3", T0 + timedelta(seconds=7))


def test_an_expired_nonce_may_be_used_again(registry):
    registry.register(["dev1"])
    registry.release(registry.claim("dev1", T0, LEASE, nonce=Nonce("n", T0 + timedelta(seconds=600))), "failed")

    assert replayed(registry, "dev1", "n", T0 + timedelta(seconds=600))  # its last instant: still remembered
    assert registry.get("dev1").status == UNPROVISIONED
    assert not replayed(registry, "dev1", "n", T0 + timedelta(seconds=600, milliseconds=1))


def test_the_lease_holds_through_its_last_instant(registry):
    registry.register(["dev1"])
    first = registry.claim("dev1", T0, LEASE)
    end = T0 + timedelta(seconds=LEASE)

    with pytest.raises(ProvisioningInProgress):
        registry.claim("dev1", end, LEASE)  # the lease ends at claim time + lease: held until then, inclusive
    assert registry.stuck(end) == [] and not registry.release_stuck("dev1", end)

    just_after = end + timedelta(milliseconds=1)
    assert [record.thing_name for record in registry.stuck(just_after)] == ["dev1"]
    assert registry.stuck(just_after)[0].lease_expires == end
    second = registry.claim("dev1", just_after, LEASE)
    assert second.token != first.token


def test_only_one_of_many_concurrent_claims_wins(registry):
    if isinstance(registry, DynamoDbRegistry):
        pytest.skip("moto serialises requests in-process, so it cannot show DynamoDB's conditional-write atomicity")
    registry.register(["dev1"])
    start = threading.Barrier(8)
    won, refused = [], []

    def contend():
        start.wait()
        try:
            won.append(registry.claim("dev1", T0, LEASE))
        except ProvisioningInProgress:
            refused.append(True)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7


# --- DynamoDB only: paging, batching and throttling ---------------------------------------------------------------

def test_dynamodb_list_follows_every_scan_page(dynamodb_client, executor):
    registry = DynamoDbRegistry(dynamodb_client, TABLE, page_size=7, executor=executor)
    registry.create()
    names = [f"dev{i:02d}" for i in range(50)]
    registry.register(names)
    provisioned(registry, "dev07")
    scans = []
    dynamodb_client.meta.events.register("before-call.dynamodb.Scan", lambda **kw: scans.append(1))

    assert [record.thing_name for record in registry.list()] == names
    assert len(scans) >= 8  # 50 items, 7 a page
    assert [record.thing_name for record in registry.list(PROVISIONED)] == ["dev07"]


def test_dynamodb_register_retries_unprocessed_items_and_keys(dynamodb_client, executor):
    waits = []
    registry = DynamoDbRegistry(dynamodb_client, TABLE, executor=executor, sleep=waits.append)
    registry.create()
    registry.register(["dev000"])
    refused = {"BatchGetItem": 0, "BatchWriteItem": 0}

    def refuse_first(operation: str, field: str, answer_field: str):
        def hook(params, **_):
            if refused[operation]:
                return None
            refused[operation] += 1
            # DynamoDB did nothing and hands the whole request back, as it may when throttled.
            return answer(200, {"Responses": {}, answer_field: json.loads(params["body"])[field]})
        return hook

    dynamodb_client.meta.events.register("before-call.dynamodb.BatchGetItem",
                                         refuse_first("BatchGetItem", "RequestItems", "UnprocessedKeys"))
    dynamodb_client.meta.events.register("before-call.dynamodb.BatchWriteItem",
                                         refuse_first("BatchWriteItem", "RequestItems", "UnprocessedItems"))
    provisioned(registry, "dev000")

    assert registry.register([f"dev{i:03d}" for i in range(30)]) == 29

    assert refused == {"BatchGetItem": 1, "BatchWriteItem": 1}
    assert waits == [0.05, 0.05]  # one back-off before each retry, through the injected sleep
    assert len(list(registry.list())) == 30
    assert item(registry.get("dev000"))["prov_status"] == PROVISIONED


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "ThrottlingException",
                                  "InternalServerError"])
def test_dynamodb_throttling_becomes_service_unavailable(dynamodb_client, executor, code):
    registry = DynamoDbRegistry(dynamodb_client, TABLE, executor=executor)
    registry.create()
    registry.register(["dev1"])
    dynamodb_client.meta.events.register(
        "before-call.dynamodb.UpdateItem",
        lambda **_: answer(400, {"Error": {"Code": code, "Message": "slow down"}}))

    with pytest.raises(ServiceUnavailable, match=f"update_item failed with {code}") as caught:
        registry.claim("dev1", T0, LEASE)

    assert caught.value.retry_after > 0
    assert item(registry.get("dev1")) == {"thing_name": "dev1", "prov_status": UNPROVISIONED}


def test_dynamodb_throttled_reads_become_service_unavailable(dynamodb_client, executor):
    registry = DynamoDbRegistry(dynamodb_client, TABLE, executor=executor)
    registry.create()
    for operation in ("GetItem", "Scan", "BatchGetItem"):
        dynamodb_client.meta.events.register(
            f"before-call.dynamodb.{operation}",
            lambda **_: answer(400, {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}))
    with pytest.raises(ServiceUnavailable, match="get_item"):
        registry.get("dev1")
    with pytest.raises(ServiceUnavailable, match="scan"):
        list(registry.list())
    with pytest.raises(ServiceUnavailable, match="batch_get_item"):
        registry.register(["dev1"])


# --- write-ahead issuance (issue 16), for both backends -------------------------------------------------------

def test_a_claim_taken_over_carries_the_write_ahead_record_the_dead_attempt_left(registry):
    registry.register(["dev1"])
    dead = registry.claim("dev1", T0, LEASE)
    assert dead.previous is None
    registry.record_intent(dead, PendingIssue("eu-west-2", T0 + timedelta(seconds=1), "ab" * 32))
    registry.record_certificate(dead, "cert-dead", True)

    with pytest.raises(ProvisioningInProgress) as busy:  # while the lease runs, with the time it has left
        registry.claim("dev1", T0 + timedelta(seconds=100), LEASE)
    assert busy.value.retry_after == LEASE - 100

    taken = registry.claim("dev1", T0 + timedelta(seconds=LEASE + 1), LEASE)
    assert taken.previous == PendingIssue("eu-west-2", T0 + timedelta(seconds=1), "ab" * 32, "cert-dead", True)
    # The dead attempt can no longer write; the record stays until the new holder replaces or clears it.
    with pytest.raises(ProvisioningInProgress):
        registry.record_certificate(dead, "cert-late", True)
    with pytest.raises(ProvisioningInProgress):
        registry.record_intent(dead, PendingIssue("eu-west-2", T0))
    [state] = registry.claims(T0 + timedelta(seconds=LEASE + 2))
    assert (state.thing_name, state.status, state.claimed_at) == ("dev1", PROVISIONING, T0 + timedelta(seconds=LEASE + 1))
    assert state.pending.certificate_id == "cert-dead" and state.live(T0 + timedelta(seconds=LEASE + 2))

    registry.record_intent(taken, PendingIssue("ap-northeast-1", T0 + timedelta(seconds=LEASE + 2)))
    assert registry.claims(T0)[0].pending == PendingIssue("ap-northeast-1", T0 + timedelta(seconds=LEASE + 2))
    registry.finalize(taken, "ap-northeast-1", "cert-new", T0 + timedelta(seconds=LEASE + 3))
    assert registry.claims(T0) == []  # finalize clears the record
    assert registry.get("dev1").certificate_id == "cert-new"


def test_a_release_keeps_the_record_only_when_the_rollback_left_something(registry):
    registry.register(["clean", "left"])
    for name, keep in (("clean", False), ("left", True)):
        claim = registry.claim(name, T0, LEASE)
        registry.record_intent(claim, PendingIssue("eu-west-2", T0))
        registry.record_certificate(claim, f"cert-{name}", False)
        registry.release(claim, "issuer down", keep_pending=keep)
    [state] = registry.claims(T0)
    assert (state.thing_name, state.status, state.live(T0)) == ("left", UNPROVISIONED, False)
    assert state.pending == PendingIssue("eu-west-2", T0, None, "cert-left", False)
    # The next claim, from unprovisioned, hands the record over to be settled.
    assert registry.claim("left", T0 + timedelta(seconds=1), LEASE).previous.certificate_id == "cert-left"
    assert registry.claim("clean", T0 + timedelta(seconds=1), LEASE).previous is None


# --- renewal (POST /device-renewal): the same contract on both backends ----------------------------------------

def renewable(registry, name: str = "dev1") -> None:
    registry.register([name])
    registry.finalize(registry.claim(name, T0, LEASE), "eu-west-2", "cert-a", T0, "fp-a", "GB", "nearest",
                      "KEY-A", "2027-11-28T12:00:00Z")


def renewed(region: str = "eu-west-2", cert: str = "cert-b", **kw) -> RenewedCertificate:
    return RenewedCertificate(region, cert, f"KEY-{cert[-1].upper()}", f"fp-{cert[-1]}", "2027-12-01T00:00:00Z", **kw)


def test_provisioning_keeps_the_certificate_key_and_expiry_for_renewals(registry):
    renewable(registry)
    state = registry.renewal_state("dev1")
    assert (state.provisioned, state.region, state.certificate_id, state.public_key, state.fingerprint) == (
        True, "eu-west-2", "cert-a", "KEY-A", "fp-a")
    assert (state.previous_certificate_id, state.retire_pending, state.renewing_until, state.renewal_count) == (
        None, False, None, 0)
    assert registry.get("dev1").certificate_expires == datetime(2027, 11, 28, 12, 0, tzinfo=timezone.utc)
    assert registry.renewal_state("nobody") is None


def test_a_renewal_records_the_new_certificate_and_the_history(registry):
    renewable(registry)
    claim = registry.begin_renewal("dev1", "cert-a", T0, LEASE, Nonce("n1", T0 + timedelta(minutes=10)))
    registry.complete_renewal(claim, renewed(), T0 + timedelta(seconds=3))
    state = registry.renewal_state("dev1")
    assert (state.certificate_id, state.public_key, state.fingerprint) == ("cert-b", "KEY-B", "fp-b")
    assert (state.previous_certificate_id, state.previous_public_key, state.previous_region) == (
        "cert-a", "KEY-A", "eu-west-2")
    assert state.retire_pending and state.renewing_until is None and state.renewal_count == 1
    record = registry.get("dev1")
    assert (record.renewal_count, record.last_renewal, record.previous_certificate_id, record.retire_pending) == (
        1, T0 + timedelta(seconds=3), "cert-a", True)
    assert (record.country, record.region_reason) == ("GB", "nearest")  # kept in place
    # While the previous certificate waits to be retired, no new renewal starts.
    with pytest.raises(RenewalRefused):
        registry.begin_renewal("dev1", "cert-b", T0, LEASE)
    registry.previous_retired("dev1", "cert-a")
    assert not registry.renewal_state("dev1").retire_pending
    # A move records where the device now is and why.
    claim = registry.begin_renewal("dev1", "cert-b", T0, LEASE)
    registry.complete_renewal(claim, renewed("ap-northeast-1", "cert-c", country="JP", reason="relocated"), T0)
    record = registry.get("dev1")
    assert (record.region, record.previous_region, record.country, record.region_reason, record.renewal_count) == (
        "ap-northeast-1", "eu-west-2", "JP", "relocated", 2)


def test_one_renewal_lease_at_a_time_and_a_dead_ones_ends(registry):
    renewable(registry)
    first = registry.begin_renewal("dev1", "cert-a", T0, LEASE)
    with pytest.raises(RenewalInProgress) as busy:
        registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=10), LEASE)
    assert busy.value.retry_after in range(1, 31)
    late = registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=LEASE + 1), LEASE)  # the first died
    with pytest.raises(RenewalInProgress):
        registry.complete_renewal(first, renewed(), T0)  # its lease was taken over
    registry.release(first, "too late")  # gives back nothing: the lease is not its own
    assert registry.renewal_state("dev1").renewing_until is not None
    registry.release(late, "issuer failed")
    state = registry.renewal_state("dev1")
    assert (state.renewing_until, state.certificate_id) == (None, "cert-a")
    assert registry.get("dev1").last_error == "issuer failed"


def test_renewal_refusals_and_nonces(registry):
    renewable(registry)
    registry.register(["dev2"])
    for name, cert in (("dev1", "cert-x"), ("dev2", "cert-a"), ("nobody", "cert-a")):
        with pytest.raises(RenewalRefused):
            registry.begin_renewal(name, cert, T0, LEASE)
    nonce = Nonce("n1", T0 + timedelta(minutes=10))
    registry.release(registry.begin_renewal("dev1", "cert-a", T0, LEASE, nonce), "failed")
    with pytest.raises(SignatureInvalid) as replay:
        registry.begin_renewal("dev1", "cert-a", T0, LEASE, nonce)
    assert replay.value.code == "replayed-request"
    assert registry.renewal_state("dev1").renewing_until is None  # a replay holds no lease


def test_set_public_key_only_for_the_current_certificate_and_reset_forgets_renewals(registry):
    renewable(registry)
    registry.set_public_key("dev1", "cert-old", "KEY-OLD")
    assert registry.renewal_state("dev1").public_key == "KEY-A"
    registry.set_public_key("dev1", "cert-a", "KEY-A2")
    assert registry.renewal_state("dev1").public_key == "KEY-A2"
    registry.complete_renewal(registry.begin_renewal("dev1", "cert-a", T0, LEASE), renewed(), T0)
    registry.reset("dev1")
    state = registry.renewal_state("dev1")
    assert (state.provisioned, state.certificate_id, state.public_key, state.previous_certificate_id,
            state.retire_pending) == (False, None, None, None, False)
    assert registry.get("dev1").renewal_count == 1  # the history stays


# --- a reset's intent (issue 26): recorded first, cleared by the reset, which changes nothing it did not revoke -----

def test_a_resets_intent_is_recorded_in_the_sample_shape_and_cleared_by_the_reset(registry):
    renewable(registry)
    intent = (Revocation("eu-west-2", "cert-a"), Revocation("us-east-1", "cert-old", delete_thing=False))
    assert registry.begin_reset("dev1", intent) is True
    assert registry.begin_reset("nobody", intent) is False and registry.get("nobody") is None
    record = registry.get("dev1")
    assert (record.status, record.certificate_id, record.reset_pending) == (PROVISIONED, "cert-a", intent)
    assert item(record)["reset_pending"] == [
        {"region": "eu-west-2", "certificate_id": "cert-a", "delete_thing": True},
        {"region": "us-east-1", "certificate_id": "cert-old", "delete_thing": False}]
    assert registry.reset("dev1", ["cert-a", "cert-old"]) == record  # the record as it was
    assert item(registry.get("dev1")) == {"thing_name": "dev1", "prov_status": UNPROVISIONED, "attempts": 1}
    assert registry.reset("nobody", []) is None


def test_a_reset_changes_nothing_while_the_device_holds_a_certificate_it_did_not_revoke(registry):
    renewable(registry)
    registry.begin_reset("dev1", [Revocation("eu-west-2", "cert-a")])
    # A renewal recorded meanwhile: cert-b current, cert-a previous and still to retire.
    registry.complete_renewal(registry.begin_renewal("dev1", "cert-a", T0, LEASE), renewed(), T0)
    before = item(registry.get("dev1"))
    assert registry.reset("dev1", ["cert-a"]) is None  # cert-b is current
    assert registry.reset("dev1", ["cert-b"]) is None  # cert-a waits to be retired
    assert registry.reset("dev1", []) is None
    assert item(registry.get("dev1")) == before
    assert registry.reset("dev1", ["cert-a", "cert-b"]).certificate_id == "cert-b"
    assert registry.get("dev1").status == UNPROVISIONED
    registry.register(["fresh"])  # holding nothing, a device is reset with nothing revoked
    assert registry.reset("fresh", []).status == UNPROVISIONED


def test_a_storage_fault_in_a_resets_writes_is_raised_and_changes_nothing(registry, request):
    renewable(registry)
    if isinstance(registry, SqliteRegistry):  # a read-only registry: SQLite's own SQLITE_READONLY
        faulty = SqliteRegistry(registry.path, lambda db: db.execute("PRAGMA query_only = ON"))
        cause = "it cannot be written (read-only)"
    else:  # the client's own hook answers DynamoDB's 500
        faulty = registry
        request.getfixturevalue("dynamodb_client").meta.events.register(
            "before-call.dynamodb.UpdateItem",
            lambda **_: answer(500, {"Error": {"Code": "InternalServerError", "Message": "injected"}}))
        cause = "update_item failed with InternalServerError"
    with pytest.raises(ServiceUnavailable, match=re.escape(cause)):
        faulty.begin_reset("dev1", [Revocation("eu-west-2", "cert-a")])
    with pytest.raises(ServiceUnavailable, match=re.escape(cause)):
        faulty.reset("dev1", ["cert-a"])
    record = faulty.get("dev1")
    assert (record.status, record.certificate_id, record.reset_pending) == (PROVISIONED, "cert-a", ())


# --- write-ahead issuance for renewals (issue 16): the renewal lease carries the record, as a claim does --------

def test_a_renewal_lease_taken_over_carries_the_write_ahead_record_the_dead_renewal_left(registry):
    renewable(registry)
    dead = registry.begin_renewal("dev1", "cert-a", T0, LEASE)
    assert (dead.previous, dead.renewal) == (None, True)
    intent = PendingIssue("ap-northeast-1", T0 + timedelta(seconds=1), "fp-new", move=True)
    registry.record_intent(dead, intent)
    registry.record_certificate(dead, "cert-dead", True)
    # The audit sees it under its live lease, with the time the lease was taken (its age).
    [state] = registry.claims(T0 + timedelta(seconds=10))
    assert (state.thing_name, state.status, state.renewal, state.claimed_at) == ("dev1", PROVISIONED, True, T0)
    assert state.lease_expires == T0 + timedelta(seconds=LEASE) and state.live(T0 + timedelta(seconds=10))
    assert state.pending == PendingIssue("ap-northeast-1", T0 + timedelta(seconds=1), "fp-new", "cert-dead", True,
                                         move=True)
    assert not state.live(T0 + timedelta(seconds=LEASE + 1))  # dead once its lease ended
    with pytest.raises(RenewalInProgress):
        registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=100), LEASE)

    taken = registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=LEASE + 1), LEASE)
    assert taken.previous == state.pending and taken.renewal
    # The dead renewal can no longer write, and a provisioning claim's writes never match a renewal lease.
    with pytest.raises(RenewalInProgress):
        registry.record_certificate(dead, "cert-late", True)
    with pytest.raises(RenewalInProgress):
        registry.record_intent(dead, PendingIssue("eu-west-2", T0))
    with pytest.raises(ProvisioningInProgress):
        registry.record_intent(Claim("dev1", taken.token), PendingIssue("eu-west-2", T0))
    registry.record_intent(taken, PendingIssue("eu-west-2", T0 + timedelta(seconds=LEASE + 2), "fp-b"))
    assert registry.claims(T0)[0].pending == PendingIssue("eu-west-2", T0 + timedelta(seconds=LEASE + 2), "fp-b")
    registry.complete_renewal(taken, renewed(), T0 + timedelta(seconds=LEASE + 3))
    assert registry.claims(T0) == []  # complete clears the record and the lease
    assert registry.get("dev1").certificate_id == "cert-b"


def test_an_abandoned_renewal_keeps_its_record_only_when_its_rollback_left_something(registry):
    renewable(registry)
    for keep in (True, False):
        claim = registry.begin_renewal("dev1", "cert-a", T0, LEASE)
        assert claim.previous == (PendingIssue("eu-west-2", T0, None, "cert-left", False) if not keep else None)
        if keep:
            registry.record_intent(claim, PendingIssue("eu-west-2", T0))
            registry.record_certificate(claim, "cert-left", False)
        registry.release(claim, "issuer down", keep_pending=keep)
        if keep:  # no lease, a record: for the next renewal or the audit to settle
            [state] = registry.claims(T0)
            assert (state.renewal, state.lease_expires, state.live(T0)) == (True, None, False)
            assert state.pending.certificate_id == "cert-left"
    assert registry.claims(T0) == []
    assert registry.renewal_state("dev1").certificate_id == "cert-a"


def test_a_replayed_renewal_leaves_a_dead_renewals_record_for_the_next_one(registry):
    renewable(registry)
    dead = registry.begin_renewal("dev1", "cert-a", T0, LEASE)
    registry.record_intent(dead, PendingIssue("eu-west-2", T0, "fp-new"))
    nonce = Nonce("n1", T0 + timedelta(hours=1))
    registry.release(registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=LEASE + 1), LEASE,
                                                    nonce), "failed", keep_pending=True)
    with pytest.raises(SignatureInvalid):
        registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=LEASE + 2), LEASE, nonce)
    [state] = registry.claims(T0 + timedelta(seconds=LEASE + 2))
    assert state.pending == PendingIssue("eu-west-2", T0, "fp-new") and not state.live(T0 + timedelta(seconds=LEASE + 2))
    assert registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=LEASE + 3), LEASE).previous == state.pending


@pytest.mark.parametrize("move", [False, True], ids=["in-place", "move"])
def test_a_renewal_never_answered_is_reopened_with_its_certificate_on_the_write_ahead_record(registry, move):
    renewable(registry)
    region = "ap-northeast-1" if move else "eu-west-2"
    registry.complete_renewal(registry.begin_renewal("dev1", "cert-a", T0, LEASE), renewed(region), T0)
    assert not registry.reopen_renewal("dev1", "cert-x", "fp-a", T0)  # not the current certificate
    registry.previous_retired("dev1", "cert-a")
    assert not registry.reopen_renewal("dev1", "cert-b", "fp-a", T0)  # answered: the previous one is retired
    registry.reset("dev1")
    renewable(registry)
    registry.complete_renewal(registry.begin_renewal("dev1", "cert-a", T0, LEASE), renewed(region), T0)
    before = registry.renewal_state("dev1")

    assert registry.reopen_renewal("dev1", "cert-b", "fp-a", T0 + timedelta(seconds=LEASE + 1))
    state = registry.renewal_state("dev1")
    assert (state.region, state.certificate_id, state.public_key, state.fingerprint) == (
        "eu-west-2", "cert-a", "KEY-A", "fp-a")
    assert (state.previous_certificate_id, state.retire_pending, state.renewal_count) == (
        None, False, before.renewal_count - 1)
    [claim] = registry.claims(T0 + timedelta(seconds=LEASE + 1))
    assert claim.pending == PendingIssue(region, T0 + timedelta(seconds=LEASE + 1), "fp-b", "cert-b", move, move)
    assert not claim.live(T0 + timedelta(seconds=LEASE + 1))  # for the next renewal lease to settle
    assert registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=LEASE + 2), LEASE).previous == claim.pending
    assert not registry.reopen_renewal("dev1", "cert-b", "fp-a", T0 + timedelta(seconds=LEASE + 3))  # once


# --- re-key (a server-made key lost with its answer): the same contract on both backends ------------------------

WINDOW = 900


def server_keyed(registry, name: str = "dev1", own_key: str | None = None) -> None:
    """Provisioned at T0 with a server-made key (no CSR)."""
    registry.register([name], {name: own_key} if own_key else None)
    registry.finalize(registry.claim(name, T0, LEASE), "eu-west-2", "cert-a", T0, "fp-a", "GB", "nearest",
                      "KEY-A", "2027-11-28T12:00:00Z", server_key=True)


def test_provisioning_records_whether_the_key_was_made_by_the_service(registry):
    server_keyed(registry)
    renewable(registry, "dev2")
    assert registry.get("dev1").server_key and item(registry.get("dev1"))["server_key"] is True
    assert not registry.get("dev2").server_key and "server_key" not in item(registry.get("dev2"))
    registry.reset("dev1")
    assert not registry.get("dev1").server_key


def test_a_rekey_takes_the_renewal_lease_within_the_window_through_its_last_instant(registry):
    server_keyed(registry)
    claim = registry.begin_rekey("dev1", T0 + timedelta(seconds=WINDOW), LEASE, WINDOW)
    assert claim.renewal and claim.previous is None
    assert registry.renewal_state("dev1").renewing_until == (T0 + timedelta(seconds=WINDOW + LEASE)).timestamp()
    # It completes as a renewal in place: the old certificate is the previous one, waiting to be revoked.
    registry.complete_renewal(claim, renewed(server_key=True), T0 + timedelta(seconds=WINDOW))
    state = registry.renewal_state("dev1")
    assert (state.certificate_id, state.previous_certificate_id, state.retire_pending) == ("cert-b", "cert-a", True)
    record = registry.get("dev1")
    assert record.server_key and record.provisioned_at == T0  # the window still counts from the provisioning
    # While the old certificate waits to be revoked no re-key starts; once it is, one may (still in the window).
    with pytest.raises(AlreadyProvisioned):
        registry.begin_rekey("dev1", T0 + timedelta(seconds=WINDOW), LEASE, WINDOW)
    registry.previous_retired("dev1", "cert-a")
    registry.begin_rekey("dev1", T0 + timedelta(seconds=WINDOW), LEASE, WINDOW)


def test_a_rekey_after_the_window_or_of_a_devices_own_key_is_already_provisioned(registry):
    server_keyed(registry)
    with pytest.raises(AlreadyProvisioned) as late:
        registry.begin_rekey("dev1", T0 + timedelta(seconds=WINDOW + 1), LEASE, WINDOW)
    assert "operator must reset" in str(late.value)
    renewable(registry, "dev2")  # provisioned with its own key (a CSR)
    with pytest.raises(AlreadyProvisioned):
        registry.begin_rekey("dev2", T0, LEASE, WINDOW)
    registry.register(["dev3"])
    with pytest.raises(NotRegistered):
        registry.begin_rekey("nobody", T0, LEASE, WINDOW)
    with pytest.raises(ProvisioningInProgress):  # reset meanwhile: asking again provisions it
        registry.begin_rekey("dev3", T0, LEASE, WINDOW)
    # A renewal with a CSR ends the window early: the key is the device's own now.
    claim = registry.begin_renewal("dev1", "cert-a", T0, LEASE)
    registry.complete_renewal(claim, renewed(), T0)
    registry.previous_retired("dev1", "cert-a")
    assert not registry.get("dev1").server_key
    with pytest.raises(AlreadyProvisioned):
        registry.begin_rekey("dev1", T0 + timedelta(seconds=1), LEASE, WINDOW)
    assert registry.renewal_state("dev1").renewing_until is None  # every refusal changed nothing


def test_a_rekey_with_the_fleet_key_of_a_device_with_its_own_signing_key_is_refused(registry):
    server_keyed(registry, own_key="DEVICE-PEM")
    with pytest.raises(SignatureInvalid):
        registry.begin_rekey("dev1", T0, LEASE, WINDOW, fleet_key=True)
    registry.begin_rekey("dev1", T0, LEASE, WINDOW, fleet_key=False)  # signed with its own key


def test_one_rekey_at_a_time_a_dead_ones_lease_ends_and_hands_over_its_record(registry):
    server_keyed(registry)
    first = registry.begin_rekey("dev1", T0, LEASE, WINDOW)
    registry.record_intent(first, PendingIssue("eu-west-2", T0, None))
    registry.record_certificate(first, "cert-dead", False)
    with pytest.raises(ProvisioningInProgress) as busy:
        registry.begin_rekey("dev1", T0 + timedelta(seconds=10), LEASE, WINDOW)
    assert busy.value.retry_after == LEASE - 10
    with pytest.raises(RenewalInProgress):  # a renewal waits for it too
        registry.begin_renewal("dev1", "cert-a", T0 + timedelta(seconds=10), LEASE)
    late = registry.begin_rekey("dev1", T0 + timedelta(seconds=LEASE + 1), LEASE, WINDOW)
    assert late.token != first.token
    assert (late.previous.certificate_id, late.previous.region) == ("cert-dead", "eu-west-2")
    with pytest.raises(RenewalInProgress):
        registry.complete_renewal(first, renewed(), T0)  # its lease was taken over
    registry.release(late, "issuer failed")
    state = registry.renewal_state("dev1")
    assert (state.renewing_until, state.certificate_id, state.retire_pending) == (None, "cert-a", False)


def test_only_one_of_many_concurrent_rekeys_wins(registry):
    if isinstance(registry, DynamoDbRegistry):
        pytest.skip("moto serialises requests in-process, so it cannot show DynamoDB's conditional-write atomicity")
    server_keyed(registry)
    start = threading.Barrier(8)
    won, refused = [], []

    def contend():
        start.wait()
        try:
            won.append(registry.begin_rekey("dev1", T0, LEASE, WINDOW))
        except ProvisioningInProgress:
            refused.append(True)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7


def test_no_rekey_while_the_provisioning_request_may_still_be_answering(registry):
    """A duplicate request right after the provisioning waits (409 with the time left) instead of revoking the
    certificate the first answer carries; from `quiet_seconds` after the provisioning the re-key may start."""
    server_keyed(registry)
    with pytest.raises(ProvisioningInProgress) as early:
        registry.begin_rekey("dev1", T0 + timedelta(seconds=49), LEASE, WINDOW, quiet_seconds=50)
    assert early.value.retry_after == 1
    assert registry.renewal_state("dev1").renewing_until is None
    registry.begin_rekey("dev1", T0 + timedelta(seconds=50), LEASE, WINDOW, quiet_seconds=50)
    # A window shorter than the quiet time never opens: refused as provisioned for good, not an error.
    server_keyed(registry, "dev2")
    with pytest.raises(AlreadyProvisioned):
        registry.begin_rekey("dev2", T0 + timedelta(seconds=60), LEASE, 10, quiet_seconds=50)


def test_no_rekey_while_a_rekeys_answer_may_still_be_on_its_way(registry):
    """A duplicate right after a re-key waits (409 with the time left) instead of revoking the certificate that
    re-key answered with, whether the previous certificate is revoked yet or not; `quiet_seconds` after the re-key
    completed, a retry re-keys again (its answer was lost too), while the window lasts."""
    server_keyed(registry)
    done = T0 + timedelta(seconds=100)
    registry.complete_renewal(registry.begin_rekey("dev1", done, LEASE, WINDOW, quiet_seconds=50),
                              renewed(server_key=True), done)
    for retired in (False, True):
        if retired:
            registry.previous_retired("dev1", "cert-a")
        with pytest.raises(ProvisioningInProgress, match="new certificate just now") as early:
            registry.begin_rekey("dev1", done + timedelta(seconds=1), LEASE, WINDOW, quiet_seconds=50)
        assert early.value.retry_after == 49
        state = registry.renewal_state("dev1")
        assert (state.certificate_id, state.renewing_until, state.retire_pending) == ("cert-b", None, not retired)
    again = registry.begin_rekey("dev1", done + timedelta(seconds=50), LEASE, WINDOW, quiet_seconds=50)
    assert again.renewal and registry.renewal_state("dev1").renewing_until is not None


# --- the hot path's one write (issue 27): the claim with its nonce and write-ahead intent, for both backends ------

def visible(registry, name: str, at: datetime) -> tuple:
    """Everything a caller can see of a device: its record and its entry among the claims, if any."""
    return registry.get(name), [state for state in registry.claims(at) if state.thing_name == name]


def test_the_claim_writes_the_write_ahead_intent_in_the_same_write(registry):
    registry.register(["dev1"])
    intent = PendingIssue("eu-west-2", T0, "ab" * 32)
    claim = registry.claim("dev1", T0, LEASE, nonce=nonce("n-1", T0), intent=intent)

    assert (claim.intent, claim.previous) == (intent, None)
    [state] = registry.claims(T0)
    assert (state.status, state.pending, state.live(T0)) == (PROVISIONING, intent, True)
    registry.finalize(claim, "eu-west-2", "cert-1", T0 + timedelta(seconds=1))  # the commit clears it
    assert registry.claims(T0) == [] and registry.get("dev1").certificate_id == "cert-1"


def test_a_dead_attempts_record_is_handed_over_never_written_over_by_the_next_claims_intent(registry):
    registry.register(["dev1"])
    dead = registry.claim("dev1", T0, LEASE, intent=PendingIssue("eu-west-2", T0, "ab" * 32))
    left = dead.intent
    registry.release(dead, "issuer failed", keep_pending=True)  # a rollback that left something

    later = T0 + timedelta(seconds=1)
    taken = registry.claim("dev1", later, LEASE, nonce=nonce("n-2", later),
                           intent=PendingIssue("ap-northeast-1", later))
    assert (taken.previous, taken.intent) == (left, None)  # to settle first; then record_intent
    assert registry.claims(later)[0].pending == left
    with pytest.raises(SignatureInvalid):  # its nonce was recorded by that same write
        registry.claim("dev1", later, LEASE, nonce=nonce("n-2", later))


def test_a_replayed_claim_changes_nothing(registry):
    registry.register(["dev1"])
    registry.release(registry.claim("dev1", T0, LEASE, nonce=nonce("n-1", T0)), "failed")
    before = visible(registry, "dev1", T0)

    with pytest.raises(SignatureInvalid) as replay:
        registry.claim("dev1", T0 + timedelta(seconds=1), LEASE, nonce=nonce("n-1", T0),
                       intent=PendingIssue("eu-west-2", T0))
    assert replay.value.code == "replayed-request"
    assert visible(registry, "dev1", T0) == before


def test_a_withdrawn_claim_leaves_no_trace_but_its_nonce_stays_used(registry):
    registry.register(["fresh", "dead"])
    registry.release(registry.claim("fresh", T0, LEASE), "an earlier failure")  # some history to keep
    registry.claim("dead", T0, LEASE)  # a claim that died before writing ahead: its lease ends
    later = T0 + timedelta(seconds=LEASE + 1)
    for name in ("fresh", "dead"):
        before = visible(registry, name, later)
        claim = registry.claim(name, later, LEASE, nonce=nonce(f"n-{name}", later),
                               intent=PendingIssue("eu-west-2", later))
        registry.withdraw(claim)
        assert visible(registry, name, later) == before, name
        assert replayed(registry, name, f"n-{name}", later)  # a replay of the refused request is still refused
        assert not replayed(registry, name, f"m-{name}", later)  # the device's own retry is claimed as usual


def test_a_withdrawn_claim_gives_back_a_dead_attempts_record_as_it_found_it(registry):
    registry.register(["dev1"])
    dead = registry.claim("dev1", T0, LEASE, intent=PendingIssue("eu-west-2", T0))
    registry.record_certificate(dead, "cert-dead", True)
    later = T0 + timedelta(seconds=LEASE + 1)
    before = visible(registry, "dev1", later)

    registry.withdraw(registry.claim("dev1", later, LEASE, intent=PendingIssue("ap-northeast-1", later)))

    assert visible(registry, "dev1", later) == before
    assert registry.claim("dev1", later, LEASE).previous.certificate_id == "cert-dead"


def test_a_stale_withdraw_changes_nothing(registry):
    registry.register(["dev1"])
    first = registry.claim("dev1", T0, LEASE)
    second = registry.claim("dev1", T0 + timedelta(seconds=LEASE + 1), LEASE)  # the first's lease ended
    registry.withdraw(first)
    registry.finalize(second, "eu-west-2", "cert-1", T0 + timedelta(seconds=LEASE + 2))
    assert registry.get("dev1").status == PROVISIONED


def test_a_withdrawn_renewal_lease_leaves_no_trace(registry):
    renewable(registry)
    before = visible(registry, "dev1", T0), registry.renewal_state("dev1")
    lease = registry.begin_renewal("dev1", "cert-a", T0, LEASE, nonce("r-1", T0),
                                   PendingIssue("eu-west-2", T0, "fp-new"))
    assert lease.intent is not None and registry.claims(T0)[0].pending == lease.intent

    registry.withdraw(lease)

    assert (visible(registry, "dev1", T0), registry.renewal_state("dev1")) == before
    with pytest.raises(SignatureInvalid):
        registry.begin_renewal("dev1", "cert-a", T0, LEASE, nonce("r-1", T0))


def test_a_renewal_lease_writes_its_intent_unless_a_dead_renewal_left_one(registry):
    renewable(registry)
    dead = registry.begin_renewal("dev1", "cert-a", T0, LEASE, intent=PendingIssue("eu-west-2", T0, "fp-dead"))
    assert dead.intent == PendingIssue("eu-west-2", T0, "fp-dead")
    later = T0 + timedelta(seconds=LEASE + 1)
    taken = registry.begin_renewal("dev1", "cert-a", later, LEASE, nonce("r-2", later),
                                   PendingIssue("ap-northeast-1", later, "fp-new", move=True))
    assert (taken.previous, taken.intent) == (dead.intent, None)
    with pytest.raises(SignatureInvalid):  # the nonce went with the lease
        registry.begin_renewal("dev1", "cert-a", later + timedelta(seconds=LEASE + 1), LEASE, nonce("r-2", later))


def test_a_rekey_lease_writes_its_intent_unless_a_dead_rekey_left_one(registry):
    server_keyed(registry)
    at = T0 + timedelta(seconds=10)
    dead = registry.begin_rekey("dev1", at, LEASE, WINDOW, intent=PendingIssue("eu-west-2", at))
    assert dead.intent == PendingIssue("eu-west-2", at) and registry.claims(at)[0].pending == dead.intent
    later = at + timedelta(seconds=LEASE + 1)
    taken = registry.begin_rekey("dev1", later, LEASE, WINDOW, intent=PendingIssue("eu-west-2", later))
    assert (taken.previous, taken.intent) == (dead.intent, None)


def test_a_nonce_refused_before_the_device_was_registered_is_refused_after(registry):
    with pytest.raises(NotRegistered):
        registry.claim("late", T0, LEASE, nonce=nonce("n-1", T0))
    with pytest.raises(SignatureInvalid):  # a replay before registration too
        registry.claim("late", T0, LEASE, nonce=nonce("n-1", T0))
    registry.register(["late"])

    assert replayed(registry, "late", "n-1", T0 + timedelta(seconds=1))
    assert registry.get("late").attempts == 0
    assert not replayed(registry, "late", "n-2", T0 + timedelta(seconds=2))


def test_a_fleet_key_request_for_a_device_with_its_own_key_uses_up_none_of_its_nonces(registry):
    registry.register(["own"], {"own": "PEM"})
    with pytest.raises(SignatureInvalid) as refused:
        registry.claim("own", T0, LEASE, fleet_key=True, nonce=nonce("n-1", T0))
    assert refused.value.code == "invalid-signature"
    assert registry.claim("own", T0, LEASE, nonce=nonce("n-1", T0)).previous is None  # the device's own request
    with pytest.raises(SignatureInvalid) as again:  # whatever its nonce: the fleet key's signature does not count
        registry.claim("own", T0, LEASE, fleet_key=True, nonce=nonce("n-1", T0))
    assert again.value.code == "invalid-signature"


def test_dynamodb_a_device_item_keeps_only_live_nonces_once_committed(dynamodb_client, executor):
    registry = DynamoDbRegistry(dynamodb_client, TABLE, executor=executor)
    registry.create()
    registry.register(["dev1"])
    for i in range(3):  # refused requests of the past: their nonces expire
        registry.release(registry.claim("dev1", T0 + timedelta(seconds=i), LEASE, nonce=nonce(f"old-{i}", T0)), "x")
    later = T0 + timedelta(hours=1)
    registry.finalize(registry.claim("dev1", later, LEASE, nonce=nonce("new", later)), "eu-west-2", "cert-1", later)

    item = dynamodb_client.get_item(TableName=TABLE, Key={"thing_name": {"S": "dev1"}})["Item"]
    assert sorted(name for name in item if name.startswith("nonce:")) == ["nonce:new"]


def test_dynamodb_a_nonce_refused_while_the_name_was_being_registered_is_carried_onto_its_item(dynamodb_client,
                                                                                             executor):
    """The refusal lands after registration looked for such nonces and before it wrote the item: registration's
    second look carries it over."""
    registry = DynamoDbRegistry(dynamodb_client, TABLE, executor=executor)
    registry.create()
    gets: list = []

    def refused_between(**_):
        if not gets:
            gets.append(True)
            with pytest.raises(NotRegistered):
                registry.claim("late", T0, LEASE, nonce=nonce("n-1", T0))
    dynamodb_client.meta.events.register("before-call.dynamodb.BatchWriteItem", refused_between)
    registry.register(["late"])
    dynamodb_client.meta.events.unregister("before-call.dynamodb.BatchWriteItem", refused_between)

    assert gets and replayed(registry, "late", "n-1", T0 + timedelta(seconds=1))
