"""One contract for every issuer backend: the local CAs (real) and AWS IoT (boto3 against moto).

AWS-only tests below the contract check what only AWS has: the device policy, the calls made per region
and per device (counted with botocore event hooks), cleanup after injected failures, and error mapping.
"""
import concurrent.futures as cf
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from moto import mock_aws

from chalicelib.adapters.issuers.aws_iot import DEVICE_POLICY_NAME, AwsIotIssuer, device_policy_document
from chalicelib.adapters.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.domain.errors import IssueIncomplete, MalformedRequest, ServiceUnavailable
from tests.conftest import make_csr

REGION_A, REGION_B = "eu-west-2", "ap-northeast-1"
THING = "${iot:Connection.Thing.ThingName}"


@dataclass
class Backend:
    """The issuer under test and a way to look behind it."""
    name: str
    issuer: Any
    active_certificates: Callable[[str, str], set]   # (thing, region) -> active certificate ids
    certificate_active: Callable[[str, str], bool]   # (certificate id, region)
    thing_exists: Callable[[str, str], bool] | None  # None: the backend has no thing registry
    clients: dict = field(default_factory=dict)


def local_backend(tmp_path) -> Backend:
    issuer = LocalIssuer(tmp_path / "ca", local_endpoints([REGION_A, REGION_B], "localhost", 18883))

    def active(thing, region):
        return {c.certificate_id for c in issuer.certificates(thing) if c.region == region and c.status == "ACTIVE"}

    def certificate_active(certificate_id, region):
        record = issuer.certificate(certificate_id)
        return record is not None and record.region == region and record.status == "ACTIVE"

    return Backend("local", issuer, active, certificate_active, None)


def aws_backend(executor) -> Backend:
    clients: dict[str, Any] = {}

    def client(region):
        if region not in clients:
            clients[region] = boto3.client("iot", region_name=region)
        return clients[region]

    # The inspector uses its own clients, so its calls are never counted or failed by test hooks.
    look = {r: boto3.client("iot", region_name=r) for r in (REGION_A, REGION_B)}

    def thing_exists(thing, region):
        try:
            look[region].describe_thing(thingName=thing)
            return True
        except look[region].exceptions.ResourceNotFoundException:
            return False

    def certificate_active(certificate_id, region):
        try:
            description = look[region].describe_certificate(certificateId=certificate_id)
        except look[region].exceptions.ResourceNotFoundException:
            return False
        return description["certificateDescription"]["status"] == "ACTIVE"

    def active(thing, region):
        if not thing_exists(thing, region):
            return set()
        arns = look[region].list_thing_principals(thingName=thing)["principals"]
        ids = {arn.rsplit("/", 1)[1] for arn in arns}
        return {i for i in ids if certificate_active(i, region)}

    return Backend("aws", AwsIotIssuer(client, executor), active, certificate_active, thing_exists, clients)


@pytest.fixture
def aws_env(monkeypatch):
    # Dummy credentials and no profile files: nothing real can be contacted or signed for.
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION_A,
                        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield


@pytest.fixture(params=["local", "aws"])
def issuer(request, tmp_path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path)
    request.getfixturevalue("aws_env")
    return aws_backend(request.getfixturevalue("executor"))


@pytest.fixture
def aws(aws_env, executor) -> Backend:
    return aws_backend(executor)


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


# ---------------------------------------------------------------- the contract, for every backend

