"""Admission control in the request pipeline: the local stage with a budget, and the AWS issuer's retries."""
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from moto import mock_aws

from chalicelib.adapters.aws import AwsClients
from chalicelib.adapters.issuers.aws_iot import (
    DEVICE_POLICY_NAME,
    MUTATING_OPERATIONS,
    AwsIotIssuer,
    device_policy_document,
)
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.container import Container
from chalicelib.domain.clock import utcnow
from chalicelib.domain.errors import ServiceUnavailable, SignatureInvalid
from chalicelib.domain.records import UNPROVISIONED
from chalicelib.domain.requests import ProvisioningRequest, RenewalRequest, remembered
from tests import test_prod_stage
from tests.conftest import LONDON_IP, TOKYO_IP, api, make_csr
from tests.test_prod_stage import body
from tests.test_renewal import renewal_body

prod = test_prod_stage.prod


def post(client, body, ip):
    response = client.http.post("/device-provisioning", body=json.dumps(body),
                                headers={"Content-Type": "application/json", "X-Forwarded-For": ip})
    return response, json.loads(response.body)


def test_a_local_stage_with_a_budget_gives_refused_devices_slots_of_their_own(stage, monkeypatch):
    monkeypatch.setenv("GIP_ADMISSION_RATES", json.dumps({"*": 1}))  # one device per second per region
    registry = SqliteRegistry(stage.state_dir / "registry.sqlite3")
    csr = {name: make_csr(name)[0] for name in ("mydevice1", "mydevice2", "mydevice3", "mydevice4")}
    with api("local") as client:
        response, first = post(client, stage.body("mydevice1", csr["mydevice1"]), LONDON_IP)
        assert response.status_code == 200, first
        waits = []
        for name in ("mydevice2", "mydevice3"):
            response, refused = post(client, stage.body(name, csr[name]), LONDON_IP)
            assert response.status_code == 503, refused
            assert refused["code"] == "admission-control" and refused["status"] == "error"
            assert "eu-west-2" in refused["message"]
            waits.append(int(response.headers["Retry-After"]))
            # refused before the claim: the device is exactly as it was
            record = registry.get(name)
            assert record.status is UNPROVISIONED and not record.attempts
        assert waits[0] >= 1 and waits[1] == waits[0] + 1  # each its own slot, one second apart

        # a lost answer asked for again issues nothing, so it is answered even while the region is full
        response, again = post(client, stage.body("mydevice1", csr["mydevice1"]), LONDON_IP)
        assert response.status_code == 200 and again["reason"] == "previous"
        assert again["certificateId"] == first["certificateId"]
        # another region has a schedule of its own
        response, tokyo = post(client, stage.body("mydevice4", csr["mydevice4"]), TOKYO_IP)
        assert response.status_code == 200 and tokyo["region"] == "ap-northeast-1"

        time.sleep(waits[0])  # the device honours Retry-After: at its slot it is admitted
        response, second = post(client, stage.body("mydevice2", csr["mydevice2"]), LONDON_IP)
        assert response.status_code == 200, second
        assert registry.get("mydevice2").attempts == 1


def test_without_a_budget_the_local_stage_admits_everyone(stage):
    with api("local") as client:
        for name in ("mydevice1", "mydevice2", "mydevice3"):
            response, body = post(client, stage.body(name, make_csr(name)[0]), LONDON_IP)
            assert response.status_code == 200, body


# ---------------------------------------------------------------- AWS: who retries a throttled call

