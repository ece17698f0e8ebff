"""A deadline for every request (issue 16): each step, and each AWS call attempt, starts only when it fits in the
time left, keeping time to roll back; when the next step cannot fit, the request rolls back and answers 503 with
Retry-After. Slow calls are made with botocore event hooks that move an injected clock (no sleeping, no timing
asserts): what is checked is what was done and undone, and that the request finished with time to spare.
"""
# ruff: noqa: F811 - `backend` is the fixture imported from test_exactly_once, taken as an argument
import json
import math
import threading
from collections import Counter
from datetime import datetime, timezone

import pytest
from botocore.exceptions import ClientError

from admin.operations import AuditReport
from chalicelib.adapters.issuers.aws_iot import DEVICE_POLICY_NAME, device_policy_document
from chalicelib.config import Settings
from chalicelib.container import Container
from chalicelib.domain.deadline import LEASE_MARGIN_SECONDS, ROLLBACK_RESERVE_SECONDS, Deadline, DeadlineExceeded
from tests.conftest import LONDON_IP, api, make_csr, sign_v1
from tests.test_exactly_once import backend, iot_fault  # noqa: F401 - the two-backend fixture
from tests.test_renewal import Device, renewals

aws = pytest.mark.parametrize("backend", ["aws"], indirect=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LambdaContext:
    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def test_the_deadline_is_the_sooner_of_the_functions_and_the_budget_and_the_lease_follows_it():
    clock = FakeClock()
    on_lambda = Deadline.for_request(LambdaContext(25_000), 20, clock)
    assert on_lambda.remaining() == 20  # the local budget is sooner
    late = Deadline.for_request(LambdaContext(9_000), 20, clock)
    assert late.remaining() == 8  # less a second to answer in
    assert late.for_work() == 8 - ROLLBACK_RESERVE_SECONDS
    # A claim taken now outlives the request by the margin: about a minute, not a fixed 120 s.
    assert on_lambda.lease_seconds() == 20 + LEASE_MARGIN_SECONDS
    with pytest.raises(DeadlineExceeded) as refused:
        late.require("issuing", 3)
    assert refused.value.retry_after == 3 and "2.0 s left" in refused.value.message
    with late.rolling_back():  # a rollback may use the reserve
        late.require("undoing", 3)
    clock.now += 10
    assert math.isclose(on_lambda.remaining(), 10)


def slow(backend, operation: str, clock: FakeClock, seconds: float, after: threading.Event | None = None) -> None:
    """`operation` takes `seconds` on the injected clock, on the service's IoT clients in every region (`after`:
    only once that event is set)."""
    def hook(**_):
        if after is not None:
            assert after.wait(30), f"{operation} waited in vain"
        clock.now += seconds
    for client in backend.iot.values():
        client.meta.events.register(f"before-send.iot.{operation}", hook)


def asked(backend) -> Counter:
    """IoT calls the service asked for (before-call), whether or not the deadline's gate let them reach AWS;
    `backend.calls` counts what was sent (before-send)."""
    seen: Counter = Counter()
    for client in backend.iot.values():
        client.meta.events.register("before-call.iot.*", lambda model, **_: seen.update([model.name]))
    return seen


def answered(backend, *operations: str) -> threading.Event:
    """Set once each of `operations` answered. issue() makes the thing and the certificate side by side: a
    slow certificate call that waits for the thing makes it the attachments, after both, that cannot fit,
    whichever thread runs first."""
    done, seen, lock = threading.Event(), set(), threading.Lock()

    def hook(model, **_):
        with lock:
            seen.add(model.name)
            if seen >= set(operations):
                done.set()
    for client in backend.iot.values():
        for operation in operations:
            client.meta.events.register(f"after-call.iot.{operation}", hook)
    return done


@aws
def test_a_slow_aws_call_leaves_too_little_time_to_attach_so_the_request_rolls_back_in_time(backend):
    clock = FakeClock()
    deadline = Deadline(20, clock)
    asked_for, others = asked(backend), answered(backend, "CreateThing")
    # 8 s left after it: attaching (4 s an attempt) + the 6 s reserve do not fit.
    slow(backend, "CreateCertificateFromCsr", clock, 12, after=others)

    with pytest.raises(DeadlineExceeded) as refused:
        backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP, deadline=deadline)

    assert refused.value.code == "deadline-exceeded" and refused.value.retry_after > 0
    assert backend.calls["CreateThing"] == backend.calls["CreateCertificateFromCsr"] == 1  # both made
    assert asked_for["AttachPolicy"] == asked_for["AttachThingPrincipal"] == 1  # asked for, and refused by the gate:
    assert backend.calls["AttachPolicy"] == backend.calls["AttachThingPrincipal"] == 0  # never sent to AWS
    assert backend.calls["DeleteCertificate"] == backend.calls["DeleteThing"] == 1  # undone within the reserve
    assert deadline.remaining() > 0  # answered before the deadline
    backend.assert_nothing_left("dev-1")