def test_issue_without_csr_returns_a_certificate_and_its_rsa_key(issuer):
    issued = issuer.issuer.issue("dev-1", REGION_A, None)
    assert issued.region == REGION_A
    assert issued.endpoint == issuer.issuer.endpoint(REGION_A)
    assert len(issued.certificate_id) == 64 and int(issued.certificate_id, 16) >= 0
    cert = load_cert(issued.certificate_pem)
    # The sample's device expects the PKCS#1 form AWS IoT returns.
    assert issued.private_key_pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    key = serialization.load_pem_private_key(issued.private_key_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert issuer.active_certificates("dev-1", REGION_A) == {issued.certificate_id}


def test_issue_with_csr_returns_a_certificate_and_no_key(issuer):
    csr_pem, _ = make_csr("dev-2")
    issued = issuer.issuer.issue("dev-2", REGION_B, x509.load_pem_x509_csr(csr_pem.encode()))
    assert issued.private_key_pem is None
    load_cert(issued.certificate_pem)
    assert issuer.active_certificates("dev-2", REGION_B) == {issued.certificate_id}


def test_certificate_from_csr_carries_the_csr_key(issuer):
    if issuer.name == "aws":
        pytest.skip("moto's create_certificate_from_csr signs a new key, not the CSR's; real AWS IoT keeps it")
    csr_pem, device_key = make_csr("dev-3")
    issued = issuer.issuer.issue("dev-3", REGION_A, x509.load_pem_x509_csr(csr_pem.encode()))
    assert load_cert(issued.certificate_pem).public_key() == device_key.public_key()


def test_endpoint_differs_per_region_and_is_stable(issuer):
    a, b = issuer.issuer.endpoint(REGION_A), issuer.issuer.endpoint(REGION_B)
    assert a != b
    # moto makes a new host on every DescribeEndpoint: equality here proves the per-region cache.
    assert issuer.issuer.endpoint(REGION_A) == a and issuer.issuer.endpoint(REGION_B) == b
    if issuer.name == "aws":
        assert a.port == b.port == 8883
        assert a.address.endswith(f"-ats.iot.{REGION_A}.amazonaws.com")
    assert issuer.issuer.issue("dev-4", REGION_B, None).endpoint == b


def test_revoke_leaves_no_active_certificate(issuer):
    issued = issuer.issuer.issue("dev-5", REGION_A, None)
    issuer.issuer.revoke(issued, delete_thing=True)
    assert issuer.active_certificates("dev-5", REGION_A) == set()
    assert not issuer.certificate_active(issued.certificate_id, REGION_A)
    if issuer.thing_exists:
        assert not issuer.thing_exists("dev-5", REGION_A)
    issuer.issuer.revoke(issued, delete_thing=True)  # again: what is already gone is fine


def test_regions_are_independent(issuer):
    in_a = issuer.issuer.issue("dev-6", REGION_A, None)
    in_b = issuer.issuer.issue("dev-6", REGION_B, None)
    assert in_a.certificate_id != in_b.certificate_id
    assert (in_a.region, in_b.region) == (REGION_A, REGION_B)
    assert in_a.endpoint != in_b.endpoint
    issuer.issuer.revoke(in_a, delete_thing=True)
    assert issuer.active_certificates("dev-6", REGION_A) == set()
    assert issuer.active_certificates("dev-6", REGION_B) == {in_b.certificate_id}


# ---------------------------------------------------------------- AWS IoT only

def test_policy_document_is_least_privilege():
    statements = device_policy_document()["Statement"]
    granted = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            granted[action] = statement["Resource"]
    assert granted == {
        "iot:Connect": f"arn:aws:iot:*:*:client/{THING}",
        "iot:Publish": f"arn:aws:iot:*:*:topic/data/{THING}/*",
        "iot:Receive": f"arn:aws:iot:*:*:topic/data/{THING}/*",
        "iot:Subscribe": f"arn:aws:iot:*:*:topicfilter/data/{THING}/*",
    }
    connect = next(s for s in statements if s["Action"] == "iot:Connect")
    assert connect["Condition"] == {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}


def test_device_policy_is_created_once_per_region_and_attached(aws):
    for region in (REGION_A, REGION_B):
        issued = {name: aws.issuer.issue(name, region, None) for name in ("dev-1", "dev-2")}
        client = aws.clients[region]
        assert [p["policyName"] for p in client.list_policies()["policies"]] == [DEVICE_POLICY_NAME]
        document = json.loads(client.get_policy(policyName=DEVICE_POLICY_NAME)["policyDocument"])
        assert document == device_policy_document()
        for name, one in issued.items():
            arn = client.describe_certificate(certificateId=one.certificate_id)[
                "certificateDescription"]["certificateArn"]
            attached = client.list_attached_policies(target=arn)["policies"]
            assert [p["policyName"] for p in attached] == [DEVICE_POLICY_NAME]
            assert client.list_principal_things(principal=arn)["things"] == [name]


class CallLog:
    """Counts AWS IoT operations per region through botocore's event hooks."""

    def __init__(self, clients: dict):
        self.calls: dict[str, Counter] = {}
        for region, client in clients.items():
            counter = self.calls.setdefault(region, Counter())
            client.meta.events.register("before-call.iot.*",
                                        lambda model, counter=counter, **_: counter.update([model.name]))


def fail(client, operation: str, code: str, status: int = 400, times: int = 1_000):
    """Make `operation` fail with `code` on this client the next `times` calls."""
    left = [times]

    def hook(**_):
        if left[0] > 0:
            left[0] -= 1
            raise ClientError({"Error": {"Code": code, "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
    client.meta.events.register(f"before-call.iot.{operation}", hook)


def prepared(aws: Backend) -> Backend:
    """Build both regions' clients now, so hooks can be registered before the first issue."""
    for region in (REGION_A, REGION_B):
        aws.issuer._client(region)  # noqa: SLF001 - the test's own factory, not the issuer's state
    return aws


def test_calls_per_region_are_made_once_and_per_device_calls_are_minimal(aws):
    calls = CallLog(prepared(aws).clients).calls
    csr = x509.load_pem_x509_csr(make_csr("with-csr")[0].encode())
    for region in (REGION_A, REGION_B):
        for i, request in enumerate([None, csr, None]):
            aws.issuer.issue(f"dev-{i}", region, request)
    for region in (REGION_A, REGION_B):
        assert calls[region] == Counter({
            # No GetPolicy: the first AttachPolicy in a region finds no policy, which is made then, once.
            "DescribeEndpoint": 1, "CreatePolicy": 1,
            # No DescribeThing: CreateThing carries an attribute of its own call, so AWS refuses it for any thing
            # that was there before (tests/test_aws_semantics.py), and a success says this attempt made the thing.
            "CreateThing": 3, "CreateKeysAndCertificate": 2, "CreateCertificateFromCsr": 1,
            "AttachPolicy": 3 + 1, "AttachThingPrincipal": 3})


def test_concurrent_first_issues_share_one_region_setup(aws):
    calls = CallLog(prepared(aws).clients).calls
    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: aws.issuer.issue(f"dev-{i}", REGION_A, None), range(6)))
    assert len({r.certificate_id for r in results}) == 6
    assert len({r.endpoint for r in results}) == 1
    assert (calls[REGION_A]["DescribeEndpoint"], calls[REGION_A]["GetPolicy"],
            calls[REGION_A]["CreatePolicy"]) == (1, 0, 1)


def test_a_failed_attach_undoes_everything(aws, caplog):
    prepared(aws)
    fail(aws.clients[REGION_A], "AttachThingPrincipal", "InternalFailureException", 500)
    with pytest.raises(ServiceUnavailable) as raised:
        aws.issuer.issue("dev-1", REGION_A, None)
    assert caplog.records == []  # the never-attached principal is not a cleanup failure
    assert "AttachThingPrincipal" in raised.value.message and REGION_A in raised.value.message
    assert not aws.thing_exists("dev-1", REGION_A)
    assert aws.clients[REGION_A].list_certificates()["certificates"] == []


def test_a_refused_csr_is_a_malformed_request_and_the_thing_is_removed(aws):
    prepared(aws)
    fail(aws.clients[REGION_B], "CreateCertificateFromCsr", "InvalidRequestException")
    csr = x509.load_pem_x509_csr(make_csr("dev-1")[0].encode())
    with pytest.raises(MalformedRequest) as raised:
        aws.issuer.issue("dev-1", REGION_B, csr)
    assert raised.value.code == "malformed-csr"
    assert not aws.thing_exists("dev-1", REGION_B)


def test_throttling_is_service_unavailable_and_the_certificate_is_removed(aws):
    prepared(aws)
    fail(aws.clients[REGION_A], "CreateThing", "ThrottlingException")
    with pytest.raises(ServiceUnavailable) as raised:
        aws.issuer.issue("dev-1", REGION_A, None)
    assert raised.value.retry_after > 0
    assert "CreateThing" in raised.value.message and REGION_A in raised.value.message
    assert not isinstance(raised.value, ClientError)
    assert aws.clients[REGION_A].list_certificates()["certificates"] == []


@pytest.mark.parametrize("code, status, retry_after, logged", [
    ("ThrottlingException", 400, 5, False),
    ("LimitExceededException", 410, 5, False),
    ("SomethingNewException", 502, 5, False),        # any 5xx is the service's trouble, not ours
    ("AccessDeniedException", 403, 30, True),        # our setup is wrong: tell the operator
])
def test_aws_errors_become_service_unavailable(aws, caplog, code, status, retry_after, logged):
    prepared(aws)
    fail(aws.clients[REGION_B], "CreateKeysAndCertificate", code, status)
    with pytest.raises(ServiceUnavailable) as raised:
        aws.issuer.issue("dev-1", REGION_B, None)
    assert raised.value.retry_after == retry_after
    assert "CreateKeysAndCertificate" in raised.value.message and REGION_B in raised.value.message
    assert any(code in r.getMessage() for r in caplog.records) == logged
    assert not aws.thing_exists("dev-1", REGION_B)


def test_a_failed_region_lookup_is_tried_again(aws):
    prepared(aws)
    calls = CallLog(aws.clients).calls
    fail(aws.clients[REGION_A], "DescribeEndpoint", "ServiceUnavailableException", 503, times=1)
    with pytest.raises(ServiceUnavailable):
        aws.issuer.issue("dev-1", REGION_A, None)
    assert aws.active_certificates("dev-1", REGION_A) == set()
    issued = aws.issuer.issue("dev-1", REGION_A, None)
    assert aws.active_certificates("dev-1", REGION_A) == {issued.certificate_id}
    assert calls[REGION_A]["DescribeEndpoint"] == 2 and calls[REGION_A]["CreatePolicy"] == 1


def test_a_policy_made_concurrently_elsewhere_is_fine(aws):
    prepared(aws)
    other_container = boto3.client("iot", region_name=REGION_A)

    def create_it_first(**_):
        other_container.create_policy(policyName=DEVICE_POLICY_NAME,
                                      policyDocument=json.dumps(device_policy_document()))
    aws.clients[REGION_A].meta.events.register("before-call.iot.CreatePolicy", create_it_first)
    issued = aws.issuer.issue("dev-1", REGION_A, None)
    assert aws.active_certificates("dev-1", REGION_A) == {issued.certificate_id}


def test_a_failed_cleanup_is_logged_and_the_first_error_is_raised(aws, caplog):
    prepared(aws)
    fail(aws.clients[REGION_A], "AttachThingPrincipal", "ThrottlingException")
    fail(aws.clients[REGION_A], "DeleteThing", "AccessDeniedException", 403)
    with caplog.at_level(logging.ERROR, logger="chalicelib.adapters.issuers.aws_iot"):
        with pytest.raises(IssueIncomplete) as raised:  # the thing is left: a declared leftover
            aws.issuer.issue("dev-1", REGION_A, None)
    assert isinstance(raised.value.error, ServiceUnavailable)
    assert "AttachThingPrincipal" in raised.value.error.message
    assert "thing dev-1" in raised.value.leftover and REGION_A in raised.value.leftover
    failures = [r.getMessage() for r in caplog.records if "delete thing" in r.getMessage()]
    assert len(failures) == 1 and "dev-1" in failures[0] and REGION_A in failures[0]
    assert "PRIVATE KEY" not in caplog.text
    # Everything but the thing is gone: the certificate can no longer be used.
    assert aws.clients[REGION_A].list_certificates()["certificates"] == []


def test_revoke_waits_for_a_detachment_to_propagate(aws):
    issued = aws.issuer.issue("dev-1", REGION_A, None)
    fail(aws.clients[REGION_A], "DeleteCertificate", "DeleteConflictException", 409, times=1)
    aws.issuer.revoke(issued, delete_thing=True)
    assert not aws.certificate_active(issued.certificate_id, REGION_A)
    assert aws.clients[REGION_A].list_certificates()["certificates"] == []
    assert not aws.thing_exists("dev-1", REGION_A)


def test_a_policy_that_exists_is_attached_without_looking_it_up(aws):
    calls = CallLog(prepared(aws).clients).calls
    boto3.client("iot", region_name=REGION_A).create_policy(  # made by an earlier deployment or container
        policyName=DEVICE_POLICY_NAME, policyDocument=json.dumps(device_policy_document()))
    issued = aws.issuer.issue("dev-1", REGION_A, None)
    assert aws.active_certificates("dev-1", REGION_A) == {issued.certificate_id}
    assert (calls[REGION_A]["GetPolicy"], calls[REGION_A]["CreatePolicy"], calls[REGION_A]["AttachPolicy"]) == (0, 0, 1)


def test_a_cold_container_reads_the_endpoint_another_one_shared(aws_env, executor):
    """DescribeEndpoint has a small quota of its own: of many cold containers only the first asks AWS IoT."""
    from chalicelib.adapters.issuers.endpoints_dynamodb import DynamoDbEndpoints
    from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
    dynamodb = boto3.client("dynamodb", region_name=REGION_A)
    DynamoDbRegistry(dynamodb, "gip", executor=executor).create()
    containers = [aws_backend(executor) for _ in range(3)]
    for container in containers:  # each container its own issuer and clients; they share the table
        container.issuer = AwsIotIssuer(container.issuer._client, executor,  # noqa: SLF001 - the test's factory
                                        shared_endpoints=DynamoDbEndpoints(dynamodb, "gip-nonces"))
    calls = [CallLog(prepared(c).clients).calls for c in containers]
    endpoints = [c.issuer.issue(f"dev-{i}", REGION_A, None).endpoint for i, c in enumerate(containers)]
    assert len(set(endpoints)) == 1  # moto makes a new address on every DescribeEndpoint
    assert [c[REGION_A]["DescribeEndpoint"] for c in calls] == [1, 0, 0]
    assert DynamoDbEndpoints(dynamodb, "gip-nonces").get(REGION_A) == endpoints[0].address
    assert DynamoDbEndpoints(dynamodb, "gip-nonces").get(REGION_B) is None  # only the regions asked for


def test_an_unreadable_shared_endpoint_falls_back_to_aws_iot(aws, executor):
    class Broken:
        def get(self, region):
            raise ConnectionError("store down")

        def put(self, region, address):
            raise ConnectionError("store down")
    issuer = AwsIotIssuer(aws.issuer._client, executor, shared_endpoints=Broken())  # noqa: SLF001
    issued = issuer.issue("dev-1", REGION_A, None)
    assert issued.endpoint.address.endswith(f"-ats.iot.{REGION_A}.amazonaws.com")


def test_a_certificate_whose_deletion_fails_is_left_revoked_for_good(aws):
    """REVOKED, not INACTIVE: both stop the certificate's devices, but only REVOKED can never be switched back on, and
    a certificate whose DeleteCertificate fails stays as the undo left it, in a revocation and in issue()'s own undo.
    (Kills: the undo setting INACTIVE.)"""
    prepared(aws)
    look = boto3.client("iot", region_name=REGION_A)
    issued = aws.issuer.issue("dev-1", REGION_A, None)
    fail(aws.clients[REGION_A], "DeleteCertificate", "AccessDeniedException", 403)
    with pytest.raises(ServiceUnavailable, match="incomplete"):
        aws.issuer.revoke(issued, delete_thing=True)
    fail(aws.clients[REGION_A], "AttachThingPrincipal", "InternalFailureException", 500)
    with pytest.raises(IssueIncomplete) as undone:
        aws.issuer.issue("dev-2", REGION_A, None)
    assert undone.value.certificate is not None
    for certificate_id in (issued.certificate_id, undone.value.certificate[0]):
        assert look.describe_certificate(certificateId=certificate_id)["certificateDescription"]["status"] == "REVOKED"


def test_adopting_a_dead_renewals_certificate_in_place_attaches_it_with_the_policy(aws):
    """A renewal in place that died inside issue() left a certificate with nothing attached; adopting it in place
    attaches the device policy (without it the certificate cannot connect) and the device's thing, which keeps its
    current certificate. (Kills: in-place adoption not attaching the policy.)"""
    look = boto3.client("iot", region_name=REGION_A)
    current = aws.issuer.issue("dev-1", REGION_A, None)
    left = look.create_keys_and_certificate(setAsActive=True)
    adopted = aws.issuer.adopt("dev-1", REGION_A, left["certificateId"], in_place=True)
    assert (adopted.certificate_id, adopted.created_thing) == (left["certificateId"], False)
    policies = look.list_attached_policies(target=left["certificateArn"])["policies"]
    assert [p["policyName"] for p in policies] == [DEVICE_POLICY_NAME]
    assert look.list_principal_things(principal=left["certificateArn"])["things"] == ["dev-1"]
    assert aws.active_certificates("dev-1", REGION_A) == {current.certificate_id, left["certificateId"]}
