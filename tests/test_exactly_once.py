"""Issue 5, exactly-once provisioning, proved on both backends.

"local" = SqliteRegistry + LocalIssuer (real CAs); "aws" = DynamoDbRegistry + AwsIotIssuer under moto with two
regions enabled. The service is built by constructor injection. Faults come from botocore event hooks on the
service's own clients (aws), from SQLite triggers in the real databases (local), or from small wrappers passed
in through the constructor. Nothing of ours is patched.
"""
import json
import os
import sqlite3
from collections import Counter
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
import responses
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from moto import mock_aws

from admin import cli as admin
from admin import operations
from admin.operations import AuditReport, MissingCertificate
from chalicelib.adapters.geo import MaxMindLocator
from chalicelib.adapters.issuers.aws_iot import AwsIotIssuer
from chalicelib.adapters.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.container import Container
from chalicelib.domain.errors import AlreadyProvisioned, ServiceUnavailable
from chalicelib.domain.records import UNPROVISIONED, DeviceRecord
from chalicelib.domain.regions import RegionPolicy
from chalicelib.domain.requests import ProvisioningRequest
from chalicelib.domain.signatures import FleetKeyVerifier
from chalicelib.edge.wire import response_body
from chalicelib.services.provisioning import ProvisioningService
from tests import aws_iot_semantics
from tests.conftest import LONDON_IP, TOKYO_IP, api, make_csr, sign_v1

PROD_ENV = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]["environment_variables"]
REGIONS = ("eu-west-2", "ap-northeast-1")   # LONDON_IP -> eu-west-2, TOKYO_IP -> ap-northeast-1
DEFAULT = "eu-west-2"
LEASE = 300
DEVICES = [f"dev-{i}" for i in range(1, 6)]
CREATES = ("CreateThing", "CreateKeysAndCertificate", "CreateCertificateFromCsr", "AttachPolicy",
           "AttachThingPrincipal")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------------------------------- the backends

