"""Crash safety of renewal with a REAL `kill -9` (issue 16): as tests/test_crash_recovery.py does for provisioning,
a child process serves the app and stops dead at a renewal step boundary (renewal-claimed, -issued, -committed)
through the checkpoint injected into the renewal service (tests/crash_child.py); the parent kills it there, and then
checks that

- while the renewal lease runs, a retry gets 409 with Retry-After and `admin audit` shows the dead renewal's work
  in flight (with its age), not as a finding;
- after the lease, a retry with the same CSR gets the SAME certificate the dead renewal issued (none issued twice),
  and the previous certificate is retired;
- after the lease, a retry with another new key gets a new certificate and the dead renewal's one is revoked;
- `admin audit` then finds nothing, and the device never holds two active certificates.

Both backends: SQLite + local CA in the children; DynamoDB + AWS IoT under moto's server mode.
"""
import os
import time

import boto3
import pytest
import requests

from admin import cli as admin
from chalicelib.config import FLEET_PRIVATE_KEY_NAME
from devstack.stack import free_port
from tests.conftest import make_csr
from tests.test_crash_recovery import HEADERS, LEASE, REGION, Stage, _environment, kill_at
from tests.test_renewal import renewal_body

BOUNDARIES = ("renewal-claimed", "renewal-issued", "renewal-committed")
RETRIES = ("samecsr", "otherkey")


@pytest.fixture(scope="module", params=["sqlite", "dynamodb"])
def stage(request, tmp_path_factory):
    state = tmp_path_factory.mktemp(f"renewal-crash-{request.param}")
    extra: dict = {}
    server = None
    if request.param == "dynamodb":
        from moto.server import ThreadedMotoServer
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        # moto's backends are one per process, whichever server serves them: start from nothing (another module's
        # certificates would be orphans to this one's audit), and leave nothing for the next module.
        requests.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10).raise_for_status()
        extra = {"GIP_REGISTRY": "dynamodb", "GIP_ISSUER": "aws-iot", "GIP_TABLE_NAME": "renewal-crash",
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
        names = [f"{b}-{r}" for b in BOUNDARIES for r in RETRIES] + ["audit-only"]
        assert admin.main(["--state-dir", str(state), "register", *names]) == 0
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
                requests.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10)
                server.stop()


def renew(url: str, body: dict, timeout: float = 60) -> tuple[int, dict, dict]:
    response = requests.post(f"{url}/device-renewal", json=body, headers=HEADERS, timeout=timeout)
    return response.status_code, response.json(), dict(response.headers)


def provisioned(stage: Stage, thing: str) -> tuple[str, object]:
    """Provision `thing` through the healthy child; returns its certificate id and key."""
    csr_pem, key = make_csr(thing)
    status, payload, _ = stage.healthy.post(stage.body(thing, csr_pem))
    assert status == 200, payload
    return payload["certificateId"], key


def kill_renewal_at(stage: Stage, boundary: str, body: dict) -> float:
    """kill_at for a renewal: the child stops at `boundary` while renewing, and is killed there."""
    return kill_at(stage, boundary, body, send=lambda victim, payload: renew(victim.url, payload))


def active(stage: Stage, thing: str) -> set[str]:
    return {cert for cert, status in stage.certificates(thing).items() if status == "ACTIVE"}


