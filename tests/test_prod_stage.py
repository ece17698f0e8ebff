"""The prod stage's wiring (DynamoDB, AWS IoT in several regions, SSM, ipstack) under moto.

Also the IAM policy check: the AWS actions the Lambda really calls, recorded through botocore's event
hooks, must be exactly the ones .chalice/policy-prod.json grants.
"""
import base64
import json
import os
from datetime import datetime, timezone

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from moto import mock_aws

from admin import cli as admin
from admin import iam_policy, lean_models
from chalicelib.adapters.aws import AwsClients
from chalicelib.adapters.issuers.aws_iot import DEVICE_POLICY_NAME
from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.container import Container
from chalicelib.domain.requests import ProvisioningRequest
from chalicelib.domain.signatures import v2_text
from tests import aws_iot_semantics
from tests.conftest import LONDON_IP, TOKYO_IP, api, make_csr, sign_v1
from tests.fake_ipstack import FakeIpstack

PROD_ENV = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]["environment_variables"]
POLICY = json.loads((PROJECT_DIR / ".chalice" / "policy-prod.json").read_text())
IPSTACK_PARAMETER = PROD_ENV["GIP_IPSTACK_KEY_PARAMETER"]


@pytest.fixture
def prod(tmp_path, monkeypatch):
    """The prod stage's settings, its fleet key in a temporary file, AWS faked by moto, and the stage's container."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    fleet_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "fleet.pub.pem"
    public.write_bytes(fleet_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    # ipstack is a stand-in on 127.0.0.1 that answers only what a test puts in; nothing leaves this machine.
    with mock_aws(), FakeIpstack() as http:
        settings = Settings.from_env({**PROD_ENV, "GIP_FLEET_PUBLIC_KEY": str(public),
                                      "GIP_STATE_DIR": str(tmp_path / "state"), "GIP_IPSTACK_URL": http.url})
        parts = Container(settings)
        parts.registry.create()
        parts.registry.register([f"mydevice{i}" for i in range(1, 6)])
        boto3.client("ssm").put_parameter(Name=IPSTACK_PARAMETER, Value="ipstack-key", Type="SecureString")
        yield settings, fleet_key, http, parts


def body(fleet_key, thing, csr_pem=None, version=2):
    """The device's default request: signed request v2 (prod refuses v1 unless told otherwise)."""
    if version == 1:
        data = {"thing-name": thing, "thing-name-sig": sign_v1(fleet_key, thing)}
    else:
        stamp, nonce = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), os.urandom(8).hex()
        signature = fleet_key.sign(v2_text(thing, stamp, nonce, csr_pem), padding.PKCS1v15(), hashes.SHA256())
        data = {"thing-name": thing, "thing-name-sig": base64.b64encode(signature).decode(), "timestamp": stamp,
                "nonce": nonce}
    if csr_pem:
        data["CSR"] = csr_pem
    return data


def post(client, data):
    response = client.http.post("/device-provisioning", headers={"Content-Type": "application/json",
                                                                 "X-Forwarded-For": TOKYO_IP},
                                body=json.dumps(data))
    return response.status_code, json.loads(response.body)


def test_http_route_on_prod_wiring_all_sample_modes(prod):
    settings, fleet_key, http, parts = prod
    iot = boto3.client("iot", region_name="eu-west-2")
    with api("prod", parts) as client:
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
        status, answer = post(client, body(impostor, "mydevice3"))
        assert status == 403 and answer["code"] == "invalid-signature"

        status, answer = post(client, body(fleet_key, "mydevice1"))  # too soon for a re-key: its answer is out
        assert status == 409 and answer["code"] == "provisioning-in-progress"
        assert len(iot.list_thing_principals(thingName="mydevice1")["principals"]) == 1

    registry = Container(settings).registry
    assert registry.get("mydevice1").status == "provisioned"
    assert registry.get("mydevice1").region == "eu-west-2"
    assert registry.get("mydevice3").status == "unprovisioned"
    assert iot.list_things()["things"] and "mydevice3" not in [t["thingName"] for t in iot.list_things()["things"]]


