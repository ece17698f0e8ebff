"""The HTTP API through chalice.test.Client, on a real local stage (SQLite registry, local CAs, bundled DB-IP City Lite)."""
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.adapters.registry.items import item_of
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import Settings
from chalicelib.container import Container
from chalicelib.domain.clock import utcnow
from tests.conftest import LONDON_IP, SYDNEY_IP, TOKYO_IP, api, make_csr, sign_v1, v2_body
from tests.test_provisioning import Clock


@pytest.fixture
def parts(stage):
    """The stage's container, built from the environment on the first request (after a test's own settings)."""
    return Container()


@pytest.fixture
def client(parts):
    with api("local", parts) as c:
        yield c


def post(client, body, ip=LONDON_IP, raw=None):
    response = client.http.post("/device-provisioning",
                                headers={"Content-Type": "application/json", "X-Forwarded-For": ip},
                                body=raw if raw is not None else json.dumps(body))
    return response.status_code, json.loads(response.body)


def registry(stage):
    return SqliteRegistry(stage.state_dir / "registry.sqlite3")


def ca_certificate(stage, region):
    return x509.load_pem_x509_certificate((stage.state_dir / "ca" / region / "ca.cert.pem").read_bytes())


def assert_issued_by(cert, ca):
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)  # raises when the signature or names do not chain


def test_health(client):
    response = client.http.get("/health")
    assert response.status_code == 200
    assert json.loads(response.body)["stage"] == "local"


