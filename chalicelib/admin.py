"""Operator CLI: python -m chalicelib.admin [--stage local] COMMAND ...

Commands: keygen, init, register, list, stats, show, reset, audit, regions, where. Reads the same settings as
the service (the stage's environment in .chalice/config.json, overridden by the process environment), so the
CLI and the server always look at the same registry and keys. The use cases live in chalicelib.operations.
"""
import argparse
import csv
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cryptography import x509

from chalicelib import operations, wiring
from chalicelib.clock import timestamp, utcnow
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, FLEET_PUBLIC_KEY_NAME, Settings
from chalicelib.errors import ConfigError, ProvisioningError, RegionBlocked
from chalicelib.issuers.base import CertificateInfo
from chalicelib.keypolicy import KEYGEN_RSA_BITS, MIN_RSA_BITS
from chalicelib.regions import CATALOGUE, CONTINENTS
from chalicelib.registry.base import (
    CSV_COLUMNS,
    STATUSES,
    TABLE_COLUMNS,
    DeviceRecord,
    DeviceStatus,
    item_cells,
    item_of,
)
from chalicelib.signatures import load_device_key
from chalicelib.wire import THING_NAME

Args = argparse.Namespace


class CommandError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def cmd_keygen(config: Settings, args: Args) -> int:
    if args.out_dir:
        out = Path(args.out_dir).resolve()
        private_path, public_path = out / FLEET_PRIVATE_KEY_NAME, out / FLEET_PUBLIC_KEY_NAME
    else:  # the public key goes where the stage reads it (prod: inside chalicelib/, so it ships)
        private_path, public_path = config.keys_dir / FLEET_PRIVATE_KEY_NAME, config.fleet_public_key
    if private_path.exists() and not args.force:
        raise CommandError(f"{private_path} exists; every device signs with it. Use --force to replace it.")
    operations.make_fleet_key(private_path, public_path, args.bits)
    print(f"private key (for device firmware, keep secret): {private_path}")
    print(f"public key (the service verifies with it):      {public_path}")
    return 0


def cmd_init(config: Settings, args: Args) -> int:
    wiring.registry(config).create()
    where = (f"DynamoDB tables {config.table_name} and {config.table_name}-nonces"
             if config.registry == "dynamodb" else str(config.registry_path))
    print(f"registry ready: {where}")
    return 0


Enrolment = tuple[list[str], dict[str, str], dict[str, dict[str, str]], int]


def read_enrolment_csv(path: Path) -> Enrolment:
    """Names, public keys and attributes from an enrolment CSV, every row checked before anything is written.

    Raises CommandError after printing every bad row (with its line in the file) to stderr."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets start with a BOM
            return _parse_enrolment(csv.reader(f), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: cannot read it: {exc}") from None


def _parse_enrolment(reader: Any, path: Path) -> Enrolment:
    header = next(reader, None) or []
    if "thing_name" not in header or len(set(header)) != len(header) or "" in header:
        raise CommandError(f"{path}: line 1 must be a header with a thing_name column and no blank or repeated "
                           f"names (found {','.join(header) or 'nothing'})")
    name_at, key_at = header.index("thing_name"), header.index("public_key") if "public_key" in header else None
    extra = [(i, column) for i, column in enumerate(header) if i not in (name_at, key_at)]
    rows: dict[str, tuple[int, list[str]]] = {}  # name -> (line, row): a repeated name must repeat its row
    keys: dict[str, str] = {}
    attributes: dict[str, dict[str, str]] = {}
    errors: list[str] = []
    duplicates = 0
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


def _progress_bar(total: int) -> Any:
    """A tqdm bar on a terminal; None where tqdm is not installed (the Lambda package) or output is a file."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="device", file=sys.stdout)


def cmd_register(config: Settings, args: Args) -> int:
    keys: dict[str, str] | None = None
    attributes: dict[str, dict[str, str]] | None = None
    duplicates = 0
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


def cmd_list(config: Settings, args: Args) -> int:
    records = list(wiring.registry(config).list(args.status, args.region, args.since))
    if args.json:
        print(json.dumps([item_of(record) for record in records], indent=2))
        return 0
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(item_cells(record, CSV_COLUMNS) for record in records)
        return 0
    rows = [list(TABLE_COLUMNS)] + [item_cells(record, TABLE_COLUMNS, "-") for record in records]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(TABLE_COLUMNS))]
    for row in rows:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    print(f"({len(records)} device(s))")
    return 0


def _lease_end(record: DeviceRecord) -> str:
    return timestamp(record.lease_expires) if record.lease_expires else "-"


def cmd_stats(config: Settings, args: Args) -> int:
    stats = operations.fleet_stats(wiring.registry(config), utcnow())
    if args.json:
        print(json.dumps({"total": stats.total,
                          "by_status": {status.value: count for status, count in stats.by_status.items()},
                          "provisioned_by_region": stats.provisioned_by_region,
                          "stuck": [{"thing_name": r.thing_name, "lease_expires": _lease_end(r)} for r in stats.stuck]},
                         indent=2))
        return 0
    print(f"devices: {stats.total}")
    for status, count in stats.by_status.items():
        print(f"  {status.value:<15} {count}")
    print("provisioned by region:")
    for region, count in stats.provisioned_by_region.items():
        print(f"  {region:<15} {count}")
    print(f"stuck in provisioning (lease ended): {len(stats.stuck)}")
    for record in stats.stuck:
        print(f"  {record.thing_name} (lease ended {_lease_end(record)})")
    return 0


