"""make chaos: `kill -9` of `make local` at random moments during bursts of provisioning, checked from outside.

The real local stage (`make local`: chalice local, the region CAs, the brokers) runs as its own process group
with its own XDG_STATE_HOME. N devices are registered (a share with keys of their own, the rest on the fleet
key); half of them send a CSR, half do not. Each round fires a burst of concurrent signed requests (v2, over
HTTP, built with the device client's own code) for every device without a certificate yet, and kills the whole
process group with SIGKILL while the burst is in flight (a seeded RNG picks the moment). Then the stage is
started again, the claim lease (the request budget plus its margin, see chalicelib/domain/deadline.py) is waited out,
and every device retries with its own key: the same CSR as before, or again without one; a device that already
holds a certificate for its CSR asks again too (a lost answer must get the same certificate back). A device
without a CSR whose answer died after its record was finalized lost its server-made key with it (the service
keeps none): asking again within the re-key window (GIP_REKEY_WINDOW_SECONDS) it gets a new certificate and key
(`reason: rekeyed`) and the old certificate is revoked; no operator is involved. The run counts those re-keys.

Targets (exit 0 only when all hold): every device provisioned and holding the certificate its registry row
names, ACTIVE in the CA; zero ACTIVE certificates that no registry row refers to (read from the local CA's
records directly); zero devices holding two ACTIVE certificates; `python -m admin audit` clean
without --fix (exit 0); and during the lease, before any retry, every ACTIVE certificate that no provisioned
row names is listed by `admin audit` (in flight, stuck, or an orphan), none hidden. A last phase damages the registry file and checks that /health answers 503 naming
the registry and that the admin CLI says so in one line, without a traceback.

Run from the project directory: python -m bench.chaos [--size tiny|default] [--seed N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR / "device"))
import global_device as device  # noqa: E402 (the device's own signing and CSR code, standalone by design)

from chalicelib.domain.deadline import ROLLBACK_RESERVE_SECONDS  # noqa: E402
from chalicelib.services.saga import COMMIT_SECONDS, ISSUE_SECONDS  # noqa: E402
from devstack.stack import free_port, free_port_run  # noqa: E402

# What a request must have left when it claims (chalicelib/services/provisioning.py): the local budget must exceed it.
CLAIM_NEEDS = ISSUE_SECONDS + COMMIT_SECONDS + ROLLBACK_RESERVE_SECONDS

SIZES: dict[str, dict[str, Any]] = {
    # devices, kill rounds, concurrent requests, share of devices with their own key, fixed lease (None: derived),
    # the longest wait between the kill's trigger (a random number of answers) and the kill
    "default": dict(devices=120, rounds=6, concurrency=16, own_keys=0.25, lease=None, jitter=0.3),
    "tiny": dict(devices=12, rounds=2, concurrency=6, own_keys=0.25, lease=4, jitter=0.0),
}
# Where the bundled geolocation database puts them: three regions get devices.
ADDRESSES = ("81.2.69.142", "126.0.0.1", "1.1.1.1")
MAX_RETRIES = 8
HTTP_TIMEOUT = (3, 30)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Device:
    name: str
    signing_key: Any               # the fleet key, or the device's own
    own_key: bool
    csr_pem: str | None            # made once: a retry sends the same CSR
    address: str
    certificate_id: str | None = None  # what the device holds: the last certificate it was answered
    answers: list[str] = field(default_factory=list)  # one word per request: 200, 409-in-progress, lost, ...

    def body(self) -> str:
        return json.dumps(device.build_v2_request(self.name, self.signing_key, self.csr_pem))


class Stage:
    """`make local` as its own process group: started, waited for, killed with SIGKILL, stopped."""

    def __init__(self, env: dict[str, str], log: Path):
        self._env, self._log = env, log
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 180) -> float:
        began = time.monotonic()
        port = free_port()
        env = {**self._env, "GIP_MQTT_BASE_PORT": str(free_port_run(11))}
        with open(self._log, "ab") as log:
            # -o install-local: `make chaos` did it; PY: the interpreter running this script (a worktree may lack .venv).
            self.process = subprocess.Popen(
                ["make", "--no-print-directory", "-s", "-o", "install-local", "local", f"PY={sys.executable}",
                 f"API_PORT={port}"], cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        while time.monotonic() - began < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"make local exited with {self.process.returncode}; see {self._log}")
            try:
                requests.get(f"{self.url}/health", timeout=2)
                return time.monotonic() - began
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError(f"make local did not answer within {timeout:.0f} s; see {self._log}")

    def kill9(self) -> None:
        """SIGKILL to every process of the group (make, devstack, chalice local, the brokers) at once."""
        assert self.process is not None
        pgid = self.process.pid
        os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        for _ in range(200):  # the group is gone once every member is reaped
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"process group {pgid} still has members after SIGKILL")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)  # Ctrl-C: make local stops its children itself
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()


def post(session: requests.Session, url: str, dev: Device) -> tuple[str, dict, float | None]:
    """One provisioning request: ("200" | "<status>-<code>" | "lost" | "down", answer, Retry-After)."""
    try:
        response = session.post(f"{url}/device-provisioning", data=dev.body(), timeout=HTTP_TIMEOUT,
                                headers={"Content-Type": "application/json", "X-Forwarded-For": dev.address})
    except requests.ConnectionError as exc:  # refused: the stage is down; else sent and never answered
        return ("down" if "Connection refused" in str(exc) else "lost"), {}, None
    except requests.RequestException:
        return "lost", {}, None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    retry_after = response.headers.get("Retry-After")
    outcome = "200" if response.status_code == 200 else f"{response.status_code}-{answer.get('code', '?')}"
    return outcome, answer, float(retry_after) if retry_after else None


def held(dev: Device, outcome: str, answer: dict) -> str | None:
    """Take the answer as the device does; returns the certificate it replaced, if another one."""
    dev.answers.append(outcome)
    if outcome != "200":
        return None
    before, dev.certificate_id = dev.certificate_id, answer["certificateId"]
    return before if before not in (None, dev.certificate_id) else None


def burst(stage: Stage, devices: list[Device], concurrency: int, rng: random.Random,
          jitter_s: float) -> dict[str, Any]:
    """Every device's request at once, `concurrency` in flight; SIGKILL to the stage while they are."""
    answered = Counter[str]()
    lock, reached = threading.Lock(), threading.Event()
    target = rng.randint(0, max(0, len(devices) - concurrency))  # answers before the kill: many still in flight
    jitter = rng.uniform(0.0, jitter_s)
    replaced: list[str] = []
    waits: list[float | None] = []  # the Retry-After of each 409 provisioning-in-progress
    local = threading.local()

    def one(dev: Device) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        outcome, answer, retry_after = post(session, stage.url, dev)
        with lock:
            if outcome == "409-provisioning-in-progress":
                waits.append(retry_after)
            before = held(dev, outcome, answer)
            if before:
                replaced.append(before)
            answered[outcome] += 1
            if sum(answered.values()) >= target:
                reached.set()

    if target == 0:
        reached.set()
    began = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, dev) for dev in devices]
        reached.wait(timeout=120)
        time.sleep(jitter)
        killed_at = time.monotonic() - began
        in_flight = sum(1 for f in futures if f.running())
        stage.kill9()
        for f in futures:
            f.result()
    return {"requests": len(devices), "kill_after_answers": target, "killed_at_s": round(killed_at, 3),
            "in_flight_at_kill": in_flight, "outcomes": dict(sorted(answered.items())), "replaced": replaced,
            "in_progress_retry_after": waits}


