"""One structured log line and a few metrics per provisioning request (aws-lambda-powertools).

Logs are JSON lines on stdout (CloudWatch Logs in prod, the terminal locally); metrics are CloudWatch
embedded metric format lines in the same stream, so they need no API call and no extra permission.
What is logged is chosen field by field: never a key, a signature, a CSR or a certificate.
"""
import logging
import sys
import time
from contextlib import contextmanager
from typing import IO, Any, Iterator

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import MetricUnit, single_metric

from chalicelib.registry.base import PROVISIONED

SERVICE = "iot-global-provisioning"
NAMESPACE = "IotGlobalProvisioning"
SUCCESS = PROVISIONED.value  # the outcome code of a request that provisioned its device (log lines, metrics)

class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (a test harness or chalice local may have replaced it)."""

    @property
    def stream(self) -> IO[str]:
        return sys.stdout

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


logger = Logger(service=SERVICE, logger_handler=_Stdout())  # level from POWERTOOLS_LOG_LEVEL (default INFO)


class Steps:
    """Milliseconds spent in each named step of one request."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round((time.perf_counter() - began) * 1000, 2)

    def total_ms(self) -> float:
        return round((time.perf_counter() - self._start) * 1000, 2)


def request_done(*, request_id: str | None, thing_name: str | None, status: int, code: str, steps: Steps,
                 region: str | None = None, reason: str | None = None, country: str | None = None,
                 detail: dict[str, Any] | None = None) -> None:
    """The request's log line, then its metrics: provisioned per region, refusals per code, latency."""
    total = steps.total_ms()
    fields = {"request_id": request_id, "thing_name": thing_name, "status": status, "outcome": code,
              "region": region, "reason": reason, "country": country, "steps_ms": steps.ms, "duration_ms": total}
    logger.info("provisioning request", extra={k: v for k, v in fields.items() if v is not None})
    if detail:
        logger.debug("provisioning detail", extra={"request_id": request_id, **detail})
    if code == SUCCESS:
        _metric("Provisioned", MetricUnit.Count, 1, region=region or "unknown")
    else:
        _metric("Refused", MetricUnit.Count, 1, code=code)
    _metric("ProvisioningLatency", MetricUnit.Milliseconds, total, outcome=code)


def _metric(name: str, unit: MetricUnit, value: float, **dimensions: str) -> None:
    with single_metric(name=name, unit=unit, value=value, namespace=NAMESPACE,
                       default_dimensions={"service": SERVICE}) as metric:
        for key, dimension in dimensions.items():
            metric.add_dimension(name=key, value=dimension)
