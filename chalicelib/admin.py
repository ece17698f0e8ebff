"""Operator CLI: python -m chalicelib.admin [--stage local] COMMAND ...

Commands: keygen, init, register, list, stats, show, reset, audit, regions, where. Reads the same settings as the service (the stage's environment in .chalice/config.json, overridden by
the process environment), so the CLI and the server always look at the same registry and keys.
"""
import argparse
import csv
import json
import os
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib import wiring
from chalicelib.clock import timestamp, utcnow
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, FLEET_PUBLIC_KEY_NAME, PROJECT_DIR, Settings
from chalicelib.errors import ConfigError, ProvisioningError, RegionBlocked
from chalicelib.issuers.base import CertificateRef
from chalicelib.issuers.local_ca import write_private
from chalicelib.provisioning import THING_NAME
from chalicelib.signatures import load_device_key
from chalicelib.regions import CATALOGUE, CONTINENTS
from chalicelib.registry.base import PROVISIONED, STATUSES


class CommandError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def stage_settings(stage: str, state_dir: str | None) -> Settings:
    env = {}
    config_file = PROJECT_DIR / ".chalice" / "config.json"
    if config_file.exists():
        stages = json.loads(config_file.read_text()).get("stages", {})
        if stage not in stages:
            raise CommandError(f"stage {stage!r} is not in {config_file} (stages: {', '.join(stages)})")
        env.update(stages[stage].get("environment_variables", {}))
    env.update({k: v for k, v in os.environ.items() if k.startswith("GIP_")})
    env["GIP_STAGE"] = stage
    if state_dir:
        env["GIP_STATE_DIR"] = str(Path(state_dir).resolve())
    return Settings.from_env(env)


def cmd_keygen(config: Settings, args) -> int:
    if args.out_dir:
        out = Path(args.out_dir).resolve()
        private_path, public_path = out / FLEET_PRIVATE_KEY_NAME, out / FLEET_PUBLIC_KEY_NAME
    else:  # the public key goes where the stage reads it (prod: inside chalicelib/, so it ships)
        private_path, public_path = config.keys_dir / FLEET_PRIVATE_KEY_NAME, config.fleet_public_key
    if private_path.exists() and not args.force:
        raise CommandError(f"{private_path} exists; every device signs with it. Use --force to replace it.")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"private key (for device firmware, keep secret): {private_path}")
    print(f"public key (the service verifies with it):      {public_path}")
    return 0


def cmd_init(config: Settings, args) -> int:
    wiring.registry(config).create()
    where = (f"DynamoDB tables {config.table_name} and {config.table_name}-nonces"
             if config.registry == "dynamodb" else str(config.registry_path))
    print(f"registry ready: {where}")
    return 0


