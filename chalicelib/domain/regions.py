"""Region choice: the nearest enabled AWS IoT Core region to a device, by great-circle distance.

Pure and stdlib-only so it can be table-tested and runs cheaply on every provisioning request.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from chalicelib.domain.errors import ConfigError, RegionBlocked

EARTH_RADIUS_KM = 6371.0088  # IUGG mean Earth radius


@dataclass(frozen=True)
class Region:
    name: str
    metro: str
    latitude: float
    longitude: float


# Every commercial (aws partition) region with an AWS IoT Core data-plane (iot:Data-ATS) endpoint, as of
# 2026-11-28: the `data-ats.iot` service in botocore 1.44.8's endpoints.json, checked against the AWS General
# Reference "AWS IoT Core endpoints and quotas" page (docs.aws.amazon.com/general/latest/gr/iot-core.html).
# GovCloud and China are other partitions (other accounts, other endpoints) and are left out on purpose.
# Coordinates are the metro area holding the region's data centres (good to ~100 km), not the city the
# region is named after: us-east-1 is Ashburn, Virginia and us-west-2 is Boardman, Oregon.
CATALOGUE: dict[str, Region] = {
    r.name: r
    for r in (
        Region("us-east-1", "Northern Virginia (Ashburn)", 39.04, -77.49),
        Region("us-east-2", "Ohio (Columbus)", 40.00, -83.00),
        Region("us-west-1", "Northern California (San Jose)", 37.34, -121.89),
        Region("us-west-2", "Oregon (Boardman)", 45.84, -119.70),
        Region("ca-central-1", "Montreal", 45.50, -73.57),
        Region("sa-east-1", "Sao Paulo", -23.55, -46.63),
        Region("eu-west-1", "Dublin", 53.35, -6.26),
        Region("eu-west-2", "London", 51.51, -0.13),
        Region("eu-west-3", "Paris", 48.86, 2.35),
        Region("eu-central-1", "Frankfurt", 50.11, 8.68),
        Region("eu-north-1", "Stockholm", 59.33, 18.07),
        Region("eu-south-1", "Milan", 45.46, 9.19),
        Region("eu-south-2", "Aragon (Zaragoza)", 41.65, -0.88),
        Region("il-central-1", "Tel Aviv", 32.09, 34.78),
        Region("me-central-1", "UAE (Dubai)", 25.20, 55.27),
        Region("me-south-1", "Bahrain (Manama)", 26.23, 50.59),
        Region("ap-south-1", "Mumbai", 19.08, 72.88),
        Region("ap-southeast-1", "Singapore", 1.35, 103.82),
        Region("ap-southeast-5", "Malaysia (Kuala Lumpur)", 3.14, 101.69),
        Region("ap-east-1", "Hong Kong", 22.32, 114.17),
        Region("ap-northeast-2", "Seoul", 37.57, 126.98),
        Region("ap-northeast-1", "Tokyo", 35.68, 139.69),
        Region("ap-southeast-2", "Sydney", -33.87, 151.21),
    )
}

# The original sample's eleven regions: the default enabled list.
SAMPLE_REGIONS: tuple[str, ...] = (
    "ap-northeast-1", "eu-west-1", "ap-southeast-2", "us-east-2", "eu-central-1",
    "us-east-1", "ap-northeast-2", "ap-southeast-1", "ap-south-1", "us-west-2", "eu-west-2",
)
DEFAULT_REGION = "eu-west-2"


CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America"}


@dataclass(frozen=True)
class Location:
    latitude: float | None
    longitude: float | None
    country: str | None = None  # ISO 3166-1 alpha-2, when known
    continent: str | None = None  # one of CONTINENTS, when known

    @property
    def known(self) -> bool:
        return self.latitude is not None and self.longitude is not None


def _point(location: Location | None) -> tuple[float, float] | None:
    """Latitude and longitude when known and finite (NaN or inf counts as unknown)."""
    if location is None or location.latitude is None or location.longitude is None:
        return None
    if not math.isfinite(location.latitude + location.longitude):
        return None
    return location.latitude, location.longitude


@dataclass(frozen=True)
class RegionChoice:
    region: str
    distance_km: float | None
    reason: str  # "country-rule", "continent-rule", "nearest", "default" (or "previous": an earlier answer)
    country: str | None = None


def _haversine(phi1: float, lam1: float, cos1: float, phi2: float, lam2: float, cos2: float) -> float:
    # Haversine stays accurate for short distances and wraps longitude naturally (no antimeridian case).
    a = math.sin((phi2 - phi1) / 2) ** 2 + cos1 * cos2 * math.sin((lam2 - lam1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))  # min(): rounding can push a past 1


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    return _haversine(phi1, math.radians(lon1), math.cos(phi1), phi2, math.radians(lon2), math.cos(phi2))


def _unknown_region(name: object, setting: str) -> ConfigError:
    close = difflib.get_close_matches(str(name), CATALOGUE, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known regions: {', '.join(sorted(CATALOGUE))}"
    return ConfigError(f"{setting}: {name!r} is not an AWS IoT Core region{hint}")


class RegionPolicy:
    """Which regions devices may be sent to, and how one is chosen for a location.

    Rules come before distance: a blocked country is refused, then a country rule (data residency), then
    a continent rule, then the nearest enabled region; an unknown location gets the default region.
    """

    def __init__(self, enabled: Sequence[str] = SAMPLE_REGIONS, default: str = DEFAULT_REGION,
                 countries: Mapping[str, str] | None = None, continents: Mapping[str, str] | None = None,
                 blocked: Sequence[str] = ()):
        if isinstance(enabled, str):  # a bare string would be read as a list of one-letter names
            raise ConfigError(f"enabled regions: expected a list of region names, got the string {enabled!r}")
        enabled = tuple(enabled)
        if not enabled:
            raise ConfigError("enabled regions: the list is empty; enable at least one region")
        seen: set[str] = set()
        for name in enabled:
            if name not in CATALOGUE:
                raise _unknown_region(name, "enabled regions")
            if name in seen:
                raise ConfigError(f"enabled regions: {name!r} is listed more than once")
            seen.add(name)
        self.enabled: tuple[str, ...] = enabled
        self.default: str = self._enabled_region(default, "default region")
        self.countries = {self._code(c, "countries"): self._enabled_region(r, f"countries.{c}")
                          for c, r in dict(countries or {}).items()}
        self.continents = {self._continent(c): self._enabled_region(r, f"continents.{c}")
                           for c, r in dict(continents or {}).items()}
        if isinstance(blocked, str):
            raise ConfigError(f"blocked: expected a list of country codes, got the string {blocked!r}")
        self.blocked = frozenset(self._code(c, "blocked") for c in blocked)
        both = self.blocked & set(self.countries)
        if both:
            raise ConfigError(f"blocked: {sorted(both)} also have a country rule; a country is one or the other")
        # Radians and cosines of every enabled region, computed once: choose() runs per request.
        self._points = []
        for name in enabled:
            phi = math.radians(CATALOGUE[name].latitude)
            self._points.append((name, phi, math.radians(CATALOGUE[name].longitude), math.cos(phi)))

    def _enabled_region(self, name: object, setting: str) -> str:
        if name not in CATALOGUE:
            raise _unknown_region(name, setting)
        if name not in self.enabled:
            raise ConfigError(f"{setting}: {name!r} is not in the enabled regions {list(self.enabled)}")
        return name

    @staticmethod
    def _code(code: object, setting: str) -> str:
        if not isinstance(code, str) or len(code) != 2 or not code.isalpha() or not code.isupper():
            raise ConfigError(f"{setting}: {code!r} is not an ISO 3166 country code (two capital letters, like DE)")
        return code

    @staticmethod
    def _continent(code: object) -> str:
        if code not in CONTINENTS:
            raise ConfigError(f"continents: {code!r} is not a continent code; use one of {', '.join(CONTINENTS)}")
        return code

    @classmethod
    def from_rules(cls, enabled: Sequence[str], default: str, rules: Mapping) -> "RegionPolicy":
        """From the stage's JSON rules: {"countries": {...}, "continents": {...}, "blocked": [...]}."""
        if not isinstance(rules, Mapping):
            raise ConfigError("region rules: expected a JSON object with countries, continents, blocked")
        unknown = set(rules) - {"countries", "continents", "blocked"}
        if unknown:
            raise ConfigError(f"region rules: unknown key(s) {sorted(unknown)}; use countries, continents, blocked")
        for key in ("countries", "continents"):
            if not isinstance(rules.get(key, {}), Mapping):
                raise ConfigError(f"region rules: {key} must be an object like {{\"DE\": \"eu-central-1\"}}")
        return cls(enabled, default, rules.get("countries"), rules.get("continents"), rules.get("blocked", ()))

    def distance_km(self, location: Location | None, region: str) -> float | None:
        point = _point(location)
        if point is None:
            return None
        metro = CATALOGUE[region]
        return round(great_circle_km(*point, metro.latitude, metro.longitude), 1)

    def place(self, location: Location | None, region: str, reason: str) -> RegionChoice:
        """`region` for a caller at `location`, with its distance and country."""
        return RegionChoice(region, self.distance_km(location, region), reason, location.country if location else None)

    def choose(self, location: Location | None) -> RegionChoice:
        country = location.country if location is not None else None
        if country in self.blocked:
            raise RegionBlocked(f"devices in {country} may not be provisioned by this service")
        if country in self.countries:
            return self.place(location, self.countries[country], "country-rule")
        continent = location.continent if location is not None else None
        if continent in self.continents:
            return self.place(location, self.continents[continent], "continent-rule")
        point = _point(location)
        if point is None:
            return RegionChoice(self.default, None, "default", country)
        phi, lam = math.radians(point[0]), math.radians(point[1])
        cos_phi = math.cos(phi)
        best_name, best_km = self.default, math.inf
        for name, r_phi, r_lam, r_cos in self._points:
            km = _haversine(phi, lam, cos_phi, r_phi, r_lam, r_cos)
            if km < best_km:  # strict: on a tie the region listed first wins
                best_name, best_km = name, km
        return RegionChoice(best_name, round(best_km, 1), "nearest", country)