def retry_all(stage: Stage, devices: list[Device], concurrency: int) -> dict[str, Any]:
    """Each device asks until it holds a certificate (or is refused for good), honouring Retry-After."""
    outcomes, replaced, gave_up, rekeyed = Counter[str](), [], [], []
    lock, local = threading.Lock(), threading.local()

    def one(dev: Device) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        for _ in range(MAX_RETRIES):
            outcome, answer, retry_after = post(session, stage.url, dev)
            with lock:
                outcomes[outcome] += 1
                before = held(dev, outcome, answer)
                if before:
                    replaced.append(before)
            if outcome == "200":
                if answer.get("reason") == "rekeyed":
                    with lock:
                        rekeyed.append(dev.name)
                return
            if outcome.startswith(("409-provisioning-in-progress", "503", "lost", "down")):
                time.sleep(min(retry_after or 1.0, 60))
                continue
            break  # refused: the device cannot get further by asking again
        with lock:
            gave_up.append(f"{dev.name}: {dev.answers[-1]}")

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, devices))
    return {"requests": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())), "replaced": replaced,
            "gave_up": sorted(gave_up), "rekeyed": rekeyed}


def inventory(state_dir: Path) -> tuple[dict[str, tuple[str, str | None]], list[tuple[str, str, str]]]:
    """The registry's rows (name -> status, certificate id) and the CA's ACTIVE certificates, read directly."""
    with closing(sqlite3.connect(state_dir / "registry.sqlite3")) as db:
        rows = {name: (status, cert) for name, status, cert in
                db.execute("SELECT thing_name, prov_status, certificate_id FROM devices")}
    with closing(sqlite3.connect(state_dir / "ca" / "certificates.sqlite3")) as db:
        active = db.execute("SELECT certificate_id, thing_name, region FROM certificates "
                            "WHERE status = 'ACTIVE'").fetchall()
    return rows, active


