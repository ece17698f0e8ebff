"""Operator CLI: python -m admin [--stage local] COMMAND ...

Commands: keygen, init, register, list, stats, show, reset, audit, regions, where, report. Reads the same
settings as the service (the stage's environment in .chalice/config.json, overridden by the process
environment), so the CLI and the server always look at the same registry and keys. The use cases live in
admin.operations.
"""
import argparse
import csv
import ipaddress
import json
import os
import re
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cryptography import x509

from admin import operations
from chalicelib.adapters import fleet_keys
from chalicelib.adapters.registry.items import CSV_COLUMNS, TABLE_COLUMNS, item_cells, item_of
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, FLEET_PUBLIC_KEY_NAME, PROJECT_DIR, Settings, default_state_dir
from chalicelib.container import Container
from chalicelib.domain.certificates import CertificateInfo
from chalicelib.domain.clock import timestamp, utcnow
from chalicelib.domain.errors import ConfigError, ProvisioningError, RegionBlocked
from chalicelib.domain.keypolicy import KEYGEN_RSA_BITS, MIN_RSA_BITS
from chalicelib.domain.records import PROVISIONED, STATUSES, DeviceRecord, DeviceStatus
from chalicelib.domain.regions import CATALOGUE, CONTINENTS
from chalicelib.domain.requests import THING_NAME
from chalicelib.domain.signatures import load_device_key

Args = argparse.Namespace


class CommandError(Exception):
    """A problem the operator can fix; printed without a traceback, exit code `code` (2: how the command was asked;
    1: what it met)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def existing_registry(parts: Container) -> Any:
    """The stage's registry; an error rather than a new empty one when it does not exist (a mistyped --state-dir).
    Only `init` and `register` create it."""
    config = parts.settings
    if config.registry == "sqlite" and not config.registry_path.exists():
        raise CommandError(f"no registry at {config.registry_path}: check --state-dir / GIP_STATE_DIR, or create "
                           "it with `init` or `register`")
    return parts.registry


def natural_key(name: str) -> list[Any]:
    """mydevice2 before mydevice10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 address: {text!r}") from None


def aws_problem(exc: Exception) -> tuple[str, int] | None:
    """One line an operator can act on for a botocore failure, with the exit code (2: the setup, 1: AWS); None for
    anything else."""
    if "botocore" not in sys.modules or not type(exc).__module__.startswith("botocore"):
        return None
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, NoRegionError
    if isinstance(exc, NoRegionError):
        return ("no AWS region: set one with `export AWS_DEFAULT_REGION=eu-west-2` (the region of the table and "
                "the API), or `aws configure`", 2)
    if isinstance(exc, NoCredentialsError):
        return ("no AWS credentials: run `aws configure`, or set AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY", 1)
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach AWS: {exc}", 1
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"AWS refused {exc.operation_name}: {error.get('Code')}: {error.get('Message')}", 1
    return f"AWS call failed: {exc}", 1


def cmd_keygen(parts: Container, args: Args) -> int:
    config = parts.settings
    parameter = None if args.out_dir else config.fleet_public_key_parameter
    if args.out_dir:
        out = Path(args.out_dir).resolve()
        private_path, public_path = out / FLEET_PRIVATE_KEY_NAME, out / FLEET_PUBLIC_KEY_NAME
    else:  # the public key goes where the stage reads it (prod: the SSM parameter)
        private_path, public_path = config.keys_dir / FLEET_PRIVATE_KEY_NAME, config.fleet_public_key
    if private_path.exists() and not args.force:
        raise CommandError(f"{private_path} exists; every device signs with it. Use --force to replace it.")
    ssm = parts.aws.client("ssm") if parameter else None
    current = fleet_keys.read_parameter(ssm, parameter) if parameter else None
    if current and not args.force:
        raise CommandError(f"SSM parameter {parameter} already holds the fleet public key (made elsewhere?); "
                           "--force replaces it, keeping it accepted as the previous key")
    public_key = operations.make_fleet_key(private_path, None if parameter else public_path, args.bits)
    print(f"private key (for device firmware, keep secret): {private_path}")
    if parameter:
        # The new key first; the one it replaces stays accepted until the next rotation.
        fleet_keys.publish(ssm, parameter, public_key, current)
        print(f"public key (the service verifies with it):      SSM parameter {parameter}"
              + (" (the replaced key stays accepted as the previous one)" if current else ""))
    else:
        print(f"public key (the service verifies with it):      {public_path}")
    return 0


