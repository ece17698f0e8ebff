"""Table tests for region choice. Expected regions come from real city coordinates and geography, not from
running the code: each row's comment gives the rough great-circle distances that decide it."""

import math

import pytest

from chalicelib.domain.errors import ConfigError
from chalicelib.domain.regions import (
    CATALOGUE,
    DEFAULT_REGION,
    SAMPLE_REGIONS,
    Location,
    RegionChoice,
    RegionPolicy,
    great_circle_km,
)

LONDON = (51.5074, -0.1278)
PARIS = (48.8566, 2.3522)
NEW_YORK = (40.7128, -74.0060)
SAN_FRANCISCO = (37.7749, -122.4194)

NEAREST_OF_SAMPLE = [
    # city, latitude, longitude, expected region
    ("London", *LONDON, "eu-west-2"),
    ("Dublin", 53.3498, -6.2603, "eu-west-1"),
    ("Paris", *PARIS, "eu-west-2"),  # London ~344 km, Frankfurt ~479 km
    ("Madrid", 40.4168, -3.7038, "eu-west-2"),  # London ~1260, Frankfurt ~1450, Dublin ~1450
    ("Berlin", 52.5200, 13.4050, "eu-central-1"),  # Frankfurt ~420, London ~930
    ("Moscow", 55.7558, 37.6173, "eu-central-1"),  # Frankfurt ~2020, Mumbai ~5000
    ("Reykjavik", 64.1466, -21.9426, "eu-west-1"),  # Dublin ~1490, London ~1890
    ("Tokyo", 35.6762, 139.6503, "ap-northeast-1"),
    ("Seoul", 37.5665, 126.9780, "ap-northeast-2"),
    ("Hong Kong", 22.3193, 114.1694, "ap-northeast-2"),  # Seoul ~2100, Singapore ~2590, Tokyo ~2890
    ("Sydney", -33.8688, 151.2093, "ap-southeast-2"),
    ("Auckland", -36.8485, 174.7633, "ap-southeast-2"),  # Sydney ~2160, near the antimeridian
    ("Nuku'alofa", -21.1394, -175.2049, "ap-southeast-2"),  # west of 180: Sydney ~3580, Oregon ~9000
    ("Singapore", 1.3521, 103.8198, "ap-southeast-1"),
    ("Mumbai", 19.0760, 72.8777, "ap-south-1"),
    ("Dubai", 25.2048, 55.2708, "ap-south-1"),  # Mumbai ~1930, Frankfurt ~4840
    ("Cape Town", -33.9249, 18.4241, "ap-south-1"),  # Mumbai ~8240, Frankfurt ~9390, London ~9670
    ("New York", *NEW_YORK, "us-east-1"),  # Ashburn ~350, Columbus ~750
    ("Miami", 25.7617, -80.1918, "us-east-1"),  # Ashburn ~1500, Columbus ~1600
    ("Chicago", 41.8781, -87.6298, "us-east-2"),  # Columbus ~450, Ashburn ~910
    ("Atlanta", 33.7490, -84.3880, "us-east-2"),  # Columbus ~720, Ashburn ~850
    ("Toronto", 43.6532, -79.3832, "us-east-2"),  # Columbus ~490, Ashburn ~540: close, but Ohio wins
    ("Mexico City", 19.4326, -99.1332, "us-east-2"),  # Columbus ~2770, Ashburn ~3020, Boardman ~3500
    ("Seattle", 47.6062, -122.3321, "us-west-2"),  # Boardman ~270
    ("San Francisco", *SAN_FRANCISCO, "us-west-2"),  # Boardman ~920; us-west-1 is not in the sample list
    ("Los Angeles", 34.0522, -118.2437, "us-west-2"),  # Boardman ~1320
    ("Anchorage", 61.2181, -149.9003, "us-west-2"),  # Boardman ~2590, Tokyo ~5560
    ("Honolulu", 21.3069, -157.8583, "us-west-2"),  # Boardman ~4400, Tokyo ~6200
    ("Sao Paulo", -23.5505, -46.6333, "us-east-1"),  # Ashburn ~7650, Columbus ~8000, London ~9490
]


@pytest.fixture(scope="module")
def sample_policy():
    return RegionPolicy()


@pytest.mark.parametrize("city,lat,lon,expected", NEAREST_OF_SAMPLE, ids=[row[0] for row in NEAREST_OF_SAMPLE])
def test_nearest_sample_region(sample_policy, city, lat, lon, expected):
    choice = sample_policy.choose(Location(lat, lon))
    assert choice.region == expected
    assert choice.reason == "nearest"
    region = CATALOGUE[expected]
    assert choice.distance_km == round(great_circle_km(lat, lon, region.latitude, region.longitude), 1)


