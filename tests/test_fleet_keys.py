"""The prod stage's fleet public key(s) in SSM Parameter Store: written by `admin --stage prod keygen`, read once
per container, re-read at most once a minute, so a deploy needs no key file and the key rotates without one."""
import json

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from moto import mock_aws

from admin import cli as admin
from chalicelib.adapters.fleet_keys import SsmFleetKeyVerifier, rotated_value
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings
from chalicelib.container import Container
from chalicelib.domain.errors import ConfigError
from chalicelib.domain.signatures import v1_text
from tests.conftest import api, sign_v1
from tests.test_security import v2_body

PROD_ENV = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]["environment_variables"]
PARAMETER = PROD_ENV["GIP_FLEET_PUBLIC_KEY_PARAMETER"]


@pytest.fixture
def aws(tmp_path, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                        "XDG_STATE_HOME": str(tmp_path / "xdg")}.items():
        monkeypatch.setenv(name, value)
    for name in ("GIP_STATE_DIR", "GIP_FLEET_PUBLIC_KEY"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        calls = []
        ssm = boto3.client("ssm")
        ssm.meta.events.register("before-call.ssm.GetParameter", lambda **_: calls.append("GetParameter"))
        yield ssm, calls


def private_key(tmp_path):
    path = tmp_path / "xdg" / "iot-global-provisioning" / "prod" / "keys" / FLEET_PRIVATE_KEY_NAME
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_keygen_writes_the_public_key_to_the_parameter_and_the_private_key_outside_the_project(aws, tmp_path, capsys):
    ssm, _ = aws
    assert admin.main(["--stage", "prod", "keygen"]) == 0
    out = capsys.readouterr().out
    assert f"SSM parameter {PARAMETER}" in out
    [key] = SsmFleetKeyVerifier(ssm, PARAMETER).keys
    assert key.public_numbers() == private_key(tmp_path).public_key().public_numbers()
    assert admin.main(["--stage", "prod", "keygen"]) == 2  # never replaced by accident
    assert "--force" in capsys.readouterr().err


def test_a_prod_function_verifies_with_the_parameter_and_rotation_needs_no_redeploy(aws, tmp_path, capsys):
    ssm, calls = aws
    assert admin.main(["--stage", "prod", "keygen"]) == 0
    first = private_key(tmp_path)
    clock = Clock()
    verifier = SsmFleetKeyVerifier(ssm, PARAMETER, clock=clock)
    assert verifier.verifies(v1_text("mydevice1"), _sig(first, "mydevice1"))
    assert calls == ["GetParameter"]  # once per container

    assert admin.main(["--stage", "prod", "keygen", "--force"]) == 0  # rotate
    second = private_key(tmp_path)
    calls.clear()
    assert not verifier.verifies(v1_text("mydevice1"), _sig(second, "mydevice1"))  # read a moment ago: not again
    clock.now += 61
    assert verifier.verifies(v1_text("mydevice1"), _sig(second, "mydevice1"))  # the new key, no redeploy
    assert verifier.verifies(v1_text("mydevice1"), _sig(first, "mydevice1"))  # the previous one, still
    assert calls == ["GetParameter"]  # one re-read, when a signature matched none of the known keys


def test_bad_signatures_cost_at_most_one_read_a_minute(aws, tmp_path):
    ssm, calls = aws
    ssm.put_parameter(Name=PARAMETER, Value=rotated_value(new_key().public_key(), None), Type="String")
    clock = Clock()
    verifier = SsmFleetKeyVerifier(ssm, PARAMETER, clock=clock)
    stranger = new_key()
    for _ in range(50):
        assert not verifier.verifies(v1_text("mydevice1"), _sig(stranger, "mydevice1"))
        clock.now += 1
    assert len(calls) == 1
    clock.now += 60
    assert not verifier.verifies(v1_text("mydevice1"), _sig(stranger, "mydevice1"))
    assert len(calls) == 2


def test_a_missing_parameter_is_a_misconfiguration_until_keygen_runs(aws, tmp_path):
    ssm, calls = aws
    clock = Clock()
    verifier = SsmFleetKeyVerifier(ssm, PARAMETER, clock=clock)
    for _ in range(3):
        with pytest.raises(ConfigError, match="admin --stage prod keygen"):
            verifier.verifies(b"x", b"y")
    assert len(calls) == 1
    key = new_key()
    ssm.put_parameter(Name=PARAMETER, Value=rotated_value(key.public_key(), None), Type="String")
    clock.now += 61
    assert verifier.verifies(v1_text("mydevice1"), _sig(key, "mydevice1"))


def test_rotation_keeps_one_previous_key():
    keys = [new_key().public_key() for _ in range(3)]
    value = None
    for key in keys:
        value = rotated_value(key, value)
    pems = [k.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            for k in keys]
    assert value == pems[2] + pems[1]


def test_the_prod_http_route_answers_503_until_keygen_then_provisions(aws, tmp_path):
    ssm, _ = aws
    settings = Settings.from_env({**PROD_ENV, "GIP_IPSTACK_KEY_PARAMETER": ""})
    assert settings.fleet_public_key_parameter == PARAMETER
    Container(settings).registry.create()
    Container(settings).registry.register(["mydevice1"])
    def post(client):
        key = private_key(tmp_path) if (tmp_path / "xdg").exists() else new_key()
        response = client.http.post("/device-provisioning", headers={"Content-Type": "application/json"},
                                    body=json.dumps(v2_body(key, "mydevice1")))  # prod accepts v2 only
        return response.status_code, json.loads(response.body)
    with api("prod", Container(settings)) as client:
        status, body = post(client)
        assert (status, body["code"]) == (503, "service-misconfigured")
    assert admin.main(["--stage", "prod", "keygen"]) == 0
    with api("prod", Container(settings)) as client:  # a new container
        status, body = post(client)
        assert status == 200, body


def _sig(key, thing):
    import base64
    return base64.b64decode(sign_v1(key, thing))