@pytest.mark.parametrize("backend", ["local", "aws"], indirect=True)
def test_a_request_with_3_seconds_left_answers_503_at_once_and_changes_nothing(backend):
    before = backend.registry.get("dev-2")
    with pytest.raises(DeadlineExceeded) as refused:
        backend.service().provision(backend.request("dev-2"), LONDON_IP, deadline=Deadline(3))
    assert refused.value.retry_after > 0
    assert backend.registry.get("dev-2") == before  # not even claimed
    assert sum(backend.calls.values()) == 0
    assert backend.certificate_records("dev-2") == 0


@pytest.mark.parametrize("backend", ["local", "aws"], indirect=True)
def test_a_slow_geolocation_leaves_the_device_unclaimed(backend, locator):
    """Geolocation comes before the claim (admission needs the region): waiting it out changes nothing."""
    clock = FakeClock()

    class SlowLocator:
        def locate(self, ip):
            clock.now += 10  # an unreachable geolocation provider, waited out
            return locator.locate(ip)

    before = backend.registry.get("dev-3")
    with pytest.raises(DeadlineExceeded):
        backend.service(locator=SlowLocator()).provision(backend.request("dev-3", make_csr("dev-3")[0]), LONDON_IP,
                                                         deadline=Deadline(20, clock))
    assert backend.registry.get("dev-3") == before  # not even claimed
    assert sum(backend.calls.values()) == 0
    assert backend.certificate_records("dev-3") == 0


