"""The fleet report: one self-contained HTML file with a world map (admin `report --html FILE`).

Everything is aggregated in one pass over the registry (by status, region, country, reason and day), so the
page's size depends on the number of countries and regions, never on the number of devices. The page has
inline CSS, inline SVG and a few lines of inline script for the hover box: it makes no network request and
reads the same offline years later.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import AbstractSet, Iterable, NamedTuple

from admin import operations, worldmap
from admin.markup import Markup, Node, concat, el, join
from admin.operations import AuditReport
from chalicelib.adapters.geo import bundled_database
from chalicelib.config import Settings
from chalicelib.container import Container
from chalicelib.domain.clock import timestamp, utcnow
from chalicelib.domain.records import PROVISIONED, PROVISIONING, STATUSES, DeviceRecord
from chalicelib.domain.regions import CATALOGUE

EXPIRY_WINDOW = timedelta(days=30)
DAYS_SHOWN = 60  # provisionings per day: the last this many days

# Line colours by the reason the registry records for a device's region.
REASON_COLOURS = {
    "nearest": "#2f6fde",
    "country-rule": "#e08a00",
    "continent-rule": "#8b3fd1",
    "default": "#d6336c",
    "previous": "#6c7a89",
    "renewal": "#0f9fb5",
    "relocated": "#c2410c",
}
UNKNOWN_REASON_COLOUR = "#94a3b8"
SHADES = ("#d7ece6", "#a9d8cb", "#6fbfab", "#38a08a", "#167a68", "#0b5447")


class DeviceFacts(NamedTuple):  # a tuple, not a dataclass: 100,000 of them are made per report
    """What the report reads of a registry record."""

    thing_name: str
    status: str
    region: str | None
    country: str | None
    reason: str | None
    provisioned_on: str | None  # YYYY-MM-DD, UTC
    certificate_expires: datetime | None  # as provisioning and renewal recorded it


def device_facts(record: DeviceRecord) -> DeviceFacts:
    """The one place that knows which of the record's fields the report uses."""
    return DeviceFacts(record.thing_name, str(record.status), record.region, record.country, record.region_reason,
                       record.provisioned_at.date().isoformat() if record.provisioned_at else None,
                       record.certificate_expires)


@dataclass
class Fleet:
    """The registry, aggregated."""

    total: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_region: Counter[str] = field(default_factory=Counter)  # provisioned devices
    by_country: Counter[str] = field(default_factory=Counter)  # provisioned devices with a known country
    flows: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (country, region, reason)
    by_reason: Counter[str] = field(default_factory=Counter)
    per_day: Counter[str] = field(default_factory=Counter)  # YYYY-MM-DD -> provisionings recorded that day
    unknown_country: int = 0  # provisioned, no country recorded
    expiry_checked: int = 0  # provisioned devices whose certificate's expiry the registry records
    expiring: list[tuple[str, str, datetime]] = field(default_factory=list)  # (thing, region, not after), soonest first

    @property
    def provisioned(self) -> int:
        return self.by_status[PROVISIONED]

    @property
    def expiry_unknown(self) -> int:
        """Provisioned devices whose record has no expiry (written before the registry kept it)."""
        return self.provisioned - self.expiry_checked

    def default_share(self) -> float:
        """Share of provisioned devices sent to the default region because their location was unknown."""
        return self.by_reason["default"] / self.provisioned if self.provisioned else 0.0


def aggregate(facts: Iterable[DeviceFacts], now: datetime) -> Fleet:
    """One pass; each certificate's expiry is the one the registry records (no issuer is asked)."""
    fleet = Fleet()
    horizon = now + EXPIRY_WINDOW
    for device in facts:
        fleet.total += 1
        fleet.by_status[device.status] += 1
        if device.status != PROVISIONED:
            continue
        region, reason = device.region or "?", device.reason or "unrecorded"
        fleet.by_region[region] += 1
        fleet.by_reason[reason] += 1
        if device.country:
            fleet.by_country[device.country] += 1
            fleet.flows[(device.country, region, reason)] += 1
        else:
            fleet.unknown_country += 1
        if device.provisioned_on:
            fleet.per_day[device.provisioned_on] += 1
        expires = device.certificate_expires
        if expires:
            fleet.expiry_checked += 1
            if expires <= horizon:
                fleet.expiring.append((device.thing_name, region, expires))
    fleet.expiring.sort(key=lambda e: e[2])
    return fleet