@dataclass
class Backend:
    name: str
    settings: Settings
    registry: Any
    issuer: Any
    fleet_key: rsa.RSAPrivateKey
    locator: MaxMindLocator
    cli_prefix: list
    iot: dict = field(default_factory=dict)       # aws: the service's own IoT clients, by region
    look: dict = field(default_factory=dict)      # aws: separate IoT clients for inspection (never hooked)
    look_db: Any = None                           # aws: a separate DynamoDB client for inspection
    calls: Counter = field(default_factory=Counter)  # aws: IoT requests the service's clients sent (each attempt)
    refused_things: list = field(default_factory=list)  # aws: things CreateThing was refused for, as AWS refuses
    parts: Any = None                             # the stage's container: what the HTTP route and the CLI use

    def all_iot(self) -> list:
        """aws: every IoT client of the container, by region: the ordinary ones (`iot`, which the hand-built issuer
        uses for every call) and the ones without retries that the container's issuer sends mutating calls by."""
        return [*self.iot.values(), *(self.parts.aws.client("iot", r, retries=False) for r in self.iot)]

    # -- building
    def service(self, **parts) -> ProvisioningService:
        args = dict(registry=self.registry, issuer=self.issuer, locator=self.locator,
                    regions=RegionPolicy(REGIONS, DEFAULT), verifier=FleetKeyVerifier(self.fleet_key.public_key()),
                    lease_seconds=LEASE, clock=utcnow)
        args.update(parts)
        return ProvisioningService(**args)

    def request(self, thing: str, csr_pem: str | None = None) -> ProvisioningRequest:
        body = {"thing-name": thing, "thing-name-sig": sign_v1(self.fleet_key, thing)}
        if csr_pem:
            body["CSR"] = csr_pem
        return ProvisioningRequest.from_body(body)

    def cli(self, *argv: str) -> int:
        return admin.main([*self.cli_prefix, *argv])

    # -- looking behind the backend
    def active_certificates(self, thing: str) -> set[tuple[str, str]]:
        """(region, certificate id) of every ACTIVE certificate the issuer holds for `thing`, any region."""
        if self.name == "local":
            return {(c.region, c.certificate_id) for c in self.issuer.certificates(thing) if c.status == "ACTIVE"}
        found = set()
        for region, client in self.look.items():
            for cert in client.list_certificates()["certificates"]:
                if cert["status"] != "ACTIVE":
                    continue
                things = client.list_principal_things(principal=cert["certificateArn"])["things"]
                if thing in things or not things:  # a loose active certificate counts against everyone
                    found.add((region, cert["certificateId"]))
        return found

    def all_active_certificates(self) -> set[tuple[str, str]]:
        if self.name == "local":
            return {(r, c.certificate_id) for r in REGIONS for c in self.issuer.active_certificates(r)}
        return {(region, c["certificateId"]) for region, client in self.look.items()
                for c in client.list_certificates()["certificates"] if c["status"] == "ACTIVE"}

    def things(self, thing: str) -> list[str]:
        """Regions where the thing exists (aws); [] for the local backend, which has no thing registry."""
        found = []
        for region, client in self.look.items():
            try:
                client.describe_thing(thingName=thing)
            except client.exceptions.ResourceNotFoundException:
                continue
            found.append(region)
        return found

    def certificate_records(self, thing: str) -> int:
        """How many certificates were ever issued for `thing` (local) / IoT create requests sent (aws)."""
        if self.name == "local":
            return len(self.issuer.certificates(thing))
        return sum(self.calls[op] for op in ("CreateKeysAndCertificate", "CreateCertificateFromCsr"))

    def claim_token(self, thing: str) -> str | None:
        if self.name == "local":
            with closing(sqlite3.connect(self.settings.registry_path)) as db:
                return db.execute("SELECT claim_token FROM devices WHERE thing_name = ?", (thing,)).fetchone()[0]
        raw = self.look_db.get_item(TableName=self.settings.table_name, Key={"thing_name": {"S": thing}},
                                             ConsistentRead=True)["Item"]
        return raw.get("claim_token", {}).get("S")

    def assert_nothing_left(self, thing: str) -> None:
        """The failed attempt left no usable identity and no claim; the device may simply try again."""
        assert self.active_certificates(thing) == set()
        if self.name == "local":
            assert all(c.status == "REVOKED" for c in self.issuer.certificates(thing))
        else:
            assert self.things(thing) == []
        # Every active certificate anywhere belongs to a provisioned device.
        assert self.all_active_certificates() <= {(i.region, i.certificate_id)
                                                   for i in self.registry.list("provisioned")}
        item = self.registry.get(thing)
        assert item.status == "unprovisioned"
        assert item.last_error
        assert item.certificate_id is None and item.region is None
        assert self.claim_token(thing) is None
        assert self.audit() == AuditReport()

    def assert_provisioned(self, thing: str, result) -> None:
        item = self.registry.get(thing)
        assert item.status == "provisioned"
        assert item.certificate_id == result.issued.certificate_id
        assert item.region == result.choice.region
        assert item.last_error is None
        assert self.active_certificates(thing) == {(result.choice.region, result.issued.certificate_id)}
        if self.name == "aws":
            assert self.things(thing) == [result.choice.region]

    def audit(self, now: datetime | None = None) -> AuditReport:
        return operations.audit(self.registry, self.issuer, self.settings.enabled_regions, now or utcnow())


