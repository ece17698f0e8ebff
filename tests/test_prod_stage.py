"""The prod stage's wiring (DynamoDB, AWS IoT in several regions, SSM, ipstack) under moto.

Also the IAM policy check: the AWS actions the Lambda really calls, recorded through botocore's event
hooks, must be exactly the ones .chalice/policy-prod.json grants.
"""
import base64
import json
from datetime import datetime, timezone

import boto3
import pytest
import responses
from chalice.test import Client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from moto import mock_aws

from app import app
from chalicelib import admin, wiring
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.issuers.aws_iot import DEVICE_POLICY_NAME
from chalicelib.signatures import v2_text
from chalicelib.wire import ProvisioningRequest
from tests.conftest import LONDON_IP, TOKYO_IP, make_csr, sign_v1

PROD_ENV = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]["environment_variables"]
POLICY = json.loads((PROJECT_DIR / ".chalice" / "policy-prod.json").read_text())
IPSTACK_PARAMETER = PROD_ENV["GIP_IPSTACK_KEY_PARAMETER"]


@pytest.fixture
def prod(tmp_path, monkeypatch):
    """The prod stage's settings, its fleet key in a temporary file, AWS faked by moto."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    fleet_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "fleet.pub.pem"
    public.write_bytes(fleet_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    # responses: no HTTP request may leave this machine; ipstack answers only what a test registers.
    with mock_aws(), responses.RequestsMock(assert_all_requests_are_fired=False) as http:
        wiring.reset()
        settings = Settings.from_env({**PROD_ENV, "GIP_FLEET_PUBLIC_KEY": str(public),
                                      "GIP_STATE_DIR": str(tmp_path / "state")})
        wiring.configure(settings)
        wiring.registry(settings).create()
        wiring.registry(settings).register([f"mydevice{i}" for i in range(1, 6)])
        boto3.client("ssm").put_parameter(Name=IPSTACK_PARAMETER, Value="ipstack-key", Type="SecureString")
        yield settings, fleet_key, http
        wiring.reset()


def body(fleet_key, thing, csr_pem=None):
    data = {"thing-name": thing, "thing-name-sig": sign_v1(fleet_key, thing)}
    if csr_pem:
        data["CSR"] = csr_pem
    return data


def post(client, data):
    response = client.http.post("/device-provisioning", headers={"Content-Type": "application/json",
                                                                 "X-Forwarded-For": TOKYO_IP},
                                body=json.dumps(data))
    return response.status_code, json.loads(response.body)


def test_http_route_on_prod_wiring_all_sample_modes(prod):
    settings, fleet_key, http = prod
    iot = boto3.client("iot", region_name="eu-west-2")
    with Client(app, stage_name="prod", project_dir=str(PROJECT_DIR)) as client:
        # chalice's test gateway reports 127.0.0.1 and prod ignores X-Forwarded-For: default region.
        status, answer = post(client, body(fleet_key, "mydevice1"))
        assert status == 200, answer
        assert answer["region"] == "eu-west-2" and answer["reason"] == "default"
        assert answer["endpointPort"] == 8883 and answer["endpointAddress"].endswith("amazonaws.com")
        assert answer["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
        principals = iot.list_thing_principals(thingName="mydevice1")["principals"]
        assert len(principals) == 1 and principals[0].endswith(answer["certificateId"])
        assert [p["policyName"] for p in iot.list_attached_policies(target=principals[0])["policies"]] \
            == [DEVICE_POLICY_NAME]

        csr_pem, _ = make_csr("mydevice2")
        status, answer = post(client, body(fleet_key, "mydevice2", csr_pem))
        assert status == 200 and "PrivateKey" not in answer
        x509.load_pem_x509_certificate(answer["certificatePem"].encode())

        impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        status, answer = post(client, {"thing-name": "mydevice3", "thing-name-sig": sign_v1(impostor, "mydevice3")})
        assert status == 403 and answer["code"] == "invalid-signature"

        status, answer = post(client, body(fleet_key, "mydevice1"))
        assert status == 409 and answer["code"] == "already-provisioned"
        assert len(iot.list_thing_principals(thingName="mydevice1")["principals"]) == 1

    registry = wiring.registry(settings)
    assert registry.get("mydevice1").status == "provisioned"
    assert registry.get("mydevice1").region == "eu-west-2"
    assert registry.get("mydevice3").status == "unprovisioned"
    assert iot.list_things()["things"] and "mydevice3" not in [t["thingName"] for t in iot.list_things()["things"]]


def test_admin_cli_on_prod_lists_and_shows_dynamodb_items(prod, capsys, monkeypatch):
    settings, fleet_key, http = prod
    issued = wiring.service().provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice4")), TOKYO_IP)
    for name, value in PROD_ENV.items():
        monkeypatch.setenv(name, value)
    assert admin.main(["--stage", "prod", "register", "--prefix", "mydevice", "--count", "7"]) == 0
    assert "registered 2 new device(s); 5 already present" in capsys.readouterr().out
    assert admin.main(["--stage", "prod", "list", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [item["thing_name"] for item in items] == sorted(f"mydevice{i}" for i in range(1, 8))
    assert admin.main(["--stage", "prod", "show", "mydevice7"]) == 0
    assert json.loads(capsys.readouterr().out)["prov_status"] == "unprovisioned"
    assert admin.main(["--stage", "prod", "show", "mydevice4"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["prov_status"] == "provisioned" and shown["aws_region"] == "ap-northeast-1"
    assert shown["certificate"]["certificate_id"] == issued.issued.certificate_id
    assert shown["certificate"]["status"] == "ACTIVE" and shown["certificate"]["region"] == "ap-northeast-1"


def _record_actions(settings, actions: set):
    """Every AWS API call the service's clients make, as IAM action names."""
    def record(event_name, **_):
        _, service, operation = event_name.split(".")[:3]
        actions.add(f"{service}:{operation}")
    clients = wiring.aws_clients()
    for client in [clients.client("dynamodb"), clients.client("ssm"),
                   *(clients.client("iot", region) for region in settings.enabled_regions)]:
        client.meta.events.register("before-call.*.*", record)