def certificate_details(cert: CertificateInfo) -> dict[str, Any]:
    """What the issuer knows, with validity and issuer read from the certificate itself (same on every backend)."""
    details: dict[str, Any] = {
        "certificate_id": cert.certificate_id, "serial": cert.serial, "thing_name": cert.thing_name,
        "region": cert.region, "issued_at": cert.issued_at and timestamp(cert.issued_at), "status": cert.status,
        "arn": cert.arn}
    details = {name: value for name, value in details.items() if value is not None}
    if cert.certificate_pem:
        pem = x509.load_pem_x509_certificate(cert.certificate_pem.encode())
        details.update(not_before=timestamp(pem.not_valid_before_utc), not_after=timestamp(pem.not_valid_after_utc),
                       issuer=pem.issuer.rfc4514_string(), subject=pem.subject.rfc4514_string())
    return details


def cmd_show(config: Settings, args: Args) -> int:
    record, cert = operations.show(wiring.registry(config), wiring.issuer(config), args.name)
    shown = item_of(record)
    shown.setdefault("attempts", 0)  # never claimed yet
    if record.certificate_id and record.region:
        shown["certificate"] = cert and certificate_details(cert)
    print(json.dumps(shown, indent=2))
    return 0


def cmd_reset(config: Settings, args: Args) -> int:
    outcome = operations.reset(wiring.registry(config), wiring.issuer(config), args.name)
    if outcome.revoked:
        print(f"revoked certificate {outcome.revoked.certificate_id} in {outcome.revoked.region} and removed the thing")
    print(f"{args.name}: {outcome.before.status.value} -> unprovisioned; it can provision again")
    return 0


def audit_json(report: operations.AuditReport, fixed: list[str]) -> dict[str, Any]:
    return {
        "stuck_claims": [{**item_of(r), "lease_expires": r.lease_expires and r.lease_expires.timestamp()}
                         for r in report.stuck_claims],
        "orphan_certificates": [{"certificate_id": c.certificate_id, "thing_name": c.thing_name, "region": c.region,
                                 "status": c.status} for c in report.orphan_certificates],
        "orphan_things": [{"thing_name": t.thing_name, "region": t.region} for t in report.orphan_things],
        "missing_certificates": [{"thing_name": m.thing_name, "certificate_id": m.certificate_id, "region": m.region,
                                  "status": m.status} for m in report.missing_certificates],
        "fixed": fixed}


def cmd_audit(config: Settings, args: Args) -> int:
    registry, issuer = wiring.registry(config), wiring.issuer(config)
    now = utcnow()
    report = operations.audit(registry, issuer, config.enabled_regions, now)
    fixed = operations.repair(registry, issuer, report, now) if args.fix else []
    if args.json:
        print(json.dumps(audit_json(report, fixed), indent=2, default=str))
    else:
        for record in report.stuck_claims:
            print(f"stuck claim: {record.thing_name} (lease ended {_lease_end(record)})")
        for cert in report.orphan_certificates:
            print(f"orphan certificate: {cert.certificate_id} in {cert.region} (thing {cert.thing_name})")
        for thing in report.orphan_things:
            print(f"orphan thing: {thing.thing_name} in {thing.region} (no registry item places it there)")
        for missing in report.missing_certificates:
            print(f"missing certificate: {missing.thing_name} refers to {missing.certificate_id} "
                  f"in {missing.region}, which is {missing.status}")
        for line in fixed:
            print(f"fixed: {line}")
        total = report.findings
        print(f"{total} finding(s)" + (f", {len(fixed)} fixed" if args.fix else
                                        ("; run with --fix to repair" if total else "")))
    return 0 if report.findings == 0 or (args.fix and len(fixed) == report.findings) else 1


def cmd_regions(config: Settings, args: Args) -> int:
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


def cmd_where(config: Settings, args: Args) -> int:
    location = wiring.locator(config).locate(args.ip)
    answer: dict[str, Any] = {"ip": args.ip, "location": None if location is None else {
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
    top = argparse.ArgumentParser(prog="python -m chalicelib.admin", description=(__doc__ or "").split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--stage", default="local", help="stage whose settings to use (default: local)")
    top.add_argument("--state-dir", help="override the stage's state directory (registry, CAs, keys)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="make the fleet provisioning signing key pair")
    p.add_argument("--out-dir", help="where to write the two PEM files (default: the stage's keys directory)")
    p.add_argument("--bits", type=int, default=MIN_RSA_BITS, choices=KEYGEN_RSA_BITS, help="RSA key size")
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
    p.add_argument("--status", type=DeviceStatus, choices=STATUSES, help="only devices in this state")
    p.add_argument("--region", help="only devices provisioned in this region")
    p.add_argument("--since", type=parse_since, metavar="DATE",
                   help="only devices provisioned at or after DATE (ISO date or date-time; UTC unless it says)")
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
        func: Callable[[Settings, Args], int] = args.func
        return func(Settings.for_stage(args.stage, args.state_dir), args)
    except (CommandError, ConfigError, operations.NotRegisteredDevice) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ProvisioningError as exc:  # a backend is unreachable, throttled or refuses our credentials
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
