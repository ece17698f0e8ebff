"""Admission control per region: AWS IoT's control-plane quotas are the service's real ceiling in a storm.

Every request that will spend IoT calls in a region first takes a slot on that region's schedule, kept in
the registry's store so that every container (every Lambda instance) shares it. The schedule is a GCRA
("theoretical arrival time", `tat`) that lets one second's worth of issuances through at once, like AWS's
token buckets (and may run a second ahead: `tolerance`), and then one every 1/rate seconds. A request over
the budget is refused with 503 and a `Retry-After` pointing at a slot of its own (`horizon`, the last slot
promised), so the refused come back spread at the rate the region can take instead of all at once.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping

log = logging.getLogger(__name__)

# AWS IoT Core's default control-plane quotas, requests per second per account and region, for the calls
# the issuer makes. Source: "AWS IoT Core endpoints and quotas", AWS General Reference,
# https://docs.aws.amazon.com/general/latest/gr/iot-core.html (API throttling quotas; the Service Quotas
# console shows an account's own values under the codes given). CreateThing, AttachThingPrincipal,
# DetachThingPrincipal and DeleteThing were 15/s in older editions of the page and are 100/s now.
QUOTAS_PAGE = "https://docs.aws.amazon.com/general/latest/gr/iot-core.html"
IOT_QUOTAS: Mapping[str, float] = {
    "CreateThing": 100,               # L-64CBACAC
    "CreateCertificateFromCsr": 15,   # L-01BCDDCA
    "CreateKeysAndCertificate": 10,   # L-40B55430
    "AttachPolicy": 15,               # L-CA7D4E3E
    "AttachThingPrincipal": 100,      # L-F64D1AA6
    # rollback / revocation
    "DetachThingPrincipal": 100,      # L-B5EE4A16
    "DetachPolicy": 15,
    "UpdateCertificate": 10,
    "DeleteCertificate": 10,
    "DeleteThing": 100,               # L-889800F7
}
ISSUE_CSR = ("CreateThing", "CreateCertificateFromCsr", "AttachPolicy", "AttachThingPrincipal")
ISSUE_SERVER_KEY = ("CreateThing", "CreateKeysAndCertificate", "AttachPolicy", "AttachThingPrincipal")
ROLLBACK = ("DetachThingPrincipal", "DetachPolicy", "UpdateCertificate", "DeleteCertificate", "DeleteThing")
# Kept out of the admitted budget: the jitter between admitting a request and its calls reaching AWS (retries of
# the calls it throttles), a failed issuance done again, operators' resets and audits, other applications in the
# same account. (DescribeEndpoint and GetPolicy have quotas of their own and are no longer called per container.)
RESERVE = 0.2
BURST_SECONDS = 1.0    # AWS's buckets hold one second's worth of requests; so does the schedule
RETRY_AFTER_SECONDS = 1.0  # a Retry-After is whole seconds (RFC 9110, section 10.2.3)
# After a throttle seen anyway, the region runs at 3/4 of its budget for 2 s, shared by every container. AWS's
# bucket refills in 1 s, so a throttle says it was empty just then; 2 s at 3/4 gives back half a bucket. Lasting
# contention (another application on the same quota) throttles again and keeps the region slowed. (It was 5 s:
# in the storm each stray throttle then cost 1.25 s of the budget, a tenth of the makespan over a run.)
SLOW_FACTOR = 0.75
SLOW_SECONDS = 2.0


@dataclass(frozen=True)
class Budget:
    """Issuances per second one region admits, by kind, and what a rollback costs the schedule."""

    csr_per_s: float
    server_key_per_s: float
    rollback_per_s: float

    def per_s(self, server_key: bool) -> float:
        return self.server_key_per_s if server_key else self.csr_per_s

    def scaled(self, csr_per_s: float) -> "Budget":
        """The same shape with another CSR rate (an account whose quotas were raised alike)."""
        factor = csr_per_s / self.csr_per_s
        return Budget(csr_per_s, self.server_key_per_s * factor, self.rollback_per_s * factor)


def quota_budget(quotas: Mapping[str, float] = IOT_QUOTAS, reserve: float = RESERVE) -> Budget:
    """An issuance makes one call of each API it needs, so the slowest of them bounds it."""
    share = 1.0 - reserve
    return Budget(min(quotas[c] for c in ISSUE_CSR) * share, min(quotas[c] for c in ISSUE_SERVER_KEY) * share,
                  min(quotas[c] for c in ROLLBACK) * share)


DEFAULT_BUDGET = quota_budget()
# Lambda's reserved concurrency, the second safety net: an admitted request holds its container for at most
# about a second (two rounds of IoT calls, a throttled call's own retries), and half as much again is left
# for the refused (a few ms each) and for lost answers asked again.
ADMITTED_REQUEST_SECONDS = 1.0
REFUSED_HEADROOM = 1.5


def reserved_concurrency(regions: int, budget: Budget = DEFAULT_BUDGET) -> int:
    """Concurrent invocations the whole function needs when every region issues at its budget."""
    return math.ceil(regions * budget.csr_per_s * ADMITTED_REQUEST_SECONDS * REFUSED_HEADROOM)


def budgets_from(rates: Mapping[str, float], default: Budget | None) -> Callable[[str], Budget | None]:
    """Per-region CSR rates ('*' for the others) over `default`; None means no admission control there."""
    base = default or DEFAULT_BUDGET

    def budget(region: str) -> Budget | None:
        rate = rates.get(region, rates.get("*"))
        return base.scaled(float(rate)) if rate is not None else default
    return budget


def tolerance(rate: float) -> float:
    """How far ahead of the schedule a request may be admitted (the GCRA's tolerance), at `rate` per second.

    One second's worth passes at once. A refused device is told whole seconds, so it comes back up to a second after
    its slot: the schedule may then run up to a second ahead, or that lateness is budget lost for good (most at
    small rates, where the refused come back 2 or 3 to a second). Only while what passes at once, 1 + rate, still
    fits AWS's bucket (the quota's second: the budget with its reserve); below about 4/s it may not, and the
    schedule keeps one second's worth.
    """
    interval = 1.0 / rate
    at_once = 1 + math.floor(rate * RETRY_AFTER_SECONDS + 1e-9)
    bucket = math.floor(rate * BURST_SECONDS / (1.0 - RESERVE) + 1e-9)
    ahead = RETRY_AFTER_SECONDS if at_once <= bucket else 0.0
    # (a microsecond of slack: float sums of intervals must not refuse the burst's last request)
    return max(BURST_SECONDS - interval, ahead) + 1e-6


@dataclass(frozen=True)
class Ticket:
    admitted: bool
    wait: float         # refused: seconds until the slot promised to this request
    slow_until: float   # the region runs slowed until then (epoch seconds), shared through the store





