"""The fleet report: projection, outlines, aggregation and the command, without a browser
(tests/test_report_browser.py opens the page in Chromium)."""
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import pytest

from admin import report, worldmap
from admin.operations import AuditReport, MissingCertificate, OrphanThing
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.container import Container
from chalicelib.domain.certificates import CertificateInfo
from chalicelib.domain.clock import timestamp
from chalicelib.domain.records import PROVISIONED, PROVISIONING, UNPROVISIONED, DeviceRecord
from chalicelib.domain.requests import ProvisioningRequest
from tests.conftest import LONDON_IP, SYDNEY_IP, TOKYO_IP, make_csr, sign_v1
from tests.test_bulk_enrolment import backend  # noqa: F401  (the fixture: SQLite stage and prod under moto)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


# --- projection ----------------------------------------------------------------------------------------

def _area(points):
    return abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]))) / 2


def _cell(lon1, lat1, lon2, lat2, steps=40):
    """A longitude/latitude rectangle's outline, densely sampled, projected."""
    edge = ([(lon1 + (lon2 - lon1) * i / steps, lat1) for i in range(steps)]
            + [(lon2, lat1 + (lat2 - lat1) * i / steps) for i in range(steps)]
            + [(lon2 - (lon2 - lon1) * i / steps, lat2) for i in range(steps)]
            + [(lon1, lat2 - (lat2 - lat1) * i / steps) for i in range(steps)])
    return [worldmap.equal_earth(lon, lat) for lon, lat in edge]


@pytest.mark.parametrize("lon1,lat1,lon2,lat2", [(0, 0, 10, 10), (-170, 60, -150, 80), (100, -50, 140, -20),
                                                 (-10, -5, 5, 5)])
def test_equal_earth_is_equal_area(lon1, lat1, lon2, lat2):
    # On the unit sphere a lon/lat rectangle has area Δλ·(sin φ2 − sin φ1); an equal-area map keeps it.
    sphere = math.radians(lon2 - lon1) * (math.sin(math.radians(lat2)) - math.sin(math.radians(lat1)))
    assert _area(_cell(lon1, lat1, lon2, lat2)) == pytest.approx(sphere, rel=2e-3)


def test_the_whole_globe_keeps_the_sphere_s_area():
    assert _area(_cell(-180, -90, 180, 90, steps=400)) == pytest.approx(4 * math.pi, rel=1e-3)


def test_equal_earth_points_north_up_east_right_and_symmetric():
    assert worldmap.equal_earth(0, 0) == (0.0, 0.0)
    x, y = worldmap.equal_earth(30, 40)
    assert x > 0 and y > 0
    assert worldmap.equal_earth(-30, -40) == pytest.approx((-x, -y))
    # Along a parallel, x is proportional to longitude (the meridians are evenly spaced).
    assert worldmap.equal_earth(60, 40)[0] == pytest.approx(2 * x)
    # Poles are lines, not points: the same y whatever the longitude, and the edge meridian is curved inward.
    assert worldmap.equal_earth(-120, 90)[1] == pytest.approx(worldmap.equal_earth(120, 90)[1])
    assert worldmap.equal_earth(180, 60)[0] < worldmap.equal_earth(180, 0)[0]


def test_the_frame_puts_the_globe_in_the_picture():
    frame = worldmap.Frame(width=1000, margin=4)
    assert frame.point(0, 0) == pytest.approx((500, frame.height / 2))
    assert frame.point(-180, 0)[0] == pytest.approx(4)
    assert frame.point(180, 0)[0] == pytest.approx(996)
    assert frame.point(0, 90)[1] == pytest.approx(4)
    assert frame.point(0, -90)[1] == pytest.approx(frame.height - 4)
    assert 996 / frame.height * 0.992 == pytest.approx(2.05, abs=0.15)  # Equal Earth: about twice as wide as high


def _inside(point, ring):
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:] + ring[:1]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _distance(point, ring):
    x, y = point
    best = math.inf
    for (x1, y1), (x2, y2) in zip(ring, ring[1:] + ring[:1]):
        dx, dy = x2 - x1, y2 - y1
        t = max(0.0, min(1.0, ((x - x1) * dx + (y - y1) * dy) / (dx * dx + dy * dy or 1)))
        best = min(best, math.hypot(x - x1 - t * dx, y - y1 - t * dy))
    return best


