"""GET /health tells the truth (issue 16): each part checked, the answer cached a few seconds, 503 naming the
failing part, `degraded` with 200 when provisioning works on a fallback; the same facts in the log and a metric."""
import json

from chalice.test import Client

from app import app
from chalicelib import wiring
from chalicelib.config import PROJECT_DIR
from chalicelib.health import Health, log_and_count


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
    with Client(app, stage_name="local", project_dir=str(PROJECT_DIR)) as client:
        wiring.configure(wiring.settings())
        response = client.http.get("/health")
    answer = json.loads(response.body)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    assert answer["status"] == "error" and answer["code"] == "unhealthy"
    assert answer["message"].startswith("not ready: fleet_key: fleet provisioning public key not found")
    assert {part: check["status"] for part, check in answer["checks"].items()} == {
        "registry": "ok", "issuer": "ok", "geolocation": "ok", "fleet_key": "failing"}


def test_a_healthy_local_stage_says_ok(stage):
    with Client(app, stage_name="local", project_dir=str(PROJECT_DIR)) as client:
        wiring.configure(wiring.settings())
        response = client.http.get("/health")
    answer = json.loads(response.body)
    assert response.status_code == 200 and answer["status"] == "ok", answer
    assert set(answer["checks"]) == {"registry", "issuer", "geolocation", "fleet_key"}