def cmd_init(parts: Container, args: Args) -> int:
    config = parts.settings
    registry = parts.registry
    registry.create()
    registry.check()  # an existing file is checked whole (quick_check) and writable, not just "ready"
    where = (f"DynamoDB tables {config.table_name} and {config.table_name}-nonces"
             if config.registry == "dynamodb" else str(config.registry_path))
    print(f"registry ready: {where}")
    if config.issuer == "aws-iot" and config.registry == "dynamodb":
        # Each region's endpoint where every container reads it, so that none calls DescribeEndpoint (issue 18).
        parts.issuer.check(tuple(config.enabled_regions))
        print(f"AWS IoT endpoints recorded for {len(config.enabled_regions)} regions")
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


def cmd_register(parts: Container, args: Args) -> int:
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
    registry = parts.registry
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


def device_status(text: str) -> DeviceStatus:
    try:
        return DeviceStatus(text)
    except ValueError:  # argparse would name the type: "invalid DeviceStatus value"
        raise argparse.ArgumentTypeError(f"not a device status: {text!r} (choose from "
                                         f"{', '.join(STATUSES)})") from None


MAX_DAYS = 36_500


def days(text: str) -> float:
    """A number of days from now: 0 to MAX_DAYS (past it, a date is out of range)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 0 <= value <= MAX_DAYS:  # NaN too
        raise argparse.ArgumentTypeError(f"a number of days from 0 to {MAX_DAYS} is expected, not {text!r}")
    return value


def parse_since(text: str) -> datetime:
    """An ISO date or date-time; without a zone it is UTC, like every time the registry stores."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def known_region(parts: Container, registry: Any, region: str) -> str:
    """An enabled region of the stage, or one the registry still places devices in (a region disabled since)."""
    enabled = parts.regions.enabled
    if region not in enabled and (not region or next(registry.list(region=region), None) is None):
        raise CommandError(f"--region {region}: not an enabled region of the {parts.settings.stage} stage, and no "
                           f"device is in it; the enabled regions: {', '.join(enabled)}")
    return region


def cmd_list(parts: Container, args: Args) -> int:
    registry = existing_registry(parts)
    region = None if args.region is None else known_region(parts, registry, args.region)
    records = sorted(registry.list(args.status, region, args.since), key=lambda record: natural_key(record.thing_name))
    columns: tuple[str, ...] = TABLE_COLUMNS
    if args.expiring_within is not None:
        records = operations.expiring_within(records, args.expiring_within, utcnow())
        columns += ("certificate_expires",)
    if args.json:
        print(json.dumps([item_of(record) for record in records], indent=2))
        return 0
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(item_cells(record, CSV_COLUMNS) for record in records)
        return 0
    rows = [list(columns)] + [item_cells(record, columns, "-") for record in records]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    print(f"({len(records)} device(s))")
    return 0


def _lease_end(record: DeviceRecord) -> str:
    return timestamp(record.lease_expires) if record.lease_expires else "-"


def cmd_stats(parts: Container, args: Args) -> int:
    stats = operations.fleet_stats(existing_registry(parts), utcnow())
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


def cmd_show(parts: Container, args: Args) -> int:
    record, cert = operations.show(existing_registry(parts), parts.issuer, args.name)
    shown = item_of(record)
    shown.setdefault("attempts", 0)  # never claimed yet
    if record.status is PROVISIONED:  # the renewal history, also of a device never renewed
        shown["renewals"] = {"count": shown.pop("renewal_count", 0), "last": shown.pop("last_renewal", None),
                             "previous_certificate_id": shown.pop("previous_certificate_id", None),
                             "previous_region": shown.pop("previous_region", None)}
    if record.certificate_id and record.region:
        shown["certificate"] = cert and certificate_details(cert)
    print(json.dumps(shown, indent=2))
    return 0


def cmd_reset(parts: Container, args: Args) -> int:
    try:
        outcome = operations.reset(existing_registry(parts), parts.issuer, args.name)
    except operations.ResetIncomplete as stopped:
        raise CommandError(stopped_reset(stopped, f"run `python -m admin reset {args.name}` again"), 1) from None
    if outcome.before.reset_pending:
        print(f"{args.name}: finishing a reset begun earlier that did not finish")
    for revoked in outcome.revoked:
        print(f"revoked certificate {revoked.certificate_id} in {revoked.region}"
              + (" and removed the thing" if revoked.delete_thing else ""))
    print(f"{args.name}: {outcome.before.status.value} -> unprovisioned; it can provision again")
    return 0


