"""The fleet report at scale: a synthetic SQLite registry of N devices, then `admin report` on it, timed.

    python -m bench.report                         # 100,000 devices: prints the file's size and the time
    python -m bench.report --devices 20000 --screenshot docs/report.png   # make report-screenshot

The devices are spread over every country on the map (a few large markets, a long tail), placed by the real
region policy with a couple of rules, so the page looks like a fleet's: some unknown locations on the default
region, some claims in flight, provisionings over the last weeks.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from admin import cli as admin
from admin import worldmap
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import Settings
from chalicelib.domain.clock import timestamp
from chalicelib.domain.regions import Location, RegionPolicy

RULES = {"countries": {"CH": "eu-central-1", "NZ": "ap-southeast-2", "CA": "us-east-1"},
         "continents": {"SA": "us-east-1"}}
SOUTH_AMERICA = {"AR", "BO", "BR", "CL", "CO", "EC", "GY", "PE", "PY", "SR", "UY", "VE"}
BIG = {"US": 30, "DE": 12, "JP": 10, "GB": 9, "IN": 8, "BR": 7, "FR": 6, "CN": 6, "KR": 5, "AU": 5, "CA": 4,
       "MX": 3, "IT": 3, "ES": 3, "NL": 2, "SE": 2, "PL": 2, "ZA": 2, "SG": 2, "AE": 2}


def country_points() -> list[tuple[str, float, float, float]]:
    """(code, lon, lat, spread) of each country: its anchor (the largest piece's centroid) and how far devices
    scatter around it, in degrees."""
    return [(s.code, *s.anchor, min(8.0, 0.1 * s.area ** 0.5)) for s in worldmap.shapes(worldmap.Frame())
            if s.code and s.code != "AQ"]


def synthetic_fleet(state_dir: Path, devices: int, seed: int = 20) -> None:
    rng = random.Random(seed)
    policy = RegionPolicy.from_rules(Settings.for_stage("local", str(state_dir)).enabled_regions, "eu-west-2", RULES)
    points = country_points()
    weights = [BIG.get(code, 0.05 + rng.random() * 0.25) for code, _, _, _ in points]
    registry = SqliteRegistry(state_dir / "registry.sqlite3")
    names = [f"sensor-{i:06d}" for i in range(devices)]
    registry.register(names)
    now = datetime.now(timezone.utc)
    rows = []
    chosen = rng.choices(points, weights, k=devices)
    for name, (code, lon, lat, spread) in zip(names, chosen):
        roll = rng.random()
        if roll < 0.07:
            continue  # still unprovisioned
        if roll < 0.075:  # a claim in flight; some of them stuck (their lease ended)
            rows.append(("provisioning", None, None, None, None, now.timestamp() + rng.choice((-600, 60)), name))
            continue
        if roll < 0.10:
            location = None  # the geolocation database did not know the address
        else:
            location = Location(lat + rng.uniform(-spread, spread) / 2, lon + rng.uniform(-spread, spread), code,
                                "SA" if code in SOUTH_AMERICA else None)
        choice = policy.choose(location)
        age = rng.triangular(0, 45, 0)  # more recent days have more provisionings
        rows.append(("provisioned", timestamp(now - timedelta(days=age)), choice.region,
                     location and location.country, choice.reason, None, name))
    # Straight to the table in one transaction: 100,000 claims and finalizes one by one would take minutes
    # and prove nothing about the report.
    db = sqlite3.connect(state_dir / "registry.sqlite3")
    with db:
        db.executemany("UPDATE devices SET prov_status = ?, prov_datetime = ?, aws_region = ?, country = ?, "
                       "region_reason = ?, lease_expires = ?, certificate_id = 'synthetic', attempts = 1 "
                       "WHERE thing_name = ?", rows)
    db.close()


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1400) -> None:
    """Headless Chromium, no network: the page as a person sees it."""
    if not shutil.which("chromium"):
        raise SystemExit("chromium is missing: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000, help="registry size (default 100000)")
    parser.add_argument("--out", help="where to write the report (default: a temporary directory)")
    parser.add_argument("--screenshot", metavar="PNG", help="also take a headless Chromium screenshot of it")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        os.environ.update(GIP_STATE_DIR=str(state), GIP_REGION_RULES=json.dumps(RULES))
        print(f"building a synthetic registry of {args.devices:,} devices ...", file=sys.stderr, flush=True)
        synthetic_fleet(state, args.devices)
        out = Path(args.out) if args.out else Path(tmp) / "report.html"
        started, cpu = time.perf_counter(), time.process_time()
        code = admin.main(["--state-dir", str(state), "report", "--html", str(out)])
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu  # CPU: fairer on a busy machine
        if code != 0:
            return code
        size = out.stat().st_size
        if args.screenshot:
            screenshot(out, Path(args.screenshot))
            print(f"screenshot: {args.screenshot}", file=sys.stderr)
        result = {"devices": args.devices, "bytes": size, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}
        print(json.dumps(result) if args.json else
              f"{args.devices:,} devices: report of {size / 1e6:.2f} MB written in {seconds:.2f} s "
              f"({cpu:.2f} s of CPU; limits: 2 MB, 5 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
