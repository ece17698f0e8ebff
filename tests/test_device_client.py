"""Unit tests for the device client (device/global_device.py).

Provisioning runs against a real, scripted HTTP server on 127.0.0.1; MQTT is skipped with
--count 0 (the broker end-to-end tests live elsewhere).
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib.util
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from tests.loopback import LoopbackServer, QuietHandler

ROOT = Path(__file__).resolve().parents[1]


def _load_device_module():
    # device/ is a standalone program, not a package: load it by file path.
    spec = importlib.util.spec_from_file_location("global_device", ROOT / "device" / "global_device.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


gd = _load_device_module()


@pytest.fixture(scope="module")
def fleet_public_key(vectors):
    return serialization.load_pem_public_key(vectors["fleet_public_key_pem"].encode())


@pytest.fixture()
def signing_key_file(tmp_path, vectors):
    path = tmp_path / "global-provisioning.priv.key.pem"
    path.write_text(vectors["fleet_private_key_pem"])
    return path


SERVER_KEY_PEM = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption()).decode()
CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


def success_body(thing="mydevice3", with_key=True):
    body = {"status": "success", "thingName": thing, "region": "eu-west-2", "distance": 12.3,
            "endpointAddress": "broker.eu-west-2.example", "endpointPort": 8883,
            "certificateId": "abc123", "certificatePem": CERT_PEM}
    if with_key:
        body["PrivateKey"] = SERVER_KEY_PEM
    return body


def error_body(code, message):
    return {"status": "error", "code": code, "message": message}


class ScriptedServer(LoopbackServer):
    """Answers POSTs from a script of (status, body, headers); the last entry repeats."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "body": json.loads(self.rfile.read(length) or b"null")})
                status, body, headers = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        super().__init__(Handler)