# --- data sources ----------------------------------------------------------------------------------------

def geolocation_sources(config: Settings) -> list[str]:
    """Each geolocation source the stage asks, in order, with its data's date and the credit it requires."""
    sources = []
    if config.ipstack_key_parameter:
        sources.append("ipstack (live lookups, key in SSM parameter "
                       f"{config.ipstack_key_parameter}); IP geolocation by ipstack.com")
    paths: list[Path] = [config.maxmind_db] if config.maxmind_db else []
    paths.append(Path(bundled_database()))
    for path in paths:
        sources.append(_database_source(path))
    return sources


def _database_source(path: Path) -> str:
    try:
        import maxminddb
        with maxminddb.open_database(str(path)) as reader:
            meta = reader.metadata()
        kind, built = meta.database_type, datetime.fromtimestamp(meta.build_epoch, timezone.utc).date()
    except Exception as exc:  # unreadable: say so in the report rather than fail it
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return f"{path.name}: cannot be read ({cause})"
    if "geolite" in kind.lower() or "geoip" in kind.lower():
        credit = "This product includes GeoLite2 data created by MaxMind, available from https://www.maxmind.com."
    elif "dbip" in kind.lower() or "db-ip" in kind.lower():
        credit = "IP Geolocation by DB-IP (https://db-ip.com), CC BY 4.0."
    else:
        credit = "credit: see the database's licence"
    return f"{kind} ({path.name}), built {built.isoformat()}. {credit}"


# --- rendering -------------------------------------------------------------------------------------------

def _n(value: int) -> str:
    return f"{value:,}"


def _pct(part: int | float, whole: int | float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def shade_breaks(maximum: int, classes: int = len(SHADES)) -> list[int]:
    """Lower bounds of the shading classes: 1, then roughly geometric steps up to `maximum`, rounded nicely."""
    if maximum <= classes:
        return list(range(1, max(maximum, 1) + 1))
    breaks = [1]
    for i in range(1, classes):
        raw = maximum ** (i / classes)
        magnitude = 10 ** math.floor(math.log10(raw))
        nice = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda v: abs(v - raw))
        if nice > breaks[-1]:
            breaks.append(int(nice))
    return breaks


def shade_for(count: int, breaks: list[int]) -> str:
    """The top class is always the darkest shade, so a small fleet's countries stand out too."""
    index = max(i for i, lower in enumerate(breaks) if count >= lower)
    return SHADES[len(SHADES) - len(breaks) + index]


def _marker_radius(count: int, largest: int) -> float:
    # Area grows with devices; below 1,000 devices in the busiest region the circles stay small, so a
    # two-device demo does not cover the country it sits in.
    return 4.0 if count == 0 else 5.0 + 17.0 * math.sqrt(count / max(largest, 1000))


def _arc(start: tuple[float, float], end: tuple[float, float]) -> str:
    """A gentle arc, bulging northwards like a flight path: the control point is a fifth of the chord off it."""
    (x1, y1), (x2, y2) = start, end
    mx, my, dx, dy = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    cx, cy = (mx + dy / 5, my - dx / 5) if dx >= 0 else (mx - dy / 5, my + dx / 5)
    return f"M{x1:.1f},{y1:.1f}Q{cx:.1f},{cy:.1f} {x2:.1f},{y2:.1f}"


def _place_label(text: str, x: float, y: float, radius: float,
                 placed: list[tuple[float, float, float, float]]) -> Markup | None:
    """A region's name beside its marker, on the first side where it overlaps no label placed before."""
    width, height = 6.2 * len(text), 12.0
    for lx, ly, anchor in ((x + radius + 3, y + 4, "start"), (x - radius - 3, y + 4, "end"),
                           (x, y - radius - 4, "middle"), (x, y + radius + 12, "middle")):
        left = lx - (width if anchor == "end" else width / 2 if anchor == "middle" else 0)
        box = (left, ly - height + 2, left + width, ly + 2)
        if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
            placed.append(box)
            return el("text", text, class_="label", x=f"{lx:.1f}", y=f"{ly:.1f}", text_anchor=anchor)
    return None


