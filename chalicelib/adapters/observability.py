"""One structured log line and one metrics line per provisioning request.

Logs are JSON lines on stdout (CloudWatch Logs in prod, the terminal locally); metrics are one CloudWatch
embedded metric format (EMF) line in the same stream, so they need no API call and no extra permission.
Written with the standard library: aws-lambda-powertools cost about 50 ms of every cold start to import
and 120 us per request for the same two lines.
What is logged is chosen field by field: never a key, a signature, a CSR or a certificate.
"""
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any

from chalicelib.domain.records import PROVISIONED
from chalicelib.domain.steps import Steps

SERVICE = "iot-global-provisioning"
NAMESPACE = "IotGlobalProvisioning"
SUCCESS = PROVISIONED.value  # the outcome code of a request that provisioned its device (log lines, metrics)
# The attributes every LogRecord has: whatever else a record carries came in `extra=` and is logged as a field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": record.levelname, "location": f"{record.funcName}:{record.lineno}",
            "message": record.getMessage(),
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "service": SERVICE}
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            entry["exception_name"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (a test harness or chalice local may have replaced it)."""

    @property
    def stream(self) -> IO[str]:
        return sys.stdout

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


def _make_logger() -> logging.Logger:
    # The name is the Chalice app's, so app.log writes through this handler too.
    log = logging.getLogger(SERVICE)
    handler = _Stdout()
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel((os.environ.get("POWERTOOLS_LOG_LEVEL") or os.environ.get("LOG_LEVEL") or "INFO").upper())
    return log


logger = _make_logger()  # level from POWERTOOLS_LOG_LEVEL (default INFO), as it was with Powertools




def request_done(*, request_id: str | None, thing_name: str | None, status: int, code: str, steps: Steps,
                 region: str | None = None, reason: str | None = None, country: str | None = None,
                 detail: dict[str, Any] | None = None) -> None:
    """The request's log line, then its metrics: provisioned per region, refusals per code, latency."""
    total = steps.total_ms()
    fields = {"request_id": request_id, "thing_name": thing_name, "status": status, "outcome": code,
              "region": region, "reason": reason, "country": country, "steps_ms": steps.ms, "duration_ms": total}
    logger.info("provisioning request", extra={k: v for k, v in fields.items() if v is not None})
    if detail and logger.isEnabledFor(logging.DEBUG):
        logger.debug("provisioning detail", extra={"request_id": request_id, **detail})
    if code == SUCCESS:
        count = ("Provisioned", "region", region or "unknown")
    else:
        count = ("Refused", "code", code)
    emit_metrics([(count[0], "Count", 1.0, {count[1]: count[2]}),
                  ("ProvisioningLatency", "Milliseconds", total, {"outcome": code})])


def renewal_done(*, request_id: str | None, thing_name: str | None, status: int, code: str, steps: Steps,
                 region: str | None = None, reason: str | None = None, previous_region: str | None = None,
                 detail: dict[str, Any] | None = None) -> None:
    """A renewal's log line, then its metrics: Renewed (in place) or Relocated per region, refusals per code."""
    total = steps.total_ms()
    fields = {"request_id": request_id, "thing_name": thing_name, "status": status, "outcome": code,
              "region": region, "reason": reason, "previous_region": previous_region, "steps_ms": steps.ms,
              "duration_ms": total, **(detail or {})}
    logger.info("renewal request", extra={k: v for k, v in fields.items() if v is not None})
    metrics: list[tuple[str, str, float, dict[str, str]]] = []
    if code in ("renewed", "relocated"):
        metrics.append(("Relocated" if code == "relocated" else "Renewed", "Count", 1.0,
                        {"region": region or "unknown"}))
    elif code != "recovered":
        metrics.append(("RenewalRefused", "Count", 1.0, {"code": code}))
    emit_metrics([*metrics, ("RenewalLatency", "Milliseconds", total, {"outcome": code})])


def emit_metrics(metrics: list[tuple[str, str, float, dict[str, str]]]) -> None:
    """One EMF line: each metric (name, unit, value, its dimensions) with the service dimension added."""
    record: dict[str, Any] = {"service": SERVICE}
    directives = []
    for name, unit, value, dimensions in metrics:
        record.update(dimensions)
        record[name] = [float(value)]
        directives.append({"Namespace": NAMESPACE, "Dimensions": [["service", *dimensions]],
                           "Metrics": [{"Name": name, "Unit": unit}]})
    record["_aws"] = {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": directives}
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