def stopped_reset(stopped: operations.ResetIncomplete, again: str) -> str:
    """One line: whose reset stopped, what it had done, why, and what to do: 'reset of dev1 stopped: certificate X
    in R revoked, registry not updated (...): registry ...: the disk is full ...; run ... again'."""
    cause = problem(stopped.cause)
    why = cause[0] if cause else f"{type(stopped.cause).__name__}: {stopped.cause}"
    listed = "; `python -m admin audit` lists it meanwhile" if stopped.recorded else ""
    return f"reset of {stopped.thing_name} stopped: {stopped.done()}: {why}; {again}{listed}"


def _attempt_json(attempt: operations.Attempt) -> dict[str, Any]:
    values = {"thing_name": attempt.thing_name, "region": attempt.region, "certificates": attempt.certificates,
              "key": attempt.key, "age_seconds": attempt.age_seconds, "lease_left_seconds": attempt.lease_left_seconds,
              "lease_expires": attempt.lease_expires and attempt.lease_expires.timestamp(),
              "renewal": attempt.renewal or None}
    return {name: value for name, value in values.items() if value is not None or name in ("region", "key")}


AUDIT_AGAIN = "run `python -m admin audit --fix` again"


def audit_json(report: operations.AuditReport, repairs: operations.Repairs) -> dict[str, Any]:
    return {
        "in_flight": [_attempt_json(a) for a in report.in_flight],
        "stuck_claims": [_attempt_json(a) for a in report.stuck_claims],
        "unfinished_rollbacks": [_attempt_json(a) for a in report.unfinished_rollbacks],
        "orphan_certificates": [{"certificate_id": c.certificate_id, "thing_name": c.thing_name, "region": c.region,
                                 "status": c.status} for c in report.orphan_certificates],
        "orphan_things": [{"thing_name": t.thing_name, "region": t.region} for t in report.orphan_things],
        "missing_certificates": [{"thing_name": m.thing_name, "certificate_id": m.certificate_id, "region": m.region,
                                  "status": m.status} for m in report.missing_certificates],
        **({"unfinished_renewals": [{"thing_name": u.thing_name, "previous_certificate_id": u.previous_certificate_id,
                                     "previous_region": u.previous_region, "region": u.region, "move": u.move}
                                    for u in report.unfinished_renewals]} if report.unfinished_renewals else {}),
        **({"unfinished_resets": [{"thing_name": u.thing_name, "prov_status": u.status.value,
                                   "certificates": [{"certificate_id": c.certificate_id, "region": c.region}
                                                    for c in u.certificates]}
                                  for u in report.unfinished_resets]} if report.unfinished_resets else {}),
        "fixed": repairs.fixed,
        **({"not_fixed": [stopped_reset(stopped, AUDIT_AGAIN) for stopped in repairs.failed]}
           if repairs.failed else {})}


def _issued(attempt: operations.Attempt) -> str:
    if not attempt.region:
        return ""
    return (f"; its attempt in {attempt.region} ({attempt.key} key) issued: "
            f"{', '.join(attempt.certificates) or 'none found'}")