def _isolated_env(monkeypatch, tmp_path, fleet_key) -> Path:
    """No GIP_ setting from the caller's shell; the CLI sees the two regions and our fleet key."""
    for name in [n for n in os.environ if n.startswith("GIP_")]:
        monkeypatch.delenv(name)
    public = tmp_path / "fleet.pub.pem"
    public.write_bytes(fleet_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    monkeypatch.setenv("GIP_ENABLED_REGIONS", ",".join(REGIONS))
    monkeypatch.setenv("GIP_DEFAULT_REGION", DEFAULT)
    monkeypatch.setenv("GIP_FLEET_PUBLIC_KEY", str(public))
    monkeypatch.setenv("GIP_IPSTACK_KEY_PARAMETER", "")  # prod's config names one; geolocation stays offline
    return public


@pytest.fixture(params=["local", "aws"])
def backend(request, tmp_path, monkeypatch, fleet_key, locator):
    public = _isolated_env(monkeypatch, tmp_path, fleet_key)
    state = tmp_path / "state"
    if request.param == "local":
        settings = Settings.from_env({"GIP_STAGE": "local", "GIP_STATE_DIR": str(state),
                                      "GIP_ENABLED_REGIONS": ",".join(REGIONS), "GIP_DEFAULT_REGION": DEFAULT,
                                      "GIP_FLEET_PUBLIC_KEY": str(public)})
        registry = SqliteRegistry(settings.registry_path)
        registry.create()
        registry.register(DEVICES)
        issuer = LocalIssuer(settings.ca_dir, local_endpoints(REGIONS, "localhost", 18883))
        issuer.certificates("-")  # makes the certificate table, so tests can add triggers to it
        yield Backend("local", settings, registry, issuer, fleet_key, locator, ["--state-dir", str(state)],
                      parts=Container(settings))
        registry.close()
        return

    # Dummy credentials and no profile files: nothing real can be contacted or signed for.
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": DEFAULT,
                        "AWS_CONFIG_FILE": str(tmp_path / "missing"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "missing")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # responses: no HTTP request may leave this machine.
    with mock_aws(), responses.RequestsMock(assert_all_requests_are_fired=False):
        settings = Settings.from_env({**PROD_ENV, "GIP_IPSTACK_KEY_PARAMETER": "", "GIP_FLEET_PUBLIC_KEY": str(public),
                                      "GIP_STATE_DIR": str(state), "GIP_ENABLED_REGIONS": ",".join(REGIONS),
                                      "GIP_DEFAULT_REGION": DEFAULT, "GIP_ALLOW_V1": "true"})
        parts = Container(settings)
        clients = parts.aws  # the very clients the HTTP route will use
        registry = DynamoDbRegistry(clients.client("dynamodb"), settings.table_name, executor=parts.pool("registry"))
        registry.create()
        registry.register(DEVICES)
        iot = {region: clients.client("iot", region) for region in REGIONS}
        b = Backend("aws", settings, registry,
                    AwsIotIssuer(lambda region: clients.client("iot", region), parts.pool("aws-iot")),
                    fleet_key, locator, ["--stage", "prod"], iot=iot,
                    look={r: boto3.client("iot", region_name=r) for r in REGIONS},
                    look_db=boto3.client("dynamodb", region_name=DEFAULT), parts=parts)
        # Counted at before-send: what really reaches AWS, each attempt; a call that a before-call fault or the
        # request's deadline (its gate fires at request-created) stops is not counted.
        for client in b.all_iot():
            client.meta.events.register("before-send.iot.*",
                                        lambda event_name, **_: b.calls.update([event_name.rsplit(".", 1)[1]]))
        for region in REGIONS:  # CreateThing answers as AWS does, where moto is looser (tests/aws_iot_semantics.py)
            aws_iot_semantics.create_thing_as_aws_does([b.iot[region], parts.aws.client("iot", region, retries=False)],
                                                       b.look[region], b.refused_things)
        yield b


# ------------------------------------------------------------------------------------------- fault injection

def aws_error(operation: str, code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "injected"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


@contextmanager
def iot_fault(b: Backend, operation: str, code: str = "InternalFailureException", status: int = 500):
    """`operation` fails in every region on the service's IoT clients while the block runs."""
    def hook(**_):
        raise aws_error(operation, code, status)
    for client in b.all_iot():
        client.meta.events.register(f"before-call.iot.{operation}", hook)
    try:
        yield
    finally:
        for client in b.all_iot():
            client.meta.events.unregister(f"before-call.iot.{operation}", hook)


@contextmanager
def dynamodb_finalize_fault(b: Backend):
    """DynamoDB refuses the write that marks the device provisioned (and only that one)."""
    client = b.parts.aws.client("dynamodb")

    def hook(params, **_):
        if ":provisioned" in params.get("ExpressionAttributeValues", {}):
            raise aws_error("UpdateItem", "InternalServerError", 500)
    client.meta.events.register("provide-client-params.dynamodb.UpdateItem", hook)
    try:
        yield
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.UpdateItem", hook)


@contextmanager
def sqlite_trigger(path: Path, table: str, event: str, when: str = "1"):
    """A real fault inside a real SQLite database: the statement aborts with 'injected fault'."""
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"CREATE TRIGGER inject_fault BEFORE {event} ON {table} WHEN {when} "
                   "BEGIN SELECT RAISE(ABORT, 'injected fault'); END")
        db.commit()
    try:
        yield
    finally:
        with closing(sqlite3.connect(path)) as db:
            db.execute("DROP TRIGGER inject_fault")
            db.commit()


class FailingFinalize:
    """The real registry, except that finalize raises."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def finalize(self, *args, **kwargs):
        raise RuntimeError("injected: registry write lost")


@contextmanager
def fault(b: Backend, step: str):
    """Yields the parts to build the service with while `step` fails."""
    if step == "finalize":
        yield {"registry": FailingFinalize(b.registry)}
    elif step == "finalize-dynamodb":
        with dynamodb_finalize_fault(b):
            yield {}
    elif step == "finalize-sqlite":
        with sqlite_trigger(b.settings.registry_path, "devices", "UPDATE OF prov_status",
                            "NEW.prov_status = 'provisioned'"):
            yield {}
    elif step == "issue-sqlite":   # the CA signs, then recording the certificate fails
        with sqlite_trigger(b.settings.ca_dir / "certificates.sqlite3", "certificates", "INSERT"):
            yield {}
    else:
        with iot_fault(b, step):
            yield {}


# ------------------------------------------------------------------------------------------- 1. fault at every step

STEPS = [("local", "issue-sqlite"), ("local", "finalize"), ("local", "finalize-sqlite"),
         ("aws", "CreateThing"), ("aws", "CreateKeysAndCertificate"), ("aws", "CreateCertificateFromCsr"),
         ("aws", "AttachPolicy"), ("aws", "AttachThingPrincipal"), ("aws", "finalize"),
         ("aws", "finalize-dynamodb")]


@pytest.mark.parametrize("backend, step", STEPS, indirect=["backend"])
def test_a_fault_at_any_step_after_the_claim_leaves_nothing_and_the_device_then_provisions(backend, step):
    csr_pem = None if step == "CreateKeysAndCertificate" else make_csr("dev-1")[0]
    request = backend.request("dev-1", csr_pem)

    with fault(backend, step) as parts:
        with pytest.raises(ServiceUnavailable) as raised:
            backend.service(**parts).provision(request, LONDON_IP)
    error = raised.value
    assert error.code == "service-unavailable"
    assert isinstance(error.retry_after, int) and error.retry_after > 0
    assert "injected" not in error.message  # internals stay in the log and in last_error
    backend.assert_nothing_left("dev-1")
    if step.startswith("finalize") and backend.name == "local":
        # The certificate was really issued before the fault: it is now revoked in the CA's records.
        assert [c.status for c in backend.issuer.certificates("dev-1")] == ["REVOKED"]

    result = backend.service().provision(request, LONDON_IP)  # the same request, the fault gone
    assert result.choice.region == "eu-west-2"
    backend.assert_provisioned("dev-1", result)
    assert backend.audit() == AuditReport()


# ------------------------------------------------------------------------------------------- 2. lost response

def test_a_lost_response_retried_with_the_same_csr_gets_the_same_certificate_and_nothing_new(backend):
    csr_pem, _ = make_csr("dev-1")
    service = backend.service()
    first = service.provision(backend.request("dev-1", csr_pem), LONDON_IP)
    issued_before, calls_before = backend.certificate_records("dev-1"), Counter(backend.calls)

    again = service.provision(backend.request("dev-1", csr_pem), TOKYO_IP)  # even from elsewhere

    assert again.issued.certificate_id == first.issued.certificate_id
    assert again.issued.certificate_pem == first.issued.certificate_pem
    assert again.issued.endpoint == first.issued.endpoint
    assert again.choice.region == first.choice.region == "eu-west-2"
    assert again.choice.reason == "previous"
    body = response_body(again)
    assert body["status"] == "success" and "PrivateKey" not in body
    assert backend.certificate_records("dev-1") == issued_before == 1
    if backend.name == "aws":
        assert {op: backend.calls[op] for op in CREATES} == {op: calls_before[op] for op in CREATES}
    backend.assert_provisioned("dev-1", first)

    with pytest.raises(AlreadyProvisioned) as raised:                       # another key: not the same device
        service.provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP)
    assert raised.value.code == "already-provisioned"
    assert backend.certificate_records("dev-1") == 1
    backend.assert_provisioned("dev-1", first)

    backend.issuer.revoke(first.issued, delete_thing=True)  # revoked meanwhile: needs a reset
    with pytest.raises(AlreadyProvisioned) as raised:
        service.provision(backend.request("dev-1", csr_pem), LONDON_IP)
    assert "reset" in raised.value.message
    assert backend.certificate_records("dev-1") == 1


def test_a_retry_without_csr_after_a_server_made_key_must_be_reset(backend):
    service = backend.service()
    first = service.provision(backend.request("dev-2"), LONDON_IP)
    assert first.issued.private_key_pem
    with pytest.raises(AlreadyProvisioned) as raised:
        service.provision(backend.request("dev-2"), LONDON_IP)
    assert raised.value.code == "already-provisioned"
    assert "reset" in raised.value.message
    assert backend.certificate_records("dev-2") == 1
    backend.assert_provisioned("dev-2", first)


# ------------------------------------------------------------------------------------------- 3. throttling

@pytest.mark.parametrize("backend", ["aws"], indirect=True)
def test_throttling_after_botocore_gave_up_is_503_with_nothing_half_done(backend):
    for i, (code, status) in enumerate([("ThrottlingException", 400), ("LimitExceededException", 410),
                                        ("ServiceUnavailableException", 503)], start=1):
        thing = f"dev-{i}"
        request = backend.request(thing, make_csr(thing)[0])
        with iot_fault(backend, "CreateThing", code, status):
            with pytest.raises(ServiceUnavailable) as raised:
                backend.service().provision(request, LONDON_IP)
        assert raised.value.retry_after > 0, code
        backend.assert_nothing_left(thing)
        assert backend.calls["CreateCertificateFromCsr"] == 2 * i - 1  # made concurrently, removed by the rollback
        backend.assert_provisioned(thing, backend.service().provision(request, LONDON_IP))


@pytest.mark.parametrize("backend", ["aws"], indirect=True)
def test_one_throttled_call_is_retried_by_botocore_and_the_device_never_notices(backend):
    """The fault is at the HTTP layer, below botocore's retry handler (before-call faults skip retries)."""
    client = backend.iot["eu-west-2"]
    sent = []

    class Raw:
        def stream(self, **_):
            yield json.dumps({"message": "Rate exceeded"}).encode()

    def throttle_once(request, **_):
        sent.append(request.url)
        if len(sent) == 1:
            return AWSResponse(request.url, 400, {"x-amzn-ErrorType": "ThrottlingException:",
                                                  "Content-Type": "application/json"}, Raw())
        return None  # moto answers
    client.meta.events.register_first("before-send.iot.CreateThing", throttle_once)

    result = backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP)
    assert len(sent) == 2
    assert backend.calls["CreateThing"] == 2  # one API call, two attempts on the wire (botocore retried)
    backend.assert_provisioned("dev-1", result)


