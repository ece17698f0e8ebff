"""Issue 17: POST /device-renewal on both backends (SQLite + local CA; DynamoDB + AWS IoT under moto).

The service is built by constructor injection; faults come from small wrappers passed in, from botocore event
hooks on the service's own clients, never from patching our modules.
"""
import base64
import json
import secrets
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from admin import operations
from admin.operations import AuditReport, UnfinishedRenewal
from chalicelib.adapters.admission.sqlite import SqliteAdmissionStore
from chalicelib.adapters.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.config import Settings
from chalicelib.domain.admission import DEFAULT_BUDGET, budgets_from
from chalicelib.domain.certificates import CertificateRef
from chalicelib.domain.clock import timestamp
from chalicelib.domain.errors import (
    MalformedRequest,
    RenewalInProgress,
    RenewalRefused,
    ServiceUnavailable,
    SignatureInvalid,
)
from chalicelib.domain.keypolicy import key_fingerprint
from chalicelib.domain.regions import RegionPolicy
from chalicelib.domain.relocation import RelocationPolicy
from chalicelib.domain.requests import RenewalRequest
from chalicelib.domain.signatures import renew_v1_text
from chalicelib.edge.wire import response_body
from chalicelib.services.admission import Admission
from chalicelib.services.renewal import RenewalService
from tests import test_exactly_once
from tests.conftest import LONDON_IP, TOKYO_IP, api, make_csr
from tests.test_exactly_once import DEFAULT, LEASE, REGIONS

backend = test_exactly_once.backend  # the two-backend fixture: SQLite + local CA, DynamoDB + AWS IoT (moto)

EMPTY_AUDIT = AuditReport()


def now() -> datetime:
    return datetime.now(timezone.utc)


