"""A deadline for every request (issue 16): each step, and each AWS call attempt, starts only when it fits in the
time left, keeping time to roll back; when the next step cannot fit, the request rolls back and answers 503 with
Retry-After. Slow calls are made with botocore event hooks that move an injected clock (no sleeping, no timing
asserts): what is checked is what was done and undone, and that the request finished with time to spare.
"""
# ruff: noqa: F811 - `backend` is the fixture imported from test_exactly_once, taken as an argument
import json
import math

import pytest
from botocore.exceptions import ClientError
from chalice.test import Client

from app import app
from chalicelib import wiring
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.deadline import LEASE_MARGIN_SECONDS, ROLLBACK_RESERVE_SECONDS, Deadline, DeadlineExceeded
from chalicelib.issuers.aws_iot import DEVICE_POLICY_NAME, device_policy_document
from chalicelib.operations import AuditReport
from tests.conftest import LONDON_IP, make_csr, sign_v1
from tests.test_exactly_once import backend, iot_fault  # noqa: F401 - the two-backend fixture

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


def slow(backend, operation: str, clock: FakeClock, seconds: float) -> None:
    """`operation` takes `seconds` on the injected clock, on the service's IoT clients in every region."""
    def hook(**_):
        clock.now += seconds
    for client in backend.iot.values():
        client.meta.events.register(f"before-send.iot.{operation}", hook)


@aws
def test_a_slow_aws_call_leaves_too_little_time_to_attach_so_the_request_rolls_back_in_time(backend):
    clock = FakeClock()
    deadline = Deadline(20, clock)
    slow(backend, "CreateCertificateFromCsr", clock, 12)  # 8 s left: attaching (4 s) + the 6 s reserve do not fit

    with pytest.raises(DeadlineExceeded) as refused:
        backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP, deadline=deadline)

    assert refused.value.code == "deadline-exceeded" and refused.value.retry_after > 0
    assert backend.calls["AttachPolicy"] == backend.calls["AttachThingPrincipal"] == 0  # never started
    assert backend.calls["DeleteCertificate"] == 1  # undone within the reserve
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
    with Client(app, stage_name="local", project_dir=str(PROJECT_DIR)) as client:
        wiring.configure(Settings.from_env({"GIP_STATE_DIR": str(backend.settings.state_dir),
                                            "GIP_ENABLED_REGIONS": "eu-west-2,ap-northeast-1",
                                            "GIP_DEFAULT_REGION": "eu-west-2",
                                            "GIP_FLEET_PUBLIC_KEY": str(backend.settings.fleet_public_key),
                                            "GIP_REQUEST_BUDGET_SECONDS": "3"}))
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


from chalicelib.errors import ServiceUnavailable as ServiceUnavailableError  # noqa: E402
