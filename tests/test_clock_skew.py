"""Devices with a wrong clock: the stale-timestamp refusal carries the server's time (Date header and a body
field), and the device client corrects its clock once from it and retries.

The device client talks real HTTP on 127.0.0.1 to a server that hands each request to the Chalice app of
the local stage (SQLite registry, local CA), through Chalice's own local gateway.
"""
import datetime as dt
import json
import re
from email.utils import parsedate_to_datetime

import pytest

from chalicelib.config import FLEET_PRIVATE_KEY_NAME
from chalicelib.container import Container
from tests.conftest import api
from tests.loopback import LoopbackServer, QuietHandler
from tests.test_device_client import gd

DAY = dt.timedelta(days=1)


class AppServer(LoopbackServer):
    """The app behind a real loopback HTTP server (one request at a time), counting what it answered."""

    def __init__(self, client):
        answers = self.answers = []

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                response = client.http.post(self.path.removeprefix("/api"), body=body,
                                            headers={k: v for k, v in self.headers.items()})
                answers.append((response.status_code, json.loads(response.body), dict(response.headers)))
                self.send_response(response.status_code)
                for name, value in response.headers.items():
                    if name.lower() not in ("content-length", "date", "server"):
                        self.send_header(name, value)
                if "Date" in response.headers:  # the app's own Date (http.server would write its own first)
                    self.send_header("Date", response.headers["Date"])
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                self.wfile.write(response.body)

        super().__init__(Handler)


@pytest.fixture
def server(stage):
    with api("local") as client, AppServer(client) as running:
        yield running


def device(server, stage, tmp_path, clock, *extra):
    key_file = stage.state_dir / "keys" / FLEET_PRIVATE_KEY_NAME
    return gd.main(["-t", "mydevice2", "-a", server.url, "-c", "--count", "0", "--signature-version", "2",
                    "--signing-key", str(key_file), "--state-dir", str(tmp_path / "device"),
                    "--retry-base-delay", "0.001", "--max-attempts", "2", *extra],
                   sleep=lambda s: None, clock=clock)


@pytest.mark.parametrize("off_by", [-DAY, DAY])
def test_a_device_a_day_off_provisions_after_one_corrected_retry(server, stage, tmp_path, capsys, off_by):
    def wrong_clock():
        return dt.datetime.now(dt.timezone.utc) + off_by

    assert device(server, stage, tmp_path, wrong_clock) == 0
    [(first, refusal, headers), (second, answer, _)] = server.answers
    assert (first, refusal["code"]) == (403, "stale-timestamp")
    server_time = dt.datetime.strptime(refusal["serverTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs(server_time - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=1)
    assert abs(parsedate_to_datetime(headers["Date"]) - server_time) <= dt.timedelta(seconds=1)
    assert second == 200 and answer["thingName"] == "mydevice2"
    out = capsys.readouterr().out
    said = re.search(r"device clock is (\d+) s (ahead of|behind) the server's", out)
    assert said and abs(int(said[1]) - 86400) <= 2 and said[2] == ("ahead of" if off_by > dt.timedelta(0) else "behind")
    assert Container().registry.get("mydevice2").status == "provisioned"


def test_a_renewal_a_day_off_carries_the_server_time_and_renews_after_one_corrected_retry(server, stage, tmp_path,
                                                                                            capsys):
    """The renewal route's stale-timestamp refusal carries the server's time as provisioning's does, and the
    device client corrects its renewal's timestamp from it."""
    assert device(server, stage, tmp_path, lambda: dt.datetime.now(dt.timezone.utc)) == 0  # provisioned
    first_certificate = server.answers[0][1]["certificateId"]
    assert device(server, stage, tmp_path, lambda: dt.datetime.now(dt.timezone.utc) - DAY, "--renew") == 0
    [_, (first, refusal, headers), (second, answer, _)] = server.answers
    assert (first, refusal["code"]) == (403, "stale-timestamp")
    server_time = dt.datetime.strptime(refusal["serverTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs(server_time - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=1)
    assert abs(parsedate_to_datetime(headers["Date"]) - server_time) <= dt.timedelta(seconds=1)
    assert second == 200 and answer["previousCertificateId"] == first_certificate
    assert capsys.readouterr().out.count("corrected, retrying") == 1
    record = Container().registry.get("mydevice2")
    assert (record.certificate_id, record.renewal_count) == (answer["certificateId"], 1)


def test_the_clock_is_corrected_once_not_in_a_loop(server, stage, tmp_path, capsys):
    """A clock that keeps jumping is not chased: one correction, then the refusal stands (exit code)."""
    jumps = iter([DAY, 2 * DAY, 3 * DAY, 4 * DAY])

    def jumping_clock():
        return dt.datetime.now(dt.timezone.utc) + next(jumps)

    assert device(server, stage, tmp_path, jumping_clock, "--max-attempts", "4") != 0
    assert [status for status, _, _ in server.answers] == [403, 403]
    assert all(answer["code"] == "stale-timestamp" for _, answer, _ in server.answers)
    assert capsys.readouterr().out.count("corrected, retrying") == 1
    assert Container().registry.get("mydevice2").status == "unprovisioned"


def test_other_refusals_carry_no_server_time(stage):
    body = stage.body("mydevice1")
    body["thing-name-sig"] = stage.body("mydevice2")["thing-name-sig"]  # another device's signature
    with api("local") as client:
        response = client.http.post("/device-provisioning", body=json.dumps(body),
                                    headers={"Content-Type": "application/json"})
    assert response.status_code == 403 and "serverTime" not in json.loads(response.body)
