"""Region policy: rules before distance, IP addresses through the bundled DB-IP City Lite database, config checks.

Nearest-region answers are checked against an independent computation (spherical law of cosines over the
catalogue's coordinates), so close calls are settled by arithmetic, not by what the code happens to return.
"""
import json
import math

import pytest

from chalicelib.adapters.geo import CachingLocator, MaxMindLocator
from chalicelib.container import Container
from chalicelib.domain.errors import ConfigError, RegionBlocked
from chalicelib.domain.regions import CATALOGUE, SAMPLE_REGIONS, Location, RegionPolicy
from tests.conftest import LONDON_IP, api

RULES = {"countries": {"IE": "eu-west-2", "DE": "eu-central-1", "ZA": "ap-south-1"},
         "continents": {"AF": "eu-west-2", "SA": "us-east-1", "OC": "ap-northeast-1"},
         "blocked": ["KP"]}


def oracle_nearest(lat, lon, enabled=SAMPLE_REGIONS):
    def km(region):
        r = CATALOGUE[region]
        p1, p2, dl = math.radians(lat), math.radians(r.latitude), math.radians(r.longitude - lon)
        cos_c = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)
        return 6371.0088 * math.acos(max(-1.0, min(1.0, cos_c)))
    return min(enabled, key=km)


@pytest.fixture(scope="module")
def geo():
    return MaxMindLocator.bundled()


# (address, what it is, region expected by geography; None = let the oracle settle a close call)
NEAREST = [
    (LONDON_IP, "London", "eu-west-2"),
    ("87.32.0.1", "Dublin", "eu-west-1"),
    ("145.0.0.1", "Amsterdam: London and Frankfurt are both ~360 km away", None),
    ("80.133.0.1", "Kassel, Germany", "eu-central-1"),
    ("2003::1", "Germany, IPv6", "eu-central-1"),
    ("178.192.0.1", "Basel", "eu-central-1"),
    ("211.234.0.1", "Seoul", "ap-northeast-2"),
    ("2400:4050::1", "Tokyo, IPv6", "ap-northeast-1"),
    ("165.21.0.1", "Singapore", "ap-southeast-1"),
    ("117.192.0.1", "Bangalore", "ap-south-1"),
    ("94.200.0.1", "Dubai", "ap-south-1"),
    ("203.198.0.1", "Hong Kong", None),
    ("1.1.1.1", "Melbourne area", "ap-southeast-2"),
    ("202.27.0.1", "Wellington, near the antimeridian", "ap-southeast-2"),
    ("202.62.0.1", "Fiji, near the antimeridian", "ap-southeast-2"),
    ("108.41.0.1", "New York", "us-east-1"),
    ("73.85.0.1", "Florida", "us-east-1"),
    ("8.8.8.8", "Mountain View, Google's seat (us-west-1 not enabled)", "us-west-2"),
    ("2600:1700::1", "Texas, IPv6", None),
    ("99.224.0.1", "Toronto: Ohio and Virginia within 50 km of each other", None),
    ("50.35.0.1", "Seattle area", "us-west-2"),
    ("76.102.0.1", "Palo Alto (us-west-1 not enabled)", "us-west-2"),
    ("24.84.0.1", "Vancouver", "us-west-2"),
    ("209.193.0.1", "Alaska, high latitude", "us-west-2"),
    ("157.157.0.1", "Reykjavik, high latitude", "eu-west-1"),
    ("158.39.0.1", "Tromsø, high latitude", None),
    ("200.147.67.142", "Rio de Janeiro", None),
    ("41.0.0.1", "Pretoria", None),
]


@pytest.mark.parametrize("ip, where, expected", NEAREST, ids=[row[1] for row in NEAREST])
def test_nearest_enabled_region_for_well_known_addresses(geo, ip, where, expected):
    location = geo.locate(ip)
    assert location is not None and location.known
    choice = RegionPolicy().choose(location)
    assert choice.reason == "nearest" and choice.country == location.country
    assert choice.region == oracle_nearest(location.latitude, location.longitude)
    if expected:
        assert choice.region == expected