def admin(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "admin", *argv], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, timeout=300)


def enrol(env: dict[str, str], state_dir: Path, devices: int, own_share: float,
          rng: random.Random) -> list[Device]:
    if admin(env, "keygen").returncode != 0:
        raise RuntimeError("admin keygen failed")
    fleet = serialization.load_pem_private_key(
        (state_dir / "keys" / "global-provisioning.priv.key.pem").read_bytes(), password=None)
    fleet_names, rows, made = [], ["thing_name,public_key"], []
    keys_dir = state_dir.parent / "device-keys"
    keys_dir.mkdir(exist_ok=True)
    for i in range(devices):
        name = f"chaos-{i:04d}"
        own = rng.random() < own_share
        key = ec.generate_private_key(ec.SECP256R1()) if own else fleet
        csr = device.make_csr(name, ec.generate_private_key(ec.SECP256R1())) if i % 2 == 0 else None
        made.append(Device(name, key, own, csr, ADDRESSES[i % len(ADDRESSES)]))
        if own:
            pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            (keys_dir / f"{name}.pem").write_bytes(pem)
            rows.append(f"{name},{name}.pem")
        else:
            fleet_names.append(name)
    (keys_dir / "enrol.csv").write_text("\n".join(rows) + "\n")
    for argv in (["register", "--csv", str(keys_dir / "enrol.csv")] if len(rows) > 1 else None,
                 ["register", *fleet_names] if fleet_names else None):
        if argv and admin(env, *argv).returncode != 0:
            raise RuntimeError(f"admin {' '.join(argv[:2])} failed")
    return made


def damaged_registry(stage: Stage, env: dict[str, str], state_dir: Path) -> dict[str, Any]:
    """The registry overwritten with garbage: /health says 503 naming it, the CLI one line, no traceback."""
    registry = state_dir / "registry.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    registry.write_bytes(b"this is not a database " * 256)
    stage.start()
    try:
        response = requests.get(f"{stage.url}/health", timeout=30)
        body = response.json()
    finally:
        stage.stop()
    cli = admin(env, "list")
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    return {"health_status": response.status_code, "health_code": body.get("code"),
            "health_names_registry": body.get("checks", {}).get("registry", {}).get("status") == "failing",
            "cli_exit": cli.returncode, "cli_lines": len(lines), "cli_traceback": "Traceback" in cli.stderr,
            "cli_message": lines[0] if lines else "",
            "ok": response.status_code == 503 and body.get("code") == "unhealthy" and cli.returncode != 0
            and len(lines) == 1 and "Traceback" not in cli.stderr}