# Where each region's data centres are, by country (general knowledge, not read from the code under test).
REGION_COUNTRY = {"us-east-1": "US", "us-east-2": "US", "us-west-2": "US", "ca-central-1": "CA",
                  "sa-east-1": "BR", "eu-west-1": "IE", "eu-west-2": "GB", "eu-west-3": "FR", "eu-central-1": "DE",
                  "eu-north-1": "SE", "eu-south-1": "IT", "eu-south-2": "ES", "il-central-1": "IL",
                  "me-central-1": "AE", "ap-south-1": "IN", "ap-southeast-5": "MY", "ap-east-1": "HK",
                  "ap-northeast-2": "KR", "ap-northeast-1": "JP", "ap-southeast-2": "AU"}


@pytest.mark.parametrize("region,country", sorted(REGION_COUNTRY.items()))
def test_each_region_s_metro_lands_inside_its_country_on_the_map(region, country):
    from chalicelib.domain.regions import CATALOGUE
    frame = worldmap.Frame()
    metro = CATALOGUE[region]
    point = frame.point(metro.longitude, metro.latitude)
    rings = [[frame.point(lon, lat) for lon, lat in ring]
             for c in worldmap.world().countries if c.code == country for ring in c.rings]
    assert rings, f"no outline for {country}"
    # Inside, or (Montreal's island is below the outlines' 1:110m detail) within a pixel and a half of the edge.
    assert any(_inside(point, ring) for ring in rings) or min(_distance(point, ring) for ring in rings) < 1.5


def test_anchors_sit_in_the_main_part_of_a_country():
    anchors = {s.code: s.anchor for s in worldmap.shapes(worldmap.Frame()) if s.code}
    lon, lat = anchors["FR"]  # metropolitan France, not between Paris and French Guiana
    assert -5 < lon < 8 and 42 < lat < 51
    lon, lat = anchors["US"]  # the lower 48
    assert -110 < lon < -85 and 30 < lat < 45
    lon, lat = anchors["JP"]
    assert 130 < lon < 142 and 32 < lat < 40


def test_the_outlines_are_small_credited_and_cover_the_world():
    assert worldmap.OUTLINES.stat().st_size < 300_000
    world = worldmap.world()
    assert "Natural Earth" in world.source and "public domain" in world.source
    codes = {c.code for c in world.countries}
    assert len(codes) > 200
    assert {"US", "CN", "IN", "BR", "DE", "FR", "NO", "GB", "JP", "AU", "SG", "BH", "MT", "NZ", "ZA"} <= codes
    for country in world.countries:
        for ring in country.rings:
            assert len(ring) >= 3
            assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in ring)


# --- aggregation ---------------------------------------------------------------------------------------

def _record(name, status=PROVISIONED, region=None, country=None, reason=None, when=None, expires=None):
    return DeviceRecord(name, status, when and datetime.fromisoformat(when), region, country=country,
                        region_reason=reason, certificate_expires=expires)


EXPIRY = {"a5": datetime(2026, 12, 10, tzinfo=timezone.utc), "a6": datetime(2027, 6, 1, tzinfo=timezone.utc)}


RECORDS = [
    _record("a1", region="eu-west-2", country="GB", reason="nearest", when="2026-11-27T10:00:00+00:00"),
    _record("a2", region="eu-west-2", country="GB", reason="nearest", when="2026-11-28T09:00:00+00:00"),
    _record("a3", region="eu-central-1", country="CH", reason="country-rule", when="2026-11-28T09:30:00+00:00"),
    _record("a4", region="eu-west-2", reason="default", when="2026-11-28T11:00:00+00:00"),  # location unknown
    _record("a5", region="ap-northeast-1", country="JP", reason="nearest", when="2026-10-01T00:00:00+00:00",
            expires=EXPIRY["a5"]),
    _record("a6", region="ap-northeast-1", country="JP", reason="nearest", when="2026-10-01T00:00:00+00:00",
            expires=EXPIRY["a6"]),
    _record("b1", status=PROVISIONING),
    _record("c1", status=UNPROVISIONED),
    _record("c2", status=UNPROVISIONED),
]


def _facts(records=RECORDS):
    return [report.device_facts(r) for r in records]


