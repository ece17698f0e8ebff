"""GET /health tells the truth (issue 16): what provisioning needs is checked cheaply, the answer is cached for a
few seconds, and the same facts go to the structured log and a metric.

Each probe returns None when its part is fine, a sentence (or the facts, a "detail" sentence among them) when it
is degraded (provisioning still works, worse), and raises when the part is broken.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

from chalicelib.adapters.storage import StorageUnavailable

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
CACHE_SECONDS = 5.0

Probe = Callable[[], "str | Mapping[str, str] | None"]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StorageUnavailable):
        return exc.cause  # without the server's paths: /health is public
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
