"""How long each step of a request took (log line, metrics)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


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