def test_aggregate_counts_every_device_once_by_status_region_country_reason_and_day():
    fleet = report.aggregate(_facts(), NOW)
    assert fleet.total == 9
    assert dict(fleet.by_status) == {"provisioned": 6, "provisioning": 1, "unprovisioned": 2}
    assert dict(fleet.by_region) == {"eu-west-2": 3, "eu-central-1": 1, "ap-northeast-1": 2}
    assert dict(fleet.by_country) == {"GB": 2, "CH": 1, "JP": 2}
    assert fleet.unknown_country == 1
    assert dict(fleet.flows) == {("GB", "eu-west-2", "nearest"): 2, ("CH", "eu-central-1", "country-rule"): 1,
                                 ("JP", "ap-northeast-1", "nearest"): 2}
    assert fleet.default_share() == pytest.approx(1 / 6)
    assert dict(fleet.per_day) == {"2026-11-27": 1, "2026-11-28": 3, "2026-10-01": 2}
    # Within 30 days of NOW: only a5's certificate (12 days left); a6's has months.
    assert fleet.expiring == [("a5", "ap-northeast-1", EXPIRY["a5"])]
    assert fleet.expiry_checked == 2 and fleet.expiry_unknown == 4


def test_aggregate_counts_provisioned_devices_only_and_lists_the_soonest_first():
    expiry = {**EXPIRY, "a1": datetime(2026, 11, 30, tzinfo=timezone.utc), "a2": datetime(2025, 1, 1, tzinfo=timezone.utc),
              "b1": datetime(2026, 11, 29, tzinfo=timezone.utc), "c1": datetime(2026, 11, 29, tzinfo=timezone.utc)}
    records = [replace(r, certificate_expires=expiry.get(r.thing_name)) for r in RECORDS]
    fleet = report.aggregate(_facts(records), NOW)
    # Soonest first; an already expired certificate is listed too; a device not provisioned is not, whatever its
    # record holds.
    assert [e[0] for e in fleet.expiring] == ["a2", "a1", "a5"]
    assert fleet.expiry_checked == 4
    unrecorded = [replace(r, certificate_expires=None) for r in RECORDS]
    assert report.aggregate(_facts(unrecorded), NOW).expiry_checked == 0  # nothing recorded, nothing known


def test_the_adapter_reads_what_the_report_needs_from_a_record():
    facts = report.device_facts(RECORDS[0])
    assert facts == ("a1", "provisioned", "eu-west-2", "GB", "nearest", "2026-11-27", None)
    assert report.device_facts(RECORDS[4]).certificate_expires == EXPIRY["a5"]
    assert type(facts.status) is str  # a plain string, whatever enum the registry uses


def test_an_empty_registry_aggregates_to_zeros_and_renders():
    fleet = report.aggregate([], NOW)
    assert fleet.total == 0 and fleet.default_share() == 0
    page = report.render(fleet, stage="local", enabled=["eu-west-2"], default_region="eu-west-2", generated=NOW,
                         sources=["x"])
    assert "No device has been provisioned yet." in page


def test_an_unreadable_geolocation_database_is_named_with_its_cause(tmp_path):
    (tmp_path / "bad.mmdb").write_bytes(b"not a database")
    assert report._database_source(tmp_path / "gone.mmdb") == "gone.mmdb: cannot be read (No such file or directory)"
    assert report._database_source(tmp_path / "bad.mmdb").startswith("bad.mmdb: cannot be read (Error opening")


def test_shade_breaks_start_at_one_and_rise():
    assert report.shade_breaks(1) == [1]
    assert report.shade_breaks(4) == [1, 2, 3, 4]
    for maximum in (7, 50, 999, 123_456):
        breaks = report.shade_breaks(maximum)
        assert breaks[0] == 1 and breaks == sorted(set(breaks)) and breaks[-1] <= maximum
        assert len(breaks) <= len(report.SHADES)
    # More devices, a darker (or equal) shade.
    breaks = report.shade_breaks(10_000)
    shades = [report.SHADES.index(report.shade_for(n, breaks)) for n in (1, 10, 100, 1000, 10_000)]
    assert shades == sorted(shades) and shades[0] == 0 and shades[-1] == len(report.SHADES) - 1
    # A small fleet's busiest country gets the darkest shade too, not the palest.
    assert report.shade_for(1, report.shade_breaks(1)) == report.SHADES[-1]


# --- the page ------------------------------------------------------------------------------------------

def _page(records=RECORDS, findings=None):
    fleet = report.aggregate(_facts(records), NOW)
    return report.render(fleet, stage="local", enabled=["eu-west-2", "eu-central-1", "ap-northeast-1", "us-east-1"],
                         default_region="eu-west-2", generated=NOW, sources=["Geolocation: test data"],
                         findings=findings)