def read_enrolment_csv(path: Path) -> tuple[list[str], dict, dict, int]:
    """Names, public keys and attributes from an enrolment CSV, every row checked before anything is written.

    Raises CommandError after printing every bad row (with its line in the file) to stderr."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets start with a BOM
            return _parse_enrolment(csv.reader(f), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: cannot read it: {exc}") from None


def _parse_enrolment(reader, path: Path) -> tuple[list[str], dict, dict, int]:
    header = next(reader, None) or []
    if "thing_name" not in header or len(set(header)) != len(header) or "" in header:
        raise CommandError(f"{path}: line 1 must be a header with a thing_name column and no blank or repeated "
                           f"names (found {','.join(header) or 'nothing'})")
    name_at, key_at = header.index("thing_name"), header.index("public_key") if "public_key" in header else None
    extra = [(i, column) for i, column in enumerate(header) if i not in (name_at, key_at)]
    rows: dict[str, tuple[int, list[str]]] = {}  # name -> (line, row): a repeated name must repeat its row
    keys, attributes, errors, duplicates = {}, {}, [], 0
    line = reader.line_num + 1
    try:
        for row in reader:
            start, line = line, reader.line_num + 1  # a quoted inline PEM spans lines: report where the row starts
            if not row:
                continue
            name = row[name_at] if len(row) > name_at else ""
            if len(row) != len(header):
                errors.append(f"line {start}: {len(row)} field(s), the header has {len(header)}")
            elif not THING_NAME.fullmatch(name):
                errors.append(f"line {start}: {name!r} is not a valid thing name "
                              "(letters, digits, ':', '_', '-'; 1-128 characters)")
            elif name in rows:
                if rows[name][1] == row:
                    duplicates += 1
                else:
                    errors.append(f"line {start}: {name} is also on line {rows[name][0]} with other values")
            else:
                rows[name] = (start, row)
                if key_at is not None and row[key_at].strip():
                    try:
                        keys[name] = _device_key(row[key_at], path.parent)
                    except (OSError, ValueError) as exc:
                        errors.append(f"line {start}: public_key of {name} is not usable: {exc}")
                attrs = {column: row[i] for i, column in extra if row[i] != ""}
                if attrs:
                    attributes[name] = attrs
    except csv.Error as exc:
        errors.append(f"line {line}: {exc}")
    if errors:
        for error in errors:
            print(f"{path}: {error}", file=sys.stderr)
        raise CommandError(f"{path}: {len(errors)} bad row(s); nothing was written")
    return list(rows), keys, attributes, duplicates


def _device_key(value: str, folder: Path) -> str:
    """An inline PEM, or the path of a PEM file relative to the CSV's folder; checked like the service will."""
    pem = value if value.lstrip().startswith("-----BEGIN") else (folder / value.strip()).read_text()
    load_device_key(pem)
    return pem


def _progress_bar(total: int):
    """A tqdm bar on a terminal; None where tqdm is not installed (the Lambda package) or output is a file."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="device", file=sys.stdout)


def cmd_register(config: Settings, args) -> int:
    keys, attributes, duplicates = None, None, 0
    if args.csv is not None:
        if args.names or args.prefix is not None or args.count is not None:
            raise CommandError("give --csv FILE, names or --prefix/--count: one of them")
        names, keys, attributes, duplicates = read_enrolment_csv(Path(args.csv))
        if not names:
            raise CommandError(f"{args.csv}: no devices in it")
    elif args.prefix is not None:
        if args.names:
            raise CommandError("give names or --prefix/--count, not both")
        if args.count is None or args.count < 1:
            raise CommandError("--prefix needs --count N (N >= 1)")
        names = [f"{args.prefix}{i}" for i in range(args.start, args.start + args.count)]
    elif args.count is not None:
        raise CommandError("--count needs --prefix")
    elif args.names:
        names = list(dict.fromkeys(args.names))
    else:
        raise CommandError("give device names, or --prefix NAME --count N")
    bad = [name for name in names if not THING_NAME.fullmatch(name)]
    if bad:
        raise CommandError(f"not valid thing names (letters, digits, ':', '_', '-'; 1-128 characters): "
                           f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")
    if args.public_key:
        if len(names) != 1 or args.csv is not None:
            raise CommandError("--public-key goes with exactly one NAME")
        try:
            pem = Path(args.public_key).read_text()
            load_device_key(pem)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{args.public_key}: not a usable device public key: {exc}") from None
        keys = {names[0]: pem}
    registry = wiring.registry(config)
    registry.create()
    bar = _progress_bar(len(names))
    try:
        added = registry.register(names, keys, attributes,
                                  progress=None if bar is None else lambda done: bar.update(done - bar.n))
    finally:
        if bar:
            bar.close()
    print(f"registered {added} new device(s); {len(names) - added} already present"
          + (": nothing changed" if added == 0 else "")
          + (f" ({duplicates} repeated row(s) skipped)" if duplicates else ""))
    return 0


def parse_since(text: str) -> datetime:
    """An ISO date or date-time; without a zone it is UTC, like every time the registry stores."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