@pytest.fixture
def aws(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield AwsClients()


class _Raw:
    def stream(self, **_):
        yield json.dumps({"message": "Rate exceeded"}).encode()


def throttle(client, operation: str, times: int, also: str | None = None) -> list:
    """The first `times` attempts of `operation` (and of `also`) on the wire answer ThrottlingException (below botocore's
    retry handler, as AWS would); returns the attempts seen. botocore runs every before-send handler, so
    moto's own is taken off the client and called here only for the attempts that are not throttled (else
    moto would carry out a throttled call)."""
    from moto.core.models import botocore_stubber
    sent = []

    def hook(request, event_name, **kwargs):
        called = event_name.rsplit(".", 1)[-1]
        if called in (operation, also):
            sent.append(called)
            if sent.count(called) <= times:
                return AWSResponse(request.url, 400, {"x-amzn-ErrorType": "ThrottlingException:",
                                                      "Content-Type": "application/json"}, _Raw())
        return botocore_stubber(event_name=event_name, request=request, **kwargs)
    client.meta.events.unregister("before-send", botocore_stubber)
    client.meta.events.register_first("before-send.iot", hook)
    return sent


def test_mutating_calls_skip_botocores_retries_and_reads_keep_them(aws):
    client, mutating = aws.client("iot", "eu-west-2"), aws.client("iot", "eu-west-2", retries=False)
    sent = throttle(mutating, "CreateThing", 1)
    with pytest.raises(ClientError) as refused:
        mutating.create_thing(thingName="t1")
    assert refused.value.response["Error"]["Code"] == "ThrottlingException" and sent == ["CreateThing"]
    sent = throttle(client, "DescribeEndpoint", 1)
    client.describe_endpoint(endpointType="iot:Data-ATS")
    assert sent == ["DescribeEndpoint"] * 2  # botocore retried the read


def test_the_issuer_retries_a_throttled_call_itself_and_reports_it(aws):
    client = aws.client("iot", "eu-west-2", retries=False)
    reported = []
    issuer = AwsIotIssuer(lambda region: aws.client("iot", region), ThreadPoolExecutor(4),
                          mutating_client_for_region=lambda region: client, on_throttle=reported.append)
    boto3.client("iot", region_name="eu-west-2").create_policy(  # an account that has provisioned before
        policyName=DEVICE_POLICY_NAME, policyDocument=json.dumps(device_policy_document()))
    sent = throttle(client, "AttachPolicy", 1)
    issued = issuer.issue("t1", "eu-west-2", None)
    assert sent == ["AttachPolicy"] * 2 and reported == ["eu-west-2"]
    principals = boto3.client("iot", region_name="eu-west-2").list_thing_principals(thingName="t1")["principals"]
    assert principals == [issued.certificate_arn]


def test_a_call_throttled_past_the_issuers_retries_is_undone_and_unavailable(aws):
    client = aws.client("iot", "eu-west-2", retries=False)
    reported = []
    issuer = AwsIotIssuer(lambda region: aws.client("iot", region), ThreadPoolExecutor(4),
                          mutating_client_for_region=lambda region: client, on_throttle=reported.append)
    sent = throttle(client, "CreateThing", 10)
    with pytest.raises(Exception) as failed:
        issuer.issue("t1", "eu-west-2", None)
    assert getattr(failed.value, "code", None) == "service-unavailable"
    assert len(sent) == 3 and reported == ["eu-west-2"] * 3  # one try and two of its own, each reported
    look = boto3.client("iot", region_name="eu-west-2")
    assert look.list_things()["things"] == []
    assert [c for c in look.list_certificates()["certificates"] if c["status"] == "ACTIVE"] == []


# ---------------------------------------------------------------- the prod stage: admission beside the claim

def test_a_request_admission_refuses_changes_nothing_visible_though_its_claim_was_taken_beside(prod):
    """Admission's write and the claim's go side by side (one round trip); when admission refuses, the claim
    written meanwhile is withdrawn: the device's record, its claims and its renewal state are as they were, no IoT
    call that changes anything is made, and the request's nonce stays used. For provisioning and for a renewal."""
    settings, fleet_key, http, _ = prod
    http.answers[LONDON_IP] = {"latitude": 51.5, "longitude": -0.12, "country_code": "GB"}
    parts = Container(replace(settings, admission_rates={"*": 0.01}))  # one device per 100 s per region
    registry, iot_calls, writes = parts.registry, [], []
    for client in (parts.aws.client("iot", "eu-west-2", retries=retries) for retries in (True, False)):
        client.meta.events.register("before-call.iot.*", lambda event_name, **_: iot_calls.append(
            event_name.rsplit(".", 1)[1]))
    parts.aws.client("dynamodb").meta.events.register(
        "provide-client-params.dynamodb.UpdateItem", lambda params, **_: writes.append(params["Key"].get("thing_name")))
    csr_pem, key = make_csr("mydevice1")
    first = parts.provisioning.provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice1", csr_pem)),
                                         LONDON_IP)  # the burst's one device
    registry.release(registry.claim("mydevice2", utcnow(), 60), "an earlier failure")  # some history to keep

    def seen(name):
        return (registry.get(name), [c for c in registry.claims(utcnow()) if c.thing_name == name],
                registry.renewal_state(name))
    provisioning = ProvisioningRequest.from_body(body(fleet_key, "mydevice2"))
    renewal = RenewalRequest.from_body(renewal_body("mydevice1", first.issued.certificate_id, key,
                                                    make_csr("mydevice1")[0]))
    for name, request, run in (("mydevice2", provisioning, parts.provisioning.provision),
                               ("mydevice1", renewal, parts.renewal.renew)):
        before, iot_calls[:], writes[:] = seen(name), [], []
        with pytest.raises(ServiceUnavailable) as busy:
            run(request, LONDON_IP)
        assert busy.value.code == "admission-control"
        assert writes.count({"S": name}) == 2, writes  # its claim was written beside admission's, then withdrawn
        assert seen(name) == before and not set(iot_calls) & MUTATING_OPERATIONS
    assert provisioning.nonce is not None
    with pytest.raises(SignatureInvalid) as replay:  # the refused request's nonce stays used up
        registry.claim("mydevice2", utcnow(), 60, nonce=remembered(provisioning.nonce, utcnow(), 300))
    assert replay.value.code == "replayed-request"
