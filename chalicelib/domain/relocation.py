"""Where a renewing device's identity should live now: stay in its region, or move (GIP_RELOCATION).

Pure: the caller passes the device's current region, where it is now and the stage's region policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from chalicelib.domain.errors import ConfigError
from chalicelib.domain.regions import Location, RegionChoice, RegionPolicy

DEFAULT_RELOCATION = "distance:1000"
RENEWAL = "renewal"
RELOCATED = "relocated"


@dataclass(frozen=True)
class RelocationPolicy:
    """`never`, `nearest` (move whenever the nearest region differs) or `distance:<km>` (move when the nearest
    region is at least that many km nearer than the current one). Region rules and disabled regions move a
    device under every policy: where a device may be served is not a matter of taste."""

    mode: str  # "never" | "nearest" | "distance"
    km: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> "RelocationPolicy":
        text = (text or DEFAULT_RELOCATION).strip()
        if text in ("never", "nearest"):
            return cls(text)
        if text.startswith("distance:"):
            try:
                km = float(text.split(":", 1)[1])
            except ValueError:
                km = math.nan
            if math.isfinite(km) and km >= 0:
                return cls("distance", km)
        raise ConfigError(f"GIP_RELOCATION={text!r}: expected never, nearest or distance:<km> (like distance:1000)")

    def __str__(self) -> str:
        return f"distance:{self.km:g}" if self.mode == "distance" else self.mode

    def decide(self, current: str, location: Location | None, regions: RegionPolicy) -> RegionChoice:
        """The region for the renewed certificate; reason `renewal` (stays) or `relocated` (moves).

        Raises RegionBlocked when the device is now in a blocked country, as at provisioning."""
        choice = regions.choose(location)
        country = choice.country

        def stay() -> RegionChoice:
            return regions.place(location, current, RENEWAL)

        def move() -> RegionChoice:
            return RegionChoice(choice.region, choice.distance_km, RELOCATED, country)

        if choice.region == current:
            return stay()
        if current not in regions.enabled or choice.reason in ("country-rule", "continent-rule"):
            return move()  # the current region is no longer allowed for this device: it must move
        if choice.reason != "nearest" or self.mode == "never":
            return stay()  # an unknown location is no reason to move
        if self.mode == "nearest":
            return move()
        here = regions.distance_km(location, current)
        if here is not None and choice.distance_km is not None and here - choice.distance_km >= self.km:
            return move()
        return stay()