def _post(client, data, ip=LONDON_IP):
    response = client.http.post("/device-provisioning", body=json.dumps(data),
                                headers={"Content-Type": "application/json", "X-Forwarded-For": ip})
    return response, json.loads(response.body)


def test_http_503_with_retry_after_then_200_when_the_fault_clears(backend):
    csr_pem = make_csr("dev-5")[0]
    data = {"thing-name": "dev-5", "thing-name-sig": sign_v1(backend.fleet_key, "dev-5"), "CSR": csr_pem}
    stage = "prod" if backend.name == "aws" else "local"
    if backend.name == "aws":
        injected = iot_fault(backend, "CreateThing", "ThrottlingException", 400)
    else:
        injected = sqlite_trigger(backend.settings.ca_dir / "certificates.sqlite3", "certificates", "INSERT")
    with api(stage, backend.parts) as client:  # our settings, not the test client's stage environment
        with injected:
            response, answer = _post(client, data)
        assert response.status_code == 503, answer
        assert set(answer) == {"status", "code", "message"}
        assert answer["status"] == "error" and answer["code"] == "service-unavailable"
        assert int(response.headers["Retry-After"]) > 0
        backend.assert_nothing_left("dev-5")

        response, answer = _post(client, data)
        assert response.status_code == 200, answer
        assert answer["status"] == "success" and answer["region"] == DEFAULT

        response, again = _post(client, data)           # the answer was lost: same certificate again
        assert response.status_code == 200 and again["certificateId"] == answer["certificateId"]
        assert again["reason"] == "previous"

        no_csr = {k: v for k, v in data.items() if k != "CSR"}
        response, refused = _post(client, no_csr)
        assert response.status_code == 409 and refused["code"] == "already-provisioned"
        assert "reset" in refused["message"]
    assert backend.active_certificates("dev-5") == {(DEFAULT, answer["certificateId"])}


