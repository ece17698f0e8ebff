"""Geolocation providers: the bundled database, ipstack (recorded responses), SSM key, the fallback chain."""
import ipaddress

import boto3
import pytest
import requests
import responses
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws

from chalicelib.adapters.aws import SsmSecret
from chalicelib.adapters.geo import FallbackLocator, IpstackLocator, MaxMindLocator
from chalicelib.domain.regions import Location, RegionPolicy
from chalicelib.edge.forwarded import client_ip
from tests.conftest import LONDON_IP, TOKYO_IP

IPSTACK = "https://api.ipstack.com/"


@pytest.fixture(scope="module")
def bundled():
    return MaxMindLocator.bundled()


@pytest.mark.parametrize("ip, country", [(LONDON_IP, "GB"), (TOKYO_IP, "JP"), ("2a00:1450:4009:80b::200e", "GB")])
def test_bundled_database_knows_public_addresses(bundled, ip, country):
    location = bundled.locate(ip)
    assert location.known and location.country == country


@pytest.mark.parametrize("ip", ["10.0.0.1", "192.168.1.1", "127.0.0.1", "::1", "203.0.113.5", "not an ip", ""])
def test_private_reserved_and_garbage_addresses_are_unknown(bundled, ip):
    assert bundled.locate(ip) is None


def ipstack(key="secret-key"):
    return IpstackLocator(requests.Session(), lambda: key, timeout=0.5)


@responses.activate
def test_ipstack_success_uses_https_and_the_key():
    responses.get(IPSTACK + "8.8.4.4", json={"latitude": 51.5, "longitude": -0.12, "country_code": "GB"})
    assert ipstack().locate("8.8.4.4") == Location(51.5, -0.12, "GB")
    request = responses.calls[0].request
    assert request.url.startswith("https://") and "access_key=secret-key" in request.url


@responses.activate
@pytest.mark.parametrize("answer", [
    {"json": {"latitude": None, "longitude": None, "country_code": None}},                  # no coordinates
    {"json": {"success": False, "error": {"code": 101, "type": "invalid_access_key"}}},       # bad key
    {"body": requests.exceptions.ConnectTimeout("timed out")},                                 # timeout
    {"status": 502, "body": "bad gateway"},                                                    # outage
    {"body": "<html>not json</html>"},                                                          # garbage
])
def test_ipstack_failures_fall_back_to_the_bundled_database_and_end_in_a_region(bundled, answer):
    responses.get(IPSTACK + LONDON_IP, **answer)
    chain = FallbackLocator([ipstack(), bundled])
    location = chain.locate(LONDON_IP)
    assert location.country == "GB"  # from the bundled database
    assert RegionPolicy().choose(location).region == "eu-west-2"


@responses.activate
def test_everything_unknown_still_ends_in_the_default_region():
    responses.get(IPSTACK + "8.8.4.4", body=requests.exceptions.ConnectionError("down"))
    location = FallbackLocator([ipstack()]).locate("8.8.4.4")
    assert location is None
    assert RegionPolicy().choose(location).reason == "default"


@responses.activate
def test_ipstack_is_not_asked_for_private_addresses_or_without_a_key():
    assert ipstack().locate("10.1.1.1") is None
    assert ipstack(key=None).locate(LONDON_IP) is None
    assert len(responses.calls) == 0


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield


def test_ssm_secret_is_read_once_and_decrypted(aws_env):
    ssm = boto3.client("ssm")
    ssm.put_parameter(Name="/gip/ipstack", Value="the-key", Type="SecureString")
    calls = []
    ssm.meta.events.register("provide-client-params.ssm.GetParameter", lambda params, **kw: calls.append(params))
    secret = SsmSecret(ssm, "/gip/ipstack")
    assert secret() == "the-key" and secret() == "the-key"
    assert len(calls) == 1 and calls[0]["WithDecryption"] is True


def test_missing_ssm_parameter_turns_the_provider_off(aws_env):
    secret = SsmSecret(boto3.client("ssm"), "/gip/missing")
    assert secret() is None


@pytest.mark.parametrize("header, trusted, expected", [
    ("81.2.69.142", True, "81.2.69.142"),
    ("1.2.3.4, 81.2.69.142", True, "81.2.69.142"),     # right-most hop: the one our proxy appended
    ("garbage, 81.2.69.142", True, "81.2.69.142"),
    ("81.2.69.142, garbage", True, "127.0.0.1"),       # an invalid right-most hop: the header is not trusted,
    ("81.2.69.142, ", True, "127.0.0.1"),              # and the client's own hop to its left is never used
    ("81.2.69.142, 8.8.8.8:443", True, "127.0.0.1"),
    ("81.2.69.142,,", True, "127.0.0.1"),
    (" 2001:db8::1 ", True, "2001:db8::1"),
    ("81.2.69.142", False, "127.0.0.1"),               # prod: the header is the client's word, ignored
    ("", True, "127.0.0.1"),
])
def test_client_ip(header, trusted, expected):
    assert client_ip("127.0.0.1", {"x-forwarded-for": header}, trusted) == expected


HOP_TEXT = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n,"), max_size=30)


@given(left=st.lists(st.ip_addresses().map(str) | HOP_TEXT, max_size=5), last=HOP_TEXT)
def test_only_the_right_most_hop_is_ever_used(left, last):
    """Whatever the client wrote to the left, the answer is the right-most hop when it is an address, else the
    connection's source."""
    header = ", ".join([*left, last])
    try:
        expected = str(ipaddress.ip_address(last.strip()))
    except ValueError:
        expected = "192.0.2.7"
    assert client_ip("192.0.2.7", {"x-forwarded-for": header}, True) == expected