@pytest.mark.parametrize("location", [None, Location(None, None), Location(51.5, None), Location(None, -0.1, "GB")])
def test_unknown_location_gets_the_default(sample_policy, location):
    country = location.country if location else None
    assert sample_policy.choose(location) == RegionChoice(DEFAULT_REGION, None, "default", country)


def test_nan_coordinates_get_the_default(sample_policy):
    assert sample_policy.choose(Location(math.nan, math.nan)) == RegionChoice(DEFAULT_REGION, None, "default")


def test_location_known():
    assert Location(0.0, 0.0).known  # zero is a coordinate, not a missing one
    assert not Location(None, 0.0).known


@pytest.mark.parametrize(
    "a,b,expected_km",
    [
        (LONDON, PARIS, 344),
        (LONDON, NEW_YORK, 5570),
        ((-33.8688, 151.2093), (-36.8485, 174.7633), 2156),  # Sydney-Auckland
        ((0.0, 179.5), (0.0, -179.5), 111.2),  # one degree of equator across the antimeridian
    ],
)
def test_great_circle_km_known_distances(a, b, expected_km):
    assert great_circle_km(*a, *b) == pytest.approx(expected_km, rel=0.01)
    assert great_circle_km(*b, *a) == pytest.approx(great_circle_km(*a, *b))


def test_great_circle_km_extremes():
    assert great_circle_km(10.0, 20.0, 10.0, 20.0) == 0.0
    assert great_circle_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * 6371.0088)  # antipodes


def test_distance_is_rounded_to_a_tenth(sample_policy):
    choice = sample_policy.choose(Location(*LONDON))
    london = CATALOGUE["eu-west-2"]
    assert choice.distance_km == round(great_circle_km(*LONDON, london.latitude, london.longitude), 1)
    assert choice.distance_km < 5


def test_custom_enabled_list_changes_the_answer():
    policy = RegionPolicy(SAMPLE_REGIONS + ("us-west-1",))
    assert policy.choose(Location(*SAN_FRANCISCO)).region == "us-west-1"  # San Jose ~50 km
    paris = RegionPolicy(("eu-west-2", "eu-west-3"), default="eu-west-2")
    assert paris.choose(Location(*PARIS)).region == "eu-west-3"


def test_custom_default():
    policy = RegionPolicy(("us-east-1", "eu-west-1"), default="us-east-1")
    assert policy.choose(None) == RegionChoice("us-east-1", None, "default")
    assert policy.choose(Location(*LONDON)).region == "eu-west-1"


def test_policy_defaults():
    policy = RegionPolicy()
    assert policy.enabled == SAMPLE_REGIONS
    assert policy.default == DEFAULT_REGION == "eu-west-2"


@pytest.mark.parametrize(
    "enabled,default,must_mention",
    [
        (("eu-west-2", "eu-west-9"), "eu-west-2", ["eu-west-9"]),
        (("eu-wset-2",), "eu-west-2", ["eu-wset-2", "did you mean 'eu-west-2'"]),
        ((), "eu-west-2", ["empty"]),
        (("eu-west-1",), "eu-west-2", ["eu-west-2", "not in the enabled"]),
        (("eu-west-2", "eu-west-1", "eu-west-2"), "eu-west-2", ["eu-west-2", "more than once"]),
        (("eu-west-2",), "eu-wset-2", ["eu-wset-2", "did you mean 'eu-west-2'"]),
        (("us-gov-west-1", "eu-west-2"), "eu-west-2", ["us-gov-west-1"]),  # GovCloud is another partition
        ("eu-west-2", "eu-west-2", ["string"]),  # a bare string, not a list
    ],
)
def test_config_errors_name_the_entry(enabled, default, must_mention):
    with pytest.raises(ConfigError) as err:
        RegionPolicy(enabled, default)
    for text in must_mention:
        assert text in str(err.value)


def test_catalogue():
    assert set(SAMPLE_REGIONS) <= set(CATALOGUE)
    assert all(name == region.name for name, region in CATALOGUE.items())
    assert not [n for n in CATALOGUE if n.startswith(("us-gov-", "cn-"))]
    assert all(-90 <= r.latitude <= 90 and -180 <= r.longitude <= 180 for r in CATALOGUE.values())
    # Spot checks of where the data centres are, not the names' cities.
    assert great_circle_km(CATALOGUE["us-east-1"].latitude, CATALOGUE["us-east-1"].longitude, 39.0, -77.5) < 50
    assert great_circle_km(CATALOGUE["us-west-2"].latitude, CATALOGUE["us-west-2"].longitude, 45.8, -119.7) < 50
