"""Renewal through the HTTP route: on the prod stage's wiring (DynamoDB, AWS IoT in several regions, moto) the AWS
actions a renewal and a move really call are all granted by .chalice/policy-prod.json (no new ones); on the local
stage, the log line and the metrics."""
import json

import boto3

from chalicelib.domain.requests import ProvisioningRequest, RenewalRequest
from tests import test_prod_stage
from tests.conftest import LONDON_IP, TOKYO_IP, api, make_csr
from tests.test_observability import lines, metrics
from tests.test_prod_stage import _policy_actions, _record_actions, body
from tests.test_renewal import renewal_body

prod = test_prod_stage.prod  # the prod stage's settings and AWS under moto

def test_renewal_and_move_on_prod_call_only_granted_actions(prod):
    settings, fleet_key, http, parts = prod
    http.answers[LONDON_IP] = {"latitude": 51.5, "longitude": -0.12, "country_code": "GB"}
    http.answers[TOKYO_IP] = {"latitude": 35.7, "longitude": 139.7, "country_code": "JP"}
    csr_pem, key = make_csr("mydevice1")
    first = parts.provisioning.provision(ProvisioningRequest.from_body(body(fleet_key, "mydevice1", csr_pem)),
                                       LONDON_IP)
    assert first.choice.region == "eu-west-2"
    actions: set = set()
    _record_actions(parts, actions)
    with api("prod", parts) as client:
        def renew(certificate_id, signing_key, ip):
            new_csr, new_key = make_csr("mydevice1")
            response = client.http.post("/device-renewal", headers={"Content-Type": "application/json"},
                                        body=json.dumps(renewal_body("mydevice1", certificate_id, signing_key,
                                                                     new_csr)))
            assert response.status_code == 200, response.body
            return json.loads(response.body), new_key

        # chalice's test gateway reports 127.0.0.1 (prod ignores X-Forwarded-For): an unknown place stays put.
        in_place, key = renew(first.issued.certificate_id, key, LONDON_IP)
        assert (in_place["region"], in_place["reason"]) == ("eu-west-2", "renewal")
    # A move needs a located caller: the same service, called as the route would from Tokyo.
    moved = parts.renewal.renew(RenewalRequest.from_body(renewal_body(
        "mydevice1", in_place["certificateId"], key, make_csr("mydevice1")[0])), TOKYO_IP)
    assert (moved.choice.region, moved.choice.reason) == ("ap-northeast-1", "relocated")
    assert actions <= _policy_actions(), actions - _policy_actions()
    assert {"iot:DeleteThing", "iot:CreateThing", "iot:UpdateCertificate", "dynamodb:UpdateItem"} <= actions
    tokyo, london = (boto3.client("iot", region_name=r) for r in ("ap-northeast-1", "eu-west-2"))
    assert "mydevice1" in [t["thingName"] for t in tokyo.list_things()["things"]]
    assert "mydevice1" not in [t["thingName"] for t in london.list_things()["things"]]
    assert parts.registry.get("mydevice1").region == "ap-northeast-1"


def test_a_renewal_and_a_move_log_one_line_each_and_count_renewed_and_relocated(stage, capsys):
    """The local stage through the HTTP route: one "renewal request" line per request (no key, no signature, no
    certificate in it), and the metrics Renewed / Relocated by region, RenewalRefused by code."""
    csr_pem, key = make_csr("mydevice2")
    with api("local") as client:
        def post(path, body, ip):
            response = client.http.post(path, body=json.dumps(body), headers={
                "Content-Type": "application/json", "X-Forwarded-For": ip})
            return response.status_code, json.loads(response.body)

        status, first = post("/device-provisioning", stage.body("mydevice2", csr_pem), LONDON_IP)
        assert status == 200
        seen = []
        for ip, expected in ((LONDON_IP, "Renewed"), (TOKYO_IP, "Relocated")):
            new_csr, new_key = make_csr("mydevice2")
            body = renewal_body("mydevice2", first["certificateId"], key, new_csr)
            capsys.readouterr()
            status, first = post("/device-renewal", body, ip)
            assert status == 200, first
            records = lines(capsys)
            [log] = [r for r in records if r.get("message") == "renewal request"]
            assert log["outcome"] == expected.lower() and log["region"] == first["region"]
            assert log["certificate_id"] == first["certificateId"]
            assert set(log["steps_ms"]) >= {"verify", "geo", "claim", "issue", "complete", "retire"}
            text = json.dumps(records)
            assert body["signature"] not in text and "PRIVATE KEY" not in text and "CERTIFICATE" not in text
            found = metrics(records)
            assert found[expected][0]["region"] == first["region"] and found[expected][1] == [1.0]
            seen.append(first["region"])
            key = new_key
        assert seen == ["eu-west-2", "ap-northeast-1"]
        capsys.readouterr()
        status, refused = post("/device-renewal", renewal_body("mydevice2", "f" * 64, key), LONDON_IP)
        assert status == 403
        assert metrics(lines(capsys))["RenewalRefused"][0]["code"] == "renewal-refused"