# ------------------------------------------------------------------------------------------- 4. audit and reset

def _audit_cli(backend, capsys, *flags) -> tuple[int, str]:
    capsys.readouterr()
    code = backend.cli("audit", *flags)
    return code, capsys.readouterr().out


def test_an_orphan_certificate_is_reported_and_fix_revokes_it(backend, capsys):
    csr = x509.load_pem_x509_csr(make_csr("dev-2")[0].encode())
    orphan = backend.issuer.issue("dev-2", "ap-northeast-1", csr)   # issued, never finalized
    found = backend.audit()
    assert [(c.region, c.certificate_id, c.thing_name) for c in found.orphan_certificates] \
        == [("ap-northeast-1", orphan.certificate_id, "dev-2")]
    assert found.stuck_claims == [] and found.missing_certificates == []

    code, out = _audit_cli(backend, capsys)
    assert code == 1 and f"orphan certificate: {orphan.certificate_id}" in out and "--fix" in out
    assert backend.active_certificates("dev-2") == {("ap-northeast-1", orphan.certificate_id)}  # only reported

    code, out = _audit_cli(backend, capsys, "--fix")
    assert code == 0, out
    assert f"revoked orphan certificate {orphan.certificate_id}" in out
    assert backend.active_certificates("dev-2") == set()
    if backend.name == "local":
        assert backend.issuer.certificate(orphan.certificate_id).status == "REVOKED"
    else:
        assert backend.things("dev-2") == []
    assert _audit_cli(backend, capsys)[0] == 0
    backend.assert_provisioned("dev-2", backend.service().provision(backend.request("dev-2", make_csr("dev-2")[0]),
                                                                     TOKYO_IP))