@pytest.mark.parametrize("ip", ["10.0.0.1", "192.168.1.20", "127.0.0.1", "::1", "203.0.113.5", "169.254.1.1",
                                "fe80::1", "not-an-ip"])
def test_private_reserved_and_garbage_addresses_get_the_default(geo, ip):
    choice = RegionPolicy().choose(geo.locate(ip))
    assert (choice.region, choice.reason, choice.distance_km) == ("eu-west-2", "default", None)


def test_a_geolocation_outage_gets_the_default():
    class Down:
        def locate(self, ip):
            return None  # what every provider answers when it is down (see geo.FallbackLocator)
    assert RegionPolicy().choose(Down().locate(LONDON_IP)).reason == "default"


RULED = [
    # (address, what, region, reason)
    ("87.32.0.1", "Ireland: a country rule overrides the nearer eu-west-1", "eu-west-2", "country-rule"),
    ("80.133.0.1", "Germany: data residency", "eu-central-1", "country-rule"),
    ("41.0.0.1", "South Africa: its country rule beats the Africa rule", "ap-south-1", "country-rule"),
    ("200.147.67.142", "Brazil: South America rule", "us-east-1", "continent-rule"),
    ("181.0.0.1", "Argentina: South America rule", "us-east-1", "continent-rule"),
    ("1.1.1.1", "Australia: Oceania rule overrides the nearer Sydney", "ap-northeast-1", "continent-rule"),
    ("202.62.0.1", "Fiji: Oceania rule", "ap-northeast-1", "continent-rule"),
    (LONDON_IP, "Britain: no rule, nearest", "eu-west-2", "nearest"),
    ("108.41.0.1", "New York: no rule, nearest", "us-east-1", "nearest"),
    ("10.0.0.1", "private address: default", "eu-west-2", "default"),
]


@pytest.mark.parametrize("ip, where, region, reason", RULED, ids=[row[1] for row in RULED])
def test_rules_come_before_distance(geo, ip, where, region, reason):
    policy = RegionPolicy.from_rules(SAMPLE_REGIONS, "eu-west-2", RULES)
    location = geo.locate(ip)
    choice = policy.choose(location)
    assert (choice.region, choice.reason) == (region, reason)
    if location is not None:  # the distance is to the region chosen, whatever the reason
        r = CATALOGUE[region]
        p1, p2, dl = math.radians(location.latitude), math.radians(r.latitude), math.radians(r.longitude - location.longitude)
        oracle_km = 6371.0088 * math.acos(min(1.0, math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)))
        assert choice.distance_km == pytest.approx(oracle_km, abs=0.2)


def test_blocked_country_is_refused(geo):
    with pytest.raises(RegionBlocked) as refused:
        RegionPolicy.from_rules(SAMPLE_REGIONS, "eu-west-2", RULES).choose(geo.locate("175.45.176.1"))
    assert refused.value.code == "country-blocked" and "KP" in refused.value.message


@pytest.mark.parametrize("location, region", [
    (Location(-17.8, 178.0), "ap-southeast-2"),      # Fiji, west of the antimeridian
    (Location(-16.8, -179.9), "ap-southeast-2"),     # Fiji's eastern islands, across it
    (Location(-43.5, 172.6), "ap-southeast-2"),      # Christchurch
    (Location(78.2, 15.6), None),                    # Svalbard
    (Location(89.9, 0.0), None),                     # nearly the North Pole
    (Location(-77.8, 166.7), None),                  # McMurdo, Antarctica
])
def test_raw_coordinates(location, region):
    choice = RegionPolicy().choose(location)
    assert choice.region == oracle_nearest(location.latitude, location.longitude)
    if region:
        assert choice.region == region


def test_a_country_rule_applies_even_without_coordinates():
    policy = RegionPolicy.from_rules(SAMPLE_REGIONS, "eu-west-2", RULES)
    choice = policy.choose(Location(None, None, "DE", "EU"))
    assert (choice.region, choice.reason, choice.distance_km) == ("eu-central-1", "country-rule", None)


