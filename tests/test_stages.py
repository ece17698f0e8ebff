"""Chalice's stages: `dev` (Chalice's default) behaves as local for `chalice local`, and a function deployed from
any stage but prod refuses to run the local backends on Lambda."""
import json

import pytest
from chalice.test import Client

from app import app
from chalicelib import wiring
from chalicelib.config import PROJECT_DIR
from chalicelib.registry.sqlite import SqliteRegistry
from tests.conftest import LONDON_IP, TOKYO_IP

STAGES = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]


def test_chalices_default_stage_is_defined_and_is_the_local_stage():
    assert STAGES["dev"]["environment_variables"] == STAGES["local"]["environment_variables"]


@pytest.mark.parametrize("chalice_stage", ["dev", "local"])
def test_the_default_stage_serves_the_local_stage_and_trusts_forwarded_for(stage, chalice_stage):
    wiring.reset()
    with Client(app, stage_name=chalice_stage, project_dir=str(PROJECT_DIR)) as client:
        assert json.loads(client.http.get("/health").body)["stage"] == "local"
        for thing, ip, region in (("mydevice1", LONDON_IP, "eu-west-2"), ("mydevice2", TOKYO_IP, "ap-northeast-1")):
            response = client.http.post("/device-provisioning", body=json.dumps(stage.body(thing)),
                                        headers={"Content-Type": "application/json", "X-Forwarded-For": ip})
            answer = json.loads(response.body)
            assert (response.status_code, answer["region"], answer["reason"]) == (200, region, "nearest"), answer


@pytest.mark.parametrize("chalice_stage", ["dev", "local"])
def test_a_non_prod_stage_on_lambda_refuses_every_request(stage, monkeypatch, chalice_stage):
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", f"iot-global-provisioning-{chalice_stage}")
    wiring.reset()
    before = list(SqliteRegistry(stage.state_dir / "registry.sqlite3").list())
    with Client(app, stage_name=chalice_stage, project_dir=str(PROJECT_DIR)) as client:
        answers = [client.http.get("/health"),
                   client.http.post("/device-provisioning", body=json.dumps(stage.body("mydevice1")),
                                    headers={"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP})]
    for response in answers:
        body = json.loads(response.body)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert (body["status"], body["code"]) == ("error", "stage-not-deployable")
        assert "--stage prod" in body["message"]
    assert list(SqliteRegistry(stage.state_dir / "registry.sqlite3").list()) == before
