"""The geolocation port."""
from __future__ import annotations

from typing import Protocol

from chalicelib.domain.regions import Location


class GeoLocator(Protocol):
    def locate(self, ip: str) -> Location | None: ...
