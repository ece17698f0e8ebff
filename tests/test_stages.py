"""Chalice's stages: `dev` (Chalice's default) behaves as local for `chalice local`, and a function deployed from
any stage but prod refuses to run the local backends on Lambda."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization

from admin import cli as admin
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings
from devstack.stack import free_port
from tests.conftest import LONDON_IP, TOKYO_IP, api, sign_v1
from tests.process_check import stop_group

STAGES = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]


def test_chalices_default_stage_is_defined_and_is_the_local_stage():
    assert STAGES["dev"]["environment_variables"] == STAGES["local"]["environment_variables"]


@pytest.mark.parametrize("chalice_stage", ["dev", "local"])
def test_the_default_stage_serves_the_local_stage_and_trusts_forwarded_for(stage, chalice_stage):
    with api(chalice_stage) as client:
        assert json.loads(client.http.get("/health").body)["stage"] == "local"
        for thing, ip, region in (("mydevice1", LONDON_IP, "eu-west-2"), ("mydevice2", TOKYO_IP, "ap-northeast-1")):
            response = client.http.post("/device-provisioning", body=json.dumps(stage.body(thing)),
                                        headers={"Content-Type": "application/json", "X-Forwarded-For": ip})
            answer = json.loads(response.body)
            assert (response.status_code, answer["region"], answer["reason"]) == (200, region, "nearest"), answer


@pytest.mark.parametrize("chalice_stage", ["dev", "local"])
def test_a_non_prod_stage_on_lambda_refuses_every_request(stage, monkeypatch, chalice_stage):
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", f"iot-global-provisioning-{chalice_stage}")
    before = list(SqliteRegistry(stage.state_dir / "registry.sqlite3").list())
    with api(chalice_stage) as client:
        answers = [client.http.get("/health"),
                   client.http.post("/device-provisioning", body=json.dumps(stage.body("mydevice1")),
                                    headers={"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP})]
    for response in answers:
        body = json.loads(response.body)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert (body["status"], body["code"]) == ("error", "stage-not-deployable")
        assert "--stage prod" in body["message"]
    assert list(SqliteRegistry(stage.state_dir / "registry.sqlite3").list()) == before


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def test_plain_chalice_local_serves_the_local_stage_and_keeps_serving(tmp_path, monkeypatch):
    """What a Chalice user types: `chalice local`, stage dev, autoreload on. The reloader restarts the server
    on any change under the project, so the state (SQLite, CA files) must be elsewhere by default."""
    monkeypatch.delenv("GIP_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert admin.main(["keygen"]) == 0 and admin.main(["register", "mydevice1", "mydevice2"]) == 0
    state = tmp_path / "xdg" / "iot-global-provisioning" / "local"
    fleet_key = serialization.load_pem_private_key((state / "keys" / FLEET_PRIVATE_KEY_NAME).read_bytes(), None)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIP_")}
    # A session of its own: the reloader's worker outlives the reloader, so both are stopped as one group.
    chalice = subprocess.Popen([str(Path(sys.executable).with_name("chalice")), "local", "--port", str(port)],
                               cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/health", timeout=2)
                break
            except requests.ConnectionError:
                assert chalice.poll() is None and time.monotonic() < deadline, "chalice local did not start"
                time.sleep(0.2)
        [worker] = _children(chalice.pid)  # the reloader's parent runs the server in one child
        session = requests.Session()
        for thing, ip, region in (("mydevice1", LONDON_IP, "eu-west-2"), ("mydevice2", TOKYO_IP, "ap-northeast-1")):
            response = session.post(f"{url}/device-provisioning", json={"thing-name": thing,
                                    "thing-name-sig": sign_v1(fleet_key, thing)}, headers={"X-Forwarded-For": ip})
            assert (response.status_code, response.json()["region"]) == (200, region), response.text
        time.sleep(3)  # the reloader polls the project tree every second: give it time to see a change
        assert session.get(f"{url}/health", timeout=5).json()["stage"] == "local"
        assert _children(chalice.pid) == {worker}, "chalice local restarted its server"
        assert SqliteRegistry(state / "registry.sqlite3").get("mydevice2").status == "provisioned"
    finally:
        stop_group(chalice)


def test_the_cli_for_stage_dev_sees_what_chalice_local_for_dev_sees(tmp_path, monkeypatch):
    monkeypatch.delenv("GIP_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert Settings.for_stage("dev", None) == Settings.for_stage("local", None)
    assert Settings.for_stage("dev", None).state_dir == tmp_path / "iot-global-provisioning" / "local"
