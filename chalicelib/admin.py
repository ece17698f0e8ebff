"""Operator CLI: python -m chalicelib.admin [--stage local] COMMAND ...

Commands: keygen, init, register, list, show, reset, audit, regions, where. Reads the same settings as the service (the stage's environment in .chalice/config.json, overridden by
the process environment), so the CLI and the server always look at the same registry and keys.
"""
import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib import wiring
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, FLEET_PUBLIC_KEY_NAME, PROJECT_DIR, Settings
from chalicelib.errors import ConfigError
from chalicelib.issuers.base import CertificateRef
from chalicelib.issuers.local_ca import write_private
from chalicelib.provisioning import THING_NAME
from chalicelib.signatures import load_device_key
from chalicelib.regions import CATALOGUE, CONTINENTS, RegionBlocked
from chalicelib.registry.base import STATUSES



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
    print(f"registry ready: {config.registry_path}")
    return 0


def cmd_register(config: Settings, args) -> int:
    if args.prefix is not None:
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
    public_keys = None
    if args.public_key:
        if len(names) != 1:
            raise CommandError("--public-key goes with exactly one NAME")
        try:
            pem = Path(args.public_key).read_text()
            load_device_key(pem)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{args.public_key}: not a usable device public key: {exc}") from None
        public_keys = {names[0]: pem}
    registry = wiring.registry(config)
    registry.create()
    added = registry.register(names, public_keys)
    print(f"registered {added} new device(s); {len(names) - added} already present")
    return 0


def cmd_list(config: Settings, args) -> int:
    items = list(wiring.registry(config).list(args.status))
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    columns = ("thing_name", "prov_status", "aws_region", "prov_datetime")
    rows = [columns] + [tuple(item.get(c, "-") for c in columns) for item in items]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    print(f"({len(items)} device(s))")
    return 0


def cmd_show(config: Settings, args) -> int:
    item = wiring.registry(config).get(args.name)
    if item is None:
        raise CommandError(f"{args.name} is not registered")
    if item.get("certificate_id") and item.get("aws_region"):
        item["certificate"] = wiring.issuer(config).certificate(item["certificate_id"], item["aws_region"])
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
    referenced = {(item.get("aws_region"), item.get("certificate_id")) for item in items
                  if item["prov_status"] == "provisioned"}
    orphans = [cert for region in config.enabled_regions for cert in issuer.active_certificates(region)
               if (region, cert["certificate_id"]) not in referenced and cert.get("thing_name") not in live_claims]
    placed = {(item.get("aws_region"), item["thing_name"]) for item in items if item["prov_status"] == "provisioned"}
    things = [{"thing_name": name, "region": region} for region in config.enabled_regions
              for name in issuer.things(region) if (region, name) not in placed and name not in live_claims]
    missing = []
    for item in items:
        if item["prov_status"] == "provisioned":
            cert = issuer.certificate(item.get("certificate_id", ""), item.get("aws_region"))
            if cert is None or cert["status"] != "ACTIVE":
                missing.append({"thing_name": item["thing_name"], "certificate_id": item.get("certificate_id"),
                                "region": item.get("aws_region"), "status": cert["status"] if cert else "gone"})
    return {"stuck_claims": stuck, "orphan_certificates": orphans, "orphan_things": things,
            "missing_certificates": missing}


def cmd_audit(config: Settings, args) -> int:
    registry, issuer = wiring.registry(config), wiring.issuer(config)
    now = datetime.now(timezone.utc)
    found = audit(config, registry, issuer, now)
    fixed = []
    if args.fix:
        for item in found["stuck_claims"]:
            if registry.release_stuck(item["thing_name"], now):
                fixed.append(f"released the expired claim on {item['thing_name']}")
        for cert in found["orphan_certificates"]:
            issuer.revoke(CertificateRef(cert["region"], cert["certificate_id"], cert.get("thing_name")))
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
    if args.json:
        print(json.dumps({**found, "fixed": fixed}, indent=2, default=str))
    else:
        for item in found["stuck_claims"]:
            print(f"stuck claim: {item['thing_name']} (lease ended "
                  f"{datetime.fromtimestamp(item['lease_expires'], timezone.utc):%Y-%m-%dT%H:%M:%SZ})")
        for cert in found["orphan_certificates"]:
            print(f"orphan certificate: {cert['certificate_id']} in {cert['region']} (thing {cert.get('thing_name')})")
        for thing in found["orphan_things"]:
            print(f"orphan thing: {thing['thing_name']} in {thing['region']} (no registry item places it there)")
        for item in found["missing_certificates"]:
            print(f"missing certificate: {item['thing_name']} refers to {item['certificate_id']} "
                  f"in {item['region']}, which is {item['status']}")
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
    p.add_argument("--public-key", metavar="FILE",
                   help="the device's own signing public key (PEM, RSA 2048+ or EC P-256): then only that key, "
                        "not the fleet key, is accepted for it")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("list", help="list registered devices")
    p.add_argument("--status", choices=STATUSES, help="only devices in this state")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one device's registry item as JSON")
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


if __name__ == "__main__":
    sys.exit(main())
