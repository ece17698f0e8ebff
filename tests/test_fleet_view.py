"""admin list filters and output, admin stats, admin show's certificate and history, on both registry backends."""
import csv
import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from chalicelib.container import Container
from chalicelib.domain.records import STATUSES
from tests.test_bulk_enrolment import backend  # noqa: F401  (the fixture: SQLite stage and prod under moto)

NOW = datetime.now(timezone.utc)
JAN = datetime(2026, 1, 10, 8, 0, tzinfo=timezone.utc)
FEB = datetime(2026, 2, 1, 0, 0, tzinfo=timezone.utc)
MAR = datetime(2026, 3, 5, 12, 0, tzinfo=timezone.utc)


def provision(registry, name: str, region: str, at: datetime, certificate_id: str | None = None) -> None:
    registry.finalize(registry.claim(name, at, 300), region, certificate_id or f"cert-{name}", at)


@pytest.fixture
def fleet(backend):  # noqa: F811
    """a, c in eu-west-2 and b in us-east-1 (provisioned); d stuck, e in flight; f failed once; g never tried."""
    assert backend("register", "a", "b", "c", "d", "e", "f", "g")[0] == 0
    registry = backend.registry()
    registry.register(["h"], attributes={"h": {"site": "Leeds, UK"}})
    provision(registry, "a", "eu-west-2", JAN)
    provision(registry, "b", "us-east-1", FEB)
    provision(registry, "c", "eu-west-2", MAR)
    registry.claim("d", NOW - timedelta(hours=1), 60)   # its process died: lease over
    registry.claim("e", NOW, 600)                       # still working
    registry.release(registry.claim("f", MAR, 300), "issuer down")
    return backend


def listed(backend, *argv) -> list[str]:  # noqa: F811
    code, out, err = backend("list", "--json", *argv)
    assert (code, err) == (0, "")
    return [item["thing_name"] for item in json.loads(out)]


def test_list_filters_by_region_since_and_status(fleet):
    assert listed(fleet, "--region", "eu-west-2") == ["a", "c"]
    assert listed(fleet, "--since", "2026-02-01") == ["b", "c"]  # at or after; a date means its midnight UTC
    assert listed(fleet, "--since", "2026-02-01T00:00:01") == ["c"]
    assert listed(fleet, "--since", "2026-03-05T13:00:00+02:00") == ["c"]  # 11:00Z
    assert listed(fleet, "--since", "2026-03-05T14:30:00+02:00") == []     # 12:30Z
    assert listed(fleet, "--status", "provisioned", "--region", "us-east-1") == ["b"]
    assert listed(fleet, "--status", "unprovisioned") == ["f", "g", "h"]
    assert listed(fleet, "--status", "provisioning", "--region", "eu-west-2") == []


def test_list_table_counts_the_filtered_devices(fleet):
    code, out, _ = fleet("list", "--region", "eu-west-2", "--since", "2026-01-01")
    assert code == 0
    assert [line.split()[:3] for line in out.splitlines()[1:-1]] == [["a", "provisioned", "eu-west-2"],
                                                                     ["c", "provisioned", "eu-west-2"]]
    assert out.splitlines()[-1] == "(2 device(s))"


def test_list_csv_has_a_header_and_one_row_per_device(fleet):
    code, out, _ = fleet("list", "--csv")
    assert code == 0
    rows = {row["thing_name"]: row for row in csv.DictReader(io.StringIO(out))}
    assert list(rows) == list("abcdefgh")
    assert rows["b"] == {"thing_name": "b", "prov_status": "provisioned", "aws_region": "us-east-1",
                         "prov_datetime": "2026-02-01T00:00:00Z", "certificate_id": "cert-b", "country": "",
                         "attempts": "1", "last_error": "", "attributes": ""}
    assert rows["f"]["last_error"] == "issuer down" and rows["f"]["attempts"] == "1"
    assert rows["g"]["attempts"] == "" and rows["g"]["prov_status"] == "unprovisioned"
    assert json.loads(rows["h"]["attributes"]) == {"site": "Leeds, UK"}  # the comma is quoted, not a new column

    code, out, _ = fleet("list", "--csv", "--status", "provisioning")
    assert [row["thing_name"] for row in csv.DictReader(io.StringIO(out))] == ["d", "e"]