def run(size: str, seed: int, devices_n: int | None, rounds_n: int | None, concurrency: int | None, budget: int,
        margin: int,
        storage: bool, keep: bool) -> dict[str, Any]:
    params = dict(SIZES[size])
    params.update({k: v for k, v in (("devices", devices_n), ("rounds", rounds_n), ("concurrency", concurrency))
                   if v is not None})
    rng = random.Random(seed)
    began = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="gip-chaos-"))
    state_dir = home / "iot-global-provisioning" / "local"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIP_")}
    env.update(XDG_STATE_HOME=str(home), PYTHONUNBUFFERED="1", GIP_REQUEST_BUDGET_SECONDS=str(budget),
               GIP_CLAIM_LEASE_MARGIN_SECONDS=str(margin))
    if params["lease"]:
        env["GIP_CLAIM_LEASE_SECONDS"] = str(params["lease"])
    lease = params["lease"] or budget + margin
    say(f"[chaos] seed {seed}: {params['devices']} devices, {params['rounds']} rounds of kill -9, lease {lease} s; "
        f"state in {home}")
    devices = enrol(env, state_dir, params["devices"], params["own_keys"], rng)
    stage = Stage(env, home / "make-local.log")
    rounds, starts, last_kill = [], [], time.monotonic()
    try:
        for number in range(1, params["rounds"] + 1):
            starts.append(round(stage.start(), 2))
            if number % 2 == 1 and number > 1:
                # This burst takes over the claims the last kill left: settling them is killed too.
                time.sleep(max(0.0, last_kill + lease + 1 - time.monotonic()))
            waiting = [d for d in devices if d.certificate_id is None]
            result = burst(stage, waiting, params["concurrency"], rng, params["jitter"])
            last_kill = time.monotonic()
            rounds.append(result)
            say(f"[chaos] round {number}: {len(waiting)} requests, kill -9 at {result['killed_at_s']} s with "
                f"{result['in_flight_at_kill']} in flight; {result['outcomes']}")
        starts.append(round(stage.start(), 2))
        # During the lease, nothing asking: what the kills left is in flight (reported, not a finding) or stuck,
        # and every ACTIVE certificate no provisioned row names is among what the audit lists.
        rows, active = inventory(state_dir)
        during = admin(env, "audit", "--json")
        during_lease = lease_audit(during, rows, active)
        wait = last_kill + lease + 1 - time.monotonic()
        say(f"[chaos] waiting {max(wait, 0):.0f} s for the claim lease to pass, then every device retries")
        time.sleep(max(wait, 0))
        # Devices still without a certificate, and every CSR device (a lost answer must get the same one back).
        # A server-made key lost with its answer is re-keyed on the device's own retry (docs/exactly-once.md).
        retried = [d for d in devices if d.certificate_id is None or d.csr_pem is not None]
        retry = retry_all(stage, retried, params["concurrency"])
        say(f"[chaos] retries: {retry['outcomes']}")
        rows, active = inventory(state_dir)
        audit = admin(env, "audit")
    finally:
        stage.stop()
    referenced = {cert for status, cert in rows.values() if status == "provisioned"}
    orphans = [cert for cert, _, _ in active if cert not in referenced]
    per_thing = Counter(thing for _, thing, _ in active)
    doubles = sorted(thing for thing, count in per_thing.items() if count > 1)
    active_ids = {cert for cert, _, _ in active}
    unprovisioned = [d.name for d in devices if rows.get(d.name, ("?", None))[0] != "provisioned"]
    # A device holds what its registry row names, and that certificate is ACTIVE; anything else is stuck.
    stuck = [d.name for d in devices if d.certificate_id is None or d.certificate_id not in active_ids
             or rows.get(d.name, ("", None))[1] != d.certificate_id]
    replaced = [c for r in rounds for c in r["replaced"]] + retry["replaced"]
    answers = {d.name: d.answers for d in devices if d.name in stuck or d.name in unprovisioned}
    # 409 provisioning-in-progress says when the lease ends: present, positive, at most the lease
    waits = [w for r in rounds for w in r.pop("in_progress_retry_after")]
    bad_waits = [w for w in waits if w is None or not 0 < w <= lease]
    report: dict[str, Any] = {
        "seed": seed, "size": size, "parameters": {**params, "budget_s": budget, "lease_margin_s": margin,
                                                   "lease_s": lease},
        "devices": len(devices), "with_csr": sum(1 for d in devices if d.csr_pem),
        "own_keys": sum(1 for d in devices if d.own_key), "kills": len(rounds),
        "burst_requests": sum(r["requests"] for r in rounds),
        "in_flight_at_kills": sum(r["in_flight_at_kill"] for r in rounds),
        "answered_before_kills": sum(r["outcomes"].get("200", 0) for r in rounds),
        "rounds": rounds, "starts_s": starts,
        "audit_during_lease": during_lease,
        "in_progress_answers": len(waits), "in_progress_retry_after_s": [min(waits), max(waits)] if waits else [],
        "in_progress_bad_retry_after": len(bad_waits),
        "retried_devices": len(retried), "retry_requests": retry["requests"], "retry_outcomes": retry["outcomes"],
        "gave_up": retry["gave_up"], "certificates_replaced_on_retry": len(replaced),
        "rekeyed": sorted(retry["rekeyed"]),
        "provisioned": len(devices) - len(unprovisioned), "unprovisioned": unprovisioned, "stuck": stuck,
        "stuck_answers": answers,
        "active_certificates": len(active), "orphans": len(orphans), "orphan_ids": orphans,
        "doubles": len(doubles), "double_things": doubles,
        "audit_exit": audit.returncode, "audit_output": audit.stdout.strip().splitlines()[-3:],
    }
    if storage:
        report["damaged_registry"] = damaged_registry(stage, env, state_dir)
    report["duration_s"] = round(time.monotonic() - began, 1)
    report["ok"] = (not unprovisioned and not stuck and not orphans and not doubles and audit.returncode == 0
                    and during_lease["hidden"] == 0 and not bad_waits
                    and (not storage or report["damaged_registry"]["ok"]))
    if keep:
        say(f"[chaos] state kept in {home}")
    else:
        import shutil
        shutil.rmtree(home, ignore_errors=True)
    return report


