"""Renewal end to end: real mosquitto brokers, real chalice local, the real device client, as processes.

The local CA issues one-day certificates here (GIP_CERT_VALIDITY_DAYS=1), so a device with the default
--renew-before of 30 days renews by itself at start-up; the other runs pass --renew-before 0.
"""
import json
import os
import signal
import sqlite3
import stat
import threading
import time

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from admin import cli as admin
from chalicelib.adapters.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import Settings
from devstack.monitor import Monitor
from devstack.stack import LocalStack, free_port, free_port_run, mosquitto_binary
from tests.conftest import LONDON_IP, TOKYO_IP, make_csr, needs_tool
from tests.test_e2e import connect, device_files, listener, messages_by_region, run_device
from tests.test_exactly_once_e2e import _chalice_of, audit, body, certificates, prepare_state
from tests.test_renewal import renewal_body

pytestmark = needs_tool(mosquitto_binary(), "mosquitto")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("renewal-e2e-state")
    env = {"GIP_STATE_DIR": str(state), "GIP_MQTT_BASE_PORT": str(free_port_run(11)),
           "GIP_CERT_VALIDITY_DAYS": "1", "GIP_RELOCATION": "distance:1000"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = Settings.for_stage("local", str(state))
        assert admin.main(["--state-dir", str(state), "keygen"]) == 0
        assert admin.main(["--state-dir", str(state), "register", "--prefix", "renewing", "--count", "5"]) == 0
        with LocalStack(settings, free_port(), quiet=True) as running:
            yield running
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def monitor(stack):
    with Monitor(stack.files) as m:
        yield m


def records(stack):
    issuer = LocalIssuer(stack.settings.ca_dir, local_endpoints(stack.settings.enabled_regions, "localhost", 1))
    return SqliteRegistry(stack.settings.registry_path), issuer


def stored_certificate_id(stack, thing) -> str:
    return json.loads(device_files(stack, thing)[2].read_text())["certificateId"]


def test_device_renews_by_itself_near_expiry_and_connects_with_the_new_certificate(stack, monitor):
    registry, issuer = records(stack)
    first = run_device(stack, "renewing1", "-k", "--renew-before", "0", count=1)
    assert first.returncode == 0, first.stdout + first.stderr
    old = stored_certificate_id(stack, "renewing1")
    assert "=> renewing" not in first.stdout
    monitor.drain()

    again = run_device(stack, "renewing1", count=2)  # one-day certificate, --renew-before 30 (the default)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "within 30 days: renewing" in again.stdout
    new = stored_certificate_id(stack, "renewing1")
    assert new != old
    item = registry.get("renewing1")
    assert (item.certificate_id, item.previous_certificate_id, item.renewal_count) == (new, old, 1)
    assert issuer.certificate(old).status == "REVOKED" and issuer.certificate(new).status == "ACTIVE"
    regions, got = messages_by_region(monitor, "renewing1")
    assert regions == {"eu-west-2"} and len(got) == 2  # published with the new certificate
    key, cert, endpoint = device_files(stack, "renewing1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Connected once with the new certificate: the previous credentials and the pending key are gone.
    leftovers = [p.name for p in key.parent.iterdir() if p.name.startswith("renewing1.")]
    assert sorted(leftovers) == sorted([key.name, cert.name, endpoint.name])


def test_renew_from_tokyo_moves_the_device_and_it_publishes_there(stack, monitor):
    registry, issuer = records(stack)
    assert run_device(stack, "renewing2", "-k", "--key-type", "ec", "--renew-before", "0", count=0,
                      ip=LONDON_IP).returncode == 0
    old = stored_certificate_id(stack, "renewing2")
    assert registry.get("renewing2").region == "eu-west-2"
    key, cert, _ = device_files(stack, "renewing2")
    old_key, old_cert = key.with_name("london.key.pem"), cert.with_name("london.cert.pem")
    old_key.write_bytes(key.read_bytes()), old_cert.write_bytes(cert.read_bytes())  # the London identity, kept
    monitor.drain()

    moved = run_device(stack, "renewing2", "--renew", "--renew-before", "0", count=1, ip=TOKYO_IP)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "renewed (relocated): region ap-northeast-1" in moved.stdout
    item = registry.get("renewing2")
    assert item.region == "ap-northeast-1" and item.previous_region == "eu-west-2"
    assert issuer.certificate(old).status == "REVOKED"
    assert json.loads(device_files(stack, "renewing2")[2].read_text())["region"] == "ap-northeast-1"
    regions, _ = messages_by_region(monitor, "renewing2")
    assert regions == {"ap-northeast-1"}
    # The London certificate is refused by London's broker (revocation reaches the broker within 5 s).
    london, refused_at = listener(stack, "eu-west-2"), time.monotonic() + 5
    while True:
        client, ok = connect(london.port, london.ca_file, old_cert, old_key, client_id="renewing2", timeout=2)
        client.loop_stop()
        client.disconnect()
        if not ok or time.monotonic() > refused_at:
            break
        time.sleep(0.25)
    assert not ok, "the relocated device's London certificate still connects"
    old_key.unlink(), old_cert.unlink()


def test_black_box_refusals_and_lost_answer_over_http(stack):
    """What a client written from the README sees: the one 403 and the lost-answer retry."""
    assert run_device(stack, "renewing3", "-k", "--renew-before", "0", count=0).returncode == 0
    key_path = device_files(stack, "renewing3")[0]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    current = stored_certificate_id(stack, "renewing3")
    url = stack.api_url + "/device-renewal"
    headers = {"X-Forwarded-For": LONDON_IP}

    def post(body):
        response = requests.post(url, json=body, headers=headers, timeout=30)
        return response.status_code, response.content

    wrong = [renewal_body("renewing3", "0" * 64, key), renewal_body("renewing4", current, key),
             renewal_body("nobody", current, key)]
    answers = {post(body) for body in wrong}
    assert len(answers) == 1 and answers.pop()[0] == 403

    csr_pem, _ = make_csr("renewing3")
    body = renewal_body("renewing3", current, key, csr_pem)
    status, first = post(body)
    assert status == 200
    retry = renewal_body("renewing3", current, key, csr_pem)  # the answer was lost: ask again, same key
    status, again = post(retry)
    assert status == 200 and json.loads(again) == json.loads(first)
    assert json.loads(first)["previousCertificateId"] == current


# --- kill -9 in the middle of a renewal --------------------------------------------------------------------------

def _kill_mid_renewal(stack, thing: str, old: str, request, after_record: bool) -> None:
    """Send `request` from a thread and SIGKILL chalice local in the middle of the renewal: once the new certificate
    exists but before it is recorded (the registry's write lock is held), or `after_record`, before the previous
    certificate is revoked (the CA records' write lock is held, the registry's let go)."""
    settings = stack.settings
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["response"] = request()
        except requests.RequestException as exc:
            outcome["error"] = exc

    def token(db) -> tuple:
        return db.execute("SELECT renewal_token, certificate_id, pending_region FROM devices WHERE thing_name = ?",
                          (thing,)).fetchone()

    caller = threading.Thread(target=call)
    registry = sqlite3.connect(settings.registry_path, isolation_level=None, timeout=5)
    ca = sqlite3.connect(settings.ca_dir / "certificates.sqlite3", isolation_level=None, timeout=5)
    before = token(registry)[0]  # an earlier, dead renewal's token may still be there
    issued_before = len(certificates(settings.ca_dir, thing))

    def lease_taken(db) -> bool:
        """The renewal holds its lease and has written what it is about to issue (write-ahead)."""
        now_token, current, intent = token(db)
        return now_token is not None and now_token != before and current == old and intent is not None

    try:
        # The CA's records are held first, so the renewal takes its lease and then waits to issue: the test sees
        # the lease however fast or slow the machine is (a race with a busy machine otherwise).
        ca.execute("BEGIN IMMEDIATE")
        caller.start()
        deadline = time.monotonic() + 30
        while True:  # hold the registry once the renewal has its lease and its intent: it cannot record now
            if lease_taken(registry):
                registry.execute("BEGIN IMMEDIATE")
                if lease_taken(registry):
                    break
                registry.execute("ROLLBACK")
            assert caller.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.001)
        ca.execute("ROLLBACK")  # now it may issue
        while len(certificates(settings.ca_dir, thing)) == issued_before:  # the new certificate is made meanwhile
            assert time.monotonic() < deadline, "no certificate was issued while the record was held"
            time.sleep(0.005)
        if after_record:
            ca.execute("BEGIN IMMEDIATE")  # the server is waiting on the registry, not writing here
            registry.execute("ROLLBACK")  # let it record; it then waits to revoke the previous certificate
            while SqliteRegistry(settings.registry_path).get(thing).certificate_id == old:
                assert time.monotonic() < deadline, "the renewal was never recorded"
                time.sleep(0.005)
        time.sleep(0.3)  # the server is at its next write, waiting on the lock we hold
        chalice = _chalice_of(stack.processes)
        os.kill(chalice.pid, signal.SIGKILL)
        assert chalice.wait(timeout=10) == -signal.SIGKILL
    finally:
        for db in (registry, ca):
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
    caller.join(30)
    assert "error" in outcome, outcome  # the device never got an answer


def _restart(stack, settings):
    stack.stop()
    return LocalStack(settings, free_port(), quiet=True).start()


def test_kill_9_mid_renewal_is_settled_by_the_audit_and_by_the_next_request(tmp_path, monkeypatch, capsys):
    state = tmp_path / "state"
    settings, fleet_key = prepare_state(monkeypatch, state, lease_seconds=3, cut=2)
    stack = LocalStack(settings, free_port(), quiet=True).start()
    registry = SqliteRegistry(settings.registry_path)
    try:
        csr_pem, key = make_csr("cut1", ec.generate_private_key(ec.SECP256R1()))
        provisioned = requests.post(stack.api_url + "/device-provisioning", json=body(fleet_key, "cut1", csr_pem),
                                    headers={"X-Forwarded-For": LONDON_IP}, timeout=30).json()
        old = provisioned["certificateId"]
        new_csr, _ = make_csr("cut1")

        def renew():
            return requests.post(stack.api_url + "/device-renewal", json=renewal_body("cut1", old, key, new_csr),
                                 headers={"X-Forwarded-For": LONDON_IP}, timeout=60)

        # 1. Killed after the new certificate exists, before it is recorded (the registry is held).
        _kill_mid_renewal(stack, "cut1", old, renew, after_record=False)
        [orphan] = [c for c in certificates(settings.ca_dir, "cut1") if c["certificate_id"] != old]
        assert orphan["status"] == "ACTIVE" and registry.get("cut1").certificate_id == old
        stack = _restart(stack, settings)
        time.sleep(3.5)  # the dead renewal's lease ends
        code, found = audit(state, capsys)  # the dead renewal's record points at it: a stuck renewal, no orphan
        assert code == 1 and found["orphan_certificates"] == []
        assert [(s["thing_name"], s["certificates"], s.get("renewal")) for s in found["stuck_claims"]] == [
            ("cut1", [orphan["certificate_id"]], True)]
        assert audit(state, capsys, "--fix")[0] == 0
        assert audit(state, capsys)[0] == 0
        assert {c["certificate_id"]: c["status"] for c in certificates(settings.ca_dir, "cut1")} == {
            old: "ACTIVE", orphan["certificate_id"]: "REVOKED"}

        # 2. Killed after the record, before the previous certificate is revoked (the CA's records are held).
        _kill_mid_renewal(stack, "cut1", old, renew, after_record=True)
        item = registry.get("cut1")
        current = item.certificate_id
        assert item.retire_pending and item.previous_certificate_id == old
        assert certificates(settings.ca_dir, "cut1")[0]["status"] == "ACTIVE"  # two active for now ...
        code, found = audit(state, capsys)
        assert code == 1 and found["unfinished_renewals"][0]["previous_certificate_id"] == old
        stack = _restart(stack, settings)
        # ... until the device, which never got its answer, asks again: the same certificate, and the rest done.
        response = renew()
        assert response.status_code == 200 and response.json()["certificateId"] == current
        assert {c["certificate_id"]: c["status"] for c in certificates(settings.ca_dir, "cut1")} == {
            old: "REVOKED", orphan["certificate_id"]: "REVOKED", current: "ACTIVE"}
        assert audit(state, capsys)[0] == 0
        assert not registry.get("cut1").retire_pending
    finally:
        stack.stop()