_CSV_COLUMNS = ("thing_name", "prov_status", "aws_region", "prov_datetime", "certificate_id", "country",
                "attempts", "last_error", "attributes", "certificate_expires", "renewal_count", "last_renewal")


def expiring_within(items: list[dict], days: float, now: datetime) -> list[dict]:
    """Provisioned devices whose certificate ends within `days` from now, soonest first."""
    limit = timestamp(now + timedelta(days=days))
    due = [item for item in items if item["prov_status"] == PROVISIONED and item.get("certificate_expires", "") <= limit]
    return sorted(due, key=lambda item: item.get("certificate_expires", ""))


def cmd_list(config: Settings, args) -> int:
    items = list(wiring.registry(config).list(args.status, args.region, args.since))
    if args.expiring_within is not None:
        items = expiring_within(items, args.expiring_within, utcnow())
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        for item in items:
            if "attributes" in item:  # one cell, however many attributes a device has
                item["attributes"] = json.dumps(item["attributes"], sort_keys=True, ensure_ascii=False)
            writer.writerow([item.get(c, "") for c in _CSV_COLUMNS])
        return 0
    columns = ("thing_name", "prov_status", "aws_region", "prov_datetime")
    if args.expiring_within is not None:
        columns += ("certificate_expires",)
    rows = [columns] + [tuple(item.get(c, "-") for c in columns) for item in items]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    print(f"({len(items)} device(s))")
    return 0


def fleet_stats(registry, now: datetime) -> dict:
    """Counts from one pass over the registry, so they add up to its total."""
    items = list(registry.list())
    by_status = Counter(item["prov_status"] for item in items)
    by_region = Counter(item.get("aws_region", "-") for item in items if item["prov_status"] == PROVISIONED)
    stuck = [{"thing_name": item["thing_name"], "lease_expires": _iso(item["lease_expires"])}
             for item in registry.stuck(now)]
    return {"total": len(items), "by_status": {status: by_status[status] for status in STATUSES},
            "provisioned_by_region": dict(sorted(by_region.items())), "stuck": stuck}


def _iso(epoch: float) -> str:
    return timestamp(datetime.fromtimestamp(epoch, timezone.utc))


def cmd_stats(config: Settings, args) -> int:
    stats = fleet_stats(wiring.registry(config), utcnow())
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"devices: {stats['total']}")
    for status, count in stats["by_status"].items():
        print(f"  {status:<15} {count}")
    print("provisioned by region:")
    for region, count in stats["provisioned_by_region"].items():
        print(f"  {region:<15} {count}")
    print(f"stuck in provisioning (lease ended): {len(stats['stuck'])}")
    for item in stats["stuck"]:
        print(f"  {item['thing_name']} (lease ended {item['lease_expires']})")
    return 0


def certificate_details(found: dict) -> dict:
    """What the issuer knows, with validity and issuer read from the certificate itself (same on every backend)."""
    cert = x509.load_pem_x509_certificate(found["certificate_pem"].encode())
    return {**{k: v for k, v in found.items() if k != "certificate_pem"},
            "not_before": timestamp(cert.not_valid_before_utc),
            "not_after": timestamp(cert.not_valid_after_utc),
            "issuer": cert.issuer.rfc4514_string(), "subject": cert.subject.rfc4514_string()}


def cmd_show(config: Settings, args) -> int:
    item = wiring.registry(config).get(args.name)
    if item is None:
        raise CommandError(f"{args.name} is not registered")
    item.setdefault("attempts", 0)  # never claimed yet
    if item["prov_status"] == PROVISIONED:  # renewal history, also for devices never renewed
        item["renewals"] = {"count": item.pop("renewal_count", 0), "last": item.pop("last_renewal", None),
                            "previous_certificate_id": item.pop("previous_certificate_id", None),
                            "previous_region": item.pop("previous_region", None)}
    if item.get("certificate_id") and item.get("aws_region"):
        found = wiring.issuer(config).certificate(item["certificate_id"], item["aws_region"])
        item["certificate"] = found and certificate_details(found)
    print(json.dumps(item, indent=2))
    return 0