def lease_audit(done: subprocess.CompletedProcess, rows: dict[str, tuple[str, str | None]],
                active: list[tuple[str, str, str]]) -> dict[str, Any]:
    """`admin audit --json` during the lease: its counts, and the ACTIVE certificates it does not list."""
    try:
        found = json.loads(done.stdout)
    except ValueError:
        return {"exit": done.returncode, "hidden": -1}
    listed = {cert for key in ("in_flight", "stuck_claims", "unfinished_rollbacks") for attempt in found[key]
              for cert in attempt.get("certificates", [])}
    listed |= {orphan["certificate_id"] for orphan in found["orphan_certificates"]}
    named = {cert for status, cert in rows.values() if status == "provisioned"}
    unnamed = {cert for cert, _, _ in active if cert not in named}
    return {"exit": done.returncode, **{key: len(value) for key, value in found.items() if isinstance(value, list)},
            "active_unnamed": len(unnamed), "hidden": len(unnamed - listed)}


def table(report: dict[str, Any]) -> str:
    damaged, lease = report.get("damaged_registry"), report["audit_during_lease"]
    rows = [
        ("seed", report["seed"]), ("devices (with CSR / own key)",
                                   f"{report['devices']} ({report['with_csr']} / {report['own_keys']})"),
        ("kill -9 of make local", report["kills"]),
        ("burst requests / in flight at the kills", f"{report['burst_requests']} / {report['in_flight_at_kills']}"),
        ("answered 200 before the kills", report["answered_before_kills"]),
        ("audit during the lease: exit, in flight, stuck",
         f"{lease['exit']}, {lease.get('in_flight', '?')}, {lease.get('stuck_claims', '?')}"),
        ("ACTIVE certificates without a provisioned row during the lease / not listed by the audit",
         f"{lease.get('active_unnamed', '?')} / {lease['hidden']}"),
        ("409 in progress during the bursts: Retry-After range (s), missing or past the lease",
         f"{report['in_progress_retry_after_s'] or '-'}, {report['in_progress_bad_retry_after']}"),
        ("devices retried / retry requests", f"{report['retried_devices']} / {report['retry_requests']}"),
        ("certificates replaced on a retry", report["certificates_replaced_on_retry"]),
        ("server-made keys lost with the answer, re-keyed on the device's retry", len(report["rekeyed"])),
        ("provisioned", f"{report['provisioned']} of {report['devices']}"),
        ("stuck (no certificate, or not the registry's)", len(report["stuck"])),
        ("ACTIVE certificates without a registry row", report["orphans"]),
        ("devices holding two ACTIVE certificates", report["doubles"]),
        ("admin audit (no --fix)", "clean (exit 0)" if report["audit_exit"] == 0
         else f"exit {report['audit_exit']}"),
    ]
    if damaged:
        rows.append(("damaged registry: /health, CLI",
                     f"{damaged['health_status']} {damaged['health_code']}, exit {damaged['cli_exit']}, "
                     f"{damaged['cli_lines']} line, traceback {'yes' if damaged['cli_traceback'] else 'no'}"))
    rows.append(("duration", f"{report['duration_s']} s"))
    rows.append(("targets met", "yes" if report["ok"] else "NO"))
    return "\n".join(["| chaos run | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=(__doc__ or "").split("\n\n")[0],
                                     epilog="Targets: every device provisioned, no ACTIVE certificate without a "
                                            "registry row, no device with two, admin audit clean without --fix, "
                                            "the audit hiding nothing during the lease. Exit status 0 when every "
                                            "target holds, 1 when one does not, 2 when the run itself failed (the "
                                            "stage did not start, ...).")
    parser.add_argument("--size", choices=SIZES, default="default",
                        help="default: 120 devices, 6 rounds (a few minutes); tiny: 12 devices, 2 rounds, 4 s lease")
    parser.add_argument("--seed", type=int, default=16,
                        help="seed of the RNG choosing keys, CSRs and kill moments (default 16)")
    parser.add_argument("--devices", type=int, help="number of devices (overrides the size)")
    parser.add_argument("--rounds", type=int, help="number of kill -9 rounds (overrides the size)")
    parser.add_argument("--concurrency", type=int, help="requests in flight at once (overrides the size)")
    parser.add_argument("--budget", type=int, default=20,
                        help=f"the local stage's request budget, GIP_REQUEST_BUDGET_SECONDS (default 20; a claim "
                             f"needs {CLAIM_NEEDS:.0f} s of it left)")
    parser.add_argument("--lease-margin", type=int, default=2,
                        help="GIP_CLAIM_LEASE_MARGIN_SECONDS: the lease is the budget plus this (default 2)")
    parser.add_argument("--no-storage", action="store_true", help="skip the damaged-registry phase")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (for a look afterwards)")
    parser.add_argument("--json", default=str(PROJECT_DIR / "bench" / "chaos.json"),
                        help="where to write the report (default bench/chaos.json)")
    args = parser.parse_args(argv)
    if args.budget <= CLAIM_NEEDS:
        parser.error(f"--budget must be over {CLAIM_NEEDS:.0f} s, or every request is refused before its claim")
    try:
        report = run(args.size, args.seed, args.devices, args.rounds, args.concurrency, args.budget, args.lease_margin,
                     not args.no_storage, args.keep)
    except (RuntimeError, OSError) as exc:
        say(f"error: {exc}")
        return 2
    from bench import provenance
    report["run"] = provenance.provenance("bench.chaos", argv)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    provenance.refresh(Path(args.json))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