def test_prod_refuses_v1_by_default_and_one_setting_accepts_it(prod):
    settings, fleet_key, http, parts = prod
    assert PROD_ENV["GIP_ALLOW_V1"] == "false" and Settings.from_env({"GIP_STAGE": "prod"}).allow_v1 is False
    assert Settings.from_env({"GIP_STAGE": "local"}).allow_v1 is True  # the local stage and the demo show both
    with api("prod", parts) as client:
        status, answer = post(client, body(fleet_key, "mydevice1", version=1))
        assert status == 403 and answer["code"] == "v1-refused"
        assert Container(settings).registry.get("mydevice1").status == "unprovisioned"
    parts = Container(Settings.from_env({**PROD_ENV, "GIP_ALLOW_V1": "true", "GIP_FLEET_PUBLIC_KEY":
                                         str(settings.fleet_public_key), "GIP_STATE_DIR": str(settings.state_dir)}))
    with api("prod", parts) as client:
        status, answer = post(client, body(fleet_key, "mydevice1", version=1))
        assert status == 200, answer


def test_admin_cli_on_prod_lists_and_shows_dynamodb_items(prod, capsys, monkeypatch):
    settings, fleet_key, http, parts = prod
    issued = parts.provisioning.provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice4")), TOKYO_IP)
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


def iot_clients(parts, region: str) -> list:
    """Both IoT clients a container has in `region`: the ordinary one (reads), and the one without botocore's
    retries that the calls admission pays for go through."""
    return [parts.aws.client("iot", region), parts.aws.client("iot", region, retries=False)]


def _record_actions(parts, actions: set):
    """Every AWS API call the service's clients make, as IAM action names."""
    def record(event_name, **_):
        _, service, operation = event_name.split(".")[:3]
        actions.add(f"{service}:{operation}")
    for client in [parts.aws.client("dynamodb"), parts.aws.client("ssm"),
                   *(c for region in parts.settings.enabled_regions for c in iot_clients(parts, region))]:
        client.meta.events.register("before-call.*.*", record)


def _policy_actions(prefixes=("dynamodb:", "iot:", "ssm:")) -> set:
    granted = set()
    for statement in POLICY["Statement"]:
        actions = statement["Action"]
        granted.update([actions] if isinstance(actions, str) else actions)
    return {a for a in granted if a.startswith(prefixes)}