def _policy_actions(prefixes=("dynamodb:", "iot:", "ssm:")) -> set:
    granted = set()
    for statement in POLICY["Statement"]:
        actions = statement["Action"]
        granted.update([actions] if isinstance(actions, str) else actions)
    return {a for a in granted if a.startswith(prefixes)}


def test_policy_grants_exactly_the_actions_the_lambda_calls(prod):
    settings, fleet_key, http = prod
    http.get("https://api.ipstack.com/" + LONDON_IP,
                  json={"latitude": 51.5, "longitude": -0.12, "country_code": "GB"})
    http.get("https://api.ipstack.com/" + TOKYO_IP,
                  json={"latitude": 35.7, "longitude": 139.7, "country_code": "JP"})
    actions: set = set()
    _record_actions(settings, actions)
    service = wiring.service()

    def request(thing, csr=None):
        return ProvisioningRequest.from_body(body(fleet_key, thing, csr))

    first = service.provision(request("mydevice1"), LONDON_IP)                 # server-made key
    csr_pem = make_csr("mydevice2")[0]
    second = service.provision(request("mydevice2", csr_pem), TOKYO_IP)        # CSR
    assert (first.choice.region, second.choice.region) == ("eu-west-2", "ap-northeast-1")
    assert len(http.calls) == 2  # ipstack answered both; the key came from SSM
    again = service.provision(request("mydevice2", csr_pem), TOKYO_IP)         # the answer was lost: ask again
    assert again.issued.certificate_id == second.issued.certificate_id
    # A device with its own EC key, signed request v2: its key is read from the table, its nonce recorded.
    device_key = ec.generate_private_key(ec.SECP256R1())
    seen_before = set(actions)
    wiring.registry(settings).register(["own-key-1"], {"own-key-1": device_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()})
    actions.clear()  # registering is the operator's job, not the Lambda's
    stamp, nonce = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "n-1"
    signature = device_key.sign(v2_text("own-key-1", stamp, nonce, None), ec.ECDSA(hashes.SHA256()))
    own = service.provision(ProvisioningRequest.from_body({
        "thing-name": "own-key-1", "thing-name-sig": base64.b64encode(signature).decode(),
        "timestamp": stamp, "nonce": nonce}), LONDON_IP)
    assert own.choice.region == "eu-west-2"
    with pytest.raises(Exception):
        service.provision(request("mydevice1"), LONDON_IP)                     # refused: already provisioned

    # A failure after the certificate exists: the rollback's calls are part of what the Lambda does.
    iot = wiring.aws_clients().client("iot", "eu-west-2")

    def fail(**_):
        raise RuntimeError("injected: attach failed")
    iot.meta.events.register("before-call.iot.AttachThingPrincipal", fail)
    with pytest.raises(Exception):
        service.provision(request("mydevice3"), LONDON_IP)
    iot.meta.events.unregister("before-call.iot.AttachThingPrincipal", fail)

    assert actions >= {"dynamodb:GetItem", "dynamodb:PutItem"}
    actions.update(seen_before)
    assert actions == _policy_actions()
    item = boto3.client("dynamodb").get_item(TableName=settings.table_name, Key={"thing_name": {"S": "mydevice3"}})
    assert item["Item"]["prov_status"] == {"S": "unprovisioned"}


def test_policy_resources_are_narrow():
    for statement in POLICY["Statement"]:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Sid"] == "IotAccountLevel":  # these IoT actions take no resource ARN
            assert set(statement["Action"]) <= {"iot:DescribeEndpoint", "iot:CreateCertificateFromCsr",
                                                "iot:CreateKeysAndCertificate"}
        else:
            assert "*" not in resources
    registry = next(s for s in POLICY["Statement"] if s["Sid"] == "Registry")
    assert registry["Resource"].endswith(f"table/{PROD_ENV['GIP_TABLE_NAME']}")
    ssm = next(s for s in POLICY["Statement"] if s["Sid"] == "IpstackKey")
    assert ssm["Resource"].endswith(f"parameter{IPSTACK_PARAMETER}")


def test_endpoint_and_policy_lookups_are_once_per_container(prod):
    settings, fleet_key, http = prod
    actions: list = []
    clients = wiring.aws_clients()
    for region in settings.enabled_regions:
        clients.client("iot", region).meta.events.register(
            "before-call.iot.*", lambda event_name, **_: actions.append(event_name.split(".")[2]))
    service = wiring.service()
    for i in (1, 2, 3):
        thing = f"mydevice{i}"
        service.provision(ProvisioningRequest.from_body(body(fleet_key, thing)), "10.0.0.1")
    assert actions.count("DescribeEndpoint") == 1
    assert actions.count("GetPolicy") + actions.count("CreatePolicy") <= 2
    per_device = [a for a in actions if a not in ("DescribeEndpoint", "GetPolicy", "CreatePolicy")]
    assert sorted(per_device) == sorted(["CreateThing", "CreateKeysAndCertificate", "AttachPolicy",
                                         "AttachThingPrincipal"] * 3)
