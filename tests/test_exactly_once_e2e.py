"""Exactly-once provisioning against the RUNNING local stage (issue 5): mosquitto brokers and `chalice local`
as processes, requests fired at the same moment over real HTTP (127.0.0.1 only), and a real `kill -9` of the
server between certificate creation and finalize.

What the tests measure (status codes, codes of the refusals, wall times) is printed; see it with `-s`.
"""
import http.client
import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from admin import cli as admin
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, Settings
from chalicelib.domain.keypolicy import key_fingerprint
from devstack.stack import LocalStack, free_port, free_port_run, mosquitto_binary
from tests.conftest import LONDON_IP, make_csr, needs_tool, sign_v1

pytestmark = needs_tool(mosquitto_binary(), "mosquitto")

CONCURRENT_SAME_DEVICE = 50
BULK_DEVICES = 200
HEADERS = {"X-Forwarded-For": LONDON_IP}  # the local stage trusts it: every device is placed in eu-west-2
# Settings from the caller's environment that would point the stage somewhere else.
FOREIGN_SETTINGS = ("GIP_FLEET_PUBLIC_KEY", "GIP_CLAIM_LEASE_SECONDS", "GIP_REGISTRY", "GIP_ISSUER",
                    "GIP_ENABLED_REGIONS", "GIP_DEFAULT_REGION", "GIP_MQTT_HOST")


# --- helpers ------------------------------------------------------------------------------------------------

def prepare_state(monkeypatch, state: Path, lease_seconds: int | None = None, **register):
    """Environment for a stage in `state`, fleet key made and devices registered by the admin CLI."""
    for name in FOREIGN_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIP_STATE_DIR", str(state))
    monkeypatch.setenv("GIP_MQTT_BASE_PORT", str(free_port_run(11)))
    if lease_seconds is not None:
        monkeypatch.setenv("GIP_CLAIM_LEASE_SECONDS", str(lease_seconds))
    assert admin.main(["--state-dir", str(state), "keygen"]) == 0
    for prefix, count in register.items():
        assert admin.main(["--state-dir", str(state), "register", "--prefix", prefix, "--count", str(count)]) == 0
    settings = Settings.for_stage("local", str(state))
    fleet_key = serialization.load_pem_private_key(
        (settings.keys_dir / FLEET_PRIVATE_KEY_NAME).read_bytes(), password=None)
    return settings, fleet_key


def body(fleet_key, thing: str, csr_pem: str | None = None) -> dict:
    out = {"thing-name": thing, "thing-name-sig": sign_v1(fleet_key, thing)}
    if csr_pem:
        out["CSR"] = csr_pem
    return out


def post(url: str, payload: dict) -> tuple[int, dict]:
    response = requests.post(f"{url}/device-provisioning", json=payload, headers=HEADERS, timeout=120)
    return response.status_code, response.json()


def fire_together(url: str, payloads: list[dict]) -> tuple[list[tuple[int, dict]], float]:
    """Every request on its own connection, opened beforehand, all sent at one Barrier: the server has them all
    at the same moment. (devstack/chalice_local.py raises the listen backlog from socketserver's 5, so a burst
    of connections is not reset before the application sees it.)"""
    port = urlsplit(url).port
    connections = []
    for _ in payloads:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.connect()
        connections.append(connection)
    barrier = threading.Barrier(len(payloads) + 1)
    results: list = [None] * len(payloads)

    def one(i: int) -> None:
        data = json.dumps(payloads[i]).encode()
        barrier.wait()
        try:
            connections[i].request("POST", "/device-provisioning", body=data,
                                   headers={"Content-Type": "application/json", **HEADERS})
            response = connections[i].getresponse()
            results[i] = (response.status, json.loads(response.read()))
        except Exception as exc:  # noqa: BLE001 - reported by the assertions on the results
            results[i] = (None, {"exception": repr(exc)})
        finally:
            connections[i].close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.monotonic()
    for t in threads:
        t.join(timeout=180)
    return results, time.monotonic() - started


def summary(results) -> Counter:
    return Counter((status, payload.get("code") or payload.get("status") or payload.get("exception", "")[:80])
                   for status, payload in results)


def certificates(ca_dir: Path, thing: str | None = None) -> list[dict]:
    """The local CA's own record of what it issued, read with a connection of our own."""
    path = ca_dir / "certificates.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        query, args = "SELECT * FROM certificates", ()
        if thing is not None:
            query, args = query + " WHERE thing_name = ?", (thing,)
        return [dict(row) for row in db.execute(query + " ORDER BY issued_at", args)]
    except sqlite3.OperationalError:  # the issuer has not made its table yet
        return []
    finally:
        db.close()