def test_policy_grants_exactly_the_actions_the_lambda_calls(prod, monkeypatch):
    """Through the function's own clients (lean models: a call missing from the policy has no method either)."""
    settings, fleet_key, http, parts = prod
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "iot-global-provisioning-prod")
    parts = Container(settings)  # a container of the function's own: lean models
    assert parts.aws.client("iot", "eu-west-2").meta.service_model.operation_names == sorted(
        a.split(":")[1] for a in iam_policy.ACTIONS if a.startswith("iot:"))
    operator_registry = DynamoDbRegistry(AwsClients(lean=False).client("dynamodb"), settings.table_name,
                                         executor=parts.pool("registry"))
    http.answers[LONDON_IP] = {"latitude": 51.5, "longitude": -0.12, "country_code": "GB"}
    http.answers[TOKYO_IP] = {"latitude": 35.7, "longitude": 139.7, "country_code": "JP"}
    actions: set = set()
    _record_actions(parts, actions)
    service = parts.provisioning

    def request(thing, csr=None):
        return ProvisioningRequest.from_body(body(fleet_key, thing, csr))

    first = service.provision(request("mydevice1"), LONDON_IP)                 # server-made key
    csr_pem = make_csr("mydevice2")[0]
    second = service.provision(request("mydevice2", csr_pem), TOKYO_IP)        # CSR
    assert (first.choice.region, second.choice.region) == ("eu-west-2", "ap-northeast-1")
    assert [ip for ip, _ in http.calls] == [LONDON_IP, TOKYO_IP]  # ipstack answered both
    assert all(query["access_key"] == ["ipstack-key"] for _, query in http.calls)  # the key came from SSM
    again = service.provision(request("mydevice2", csr_pem), TOKYO_IP)         # the answer was lost: ask again
    assert again.issued.certificate_id == second.issued.certificate_id
    # A device with its own EC key, signed request v2: its key is read from the table, its nonce recorded.
    device_key = ec.generate_private_key(ec.SECP256R1())
    seen_before = set(actions)
    operator_registry.register(["own-key-1"], {"own-key-1": device_key.public_key().public_bytes(
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
    iot = parts.aws.client("iot", "eu-west-2", retries=False)  # AttachThingPrincipal's: admission pays for it

    def fail(**_):
        raise RuntimeError("injected: attach failed")
    iot.meta.events.register("before-call.iot.AttachThingPrincipal", fail)
    with pytest.raises(Exception):
        service.provision(request("mydevice3"), LONDON_IP)
    iot.meta.events.unregister("before-call.iot.AttachThingPrincipal", fail)

    # A thing made beforehand with no certificate is adopted (CreateThing refused as AWS refuses it, then
    # ListThingPrincipals), and GET /health's registry check describes both tables.
    look = boto3.client("iot", region_name="eu-west-2")
    look.create_thing(thingName="mydevice4")
    refused = aws_iot_semantics.create_thing_as_aws_does(iot_clients(parts, "eu-west-2"), look)
    assert service.provision(request("mydevice4", make_csr("mydevice4")[0]), LONDON_IP).issued.created_thing is False
    assert refused == ["mydevice4"]
    parts.health.check()

    assert actions >= {"dynamodb:GetItem", "dynamodb:UpdateItem"}  # the nonce is written on the device's item
    actions.update(seen_before)
    assert actions == _policy_actions()
    item = boto3.client("dynamodb").get_item(TableName=settings.table_name, Key={"thing_name": {"S": "mydevice3"}})
    assert item["Item"]["prov_status"] == {"S": "unprovisioned"}


def _resources(statement) -> list:
    return statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]


def test_policy_resources_are_narrow():
    settings = Settings.from_env(PROD_ENV)
    regions = set(settings.enabled_regions)
    for statement in POLICY["Statement"]:
        if statement["Sid"] == "IotAccountLevel":  # these IoT actions take no resource ARN: bounded by region
            assert set(statement["Action"]) <= {"iot:DescribeEndpoint", "iot:CreateCertificateFromCsr",
                                                "iot:CreateKeysAndCertificate",
                                                "iot:ListCertificates", "iot:ListPrincipalThings"}
            # ListCertificates and ListPrincipalThings: the write-ahead settle's search for a certificate whose
            # id a dead attempt never recorded (README, exactly once).
            assert set(statement["Condition"]["StringEquals"]["aws:RequestedRegion"]) == regions
            continue
        resources = _resources(statement)
        assert "*" not in resources
        for arn in resources:
            assert not arn.startswith("arn:aws:iot:*")
            if arn.startswith("arn:aws:iot:"):
                assert arn.split(":")[3] in regions, arn
            if arn.startswith("arn:aws:logs:"):
                assert "/aws/lambda/" in arn, arn
    iot_regions = {arn.split(":")[3] for s in POLICY["Statement"] for arn in _resources(s)
                   if arn.startswith("arn:aws:iot:")}
    assert iot_regions == regions
    destructive = {"iot:DeleteThing", "iot:DeleteCertificate", "iot:UpdateCertificate", "iot:DetachPolicy",
                   "iot:DetachThingPrincipal"}
    for statement in POLICY["Statement"]:
        if destructive & set(statement["Action"]):
            assert all(arn.split(":")[5].startswith(("thing/", "cert/")) for arn in _resources(statement))
    policy = next(s for s in POLICY["Statement"] if "iot:CreatePolicy" in s["Action"])
    assert {arn.split(":", 5)[5] for arn in _resources(policy)} == {f"policy/{DEVICE_POLICY_NAME}"}
    registry = next(s for s in POLICY["Statement"] if s["Sid"] == "Registry")
    assert registry["Resource"].endswith(f"table/{PROD_ENV['GIP_TABLE_NAME']}")
    ssm = next(s for s in POLICY["Statement"] if s["Sid"] == "Parameters")
    assert sorted(arn.split(":parameter", 1)[1] for arn in _resources(ssm)) == sorted(
        [IPSTACK_PARAMETER, PROD_ENV["GIP_FLEET_PUBLIC_KEY_PARAMETER"]])


def test_committed_policy_is_what_the_generator_makes_from_the_stage_config():
    """Fails when .chalice/policy-prod.json is stale: run `python -m admin --stage prod policy --write`."""
    assert json.loads(iam_policy.render(Settings.for_stage("prod", environ={}))) == POLICY


def test_committed_lean_models_are_what_the_generator_makes_from_the_pinned_botocore():
    """Fails when chalicelib/adapters/botocore_models is stale (an action added, botocore upgraded): regenerate with
    `python -m admin --stage prod policy --write`."""
    generated = lean_models.generate(list(iam_policy.ACTIONS))
    committed = {str(p.relative_to(lean_models.MODELS_DIR)): p.read_text()
                 for p in lean_models.MODELS_DIR.rglob("*.json")}
    assert committed == generated


def test_policy_follows_the_enabled_regions_and_an_optional_kms_key():
    key = "arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    policy = iam_policy.policy_document(Settings.from_env({**PROD_ENV, "GIP_ENABLED_REGIONS": "eu-west-2,us-east-1",
                                                           "GIP_KMS_KEY_ARN": key}), account="111122223333")
    statements = {s["Sid"]: s for s in policy["Statement"]}
    assert statements["IpstackKeyDecrypt"] == {"Sid": "IpstackKeyDecrypt", "Effect": "Allow",
                                               "Action": ["kms:Decrypt"], "Resource": key}
    assert statements["IotThings"]["Resource"] == ["arn:aws:iot:eu-west-2:111122223333:thing/*",
                                                   "arn:aws:iot:us-east-1:111122223333:thing/*"]
    assert statements["IotAccountLevel"]["Condition"] == {
        "StringEquals": {"aws:RequestedRegion": ["eu-west-2", "us-east-1"]}}
    assert "IpstackKeyDecrypt" not in {s["Sid"] for s in POLICY["Statement"]}  # no key configured: no kms grant