@pytest.mark.parametrize("backend", ["local", "aws"], indirect=True)
def test_a_slow_step_before_issuing_releases_the_claim_and_issues_nothing(backend):
    clock = FakeClock()

    class SlowClaim:
        """The backend's registry, whose claim (a conditional write) is waited out for 10 s."""
        def __getattr__(self, name):
            return getattr(backend.registry, name)

        def claim(self, *args, **kwargs):
            clock.now += 10
            return backend.registry.claim(*args, **kwargs)

    with pytest.raises(DeadlineExceeded):
        backend.service(registry=SlowClaim()).provision(backend.request("dev-3", make_csr("dev-3")[0]), LONDON_IP,
                                                        deadline=Deadline(20, clock))
    assert backend.certificate_records("dev-3") == 0
    backend.assert_nothing_left("dev-3")


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_http_answers_503_with_retry_after_when_the_budget_cannot_fit_a_provisioning(backend, monkeypatch):
    data = {"thing-name": "dev-4", "thing-name-sig": sign_v1(backend.fleet_key, "dev-4")}
    with api("local", Container(Settings.from_env({"GIP_STATE_DIR": str(backend.settings.state_dir),
                                                           "GIP_ENABLED_REGIONS": "eu-west-2,ap-northeast-1",
                                                           "GIP_DEFAULT_REGION": "eu-west-2",
                                                           "GIP_FLEET_PUBLIC_KEY": str(backend.settings.fleet_public_key),
                                                           "GIP_REQUEST_BUDGET_SECONDS": "3"}))) as client:
        response = client.http.post("/device-provisioning", body=json.dumps(data),
                                    headers={"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP})
    answer = json.loads(response.body)
    assert response.status_code == 503, answer
    assert answer["status"] == "error" and answer["code"] == "deadline-exceeded"
    assert int(response.headers["Retry-After"]) > 0
    assert backend.registry.get("dev-4").status == "unprovisioned"


# --- AWS IoT: a rollback under throttling ----------------------------------------------------------------------

def throttled(backend, operation: str, times: int) -> list:
    """`operation` is throttled `times` times (after botocore's own retries: a before-call fault skips them);
    appending None to the returned list ends the throttling."""
    seen: list = []

    def hook(**_):
        if None in seen:
            return
        seen.append(operation)
        if len(seen) <= times:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, operation)
    for client in backend.iot.values():
        client.meta.events.register(f"before-call.iot.{operation}", hook)
    return seen


@aws
def test_a_throttled_rollback_is_retried_within_the_deadline_and_leaves_nothing(backend):
    # AWS IoT throttles per account and region (ThrottlingException, HTTP 400):
    # https://docs.aws.amazon.com/iot/latest/apireference/API_UpdateCertificate.html#API_UpdateCertificate_Errors
    seen = throttled(backend, "UpdateCertificate", 2)
    with iot_fault(backend, "AttachThingPrincipal"):
        with pytest.raises(ServiceUnavailableError):
            backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP,
                                        deadline=Deadline(20))
    assert len(seen) == 3  # twice throttled, then done
    backend.assert_nothing_left("dev-1")


@aws
def test_a_rollback_throttled_past_the_deadline_records_what_is_left_and_the_audit_settles_it(backend):
    clock = FakeClock()
    throttling = throttled(backend, "UpdateCertificate", 100)
    for client in backend.iot.values():  # the device policy exists (a new account's first AttachPolicy makes it)
        client.create_policy(policyName=DEVICE_POLICY_NAME, policyDocument=json.dumps(device_policy_document()))
    slow(backend, "AttachPolicy", clock, 9)  # the rollback starts with 11 s left: too few for many retries
    with iot_fault(backend, "AttachThingPrincipal"):
        with pytest.raises(ServiceUnavailableError):
            backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP,
                                        deadline=Deadline(20, clock))
    item = backend.registry.get("dev-1")
    assert item.status == "unprovisioned" and "rollback incomplete" in item.last_error
    found = backend.audit()
    [left] = found.unfinished_rollbacks
    assert left.thing_name == "dev-1" and len(left.certificates) == 1
    assert found.orphan_certificates == []  # reported once, as what the rollback left
    assert backend.cli("audit") == 1

    throttling.append(None)  # AWS calms down
    assert backend.cli("audit", "--fix") == 0
    assert backend.audit() == AuditReport()
    backend.assert_nothing_left("dev-1")


from chalicelib.domain.errors import ServiceUnavailable as ServiceUnavailableError  # noqa: E402

# --- renewal (POST /device-renewal) under the same deadline -----------------------------------------------------

def _renewable(backend, thing: str):
    """A provisioned device and a renewal request of it (a new key's CSR), signed with its current key."""
    device = Device(backend, thing)
    return device, device.request(make_csr(thing)[0])


