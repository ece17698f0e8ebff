"""GIP_RELOCATION: when a renewing device moves to another region (pure decisions; the service's moves are in
test_renewal.py)."""
import pytest

from chalicelib.config import Settings
from chalicelib.domain.errors import ConfigError, RegionBlocked
from chalicelib.domain.regions import Location, RegionPolicy
from chalicelib.domain.relocation import RelocationPolicy

REGIONS = ("eu-west-2", "eu-west-1", "ap-northeast-1")
TOKYO = Location(35.68, 139.69, "JP", "AS")
DUBLIN = Location(53.35, -6.26, "IE", "EU")          # eu-west-1 is nearest, eu-west-2 ~460 km further
UNKNOWN = Location(None, None)


def policy(**rules) -> RegionPolicy:
    return RegionPolicy(REGIONS, "eu-west-2", **rules)


@pytest.mark.parametrize("text, mode, km", [("never", "never", 0), ("nearest", "nearest", 0),
                                            ("distance:1000", "distance", 1000), ("distance:0.5", "distance", 0.5),
                                            (None, "distance", 1000), ("", "distance", 1000)])
def test_parse(text, mode, km):
    parsed = RelocationPolicy.parse(text)
    assert (parsed.mode, parsed.km) == (mode, km)


@pytest.mark.parametrize("text", ["always", "distance", "distance:", "distance:-5", "distance:nan", "distance:inf",
                                  "distance:1km", "Nearest"])
def test_bad_settings_name_the_variable(text):
    with pytest.raises(ConfigError, match="GIP_RELOCATION"):
        RelocationPolicy.parse(text)


def test_the_default_is_distance_1000_and_read_from_the_environment():
    assert Settings.from_env({}).relocation == "distance:1000"
    assert str(RelocationPolicy.parse(Settings.from_env({"GIP_RELOCATION": "nearest"}).relocation)) == "nearest"


@pytest.mark.parametrize("setting, region, reason", [
    ("never", "eu-west-2", "renewal"),
    ("nearest", "ap-northeast-1", "relocated"),
    ("distance:1000", "ap-northeast-1", "relocated"),
    ("distance:9000", "ap-northeast-1", "relocated"),   # London-Tokyo ~9560 km, Tokyo-Tokyo ~0
    ("distance:10000", "eu-west-2", "renewal"),
])
def test_london_device_now_in_tokyo(setting, region, reason):
    choice = RelocationPolicy.parse(setting).decide("eu-west-2", TOKYO, policy())
    assert (choice.region, choice.reason) == (region, reason)
    assert choice.country == "JP"
    # The distance answered is the distance to the region the device gets.
    expected = policy().distance_km(TOKYO, region)
    assert choice.distance_km == expected and (expected < 50) == (region == "ap-northeast-1")


def test_a_small_gain_moves_only_under_nearest():
    current = "eu-west-2"
    assert RelocationPolicy.parse("nearest").decide(current, DUBLIN, policy()).region == "eu-west-1"
    assert RelocationPolicy.parse("distance:1000").decide(current, DUBLIN, policy()).region == current
    assert RelocationPolicy.parse("distance:100").decide(current, DUBLIN, policy()).region == "eu-west-1"


def test_an_unknown_location_stays_unless_the_region_is_gone():
    for setting in ("never", "nearest", "distance:0"):
        choice = RelocationPolicy.parse(setting).decide("ap-northeast-1", UNKNOWN, policy())
        assert (choice.region, choice.reason, choice.distance_km) == ("ap-northeast-1", "renewal", None)
    # A region no longer enabled: the device moves, to the default region for an unknown location.
    choice = RelocationPolicy.parse("never").decide("us-east-1", UNKNOWN, policy())
    assert (choice.region, choice.reason) == ("eu-west-2", "relocated")


def test_region_rules_move_a_device_under_every_policy():
    rules = policy(countries={"JP": "eu-west-1"})  # data residency: Japanese devices live in Ireland
    for setting in ("never", "nearest", "distance:100000"):
        choice = RelocationPolicy.parse(setting).decide("ap-northeast-1", TOKYO, rules)
        assert (choice.region, choice.reason) == ("eu-west-1", "relocated")
    # Already where the rule wants it: it stays, even though Tokyo is nearer.
    choice = RelocationPolicy.parse("nearest").decide("eu-west-1", TOKYO, rules)
    assert (choice.region, choice.reason) == ("eu-west-1", "renewal")
    continent = policy(continents={"AS": "eu-west-2"})
    assert RelocationPolicy.parse("never").decide("ap-northeast-1", TOKYO, continent).region == "eu-west-2"


def test_a_blocked_country_refuses_the_renewal_as_it_refuses_provisioning():
    with pytest.raises(RegionBlocked):
        RelocationPolicy.parse("never").decide("eu-west-2", TOKYO, policy(blocked=["JP"]))
