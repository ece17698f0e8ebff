"""GET /health tells the truth (issue 16): each part checked, the answer cached a few seconds, 503 naming the
failing part, `degraded` with 200 when provisioning works on a fallback; the same facts in the log and a metric."""
import json
import os
import re

import boto3
import pytest
from moto import mock_aws

from chalicelib.adapters.geo import Backoff
from chalicelib.container import Container
from chalicelib.edge.health import Health, log_and_count, served_by_stack, stack_probes
from devstack.stack import StackStatus, free_port
from tests.conftest import LONDON_IP, TOKYO_IP, api, make_csr
from tests.fake_ipstack import FakeIpstack


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_parts_are_ok_degraded_or_failing_and_the_answer_is_cached(capsys):
    clock, runs = Clock(), []
    state = {"registry": None}

    def registry() -> None:
        runs.append("registry")
        if state["registry"]:
            raise RuntimeError(state["registry"])

    health = Health({"registry": registry, "geolocation": lambda: "ipstack refused; on the bundled database"},
                    log_and_count, ttl=5, clock=clock)
    assert health.check() == {"status": "degraded", "checks": {
        "registry": {"status": "ok"},
        "geolocation": {"status": "degraded", "detail": "ipstack refused; on the bundled database"}}}
    out = capsys.readouterr().out
    assert '"message":"health"' in out and '"health":"degraded"' in out  # the structured log line
    assert '"HealthCheckNotOk":[1.0]' in out and '"part":"geolocation"' in out  # and its metric

    state["registry"] = "disk gone"
    clock.now = 4.9
    assert health.check()["status"] == "degraded" and runs == ["registry"]  # cached: no probe run
    clock.now = 5.1
    failing = health.check()
    assert failing["status"] == "failing" and runs == ["registry", "registry"]
    assert failing["checks"]["registry"] == {"status": "failing", "detail": "disk gone"}


def test_a_missing_fleet_key_is_a_503_naming_it_and_the_other_parts_are_ok(stage):
    (stage.state_dir / "keys" / "global-provisioning.pub.key.pem").unlink()
    with api("local") as client:
        response = client.http.get("/health")
    answer = json.loads(response.body)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    assert answer["status"] == "error" and answer["code"] == "unhealthy"
    assert answer["message"].startswith("not ready: fleet_key: fleet provisioning public key not found")
    assert {part: check["status"] for part, check in answer["checks"].items()} == {
        "registry": "ok", "issuer": "ok", "geolocation": "ok", "fleet_key": "failing", "free_space": "ok"}


def test_a_healthy_local_stage_says_ok(stage):
    with api("local") as client:
        response = client.http.get("/health")
    answer = json.loads(response.body)
    assert response.status_code == 200 and answer["status"] == "ok", answer
    # No local stack serves this process: no broker parts (make local's chalice local has them, test_broker).
    assert set(answer["checks"]) == {"registry", "issuer", "geolocation", "fleet_key", "free_space"}


def _ipstack_on_the_local_stage(monkeypatch, tmp_path, url: str) -> None:
    """The local stage with ipstack in front of the bundled database (key in SSM under moto, ipstack a stand-in)."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                        "GIP_IPSTACK_KEY_PARAMETER": "/gip/ipstack-key", "GIP_IPSTACK_URL": url,
                        # as the stage's config says; set here because the settings are rebuilt outside a request
                        "GIP_TRUST_FORWARDED_FOR": "true"}.items():
        monkeypatch.setenv(name, value)


def _uncached(backoff: Backoff | None = None) -> Container:
    """The stage's container with /health answered afresh at each call (not cached for 5 s), and `backoff`."""
    return Container(ipstack_backoff=backoff, health_cache_seconds=0)


def _get_health(client) -> tuple[int, dict]:
    response = client.http.get("/health")
    return response.status_code, json.loads(response.body)


def _provision(client, stage, thing: str, ip: str) -> dict:
    response = client.http.post("/device-provisioning", body=json.dumps(stage.body(thing, make_csr(thing)[0])),
                                headers={"Content-Type": "application/json", "X-Forwarded-For": ip})
    assert response.status_code == 200, response.body
    return json.loads(response.body)