def cmd_audit(parts: Container, args: Args) -> int:
    config = parts.settings
    registry, issuer = existing_registry(parts), parts.issuer
    now = utcnow()
    report = operations.audit(registry, issuer, config.enabled_regions, now)
    repairs = (operations.repair(registry, issuer, report, now, config.lease_for_audit()) if args.fix
               else operations.Repairs())
    fixed = repairs.fixed
    if args.json:
        print(json.dumps(audit_json(report, repairs), indent=2, default=str))
    else:
        for attempt in report.in_flight:
            print(f"in flight: {attempt.thing_name}{' renewal' if attempt.renewal else ''} claimed "
                  f"{attempt.age_seconds} s ago, lease ends in "
                  f"{attempt.lease_left_seconds} s{_issued(attempt)} (not a finding)")
        for attempt in report.stuck_claims:
            ended = timestamp(attempt.lease_expires) if attempt.lease_expires else "-"
            print(f"stuck {'renewal' if attempt.renewal else 'claim'}: {attempt.thing_name} (lease ended {ended})"
                  f"{_issued(attempt)}")
        for attempt in report.unfinished_rollbacks:
            print(f"unfinished rollback: {attempt.thing_name}{_issued(attempt)}")
        for cert in report.orphan_certificates:
            print(f"orphan certificate: {cert.certificate_id} in {cert.region} (thing {cert.thing_name})")
        for thing in report.orphan_things:
            print(f"orphan thing: {thing.thing_name} in {thing.region} (no registry item places it there)")
        for missing in report.missing_certificates:
            print(f"missing certificate: {missing.thing_name} refers to {missing.certificate_id} "
                  f"in {missing.region}, which is {missing.status}")
        for unfinished in report.unfinished_renewals:
            print(f"unfinished {'move' if unfinished.move else 'renewal'}: {unfinished.thing_name} now has a "
                  f"certificate in {unfinished.region}; its previous certificate {unfinished.previous_certificate_id} "
                  f"in {unfinished.previous_region} is not removed yet")
        for reset in report.unfinished_resets:
            print(f"unfinished reset: {reset.thing_name} is still {reset.status.value}; its reset revokes "
                  + ", ".join(f"{c.certificate_id} in {c.region}" for c in reset.certificates)
                  + f" (revoked, or not yet): `python -m admin reset {reset.thing_name}` or --fix finishes it")
        for line in fixed:
            print(f"fixed: {line}")
        for stopped in repairs.failed:
            print(f"not fixed: {stopped_reset(stopped, AUDIT_AGAIN)}")
        total = report.findings
        print(f"{total} finding(s)" + (f", {len(fixed)} fixed" if args.fix else
                                        ("; run with --fix to repair" if total else ""))
              + (f"; {len(report.in_flight)} in flight" if report.in_flight else ""))
    return 0 if report.findings == 0 or (args.fix and len(fixed) == report.findings) else 1


def cmd_regions(parts: Container, args: Args) -> int:
    policy = parts.regions
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


def cmd_where(parts: Container, args: Args) -> int:
    location = parts.locator.locate(args.ip)
    answer: dict[str, Any] = {"ip": args.ip, "location": None if location is None else {
        "latitude": location.latitude, "longitude": location.longitude,
        "country": location.country, "continent": location.continent}}
    try:
        choice = parts.regions.choose(location)
        answer.update(region=choice.region, reason=choice.reason, distance=choice.distance_km)
    except RegionBlocked as exc:
        answer.update(region=None, reason=exc.code, message=exc.message)
    print(json.dumps(answer, indent=2))
    return 0