@aws
def test_a_slow_aws_call_leaves_a_renewal_too_little_time_to_attach_so_it_rolls_back_in_time(backend):
    device, request = _renewable(backend, "dev-1")
    clock = FakeClock()
    deadline = Deadline(20, clock)
    asked_for = asked(backend)
    sent_before = Counter(backend.calls)
    slow(backend, "CreateCertificateFromCsr", clock, 12)  # in place: no thing to make, the attachments do not fit

    with pytest.raises(DeadlineExceeded) as refused:
        renewals(backend).renew(request, LONDON_IP, deadline=deadline)

    assert refused.value.code == "deadline-exceeded" and refused.value.retry_after > 0
    sent = backend.calls - sent_before
    assert sent["CreateCertificateFromCsr"] == 1 and asked_for["AttachPolicy"] == 1
    assert sent["AttachPolicy"] == sent["AttachThingPrincipal"] == 0  # refused by the gate, never sent
    assert sent["DeleteCertificate"] == 1 and sent["DeleteThing"] == 0  # undone in the reserve; the thing stays
    assert deadline.remaining() > 0  # answered before the deadline
    state = backend.registry.renewal_state("dev-1")
    assert (state.certificate_id, state.renewing_until, state.renewal_count) == (device.certificate_id, None, 0)
    assert backend.active_certificates("dev-1") == {(device.region, device.certificate_id)}
    assert backend.things("dev-1") == [device.region]
    assert backend.registry.claims(datetime.now(timezone.utc)) == []  # no write-ahead record left: nothing to settle
    assert backend.audit() == AuditReport()
    # The device tries again when AWS is quick again, and renews.
    assert renewals(backend).renew(device.request(make_csr("dev-1")[0]), LONDON_IP).issued.certificate_id


@pytest.mark.parametrize("backend", ["local", "aws"], indirect=True)
def test_a_renewal_with_3_seconds_left_answers_503_at_once_and_changes_nothing(backend):
    device, request = _renewable(backend, "dev-2")
    before, sent_before = backend.registry.renewal_state("dev-2"), Counter(backend.calls)
    with pytest.raises(DeadlineExceeded) as refused:
        renewals(backend).renew(request, LONDON_IP, deadline=Deadline(3))
    assert refused.value.retry_after > 0
    assert backend.registry.renewal_state("dev-2") == before  # not even the lease taken
    assert backend.calls == sent_before  # nothing sent to AWS
    assert backend.active_certificates("dev-2") == {(device.region, device.certificate_id)}


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_the_renewal_lease_follows_the_requests_deadline(backend):
    device, request = _renewable(backend, "dev-3")
    leases = []

    class Watched:
        """The backend's registry, noting the lease each renewal asks for."""
        def __getattr__(self, name):
            return getattr(backend.registry, name)

        def begin_renewal(self, thing_name, certificate_id, now, lease_seconds, nonce=None, intent=None):
            leases.append(lease_seconds)
            return backend.registry.begin_renewal(thing_name, certificate_id, now, lease_seconds, nonce, intent)

    renewals(backend, registry=Watched(), lease_seconds=None).renew(request, LONDON_IP,
                                                                     deadline=Deadline(20, FakeClock()))
    assert leases == [20 + LEASE_MARGIN_SECONDS]  # about a minute after the request must have answered


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_http_answers_503_with_retry_after_when_the_budget_cannot_fit_a_renewal(backend):
    device = Device(backend, "dev-4")
    before = backend.registry.renewal_state("dev-4")
    with api("local", Container(Settings.from_env({"GIP_STATE_DIR": str(backend.settings.state_dir),
                                                           "GIP_ENABLED_REGIONS": "eu-west-2,ap-northeast-1",
                                                           "GIP_DEFAULT_REGION": "eu-west-2",
                                                           "GIP_FLEET_PUBLIC_KEY": str(backend.settings.fleet_public_key),
                                                           "GIP_REQUEST_BUDGET_SECONDS": "3"}))) as client:
        response = client.http.post("/device-renewal", body=json.dumps(device.body(make_csr("dev-4")[0])),
                                    headers={"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP})
    answer = json.loads(response.body)
    assert response.status_code == 503, answer
    assert answer["status"] == "error" and answer["code"] == "deadline-exceeded"
    assert int(response.headers["Retry-After"]) > 0
    assert backend.registry.renewal_state("dev-4") == before
    assert backend.active_certificates("dev-4") == {(device.region, device.certificate_id)}