def _reason_line(reason: str) -> Markup:
    """A short line in the colour the map draws the reason's lines in."""
    return el("span", class_="line", style=f"background:{REASON_COLOURS.get(reason, UNKNOWN_REASON_COLOUR)}")


def _lines(items: Iterable[Node]) -> Markup:
    """Each item on a line of its own (the page's source stays readable)."""
    return concat(("\n", item) for item in items)


def render_map(fleet: Fleet, enabled: list[str], default_region: str, frame: worldmap.Frame) -> Markup:
    shapes = worldmap.shapes(frame)
    by_code = {s.code: s for s in shapes if s.code}
    breaks = shade_breaks(max(fleet.by_country.values(), default=0))
    regions_of: dict[str, Counter[str]] = defaultdict(Counter)
    reasons_of: dict[str, Counter[str]] = defaultdict(Counter)
    countries_of: dict[str, Counter[str]] = defaultdict(Counter)
    for (country, region, reason), count in fleet.flows.items():
        regions_of[country][region] += count
        reasons_of[country][reason] += count
        countries_of[region][country] += count

    def country_tip(code: str, name: str) -> str:
        count = fleet.by_country[code]
        lines = [f"{name} ({code})", f"{_n(count)} device{'s' if count != 1 else ''}"]
        lines += [f"→ {region}: {_n(n)}" for region, n in regions_of[code].most_common(4)]
        lines += [f"  by {reason}: {_n(n)}" for reason, n in reasons_of[code].most_common()]
        return "\n".join(lines)

    sphere = worldmap.sphere_outline(frame)
    countries, dots = [], []
    for shape in shapes:
        count = fleet.by_country.get(shape.code, 0) if shape.code else 0
        if count:
            tip = country_tip(shape.code, shape.name)
            countries.append(el("path", class_="country shaded", data_code=shape.code, data_count=count,
                                style=f"fill:{shade_for(count, breaks)}", data_tip=tip, d=shape.path))
            if shape.area < 12:  # too small to see or hover: a dot on top, like an atlas's city-state
                x, y = frame.point(*shape.anchor)
                dots.append(el("circle", class_="country shaded dot", data_code=shape.code, data_count=count,
                               style=f"fill:{shade_for(count, breaks)}", cx=f"{x:.1f}", cy=f"{y:.1f}", r="2.6",
                               data_tip=tip))
        else:
            label = f"{shape.name} ({shape.code})" if shape.code else shape.name
            countries.append(el("path", class_="country", data_code=shape.code, data_tip=f"{label}\nno devices",
                                d=shape.path))

    flows = []
    largest_flow = max(fleet.flows.values(), default=1)
    # Ordinary (nearest) lines first and faint; rules and the default drawn on top, where the eye goes.
    for (country, region, reason), count in sorted(fleet.flows.items(), key=lambda f: (f[0][2] != "nearest", f[1])):
        if country not in by_code or region not in CATALOGUE:
            continue
        lon1, lat1 = by_code[country].anchor
        lon2, lat2 = CATALOGUE[region].longitude, CATALOGUE[region].latitude
        ends = [((lon1, lat1), (lon2, lat2))]
        if abs(lon2 - lon1) > 180:  # the short way crosses the date line: leave by one edge, come in by the other
            turn = 360 if lon2 < lon1 else -360
            ends = [((lon1, lat1), (lon2 + turn, lat2)), ((lon1 - turn, lat1), (lon2, lat2))]
        width = 0.7 + 2.6 * math.log1p(count) / math.log1p(largest_flow)
        flows.append(el("path", class_="flow usual" if reason == "nearest" else "flow", data_reason=reason,
                        stroke=REASON_COLOURS.get(reason, UNKNOWN_REASON_COLOUR), stroke_width=f"{width:.1f}",
                        data_tip=f"{country} → {region}\n{_n(count)} device{'s' if count != 1 else ''} ({reason})",
                        d="".join(_arc(frame.point(*a), frame.point(*b)) for a, b in ends)))

    largest = max((fleet.by_region[r] for r in enabled), default=0)
    placed: list[tuple[float, float, float, float]] = []  # boxes labels must not cover: busy markers, then labels
    for region in (r for r in enabled if fleet.by_region[r]):
        x, y = frame.point(CATALOGUE[region].longitude, CATALOGUE[region].latitude)
        r = _marker_radius(fleet.by_region[region], largest)
        placed.append((x - r, y - r, x + r, y + r))
    markers, labels = [], []
    for region in sorted(enabled, key=lambda r: -fleet.by_region[r]):  # big circles under small ones
        info = CATALOGUE[region]
        x, y = frame.point(info.longitude, info.latitude)
        count = fleet.by_region[region]
        radius = _marker_radius(count, largest)
        lines = [f"{region} · {info.metro}" + (" · default region" if region == default_region else ""),
                 f"{_n(count)} provisioned device{'s' if count != 1 else ''}"]
        if countries_of[region]:
            lines.append(f"from {len(countries_of[region])} countr{'ies' if len(countries_of[region]) != 1 else 'y'}: "
                         + ", ".join(f"{c} {_n(n)}" for c, n in countries_of[region].most_common(5)))
        markers.append(el("circle", class_="region used" if count else "region idle", data_region=region,
                          data_count=count, cx=f"{x:.1f}", cy=f"{y:.1f}", r=f"{radius:.1f}",
                          data_tip="\n".join(lines)))
        if count:
            labels.append(_place_label(region, x, y, radius, placed))

    svg = el("svg", _lines([
        el("defs", el("clipPath", el("path", d=sphere), id="globe")),
        el("path", class_="sphere", d=sphere),
        el("path", class_="graticule", d=worldmap.graticule(frame)),
        el("g", _lines(countries), "\n", class_="countries"),
        *dots,
        el("g", _lines(flows), "\n", class_="flows", clip_path="url(#globe)"),
        el("g", _lines(markers), "\n", class_="regions"),
        el("g", labels, class_="labels")]),
        id="map", viewBox=f"0 0 {frame.width:.0f} {frame.height:.0f}", role="img",
        aria_label="World map of the fleet", xmlns="http://www.w3.org/2000/svg")

    most = max(fleet.by_country.values(), default=1)
    shades = []
    for i, lower in enumerate(breaks):
        upper = breaks[i + 1] - 1 if i + 1 < len(breaks) else most
        shades.append(el("span", el("span", class_="swatch", style=f"background:{shade_for(lower, breaks)}"),
                         _n(lower) if upper <= lower else f"{_n(lower)}–{_n(upper)}", class_="key"))
    drawn = {reason for _, _, reason in fleet.flows}
    reasons = [el("span", _reason_line(reason), reason, class_="key")
               for reason in [r for r in REASON_COLOURS if r in drawn] + sorted(drawn - set(REASON_COLOURS))
               or ["nearest"]]
    legend = el("div",
                el("div", el("span", "Devices per country", class_="legend-title"), shades, class_="group"),
                el("div", el("span", "Sent to a region by", class_="legend-title"), reasons, class_="group"),
                el("div", el("span", el("span", class_="dot-key"), "region, sized by devices", class_="key"),
                   el("span", el("span", class_="idle-key"), "enabled, none yet", class_="key"), class_="group"),
                class_="legend")
    missing = sorted(c for c in fleet.by_country if c not in by_code)
    note = el("p", "Not on the map (no outline for the code): ",
              join(", ", (f"{c} ({_n(fleet.by_country[c])})" for c in missing)), class_="note") if missing else None
    return concat(svg, legend, note)


