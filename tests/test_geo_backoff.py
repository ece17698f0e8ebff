"""ipstack or its key unreachable: a warning once, a metric per failure, and another try after a back-off
(not the bundled database, silently, for the container's life)."""
import json
import logging

import boto3
import pytest
import requests
import responses
from moto import mock_aws

from chalicelib.adapters.aws import SsmSecret
from chalicelib.adapters.geo import Backoff, IpstackLocator
from chalicelib.domain.regions import Location
from tests.conftest import LONDON_IP

URL = "https://api.ipstack.com/" + LONDON_IP
GOOD = {"latitude": 51.5, "longitude": -0.12, "country_code": "GB"}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def failures(capsys) -> list:
    return [record for line in capsys.readouterr().out.splitlines() if line.startswith("{")
            for record in [json.loads(line)] if "GeolocationProviderFailed" in record]


@pytest.mark.parametrize("outage", [
    {"body": requests.exceptions.ConnectionError("no route")},                           # unreachable
    {"json": {"success": False, "error": {"type": "https_access_restricted"}}},          # the free plan's refusal
    {"status": 503, "body": "busy"},
])
@responses.activate
def test_an_outage_backs_off_warns_once_counts_and_heals(outage, caplog, capsys):
    clock = Clock()
    locator = IpstackLocator(requests.Session(), lambda: "key", backoff=Backoff("ipstack", clock=clock))
    responses.get(URL, **outage)
    with caplog.at_level(logging.WARNING, logger="chalicelib.adapters.geo"):
        assert locator.locate(LONDON_IP) is None
        assert locator.locate(LONDON_IP) is None               # within the back-off: ipstack is not asked
        assert len(responses.calls) == 1
        clock.now += 31
        assert locator.locate(LONDON_IP) is None               # asked again, still down: the wait doubles
        assert len(responses.calls) == 2
        clock.now += 31
        assert locator.locate(LONDON_IP) is None and len(responses.calls) == 2
        clock.now += 30
        responses.replace(responses.GET, URL, json=GOOD)
        assert locator.locate(LONDON_IP) == Location(51.5, -0.12, "GB")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "unavailable" in w]) == 1 and "ipstack is back" in warnings[-1]
    records = failures(capsys)
    assert len(records) == 2 and all(r["provider"] == "ipstack" and r["GeolocationProviderFailed"] == [1.0]
                                     for r in records)
    assert records[0]["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service", "provider"]]


def test_the_back_off_is_capped():
    clock = Clock()
    backoff = Backoff("x", first=30, cap=900, clock=clock)
    for _ in range(10):
        backoff.failed("down")
    clock.now += 899
    assert not backoff.ready()
    clock.now += 1
    assert backoff.ready()


@pytest.fixture
def ssm(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield boto3.client("ssm")


def test_a_missing_secret_is_tried_again_after_the_back_off(ssm, capsys):
    clock = Clock()
    calls = []
    ssm.meta.events.register("before-call.ssm.GetParameter", lambda **_: calls.append(1))
    secret = SsmSecret(ssm, "/gip/ipstack", backoff=Backoff("ssm", clock=clock))
    assert secret() is None
    ssm.put_parameter(Name="/gip/ipstack", Value="the-key", Type="SecureString")  # the operator fixes it
    assert secret() is None and len(calls) == 1                 # not asked again within the back-off
    clock.now += 30
    assert secret() == "the-key" and secret() == "the-key"
    assert len(calls) == 2                                      # then read once for the container's life
    assert [r["provider"] for r in failures(capsys)] == ["ssm"]


def test_ipstack_over_urllib3_against_a_local_stand_in(capsys):
    """The HTTP client the prod wiring uses (urllib3): query string, JSON answer; a dead port backs off."""
    from chalicelib.adapters.geo import HttpGet
    from tests.fake_ipstack import FakeIpstack
    with FakeIpstack() as fake:
        fake.answers[LONDON_IP] = GOOD
        locator = IpstackLocator(HttpGet(), lambda: "the-key", url=fake.url)
        assert locator.locate(LONDON_IP) == Location(51.5, -0.12, "GB")
        [(ip, query)] = fake.calls
        assert ip == LONDON_IP and query["access_key"] == ["the-key"]
        assert query["fields"] == ["latitude,longitude,country_code,continent_code"]
        dead = fake.url
    clock = Clock()
    gone = IpstackLocator(HttpGet(), lambda: "the-key", url=dead, backoff=Backoff("ipstack", clock=clock))
    assert gone.locate(LONDON_IP) is None and not gone.backoff.ready()
    assert [r["provider"] for r in failures(capsys)] == ["ipstack"]