def sign(key, text: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(text, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(text, ec.ECDSA(hashes.SHA256()))


def renewal_body(thing: str, certificate_id: str, key, csr_pem: str | None = None, *, stamp: str | None = None,
                 nonce: str | None = None, signed_csr: str | None = None) -> dict:
    """A renew-v1 request signed with `key`; `signed_csr` signs another CSR than the one sent (a CSR swap)."""
    stamp = stamp or timestamp(now())
    nonce = nonce or secrets.token_urlsafe(12)
    text = renew_v1_text(thing, certificate_id, stamp, nonce, signed_csr if signed_csr is not None else csr_pem)
    body = {"thing-name": thing, "certificateId": certificate_id, "timestamp": stamp, "nonce": nonce,
            "signature": base64.b64encode(sign(key, text)).decode()}
    if csr_pem:
        body["CSR"] = csr_pem
    return body


class Device:
    """A provisioned device as it sees itself: its certificate id, its key, its region."""

    def __init__(self, b, thing: str, ip: str = LONDON_IP):
        csr_pem, self.key = make_csr(thing)
        result = b.service().provision(b.request(thing, csr_pem), ip)
        self.thing, self.certificate_id, self.region = thing, result.issued.certificate_id, result.choice.region

    def body(self, csr_pem: str | None = None, **kw) -> dict:
        return renewal_body(self.thing, self.certificate_id, self.key, csr_pem, **kw)

    def request(self, csr_pem: str | None = None, **kw) -> RenewalRequest:
        return RenewalRequest.from_body(self.body(csr_pem, **kw))

    def took(self, result, key) -> None:
        """The device stores the answer: the new certificate and the key it goes with."""
        self.certificate_id, self.region, self.key = result.issued.certificate_id, result.choice.region, key


def renewals(b, relocation: str = "distance:1000", **parts) -> RenewalService:
    args = {"registry": b.registry, "issuer": b.issuer, "locator": b.locator,
            "regions": RegionPolicy(REGIONS, DEFAULT), "relocation": RelocationPolicy.parse(relocation),
            "lease_seconds": LEASE}
    args.update(parts)
    return RenewalService(**args)


def cert_key_fingerprint(pem: str) -> str:
    return key_fingerprint(x509.load_pem_x509_certificate(pem.encode()).public_key())


def assert_renewed(b, device: Device, result, previous: str) -> None:
    """One active certificate, the new one, in one region; the registry says so and keeps the history."""
    item = b.registry.get(device.thing)
    assert item.status == "provisioned"
    assert item.certificate_id == result.issued.certificate_id != previous
    assert item.region == result.choice.region
    assert item.previous_certificate_id == previous
    assert b.active_certificates(device.thing) == {(result.choice.region, result.issued.certificate_id)}
    if b.name == "local":
        assert b.issuer.certificate(previous).status == "REVOKED"
    else:
        assert b.things(device.thing) == [result.choice.region]
    assert b.audit() == EMPTY_AUDIT


# ------------------------------------------------------------------------------------------- renewal in place

def test_renewal_in_place_with_a_csr_gives_a_certificate_for_the_new_key(backend):
    b = backend
    device = Device(b, "dev-1")
    csr_pem, new_key = make_csr("dev-1")
    result = renewals(b).renew(device.request(csr_pem), LONDON_IP)

    body = response_body(result)
    assert body["status"] == "success" and body["reason"] == "renewal" and body["region"] == "eu-west-2"
    assert body["previousCertificateId"] == device.certificate_id and "PrivateKey" not in body
    assert body["thingName"] == "dev-1" and body["endpointAddress"] and body["endpointPort"]
    if b.name == "local":  # moto's CreateCertificateFromCsr signs a key of its own (see test_issuer_contract)
        assert cert_key_fingerprint(body["certificatePem"]) == key_fingerprint(new_key.public_key())
    assert_renewed(b, device, result, device.certificate_id)
    item = b.registry.get("dev-1")
    assert item.renewal_count == 1 and item.last_renewal

    # And again, signed with the new key: the history grows.
    first = result.issued.certificate_id
    device.took(result, new_key)
    csr_pem, _ = make_csr("dev-1")
    again = renewals(b).renew(device.request(csr_pem), LONDON_IP)
    assert_renewed(b, device, again, first)
    assert b.registry.get("dev-1").renewal_count == 2


def test_renewal_without_a_csr_makes_the_key_on_the_server(backend):
    b = backend
    device = Device(b, "dev-2")
    result = renewals(b).renew(device.request(), LONDON_IP)
    body = response_body(result)
    assert body["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    key = serialization.load_pem_private_key(body["PrivateKey"].encode(), None)
    assert cert_key_fingerprint(body["certificatePem"]) == key_fingerprint(key.public_key())
    assert_renewed(b, device, result, device.certificate_id)
    # The server-made key signs the next renewal.
    device.took(result, key)
    assert renewals(b).renew(device.request(make_csr("dev-2")[0]), LONDON_IP).issued.certificate_id


# ------------------------------------------------------------------------------------------- refusals

def test_every_refusal_is_one_identical_403_and_changes_nothing(backend):
    b = backend
    device = Device(b, "dev-1")
    other = Device(b, "dev-2")
    revoked = Device(b, "dev-3")
    b.issuer.revoke(CertificateRef(revoked.region, revoked.certificate_id, "dev-3"), delete_thing=True)
    stranger = ec.generate_private_key(ec.SECP256R1())
    cases = {
        "not registered": renewal_body("nobody", device.certificate_id, device.key),
        "registered, not provisioned": renewal_body("dev-4", device.certificate_id, device.key),
        "wrong certificate id": renewal_body("dev-1", other.certificate_id, device.key),
        "made-up certificate id": renewal_body("dev-1", "ab" * 32, device.key),
        "wrong key": renewal_body("dev-1", device.certificate_id, stranger),
        "another device's key": renewal_body("dev-1", device.certificate_id, other.key),
        "revoked certificate": revoked.body(make_csr("dev-3")[0]),
        "CSR swapped": device.body(make_csr("dev-1")[0], signed_csr=make_csr("dev-1")[0]),
        "CSR dropped": device.body(None, signed_csr=make_csr("dev-1")[0]),
    }
    before = {thing: b.registry.get(thing) for thing in ("dev-1", "dev-2", "dev-3", "dev-4")}
    active = b.all_active_certificates()
    answers = set()
    with api(_stage(b), b.parts) as client:
        for case, body in cases.items():
            response = client.http.post("/device-renewal", headers={"Content-Type": "application/json"},
                                        body=json.dumps(body))
            assert response.status_code == 403, (case, response.body)
            answers.add(response.body)
    assert len(answers) == 1
    assert json.loads(answers.pop())["code"] == "renewal-refused"
    assert {thing: b.registry.get(thing) for thing in before} == before
    assert b.all_active_certificates() == active


def _stage(b) -> str:
    return "local" if b.name == "local" else "prod"


def test_stale_timestamp_replay_and_same_key(backend):
    b = backend
    device = Device(b, "dev-1")
    service = renewals(b)
    with pytest.raises(SignatureInvalid) as stale:
        service.renew(device.request(stamp=timestamp(now() - timedelta(minutes=10))), LONDON_IP)
    assert stale.value.code == "stale-timestamp"
    with pytest.raises(MalformedRequest, match="must differ"):
        service.renew(device.request(make_csr("dev-1", device.key)[0]), LONDON_IP)

    # A nonce is used once: a request made again with a used nonce is refused, even correctly signed.
    first = device.body(nonce="nonce-1")
    result = service.renew(RenewalRequest.from_body(first), LONDON_IP)
    device.took(result, serialization.load_pem_private_key(result.issued.private_key_pem.encode(), None))
    with pytest.raises(SignatureInvalid) as replay:
        service.renew(device.request(nonce="nonce-1"), LONDON_IP)
    assert replay.value.code == "replayed-request"
    # The identical first request again (no CSR: no lost-answer recovery possible): right after the renewal it
    # lost a race (409), a lease's time later it names a stale certificate (the one 403).
    with pytest.raises(RenewalInProgress):
        service.renew(RenewalRequest.from_body(first), LONDON_IP)
    later = renewals(b, clock=lambda: now() + timedelta(seconds=LEASE + 1), skew_seconds=LEASE + 300)
    with pytest.raises(RenewalRefused):
        later.renew(RenewalRequest.from_body(first), LONDON_IP)
    assert b.registry.get("dev-1").certificate_id == device.certificate_id
    assert b.active_certificates("dev-1") == {(device.region, device.certificate_id)}


def test_malformed_renewal_requests_are_400(backend):
    b = backend
    device = Device(b, "dev-1")
    good = device.body()
    bad = [{**good, "certificateId": ""}, {**good, "certificateId": "../etc"}, {**good, "signature": "not base64!"},
           {**good, "timestamp": "yesterday"}, {**good, "CSR": "junk"}, {k: v for k, v in good.items() if k != "nonce"},
           {**good, "thing-name": "a/b"}, [good]]
    with api(_stage(b), b.parts) as client:
        for body in bad:
            response = client.http.post("/device-renewal", headers={"Content-Type": "application/json"},
                                        body=json.dumps(body))
            assert response.status_code == 400, (body, response.body)
        response = client.http.post("/device-renewal", body=b"{" + b" " * 17000 + b"}")
        assert response.status_code == 413
    assert b.registry.get("dev-1").renewal_count == 0


# ------------------------------------------------------------------------------------------- exactly once

def test_lost_answer_gives_the_same_certificate_and_creates_nothing(backend):
    b = backend
    device = Device(b, "dev-1")
    csr_pem, new_key = make_csr("dev-1")
    body = device.body(csr_pem)
    service = renewals(b)
    first = service.renew(RenewalRequest.from_body(body), LONDON_IP)   # the answer is lost on the way
    issued = b.certificate_records("dev-1")

    same = service.renew(RenewalRequest.from_body(body), LONDON_IP)    # the identical request again
    fresh = service.renew(device.request(csr_pem), LONDON_IP)          # or signed afresh, same CSR
    for again in (same, fresh):
        assert again.recovered
        assert response_body(again) == response_body(first)
    assert b.certificate_records("dev-1") == issued
    assert_renewed(b, device, first, device.certificate_id)
    # The recovered device goes on normally.
    device.took(first, new_key)
    assert service.renew(device.request(make_csr("dev-1")[0]), LONDON_IP).previous_certificate_id \
        == first.issued.certificate_id


def test_fifty_identical_concurrent_renewals_issue_one_certificate(backend):
    b = backend
    if b.name == "aws":  # as in test_registry_contract: moto's conditional writes are not atomic across threads
        pytest.skip("moto cannot show DynamoDB's conditional-write atomicity under concurrent requests")
    device = Device(b, "dev-1")
    body = device.body(make_csr("dev-1")[0])
    service = renewals(b)
    issued_before = b.certificate_records("dev-1")
    start, results, lock = threading.Barrier(50), [], threading.Lock()

    def renew():
        start.wait()
        try:
            outcome = service.renew(RenewalRequest.from_body(body), LONDON_IP)
        except RenewalInProgress as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=renew) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = [r for r in results if not isinstance(r, Exception)]
    busy = [r for r in results if isinstance(r, RenewalInProgress)]
    assert len(answered) + len(busy) == 50 and answered
    assert {r.issued.certificate_id for r in answered} == {b.registry.get("dev-1").certificate_id}
    assert len({json.dumps(response_body(r), sort_keys=True) for r in answered}) == 1
    assert all(r.retry_after >= 1 for r in busy)
    assert b.certificate_records("dev-1") == issued_before + 1
    assert_renewed(b, device, answered[0], device.certificate_id)


def test_a_renewal_in_flight_answers_409_with_retry_after(backend):
    b = backend
    device = Device(b, "dev-1")
    b.registry.begin_renewal("dev-1", device.certificate_id, now(), LEASE)  # another request holds the lease
    with api(_stage(b), b.parts) as client:
        response = client.http.post("/device-renewal", headers={"Content-Type": "application/json"},
                                    body=json.dumps(device.body(make_csr("dev-1")[0])))
    assert response.status_code == 409 and json.loads(response.body)["code"] == "renewal-in-progress"
    assert int(response.headers["Retry-After"]) in range(1, 31)


# ------------------------------------------------------------------------------------------- relocation

@pytest.mark.parametrize("setting, moves", [("never", False), ("nearest", True), ("distance:1000", True),
                                            ("distance:10000", False)])
def test_relocation_london_to_tokyo_under_each_policy(backend, setting, moves):
    b = backend
    device = Device(b, "dev-1", LONDON_IP)
    assert device.region == "eu-west-2"
    result = renewals(b, setting).renew(device.request(make_csr("dev-1")[0]), TOKYO_IP)
    expected = "ap-northeast-1" if moves else "eu-west-2"
    assert (result.choice.region, result.choice.reason) == (expected, "relocated" if moves else "renewal")
    body = response_body(result)
    assert body["region"] == expected and body["endpointAddress"] == b.issuer.endpoint(expected).address
    assert body["endpointPort"] == b.issuer.endpoint(expected).port
    assert_renewed(b, device, result, device.certificate_id)  # aws: the thing lives in the new region only
    item = b.registry.get("dev-1")
    assert item.previous_region == "eu-west-2" and item.region == expected
    if moves:
        assert item.country == "JP" and item.region_reason == "relocated"


def test_a_region_rule_moves_a_device_even_under_never(backend):
    b = backend
    device = Device(b, "dev-1", LONDON_IP)
    rules = RegionPolicy(REGIONS, DEFAULT, countries={"GB": "ap-northeast-1"})  # say, data residency
    result = renewals(b, "never", regions=rules).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    assert (result.choice.region, result.choice.reason) == ("ap-northeast-1", "relocated")
    assert_renewed(b, device, result, device.certificate_id)


# ------------------------------------------------------------------------------------------- faults

class Faulty:
    """A port with one method that fails: before doing anything, or after doing its work (its answer lost)."""

    def __init__(self, inner, method: str, after: bool = False):
        self.inner, self.method, self.after, self.calls = inner, method, after, 0

    def __getattr__(self, name):
        real = getattr(self.inner, name)
        if name != self.method:
            return real

        def call(*args, **kwargs):
            self.calls += 1
            if self.after:
                real(*args, **kwargs)
            raise ServiceUnavailable(f"injected: {name} failed")
        return call


def settle_and_check(b, device: Device, service_parts: dict, ip: str, previous_active: bool = False) -> None:
    """After a fault: the registry names one certificate, the only active one (once the audit ran when the fault
    left something to it); and the device renews again."""
    item = b.registry.get(device.thing)
    current = (item.region, item.certificate_id)
    found = b.audit(now() + timedelta(seconds=LEASE + 1))  # after any renewal lease has ended
    if found != EMPTY_AUDIT:
        assert b.cli("audit", "--fix") == 0
    assert b.audit() == EMPTY_AUDIT
    assert b.active_certificates(device.thing) == {current}
    if b.name == "aws":
        assert b.things(device.thing) == [current[0]]
    assert b.registry.get(device.thing).certificate_id == current[1]
    # The device holds whichever certificate is current now, and renews again with a plain service.
    if current[1] != device.certificate_id:
        device.certificate_id, device.region = current[1], current[0]
        device.key = service_parts["new_key"]
    result = renewals(b, "nearest").renew(device.request(make_csr(device.thing)[0]), ip)
    assert_renewed(b, device, result, current[1])


FAULTS = [  # (port, method, after): where a renewal or a move fails
    ("issuer", "issue", False),   # AWS IoT refuses: nothing was made
    ("issuer", "issue", True),    # made, but the answer was lost: an orphan for the audit
    ("registry", "complete_renewal", False),  # the record fails: the new certificate is undone
    ("registry", "complete_renewal", True),   # recorded, but the answer was lost: it is a success
    ("issuer", "revoke", False),          # the previous certificate stays until the next renewal or the audit
]


@pytest.mark.parametrize("ip", [LONDON_IP, TOKYO_IP], ids=["in-place", "move"])
@pytest.mark.parametrize("port, method, after", FAULTS, ids=[f"{m}-{'after' if a else 'before'}" for _, m, a in FAULTS])
def test_a_fault_at_any_step_leaves_one_active_certificate(backend, ip, port, method, after):
    b = backend
    device = Device(b, "dev-1", LONDON_IP)
    faulty = Faulty(getattr(b, port), method, after)
    csr_pem, new_key = make_csr("dev-1")
    service = renewals(b, "nearest", **{port: faulty})
    try:
        result = service.renew(device.request(csr_pem), ip)
    except ServiceUnavailable:
        result = None
    assert faulty.calls == 1
    succeeded = (method, after) in (("complete_renewal", True), ("revoke", False))
    assert (result is not None) == succeeded
    item = b.registry.get("dev-1")
    assert item.certificate_id == (result.issued.certificate_id if succeeded else device.certificate_id)
    if method == "revoke":  # the answer went out; the previous certificate waits, and the audit knows
        unfinished = b.audit().unfinished_renewals
        assert unfinished == [UnfinishedRenewal("dev-1", device.certificate_id, "eu-west-2", result.choice.region)]
        assert unfinished[0].move == (ip == TOKYO_IP)
    settle_and_check(b, device, {"new_key": new_key}, ip)


def test_the_next_renewal_finishes_an_unfinished_one(backend):
    b = backend
    device = Device(b, "dev-1", LONDON_IP)
    csr_pem, new_key = make_csr("dev-1")
    first = renewals(b, "nearest", issuer=Faulty(b.issuer, "revoke")).renew(device.request(csr_pem), TOKYO_IP)
    assert len(b.active_certificates("dev-1")) == 2
    old = device.certificate_id
    device.took(first, new_key)
    second = renewals(b, "nearest").renew(device.request(make_csr("dev-1")[0]), TOKYO_IP)
    assert_renewed(b, device, second, first.issued.certificate_id)
    assert (("eu-west-2", old)) not in b.active_certificates("dev-1")


def test_a_reset_revokes_the_previous_certificate_whose_retirement_is_pending(backend):
    """A renewal whose revocation of the previous certificate failed leaves it ACTIVE, marked to retire: an operator's
    reset revokes it with the current one (a reset device keeps no working credential), and the audit is clean."""
    b = backend
    device = Device(b, "dev-1", LONDON_IP)
    csr_pem, _ = make_csr("dev-1")
    renewed = renewals(b, "nearest", issuer=Faulty(b.issuer, "revoke")).renew(device.request(csr_pem), LONDON_IP)
    assert b.registry.get("dev-1").retire_pending
    assert b.active_certificates("dev-1") == {("eu-west-2", device.certificate_id),
                                               ("eu-west-2", renewed.issued.certificate_id)}
    assert b.cli("reset", "dev-1") == 0
    assert b.active_certificates("dev-1") == set()
    assert b.registry.get("dev-1").status == "unprovisioned" and b.things("dev-1") == []
    assert b.audit() == EMPTY_AUDIT


def test_aws_faults_from_botocore_hooks(backend):
    """The AWS issuer's own failures: a throttled CreateCertificateFromCsr, a failed attach (issue undoes its own
    steps, and in place never deletes the device's thing) and a failed revocation of the previous certificate."""
    b = backend
    if b.name != "aws":
        pytest.skip("botocore hooks exist on the AWS backend only")
    device = Device(b, "dev-1", LONDON_IP)
    iot = b.iot["eu-west-2"]

    def throttled(**_):
        from botocore.exceptions import ClientError
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}},
                          "CreateCertificateFromCsr")

    def broken(**_):
        raise RuntimeError("injected")

    for event, handler in (("before-call.iot.CreateCertificateFromCsr", throttled),
                           ("before-call.iot.AttachThingPrincipal", broken)):
        iot.meta.events.register(event, handler)
        with pytest.raises(ServiceUnavailable):
            renewals(b).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
        iot.meta.events.unregister(event, handler)
        assert b.active_certificates("dev-1") == {("eu-west-2", device.certificate_id)}
        assert b.things("dev-1") == ["eu-west-2"]
        assert b.look["eu-west-2"].list_thing_principals(thingName="dev-1")["principals"][0].endswith(
            device.certificate_id)
        assert b.audit() == EMPTY_AUDIT
    iot.meta.events.register("before-call.iot.UpdateCertificate", broken)
    result = renewals(b).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    iot.meta.events.unregister("before-call.iot.UpdateCertificate", broken)
    assert b.audit().unfinished_renewals[0].previous_certificate_id == device.certificate_id
    assert b.cli("audit", "--fix") == 0
    assert b.active_certificates("dev-1") == {("eu-west-2", result.issued.certificate_id)}
    assert b.audit() == EMPTY_AUDIT