def test_the_page_loads_nothing_from_anywhere():
    page = _page()
    assert not re.search(r"""\b(src|href)\s*=""", page, re.I)
    assert "@import" not in page and "@font-face" not in page
    assert re.findall(r"url\(([^)]*)\)", page) == ["#globe"]  # the map's own clip path only
    assert "default-src 'none'" in page  # and the browser is told to refuse any load


def test_the_page_has_one_marker_per_enabled_region_and_a_shaded_shape_per_country():
    page = _page()
    markers = dict(re.findall(r'<circle class="region (?:used|idle)" data-region="([^"]+)" data-count="(\d+)"', page))
    assert markers == {"eu-west-2": "3", "eu-central-1": "1", "ap-northeast-1": "2", "us-east-1": "0"}
    shaded = dict(re.findall(r'class="country shaded" data-code="(\w\w)" data-count="(\d+)"', page))
    assert shaded == {"GB": "2", "CH": "1", "JP": "2"}
    flows = re.findall(r'<path class="flow[^"]*" data-reason="([^"]+)"', page)
    assert sorted(flows) == ["country-rule", "nearest", "nearest"]
    assert f'stroke="{report.REASON_COLOURS["country-rule"]}"' in page


def test_hostile_registry_values_are_escaped():
    records = [_record("x", region="eu-west-2", country="<q1>", reason="<script>alert(1)</script>",
                       when="2026-11-28T00:00:00+00:00")]
    findings = AuditReport(stuck_claims=[DeviceRecord("<img src=x>", PROVISIONING, lease_expires=NOW)])
    page = _page(records, findings)
    for hostile in ("<script>alert", "<img src=x>", "<q1>"):
        assert hostile not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;q1&gt;" in page and "&lt;img src=x&gt;" in page


class Parsed(HTMLParser):
    """A page as a browser's parser reads it: its elements, attributes and text (entities decoded)."""

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes, self.text = [], [], []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += attrs

    def handle_data(self, data):
        self.text.append(data)


HOSTILE = """<script>alert('&')</script>" onmouseover="alert(2)" data-pwned='&amp;'"""


def test_hostile_text_from_the_registry_audit_and_settings_is_escaped_everywhere_on_the_page():
    """Every place a registry value, an audit finding or a setting reaches the page: the browser's parser reads it
    back as the same text, never as an element or an attribute of its own."""
    name, country, reason, region = (f"{what}{HOSTILE}" for what in ("name", "country", "reason", "region"))
    records = [_record(name, region="eu-west-2", country=country, reason=reason, when="2026-11-28T00:00:00+00:00",
                       expires=NOW),  # expiring: its name is in that table
               _record("mapped", region="eu-west-2", country="GB", reason=reason, when="2026-11-28T00:00:00+00:00"),
               _record("moved", region=region, country="FR", reason="nearest", when="2026-11-28T00:00:00+00:00")]
    findings = AuditReport(
        stuck_claims=[DeviceRecord(name, PROVISIONING, lease_expires=NOW)],
        orphan_certificates=[CertificateInfo(f"cert{HOSTILE}", region, "ACTIVE", thing_name=name)],
        orphan_things=[OrphanThing(name, region)],
        missing_certificates=[MissingCertificate(name, f"cert{HOSTILE}", region, f"status{HOSTILE}")])
    fleet = report.aggregate(_facts(records), NOW)
    page = report.render(fleet, stage=f"stage{HOSTILE}", enabled=["eu-west-2"], default_region="eu-west-2",
                         generated=NOW, sources=[f"source{HOSTILE} https://db-ip.com"], findings=findings)
    parsed = Parsed(page)
    assert parsed.tags.count("script") == 1  # the page's own
    assert not {attribute for attribute, _ in parsed.attributes} & {"onmouseover", "data-pwned"}
    text = "".join(parsed.text)
    values = [value for _, value in parsed.attributes]
    for hostile in (name, country, reason, region, f"cert{HOSTILE}", f"status{HOSTILE}", f"stage{HOSTILE}",
                    f"source{HOSTILE}"):
        assert hostile in text, hostile  # shown as text...
    assert any(f"countries: {country} 1" in value for value in values)  # ...and in attributes: a region's tip,
    assert reason in values  # a line's data-reason
    assert "<script>alert" not in page and 'onmouseover="' not in page