def render_per_day(fleet: Fleet, today: date) -> Markup:
    if not fleet.per_day:
        return el("p", "No device has been provisioned yet.", class_="empty")
    last = max(today, max(date.fromisoformat(d) for d in fleet.per_day))
    days = [last - timedelta(days=DAYS_SHOWN - 1 - i) for i in range(DAYS_SHOWN)]
    counts = [fleet.per_day.get(d.isoformat(), 0) for d in days]
    earlier = sum(n for d, n in fleet.per_day.items() if d < days[0].isoformat())
    top = max(counts) or 1
    width, height, pad = 600, 150, 24
    bar = (width - 2 * pad) / len(days)
    shapes = [el("line", class_="axis", x1=pad, y1=height, x2=width - pad, y2=height),
              el("text", _n(top), class_="tick", x=pad, y=14)]
    for i, (day, count) in enumerate(zip(days, counts)):
        h = (height - 24) * count / top
        x = pad + i * bar
        shapes.append(el("rect", class_="bar", x=f"{x + 1:.1f}", y=f"{height - h:.1f}", width=f"{max(bar - 2, 1):.1f}",
                         height=f"{h:.1f}", data_tip=f"{day.isoformat()}\n{_n(count)} provisioned"))
        if i % 10 == 0 or i == len(days) - 1:
            shapes.append(el("text", day.strftime("%d %b"), class_="tick", x=f"{x + bar / 2:.1f}", y=height + 16,
                             text_anchor="middle"))
    busiest = max(range(len(days)), key=lambda i: counts[i])
    return concat(
        el("svg", shapes, id="per-day", viewBox=f"0 0 {width} {height + 22}", role="img",
           aria_label="Provisionings per day", xmlns="http://www.w3.org/2000/svg"),
        el("p", f"{_n(sum(counts))} in these {DAYS_SHOWN} days · last 7 days: {_n(sum(counts[-7:]))}"
                f" · busiest day: {days[busiest].strftime('%d %b')} ({_n(counts[busiest])})", class_="note"),
        el("p", f"{_n(earlier)} earlier provisioning(s), before {days[0].isoformat()}.", class_="note")
        if earlier else None)


