"""The device client's renewal (device/global_device.py) against a real, scripted HTTP server on 127.0.0.1;
MQTT is skipped with --count 0 (the broker end-to-end tests are in test_renewal_e2e.py)."""
import datetime as dt
import hashlib
import json
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests import test_device_client
from tests.loopback import LoopbackServer, QuietHandler
from tests.test_device_client import ScriptedServer, error_body, gd, run_client, verifies

signing_key_file = test_device_client.signing_key_file  # the fleet key file (unused once provisioned)

THING = "mydevice3"


def certificate_for(public_key, days: float) -> str:
    """A certificate for `public_key` valid `days` from now (self-signed by a throwaway CA key: the device only
    reads its expiry)."""
    ca = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, THING)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days)).sign(ca, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture()
def provisioned(tmp_path):
    """A device that provisioned with its own EC key; its certificate expires in 10 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    paths = gd.StatePaths.for_thing(str(tmp_path), THING)
    gd.write_file_atomically(paths.key, gd.key_to_pem(key), 0o600)
    gd.write_file_atomically(paths.cert, certificate_for(key.public_key(), 10).encode())
    gd.write_file_atomically(paths.endpoint, json.dumps({
        "endpointAddress": "eu.example", "endpointPort": 8883, "region": "eu-west-2",
        "certificateId": "a" * 64}).encode())
    return paths, key


def renewal_answer(csr_pem: str, certificate_id: str = "b" * 64, region: str = "ap-northeast-1") -> dict:
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    return {"status": "success", "thingName": THING, "region": region, "distance": 10.0, "reason": "relocated",
            "endpointAddress": f"{region}.example", "endpointPort": 8883, "certificateId": certificate_id,
            "certificatePem": certificate_for(csr.public_key(), 365), "previousCertificateId": "a" * 64}


class Renewals(LoopbackServer):
    """A renewal service on 127.0.0.1: answers each request with a certificate for its CSR's key, after
    `failures` 503s."""

    def __init__(self, failures: int = 0):
        self.failures, self.requests = failures, []
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                request = {"path": self.path, "body": json.loads(self.rfile.read(length))}
                outer.requests.append(request)
                if len(outer.requests) <= outer.failures:
                    status, body = 503, error_body("service-unavailable", "try later")
                else:
                    status, body = 200, renewal_answer(request["body"]["CSR"])
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(payload)

        super().__init__(Handler)


def test_renew_sends_a_renew_v1_request_and_stores_the_answer(tmp_path, provisioned, signing_key_file):
    paths, key = provisioned
    with Renewals() as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--renew") == 0
    [request] = server.requests
    body = request["body"]
    assert request["path"] == "/api/device-renewal"
    assert set(body) == {"thing-name", "certificateId", "CSR", "timestamp", "nonce", "signature"}
    assert body["certificateId"] == "a" * 64
    csr_hash = hashlib.sha256(body["CSR"].encode()).hexdigest()
    text = f"renew-v1\n{THING}\n{'a' * 64}\n{body['timestamp']}\n{body['nonce']}\n{csr_hash}"
    assert verifies(key.public_key(), body["signature"], text)  # signed with the current certificate's key
    new_key = serialization.load_pem_private_key(open(paths.key, "rb").read(), None)
    csr = x509.load_pem_x509_csr(body["CSR"].encode())
    assert csr.public_key() == new_key.public_key() != key.public_key()  # a new key of the same type
    assert isinstance(new_key, ec.EllipticCurvePrivateKey)
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == THING
    assert stat.S_IMODE((tmp_path / f"{THING}.device.key.pem").stat().st_mode) == 0o600
    endpoint = json.loads(open(paths.endpoint).read())
    assert endpoint == {"endpointAddress": "ap-northeast-1.example", "endpointPort": 8883,
                        "region": "ap-northeast-1", "certificateId": "b" * 64}
    # The previous credentials stay until the new certificate has connected (--count 0: not yet).
    previous = paths.previous()
    assert json.loads(open(previous.endpoint).read())["certificateId"] == "a" * 64
    assert serialization.load_pem_private_key(open(previous.key, "rb").read(), None).public_key() == key.public_key()
    assert not (tmp_path / f"{THING}.renewal.key.pem").exists()
    assert not (tmp_path / f"{THING}.endpoint.renewal.json").exists()
    gd.drop_previous(paths)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(THING)) == sorted(
        [f"{THING}.device.key.pem", f"{THING}.device.cert.pem", f"{THING}.endpoint"])


def test_renews_by_itself_within_renew_before_days(tmp_path, provisioned, signing_key_file, capsys):
    with Renewals() as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--renew-before", "5") == 0
        assert server.requests == []  # 10 days left, 5 asked: nothing to do
        assert run_client(server.url, signing_key_file, tmp_path) == 0  # the default, 30 days
        assert len(server.requests) == 1
    assert "within 30 days: renewing" in capsys.readouterr().out


def test_a_lost_answer_is_asked_again_with_the_same_key(tmp_path, provisioned, signing_key_file):
    paths, key = provisioned
    with Renewals(failures=10) as server:  # the service never answers this run
        assert run_client(server.url, signing_key_file, tmp_path, "--renew", "--max-attempts", "2") == 6
    first = server.requests
    assert len(first) == 2 and first[0]["body"]["CSR"] == first[1]["body"]["CSR"]
    assert json.loads(open(paths.endpoint).read())["certificateId"] == "a" * 64  # nothing stored
    with Renewals() as server:  # a later run: the same key again, so a recorded renewal is recovered
        assert run_client(server.url, signing_key_file, tmp_path, "--renew") == 0
    again = x509.load_pem_x509_csr(server.requests[0]["body"]["CSR"].encode()).public_key()
    assert again == x509.load_pem_x509_csr(first[0]["body"]["CSR"].encode()).public_key()
    assert server.requests[0]["body"]["nonce"] != first[0]["body"]["nonce"]


def test_an_answer_stored_but_not_applied_is_applied_at_the_next_start(tmp_path, provisioned, signing_key_file):
    """A crash between storing the answer and writing the credentials: the next start finishes, without asking."""
    paths, key = provisioned
    pending = gd.load_or_create_device_key(paths.pending_key, "ec")
    answer = renewal_answer(gd.make_csr(THING, pending))
    gd.write_file_atomically(paths.answer, json.dumps(answer).encode())
    with Renewals() as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--renew-before", "0") == 0
    assert server.requests == []
    assert json.loads(open(paths.endpoint).read())["certificateId"] == "b" * 64
    assert serialization.load_pem_private_key(open(paths.key, "rb").read(), None).public_key() == pending.public_key()


def test_a_refused_renewal_keeps_the_current_credentials(tmp_path, provisioned, signing_key_file, capsys):
    paths, _ = provisioned
    before = [open(p, "rb").read() for p in (paths.key, paths.cert, paths.endpoint)]
    with ScriptedServer([(403, error_body("renewal-refused", "renewal refused"), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--renew") == 3
    assert [open(p, "rb").read() for p in (paths.key, paths.cert, paths.endpoint)] == before
    out, err = capsys.readouterr()
    # The refusal names the call; the broker is asked about the certificate (here it cannot be: no such host).
    assert err.startswith("error: renewal refused: HTTP 403 renewal-refused") and "provisioning refused" not in err
    assert "asking the broker whether the current certificate still works" in out
    assert "the broker could not be asked" in err


def test_a_renewal_refused_by_itself_leaves_the_device_running_on_its_certificate(tmp_path, provisioned,
                                                                                   signing_key_file, capsys):
    """Not asked for (--renew-before): a refusal the broker does not confirm is said, and the device goes on."""
    paths, _ = provisioned
    with ScriptedServer([(403, error_body("renewal-refused", "renewal refused"), {})]) as server:
        assert run_client(server.url, signing_key_file, tmp_path) == 0  # 10 days left, --renew-before 30
    assert len(server.requests) == 1
    out = capsys.readouterr().out
    assert "warning: renewal refused: HTTP 403" in out and "carrying on with the current certificate" in out
    assert json.loads(open(paths.endpoint).read())["certificateId"] == "a" * 64


# ---------- a state directory written by the original sample's script ----------

@pytest.fixture()
def sample_state(tmp_path):
    """What the original sample's script leaves: an RSA key (PKCS#1, as pyOpenSSL wrote it), the certificate, and
    <thing>.endpoint as host::region without a newline; no certificate id anywhere."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / f"{THING}.device.key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    cert_pem = certificate_for(key.public_key(), 200)
    (tmp_path / f"{THING}.device.cert.pem").write_text(cert_pem)
    (tmp_path / f"{THING}.endpoint").write_text("a1b2c3-ats.iot.eu-west-2.amazonaws.com::eu-west-2")
    return gd.StatePaths.for_thing(str(tmp_path), THING), key, cert_pem


def test_a_sample_state_directory_is_used_as_it_is(tmp_path, sample_state, signing_key_file, capsys):
    paths, _, _ = sample_state
    before = {p: open(p, "rb").read() for p in (paths.key, paths.cert, paths.endpoint)}
    with Renewals() as server:
        assert run_client(server.url, signing_key_file, tmp_path) == 0
    assert server.requests == []  # neither provisioned again nor called damaged
    assert {p: open(p, "rb").read() for p in before} == before  # nothing written: the sample could still read it
    assert "region: eu-west-2, endpoint: a1b2c3-ats.iot.eu-west-2.amazonaws.com" in capsys.readouterr().out
    assert gd.read_endpoint(paths.endpoint)["endpointPort"] == 8883


def test_a_sample_device_renews_with_the_certificate_id_derived_and_its_state_is_upgraded(tmp_path, sample_state,
                                                                                         signing_key_file):
    paths, key, cert_pem = sample_state
    derived = hashlib.sha256(x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(
        serialization.Encoding.DER)).hexdigest()
    with Renewals() as server:
        assert run_client(server.url, signing_key_file, tmp_path, "--renew") == 0
    body = server.requests[0]["body"]
    assert body["certificateId"] == derived
    csr_hash = hashlib.sha256(body["CSR"].encode()).hexdigest()
    text = f"renew-v1\n{THING}\n{derived}\n{body['timestamp']}\n{body['nonce']}\n{csr_hash}"
    assert verifies(key.public_key(), body["signature"], text)
    assert json.loads(open(paths.endpoint).read())["certificateId"] == "b" * 64  # ours now, JSON
    assert open(paths.previous().endpoint).read() == "a1b2c3-ats.iot.eu-west-2.amazonaws.com::eu-west-2"


def test_the_derived_certificate_id_is_the_local_cas(tmp_path):
    """The local CA's id, as the service records it, is what the device derives (AWS IoT's: see certificate_id_of)."""
    from chalicelib.adapters.issuers.local_ca import LocalIssuer, local_endpoints
    issuer = LocalIssuer(tmp_path / "ca", local_endpoints(["eu-west-2"], "localhost", 18883))
    csr = x509.load_pem_x509_csr(gd.make_csr(THING, ec.generate_private_key(ec.SECP256R1())).encode())
    issued = issuer.issue(THING, "eu-west-2", csr)
    (tmp_path / "cert.pem").write_text(issued.certificate_pem)
    assert gd.certificate_id_of(str(tmp_path / "cert.pem")) == issued.certificate_id
    assert gd.certificate_id_of(str(tmp_path / "missing.pem")) is None
