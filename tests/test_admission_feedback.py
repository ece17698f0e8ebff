"""A renewal and a re-key spend the account's AWS IoT quotas as provisioning does (one container, one issuer with
its admission gate): a call AWS throttles is tried as often as provisioning's (once and twice more by the issuer,
never again by botocore: the calls that change things go through a client without retries) and each throttle
reaches admission, which slows the region for every container (its shared item in DynamoDB says until when).

The prod stage's container under moto; throttles are answered on the wire, below botocore's retry handler, as AWS
answers them (tests/test_admission_pipeline.throttle)."""
import time
from dataclasses import replace

import boto3
import pytest

from chalicelib.adapters.admission.dynamodb import KEY_PREFIX
from chalicelib.container import Container
from chalicelib.domain.errors import ServiceUnavailable
from chalicelib.domain.requests import ProvisioningRequest, RenewalRequest
from tests import test_prod_stage
from tests.conftest import LONDON_IP, make_csr
from tests.test_admission_pipeline import throttle
from tests.test_prod_stage import body, iot_clients
from tests.test_renewal import renewal_body

prod = test_prod_stage.prod
REGION = "eu-west-2"  # where LONDON_IP's devices live (ipstack's answer below)
ISSUER_ATTEMPTS = 3   # a throttled create or attach: one try and the issuer's own two (adapters/issuers/aws_iot.py)


def throttled_on_the_wire(parts: Container, operation: str) -> list:
    """Every attempt of `operation` on any of the container's IoT clients in REGION answers ThrottlingException;
    returns the attempts that reached the endpoint."""
    sent: list = []
    for client in iot_clients(parts, REGION):
        sent_here = throttle(client, operation, 1000)
        sent.append(sent_here)
    return sent


def attempts(sent: list) -> int:
    return sum(len(each) for each in sent)


def slowed_until(parts: Container) -> float:
    """Until when admission runs REGION slowed, as every container reads it (0: never slowed)."""
    item = boto3.client("dynamodb", region_name=REGION).get_item(
        TableName=f"{parts.settings.table_name}-nonces", Key={"nonce_key": {"S": KEY_PREFIX + REGION}},
        ConsistentRead=True).get("Item", {})
    return float(item.get("slow_until", {}).get("N", 0))


def located(http) -> None:
    http.answers[LONDON_IP] = {"latitude": 51.5, "longitude": -0.12, "country_code": "GB", "continent_code": "EU"}


def test_provisioning_under_throttling_tries_three_times_and_slows_the_region(prod):
    settings, fleet_key, http, parts = prod
    located(http)
    assert parts.admission is not None and slowed_until(parts) == 0
    sent = throttled_on_the_wire(parts, "CreateCertificateFromCsr")
    with pytest.raises(ServiceUnavailable):
        parts.provisioning.provision(ProvisioningRequest.from_body(
            body(fleet_key, "mydevice1", make_csr("mydevice1")[0])), LONDON_IP)
    assert attempts(sent) == ISSUER_ATTEMPTS
    assert slowed_until(parts) > time.time()


def test_a_renewal_under_throttling_tries_as_often_as_provisioning_and_slows_the_region(prod):
    settings, fleet_key, http, parts = prod
    located(http)
    csr_pem, key = make_csr("mydevice2")
    first = parts.provisioning.provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice2", csr_pem)),
                                         LONDON_IP)
    assert slowed_until(parts) == 0
    sent = throttled_on_the_wire(parts, "CreateCertificateFromCsr")
    with pytest.raises(ServiceUnavailable):
        parts.renewal.renew(RenewalRequest.from_body(renewal_body(
            "mydevice2", first.issued.certificate_id, key, make_csr("mydevice2")[0])), LONDON_IP)
    assert attempts(sent) == ISSUER_ATTEMPTS
    assert slowed_until(parts) > time.time()
    assert parts.registry.get("mydevice2").certificate_id == first.issued.certificate_id  # nothing changed


def test_a_rekey_under_throttling_tries_as_often_as_provisioning_and_slows_the_region(prod):
    settings, fleet_key, http, _ = prod
    located(http)
    parts = Container(replace(settings, claim_lease_seconds=1))  # a re-key opens a lease's time after provisioning
    first = parts.provisioning.provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice3")), LONDON_IP)
    time.sleep(1.2)
    assert slowed_until(parts) == 0
    sent = throttled_on_the_wire(parts, "CreateKeysAndCertificate")
    with pytest.raises(ServiceUnavailable):
        parts.provisioning.provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice3")), LONDON_IP)
    assert attempts(sent) == ISSUER_ATTEMPTS
    assert slowed_until(parts) > time.time()
    assert parts.registry.get("mydevice3").certificate_id == first.issued.certificate_id  # nothing changed


def test_calls_that_change_things_go_through_a_client_without_retries(prod):
    """botocore's documented way: a client made with retries={"total_max_attempts": 1}; reads keep their retries."""
    parts = prod[3]
    plain, mutating = iot_clients(parts, REGION)
    assert mutating.meta.config.retries["total_max_attempts"] == 1
    assert plain.meta.config.retries.get("total_max_attempts", 4) > 1
    sent = throttle(mutating, "CreateThing", 1)
    with pytest.raises(mutating.exceptions.ThrottlingException):
        mutating.create_thing(thingName="t1")
    assert sent == ["CreateThing"]