def _table(header: list[str], rows: Iterable[list[Node]], numeric: AbstractSet[int] = frozenset()) -> Markup:
    def cells(tag: str, row: list[Node]) -> list[Markup]:
        return [el(tag, cell, class_="num" if i in numeric else None) for i, cell in enumerate(row)]
    return el("table", el("thead", el("tr", cells("th", list(header)))),
              el("tbody", (el("tr", cells("td", row)) for row in rows)))


def _bar(part: int, whole: int) -> Markup:
    return el("span", el("span", style=f"width:{100 * part / whole if whole else 0:.1f}%"), class_="hbar")


def render_audit(findings: AuditReport | None) -> Markup:
    if findings is None:
        return el("p", "Not checked: run ", el("code", "python -m admin report --html FILE --audit"),
                  " to list stuck claims, orphan certificates and things, and missing certificates.", class_="empty")
    rows: list[list[Node]] = []
    for record in findings.stuck_claims:
        ended = timestamp(record.lease_expires) if record.lease_expires else "?"
        rows.append(["stuck claim", record.thing_name, "", f"lease ended {ended}"])
    for cert in findings.orphan_certificates:
        rows.append(["orphan certificate", cert.thing_name or "", cert.region, cert.certificate_id])
    for thing in findings.orphan_things:
        rows.append(["orphan thing", thing.thing_name, thing.region, "no registry item places it there"])
    for missing in findings.missing_certificates:
        rows.append(["missing certificate", missing.thing_name, missing.region,
                     f"{missing.certificate_id} is {missing.status}"])
    if not rows:
        return el("p", "Nothing found: no stuck claim, orphan or missing certificate.", class_="ok")
    return concat(
        el("p", f"{_n(len(rows))} finding(s); ", el("code", "admin audit --fix"), " repairs them.", class_="warn"),
        _table(["finding", "device", "region", "detail"], rows[:200]),
        el("p", f"and {_n(len(rows) - 200)} more; ", el("code", "admin audit"), " lists them all.", class_="note")
        if len(rows) > 200 else None)


def render_expiring(fleet: Fleet) -> Markup:
    unknown = el("p", f"{_n(fleet.expiry_unknown)} provisioned device(s) with no expiry recorded: ",
                 el("code", "admin list --expiring-within 30"), " lists them first.",
                 class_="note") if fleet.expiry_unknown else None
    if not fleet.expiring:
        nothing_known = fleet.provisioned > 0 and fleet.expiry_checked == 0  # then the note is the whole answer
        return concat(None if nothing_known else el("p", "No certificate expires within 30 days.", class_="ok"),
                      unknown)
    rows: list[list[Node]] = [[thing, region, timestamp(expires)] for thing, region, expires in fleet.expiring[:200]]
    return concat(
        el("p", f"{_n(len(fleet.expiring))} certificate(s) expire within 30 days.", class_="warn"),
        _table(["device", "region", "not after"], rows),
        el("p", f"and {_n(len(fleet.expiring) - 200)} more.", class_="note") if len(fleet.expiring) > 200 else None,
        unknown)