@pytest.mark.parametrize("rules, fragment", [
    ({"countries": {"DE": "eu-central-9"}}, "countries.DE"),
    ({"countries": {"DE": "us-west-1"}}, "not in the enabled regions"),
    ({"countries": {"Germany": "eu-central-1"}}, "'Germany' is not an ISO 3166"),
    ({"countries": ["DE"]}, "countries must be an object"),
    ({"continents": {"EUR": "eu-central-1"}}, "'EUR' is not a continent code"),
    ({"blocked": "KP"}, "blocked: expected a list"),
    ({"blocked": ["kp"]}, "'kp' is not an ISO 3166"),
    ({"blocked": ["DE"], "countries": {"DE": "eu-central-1"}}, "also have a country rule"),
    ({"country": {"DE": "eu-central-1"}}, "unknown key(s) ['country']"),
])
def test_rule_errors_point_at_the_bad_entry(rules, fragment):
    with pytest.raises(ConfigError) as error:
        RegionPolicy.from_rules(SAMPLE_REGIONS, "eu-west-2", rules)
    assert fragment in str(error.value)


def test_rules_from_the_stage_environment_are_checked_at_startup():
    from chalicelib.config import Settings
    with pytest.raises(ConfigError, match="not valid JSON"):
        Settings.from_env({"GIP_REGION_RULES": "{not json"})
    config = Settings.from_env({"GIP_REGION_RULES": json.dumps({"continents": {"XX": "eu-west-2"}})})
    with pytest.raises(ConfigError, match="GIP_REGION_RULES.*'XX'"):
        Container(config).validate()


def test_geolocation_is_cached_per_ip_with_a_bound():
    calls = []

    class Counting:
        def locate(self, ip):
            calls.append(ip)
            return None
    cached = CachingLocator(Counting(), size=2)
    for ip in ["1.1.1.1", "1.1.1.1", "8.8.8.8", "1.1.1.1", "9.9.9.9", "8.8.8.8"]:
        cached.locate(ip)
    assert calls == ["1.1.1.1", "8.8.8.8", "9.9.9.9", "8.8.8.8"]  # 8.8.8.8 was evicted by 9.9.9.9


def test_a_cached_location_is_asked_again_after_its_time_limit():
    """An answer kept from a fallback during an outage (or for an address that moved) does not stay for ever."""
    answers, now = {"1.1.1.1": "fallback"}, [0.0]

    class Provider:
        def locate(self, ip):
            return answers[ip]
    cached = CachingLocator(Provider(), ttl_seconds=600, clock=lambda: now[0])
    assert cached.locate("1.1.1.1") == "fallback"
    answers["1.1.1.1"] = "ipstack"  # the provider is back
    now[0] = 599
    assert cached.locate("1.1.1.1") == "fallback"
    now[0] = 601
    assert cached.locate("1.1.1.1") == "ipstack"


@pytest.fixture
def ruled_client(stage, monkeypatch):
    monkeypatch.setenv("GIP_REGION_RULES", json.dumps(RULES))
    with api("local") as client:
        yield client


def post(client, body, ip):
    response = client.http.post("/device-provisioning", body=json.dumps(body),
                                headers={"Content-Type": "application/json", "X-Forwarded-For": ip})
    return response.status_code, json.loads(response.body)


def test_the_api_explains_its_choice_and_the_registry_keeps_it(stage, ruled_client):
    status, body = post(ruled_client, stage.body("mydevice1"), "87.32.0.1")
    assert status == 200, body
    assert (body["region"], body["reason"], body["country"]) == ("eu-west-2", "country-rule", "IE")
    item = Container().registry.get("mydevice1")
    assert (item.country, item.region_reason) == ("IE", "country-rule")


def test_the_api_refuses_a_blocked_country_and_changes_nothing(stage, ruled_client):
    status, body = post(ruled_client, stage.body("mydevice2"), "175.45.176.1")
    assert status == 403 and body["code"] == "country-blocked" and body["status"] == "error"
    assert Container().registry.get("mydevice2").status == "unprovisioned"
