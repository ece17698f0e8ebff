"""admin register --csv (and --prefix/--count) on both registry backends: SQLite files and DynamoDB under moto."""
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from moto import mock_aws

from admin import cli as admin
from chalicelib.adapters.registry.items import item_of
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.container import Container

PROD_ENV = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]["environment_variables"]


def public_pem(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# Made once per module: RSA key generation is slow.
EC_PEM = public_pem(ec.generate_private_key(ec.SECP256R1()))
RSA_PEM = public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
P384_PEM = public_pem(ec.generate_private_key(ec.SECP384R1()))  # a real key the service does not accept


@dataclass
class Backend:
    """The CLI pointed at one stage, and that stage's registry to check what the CLI did."""

    name: str
    argv: list[str]
    settings: Settings
    capsys: object

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = admin.main([*self.argv, *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def registry(self):
        return Container(self.settings).registry

    def items(self) -> dict[str, dict]:
        """The registry as operators see it (the sample's attribute names)."""
        return {record.thing_name: item_of(record) for record in self.registry().list()}


@pytest.fixture(params=["sqlite", "dynamodb"])
def backend(request, tmp_path, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("GIP_")]:
        monkeypatch.delenv(name)
    if request.param == "sqlite":
        state = str(tmp_path / "state")
        yield Backend("sqlite", ["--state-dir", state], Settings.for_stage("local", state), capsys)
        return
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), **PROD_ENV}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield Backend("dynamodb", ["--stage", "prod"], Settings.for_stage("prod", None), capsys)


def write_csv(path, rows: list[list[str]]) -> list[int]:
    """Write rows (the first is the header); return the file line each row starts on (PEMs span lines)."""
    text, starts = io.StringIO(), []
    writer = csv.writer(text, lineterminator="\n")
    for row in rows:
        starts.append(text.getvalue().count("\n") + 1)
        writer.writerow(row)
    path.write_text(text.getvalue())
    return starts


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- a good file -------------------------------------------------------------------------------------------

def test_csv_registers_keys_inline_and_by_path_attributes_and_skips_exact_duplicates(backend, tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "rsa.pem").write_text(RSA_PEM)
    fleet = tmp_path / "fleet.csv"
    write_csv(fleet, [["thing_name", "public_key", "site", "batch"],
                      ["ec-dev", EC_PEM, "Köln", "7"],
                      ["rsa-dev", "keys/rsa.pem", "", "8"],   # path relative to the CSV's folder
                      ["plain-dev", "", "", ""],
                      ["ec-dev", EC_PEM, "Köln", "7"],        # the same row again: skipped
                      []])                                    # a blank line is not a row

    code, out, err = backend("register", "--csv", str(fleet))

    assert (code, err) == (0, "")
    assert out == "registered 3 new device(s); 0 already present (1 repeated row(s) skipped)\n"
    items = backend.items()
    assert items == {
        "ec-dev": {"thing_name": "ec-dev", "prov_status": "unprovisioned", "public_key": EC_PEM,
                   "attributes": {"site": "Köln", "batch": "7"}},
        "rsa-dev": {"thing_name": "rsa-dev", "prov_status": "unprovisioned", "public_key": RSA_PEM,
                    "attributes": {"batch": "8"}},
        "plain-dev": {"thing_name": "plain-dev", "prov_status": "unprovisioned"}}
    code, out, _ = backend("show", "ec-dev")
    assert code == 0 and json.loads(out)["attributes"] == {"site": "Köln", "batch": "7"}
    code, out, _ = backend("list", "--json")
    assert code == 0 and [item.get("attributes") for item in json.loads(out)] == [
        {"site": "Köln", "batch": "7"}, None, {"batch": "8"}]


def test_rerunning_the_same_file_changes_nothing_and_says_so(backend, tmp_path):
    fleet = tmp_path / "fleet.csv"
    write_csv(fleet, [["thing_name", "public_key", "line"], ["a1", EC_PEM, "north"], ["a2", "", "south"]])
    assert backend("register", "--csv", str(fleet))[0] == 0
    backend.registry().claim("a1", datetime.now(timezone.utc), 300)  # one device already at work
    before = backend.items()

    code, out, err = backend("register", "--csv", str(fleet))

    assert (code, err) == (0, "")
    assert out == "registered 0 new device(s); 2 already present: nothing changed\n"
    assert backend.items() == before


def test_a_file_adding_to_an_existing_fleet_adds_only_the_new_rows(backend, tmp_path):
    assert backend("register", "old-1")[0] == 0
    fleet = tmp_path / "fleet.csv"
    write_csv(fleet, [["thing_name", "site"], ["old-1", "moved"], ["new-1", "Leeds"]])
    code, out, _ = backend("register", "--csv", str(fleet))
    assert code == 0 and out == "registered 1 new device(s); 1 already present\n"
    items = backend.items()
    assert "attributes" not in items["old-1"]  # present devices are left as they were
    assert items["new-1"]["attributes"] == {"site": "Leeds"}


# --- bad files ------------------------------------------------------------------------------------------------

def test_every_bad_row_is_reported_with_its_line_and_nothing_is_written(backend, tmp_path):
    assert backend("register", "existing")[0] == 0
    fleet = tmp_path / "fleet.csv"
    starts = write_csv(fleet, [
        ["thing_name", "public_key", "site"],
        ["good-1", EC_PEM, "a"],                     # spans several lines: later line numbers must count them
        ["bad/name", "", "a"],
        ["good-2", "missing.pem", "a"],
        ["good-3", "-----BEGIN PUBLIC KEY-----\nbm9wZQ==\n-----END PUBLIC KEY-----\n", "a"],
        ["good-4", P384_PEM, "a"],
        ["good-1", EC_PEM, "b"],                     # same name, other values
        ["good-5", "", "a", "extra"],
        ["", "", "a"],
        ["good-6", RSA_PEM, "fine"],
    ])
    bad = dict(zip(("bad/name", "missing", "garbage", "p384", "clash", "extra", "empty"), starts[2:9]))

    code, out, err = backend("register", "--csv", str(fleet))

    assert code == 2 and out == ""
    lines = err.splitlines()
    expected = [
        f"line {bad['bad/name']}: 'bad/name' is not a valid thing name "
        "(letters, digits, ':', '_', '-'; 1-128 characters)",
        f"line {bad['missing']}: public_key of good-2 is not usable: "
        f"[Errno 2] No such file or directory: '{tmp_path / 'missing.pem'}'",
        f"line {bad['garbage']}: public_key of good-3 is not usable: ",  # the message is cryptography's
        f"line {bad['p384']}: public_key of good-4 is not usable: an EC signing key must be on P-256, not secp384r1",
        f"line {bad['clash']}: good-1 is also on line 2 with other values",
        f"line {bad['extra']}: 4 field(s), the header has 3",
        f"line {bad['empty']}: '' is not a valid thing name (letters, digits, ':', '_', '-'; 1-128 characters)",
    ]
    assert len(lines) == len(expected) + 1
    for line, want in zip(lines, expected):
        assert line.startswith(f"{fleet}: {want}") and (line == f"{fleet}: {want}" or want.endswith(": "))
    assert starts[2] == 3 + EC_PEM.count("\n")  # the file's line numbers, not row numbers (a PEM spans lines)
    assert lines[-1] == f"error: {fleet}: 7 bad row(s); nothing was written"
    assert list(backend.items()) == ["existing"]


def test_a_header_without_thing_name_is_refused(backend, tmp_path):
    fleet = tmp_path / "fleet.csv"
    write_csv(fleet, [["name", "site"], ["dev-1", "a"]])
    code, out, err = backend("register", "--csv", str(fleet))
    assert code == 2 and out == ""
    assert "line 1 must be a header with a thing_name column" in err and "name,site" in err


@pytest.mark.parametrize("argv", [("dev-1",), ("--prefix", "d", "--count", "2")])
def test_csv_with_names_or_prefix_is_refused(backend, tmp_path, argv):
    fleet = tmp_path / "fleet.csv"
    write_csv(fleet, [["thing_name"], ["dev-2"]])
    code, _, err = backend("register", "--csv", str(fleet), *argv)
    assert code == 2 and "one of them" in err


def test_a_missing_file_is_a_clear_error(backend, tmp_path):
    code, out, err = backend("register", "--csv", str(tmp_path / "nope.csv"))
    assert code == 2 and out == "" and "nope.csv: cannot read it" in err and "Traceback" not in err


# --- progress ---------------------------------------------------------------------------------------------------

def test_progress_when_not_a_terminal_is_plain_counts(backend, tmp_path):
    fleet = tmp_path / "fleet.csv"
    write_csv(fleet, [["thing_name"]] + [[f"dev-{i:03d}"] for i in range(260)])
    code, out, err = backend("register", "--csv", str(fleet))
    assert (code, err) == (0, "")
    assert out == "registered 260 new device(s); 0 already present\n"  # no bar, no carriage returns


@pytest.mark.parametrize("source", ["csv", "prefix"])
def test_a_terminal_gets_a_progress_bar_that_reaches_the_total(backend, tmp_path, monkeypatch, source):
    fleet = tmp_path / "fleet.csv"
    write_csv(fleet, [["thing_name"]] + [[f"dev-{i}"] for i in range(1, 261)])
    argv = ("--csv", str(fleet)) if source == "csv" else ("--prefix", "dev-", "--count", "260")
    terminal = TtyBuffer()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert admin.main([*backend.argv, "register", *argv]) == 0
    out = terminal.getvalue()
    assert "\r" in out and "100%" in out and "260/260" in out
    assert out.endswith("registered 260 new device(s); 0 already present\n")
    assert len(backend.items()) == 260


def test_without_tqdm_a_terminal_gets_plain_counts(backend, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as in the Lambda package, where tqdm is not installed
    terminal = TtyBuffer()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert admin.main([*backend.argv, "register", "--prefix", "dev-", "--count", "3"]) == 0
    assert terminal.getvalue() == "registered 3 new device(s); 0 already present\n"