_CSS = Markup("""
:root{--ink:#1f2a37;--muted:#64748b;--line:#e2e8f0;--card:#fff;--bg:#f4f6f9;--accent:#167a68}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
header{padding:22px 32px 8px}
h1{font-size:24px;margin:0 0 2px;font-weight:650;letter-spacing:-.01em}
h2{font-size:15px;margin:0 0 10px;font-weight:600}
.sub{color:var(--muted)}
main{padding:8px 32px 32px;display:grid;gap:16px;grid-template-columns:repeat(12,1fr)}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;
box-shadow:0 1px 2px rgba(15,23,42,.04)}
.span12{grid-column:span 12}.span6{grid-column:span 6}.span4{grid-column:span 4}.span8{grid-column:span 8}
@media (max-width:1000px){.span6,.span4,.span8{grid-column:span 12}}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:16px;grid-column:span 12}
.kpi .v{font-size:26px;font-weight:650;letter-spacing:-.02em}.kpi .l{color:var(--muted);font-size:12.5px}
.kpi.alert .v{color:#c2410c}
#map{width:100%;height:auto;display:block}
.sphere{fill:#eaf2f8;stroke:#c9d6e2;stroke-width:.8}
.graticule{fill:none;stroke:#d5e1ec;stroke-width:.5}
.country{fill:#e3e6ea;stroke:#fff;stroke-width:.4}
.country.shaded{stroke:#f8fafc;stroke-width:.5}
.country:hover,.country.dot:hover{stroke:#0f172a;stroke-width:1}
.country.dot{stroke:#0b5447;stroke-width:.8}
.flow{fill:none;stroke-linecap:round;opacity:.85}.flow.usual{opacity:.38}
.flow:hover{opacity:1}
.region{stroke:#fff;stroke-width:1.5}
.region.used{fill:#1e293b;fill-opacity:.82}
.region.idle{fill:#fff;stroke:#1e293b;stroke-width:1.2;stroke-dasharray:2 1.5}
.region:hover{fill:#0f766e}
.label{font-size:11px;font-weight:600;fill:#1e293b;paint-order:stroke;stroke:#fff;stroke-width:3px;
stroke-linejoin:round;pointer-events:none}
.legend{display:flex;flex-wrap:wrap;align-items:center;gap:8px 28px;margin-top:10px;color:var(--muted);font-size:12.5px}
.legend .group{display:flex;flex-wrap:wrap;align-items:center;gap:4px 6px}
.key{white-space:nowrap}
.legend-title{color:var(--ink);font-weight:600;margin-right:2px}
.swatch{display:inline-block;width:16px;height:12px;border-radius:2px;margin:0 4px 0 6px;vertical-align:-1px}
.line{display:inline-block;width:18px;height:3px;border-radius:2px;margin:0 5px 0 8px;vertical-align:3px}
.dot-key{display:inline-block;width:12px;height:12px;border-radius:50%;background:#1e293b;margin:0 5px 0 4px;
vertical-align:-1px}
.idle-key{display:inline-block;width:10px;height:10px;border-radius:50%;border:1.2px dashed #1e293b;margin:0 5px 0 12px;
vertical-align:-1px}
table{border-collapse:collapse;width:100%}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:middle}
th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr:last-child td{border-bottom:0}
.hbar{display:inline-block;width:90px;height:8px;background:#eef2f6;border-radius:4px;overflow:hidden;vertical-align:middle}
.hbar span{display:block;height:100%;background:var(--accent)}
.tag{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;background:#eef2f6;color:var(--muted)}
.empty,.note{color:var(--muted)}.ok{color:#15803d}.warn{color:#c2410c;font-weight:600}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef2f6;padding:1px 4px;
border-radius:4px}
#per-day{width:100%;height:auto}.bar{fill:var(--accent)}.bar:hover{fill:#0b5447}
.axis{stroke:#cbd5e1}.tick{fill:var(--muted);font-size:10px}
footer{padding:0 32px 28px;color:var(--muted);font-size:12.5px}
footer li{margin:2px 0}
#tip{position:fixed;pointer-events:none;display:none;background:#0f172a;color:#f8fafc;padding:7px 10px;
border-radius:6px;font-size:12.5px;white-space:pre-line;max-width:340px;box-shadow:0 4px 14px rgba(15,23,42,.25);
z-index:10}
""")