def assert_retired(stage: Stage, thing: str, certificates: set[str]) -> None:
    """Revoked (the local CA keeps them REVOKED; AWS IoT's retirement deletes them)."""
    left = stage.certificates(thing)
    assert all(left.get(cert, "REVOKED") == "REVOKED" for cert in certificates), left


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_renewal_retried_with_the_same_csr_after_a_kill_gets_the_same_certificate(stage, boundary, capsys):
    thing = f"{boundary}-samecsr"
    current, key = provisioned(stage, thing)
    csr_pem, _ = make_csr(thing)
    killed = kill_renewal_at(stage, boundary, renewal_body(thing, current, key, csr_pem))
    left = active(stage, thing) - {current}  # what the dead renewal issued
    assert len(left) == (0 if boundary == "renewal-claimed" else 1)

    if boundary != "renewal-committed":
        # While the lease runs the dead renewal is work in flight: 409 for the device, not a finding for the audit.
        status, payload, headers = renew(stage.healthy.url, renewal_body(thing, current, key, csr_pem))
        assert (status, payload["code"]) == (409, "renewal-in-progress"), payload
        assert int(headers["Retry-After"]) in range(1, LEASE + 2)
        assert time.time() < killed + LEASE - 0.5, "too late to see the lease running"
        code, found = stage.audit(capsys)  # it reads the registry first, while the lease still runs
        assert code == 0, found
        [flight] = [item for item in found["in_flight"] if item["thing_name"] == thing]
        assert flight["renewal"] is True and flight["age_seconds"] >= 0
        assert flight["certificates"] == sorted(left)
        assert found["orphan_certificates"] == [] and found["stuck_claims"] == []
        time.sleep(max(0.0, killed + LEASE + 0.3 - time.time()))

    status, payload, _ = renew(stage.healthy.url, renewal_body(thing, current, key, csr_pem))
    assert status == 200, payload
    assert payload["previousCertificateId"] == current and "PrivateKey" not in payload
    if boundary == "renewal-claimed":
        assert payload["certificateId"] != current
    else:  # the SAME certificate: none issued twice
        assert {payload["certificateId"]} == left
    assert active(stage, thing) == {payload["certificateId"]}  # the previous one retired as usual
    assert_retired(stage, thing, {current})
    code, found = stage.audit(capsys)
    assert code == 0 and not any(found.values()), found


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_renewal_retried_with_another_key_after_a_kill_gets_a_new_certificate(stage, boundary, capsys):
    thing = f"{boundary}-otherkey"
    current, key = provisioned(stage, thing)
    killed = kill_renewal_at(stage, boundary, renewal_body(thing, current, key, make_csr(thing)[0]))
    left = active(stage, thing) - {current}
    time.sleep(max(0.0, killed + LEASE + 0.3 - time.time()))

    status, payload, _ = renew(stage.healthy.url, renewal_body(thing, current, key, make_csr(thing)[0]))
    assert status == 200, payload
    assert payload["certificateId"] not in left | {current} and payload["previousCertificateId"] == current
    assert active(stage, thing) == {payload["certificateId"]}  # never two: the dead renewal's is revoked
    assert_retired(stage, thing, left | {current})
    code, found = stage.audit(capsys)
    assert code == 0 and not any(found.values()), found


def test_audit_fix_settles_a_dead_renewal_without_a_retry_and_the_device_keeps_its_certificate(stage, capsys):
    """Nobody retries: after the lease the audit finds the dead renewal and its certificate (exit 1); --fix
    revokes that certificate and gives the lease back. The device's current certificate stays and renews."""
    thing = "audit-only"
    current, key = provisioned(stage, thing)
    killed = kill_renewal_at(stage, "renewal-issued", renewal_body(thing, current, key, make_csr(thing)[0]))
    [left] = active(stage, thing) - {current}
    time.sleep(max(0.0, killed + LEASE + 0.3 - time.time()))
    code, found = stage.audit(capsys)
    assert code == 1
    assert [(s["thing_name"], s["certificates"], s["key"], s["renewal"]) for s in found["stuck_claims"]] == [
        (thing, [left], "device", True)]
    assert admin.main(["--state-dir", str(stage.state), "audit", "--fix"]) == 0
    assert stage.audit(capsys)[0] == 0
    assert active(stage, thing) == {current}
    assert_retired(stage, thing, {left})
    status, payload, _ = renew(stage.healthy.url, renewal_body(thing, current, key, make_csr(thing)[0]))
    assert status == 200 and payload["certificateId"] not in (left, current), payload
    assert active(stage, thing) == {payload["certificateId"]}