def run_client(server_url, signing_key_file, state_dir, *extra, sleeps=None):
    argv = ["-t", "mydevice3", "-a", server_url, "-c", "--count", "0",
            "--signing-key", str(signing_key_file), "--state-dir", str(state_dir),
            "--retry-base-delay", "0.001", *extra]
    return gd.main(argv, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def verifies(public_key, signature_b64, text):
    scheme = ((ec.ECDSA(hashes.SHA256()),) if isinstance(public_key, ec.EllipticCurvePublicKey)
              else (padding.PKCS1v15(), hashes.SHA256()))
    try:
        public_key.verify(base64.b64decode(signature_b64), text.encode(), *scheme)
        return True
    except InvalidSignature:
        return False


def signed_text(body):
    """What the server reconstructs from a received body (v2 when it has a nonce, else v1)."""
    if "nonce" not in body:
        return body["thing-name"]
    csr_hash = hashlib.sha256(body["CSR"].encode()).hexdigest() if "CSR" in body else ""
    return f"v2\n{body['thing-name']}\n{body['timestamp']}\n{body['nonce']}\n{csr_hash}"


@pytest.fixture()
def ec_key_file(tmp_path, vectors):
    path = tmp_path / "device-ec.priv.key.pem"
    path.write_text(vectors["device_ec_private_key_pem"])
    return path


# ---------- signing and CSR ----------

def test_v1_signature_equals_vector(vectors):
    key = serialization.load_pem_private_key(vectors["fleet_private_key_pem"].encode(), password=None)
    body = gd.build_v1_request(vectors["thing_name"], key, None)
    assert gd.v1_signed_text(vectors["thing_name"]) == vectors["v1"]["signed_text"].encode()
    assert base64.b64decode(body["thing-name-sig"]) == base64.b64decode(vectors["v1"]["signature_b64"])
    assert body == {"thing-name": "mydevice3", "thing-name-sig": vectors["v1"]["signature_b64"]}


@pytest.mark.parametrize("case, with_csr", [("v2_rsa_with_csr", True), ("v2_rsa_without_csr", False)])
def test_v2_rsa_signature_equals_vector(vectors, case, with_csr):
    key = serialization.load_pem_private_key(vectors["fleet_private_key_pem"].encode(), password=None)
    csr = vectors["csr_pem"] if with_csr else None
    args = (vectors["thing_name"], vectors["timestamp"], vectors["nonce"], csr)
    assert gd.v2_signed_text(*args) == vectors[case]["signed_text"].encode()
    body = gd.build_v2_request(vectors["thing_name"], key, csr, vectors["timestamp"], vectors["nonce"])
    assert base64.b64decode(body["thing-name-sig"]) == base64.b64decode(vectors[case]["signature_b64"])
    assert (body["timestamp"], body["nonce"], body.get("CSR")) == (vectors["timestamp"], vectors["nonce"], csr)


def test_v2_ec_signature_verifies_and_text_matches_vector(vectors):
    key = serialization.load_pem_private_key(vectors["device_ec_private_key_pem"].encode(), password=None)
    public = serialization.load_pem_public_key(vectors["device_ec_public_key_pem"].encode())
    text = gd.v2_signed_text(vectors["thing_name"], vectors["timestamp"], vectors["nonce"], vectors["csr_pem"])
    assert verifies(public, base64.b64encode(gd.sign(key, text)).decode(), vectors["v2_ec_with_csr"]["signed_text"])
    assert verifies(public, vectors["v2_ec_with_csr"]["signature_b64"], text.decode())


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_csr_has_thing_cn_and_verifies(key_type):
    key = gd.generate_device_key(key_type)
    csr = x509.load_pem_x509_csr(gd.make_csr("mydevice3", key).encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mydevice3"
    assert csr.public_key() == key.public_key()


# ---------- provisioning against a real HTTP server ----------

def test_success_without_csr_writes_key_cert_and_endpoint(tmp_path, signing_key_file, fleet_public_key):
    state = tmp_path / "state"
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, state) == 0
    [request] = server.requests
    assert request["path"] == "/api/device-provisioning"
    assert "CSR" not in request["body"]
    assert verifies(fleet_public_key, request["body"]["thing-name-sig"], signed_text(request["body"]))
    key_file = state / "mydevice3.device.key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert key_file.read_text() == SERVER_KEY_PEM
    assert (state / "mydevice3.device.cert.pem").read_text() == CERT_PEM
    assert json.loads((state / "mydevice3.endpoint").read_text()) == {
        "endpointAddress": "broker.eu-west-2.example", "endpointPort": 8883,
        "region": "eu-west-2", "certificateId": "abc123"}
    assert not list(state.glob("*.tmp"))


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_own_key_sends_csr_for_the_saved_key(tmp_path, signing_key_file, key_type, capsys):
    with ScriptedServer([(200, success_body(with_key=False), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "-k", "--key-type", key_type) == 0
    csr = x509.load_pem_x509_csr(server.requests[0]["body"]["CSR"].encode())
    key_file = tmp_path / "mydevice3.device.key.pem"
    saved = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert csr.public_key() == saved.public_key()
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert "PRIVATE KEY" not in capsys.readouterr().out


def test_own_key_survives_a_failed_request_and_is_reused(tmp_path, signing_key_file):
    with ScriptedServer([(503, error_body("unavailable", "down"), {"Retry-After": "0"})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "-k", "--max-attempts", "2") == 6
    key_file = tmp_path / "mydevice3.device.key.pem"
    first_key = key_file.read_bytes()
    with ScriptedServer([(200, success_body(with_key=False), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "-k") == 0
    csr = x509.load_pem_x509_csr(server.requests[0]["body"]["CSR"].encode())
    assert key_file.read_bytes() == first_key
    assert csr.public_key() == serialization.load_pem_private_key(first_key, None).public_key()


@pytest.mark.parametrize("status, code, exit_code", [
    (403, "forbidden", 3), (401, "unauthorized", 3), (409, "already_provisioned", 4),
    (400, "bad_request", 5), (413, "too_large", 5)])
def test_errors_print_server_message_and_exit_by_cause(tmp_path, signing_key_file, capsys,
                                                        status, code, exit_code):
    with ScriptedServer([(status, error_body(code, f"server says {code}"), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path) == exit_code
    assert len(server.requests) == 1  # not retried
    err = capsys.readouterr().err
    assert f"server says {code}" in err and code in err
    assert not (tmp_path / "mydevice3.endpoint").exists()


def test_503_with_retry_after_is_retried_then_succeeds(tmp_path, signing_key_file):
    busy = (503, error_body("unavailable", "busy"), {"Retry-After": "0"})
    sleeps = []
    with ScriptedServer([busy, busy, (200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, sleeps=sleeps) == 0
    assert len(server.requests) == 3
    assert sleeps == [0.0, 0.0]
    assert (tmp_path / "mydevice3.endpoint").exists()


def test_a_gateway_timeout_and_a_claim_still_in_progress_are_waited_out(tmp_path, signing_key_file):
    gateway = (504, {"message": "Endpoint request timed out"}, {})
    in_progress = (409, error_body("provisioning-in-progress", "being provisioned by another request"),
                   {"Retry-After": "0"})
    with ScriptedServer([gateway, in_progress, (200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, sleeps=[]) == 0
    assert len(server.requests) == 3


def test_always_503_gives_up_after_max_attempts(tmp_path, signing_key_file, capsys):
    sleeps = []
    with ScriptedServer([(503, error_body("unavailable", "try later"), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--max-attempts", "4", sleeps=sleeps) == 6
    assert len(server.requests) == 4
    assert len(sleeps) == 3 and all(0 <= s <= 0.001 * 2 ** i for i, s in enumerate(sleeps))
    assert "try later" in capsys.readouterr().err


def test_connection_refused_is_retried_then_exit_6(tmp_path, signing_key_file):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    assert run_client(f"http://127.0.0.1:{port}", signing_key_file, tmp_path,
                      "--max-attempts", "3", sleeps=sleeps) == 6
    assert len(sleeps) == 2


def test_backoff_honours_retry_after_and_caps_it():
    client = gd.ProvisioningClient("http://x", base_delay=1, max_delay=30)
    assert client._delay(1, 7.0) == 7.0
    assert client._delay(1, 600.0) == 30
    assert all(0 <= client._delay(10, None) <= 30 for _ in range(50))


def test_credentials_present_skip_provisioning(tmp_path, signing_key_file, capsys):
    (tmp_path / "mydevice3.device.key.pem").write_text(SERVER_KEY_PEM)
    (tmp_path / "mydevice3.device.cert.pem").write_text(CERT_PEM)
    (tmp_path / "mydevice3.endpoint").write_text(json.dumps(
        {"endpointAddress": "b.example", "endpointPort": 8883, "region": "eu-west-2", "certificateId": "x"}))
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path) == 0
    assert server.requests == []
    assert "already provisioned" in capsys.readouterr().out


def test_half_written_state_is_not_taken_as_credentials(tmp_path, signing_key_file):
    (tmp_path / "mydevice3.device.key.pem").write_text(SERVER_KEY_PEM)
    (tmp_path / "mydevice3.device.cert.pem").write_text(CERT_PEM)  # endpoint file missing
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path) == 0
    assert len(server.requests) == 1


def test_fake_device_signature_does_not_verify(tmp_path, signing_key_file, fleet_public_key):
    with ScriptedServer([(403, error_body("forbidden", "signature invalid"), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "-f") == 3
    body = server.requests[0]["body"]
    assert body["thing-name"] == "mydevice3"
    assert not verifies(fleet_public_key, body["thing-name-sig"], signed_text(body))


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_v2_request_verifies_over_reconstructed_text(tmp_path, signing_key_file, fleet_public_key, key_type):
    with ScriptedServer([(200, success_body(with_key=False), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "-k", "--key-type", key_type,
                          "--signature-version", "2") == 0
    body = server.requests[0]["body"]
    assert set(body) == {"thing-name", "thing-name-sig", "CSR", "timestamp", "nonce"}
    sent = dt.datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - sent).total_seconds()) < 60
    assert verifies(fleet_public_key, body["thing-name-sig"], signed_text(body))


def test_v2_retries_are_signed_with_fresh_nonces(tmp_path, signing_key_file, fleet_public_key):
    busy = (429, error_body("throttled", "slow down"), {"Retry-After": "0"})
    with ScriptedServer([busy, busy, (200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--signature-version", "2") == 0
    bodies = [r["body"] for r in server.requests]
    assert len({b["nonce"] for b in bodies}) == 3
    assert all(verifies(fleet_public_key, b["thing-name-sig"], signed_text(b)) for b in bodies)


def test_v2_with_ec_signing_key_verifies_with_ec_public_key(tmp_path, ec_key_file, vectors):
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, ec_key_file, tmp_path, "--signature-version", "2") == 0
    body = server.requests[0]["body"]
    public = serialization.load_pem_public_key(vectors["device_ec_public_key_pem"].encode())
    assert verifies(public, body["thing-name-sig"], signed_text(body))


@pytest.mark.parametrize("flag", [["--legacy-signature"], ["--signature-version", "1"]])
def test_v1_with_ec_signing_key_is_a_usage_error(tmp_path, ec_key_file, capsys, flag):
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, ec_key_file, tmp_path, *flag) == 2
    assert server.requests == []
    assert "EC key" in capsys.readouterr().err


@pytest.mark.parametrize("default", [1, 2])
def test_default_version_comes_from_the_constant(tmp_path, signing_key_file, monkeypatch, capsys, default):
    monkeypatch.setattr(gd, "DEFAULT_SIGNATURE_VERSION", default)
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path) == 0
        (tmp_path / "mydevice3.endpoint").unlink()
        assert run_client(server.url, signing_key_file, tmp_path, "--legacy-signature") == 0
    assert [("nonce" in r["body"]) for r in server.requests] == [default == 2, False]
    with pytest.raises(SystemExit):
        gd.main(["--help"])
    assert f"(default: {default})" in " ".join(capsys.readouterr().out.split())


def test_forwarded_for_header(tmp_path, signing_key_file):
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--forwarded-for", "81.2.69.160") == 0
    assert server.requests[0]["headers"].get("X-Forwarded-For") == "81.2.69.160"


def test_no_forwarded_for_header_by_default(tmp_path, signing_key_file):
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path) == 0
    assert "X-Forwarded-For" not in server.requests[0]["headers"]


def test_missing_signing_key_is_a_local_error(tmp_path):
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, tmp_path / "nope.pem", tmp_path) == 2
    assert server.requests == []


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        gd.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for code in ("3 ", "4 ", "5 ", "6 ", "7 ", "130"):
        assert code in out


def test_sample_message_shape():
    message = gd.sample_message("mydevice3", 7)
    assert set(message) == {"thing-name", "global", "datetime", "sequence"}  # the sample's, and a number to dedupe
    assert (message["thing-name"], message["sequence"]) == ("mydevice3", 7)
    assert message["datetime"].endswith("Z")


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost", "ftp://example.com/api", "http://"])
def test_an_api_url_without_http_or_https_is_a_usage_error(tmp_path, signing_key_file, capsys, url):
    with pytest.raises(SystemExit) as exc:
        run_client(url, signing_key_file, tmp_path)
    assert exc.value.code == 2
    assert "http:// or https://" in capsys.readouterr().err


def test_an_unknown_distance_prints_as_unknown(tmp_path, signing_key_file, capsys):
    with ScriptedServer([(200, {**success_body(), "distance": None, "reason": "default"}, {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path) == 0
    out = capsys.readouterr().out
    assert "distance unknown" in out and "None" not in out


def test_a_fake_device_needs_no_signing_key_file(tmp_path, fleet_public_key):
    with ScriptedServer([(403, error_body("invalid-signature", "signature invalid"), {})]) as server:
        assert run_client(server.url, tmp_path / "absent.pem", tmp_path, "-f") == 3
    body = server.requests[0]["body"]
    assert not verifies(fleet_public_key, body["thing-name-sig"], signed_text(body))


def test_a_missing_signing_key_says_how_to_make_one_and_where(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GIP_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url, tmp_path / "nope.pem", tmp_path) == 2
    assert server.requests == []
    err = capsys.readouterr().err
    assert "admin keygen" in err and "Traceback" not in err
    assert str(tmp_path / "xdg" / "iot-global-provisioning" / "local" / "keys" / "global-provisioning.priv.key.pem") in err


@pytest.mark.parametrize("content", [None, "", "not a certificate\n"])
def test_an_unusable_root_ca_stops_before_any_request(tmp_path, signing_key_file, capsys, content):
    root_ca = tmp_path / "bundle.pem"
    if content is not None:
        root_ca.write_text(content)
    with ScriptedServer([(200, success_body(), {})]) as server:
        argv = ["-t", "mydevice3", "-a", server.url, "-c", "--count", "1", "--signing-key", str(signing_key_file),
                "--state-dir", str(tmp_path), "--root-ca", str(root_ca)]
        assert gd.main(argv, sleep=lambda s: None) == 2
    assert server.requests == []
    assert f"--root-ca {root_ca}" in capsys.readouterr().err
    assert not (tmp_path / "mydevice3.endpoint").exists()


# ---------- the original sample's users switch (issue 25) ----------

@pytest.mark.parametrize("suffix", ["device-provisioning", "device-provisioning/"])
def test_the_full_url_the_original_sample_takes_is_accepted(tmp_path, signing_key_file, suffix):
    with ScriptedServer([(200, success_body(), {})]) as server:
        assert run_client(server.url + suffix, signing_key_file, tmp_path) == 0
    assert [r["path"] for r in server.requests] == ["/api/device-provisioning"]


def test_the_script_is_committed_executable_and_its_default_state_files_are_ignored_by_git():
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    mode = subprocess.run([*git, "ls-files", "-s", "device/global_device.py"], capture_output=True, text=True)
    assert mode.stdout.startswith("100755 ")
    # What `--state-dir .` (the sample's default) leaves in the project directory, renewal and revocation included.
    written = [f"mydevice1{suffix}" for suffix in (
        ".device.key.pem", ".device.cert.pem", ".endpoint", ".renewal.key.pem", ".endpoint.renewal.json",
        ".device.key.pem.previous", ".device.cert.pem.previous", ".endpoint.previous", ".endpoint.revoked",
        ".device.key.pem.revoked", ".device.cert.pem.revoked", ".endpoint.tmp", ".device.key.pem.tmp")]
    ignored = subprocess.run([*git, "check-ignore", "--no-index", *written], capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(written)


# ---------- fast, clear failures of the HTTP calls (issue 25) ----------

class FakeClock:
    """A monotonic clock that the client's sleeps advance; `stop_after` sleeps end the run (for 'forever')."""

    class Enough(Exception):
        pass

    def __init__(self, stop_after: int | None = None):
        self.now, self.sleeps, self.stop_after = 0.0, [], stop_after

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if self.stop_after is not None and len(self.sleeps) >= self.stop_after:
            raise self.Enough()
        self.sleeps.append(seconds)
        self.now += seconds


def closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_client(api, signing_key_file, state_dir, clock, *extra):
    argv = ["-t", "mydevice3", "-a", api, "-c", "--count", "0", "--signing-key", str(signing_key_file),
            "--state-dir", str(state_dir), *extra]
    return gd.main(argv, sleep=clock.sleep, monotonic=clock.monotonic)


@pytest.mark.parametrize("api, said", [
    ("http://127.0.0.1:{port}", "nothing is listening at http://127.0.0.1:{port}/device-provisioning"),
    ("http://gip-device-test.invalid:{port}", "the host name gip-device-test.invalid of "
                                              "http://gip-device-test.invalid:{port}/device-provisioning does not resolve"),
])
def test_an_api_that_cannot_be_reached_is_named_once_and_given_up_after_about_10_s(tmp_path, signing_key_file,
                                                                                     capsys, api, said):
    port, clock = closed_port(), FakeClock()
    # Plenty of attempts: the time limit is what ends it.
    assert unreachable_client(api.format(port=port), signing_key_file, tmp_path, clock, "--max-attempts", "100") == 6
    out, err = capsys.readouterr()
    said = said.format(port=port)
    [line] = [line for line in out.splitlines() if said in line]  # one line, whatever the number of attempts
    assert line.endswith("; retrying for up to 10 s") and len(line) < 200
    assert err.startswith(f"error: provisioning failed: {said}") and err.count("\n") == 1
    assert err.rstrip().endswith("; gave up after 10 s (--max-attempts 0 retries forever)")
    assert clock.now == pytest.approx(gd.NETWORK_GIVE_UP_SECONDS) and len(clock.sleeps) > 1
    assert "HTTPConnectionPool" not in out + err and "Traceback" not in out + err


def test_max_attempts_0_retries_an_unreachable_api_forever_with_capped_backoff(tmp_path, signing_key_file, capsys):
    clock = FakeClock(stop_after=40)
    with pytest.raises(FakeClock.Enough):
        unreachable_client(f"http://127.0.0.1:{closed_port()}", signing_key_file, tmp_path, clock,
                           "--max-attempts", "0")
    assert clock.now > 10 * gd.NETWORK_GIVE_UP_SECONDS
    assert max(clock.sleeps) <= 30.0  # the client's max_delay
    out = capsys.readouterr().out
    assert out.count("nothing is listening at") == 1 and "retrying forever" in out


def test_a_503_with_retry_after_is_waited_out_saying_how_long(tmp_path, signing_key_file, capsys):
    busy = (503, error_body("admission-control", "come back later"), {"Retry-After": "7"})
    sleeps = []
    with ScriptedServer([busy, (200, success_body(), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, sleeps=sleeps) == 0
    assert sleeps == [7.0]
    assert "retrying in 7.0 s (the server's Retry-After)" in capsys.readouterr().out


def test_a_damaged_endpoint_file_is_still_a_local_error(tmp_path, signing_key_file, capsys):
    (tmp_path / "mydevice3.device.key.pem").write_text(SERVER_KEY_PEM)
    (tmp_path / "mydevice3.device.cert.pem").write_text(CERT_PEM)
    for damaged in ("not an endpoint", "{}", "::eu-west-2", "[1, 2]"):
        (tmp_path / "mydevice3.endpoint").write_text(damaged)
        with ScriptedServer([(200, success_body(), {})]) as server:
            assert run_client(server.url, signing_key_file, tmp_path) == 2
        assert server.requests == []
        assert "damaged state file" in capsys.readouterr().err


# ---------- the device that stays up: its queue and its back-off (issue 25) ----------

def test_the_outbox_drops_the_oldest_when_full_and_sends_again_what_a_lost_connection_left():
    outbox = gd.Outbox(3)
    assert [outbox.add(gd.Message(n, str(n))) for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert [m.sequence for m in outbox.waiting] == [2, 3, 4] and outbox.dropped == 1
    outbox.mark_sent(1, mid=11)
    outbox.mark_sent(1, mid=12)
    assert outbox.acknowledge(1, 12).sequence == 3 and outbox.acknowledge(1, 12) is None
    outbox.add(gd.Message(5, "5"))
    outbox.requeue(1)  # the connection is lost with message 2 unacknowledged: it goes first again
    assert [m.sequence for m in outbox.waiting] == [2, 4, 5] and (outbox.acknowledged, len(outbox)) == (1, 3)


def test_reconnection_backoff_is_full_jitter_from_1_s_doubling_up_to_120_s():
    assert [gd.reconnect_delay(n, lambda: 1.0) for n in range(9)] == [1, 2, 4, 8, 16, 32, 64, 120, 120]
    assert gd.reconnect_delay(5, lambda: 0.0) == 0.0 and gd.reconnect_delay(10_000, lambda: 0.5) == 60


def test_without_a_broker_messages_wait_in_the_bounded_queue_and_the_outage_is_said_once(tmp_path, capsys):
    from tests.test_device_renewal import certificate_for  # a certificate for our key; no broker will see it
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "mydevice3.device.key.pem").write_bytes(gd.key_to_pem(key))
    (tmp_path / "mydevice3.device.cert.pem").write_text(certificate_for(key.public_key(), 365))
    port = closed_port()
    (tmp_path / "mydevice3.endpoint").write_text(json.dumps({"endpointAddress": "127.0.0.1", "endpointPort": port}))
    argv = ["-t", "mydevice3", "-a", "http://127.0.0.1:9", "-c", "--state-dir", str(tmp_path), "--root-ca",
            str(tmp_path / "mydevice3.device.cert.pem"), "--interval", "0.02", "--queue-size", "3",
            "--max-reconnects", "3"]
    assert gd.main(argv) == 7
    out, err = capsys.readouterr()
    assert out.count("<= cannot connect to") == 1 and "connection refused" in out  # one line per state change
    assert out.count("warning: the queue is full (3 messages") == 1
    dropped = int(re.search(r"0 message\(s\) acknowledged by the broker, (\d+) dropped \(queue full\), "
                            r"3 not sent or not acknowledged", out)[1])
    assert dropped > 0
    assert f"could not connect to 127.0.0.1:{port} in 3 attempt(s) (--max-reconnects 3)" in err