def audit(state: Path, capsys, *flags: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = admin.main(["--state-dir", str(state), "audit", "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def assert_single_winner(stack, thing: str, results) -> dict:
    """Exactly one 200, one certificate for the thing, and the registry points at it."""
    wins = [payload for status, payload in results if status == 200]
    assert len(wins) == 1, summary(results)
    issued = certificates(stack.settings.ca_dir, thing)
    assert [c["certificate_id"] for c in issued] == [wins[0]["certificateId"]]
    assert issued[0]["status"] == "ACTIVE"
    item = SqliteRegistry(stack.settings.registry_path).get(thing)
    assert item.status == "provisioned"
    assert item.certificate_id == wins[0]["certificateId"]
    assert item.region == wins[0]["region"] == "eu-west-2"
    return wins[0]


# --- the shared stage for tests 1-4 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    state = tmp_path_factory.mktemp("exactly-once-state")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # 200 requests at once on 2 shared cores can queue past the 20 s request budget; these tests are about
        # exactly-once, so the deadline (tests/test_deadline.py) is moved out of their way.
        monkeypatch.setenv("GIP_REQUEST_BUDGET_SECONDS", "90")
        settings, fleet_key = prepare_state(monkeypatch, state, nocsr=1, ownkey=1, samecsr=1, lost=1,
                                            bulk=BULK_DEVICES)
        with LocalStack(settings, free_port(), quiet=True) as running:
            yield running, fleet_key


def test_concurrent_requests_without_csr_issue_exactly_one_certificate(stage):
    stack, fleet_key = stage
    payloads = [body(fleet_key, "nocsr1") for _ in range(CONCURRENT_SAME_DEVICE)]
    results, took = fire_together(stack.api_url, payloads)
    print(f"\n[no CSR x{len(payloads)}] {dict(summary(results))} in {took:.2f} s")
    win = assert_single_winner(stack, "nocsr1", results)
    refused = [payload["code"] for status, payload in results if status != 200]
    assert len(refused) == CONCURRENT_SAME_DEVICE - 1
    assert all(status in (200, 409) for status, _ in results), summary(results)
    assert set(refused) <= {"already-provisioned", "provisioning-in-progress"}
    # The winner got the server-made key that belongs to the one certificate.
    key = serialization.load_pem_private_key(win["PrivateKey"].encode(), password=None)
    cert = x509.load_pem_x509_certificate(win["certificatePem"].encode())
    assert key_fingerprint(key.public_key()) == key_fingerprint(cert.public_key())


def test_concurrent_requests_each_with_its_own_key_issue_exactly_one_certificate(stage):
    stack, fleet_key = stage
    csrs = [make_csr("ownkey1") for _ in range(CONCURRENT_SAME_DEVICE)]
    payloads = [body(fleet_key, "ownkey1", pem) for pem, _ in csrs]
    results, took = fire_together(stack.api_url, payloads)
    print(f"\n[own key x{len(payloads)}] {dict(summary(results))} in {took:.2f} s")
    win = assert_single_winner(stack, "ownkey1", results)
    assert all(status in (200, 409) for status, _ in results), summary(results)
    assert {payload["code"] for status, payload in results if status != 200} <= {
        "already-provisioned", "provisioning-in-progress"}
    # The certificate carries the key of the request that won, and the registry remembers that key.
    winner = next(i for i, (status, _) in enumerate(results) if status == 200)
    cert = x509.load_pem_x509_certificate(win["certificatePem"].encode())
    assert key_fingerprint(cert.public_key()) == key_fingerprint(csrs[winner][1].public_key())
    item = SqliteRegistry(stack.settings.registry_path).get("ownkey1")
    assert item.key_fingerprint == key_fingerprint(csrs[winner][1].public_key())


def test_concurrent_requests_with_the_same_csr_all_get_the_one_certificate(stage):
    stack, fleet_key = stage
    csr_pem, _ = make_csr("samecsr1")
    payload = body(fleet_key, "samecsr1", csr_pem)
    results, took = fire_together(stack.api_url, [payload] * CONCURRENT_SAME_DEVICE)
    print(f"\n[same CSR x{CONCURRENT_SAME_DEVICE}] {dict(summary(results))} in {took:.2f} s")
    assert all(status in (200, 409) for status, _ in results), summary(results)
    wins = [p for status, p in results if status == 200]
    assert wins
    assert {(p["certificateId"], p["certificatePem"], p["endpointPort"]) for p in wins} == {
        (wins[0]["certificateId"], wins[0]["certificatePem"], wins[0]["endpointPort"])}
    assert all("PrivateKey" not in p for p in wins)
    assert {p["code"] for status, p in results if status == 409} <= {"provisioning-in-progress"}
    # A second burst after the winner finished: every one takes the lost-response path, nothing new is made.
    again, took = fire_together(stack.api_url, [payload] * 20)
    print(f"[same CSR x20, after the first finished] {dict(summary(again))} in {took:.2f} s")
    assert {(status, p["certificateId"], p["certificatePem"]) for status, p in again} == {
        (200, wins[0]["certificateId"], wins[0]["certificatePem"])}, summary(again)
    issued = certificates(stack.settings.ca_dir, "samecsr1")
    assert [c["certificate_id"] for c in issued] == [wins[0]["certificateId"]]
    item = SqliteRegistry(stack.settings.registry_path).get("samecsr1")
    assert (item.status, item.certificate_id) == ("provisioned", wins[0]["certificateId"])


def test_two_hundred_devices_at_once_all_provision(stage):
    stack, fleet_key = stage
    names = [f"bulk{i}" for i in range(1, BULK_DEVICES + 1)]
    payloads = [body(fleet_key, name, make_csr(name)[0]) for name in names]  # keys made before firing
    results, took = fire_together(stack.api_url, payloads)
    print(f"\n[{BULK_DEVICES} devices, {BULK_DEVICES} threads at once] {dict(summary(results))} in {took:.2f} s")
    assert [status for status, _ in results] == [200] * BULK_DEVICES, summary(results)
    ids = [payload["certificateId"] for _, payload in results]
    assert len(set(ids)) == BULK_DEVICES
    issued = [c for c in certificates(stack.settings.ca_dir) if c["thing_name"].startswith("bulk")]
    assert sorted(c["certificate_id"] for c in issued) == sorted(ids)
    assert {c["status"] for c in issued} == {"ACTIVE"}
    registry = SqliteRegistry(stack.settings.registry_path)
    for name, (_, payload) in zip(names, results):
        item = registry.get(name)
        assert (item.status, item.certificate_id) == ("provisioned", payload["certificateId"]), name


def test_lost_response_retry_returns_the_same_certificate_and_issues_none(stage):
    stack, fleet_key = stage
    csr_pem, _ = make_csr("lost1")
    payload = body(fleet_key, "lost1", csr_pem)
    status, first = post(stack.api_url, payload)
    assert status == 200, first
    before = certificates(stack.settings.ca_dir)
    status, again = post(stack.api_url, payload)  # the device never saw the first answer
    assert status == 200, again
    assert (again["certificateId"], again["certificatePem"]) == (first["certificateId"], first["certificatePem"])
    assert (again["endpointAddress"], again["endpointPort"], again["region"]) == (
        first["endpointAddress"], first["endpointPort"], first["region"])
    assert certificates(stack.settings.ca_dir) == before
    assert [c["certificate_id"] for c in certificates(stack.settings.ca_dir, "lost1")] == [first["certificateId"]]


# --- kill -9 between certificate creation and finalize ----------------------------------------------------------

def _chalice_of(processes):
    """The chalice local process among a stack's children (the others are mosquitto)."""
    [process] = [p for p in processes if "chalice_local.py" in " ".join(map(str, p.args))]
    return process


def _kill_between_issue_and_finalize(stack, fleet_key, thing: str) -> bool:
    """Provision `thing` (server-made key) and SIGKILL chalice local after the certificate exists but before
    finalize. Returns False when the request finished before we could hold the registry's write lock."""
    registry_path, ca_dir = stack.settings.registry_path, stack.settings.ca_dir
    outcome: dict = {}

    def request() -> None:
        try:
            outcome["response"] = post(stack.api_url, body(fleet_key, thing))
        except requests.RequestException as exc:
            outcome["error"] = exc

    lock = sqlite3.connect(registry_path, isolation_level=None, timeout=5)
    try:
        caller = threading.Thread(target=request)
        caller.start()
        deadline = time.monotonic() + 30
        # The write-ahead record (pending_region) is written before the issuer is asked: hold the lock from
        # then on, so the certificate is issued and every later write (its id, finalize) waits.
        query = "SELECT prov_status, pending_region IS NOT NULL FROM devices WHERE thing_name = ?"
        while True:
            status, intent = lock.execute(query, (thing,)).fetchone()
            if status == "provisioning" and intent:
                lock.execute("BEGIN IMMEDIATE")  # the server's next write now waits on its busy timeout
                status, intent = lock.execute(query, (thing,)).fetchone()
                if status == "provisioning" and intent:
                    break
                lock.execute("ROLLBACK")
            if status == "provisioned" or not caller.is_alive():
                caller.join(30)
                return False
            assert time.monotonic() < deadline, "the claim never showed"
            time.sleep(0.001)
        # Holding the lock: wait for the issuer to record the certificate (RSA key generation comes first).
        deadline = time.monotonic() + 8  # well inside the server's 10 s busy timeout
        while not [c for c in certificates(ca_dir, thing) if c["status"] == "ACTIVE"]:
            assert time.monotonic() < deadline, "no certificate was issued while finalize was held"
            time.sleep(0.005)
        chalice = _chalice_of(stack.processes)
        os.kill(chalice.pid, signal.SIGKILL)
        assert chalice.wait(timeout=10) == -signal.SIGKILL
        lock.execute("ROLLBACK")
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    caller.join(30)
    assert "error" in outcome, outcome  # the device never got an answer
    return True


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_between_issue_and_finalize_is_found_and_fixed_by_the_audit(tmp_path, monkeypatch, capsys):
    state = tmp_path / "state"
    settings, fleet_key = prepare_state(monkeypatch, state, lease_seconds=3, victim=5)
    assert settings.claim_lease_seconds == 3
    first = LocalStack(settings, free_port(), quiet=True).start()
    first_processes = list(first.processes)
    assert LocalStack.env(first)["GIP_CLAIM_LEASE_SECONDS"] == "3"  # what chalice local was started with
    try:
        victim = None
        for i in range(1, 6):
            if _kill_between_issue_and_finalize(first, fleet_key, f"victim{i}"):
                victim = f"victim{i}"
                break
            print(f"[kill -9] victim{i} finished before the registry lock was taken; next device")
        assert victim, "could not stop the server between issue and finalize in 5 tries"
    finally:
        first.stop()
    # Nothing of the killed stack is left: the brokers were stopped, chalice local died of SIGKILL.
    assert len(first_processes) == len(settings.enabled_regions) + 1
    assert _chalice_of(first_processes).returncode == -signal.SIGKILL
    assert [p.returncode for p in first_processes if p.returncode is None] == []
    assert [p.pid for p in first_processes if _alive(p.pid)] == []

    registry = SqliteRegistry(settings.registry_path)
    left = registry.get(victim)
    assert left.status == "provisioning" and left.certificate_id is None
    [orphan] = [c for c in certificates(settings.ca_dir, victim)]
    assert orphan["status"] == "ACTIVE"

    second = LocalStack(settings, free_port(), quiet=True).start()
    try:
        db = sqlite3.connect(settings.registry_path)
        lease_ends = db.execute("SELECT lease_expires FROM devices WHERE thing_name = ?", (victim,)).fetchone()[0]
        db.close()
        # Build the server's service (the first request does) so the request below is answered at once.
        assert post(second.api_url, body(fleet_key, "not-registered"))[0] == 403
        code, found = audit(state, capsys)
        if time.time() < lease_ends - 1.0:  # else too close to call: a request might land after the lease
            # A claim whose lease runs is neither stuck nor has an orphan: its holder may still record it.
            assert (found["stuck_claims"], found["orphan_certificates"]) == ([], []), found
            # The dead request's claim still holds while its lease runs: the device has to wait.
            status, payload = post(second.api_url, body(fleet_key, victim))
            assert (status, payload.get("code")) == (409, "provisioning-in-progress"), payload
        time.sleep(max(0.0, lease_ends - time.time()) + 0.3)

        code, found = audit(state, capsys)
        assert code == 1, found
        # The certificate is found through the stuck claim's write-ahead record, not as an orphan.
        assert [(s["thing_name"], s["certificates"], s["key"]) for s in found["stuck_claims"]] == [
            (victim, [orphan["certificate_id"]], "server-made")]
        assert found["orphan_certificates"] == [] and found["missing_certificates"] == []

        code, fixed = audit(state, capsys, "--fix")
        assert code == 0, fixed
        assert len(fixed["fixed"]) == 1 and orphan["certificate_id"] in fixed["fixed"][0], fixed
        code, clean = audit(state, capsys)
        assert code == 0, clean
        assert (clean["stuck_claims"], clean["orphan_certificates"], clean["missing_certificates"]) == ([], [], [])
        assert certificates(settings.ca_dir, victim)[0]["status"] == "REVOKED"
        assert registry.get(victim).status == "unprovisioned"

        status, payload = post(second.api_url, body(fleet_key, victim))
        assert status == 200, payload
        issued = certificates(settings.ca_dir, victim)
        assert [(c["certificate_id"], c["status"]) for c in issued] == [
            (orphan["certificate_id"], "REVOKED"), (payload["certificateId"], "ACTIVE")]
        item = registry.get(victim)
        assert (item.status, item.certificate_id) == ("provisioned", payload["certificateId"])
        assert audit(state, capsys)[0] == 0
    finally:
        second.stop()