def test_audit_findings_appear_only_when_asked_for():
    assert "Not checked" in _page()
    page = _page(findings=AuditReport(stuck_claims=[RECORDS[6]]))
    assert "1 finding(s)" in page and "stuck claim" in page and "<td>b1</td>" in page
    assert "Nothing found" in _page(findings=AuditReport())


# --- the command on a real local stage -----------------------------------------------------------------

def provision_from(stage, names_and_ips):
    """Real provisionings through the service the stage's settings build (registry, CA, geolocation)."""
    service = Container(Settings.for_stage("local", str(stage.state_dir))).provisioning
    for name, ip in names_and_ips:
        csr, _ = make_csr(name)
        service.provision(ProvisioningRequest.from_body(
            {"thing-name": name, "thing-name-sig": sign_v1(stage.fleet_key, name), "CSR": csr}), ip)


def test_admin_report_writes_the_page_for_the_stage(stage, tmp_path, capsys):
    provision_from(stage, [("mydevice1", LONDON_IP), ("mydevice2", TOKYO_IP), ("mydevice3", SYDNEY_IP)])
    out = tmp_path / "sub" / "report.html"
    capsys.readouterr()
    assert stage.admin("report", "--html", str(out)) == 0
    assert capsys.readouterr().out.strip() == f"report written: {out.resolve()}"
    page = out.read_text()
    markers = dict(re.findall(r'<circle class="region used" data-region="([^"]+)" data-count="(\d+)"', page))
    assert markers == {"eu-west-2": "1", "ap-northeast-1": "1", "ap-southeast-2": "1"}
    assert set(re.findall(r'class="country shaded" data-code="(\w\w)"', page)) == {"GB", "JP", "AU"}
    assert "stage <b>local</b>" in page
    assert "DBIP-City-Lite" in page and "built 2023-04-01" in page  # the bundled data's date and its credit:
    assert 'IP Geolocation by DB-IP (<a href="https://db-ip.com">https://db-ip.com</a>), CC BY 4.0' in page
    assert "Natural Earth" in page


def test_admin_report_audit_lists_stuck_claims_and_expiring_certificates(stage, tmp_path):
    provision_from(stage, [("mydevice1", LONDON_IP)])
    registry = SqliteRegistry(stage.state_dir / "registry.sqlite3")
    registry.claim("mydevice4", datetime.now(timezone.utc) - timedelta(hours=1), lease_seconds=60)  # died mid-way
    out = tmp_path / "report.html"
    assert stage.admin("report", "--html", str(out), "--audit") == 0
    page = out.read_text()
    assert "stuck claim" in page and "mydevice4" in page
    assert "No certificate expires within 30 days." in page  # the registry records the expiry: a year ahead
    # Ten years on, the same certificate is inside the window: the date came from the registry, with or
    # without the audit.
    config = Settings.for_stage("local", str(stage.state_dir))
    later = datetime.now(timezone.utc) + timedelta(days=3650 - 10)
    for audit in (True, False):
        report.write(Container(config), out, audit=audit, now=later)
        assert re.search(r"<td>mydevice1</td><td>eu-west-2</td><td>20\d\d-", out.read_text())


class OtherwiseIssuer:
    """The stage's issuer, except that it says every certificate is good for ten more years than it is; counts
    what `certificate` is asked."""

    def __init__(self, issuer):
        self._issuer, self.asked = issuer, []

    def certificate(self, certificate_id, region):
        self.asked.append(certificate_id)
        found = self._issuer.certificate(certificate_id, region)
        return found and replace(found, not_after=found.not_after + timedelta(days=3650))

    def __getattr__(self, name):
        return getattr(self._issuer, name)


class NoIssuer:
    """An issuer that fails the test when the report touches it at all."""

    def __getattr__(self, name):
        raise AssertionError(f"the report used the issuer ({name}) without --audit")


