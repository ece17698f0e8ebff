"""The admission store port: a region's schedule, shared by every container."""
from __future__ import annotations

from typing import Protocol

from chalicelib.domain.admission import Ticket


class AdmissionStore(Protocol):
    def schedule(self, region: str, now: float, interval: float, tolerance: float) -> Ticket:
        """Atomically: admit when the region's schedule is at most `tolerance` s ahead of `now` (and move it
        on by `interval`), else promise the next free slot after every one promised before."""

    def charge(self, region: str, now: float, seconds: float, slow_until: float | None = None) -> None:
        """Move the schedule on by `seconds` unasked (rollbacks, throttles); optionally slow the region."""