# The hover box: shows the data-tip text of whatever the pointer is over (no network, no library).
_SCRIPT = Markup("""
(function(){var tip=document.getElementById('tip');
document.addEventListener('mouseover',function(e){var t=e.target.closest&&e.target.closest('[data-tip]');
if(!t){tip.style.display='none';return;}
var lines=t.getAttribute('data-tip').split('\\n'),head=document.createElement('b');
head.textContent=lines[0];tip.textContent='';tip.appendChild(head);
if(lines.length>1)tip.appendChild(document.createTextNode('\\n'+lines.slice(1).join('\\n')));tip.style.display='block';});
document.addEventListener('mousemove',function(e){var w=tip.offsetWidth,h=tip.offsetHeight;
var x=e.clientX+14,y=e.clientY+14;if(x+w>innerWidth-8)x=e.clientX-w-14;if(y+h>innerHeight-8)y=e.clientY-h-14;
tip.style.left=x+'px';tip.style.top=y+'px';});})();
""")


_URL = re.compile(r"https://[\w./-]*\w")


def _linked(text: str) -> Markup:
    """The text with each https address in it a link (DB-IP's licence asks pages showing its results to link)."""
    parts: list[Node] = []
    at = 0
    for url in _URL.finditer(text):
        parts += [text[at:url.start()], el("a", url.group(), href=url.group())]
        at = url.end()
    parts.append(text[at:])
    return concat(parts)


def _section(width: str, title: str, *body: Node) -> Markup:
    return el("section", el("h2", title), *body, class_=f"card {width}")