# ------------------------------------------------------------------------------------------- operators

def test_admin_show_prints_the_renewal_history_and_list_finds_expiring_devices(backend, capsys):
    b = backend
    device = Device(b, "dev-1")
    Device(b, "dev-2")
    capsys.readouterr()
    assert b.cli("show", "dev-2") == 0
    assert json.loads(capsys.readouterr().out)["renewals"] == {"count": 0, "last": None,
                                                               "previous_certificate_id": None,
                                                               "previous_region": None}
    result = renewals(b, "nearest").renew(device.request(make_csr("dev-1")[0]), TOKYO_IP)
    assert b.cli("show", "dev-1") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["renewals"]["count"] == 1 and shown["renewals"]["last"]
    assert shown["renewals"]["previous_certificate_id"] == device.certificate_id
    assert shown["renewals"]["previous_region"] == "eu-west-2"
    assert shown["certificate"]["certificate_id"] == result.issued.certificate_id
    assert shown["certificate"]["region"] == "ap-northeast-1"

    expires = {r.thing_name: r.certificate_expires for r in b.registry.list("provisioned")}
    assert None not in expires.values()
    days = (max(expires.values()) - now()).total_seconds() / 86400
    assert b.cli("list", "--expiring-within", str(days + 1), "--json") == 0
    assert sorted(i["thing_name"] for i in json.loads(capsys.readouterr().out)) == ["dev-1", "dev-2"]
    assert b.cli("list", "--expiring-within", str(days - 2), "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_the_local_ca_issues_certificates_for_the_configured_number_of_days(tmp_path):
    assert Settings.from_env({}).cert_validity_days == 365
    assert Settings.from_env({"GIP_CERT_VALIDITY_DAYS": "7"}).cert_validity_days == 7
    for days in (1, 7, 365):
        issuer = LocalIssuer(tmp_path / "ca", local_endpoints(REGIONS, "localhost", 1), validity_days=days)
        issued = issuer.issue("dev-1", "eu-west-2", x509.load_pem_x509_csr(make_csr("dev-1")[0].encode()))
        cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
        assert abs((cert.not_valid_after_utc - now()) - timedelta(days=days)) < timedelta(minutes=1)


def test_concurrent_renewals_with_different_keys_issue_one_certificate_and_the_rest_get_409(backend):
    b = backend
    if b.name == "aws":
        pytest.skip("moto cannot show DynamoDB's conditional-write atomicity under concurrent requests")
    device = Device(b, "dev-1")
    bodies = [device.body(make_csr("dev-1")[0]) for _ in range(20)]
    service = renewals(b)
    issued_before = b.certificate_records("dev-1")
    start, results = threading.Barrier(len(bodies)), []

    def renew(body):
        start.wait()
        try:
            results.append(service.renew(RenewalRequest.from_body(body), LONDON_IP))
        except RenewalInProgress as exc:
            results.append(exc)

    threads = [threading.Thread(target=renew, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [winner] = [r for r in results if not isinstance(r, Exception)]
    assert len(results) == 20 and all(isinstance(r, RenewalInProgress) for r in results if r is not winner)
    assert b.certificate_records("dev-1") == issued_before + 1
    assert_renewed(b, device, winner, device.certificate_id)


def test_renewals_are_admitted_like_provisioning_in_the_region_they_issue_in(backend, tmp_path):
    """One device per second in every region, and a one-second burst: the first renewal takes the slot, the next
    one (another device, same region) is refused with a slot of its own and changes nothing."""
    b = backend
    first, second = Device(b, "dev-1"), Device(b, "dev-2")
    gate = Admission(SqliteAdmissionStore(tmp_path / "admission.sqlite3"), budgets_from({"*": 1}, DEFAULT_BUDGET))
    service = renewals(b, admission=gate)
    csr_pem, new_key = make_csr("dev-1")
    result = service.renew(first.request(csr_pem), LONDON_IP)
    assert result.issued.certificate_id != first.certificate_id
    before = b.registry.get("dev-2")
    with pytest.raises(ServiceUnavailable) as refused:
        service.renew(second.request(make_csr("dev-2")[0]), LONDON_IP)
    assert refused.value.code == "admission-control" and refused.value.retry_after >= 1
    assert b.registry.get("dev-2") == before  # refused before the renewal lease: nothing changed
    assert b.active_certificates("dev-2") == {(second.region, second.certificate_id)}
    # Tokyo has a schedule of its own: a move there is admitted
    moved = renewals(b, relocation="nearest", admission=gate).renew(second.request(make_csr("dev-2")[0]), TOKYO_IP)
    assert moved.choice.region == "ap-northeast-1"


# ------------------------------------------------------------------------------------------- write-ahead (issue 16)

class Died(BaseException):
    """The process died here: no `except Exception` runs, no rollback (tests/test_renewal_crash.py kills for real)."""


def dies_at(boundary: str):
    def checkpoint(at: str, thing_name: str) -> None:
        if at == boundary:
            raise Died(at)
    return checkpoint


def after_the_lease(b, relocation: str = "nearest") -> RenewalService:
    return renewals(b, relocation, clock=lambda: now() + timedelta(seconds=LEASE + 1), skew_seconds=LEASE + 300)


@pytest.mark.parametrize("same_key", [True, False], ids=["same-csr", "other-key"])
def test_a_move_that_died_is_settled_by_the_devices_retry(backend, same_key):
    """A renewal moving London -> Tokyo dies after issuing there: the audit shows it in flight during the lease; after
    it, the retry with the same CSR completes the move with that very certificate, one with another key revokes it
    and gets a new one. Either way one active certificate, one thing, and a clean audit."""
    b = backend
    device = Device(b, "dev-1", LONDON_IP)
    csr_pem, _ = make_csr("dev-1")
    with pytest.raises(Died):
        renewals(b, "nearest", checkpoint=dies_at("renewal-issued")).renew(device.request(csr_pem), TOKYO_IP)
    [(region, dead)] = b.active_certificates("dev-1") - {(device.region, device.certificate_id)}
    assert region == "ap-northeast-1"
    found = b.audit()
    [flight] = found.in_flight
    assert (flight.thing_name, flight.renewal, flight.region, flight.certificates) == (
        "dev-1", True, "ap-northeast-1", [dead])
    assert flight.age_seconds >= 0 and found.findings == 0
    state = b.audit(now() + timedelta(seconds=LEASE + 1))
    assert [(s.thing_name, s.renewal, s.certificates) for s in state.stuck_claims] == [("dev-1", True, [dead])]

    result = after_the_lease(b).renew(device.request(csr_pem if same_key else make_csr("dev-1")[0]), TOKYO_IP)
    assert (result.choice.region, result.choice.reason) == ("ap-northeast-1", "relocated")
    assert (result.issued.certificate_id == dead) == same_key
    assert_renewed(b, device, result, device.certificate_id)  # the London thing and certificate retired
    if b.name == "local" and not same_key:
        assert b.issuer.certificate(dead).status == "REVOKED"


def test_a_renewal_that_died_before_issuing_leaves_nothing_but_its_lease_and_intent(backend):
    b = backend
    device = Device(b, "dev-1")
    with pytest.raises(Died):
        renewals(b, checkpoint=dies_at("renewal-claimed")).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    # The lease and its write-ahead intent (the device's key), written by one write; no certificate.
    [flight] = b.audit().in_flight
    assert (flight.renewal, flight.certificates, flight.key) == (True, [], "device")
    # Once the lease ends the intent is a dead renewal's: nothing the issuer made is found for it, and it waits
    # for the device's retry (or audit --fix) to settle it.
    found = b.audit(now() + timedelta(seconds=LEASE + 1))
    assert [(s.thing_name, s.renewal, s.certificates) for s in found.stuck_claims] == [("dev-1", True, [])]
    assert (found.orphan_certificates, found.in_flight) == ([], [])
    result = after_the_lease(b).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    assert_renewed(b, device, result, device.certificate_id)  # the audit is clean again


def test_a_renewal_whose_issuer_failed_in_an_unknown_way_is_settled_by_its_own_rollback(backend):
    """The issuer raises something it does not own up to (not a domain error, no IssueIncomplete) after making the
    certificate: the rollback looks for what the write-ahead record says may exist, and revokes it."""
    b = backend

    class Broken:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def issue(self, *args, **kwargs):
            self.inner.issue(*args, **kwargs)
            raise RuntimeError("injected: the issuer's answer was lost")

    device = Device(b, "dev-1")
    with pytest.raises(ServiceUnavailable):
        renewals(b, issuer=Broken(b.issuer)).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    assert b.active_certificates("dev-1") == {(device.region, device.certificate_id)}
    assert b.registry.claims(now()) == [] and b.audit() == EMPTY_AUDIT
    assert "RuntimeError" in b.registry.get("dev-1").last_error


# ------------------------------------------------------------------------------------------- what mutations showed
# Each test below fails on a single change to a security or exactly-once line that the rest of the suite let pass
# (issue 24, item 6); the change it kills is named in its docstring.

def test_the_timestamp_window_is_the_skew_either_way_of_the_servers_clock(backend):
    """A renewal dated more than the skew ahead of the server's clock is refused as one dated behind it, and changes
    nothing; exactly the skew ahead is accepted. (Kills: the skew checked without abs(), or with >=.)"""
    b = backend
    device = Device(b, "dev-1")
    at = now().replace(microsecond=0)  # the stamps have whole seconds
    service = renewals(b, clock=lambda: at, skew_seconds=300)
    before = b.registry.get("dev-1")
    for off in (301, -301):
        with pytest.raises(SignatureInvalid) as stale:
            service.renew(device.request(stamp=timestamp(at + timedelta(seconds=off))), LONDON_IP)
        assert stale.value.code == "stale-timestamp", off
    assert b.registry.get("dev-1") == before
    assert b.active_certificates("dev-1") == {(device.region, device.certificate_id)}
    result = service.renew(device.request(stamp=timestamp(at + timedelta(seconds=300))), LONDON_IP)
    assert_renewed(b, device, result, device.certificate_id)


def test_a_renewals_nonce_is_remembered_for_as_long_as_its_timestamp_is_accepted(backend):
    """A request dated the skew ahead of the server passes the timestamp check until twice the skew later, so its
    nonce is kept that long: a captured request (without a CSR, its answer would carry a new private key) whose
    first use failed after taking the lease is refused when replayed just before then. (Kills: the nonce kept for
    1x the skew.)"""
    b = backend
    device = Device(b, "dev-1")
    at, skew = now().replace(microsecond=0), 300
    captured = device.body(stamp=timestamp(at + timedelta(seconds=skew)))
    with pytest.raises(ServiceUnavailable):  # the lease (and the nonce) taken, then the issuer fails
        renewals(b, issuer=Faulty(b.issuer, "issue"), clock=lambda: at, skew_seconds=skew).renew(
            RenewalRequest.from_body(captured), LONDON_IP)
    replayed_at = at + timedelta(seconds=2 * skew - 1)  # the timestamp is skew - 1 s old: it passes
    with pytest.raises(SignatureInvalid) as replay:
        renewals(b, clock=lambda: replayed_at, skew_seconds=skew).renew(RenewalRequest.from_body(captured), LONDON_IP)
    assert replay.value.code == "replayed-request"
    assert b.registry.get("dev-1").certificate_id == device.certificate_id
    assert b.active_certificates("dev-1") == {(device.region, device.certificate_id)}


def test_a_lost_answer_request_not_signed_by_the_previous_key_gets_the_one_403(backend):
    """Whoever knows a renewed device's previous certificate id and the CSR it sent (neither is secret) but not its
    key gets the one 403, not the device's current certificate. (Kills: the lost-answer rule applied without checking
    the previous key's signature.)"""
    b = backend
    device = Device(b, "dev-1")
    csr_pem, _ = make_csr("dev-1")
    service = renewals(b)
    result = service.renew(device.request(csr_pem), LONDON_IP)
    after = b.registry.get("dev-1")
    stranger = ec.generate_private_key(ec.SECP256R1())
    for key in (stranger, rsa.generate_private_key(public_exponent=65537, key_size=2048)):
        forged = renewal_body("dev-1", device.certificate_id, key, csr_pem)
        with pytest.raises(RenewalRefused):
            service.renew(RenewalRequest.from_body(forged), LONDON_IP)
    assert b.registry.get("dev-1") == after
    # The device itself, signing with its previous key, does get its answer back.
    assert service.renew(device.request(csr_pem), LONDON_IP).issued.certificate_id == result.issued.certificate_id


def test_a_lost_answer_request_replayed_after_the_skew_is_refused_as_stale(backend):
    """The timestamp is checked before the lost-answer rule: a captured lost-answer request replayed once its
    timestamp is out of the window is refused (stale-timestamp) and answered nothing. (Kills: the timestamp
    checked after the lost-answer rule.)"""
    b = backend
    device = Device(b, "dev-1")
    at = now().replace(microsecond=0)
    body = device.body(make_csr("dev-1")[0], stamp=timestamp(at))
    renewals(b, clock=lambda: at).renew(RenewalRequest.from_body(body), LONDON_IP)  # its answer is lost
    assert renewals(b, clock=lambda: at + timedelta(seconds=300)).renew(RenewalRequest.from_body(body),
                                                                         LONDON_IP).recovered
    with pytest.raises(SignatureInvalid) as stale:
        renewals(b, clock=lambda: at + timedelta(seconds=301)).renew(RenewalRequest.from_body(body), LONDON_IP)
    assert stale.value.code == "stale-timestamp"


def test_an_in_place_renewal_undone_after_issuing_keeps_the_devices_thing_and_leaves_nothing(backend):
    """In place the device's thing holds its current certificate: a renewal whose record fails revokes the new
    certificate only; the thing stays with the current certificate attached, the rollback is complete (nothing
    kept for the settler) and the audit is clean. (Kills: the in-place rollback deleting the thing.)"""
    b = backend
    device = Device(b, "dev-1")
    with pytest.raises(ServiceUnavailable):
        renewals(b, registry=Faulty(b.registry, "complete_renewal")).renew(device.request(make_csr("dev-1")[0]),
                                                                           LONDON_IP)
    item = b.registry.get("dev-1")
    assert item.certificate_id == device.certificate_id and "incomplete" not in item.last_error
    assert b.active_certificates("dev-1") == {(device.region, device.certificate_id)}
    if b.name == "aws":
        assert b.things("dev-1") == ["eu-west-2"]
        [principal] = b.look["eu-west-2"].list_thing_principals(thingName="dev-1")["principals"]
        assert principal.endswith(device.certificate_id)
    assert b.audit(now() + timedelta(seconds=LEASE + 1)) == EMPTY_AUDIT


def dead_in_place_renewal(b, device: Device) -> str:
    """An in-place renewal that died after issuing, before recording its certificate's id: returns that id. The
    server's clock runs 30 s behind the issuer's, so the settler's search from the write-ahead time certainly finds
    the device's current certificate too (issued moments before), which it must keep."""
    with pytest.raises(Died):
        renewals(b, clock=lambda: now() - timedelta(seconds=30), checkpoint=dies_at("renewal-issued")).renew(
            device.request(make_csr(device.thing)[0]), LONDON_IP)
    [(_, dead)] = b.active_certificates(device.thing) - {(device.region, device.certificate_id)}
    return dead


def test_audit_fix_of_a_dead_in_place_renewal_revokes_its_certificate_and_keeps_the_devices(backend):
    """(Kills: the settler revoking a certificate it should keep, in the audit's settling of a renewal.)"""
    b = backend
    device = Device(b, "dev-1")
    dead = dead_in_place_renewal(b, device)
    later = now() + timedelta(seconds=LEASE + 1)
    found = b.audit(later)
    assert [(s.thing_name, s.renewal, s.certificates) for s in found.stuck_claims] == [("dev-1", True, [dead])]
    operations.repair(b.registry, b.issuer, found, later, LEASE)
    assert b.active_certificates("dev-1") == {(device.region, device.certificate_id)}
    assert b.audit(later) == EMPTY_AUDIT
    result = after_the_lease(b).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    assert_renewed(b, device, result, device.certificate_id)


def test_a_retry_that_fails_after_settling_a_dead_renewal_leaves_the_device_its_certificate(backend):
    """The retry with another key revokes the dead renewal's certificate, then its own issuance fails: the device's
    current certificate is still active, and it renews with it. (Kills: the settler revoking a certificate it should
    keep, in a retry.)"""
    b = backend
    device = Device(b, "dev-1")
    dead = dead_in_place_renewal(b, device)
    with pytest.raises(ServiceUnavailable):
        renewals(b, issuer=Faulty(b.issuer, "issue"), clock=lambda: now() + timedelta(seconds=LEASE + 1),
                 skew_seconds=LEASE + 300).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    assert b.active_certificates("dev-1") == {(device.region, device.certificate_id)}
    assert dead not in {c for _, c in b.all_active_certificates()}
    result = after_the_lease(b).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    assert_renewed(b, device, result, device.certificate_id)


def test_the_lost_answer_rule_answers_only_a_request_naming_the_previous_certificate(backend):
    """Signed with the previous key and carrying the CSR the renewal was answered for, a request naming another
    certificate than the previous one (the current one, a made-up one) gets the one 403: the retired key alone
    never fetches the current certificate. (Kills: the lost-answer rule without its certificate-id check.)"""
    b = backend
    device = Device(b, "dev-1")
    csr_pem, _ = make_csr("dev-1")
    service = renewals(b)
    result = service.renew(device.request(csr_pem), LONDON_IP)
    after = b.registry.get("dev-1")
    for named in (result.issued.certificate_id, "ab" * 32):
        with pytest.raises(RenewalRefused):
            service.renew(RenewalRequest.from_body(renewal_body("dev-1", named, device.key, csr_pem)), LONDON_IP)
    assert b.registry.get("dev-1") == after


def test_a_lost_answer_whose_certificate_was_revoked_meanwhile_gets_the_one_403(backend):
    """The renewed certificate was revoked at the issuer meanwhile (an operator, in the CA or the AWS console): the
    device asking again for its lost answer gets the one 403, never a success carrying a dead certificate. (Kills:
    the lost-answer rule answering with a certificate that is no longer active.)"""
    b = backend
    device = Device(b, "dev-1")
    csr_pem, _ = make_csr("dev-1")
    service = renewals(b)
    renewed = service.renew(device.request(csr_pem), LONDON_IP).issued
    if b.name == "local":
        b.issuer.revoke(renewed, delete_thing=False)
    else:  # revoked in the console, not deleted: AWS IoT still describes it
        b.look[renewed.region].update_certificate(certificateId=renewed.certificate_id, newStatus="REVOKED")
    with pytest.raises(RenewalRefused):
        service.renew(device.request(csr_pem), LONDON_IP)


def test_a_request_with_the_previous_key_while_a_renewal_may_be_answering_waits_and_changes_nothing(backend):
    """A renewal was recorded and answered, but retiring the previous certificate failed. Within a lease's time of it,
    a request signed with the previous key for another key may be racing that answer: it gets 409, and the recorded
    certificate (the one the answer carries) is neither set aside nor revoked. (Kills: an unanswered renewal
    reopened within the lease window.)"""
    b = backend
    device = Device(b, "dev-1")
    answered = renewals(b, issuer=Faulty(b.issuer, "revoke")).renew(device.request(make_csr("dev-1")[0]),
                                                                    LONDON_IP).issued
    with pytest.raises(RenewalInProgress):
        renewals(b).renew(device.request(make_csr("dev-1")[0]), LONDON_IP)
    item = b.registry.get("dev-1")
    assert (item.certificate_id, item.previous_certificate_id) == (answered.certificate_id, device.certificate_id)
    assert b.active_certificates("dev-1") == {(answered.region, answered.certificate_id),
                                               (device.region, device.certificate_id)}


def test_a_retry_whose_commit_fails_keeps_the_dead_renewals_certificate_for_the_next_try(backend):
    """A move died after issuing in Tokyo. The device's retry (same CSR, after the lease) adopts that certificate,
    then its record fails: the rollback leaves the adopted certificate active and on the write-ahead record (it is
    for the device's own key), so the next retry completes the move with that very certificate, and no second one
    is issued. (Kills: the rollback revoking a certificate it adopted.)"""
    b = backend
    device = Device(b, "dev-1", LONDON_IP)
    csr_pem, _ = make_csr("dev-1")
    with pytest.raises(Died):
        renewals(b, "nearest", checkpoint=dies_at("renewal-issued")).renew(device.request(csr_pem), TOKYO_IP)
    [(_, dead)] = b.active_certificates("dev-1") - {(device.region, device.certificate_id)}
    issued = b.certificate_records("dev-1")
    with pytest.raises(ServiceUnavailable):
        renewals(b, "nearest", registry=Faulty(b.registry, "complete_renewal"),
                 clock=lambda: now() + timedelta(seconds=LEASE + 1), skew_seconds=LEASE + 300).renew(
            device.request(csr_pem), TOKYO_IP)
    assert ("ap-northeast-1", dead) in b.active_certificates("dev-1")
    result = after_the_lease(b).renew(device.request(csr_pem), TOKYO_IP)
    assert result.issued.certificate_id == dead and b.certificate_records("dev-1") == issued
    assert_renewed(b, device, result, device.certificate_id)


def test_a_dead_renewal_with_a_server_made_key_is_never_given_again_without_its_key(backend):
    """A renewal without a CSR died after issuing: its private key died with it. The retry (again without a CSR)
    revokes that certificate and gets a new one with a key that matches it. (Kills: the settler adopting a dead
    attempt's certificate when neither side has a device key.)"""
    b = backend
    device = Device(b, "dev-1")
    with pytest.raises(Died):
        renewals(b, checkpoint=dies_at("renewal-issued")).renew(device.request(), LONDON_IP)
    [(_, dead)] = b.active_certificates("dev-1") - {(device.region, device.certificate_id)}
    result = after_the_lease(b).renew(device.request(), LONDON_IP)
    assert result.issued.certificate_id != dead and result.issued.private_key_pem
    key = serialization.load_pem_private_key(result.issued.private_key_pem.encode(), None)
    assert cert_key_fingerprint(result.issued.certificate_pem) == key_fingerprint(key.public_key())
    assert_renewed(b, device, result, device.certificate_id)
