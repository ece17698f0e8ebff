"""Admission control: the schedule's contract on both stores, the budget from the quota table, the errors."""
import threading

import boto3
import pytest
from moto import mock_aws

from chalicelib.adapters.admission.dynamodb import DynamoDbAdmissionStore
from chalicelib.adapters.admission.sqlite import SqliteAdmissionStore
from chalicelib.domain.admission import (
    DEFAULT_BUDGET,
    IOT_QUOTAS,
    ISSUE_CSR,
    ISSUE_SERVER_KEY,
    RESERVE,
    SLOW_FACTOR,
    SLOW_SECONDS,
    Budget,
    budgets_from,
    quota_budget,
)
from chalicelib.domain.errors import ServiceUnavailable
from chalicelib.services.admission import Admission

NONCES = "iot-global-provisioning-nonces"
T0 = 1_800_000_000.0


@pytest.fixture
def dynamodb_client(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        client = boto3.client("dynamodb", region_name="eu-west-2")
        client.create_table(TableName=NONCES, KeySchema=[{"AttributeName": "nonce_key", "KeyType": "HASH"}],
                            AttributeDefinitions=[{"AttributeName": "nonce_key", "AttributeType": "S"}],
                            BillingMode="PAY_PER_REQUEST")
        yield client


@pytest.fixture(params=["sqlite", "dynamodb"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SqliteAdmissionStore(tmp_path / "registry.sqlite3")
    return DynamoDbAdmissionStore(request.getfixturevalue("dynamodb_client"), NONCES)


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def at_once(rate: float) -> int:
    """What an idle region lets through at once: a second's worth, and one more, as the schedule may run a second
    ahead (a refused device is told whole seconds); from 4/s up, where that still fits AWS's bucket."""
    return int(rate) + 1


def admission(store, rate: float, clock: Clock) -> Admission:
    return Admission(store, budgets_from({"*": rate}, None), clock)


def outcome(admit, region: str = "eu-west-1") -> int | None:
    """None when admitted, else the Retry-After the device is told."""
    try:
        admit(region)
    except ServiceUnavailable as refused:
        assert refused.code == "admission-control"
        return refused.retry_after
    return None


# ---------------------------------------------------------------- the schedule's contract, both stores

def test_one_seconds_worth_passes_at_once_then_the_rest_get_slots_spread_at_the_rate(store):
    clock = Clock()
    gate = admission(store, 10, clock)
    answers = [outcome(gate.admit) for _ in range(60)]
    assert answers[:at_once(10)] == [None] * 11  # 11 still fit AWS's bucket at this budget (12.5)
    waits = answers[11:]
    assert None not in waits
    # 49 refused at 10/s: each is told to come back at its own slot, never more than 10 in the same second
    assert waits == sorted(waits) and waits[-1] == 6
    assert max(waits.count(w) for w in set(waits)) <= 10


@pytest.mark.parametrize("rate", [10, 2.4])
def test_refused_requests_coming_back_at_their_slot_are_admitted(store, rate):
    """At 2.4/s (the storm's budget) the refused come back in whole seconds, 2 or 3 at a time: with a schedule that
    could not run a second ahead, every third was refused again and a sixth of the budget went unused."""
    clock = Clock()
    gate = admission(store, rate, clock)
    waits = [outcome(gate.admit) for _ in range(40)][at_once(rate):]
    # Everyone returns exactly when told to; every one of them gets in on that return.
    admitted_at: list[float] = []
    for wait in sorted(waits):
        clock.now = T0 + wait
        assert outcome(gate.admit) is None
        admitted_at.append(clock.now)
    assert admitted_at[-1] - T0 <= 40 / rate + 1  # all 40 at the rate, plus Retry-After's whole seconds


@pytest.mark.parametrize("rate, passes", [(1, 1), (2.4, 3), (12, 13)])
def test_an_idle_region_lets_through_at_once_only_what_fits_awss_bucket(store, rate, passes):
    """A second's worth and one more, never more than AWS's bucket holds (the quota's second: the budget with its
    reserve, 1.25, 3 and 15 here): at 1/s a second request at once could be throttled, so it waits its turn."""
    gate = admission(store, rate, Clock())
    answers = [outcome(gate.admit) for _ in range(passes + 1)]
    assert answers[:passes] == [None] * passes and answers[passes] is not None


def test_regions_have_schedules_of_their_own(store):
    clock = Clock()
    gate = admission(store, 2, clock)
    assert [outcome(gate.admit, "eu-west-1") for _ in range(3)][:2] == [None, None]
    assert outcome(gate.admit, "us-east-1") is None


def test_an_idle_region_forgets_its_past(store):
    clock = Clock()
    gate = admission(store, 5, clock)
    for _ in range(20):
        outcome(gate.admit)
    clock.now += 60
    assert [outcome(gate.admit) for _ in range(5)] == [None] * 5


def test_a_charge_moves_the_schedule_on(store):
    clock = Clock()
    gate = admission(store, 10, clock)
    store.charge("eu-west-1", clock.now, 5.0)
    # 5 s of schedule are spoken for: this request's own slot comes after them
    assert outcome(gate.admit) == 6


def test_concurrent_containers_never_admit_more_than_the_budget(tmp_path):
    """Real concurrency on SQLite (moto is not thread-safe, so DynamoDB's atomicity cannot be shown with
    threads here; the next test shows its containers correcting each other's stale guesses)."""
    clock = Clock()
    path = tmp_path / "registry.sqlite3"
    results: list[int | None] = []
    lock = threading.Lock()

    def container():
        gate = admission(SqliteAdmissionStore(path), 10, clock)  # a store (and connection) of its own
        for _ in range(10):
            answer = outcome(gate.admit)
            with lock:
                results.append(answer)
    threads = [threading.Thread(target=container) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(None) == at_once(10)
    waits = sorted(w for w in results if w is not None)
    assert len(waits) == 40 - at_once(10) and max(waits.count(w) for w in set(waits)) <= 10


def test_interleaved_containers_with_stale_views_keep_one_schedule(store, tmp_path, request):
    clock = Clock()
    if isinstance(store, SqliteAdmissionStore):
        stores = [store, SqliteAdmissionStore(tmp_path / "registry.sqlite3")]
    else:
        stores = [store, DynamoDbAdmissionStore(request.getfixturevalue("dynamodb_client"), NONCES)]
    gates = [admission(s, 10, clock) for s in stores]
    answers = []
    for step in range(40):  # each container's view of the item is stale every other request
        clock.now = T0 + step * 0.001
        answers.append(outcome(gates[step % 2].admit))
    assert answers.count(None) == at_once(10)
    waits = [w for w in answers if w is not None]
    assert waits == sorted(waits) and max(waits.count(w) for w in set(waits)) <= 10


# ---------------------------------------------------------------- Admission over a store

def test_a_throttle_slows_the_region_for_every_container(store):
    clock = Clock()
    one, other = admission(store, 10, clock), admission(store, 10, clock)
    assert outcome(other.admit) is None
    one.throttled("eu-west-1")
    clock.now += SLOW_SECONDS / 4
    # other learns the shared slow-down from the store's answer to its next request ...
    assert outcome(other.admit) is None
    clock.now += SLOW_SECONDS / 4
    # ... and from then on admits at the slowed rate: the slowed burst
    slowed = [outcome(other.admit) for _ in range(10)]
    burst = at_once(10 * SLOW_FACTOR)
    assert slowed[:burst] == [None] * burst and None not in slowed[burst:]
    clock.now += SLOW_SECONDS
    assert [outcome(other.admit) for _ in range(10)] == [None] * 10  # for a while only


def test_rollbacks_are_paid_from_the_schedule(store):
    clock = Clock()
    gate = Admission(store, budgets_from({}, DEFAULT_BUDGET), clock)
    for _ in range(16):
        gate.rollback("eu-west-1")
    # 16 rollbacks at the rollback rate (DeleteCertificate/UpdateCertificate: 10/s, less the reserve) are 2 s
    assert DEFAULT_BUDGET.rollback_per_s == 8
    assert outcome(gate.admit) == 3  # its own slot right after them


def test_no_budget_means_no_admission_control(store):
    gate = Admission(store, lambda region: None, Clock())
    assert all(outcome(gate.admit) is None for _ in range(100))


def test_server_made_keys_are_admitted_at_their_own_quota(store):
    clock = Clock()
    gate = Admission(store, budgets_from({}, DEFAULT_BUDGET), clock)
    admitted = sum(outcome(lambda r: gate.admit(r, server_key=True)) is None for _ in range(20))
    assert admitted == at_once(IOT_QUOTAS["CreateKeysAndCertificate"] * (1 - RESERVE))


# ---------------------------------------------------------------- the budget itself

def test_the_budget_is_the_slowest_call_of_an_issuance_less_the_reserve():
    budget = quota_budget()
    assert budget.csr_per_s == min(IOT_QUOTAS[c] for c in ISSUE_CSR) * (1 - RESERVE)
    assert budget.server_key_per_s == min(IOT_QUOTAS[c] for c in ISSUE_SERVER_KEY) * (1 - RESERVE)
    assert budget.server_key_per_s < budget.csr_per_s  # CreateKeysAndCertificate is the tighter quota


def test_configured_rates_override_per_region_and_keep_the_shape():
    budgets = budgets_from({"eu-west-1": 120, "*": 6}, DEFAULT_BUDGET)
    assert budgets("eu-west-1").csr_per_s == 120
    assert budgets("eu-west-1").server_key_per_s == pytest.approx(120 * DEFAULT_BUDGET.server_key_per_s
                                                                  / DEFAULT_BUDGET.csr_per_s)
    assert budgets("ap-northeast-1").csr_per_s == 6
    assert budgets_from({}, None)("eu-west-1") is None
    assert budgets_from({}, DEFAULT_BUDGET)("eu-west-1") == DEFAULT_BUDGET


def test_dynamodb_uncontended_admission_is_one_round_trip(dynamodb_client):
    calls: list[str] = []
    dynamodb_client.meta.events.register("before-call.dynamodb", lambda model, **kw: calls.append(model.name))
    clock = Clock()
    gate = admission(DynamoDbAdmissionStore(dynamodb_client, NONCES), 10, clock)
    for step in range(5):
        clock.now = T0 + step
        assert outcome(gate.admit) is None
    assert calls == ["UpdateItem"] * 5


def test_dynamodb_schedule_items_cannot_be_nonces(dynamodb_client):
    DynamoDbAdmissionStore(dynamodb_client, NONCES).schedule("eu-west-1", T0, 0.1, 0.9)
    keys = [item["nonce_key"]["S"] for item in dynamodb_client.scan(TableName=NONCES)["Items"]]
    assert keys == ["#admission/eu-west-1"]  # a nonce key starts with a thing name, which cannot hold '#'


def test_dynamodb_failures_are_service_unavailable(dynamodb_client):
    store = DynamoDbAdmissionStore(dynamodb_client, "missing-table")
    with pytest.raises(ServiceUnavailable):
        store.schedule("eu-west-1", T0, 0.1, 0.9)


def test_budget_type_is_plain_data():
    assert Budget(12, 8, 8).scaled(24) == Budget(24, 16, 16)