def test_without_csr_the_server_makes_the_key_pair(client, stage):
    status, body = post(client, stage.body("mydevice1"), ip=LONDON_IP)
    assert status == 200, body
    assert body["status"] == "success" and body["thingName"] == "mydevice1"
    assert body["region"] == "eu-west-2" and body["reason"] == "nearest"
    assert body["distance"] >= 0 and body["distance"] < 100  # the bundled DB-IP data puts this address 45 km from the region
    assert body["endpointAddress"] == "localhost"
    assert body["endpointPort"] == 18883 + Settings.from_env().enabled_regions.index("eu-west-2")
    cert = x509.load_pem_x509_certificate(body["certificatePem"].encode())
    key = serialization.load_pem_private_key(body["PrivateKey"].encode(), password=None)
    assert body["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject.rfc4514_string() == "CN=mydevice1"
    assert_issued_by(cert, ca_certificate(stage, "eu-west-2"))

    item = registry(stage).get("mydevice1")
    assert item.status == "provisioned"
    assert item.region == "eu-west-2"
    assert item.certificate_id == body["certificateId"]
    assert item_of(item)["prov_datetime"].endswith("Z")


def test_with_csr_the_certificate_carries_the_csr_key(client, stage):
    csr_pem, device_key = make_csr("mydevice2")
    status, body = post(client, stage.body("mydevice2", csr_pem), ip=TOKYO_IP)
    assert status == 200, body
    assert body["region"] == "ap-northeast-1"
    assert "PrivateKey" not in body
    cert = x509.load_pem_x509_certificate(body["certificatePem"].encode())
    assert cert.public_key() == device_key.public_key()
    assert_issued_by(cert, ca_certificate(stage, "ap-northeast-1"))
    # A certificate of one region does not chain to another region's CA.
    with pytest.raises(Exception):
        cert.verify_directly_issued_by(ca_certificate(stage, "eu-west-2"))
    assert registry(stage).get("mydevice2").region == "ap-northeast-1"


def test_wrong_signature_is_refused_and_changes_nothing(client, stage):
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = {"thing-name": "mydevice3", "thing-name-sig": sign_v1(impostor, "mydevice3")}
    status, answer = post(client, body)
    assert status == 403
    assert answer == {"status": "error", "code": "invalid-signature", "message": answer["message"]}
    assert registry(stage).get("mydevice3").status == "unprovisioned"


def test_signature_for_another_thing_is_refused(client, stage):
    body = {"thing-name": "mydevice3", "thing-name-sig": stage.body("mydevice4")["thing-name-sig"]}
    assert post(client, body)[0] == 403


def test_already_provisioned_is_409_and_keeps_the_first_certificate(client, stage, monkeypatch):
    monkeypatch.setenv("GIP_REKEY_WINDOW_SECONDS", "0")  # no re-key: an operator resets
    first = post(client, stage.body("mydevice1"))[1]
    status, body = post(client, stage.body("mydevice1"))
    assert status == 409 and body["status"] == "error" and body["code"] == "already-provisioned"
    assert registry(stage).get("mydevice1").certificate_id == first["certificateId"]


def test_a_lost_server_made_key_is_rekeyed_once_within_the_window_and_refused_after_it(stage, monkeypatch):
    """GIP_REKEY_WINDOW_SECONDS: from a lease's time after the provisioning (its answer is over by then) until the
    window's end, the device asking again without a CSR (signed v2) gets a new certificate and key, the old one
    revoked. A duplicate one second after the re-key waits (409, Retry-After): the certificate the re-key answered
    with stays active. A request signed v1 is never re-keyed."""
    monkeypatch.setenv("GIP_CLAIM_LEASE_SECONDS", "60")
    monkeypatch.setenv("GIP_REKEY_WINDOW_SECONDS", "900")
    clock = Clock(utcnow())
    parts = Container(clock=clock)  # the stage's settings (lease, re-key window), on a clock moved by hand
    with api("local", parts) as client:
        first = post(client, v2_body(stage.fleet_key, "mydevice1", at=clock()))[1]
        clock.advance(61)
        status, body = post(client, v2_body(stage.fleet_key, "mydevice1", at=clock()))
        assert (status, body["reason"]) == (200, "rekeyed"), body
        assert body["certificateId"] != first["certificateId"] and "PrivateKey" in body
        key = serialization.load_pem_private_key(body["PrivateKey"].encode(), password=None)
        assert x509.load_pem_x509_certificate(body["certificatePem"].encode()).public_key() == key.public_key()
        issuer = parts.issuer
        assert not issuer.certificate(first["certificateId"], "eu-west-2").active
        clock.advance(1)
        response = client.http.post("/device-provisioning", body=json.dumps(v2_body(stage.fleet_key, "mydevice1",
                                                                                    at=clock())),
                                    headers={"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP})
        duplicate = json.loads(response.body)
        assert (response.status_code, duplicate["code"]) == (409, "provisioning-in-progress"), duplicate
        assert response.headers["Retry-After"] == "59"
        status, v1 = post(client, stage.body("mydevice1"))
        assert (status, v1["code"]) == (409, "already-provisioned") and "signed v2" in v1["message"]
        assert issuer.certificate(body["certificateId"], "eu-west-2").active
        assert registry(stage).get("mydevice1").certificate_id == body["certificateId"]
        clock.advance(900)  # the window counts from the provisioning: it is over now
        status, late = post(client, v2_body(stage.fleet_key, "mydevice1", at=clock()))
        assert (status, late["code"]) == (409, "already-provisioned") and "operator must reset" in late["message"]
        assert registry(stage).get("mydevice1").certificate_id == body["certificateId"]
        assert issuer.certificate(body["certificateId"], "eu-west-2").active


def test_a_device_provisioned_with_its_own_key_is_never_rekeyed_without_a_csr(client, parts, stage):
    csr_pem, _ = make_csr("mydevice2")
    first = post(client, stage.body("mydevice2", csr_pem))[1]
    status, body = post(client, stage.body("mydevice2", version=2))
    assert (status, body["code"]) == (409, "already-provisioned")
    assert parts.issuer.certificate(first["certificateId"], "eu-west-2").active


def test_unknown_device_is_403(client, stage):
    status, body = post(client, stage.body("not-on-the-list"))
    assert status == 403 and body["code"] == "not-registered"
    assert registry(stage).get("not-on-the-list") is None


def test_unknown_location_gets_the_default_region_with_a_message(client, stage):
    status, body = post(client, stage.body("mydevice5"), ip="10.1.2.3")
    assert status == 200, body
    assert body["region"] == "eu-west-2" and body["reason"] == "default" and body["distance"] is None
    assert "unknown" in body["message"]


def test_another_continent_gets_its_nearest_region(client, stage):
    status, body = post(client, stage.body("mydevice4"), ip=SYDNEY_IP)
    assert status == 200 and body["region"] == "ap-southeast-2"


@pytest.mark.parametrize("raw, code", [
    ("not json", "malformed-request"),
    ("[1, 2]", "malformed-request"),
    ("\"text\"", "malformed-request"),
    ("{}", "missing-field"),
    (json.dumps({"thing-name": "mydevice1"}), "missing-field"),
    (json.dumps({"thing-name-sig": "AAAA"}), "missing-field"),
    (json.dumps({"thing-name": 7, "thing-name-sig": "AAAA"}), "malformed-request"),
    (json.dumps({"thing-name": "mydevice1", "thing-name-sig": ["AAAA"]}), "malformed-request"),
    (json.dumps({"thing-name": "mydevice1", "thing-name-sig": "%%% not base64"}), "malformed-signature"),
    (json.dumps({"thing-name": "mydevice1", "thing-name-sig": "AAAA", "CSR": "-----BEGIN nonsense"}),
     "malformed-csr"),
    (json.dumps({"thing-name": "mydevice1", "thing-name-sig": "AAAA", "CSR": 12}), "malformed-csr"),
])
def test_malformed_bodies_are_400_and_change_nothing(client, stage, raw, code):
    status, body = post(client, None, raw=raw)
    assert status == 400, body
    assert body["status"] == "error" and body["code"] == code and body["message"]
    assert all(record.status == "unprovisioned" for record in registry(stage).list())


def test_csr_with_a_broken_self_signature_is_400(client, stage):
    csr_pem, _ = make_csr("mydevice1")
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    status, body = post(client, stage.body("mydevice1", tampered))
    assert status == 400 and body["code"] == "malformed-csr"
    assert registry(stage).get("mydevice1").status == "unprovisioned"


def test_body_too_large_is_413(client, stage):
    body = stage.body("mydevice1")
    body["padding"] = "x" * 20000
    status, answer = post(client, body)
    assert status == 413 and answer["code"] == "body-too-large"


def test_missing_fleet_key_is_a_clear_503_not_a_crash(client, stage):
    (stage.state_dir / "keys" / "global-provisioning.pub.key.pem").unlink()
    status, body = post(client, stage.body("mydevice1"))
    assert status == 503 and body["code"] == "service-misconfigured"
    assert registry(stage).get("mydevice1").status == "unprovisioned"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/octet-stream", "application/json; charset=utf-8", "nonsense"])
def test_a_json_body_is_accepted_whatever_its_content_type(client, stage, content_type):
    headers = {"X-Forwarded-For": LONDON_IP, **({"Content-Type": content_type} if content_type else {})}
    response = client.http.post("/device-provisioning", headers=headers, body=json.dumps(stage.body("mydevice1")))
    assert response.status_code == 200, response.body
    assert json.loads(response.body)["region"] == "eu-west-2"


@pytest.mark.parametrize("method, path", [("GET", "/device-provisioning"), ("PUT", "/device-provisioning"),
                                          ("POST", "/health"), ("DELETE", "/health")])
def test_a_method_the_path_does_not_have_gets_api_gateways_answer(client, stage, method, path):
    response = client.http.request(method, path, headers={"Content-Type": "application/json"},
                                   body=json.dumps(stage.body("mydevice1")).encode())
    assert (response.status_code, json.loads(response.body)) == (403, {"message": "Missing Authentication Token"})
    assert registry(stage).get("mydevice1").status == "unprovisioned"