def test_a_stuck_claim_is_reported_and_fix_releases_it(backend, capsys):
    backend.registry.claim("dev-3", utcnow() - timedelta(hours=1), LEASE)  # a process died an hour ago
    found = backend.audit()
    assert [item.thing_name for item in found.stuck_claims] == ["dev-3"]
    code, out = _audit_cli(backend, capsys)
    assert code == 1 and "stuck claim: dev-3" in out

    code, out = _audit_cli(backend, capsys, "--fix")
    assert code == 0 and "released the expired claim on dev-3" in out
    item = backend.registry.get("dev-3")
    assert item.status == "unprovisioned" and "expired" in item.last_error
    assert backend.claim_token("dev-3") is None
    backend.assert_provisioned("dev-3", backend.service().provision(backend.request("dev-3", make_csr("dev-3")[0]),
                                                                     LONDON_IP))


def test_what_a_killed_process_leaves_is_found_and_fixed(backend, capsys):
    """The process died between certificate creation and finalize: an expired claim and an active certificate."""
    backend.registry.claim("dev-4", utcnow() - timedelta(hours=1), LEASE)
    csr = x509.load_pem_x509_csr(make_csr("dev-4")[0].encode())
    left = backend.issuer.issue("dev-4", "eu-west-2", csr)
    found = backend.audit()
    assert [i.thing_name for i in found.stuck_claims] == ["dev-4"]
    assert [c.certificate_id for c in found.orphan_certificates] == [left.certificate_id]

    code, out = _audit_cli(backend, capsys, "--fix")
    assert code == 0, out
    assert backend.active_certificates("dev-4") == set()
    assert backend.registry.get("dev-4").status == "unprovisioned"
    assert backend.audit() == AuditReport()
    backend.assert_provisioned("dev-4", backend.service().provision(backend.request("dev-4", make_csr("dev-4")[0]),
                                                                     LONDON_IP))


