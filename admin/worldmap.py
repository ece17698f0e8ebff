"""The report's world map: the Equal Earth projection and the country outlines shipped with the project.

Equal Earth (Šavrič, Patterson and Jenny, 2018) is equal-area, so a country's shaded area is true to its size,
and it looks like the Robinson maps people know. The outlines are Natural Earth's public-domain countries,
simplified to about 1:110m detail and committed as admin/data/world-countries.json (rebuilt by
devstack/build_worldmap.py); nothing is fetched at run time.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

OUTLINES = Path(__file__).resolve().parent / "data" / "world-countries.json"

# Equal Earth's polynomial coefficients, from the paper (and every implementation since).
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
_M = math.sqrt(3) / 2


def equal_earth(longitude: float, latitude: float) -> tuple[float, float]:
    """(x, y) on a sphere of radius 1: x grows eastwards, y northwards, (0, 0) at lon 0, lat 0."""
    theta = math.asin(_M * math.sin(math.radians(latitude)))
    t2 = theta * theta
    t6 = t2 * t2 * t2
    x = math.radians(longitude) * math.cos(theta) / (_M * (_A1 + 3 * _A2 * t2 + t6 * (7 * _A3 + 9 * _A4 * t2)))
    y = theta * (_A1 + _A2 * t2 + t6 * (_A3 + _A4 * t2))
    return x, y


_X_MAX = equal_earth(180, 0)[0]
_Y_MAX = equal_earth(0, 90)[1]


@dataclass(frozen=True)
class Frame:
    """Where the projected sphere sits in the SVG: `width` px wide, north up, a `margin` px all round."""

    width: float = 1000.0
    margin: float = 4.0

    @property
    def scale(self) -> float:
        return (self.width - 2 * self.margin) / (2 * _X_MAX)

    @property
    def height(self) -> float:
        return 2 * _Y_MAX * self.scale + 2 * self.margin

    def point(self, longitude: float, latitude: float) -> tuple[float, float]:
        x, y = equal_earth(longitude, latitude)
        return self.width / 2 + x * self.scale, self.height / 2 - y * self.scale


@dataclass(frozen=True)
class Country:
    code: str  # ISO 3166-1 alpha-2; "" for the few areas without one (e.g. Bir Tawil)
    name: str
    rings: tuple[tuple[tuple[float, float], ...], ...]  # (lon, lat) degrees, each ring closed implicitly


@dataclass(frozen=True)
class World:
    source: str
    countries: tuple[Country, ...]


@functools.lru_cache(maxsize=1)
def world() -> World:
    data = json.loads(OUTLINES.read_text(encoding="utf-8"))
    countries = tuple(
        Country(c["code"], c["name"],
                tuple(tuple((flat[i] / 100, flat[i + 1] / 100) for i in range(0, len(flat), 2)) for flat in c["rings"]))
        for c in data["countries"])
    return World(data["source"], countries)


def ring_area_centroid(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Unsigned area and centroid of a closed polygon (shoelace)."""
    twice, cx, cy = 0.0, 0.0, 0.0
    for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]):
        cross = x1 * y2 - x2 * y1
        twice += cross
        cx += (x1 + x2) * cross
        cy += (y1 + y2) * cross
    if twice == 0:
        n = len(points)
        return 0.0, sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    return abs(twice) / 2, cx / (3 * twice), cy / (3 * twice)


@dataclass(frozen=True)
class Shape:
    """A country drawn in a frame: its SVG path, projected area (px²) and anchor (lon, lat) for lines and dots."""

    code: str
    name: str
    path: str
    area: float
    anchor: tuple[float, float]


@functools.lru_cache(maxsize=4)
def shapes(frame: Frame) -> tuple[Shape, ...]:
    """Every country in `frame`, pieces with one code merged. The anchor is the centroid of the largest piece,
    so a line from France starts in France, not between Paris and French Guiana."""
    pieces: dict[str, list[tuple[str, tuple[tuple[float, float], ...]]]] = {}
    for country in world().countries:
        for ring in country.rings:
            pieces.setdefault(country.code or country.name, []).append((country.name, ring))
    result = []
    for key, rings in pieces.items():
        projected = [[frame.point(lon, lat) for lon, lat in ring] for _, ring in rings]
        measured = [ring_area_centroid(list(ring)) for _, ring in rings]
        largest = max(range(len(rings)), key=lambda i: measured[i][0])
        path = "".join("M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in points) + "Z" for points in projected)
        code = key if len(key) == 2 and key.isupper() else ""
        result.append(Shape(code, rings[largest][0], path, sum(ring_area_centroid(p)[0] for p in projected),
                            measured[largest][1:]))
    return tuple(result)


def sphere_outline(frame: Frame, steps: int = 90) -> str:
    """The edge of the projected globe (the ocean), as an SVG path."""
    east = [frame.point(180, -90 + 180 * i / steps) for i in range(steps + 1)]
    west = [frame.point(-180, 90 - 180 * i / steps) for i in range(steps + 1)]
    return "M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in east + west) + "Z"


def graticule(frame: Frame, step: int = 30) -> str:
    """Meridians and parallels every `step` degrees, as one SVG path."""
    lines = []
    for lon in range(-180 + step, 180, step):
        lines.append([frame.point(lon, lat) for lat in range(-90, 91, 5)])
    for lat in range(-90 + step, 90, step):
        lines.append([frame.point(lon, lat) for lon in range(-180, 181, 5)])
    return "".join("M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in line) for line in lines)
