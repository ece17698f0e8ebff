"""Every request has a deadline, and every step is started only when it fits in the time left.

On Lambda the deadline is the function's (`context.get_remaining_time_in_millis()`), which kills the handler
with no rollback when it passes; locally it is a configured budget below the device's HTTP timeout. A part of
the time is reserved for undoing what was done: forward work may not use it, a rollback may.

The deadline of the request being handled is kept in a context variable, so that the AWS clients' hooks can
see it without every port growing a parameter; threads that work for the request must copy the context
(`contextvars.copy_context().run`).
"""
from __future__ import annotations

import contextvars
import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from chalicelib.domain.errors import ServiceUnavailable

# A request's time when nothing says otherwise: below the device's HTTP read timeout (35 s) and API Gateway's 29 s.
DEFAULT_BUDGET_SECONDS = 20
# Time kept for a rollback (revoke: deactivate, detach, delete; release the claim), each AWS call getting at
# least one attempt, plus writing the answer.
ROLLBACK_RESERVE_SECONDS = 6.0
# What answering takes once the work is done or undone (serialising, logging, API Gateway's own share).
ANSWER_MARGIN_SECONDS = 1.0
# A claim outlives the longest request that can hold it by this much: clocks of two containers differ, and a
# DynamoDB write accepted just before the deadline must not find its claim taken over.
LEASE_MARGIN_SECONDS = 30


class DeadlineExceeded(ServiceUnavailable):
    """The next step does not fit in the time the request has left; what was done is undone first."""

    code = "deadline-exceeded"


class Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic,
                 reserve: float = ROLLBACK_RESERVE_SECONDS):
        self._clock = clock
        self._at = clock() + seconds
        self.reserve = reserve
        self._rolling_back = False

    @classmethod
    def for_request(cls, lambda_context: Any, budget_seconds: float | None,
                    clock: Callable[[], float] = time.monotonic) -> "Deadline":
        """The sooner of the function's own deadline (less the answer margin) and the configured budget."""
        candidates = []
        remaining_ms = getattr(lambda_context, "get_remaining_time_in_millis", None)
        if remaining_ms is not None:
            candidates.append(remaining_ms() / 1000 - ANSWER_MARGIN_SECONDS)
        if budget_seconds is not None:
            candidates.append(budget_seconds)
        return cls(min(candidates) if candidates else float("inf"), clock)

    def remaining(self) -> float:
        """Seconds until the answer must be on its way."""
        return self._at - self._clock()

    def for_work(self) -> float:
        """Seconds forward work may still use: a rollback may use the reserve as well."""
        return self.remaining() - (0.0 if self._rolling_back else self.reserve)

    def require(self, step: str, seconds: float) -> None:
        """Raise DeadlineExceeded unless `seconds` of work fit before the deadline (keeping the reserve)."""
        left = self.for_work()
        if left < seconds:
            raise DeadlineExceeded(
                f"the service is too slow right now: {step} needs up to {seconds:.1f} s and the request has "
                f"{max(left, 0.0):.1f} s left; try again later", retry_after=retry_after(seconds))

    def lease_seconds(self, margin: float = LEASE_MARGIN_SECONDS) -> int:
        """A claim taken now must hold until this request cannot be running any more, and not much longer."""
        return math.ceil(max(self.remaining(), 0.0) + margin)

    @contextmanager
    def rolling_back(self) -> Iterator[None]:
        """Inside, the reserve is usable: undoing what was done comes before answering quickly."""
        before, self._rolling_back = self._rolling_back, True
        try:
            yield
        finally:
            self._rolling_back = before


def retry_after(seconds: float) -> int:
    """A Retry-After for a device refused for lack of time: about the time the step needs, at least 1 s."""
    return max(1, math.ceil(seconds))


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("deadline", default=None)


def current() -> Deadline | None:
    """The deadline of the request this thread (or copied context) works for; None outside a request."""
    return _current.get()


@contextmanager
def running(deadline: Deadline) -> Iterator[Deadline]:
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


@contextmanager
def rollback() -> Iterator[None]:
    """The current request (if any) is undoing what it did: the rollback reserve is usable."""
    deadline = current()
    if deadline is None:
        yield
        return
    with deadline.rolling_back():
        yield


def require(step: str, seconds: float) -> None:
    """Deadline.require for the current request; nothing outside a request (CLI, audit)."""
    deadline = current()
    if deadline is not None:
        deadline.require(step, seconds)