def test_policy_command_prints_the_committed_policy(monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("GIP_")]:
        monkeypatch.delenv(name)
    assert admin.main(["--stage", "prod", "policy"]) == 0
    assert json.loads(capsys.readouterr().out) == POLICY


def test_endpoint_and_policy_lookups_are_once_per_container(prod):
    settings, fleet_key, http, parts = prod
    actions: list = []
    for client in (c for region in settings.enabled_regions for c in iot_clients(parts, region)):
        client.meta.events.register(
            "before-call.iot.*", lambda event_name, **_: actions.append(event_name.split(".")[2]))
    service = parts.provisioning
    for i in (1, 2, 3):
        thing = f"mydevice{i}"
        service.provision(ProvisioningRequest.from_body(body(fleet_key, thing)), "10.0.0.1")
    assert actions.count("DescribeEndpoint") == 1
    # No GetPolicy: the first AttachPolicy finds no policy (a new account), which is made then, once.
    assert actions.count("GetPolicy") == 0 and actions.count("CreatePolicy") == 1
    per_device = [a for a in actions if a not in ("DescribeEndpoint", "CreatePolicy")]
    assert sorted(per_device) == sorted(["CreateThing", "CreateKeysAndCertificate", "AttachPolicy",
                                         "AttachThingPrincipal"] * 3 + ["AttachPolicy"])


def test_admin_init_records_every_region_endpoint_so_no_container_asks_for_one(prod, monkeypatch, capsys):
    settings, fleet_key, http, parts = prod
    for name, value in PROD_ENV.items():
        monkeypatch.setenv(name, value)
    assert admin.main(["--stage", "prod", "init"]) == 0
    assert f"endpoints recorded for {len(settings.enabled_regions)} regions" in capsys.readouterr().out
    parts = Container(settings)  # a new container
    actions: list = []
    for client in (c for region in settings.enabled_regions for c in iot_clients(parts, region)):
        client.meta.events.register(
            "before-call.iot.*", lambda event_name, **_: actions.append(event_name.split(".")[2]))
    issued = parts.provisioning.provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice1")), TOKYO_IP)
    assert "DescribeEndpoint" not in actions
    assert issued.issued.endpoint.address.endswith("-ats.iot.ap-northeast-1.amazonaws.com")


def test_the_prod_stage_on_lambda_is_served(prod, monkeypatch):
    settings, fleet_key, http, parts = prod
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "iot-global-provisioning-prod")
    with api("prod", parts) as client:
        response = client.http.get("/health")
        assert response.status_code == 200 and json.loads(response.body)["stage"] == "prod"
        status, answer = post(client, body(fleet_key, "mydevice2"))
        assert status == 200, answer