def test_a_live_claims_certificate_is_not_an_orphan_until_its_lease_ends(backend, capsys):
    now = utcnow()
    backend.registry.claim("dev-5", now, LEASE)  # a request is between issue and finalize right now
    csr = x509.load_pem_x509_csr(make_csr("dev-5")[0].encode())
    in_flight = backend.issuer.issue("dev-5", "eu-west-2", csr)
    # Reported as in flight, with the claim's age; not a finding, not fixed.
    found = backend.audit(now + timedelta(seconds=2))
    assert [(i.thing_name, i.age_seconds) for i in found.in_flight] == [("dev-5", 2.0)]
    assert found == AuditReport(in_flight=found.in_flight)
    code, out = _audit_cli(backend, capsys, "--fix")
    assert code == 0 and "fixed:" not in out
    assert backend.active_certificates("dev-5") == {("eu-west-2", in_flight.certificate_id)}  # left alone

    later = backend.audit(now + timedelta(seconds=LEASE + 1))
    assert [i.thing_name for i in later.stuck_claims] == ["dev-5"]
    assert [c.certificate_id for c in later.orphan_certificates] == [in_flight.certificate_id]


def test_a_certificate_revoked_out_of_band_is_reported_missing_and_fix_resets_the_device(backend, capsys):
    first = backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP)
    if backend.name == "local":
        backend.issuer.revoke(first.issued, delete_thing=True)
        expected = "REVOKED"
    else:  # an operator revoked it in the AWS console
        backend.look["eu-west-2"].update_certificate(certificateId=first.issued.certificate_id, newStatus="REVOKED")
        expected = "REVOKED"
    found = backend.audit()
    assert found.missing_certificates == [MissingCertificate("dev-1", first.issued.certificate_id, "eu-west-2",
                                                             expected)]
    code, out = _audit_cli(backend, capsys)
    assert code == 1 and "missing certificate: dev-1" in out

    code, out = _audit_cli(backend, capsys, "--fix")
    assert code == 0 and "reset dev-1" in out
    item = backend.registry.get("dev-1")
    assert item.status == "unprovisioned" and item.certificate_id is None
    again = backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), TOKYO_IP)
    assert again.choice.region == "ap-northeast-1"
    assert backend.registry.get("dev-1").certificate_id == again.issued.certificate_id
    assert backend.active_certificates("dev-1") == {("ap-northeast-1", again.issued.certificate_id)}
    assert backend.audit() == AuditReport()