def cmd_reset(config: Settings, args) -> int:
    registry, issuer = wiring.registry(config), wiring.issuer(config)
    item = registry.get(args.name)
    if item is None:
        raise CommandError(f"{args.name} is not registered")
    if item.get("certificate_id") and item.get("aws_region"):
        # Revoke first: if that fails the device stays provisioned and the command can be run again.
        issuer.revoke(CertificateRef(item["aws_region"], item["certificate_id"], args.name))
        print(f"revoked certificate {item['certificate_id']} in {item['aws_region']} and removed the thing")
    registry.reset(args.name)
    print(f"{args.name}: {item['prov_status']} -> unprovisioned; it can provision again")
    return 0


def audit(config: Settings, registry, issuer, now: datetime) -> dict:
    """What a crashed or half-failed provisioning can leave behind, on any backend."""
    items = list(registry.list())
    stuck = registry.stuck(now)
    # A live claim may be about to record its certificate: that certificate is not an orphan yet.
    live_claims = ({item["thing_name"] for item in items if item["prov_status"] == "provisioning"}
                   - {item["thing_name"] for item in stuck})
    live_claims |= {item["thing_name"] for item in items if item.get("renewal_lease", 0) >= now.timestamp()}
    # A renewal recorded but cut short before its previous certificate (and thing, after a move) was removed.
    unfinished = [{"thing_name": item["thing_name"], "previous_certificate_id": item.get("previous_certificate_id"),
                   "previous_region": item.get("previous_region"), "region": item.get("aws_region"),
                   "move": item.get("previous_region") != item.get("aws_region")}
                  for item in items if item.get("retire_pending")]
    referenced = {(item.get("aws_region"), item.get("certificate_id")) for item in items
                  if item["prov_status"] == "provisioned"}
    referenced |= {(u["previous_region"], u["previous_certificate_id"]) for u in unfinished}
    orphans = [cert for region in config.enabled_regions for cert in issuer.active_certificates(region)
               if (region, cert["certificate_id"]) not in referenced and cert.get("thing_name") not in live_claims]
    placed = {(item.get("aws_region"), item["thing_name"]) for item in items if item["prov_status"] == "provisioned"}
    placed |= {(u["previous_region"], u["thing_name"]) for u in unfinished}
    things = [{"thing_name": name, "region": region} for region in config.enabled_regions
              for name in issuer.things(region) if (region, name) not in placed and name not in live_claims]
    missing = []
    for item in items:
        if item["prov_status"] == "provisioned":
            cert = issuer.certificate(item.get("certificate_id", ""), item.get("aws_region"))
            if cert is None or cert["status"] != "ACTIVE":
                missing.append({"thing_name": item["thing_name"], "certificate_id": item.get("certificate_id"),
                                "region": item.get("aws_region"), "status": cert["status"] if cert else "gone"})
    found = {"stuck_claims": stuck, "orphan_certificates": orphans, "orphan_things": things,
             "missing_certificates": missing}
    if unfinished:  # only when there is one, so audits of fleets that never renewed read as before
        found["unfinished_renewals"] = unfinished
    return found


