"""Admission control per region, over the shared schedule (domain/admission.py's arithmetic)."""
from __future__ import annotations

import contextvars
import logging
import math
import time
from concurrent.futures import Executor, Future
from typing import Callable

from chalicelib.domain.admission import SLOW_FACTOR, SLOW_SECONDS, Budget, tolerance
from chalicelib.domain.errors import ServiceUnavailable
from chalicelib.ports.admission import AdmissionStore

log = logging.getLogger(__name__)


class Admission:
    """What the orchestrator (and renewal) calls before spending IoT calls in a region."""

    def __init__(self, store: AdmissionStore, budgets: Callable[[str], Budget | None],
                 clock: Callable[[], float] = time.time, executor: Executor | None = None):
        self._store = store
        self._budgets = budgets
        self._clock = clock
        self._executor = executor  # the composition root's pool: `begin` runs admit() there (None: at once)
        self._slow_until: dict[str, float] = {}  # this container's latest view of the shared slow-down

    def budget(self, region: str) -> Budget | None:
        return self._budgets(region)

    def _rate(self, region: str, budget: Budget, server_key: bool, now: float) -> float:
        rate = budget.per_s(server_key)
        return rate * SLOW_FACTOR if now < self._slow_until.get(region, 0.0) else rate

    def admit(self, region: str, server_key: bool = False) -> None:
        """Take a slot in `region` or raise ServiceUnavailable with the Retry-After of a slot of its own."""
        budget = self._budgets(region)
        if budget is None:
            return
        now = self._clock()
        rate = self._rate(region, budget, server_key, now)
        ticket = self._store.schedule(region, now, 1.0 / rate, tolerance(rate))
        self._slow_until[region] = ticket.slow_until
        if not ticket.admitted:
            retry_after = max(1, math.ceil(ticket.wait))
            raise ServiceUnavailable(f"{region} is issuing at its budget ({rate:.3g} devices/s); your turn comes "
                                     f"in {retry_after} s", "admission-control", retry_after=retry_after)

    def begin(self, region: str, server_key: bool = False) -> Future[None]:
        """admit(), started beside the caller's own next step (the claim) in a copy of its context (the request's
        deadline); `.result()` raises what admit() raises. Without an executor it is decided before returning."""
        if self._executor is not None:
            return self._executor.submit(contextvars.copy_context().run, self.admit, region, server_key)
        decided: Future[None] = Future()
        try:
            self.admit(region, server_key)
            decided.set_result(None)
        except Exception as exc:
            decided.set_exception(exc)
        return decided

    def rollback(self, region: str) -> None:
        """A rollback's calls are not asked for (an undo must run); they are paid for from the schedule."""
        budget = self._budgets(region)
        if budget is not None:
            self._quiet(self._store.charge, region, self._clock(), 1.0 / budget.rollback_per_s)

    def throttled(self, region: str) -> None:
        """AWS throttled a call anyway (other callers, a lower quota): slow the whole region for a while."""
        if self._budgets(region) is None:
            return
        now = self._clock()
        log.warning("AWS IoT throttled a call in %s; admitting at %.0f%% for %.0f s", region,
                    SLOW_FACTOR * 100, SLOW_SECONDS)
        self._slow_until[region] = now + SLOW_SECONDS
        self._quiet(self._store.charge, region, now, 0.0, now + SLOW_SECONDS)

    @staticmethod
    def _quiet(call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except Exception as exc:  # bookkeeping must never turn a finished request into a failure
            log.warning("admission bookkeeping failed: %s: %s", type(exc).__name__, exc)
