"""GET /health tells the truth (issue 16): what provisioning needs is checked cheaply, the answer is cached for a
few seconds, and the same facts go to the structured log and a metric.

Each probe returns None when its part is fine, a sentence (or the facts, a "detail" sentence among them) when it
is degraded (provisioning still works, worse), and raises when the part is broken.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from chalicelib.adapters.storage import StorageUnavailable

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
CACHE_SECONDS = 5.0

Probe = Callable[[], "str | Mapping[str, str] | None"]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StorageUnavailable):
        return exc.cause  # without the server's paths: /health is public
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return exc.strerror  # its file name is a server path
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return message.splitlines()[0][:200]


class Health:
    def __init__(self, probes: Mapping[str, Probe], report: Callable[[dict], None] | None = None,
                 ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._probes = dict(probes)
        self._report = report
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None

    def check(self) -> dict:
        """{"status": ok|degraded|failing, "checks": {part: {"status", "detail"?}}}, at most `ttl` seconds old."""
        with self._lock:  # one probe run at a time; the others wait for its answer
            if self._cached is not None and self._clock() - self._cached[0] < self._ttl:
                return self._cached[1]
            checks: dict[str, dict] = {}
            for name, probe in self._probes.items():
                try:
                    detail = probe()
                    checks[name] = ({"status": OK} if detail is None else
                                    {"status": DEGRADED, "detail": detail} if isinstance(detail, str) else
                                    {"status": DEGRADED, **detail})
                except Exception as exc:  # a broken part is what this endpoint is for: say which and why
                    checks[name] = {"status": FAILING, "detail": _reason(exc)}
            states = {check["status"] for check in checks.values()}
            status = FAILING if FAILING in states else DEGRADED if DEGRADED in states else OK
            result = {"status": status, "checks": checks}
            self._cached = (self._clock(), result)
        if self._report is not None:
            self._report(result)
        return result


def provider_outage(outage: Mapping[str, str], fallback: str) -> dict[str, str]:
    """A geolocation provider held off by its back-off (geo.Backoff.outage): degraded, with the facts."""
    return {"detail": f"{outage['provider']} failing since {outage['since']} ({outage['reason']}; "
                      f"{outage['failures']} failed attempt(s), next try {outage['next_try']}); running on {fallback}",
            **outage}


def failing_parts(result: dict) -> str:
    return "; ".join(f"{name}: {check['detail']}" for name, check in result["checks"].items()
                     if check["status"] == FAILING)


def log_and_count(result: dict) -> None:
    """The health facts as one structured log line and a CloudWatch metric per part that is not ok."""
    from chalicelib.adapters import observability
    level = {OK: observability.logger.info, DEGRADED: observability.logger.warning,
             FAILING: observability.logger.error}[result["status"]]
    try:
        level("health", extra={"health": result["status"], "checks": result["checks"]})
        not_ok = [("HealthCheckNotOk", "Count", 1.0, {"part": name, "status": check["status"]})
                  for name, check in result["checks"].items() if check["status"] != OK]
        for metric in not_ok:  # one EMF line each: their dimensions differ
            observability.emit_metrics([metric])
    except OSError:  # stdout on a full disk: the health answer matters more than its log line
        pass


# ---- the local stage's own parts: room on its state directory, and the local stack (supervisor, brokers, CRLs)

FREE_SPACE_FLOOR = 16 * 2**20
"""/health fails below this much free space on the state directory's file system (or below 1/20 of a smaller
file system): SQLite's WAL reuses its space, so a one-row probe can commit where a provisioning's writes (device
row, certificate record, their WAL pages, the brokers' CRLs, the logs) no longer fit."""


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def free_space_probe(directory: Path, floor: int = FREE_SPACE_FLOOR) -> Probe:
    """Failing while the file system under `directory` has less free space than the floor."""
    def probe() -> None:
        existing = Path(directory)
        while not existing.exists() and existing != existing.parent:  # not made yet: the file system it goes on
            existing = existing.parent
        stats = os.statvfs(existing)
        limit = min(floor, stats.f_blocks * stats.f_frsize // 20)
        # root writes into the blocks a file system keeps for it: a server running as root fails only without them
        free = (stats.f_bfree if os.geteuid() == 0 else stats.f_bavail) * stats.f_frsize
        if free < limit:
            raise RuntimeError(f"{_megabytes(free)} free on the state directory's file system, below the floor of "
                               f"{_megabytes(limit)}: writes would fail; free space there")
    return probe


def read_stack_status(path: Path) -> dict[str, Any] | None:
    """The local stack's status (devstack.stack.StackStatus), or None when there is none. The stack rewrites it in
    place: a read that raced a write is read again."""
    for _ in range(3):
        try:
            text = path.read_bytes().rstrip(b"\0 \n")
        except FileNotFoundError:
            return None
        if not text:  # made, not written yet
            return None
        try:
            found = json.loads(text)
        except ValueError:
            continue
        return found if isinstance(found, dict) else None
    raise RuntimeError("the local stack's status cannot be read")


def served_by_stack(path: Path) -> bool:
    """This process is the local stack's (its chalice local, or the stack itself): the stack's parts are ours."""
    status = read_stack_status(path)
    return status is not None and not status.get("stopped") and status.get("pid") in (os.getpid(), os.getppid())


def stack_probes(path: Path, clock: Callable[[], float] = time.time) -> dict[str, Probe]:
    """The local stack's parts, from the status its supervisor rewrites every cycle: the supervisor (alive,
    heartbeat fresh), the brokers (running, restartable), revocation (CRLs written, loaded, far from nextUpdate)."""
    def status() -> dict[str, Any]:
        found = read_stack_status(path)
        if found is None or found.get("stopped"):
            raise RuntimeError("the local stack is not running")
        return found

    def supervisor() -> None:
        found = status()
        fault = found.get("faults", {}).get("supervisor")
        if fault:
            raise RuntimeError(fault)
        silent = clock() - found["heartbeat"]
        if silent > found["stale_after"]:
            raise RuntimeError(f"the stack's supervisor has not run for {silent:.0f} s: revocations, broker restarts "
                               "and new CRLs have stopped (make local's console says why)")

    def brokers() -> None:
        fault = status().get("faults", {}).get("brokers")
        if fault:
            raise RuntimeError(fault)

    def revocation() -> None:
        found = status()
        fault = found.get("faults", {}).get("revocation")
        if fault:
            raise RuntimeError(fault)
        now = clock()
        for region, next_update in sorted(found.get("crl_next_update", {}).items()):
            left = next_update - now
            if left < found["crl_margin"]:
                raise RuntimeError(f"the CRL of {region} " + (f"expires in {left:.0f} s" if left > 0 else "has expired")
                                   + " and has not been remade: its broker will refuse every device")
    return {"supervisor": supervisor, "brokers": brokers, "revocation": revocation}