def cmd_audit(config: Settings, args) -> int:
    registry, issuer = wiring.registry(config), wiring.issuer(config)
    now = utcnow()
    found = audit(config, registry, issuer, now)
    fixed = []
    if args.fix:
        for item in found["stuck_claims"]:
            if registry.release_stuck(item["thing_name"], now):
                fixed.append(f"released the expired claim on {item['thing_name']}")
        in_use = {(item.get("aws_region"), item["thing_name"]) for item in registry.list(PROVISIONED)}
        for cert in found["orphan_certificates"]:
            ref = CertificateRef(cert["region"], cert["certificate_id"], cert.get("thing_name"))
            if (ref.region, ref.thing_name) in in_use:  # a renewal's leftover: the thing holds the current one
                issuer.retire(ref, delete_thing=False)
            else:
                issuer.revoke(ref)
            fixed.append(f"revoked orphan certificate {cert['certificate_id']} in {cert['region']}"
                         f" (thing {cert.get('thing_name')})")
        for thing in found["orphan_things"]:
            issuer.delete_thing(thing["region"], thing["thing_name"])
            fixed.append(f"deleted orphan thing {thing['thing_name']} in {thing['region']}")
        for item in found["missing_certificates"]:
            issuer.revoke(CertificateRef(item["region"], item["certificate_id"], item["thing_name"]))
            issuer.delete_thing(item["region"], item["thing_name"])
            registry.reset(item["thing_name"])
            fixed.append(f"reset {item['thing_name']} (its certificate is {item['status']}) to unprovisioned")
        for item in found.get("unfinished_renewals", []):
            issuer.retire(CertificateRef(item["previous_region"], item["previous_certificate_id"], item["thing_name"]),
                          delete_thing=item["move"])
            registry.previous_retired(item["thing_name"], item["previous_certificate_id"])
            fixed.append(f"finished the {'move' if item['move'] else 'renewal'} of {item['thing_name']}: revoked "
                         f"{item['previous_certificate_id']} in {item['previous_region']}"
                         + (" and deleted the thing there" if item["move"] else ""))
    if args.json:
        print(json.dumps({**found, "fixed": fixed}, indent=2, default=str))
    else:
        for item in found["stuck_claims"]:
            print(f"stuck claim: {item['thing_name']} (lease ended "
                  f"{timestamp(datetime.fromtimestamp(item['lease_expires'], timezone.utc))})")
        for cert in found["orphan_certificates"]:
            print(f"orphan certificate: {cert['certificate_id']} in {cert['region']} (thing {cert.get('thing_name')})")
        for thing in found["orphan_things"]:
            print(f"orphan thing: {thing['thing_name']} in {thing['region']} (no registry item places it there)")
        for item in found["missing_certificates"]:
            print(f"missing certificate: {item['thing_name']} refers to {item['certificate_id']} "
                  f"in {item['region']}, which is {item['status']}")
        for item in found.get("unfinished_renewals", []):
            print(f"unfinished {'move' if item['move'] else 'renewal'}: {item['thing_name']} now has a certificate in "
                  f"{item['region']}; its previous certificate {item['previous_certificate_id']} in "
                  f"{item['previous_region']} is not removed yet")
        for line in fixed:
            print(f"fixed: {line}")
        total = sum(len(v) for v in found.values())
        print(f"{total} finding(s)" + (f", {len(fixed)} fixed" if args.fix else
                                        ("; run with --fix to repair" if total else "")))
    findings = sum(len(v) for v in found.values())
    return 0 if findings == 0 or (args.fix and len(fixed) == findings) else 1


def cmd_regions(config: Settings, args) -> int:
    policy = wiring.region_policy(config)
    print("enabled regions (nearest by great-circle distance, after the rules):")
    for name in policy.enabled:
        region = CATALOGUE[name]
        marker = "  (default for unknown locations)" if name == policy.default else ""
        print(f"  {name:<15} {region.metro:<32} {region.latitude:8.2f} {region.longitude:8.2f}{marker}")
    print("rules, in order:")
    print(f"  blocked countries: {', '.join(sorted(policy.blocked)) or 'none'}")
    print("  country rules: " + (", ".join(f"{c} -> {r}" for c, r in sorted(policy.countries.items())) or "none"))
    print("  continent rules: " + (", ".join(f"{c} ({CONTINENTS[c]}) -> {r}"
                                              for c, r in sorted(policy.continents.items())) or "none"))
    return 0