def test_the_report_reads_each_certificate_s_expiry_from_the_registry(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("GIP_CERT_VALIDITY_DAYS", "10")  # the local CA issues 10-day certificates, and
    provision_from(stage, [("mydevice1", LONDON_IP)])   # provisioning records the end in the registry
    monkeypatch.delenv("GIP_CERT_VALIDITY_DAYS")
    provision_from(stage, [("mydevice2", TOKYO_IP)])  # a year
    config = Settings.for_stage("local", str(stage.state_dir))
    registry = SqliteRegistry(stage.state_dir / "registry.sqlite3")
    expires = registry.get("mydevice1").certificate_expires
    assert timedelta(days=9) < expires - datetime.now(timezone.utc) <= timedelta(days=10)
    row = f"<td>mydevice1</td><td>eu-west-2</td><td>{timestamp(expires)}</td>"
    out = tmp_path / "report.html"

    # Without --audit: listed, and the issuer is not touched at all.
    report.write(Container(config, issuer=NoIssuer()), out)
    page = out.read_text()
    assert "1 certificate(s) expire within 30 days." in page and row in page and "<td>mydevice2</td>" not in page
    assert "no expiry recorded" not in page
    assert stage.admin("report", "--html", str(out)) == 0  # the command, as an operator runs it
    assert row in out.read_text()

    # With --audit: the issuer says ten more years, the page says what the registry recorded, and the issuer is
    # asked once per provisioned device (the audit's own check that the certificate is active), not again.
    issuer = OtherwiseIssuer(Container(config).issuer)
    report.write(Container(config, issuer=issuer), out, audit=True)
    page = out.read_text()
    assert "1 certificate(s) expire within 30 days." in page and row in page
    assert "Nothing found" in page  # the audit ran
    assert sorted(issuer.asked) == sorted(r.certificate_id for r in registry.list(PROVISIONED))


def test_devices_with_no_recorded_expiry_are_counted_not_hidden():
    page = _page()  # a1-a4 have no certificate_expires (written before the registry kept it)
    assert "4 provisioned device(s) with no expiry recorded" in page and "<td>a5</td>" in page
    page = _page([replace(r, certificate_expires=None) for r in RECORDS])
    assert "No certificate expires within 30 days." not in page
    assert "6 provisioned device(s) with no expiry recorded" in page


def test_admin_report_needs_a_file(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        stage.admin("report")
    assert exit_.value.code == 2
    assert "--html" in capsys.readouterr().err


def test_an_unwritable_path_is_a_clear_error(stage, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    capsys.readouterr()
    assert stage.admin("report", "--html", str(tmp_path / "a-file" / "report.html")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot write the report there" in err and "Traceback" not in err


def test_report_of_100000_devices_stays_under_2_mb(tmp_path):
    """The issue's scale: 100,000 devices in SQLite. The size is asserted; the time is printed (no timing asserts
    in the suite: `python -m bench.report` measures it)."""
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "bench.report", "--devices", "100000", "--out", str(out), "--json"],
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n100,000-device report: {measured['bytes'] / 1e6:.2f} MB in {measured['seconds']:.2f} s "
          f"({measured['cpu_seconds']:.2f} s of CPU)")
    assert measured["devices"] == 100_000
    assert measured["bytes"] == out.stat().st_size < 2_000_000
    page = out.read_text()
    total = sum(int(n) for n in re.findall(r'class="region (?:used|idle)" data-region="[^"]+" data-count="(\d+)"',
                                           page))
    assert 80_000 < total < 100_000  # most of them provisioned, every one counted in some region
    assert page.count("<circle") < 400 and page.count("<path") < 1500  # aggregated, not one element per device


def test_the_report_reads_either_backend(backend, tmp_path):  # noqa: F811
    """The same page from the local stage's SQLite and the prod stage's DynamoDB (under moto)."""
    assert backend("register", "--prefix", "dev", "--count", "4")[0] == 0
    registry = backend.registry()
    for name, region, country, reason in (("dev1", "eu-west-2", "GB", "nearest"), ("dev2", "eu-west-2", "FR", "default"),
                                          ("dev3", "ap-southeast-2", "NZ", "country-rule")):
        claim = registry.claim(name, NOW, lease_seconds=60)
        registry.finalize(claim, region, f"cert-{name}", NOW, country=country, reason=reason)
    out = tmp_path / "fleet.html"
    code, _, err = backend("report", "--html", str(out))
    assert code == 0, err
    page = out.read_text()
    assert dict(re.findall(r'<circle class="region used" data-region="([^"]+)" data-count="(\d+)"', page)) == \
        {"eu-west-2": "2", "ap-southeast-2": "1"}
    assert dict(re.findall(r'<path class="flow[^"]*" data-reason="([^"]+)"[^>]*data-tip="(\w\w) ', page)) == \
        {"nearest": "GB", "default": "FR", "country-rule": "NZ"}
    assert f"stage <b>{backend.settings.stage}</b>" in page
    assert ("DynamoDB table" if backend.name == "dynamodb" else "SQLite registry") in page