@pytest.mark.parametrize("outage", ["refused", "unreachable"])
def test_ipstack_held_off_by_its_back_off_is_degraded_until_it_answers(stage, monkeypatch, tmp_path, capsys, outage):
    clock = Clock()
    with mock_aws(), FakeIpstack() as ipstack:
        boto3.client("ssm", region_name="eu-west-2").put_parameter(Name="/gip/ipstack-key", Value="k",
                                                                   Type="SecureString")
        # refused: the stand-in knows no address (404, success false); unreachable: nothing listens there
        down = ipstack.url if outage == "refused" else f"http://127.0.0.1:{free_port()}/{{ip}}"
        _ipstack_on_the_local_stage(monkeypatch, tmp_path, down)
        backoff = Backoff("ipstack", clock=clock)
        with api("local", _uncached(backoff)) as client:
            status, answer = _get_health(client)
            assert status == 200 and answer["status"] == "ok", answer  # configured, not failed yet
            assert _provision(client, stage, "mydevice1", LONDON_IP)["region"] == "eu-west-2"  # the bundled database
            status, answer = _get_health(client)
            assert status == 200 and answer["status"] == "degraded", answer
            geo = answer["checks"]["geolocation"]
            reason = "refused: HTTP 404" if outage == "refused" else "unreachable: "
            assert geo["status"] == "degraded" and geo["provider"] == "ipstack" and geo["reason"].startswith(reason)
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", geo["since"]) and geo["failures"] == "1"
            assert geo["detail"].startswith(f"ipstack failing since {geo['since']} ({reason}")
            assert geo["detail"].endswith("next try in 30 s); running on the bundled database")
            assert {part: check["status"] for part, check in answer["checks"].items()} == {
                "registry": "ok", "issuer": "ok", "geolocation": "degraded", "fleet_key": "ok", "free_space": "ok"}
            out = capsys.readouterr().out
            health_lines = [json.loads(line) for line in out.splitlines() if '"message":"health"' in line]
            assert health_lines[-1]["health"] == "degraded"
            assert health_lines[-1]["checks"]["geolocation"]["reason"] == geo["reason"]
            assert '"HealthCheckNotOk":[1.0]' in out and '"part":"geolocation"' in out

            # ipstack answers again once the back-off lets it be asked: ok, and the device was located by it
            ipstack.answers[TOKYO_IP] = {"latitude": 35.7, "longitude": 139.7, "country_code": "JP",
                                         "continent_code": "AS"}
            monkeypatch.setenv("GIP_IPSTACK_URL", ipstack.url)
            clock.now += 29
            status, answer = _get_health(client)
            assert answer["checks"]["geolocation"]["detail"].endswith("next try in 1 s); running on the bundled database")
            clock.now += 2
        with api("local", _uncached(backoff)) as client:  # ipstack's new address: a new container, the same back-off
            assert _provision(client, stage, "mydevice2", TOKYO_IP)["region"] == "ap-northeast-1"
            assert TOKYO_IP in [ip for ip, _ in ipstack.calls]
            status, answer = _get_health(client)
            assert status == 200 and answer["status"] == "ok", answer
            assert answer["checks"]["geolocation"] == {"status": "ok"}


def test_an_unreadable_ipstack_key_is_degraded_naming_why_and_since_when(stage, monkeypatch, tmp_path):
    with mock_aws(), FakeIpstack() as ipstack:  # no parameter in SSM: ParameterNotFound
        _ipstack_on_the_local_stage(monkeypatch, tmp_path, ipstack.url)
        with api("local", _uncached()) as client:
            assert _provision(client, stage, "mydevice1", LONDON_IP)["region"] == "eu-west-2"
            status, answer = _get_health(client)
    geo = answer["checks"]["geolocation"]
    assert status == 200 and answer["status"] == "degraded" and geo["provider"] == "ipstack", answer
    assert geo["reason"] == "its key cannot be read: ParameterNotFound" and geo["since"].endswith("Z")
    assert geo["detail"].startswith(f"ipstack failing since {geo['since']} (its key cannot be read: ParameterNotFound")
    assert ipstack.calls == []  # without its key ipstack is never asked


def test_the_local_stacks_parts_fail_on_a_silent_supervisor_a_fault_or_a_crl_near_its_next_update(tmp_path):
    """The parts as make local's chalice local reads them from the status the stack's supervisor keeps writing."""
    path, clock = tmp_path / "stack.json", Clock()
    status = StackStatus(path)
    fine = {"pid": os.getpid(), "heartbeat": 1000.0, "stale_after": 15.0, "stopped": False, "faults": {},
            "crl_next_update": {"eu-west-2": 1000.0 + 86400, "us-east-1": 1000.0 + 86400}, "crl_margin": 21600.0}

    def parts(record: dict, now: float) -> dict:
        status.write(record)
        clock.now = now
        return {part: check.get("detail", check["status"])
                for part, check in Health(stack_probes(path, clock), ttl=0).check()["checks"].items()}

    assert served_by_stack(path) is False  # nothing written yet
    assert parts(fine, 1010.0) == {"supervisor": "ok", "brokers": "ok", "revocation": "ok"}
    assert served_by_stack(path) and not served_by_stack(tmp_path / "none.json")
    assert parts(fine, 1016.0)["supervisor"].startswith("the stack's supervisor has not run for 16 s")
    fault = "the CRL of us-east-1 could not be written (No space left on device): revoked certificates may still connect"
    assert parts({**fine, "faults": {"revocation": fault}}, 1001.0)["revocation"] == fault
    assert parts({**fine, "faults": {"brokers": "the broker of eu-west-2 is down"}}, 1001.0)["brokers"] == (
        "the broker of eu-west-2 is down")
    assert parts({**fine, "heartbeat": 66000.0}, 66000.0)["revocation"] == (
        "the CRL of eu-west-2 expires in 21400 s and has not been remade: its broker will refuse every device")
    assert parts({**fine, "heartbeat": 88000.0}, 88000.0)["revocation"].startswith("the CRL of eu-west-2 has expired")
    assert set(parts({**fine, "stopped": True}, 1001.0).values()) == {"the local stack is not running"}
    assert served_by_stack(path) is False  # a stopped stack serves nobody