def cmd_where(config: Settings, args) -> int:
    location = wiring.locator(config).locate(args.ip)
    answer = {"ip": args.ip, "location": None if location is None else {
        "latitude": location.latitude, "longitude": location.longitude,
        "country": location.country, "continent": location.continent}}
    try:
        choice = wiring.region_policy(config).choose(location)
        answer.update(region=choice.region, reason=choice.reason, distance=choice.distance_km)
    except RegionBlocked as exc:
        answer.update(region=None, reason=exc.code, message=exc.message)
    print(json.dumps(answer, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m chalicelib.admin", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--stage", default="local", help="stage whose settings to use (default: local)")
    top.add_argument("--state-dir", help="override the stage's state directory (registry, CAs, keys)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="make the fleet provisioning signing key pair")
    p.add_argument("--out-dir", help="where to write the two PEM files (default: the stage's keys directory)")
    p.add_argument("--bits", type=int, default=2048, choices=(2048, 3072, 4096), help="RSA key size")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("init", help="create the registry (safe to repeat)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("register", help="add devices to the allow-list as unprovisioned",
                       description="Add devices to the allow-list. Names already registered are left unchanged.")
    p.add_argument("names", nargs="*", metavar="NAME", help="thing names")
    p.add_argument("--prefix", help="register PREFIX<start> .. PREFIX<start+count-1>")
    p.add_argument("--count", type=int, help="how many names to make with --prefix")
    p.add_argument("--start", type=int, default=1, help="first number with --prefix (default 1)")
    p.add_argument("--csv", metavar="FILE",
                   help="register the devices in a CSV file: a thing_name column, optionally public_key (inline PEM "
                        "or a PEM file's path relative to the CSV) and any other columns as attributes; every row is "
                        "checked first and nothing is written if one is bad")
    p.add_argument("--public-key", metavar="FILE",
                   help="the device's own signing public key (PEM, RSA 2048+ or EC P-256): then only that key, "
                        "not the fleet key, is accepted for it")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("list", help="list registered devices")
    p.add_argument("--status", choices=STATUSES, help="only devices in this state")
    p.add_argument("--region", help="only devices provisioned in this region")
    p.add_argument("--since", type=parse_since, metavar="DATE",
                   help="only devices provisioned at or after DATE (ISO date or date-time; UTC unless it says)")
    p.add_argument("--expiring-within", type=float, metavar="DAYS",
                   help="only provisioned devices whose certificate expires within DAYS, soonest first "
                        "(devices that renew by themselves do so 30 days before)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("stats", help="count devices by status and region; list claims stuck in provisioning")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("show", help="show one device's registry item, certificate and history as JSON")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("regions", help="show the enabled regions, their coordinates and the region rules")
    p.set_defaults(func=cmd_regions)

    p = sub.add_parser("where", help="show which region an IP address would get, and why (provisions nothing)")
    p.add_argument("ip", metavar="IP")
    p.set_defaults(func=cmd_where)

    p = sub.add_parser("reset", help="deprovision a device so it can provision again",
                       description="Revoke and delete the device's certificate, delete its thing, and set it back "
                                   "to unprovisioned (after a factory reset, a lost server-made key, or a move "
                                   "to another continent).")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("audit", help="find stuck claims, orphan certificates and missing certificates",
                       description="Lists claims whose lease ended (a process died mid-way), active certificates "
                                   "and things in any enabled region that no registry item refers to, and provisioned "
                                   "devices whose certificate is gone. Exit code 1 when something is found "
                                   "and not fixed.")
    p.add_argument("--fix", action="store_true",
                   help="release stuck claims, revoke orphan certificates, reset devices whose certificate is gone")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_audit)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(stage_settings(args.stage, args.state_dir), args)
    except (CommandError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ProvisioningError as exc:  # a backend is unreachable, throttled or refuses our credentials
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
