"""Crash safety of provisioning with a REAL `kill -9` (issue 16): a child process serves the app (chalice local's
server) and stops dead at a step boundary through the checkpoint injected into the service (tests/crash_child.py);
the parent kills it there, waits out the (short) lease, retries from another child and checks that

- a retry with the same CSR gets the SAME certificate the dead attempt issued (none issued twice),
- a retry without a CSR gets a new certificate and the dead attempt's one is revoked; after "committed" too, for a
  device provisioned with a server-made key (a re-key, within GIP_REKEY_WINDOW_SECONDS), while a device
  provisioned with its own key (CSR) is still refused without one,
- a re-key killed in the middle leaves one active certificate once the next request settles it,
- `admin audit` reports the dead attempt's certificate as in flight (with its age) while the lease runs, and
  is clean (exit 0, no finding) once the retry settled it.

Both backends: SQLite + local CA in the children; DynamoDB + AWS IoT under moto's server mode (one
ThreadedMotoServer on a free loopback port that every child talks to through AWS_ENDPOINT_URL).
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest
import requests

from admin import cli as admin
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR
from devstack.stack import free_port
from tests.conftest import LONDON_IP, make_csr, sign_v1, v2_body

LEASE = 3  # seconds: short, so that the suite waits little; injected through the settings
# The issuance sequence's stages (services/saga.py): after the claim and its write-ahead intent, after the issuer
# answered (nothing on the record names what it made: the next holder asks the issuer), after the commit.
BOUNDARIES = ("claimed", "issued", "committed")
REKEY_BOUNDARIES = ("renewal-claimed", "renewal-issued", "renewal-committed")  # a re-key is a renewal in place
HEADERS = {"X-Forwarded-For": LONDON_IP}  # every device is placed in eu-west-2
REGION = "eu-west-2"


@dataclass
class Child:
    process: subprocess.Popen
    url: str
    marker: Path

    def post(self, payload: dict, timeout: float = 60) -> tuple[int, dict, dict]:
        response = requests.post(f"{self.url}/device-provisioning", json=payload, headers=HEADERS, timeout=timeout)
        return response.status_code, response.json(), dict(response.headers)


@dataclass
class Stage:
    backend: str
    state: Path
    env: dict
    fleet_key: object
    children: list = field(default_factory=list)
    healthy: Child | None = None
    iot: object = None

    def start(self, pause_at: str = "") -> Child:
        port = free_port()
        marker = self.state / f"paused-{port}"
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_child", "--port", str(port), "--pause-at", pause_at,
             "--marker", str(marker)], cwd=PROJECT_DIR, env=self.env, stdout=subprocess.DEVNULL,
            stderr=open(self.state / f"child-{port}.log", "wb"))
        self.children.append(process)
        child = Child(process, f"http://127.0.0.1:{port}", marker)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (self.state / f"child-{port}.log").read_text()[-3000:]
            try:
                if requests.get(f"{child.url}/health", timeout=5).status_code in (200, 503):
                    return child
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the child never answered"
            time.sleep(0.05)

    def body(self, thing: str, csr_pem: str | None = None, version: int = 1) -> dict:
        if version == 2:  # a re-key's request: v1 is never re-keyed
            return v2_body(self.fleet_key, thing, csr_pem)
        out = {"thing-name": thing, "thing-name-sig": sign_v1(self.fleet_key, thing)}
        if csr_pem:
            out["CSR"] = csr_pem
        return out

    def certificates(self, thing: str) -> dict[str, str]:
        """certificate id -> status of every certificate ever issued for `thing`, read behind the service."""
        if self.backend == "sqlite":
            path = self.state / "ca" / "certificates.sqlite3"
            if not path.exists():  # nothing issued yet
                return {}
            with closing(sqlite3.connect(path, timeout=10)) as db:
                return dict(db.execute("SELECT certificate_id, status FROM certificates WHERE thing_name = ?",
                                       (thing,)).fetchall())
        found = {}
        for cert in self.iot.list_certificates()["certificates"]:
            pem = self.iot.describe_certificate(certificateId=cert["certificateId"])["certificateDescription"]
            # moto signs a CSR with the CSR's subject; a server-made key's certificate is known by its thing.
            if (f"CN={thing}" in _subject(pem["certificatePem"])
                    or thing in self.iot.list_principal_things(principal=cert["certificateArn"])["things"]):
                found[cert["certificateId"]] = cert["status"]
        return found

    def audit(self, capsys) -> tuple[int, dict]:
        capsys.readouterr()
        code = admin.main(["--state-dir", str(self.state), "audit", "--json"])
        return code, json.loads(capsys.readouterr().out)


def _subject(pem: str) -> str:
    from cryptography import x509
    return x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()


def _environment(state: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIP_", "AWS_"))}
    env.update({"GIP_STAGE": "local", "GIP_STATE_DIR": str(state), "GIP_CLAIM_LEASE_SECONDS": str(LEASE),
                "GIP_TRUST_FORWARDED_FOR": "true", "GIP_ENABLED_REGIONS": REGION, "GIP_DEFAULT_REGION": REGION,
                "GIP_IPSTACK_KEY_PARAMETER": "", "POWERTOOLS_LOG_LEVEL": "WARNING", **extra})
    return env


@pytest.fixture(scope="module", params=["sqlite", "dynamodb"])
def stage(request, tmp_path_factory):
    state = tmp_path_factory.mktemp(f"crash-{request.param}")
    extra: dict = {}
    server = None
    if request.param == "dynamodb":
        from moto.server import ThreadedMotoServer
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        extra = {"GIP_REGISTRY": "dynamodb", "GIP_ISSUER": "aws-iot", "GIP_TABLE_NAME": "crash-test",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                 "AWS_CONFIG_FILE": str(state / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(state / "none")}
    env = _environment(state, extra)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in [n for n in os.environ if n.startswith(("GIP_", "AWS_"))]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith(("GIP_", "AWS_")):
                monkeypatch.setenv(name, value)
        assert admin.main(["--state-dir", str(state), "keygen"]) == 0
        assert admin.main(["--state-dir", str(state), "init"]) == 0
        names = [f"{b}-{r}-{i}" for b in BOUNDARIES for r in ("samecsr", "nocsr") for i in (1, 2)]
        names += [f"rekey-{b}" for b in REKEY_BOUNDARIES]
        assert admin.main(["--state-dir", str(state), "register", *names, "lease-1"]) == 0
        from cryptography.hazmat.primitives import serialization
        fleet_key = serialization.load_pem_private_key(
            (state / "keys" / FLEET_PRIVATE_KEY_NAME).read_bytes(), password=None)
        s = Stage(request.param, state, env, fleet_key,
                  iot=boto3.client("iot", region_name=REGION, endpoint_url=extra["AWS_ENDPOINT_URL"])
                  if server else None)
        try:
            s.healthy = s.start()
            yield s
        finally:
            for process in s.children:
                if process.poll() is None:
                    process.kill()
                process.wait(10)
            if server is not None:
                server.stop()


def kill_at(stage: Stage, boundary: str, payload: dict, send: Callable[[Any, dict], Any] | None = None) -> float:
    """Send `payload` to a child that stops at `boundary` (by `send(child, payload)`; a provisioning request
    unless told), then kill -9 it there. Returns when it was killed."""
    victim = stage.start(pause_at=boundary)
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["answer"] = send(victim, payload) if send else victim.post(payload)
        except requests.RequestException as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 60
    while not victim.marker.exists():
        assert victim.process.poll() is None and time.monotonic() < deadline, outcome
        time.sleep(0.01)
    assert victim.marker.read_text().split()[:2] == [boundary, payload["thing-name"]]
    os.kill(victim.process.pid, signal.SIGKILL)
    killed = time.time()
    assert victim.process.wait(10) == -signal.SIGKILL
    caller.join(30)
    assert "error" in outcome, outcome  # the device never got an answer
    return killed


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_retry_with_the_same_csr_after_a_kill_gets_the_same_certificate(stage, boundary, capsys):
    thing = f"{boundary}-samecsr-1"
    csr_pem, _ = make_csr(thing)
    killed = kill_at(stage, boundary, stage.body(thing, csr_pem))
    left = stage.certificates(thing)
    assert list(left.values()) == ([] if boundary == "claimed" else ["ACTIVE"])

    if boundary != "committed":
        # While the lease runs the dead attempt is work in flight: reported with its age, not a finding.
        status, payload, headers = stage.healthy.post(stage.body(thing, csr_pem))
        assert (status, payload["code"]) == (409, "provisioning-in-progress"), payload
        assert int(headers["Retry-After"]) in range(1, LEASE + 2)
        assert time.time() < killed + LEASE - 0.5, "too late to see the lease running"
        code, found = stage.audit(capsys)  # it looks at the registry first, while the lease still runs
        assert code == 0, found
        [flight] = [item for item in found["in_flight"] if item["thing_name"] == thing]
        assert flight["age_seconds"] >= 0 and flight["certificates"] == ([] if boundary == "claimed" else list(left))
        assert found["orphan_certificates"] == [] and found["stuck_claims"] == []
        time.sleep(max(0.0, killed + LEASE + 0.3 - time.time()))

    status, payload, _ = stage.healthy.post(stage.body(thing, csr_pem))
    assert status == 200, payload
    after = stage.certificates(thing)
    if boundary == "claimed":
        assert after == {payload["certificateId"]: "ACTIVE"}
    else:  # the SAME certificate: none issued twice
        assert after == left == {payload["certificateId"]: "ACTIVE"}
    code, found = stage.audit(capsys)
    assert code == 0 and not any(found.values()), found


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_retry_without_csr_after_a_kill_gets_a_new_certificate_and_the_old_one_is_revoked(stage, boundary,
                                                                                               capsys):
    thing = f"{boundary}-nocsr-1"
    csr_pem, _ = make_csr(thing)
    # After "committed" the device is provisioned: only a server-made key (no CSR) lost with the answer is re-keyed.
    killed = kill_at(stage, boundary, stage.body(thing, None if boundary == "committed" else csr_pem))
    left = stage.certificates(thing)
    time.sleep(max(0.0, killed + LEASE + 0.3 - time.time()))

    status, payload, _ = stage.healthy.post(stage.body(thing, version=2))
    after = stage.certificates(thing)
    assert status == 200, payload
    assert "PrivateKey" in payload and payload["certificateId"] not in left
    assert payload["reason"] == ("rekeyed" if boundary == "committed" else "nearest")
    assert after == {**{cert: "REVOKED" for cert in left}, payload["certificateId"]: "ACTIVE"} or (
        stage.backend == "dynamodb" and after == {payload["certificateId"]: "ACTIVE"})  # AWS deletes revoked
    code, found = stage.audit(capsys)
    assert code == 0 and not any(found.values()), found


def test_a_device_provisioned_with_its_own_key_is_not_rekeyed_without_a_csr(stage, capsys):
    """Its key never left the device: a lost answer is recovered with the same CSR, never by a new server key."""
    thing = "committed-nocsr-2"
    csr_pem, _ = make_csr(thing)
    kill_at(stage, "committed", stage.body(thing, csr_pem))
    left = stage.certificates(thing)
    status, payload, _ = stage.healthy.post(stage.body(thing, version=2))
    assert (status, payload["code"]) == (409, "already-provisioned"), payload
    assert "operator must reset" in payload["message"]
    assert stage.certificates(thing) == left and list(left.values()) == ["ACTIVE"]
    status, payload, _ = stage.healthy.post(stage.body(thing, csr_pem))
    assert (status, payload["certificateId"], payload["reason"]) == (200, *left, "previous"), payload


@pytest.mark.parametrize("boundary", REKEY_BOUNDARIES)
def test_a_rekey_killed_in_the_middle_leaves_one_active_certificate(stage, boundary, capsys):
    """The re-key itself dies (after its lease, after its certificate is issued, after the new certificate is
    current but before the old one is revoked): the device's next retry settles it, one certificate stays active."""
    thing = f"rekey-{boundary}"
    status, first, _ = stage.healthy.post(stage.body(thing, version=2))
    assert status == 200, first
    status, payload, headers = stage.healthy.post(stage.body(thing, version=2))  # its answer may be on the way
    assert (status, payload["code"]) == (409, "provisioning-in-progress") and int(headers["Retry-After"]) <= LEASE + 1
    time.sleep(LEASE + 1)
    killed = kill_at(stage, boundary, stage.body(thing, version=2))
    time.sleep(max(0.0, killed + LEASE + 0.3 - time.time()))
    status, payload, _ = stage.healthy.post(stage.body(thing, version=2))
    assert (status, payload["reason"]) == (200, "rekeyed"), payload
    after = stage.certificates(thing)
    assert [cert for cert, state in after.items() if state == "ACTIVE"] == [payload["certificateId"]], after
    assert first["certificateId"] != payload["certificateId"]
    code, found = stage.audit(capsys)
    assert code == 0 and not any(found.values()), found


def test_audit_fix_settles_a_dead_attempt_for_the_devices_key_without_a_retry(stage, capsys):
    """Nobody retries: after the lease the audit finds the stuck claim and its certificate (exit 1), --fix
    finalizes with it (the device's own key), and the device's retry then gets that very certificate."""
    thing = "issued-samecsr-2"
    csr_pem, _ = make_csr(thing)
    killed = kill_at(stage, "issued", stage.body(thing, csr_pem))
    [left] = stage.certificates(thing)
    time.sleep(max(0.0, killed + LEASE + 0.3 - time.time()))
    code, found = stage.audit(capsys)
    assert code == 1
    assert [(s["thing_name"], s["certificates"], s["key"]) for s in found["stuck_claims"]] == [
        (thing, [left], "device")]
    assert admin.main(["--state-dir", str(stage.state), "audit", "--fix"]) == 0
    assert stage.audit(capsys)[0] == 0
    status, payload, _ = stage.healthy.post(stage.body(thing, csr_pem))
    assert (status, payload["certificateId"], payload["reason"]) == (200, left, "previous"), payload
    assert stage.certificates(thing) == {left: "ACTIVE"}
