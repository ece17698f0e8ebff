"""One structured log line and the metrics per request, read back from stdout as CloudWatch would."""
import json

import pytest

from chalicelib.adapters import observability
from tests.conftest import LONDON_IP, TOKYO_IP, api, make_csr


@pytest.fixture
def client(stage):
    with api("local") as c:
        yield c


def post(client, body, ip=LONDON_IP):
    return client.http.post("/device-provisioning", body=json.dumps(body),
                            headers={"Content-Type": "application/json", "X-Forwarded-For": ip})


def lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def request_logs(records):
    return [r for r in records if r.get("message") == "provisioning request"]


def metrics(records):
    """{metric name: (dimensions, value)} from the embedded-metric-format lines."""
    found = {}
    for record in records:
        for directive in record.get("_aws", {}).get("CloudWatchMetrics", []):
            assert directive["Namespace"] == observability.NAMESPACE
            for metric in directive["Metrics"]:
                dims = {d: record[d] for group in directive["Dimensions"] for d in group}
                found[metric["Name"]] = (dims, record[metric["Name"]], metric["Unit"])
    return found


def test_a_provisioning_logs_one_line_with_its_steps_and_no_secret(client, stage, capsys):
    capsys.readouterr()
    csr_pem, _ = make_csr("mydevice2")
    body = stage.body("mydevice2", csr_pem)
    response = post(client, body, ip=TOKYO_IP)
    assert response.status_code == 200
    records = lines(capsys)
    [log] = request_logs(records)
    assert log["thing_name"] == "mydevice2" and log["outcome"] == "provisioned" and log["status"] == 200
    assert (log["region"], log["reason"], log["country"]) == ("ap-northeast-1", "nearest", "JP")
    assert log["request_id"] == response.headers["X-Request-Id"]
    # the claim writes the write-ahead intent; the finalize is the certificate's record (services/saga.py)
    assert set(log["steps_ms"]) == {"verify", "claim", "geo", "issue", "finalize"}
    assert log["duration_ms"] >= sum(log["steps_ms"].values()) * 0.99
    text = json.dumps(records)
    assert body["thing-name-sig"] not in text and "PRIVATE KEY" not in text and "CERTIFICATE" not in text

    found = metrics(records)
    assert found["Provisioned"][:2] == ({"service": observability.SERVICE, "region": "ap-northeast-1"}, [1.0])
    dims, value, unit = found["ProvisioningLatency"]
    assert dims["outcome"] == "provisioned" and unit == "Milliseconds" and value[0] >= 0


def test_a_refusal_logs_its_code_and_counts_it(client, stage, capsys):
    capsys.readouterr()
    response = post(client, stage.body("not-registered-1"))
    assert response.status_code == 403
    records = lines(capsys)
    [log] = request_logs(records)
    assert (log["outcome"], log["status"], log["thing_name"]) == ("not-registered", 403, "not-registered-1")
    assert "region" not in log
    found = metrics(records)
    assert found["Refused"][:2] == ({"service": observability.SERVICE, "code": "not-registered"}, [1.0])
    assert "Provisioned" not in found


def test_bad_input_is_logged_without_a_thing_name(client, capsys):
    capsys.readouterr()
    assert client.http.post("/device-provisioning", body="{nope",
                            headers={"Content-Type": "application/json"}).status_code == 400
    [log] = request_logs(lines(capsys))
    assert log["outcome"] == "malformed-request" and "thing_name" not in log


def test_debug_adds_detail_but_still_no_secret(client, stage, capsys):
    observability.logger.setLevel("DEBUG")
    try:
        capsys.readouterr()
        body = stage.body("mydevice3")
        response = post(client, body)
    finally:
        observability.logger.setLevel("INFO")
    records = lines(capsys)
    [detail] = [r for r in records if r.get("message") == "provisioning detail"]
    assert detail["signature_version"] == 1 and detail["csr"] is False and detail["client_ip"] == LONDON_IP
    assert detail["certificate_id"] == json.loads(response.body)["certificateId"]
    assert body["thing-name-sig"] not in json.dumps(records) and "PRIVATE KEY" not in json.dumps(records)