@pytest.mark.parametrize("backend", ["aws"], indirect=True)
def test_aws_missing_fix_then_move_leaves_no_unreferenced_thing_behind(backend, capsys):
    first = backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP)
    backend.look["eu-west-2"].update_certificate(certificateId=first.issued.certificate_id, newStatus="REVOKED")
    assert backend.cli("audit", "--fix") == 0
    again = backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), TOKYO_IP)
    assert again.choice.region == "ap-northeast-1"
    leftover = backend.things("dev-1") != [again.choice.region]
    reported = backend.audit().findings > 0
    assert not leftover or reported, "thing dev-1 left in eu-west-2 and the audit is clean"


@pytest.mark.parametrize("backend", ["aws"], indirect=True)
def test_aws_a_rollback_that_cannot_deactivate_leaves_an_orphan_the_audit_fixes(backend, capsys):
    request = backend.request("dev-1", make_csr("dev-1")[0])
    with iot_fault(backend, "AttachThingPrincipal"), iot_fault(backend, "UpdateCertificate", "AccessDeniedException",
                                                                403):
        with pytest.raises(ServiceUnavailable) as raised:
            backend.service().provision(request, LONDON_IP)
    assert "AttachThingPrincipal" in raised.value.message  # the original error, not the rollback's
    assert backend.registry.get("dev-1").status == "unprovisioned"
    # What the rollback left is on the device's write-ahead record, so the audit reports it there, once.
    found = backend.audit()
    [left] = found.unfinished_rollbacks
    [certificate_id] = left.certificates
    assert found.orphan_certificates == []
    code, out = _audit_cli(backend, capsys, "--fix")
    assert code == 0 and certificate_id in out
    assert backend.all_active_certificates() == set()
    backend.assert_provisioned("dev-1", backend.service().provision(request, LONDON_IP))


@pytest.mark.parametrize("backend", ["aws"], indirect=True)
def test_aws_a_rollback_that_cannot_delete_the_thing_is_visible_to_the_audit(backend):
    request = backend.request("dev-1", make_csr("dev-1")[0])
    with iot_fault(backend, "AttachThingPrincipal"), iot_fault(backend, "DeleteThing", "AccessDeniedException", 403):
        with pytest.raises(ServiceUnavailable):
            backend.service().provision(request, LONDON_IP)
    assert backend.things("dev-1") == ["eu-west-2"]  # really left behind
    marked = "rollback incomplete" in (backend.registry.get("dev-1").last_error or "")
    reported = backend.audit().findings > 0
    assert marked or reported


def test_reset_revokes_and_the_device_provisions_again_in_another_region(backend, capsys):
    first = backend.service().provision(backend.request("dev-2"), LONDON_IP)   # server-made key
    assert first.choice.region == "eu-west-2"
    with pytest.raises(AlreadyProvisioned):                                     # the key was lost
        backend.service().provision(backend.request("dev-2"), TOKYO_IP)

    capsys.readouterr()
    assert backend.cli("reset", "dev-2") == 0
    out = capsys.readouterr().out
    assert first.issued.certificate_id in out and "unprovisioned" in out
    assert backend.active_certificates("dev-2") == set()
    if backend.name == "local":
        assert backend.issuer.certificate(first.issued.certificate_id).status == "REVOKED"
    else:
        assert backend.things("dev-2") == []
    item = backend.registry.get("dev-2")
    assert item == DeviceRecord("dev-2", UNPROVISIONED, attempts=1)  # history is kept

    moved = backend.service().provision(backend.request("dev-2", make_csr("dev-2")[0]), TOKYO_IP)  # moved to Japan
    assert moved.choice.region == "ap-northeast-1"
    backend.assert_provisioned("dev-2", moved)
    assert backend.all_active_certificates() == {("ap-northeast-1", moved.issued.certificate_id)}
    assert _audit_cli(backend, capsys)[0] == 0