@pytest.mark.parametrize("argv", [("--since", "last tuesday"), ("--json", "--csv")])
def test_list_refuses_bad_options(fleet, argv):
    with pytest.raises(SystemExit) as exit_:
        fleet("list", *argv)
    assert exit_.value.code == 2


def test_stats_counts_match_the_registry(fleet):
    code, out, err = fleet("stats", "--json")
    assert (code, err) == (0, "")
    stats = json.loads(out)
    assert stats["total"] == 8
    assert stats["by_status"] == {"unprovisioned": 3, "provisioning": 2, "provisioned": 3}
    assert stats["provisioned_by_region"] == {"eu-west-2": 2, "us-east-1": 1}
    assert [item["thing_name"] for item in stats["stuck"]] == ["d"]
    assert stats["stuck"][0]["lease_expires"] == (NOW - timedelta(minutes=59)).strftime("%Y-%m-%dT%H:%M:%SZ")

    # The same numbers the registry gives when asked each question separately.
    registry = fleet.registry()
    assert stats["total"] == len(list(registry.list())) == sum(stats["by_status"].values())
    assert stats["by_status"] == {status: len(list(registry.list(status))) for status in STATUSES}
    assert stats["provisioned_by_region"] == {
        region: len(list(registry.list("provisioned", region))) for region in ("eu-west-2", "us-east-1")}
    assert [item["thing_name"] for item in stats["stuck"]] == [
        record.thing_name for record in registry.stuck(datetime.now(timezone.utc))]


def test_stats_text(fleet):
    code, out, _ = fleet("stats")
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert ["devices:", "8"] in lines and ["provisioning", "2"] in lines and ["us-east-1", "1"] in lines
    assert "stuck in provisioning (lease ended): 1" in out and any(line[:1] == ["d"] for line in lines)


def test_stats_on_an_empty_registry(backend):  # noqa: F811
    backend.registry().create()
    code, out, _ = backend("stats", "--json")
    assert code == 0 and json.loads(out) == {"total": 0, "by_status": dict.fromkeys(STATUSES, 0),
                                             "provisioned_by_region": {}, "stuck": []}


def test_show_has_the_certificate_validity_issuer_and_the_history(backend):  # noqa: F811
    assert backend("register", "dev-1", "dev-2", "dev-3")[0] == 0
    registry = backend.registry()
    registry.release(registry.claim("dev-1", NOW, 300), "issuer down")  # a failed first try
    issued = Container(backend.settings).issuer.issue("dev-1", "eu-west-2", None)
    provision(registry, "dev-1", "eu-west-2", NOW, issued.certificate_id)
    registry.release(registry.claim("dev-2", NOW, 300), "geolocation unavailable")

    code, out, err = backend("show", "dev-1")

    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert shown["attempts"] == 2 and "last_error" not in shown  # cleared by the success
    cert = shown["certificate"]
    pem = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    assert cert["certificate_id"] == issued.certificate_id and cert["status"] == "ACTIVE"
    assert cert["issuer"] == pem.issuer.rfc4514_string() and cert["issuer"]
    assert cert["not_before"] == pem.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cert["not_after"] == pem.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cert["not_before"] <= datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") < cert["not_after"]
    assert "certificate_pem" not in cert

    shown = json.loads(backend("show", "dev-2")[1])
    assert (shown["attempts"], shown["last_error"], shown["prov_status"]) == (1, "geolocation unavailable",
                                                                              "unprovisioned")
    assert "certificate" not in shown
    assert json.loads(backend("show", "dev-3")[1])["attempts"] == 0