def render(fleet: Fleet, *, stage: str, enabled: list[str], default_region: str, generated: datetime,
           sources: list[str], findings: AuditReport | None = None) -> str:
    frame = worldmap.Frame()
    provisioned = fleet.provisioned
    statuses = [str(s) for s in STATUSES] + sorted(s for s in fleet.by_status if s not in STATUSES)
    status_rows: list[list[Node]] = [[s, _n(fleet.by_status[s]), _pct(fleet.by_status[s], fleet.total)]
                                     for s in statuses]
    region_names = list(enabled) + sorted(r for r in fleet.by_region if r not in enabled)
    region_rows: list[list[Node]] = []
    for region in sorted(region_names, key=lambda r: (-fleet.by_region[r], r)):
        info = CATALOGUE.get(region)
        tags = [el("span", "default", class_="tag") if region == default_region else None,
                el("span", "not enabled", class_="tag") if region not in enabled else None]
        region_rows.append([[region, " ", tags], info.metro if info else "?", _n(fleet.by_region[region]),
                            _pct(fleet.by_region[region], provisioned), _bar(fleet.by_region[region], provisioned)])
    names = {s.code: s.name for s in worldmap.shapes(frame) if s.code}
    regions_of: dict[str, Counter[str]] = defaultdict(Counter)
    for (country, region, _), count in fleet.flows.items():
        regions_of[country][region] += count
    country_rows: list[list[Node]] = [
        [[names.get(code, code), " ", el("span", code, class_="tag")], _n(count), _pct(count, provisioned),
         ", ".join(f"{r} {_n(n)}" for r, n in regions_of[code].most_common(3))]
        for code, count in fleet.by_country.most_common(15)]
    if fleet.unknown_country:
        country_rows.append([el("em", "unknown location"), _n(fleet.unknown_country),
                             _pct(fleet.unknown_country, provisioned), ""])
    reason_rows: list[list[Node]] = [
        [[_reason_line(r), " ", r], _n(n), _pct(n, provisioned)] for r, n in fleet.by_reason.most_common()]
    stuck = len(findings.stuck_claims) if findings is not None else None
    share = fleet.default_share()
    kpis = [("devices", _n(fleet.total), False),
            (f"provisioned ({_pct(provisioned, fleet.total)})", _n(provisioned), False),
            ("in provisioning now", _n(fleet.by_status[PROVISIONING]), False),
            ("countries", _n(len(fleet.by_country)), False),
            ("regions in use", f"{sum(1 for r in enabled if fleet.by_region[r])} / {len(enabled)}", False),
            (f"sent to the default region ({default_region}): location unknown", f"{share * 100:.1f}%", share > 0.05)]
    if stuck is not None:
        kpis.append(("stuck claims", _n(stuck), stuck > 0))
    generated_text = timestamp(generated)
    nothing_yet = el("p", "No device provisioned yet.", class_="empty")
    head = el("head", join("\n", [
        el("meta", charset="utf-8"),
        el("meta", name="viewport", content="width=device-width,initial-scale=1"),
        el("meta", http_equiv="Content-Security-Policy",
           content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"),
        el("title", f"Fleet report · {stage} · {generated_text}"),
        el("style", _CSS)]))
    header = el("header", el("h1", "Fleet report"), "\n", el(
        "div", "stage ", el("b", stage), f" · generated {generated_text} · {_n(fleet.total)} registered devices ·\n"
        f"{_n(provisioned)} provisioned in {_n(len(fleet.by_country))} countries", class_="sub"))
    main = el("main", _lines([
        el("div", (el("div", el("div", value, class_="v"), el("div", label, class_="l"),
                      class_="card kpi alert" if alert else "card kpi") for label, value, alert in kpis),
           class_="kpis"),
        _section("span12", "Where the devices are, and which region each country was sent to",
                 "\n", render_map(fleet, enabled, default_region, frame)),
        _section("span6", "Provisioned devices by region",
                 "\n", _table(["region", "location", "devices", "share", ""], region_rows, {2, 3})),
        _section("span6", "Devices by status",
                 "\n", _table(["status", "devices", "share"], status_rows, {1, 2}),
                 "\n", el("h2", "Why each region was chosen", style="margin-top:18px"),
                 "\n", _table(["reason", "devices", "share"], reason_rows, {1, 2}) if reason_rows else nothing_yet,
                 "\n"),
        _section("span6", "Top countries",
                 "\n", _table(["country", "devices", "share", "sent to"], country_rows, {1, 2})
                 if country_rows else nothing_yet, "\n"),
        _section("span6", f"Provisionings per day (last {DAYS_SHOWN} days, UTC)",
                 "\n", render_per_day(fleet, generated.date())),
        _section("span6", "Stuck claims and audit findings", render_audit(findings)),
        _section("span6", "Certificates expiring within 30 days", "\n", render_expiring(fleet))]),
        "\n")
    body = el("body", _lines([
        header, main,
        el("footer", el("b", "Data sources"), el("ul", (el("li", _linked(s)) for s in sources))),
        el("div", id="tip", role="tooltip"),
        el("script", _SCRIPT)]), "\n")
    return concat(Markup("<!doctype html>\n"), el("html", head, "\n", body, lang="en"), "\n")


# --- the command ---------------------------------------------------------------------------------------

class CannotWrite(Exception):
    """The report's file cannot be written there (a message for the operator)."""


def write(parts: Container, path: Path, audit: bool = False, now: datetime | None = None) -> Path:
    """Read the stage's registry (and with `audit`, its issuer, for the audit only), write the report to `path`."""
    config = parts.settings
    now = now or utcnow()
    registry = parts.registry
    policy = parts.regions
    findings = operations.audit(registry, parts.issuer, policy.enabled, now) if audit else None
    fleet = aggregate((device_facts(record) for record in registry.list()), now)
    where = (f"DynamoDB table {config.table_name}" if config.registry == "dynamodb"
             else f"SQLite registry {config.registry_path}")
    sources = [f"Registry: {where}, read {timestamp(now)} (certificate expiry as recorded at issue)."]
    if audit:
        sources.append("Issuer: " + ("AWS IoT Core in each enabled region" if config.issuer == "aws-iot"
                                     else f"local CAs in {config.ca_dir}") + " (audit).")
    sources += [f"Geolocation: {s}" for s in geolocation_sources(config)]
    sources.append(f"Map: {worldmap.world().source}; Equal Earth projection.")
    sources.append("Region locations: the metro areas of AWS IoT Core regions in chalicelib/domain/regions.py.")
    page = render(fleet, stage=config.stage, enabled=list(policy.enabled), default_region=policy.default,
                  generated=now, sources=sources, findings=findings)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise CannotWrite(f"{path}: cannot write the report there ({exc.strerror or exc})") from None
    return path.resolve()