def cmd_report(parts: Container, args: Args) -> int:
    from admin import report  # only this command needs the map data

    try:
        print(f"report written: {report.write(parts, Path(args.html), args.audit)}")
    except report.CannotWrite as exc:
        raise CommandError(str(exc)) from None
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m admin", description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="state directory (registry, CAs, keys, logs): --state-dir, else $GIP_STATE_DIR, else\n"
               f"  {default_state_dir('<stage>')}\n"
               f"  (the local stage's now: {os.environ.get('GIP_STATE_DIR') or default_state_dir('local')})")
    top.add_argument("--stage", default="local", help="stage whose settings to use (default: local)")
    top.add_argument("--state-dir", help="the stage's state directory: registry, CAs, keys (default: see below)")
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
    p.add_argument("--status", type=device_status, choices=STATUSES, help="only devices in this state")
    p.add_argument("--region", help="only devices provisioned in this region (an enabled region of the stage, or "
                                    "one where the registry still places devices)")
    p.add_argument("--since", type=parse_since, metavar="DATE",
                   help="only devices provisioned at or after DATE (ISO date or date-time; UTC unless it says)")
    p.add_argument("--expiring-within", type=days, metavar="DAYS",
                   help="only provisioned devices whose certificate expires within DAYS, soonest first "
                        "(the device client renews by itself 30 days before)")
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
    p.add_argument("ip", metavar="IP", type=ip_address, help="an IPv4 or IPv6 address")
    p.set_defaults(func=cmd_where)

    p = sub.add_parser("reset", help="deprovision a device so it can provision again",
                       description="Revoke and delete the device's certificate (and a previous one whose "
                                   "retirement is pending), delete its thing, and set it back to unprovisioned (after "
                                   "a factory reset, a lost server-made key, or a move to another continent). The "
                                   "intent is recorded first: a reset stopped part-way (a storage fault, a crash) says "
                                   "what it did, `audit` lists it, and running the reset again (or `audit --fix`) "
                                   "finishes it. Exit code 1 when it stopped.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("audit", help="find stuck claims, orphan certificates and missing certificates",
                       description="Lists provisioning in flight (live claims, with their age and the certificate "
                                   "being issued; not a finding), claims whose lease ended (a process died mid-way) "
                                   "and rollbacks that could not finish, with what their attempt issued, active "
                                   "certificates and things in any enabled region that no registry item refers to, "
                                   "provisioned devices whose certificate is gone, and resets that did not finish. "
                                   "Exit code 1 when something is found and not fixed.")
    p.add_argument("--fix", action="store_true",
                   help="settle stuck claims (a certificate for the device's own key is kept and recorded, any "
                        "other revoked), revoke orphan certificates, finish unfinished resets and renewals, reset "
                        "devices whose certificate is gone")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("report", help="write the fleet report: one self-contained HTML page with a world map",
                       description="Counts by status, region and country, a world map of where devices are and "
                                   "which region each country was sent to, provisionings per day and the data "
                                   "sources, in one HTML file that needs no network to open.")
    p.add_argument("--html", required=True, metavar="FILE", help="where to write the page")
    p.add_argument("--audit", action="store_true",
                   help="also list stuck claims and audit findings (asks the issuer about every provisioned "
                        "device, like audit); the certificates expiring within 30 days are listed either way, "
                        "from the registry")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("policy", help="print the stage's IAM policy, generated from its regions and settings",
                       description="Print the Lambda role's IAM policy for the stage's enabled regions, table, "
                                   "parameter and key; --write replaces .chalice/policy-<stage>.json.")
    p.add_argument("--write", action="store_true",
                   help="write .chalice/policy-<stage>.json and the function's lean AWS models instead of printing")
    p.add_argument("--account", default="*", help="AWS account id to put in the ARNs (default: *)")
    p.set_defaults(func=cmd_policy)
    for action in sub._choices_actions:  # every command's --help says what it does, not only its usage
        command = sub.choices[action.dest]
        text = action.help or ""
        command.description = command.description or f"{text[:1].upper()}{text[1:]}."
    return top


def cmd_policy(parts: Container, args: Args) -> int:
    config = parts.settings
    from admin import iam_policy, lean_models
    text = iam_policy.render(config, args.account)
    if not args.write:
        print(text, end="")
        return 0
    path = PROJECT_DIR / ".chalice" / f"policy-{config.stage}.json"
    path.write_text(text)
    print(f"wrote {path.relative_to(PROJECT_DIR)} ({len(config.enabled_regions)} regions)")
    for model in lean_models.write(list(iam_policy.ACTIONS)):  # the function's clients know these calls only
        print(f"wrote {model.relative_to(PROJECT_DIR)}")
    return 0


def problem(exc: BaseException) -> tuple[str, int] | None:
    """One line an operator can act on, with the exit code, for a failure the CLI expects; None for anything else
    (a bug: its traceback is shown)."""
    if isinstance(exc, CommandError):
        return str(exc), exc.code
    if isinstance(exc, (ConfigError, operations.NotRegisteredDevice)):
        return str(exc), 2
    if isinstance(exc, ProvisioningError):  # a backend is unreachable, throttled or refuses our credentials; storage
        return exc.message, 1
    if isinstance(exc, sqlite3.Error):  # the local CA's records (the registry's own errors are named above)
        return f"local certificate records: {exc}", 1
    if isinstance(exc, Exception):
        return aws_problem(exc)  # no region, no credentials, access denied: one line, no traceback
    return None


def main(argv: list[str] | None = None, parts: Container | None = None) -> int:
    """`parts` (tests): the container to work on, instead of one built from --stage and --state-dir."""
    args = parser().parse_args(argv)
    try:
        func: Callable[[Container, Args], int] = args.func
        return func(parts or Container(Settings.for_stage(args.stage, args.state_dir)), args)
    except BrokenPipeError:  # `list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except Exception as exc:
        found = problem(exc)
        if found is None:
            raise
        line, code = found
        print(f"error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
