"""The operator CLI (admin.cli.main) against a temporary state directory; effects checked on disk."""
import argparse
import json
import os
import stat
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from admin import cli as admin
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, FLEET_PUBLIC_KEY_NAME, Settings
from chalicelib.container import Container
from chalicelib.domain.requests import ProvisioningRequest
from tests.conftest import LONDON_IP, make_csr, sign_v1


class Cli:
    def __init__(self, state_dir, capsys):
        self.state_dir = state_dir
        self._capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self._capsys.readouterr()  # drop anything printed before this command
        code = admin.main(["--state-dir", str(self.state_dir), *argv])
        out, err = self._capsys.readouterr()
        return code, out, err

    @property
    def registry_path(self):
        return self.state_dir / "registry.sqlite3"

    @property
    def private_key(self):
        return self.state_dir / "keys" / FLEET_PRIVATE_KEY_NAME

    @property
    def public_key(self):
        return self.state_dir / "keys" / FLEET_PUBLIC_KEY_NAME

    def registry(self) -> SqliteRegistry:
        return SqliteRegistry(self.registry_path)

    def names(self) -> list[str]:
        return [record.thing_name for record in self.registry().list()]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys) -> Cli:
    # Only --state-dir decides where the CLI looks: no GIP_* setting of the caller's shell leaks in.
    for name in [n for n in os.environ if n.startswith("GIP_")]:
        monkeypatch.delenv(name)
    yield Cli(tmp_path / "state", capsys)


# --- keygen -------------------------------------------------------------------------------------------

def test_keygen_writes_a_matching_key_pair_private_key_owner_only(cli):
    code, out, _ = cli("keygen")
    assert code == 0
    assert str(cli.private_key) in out and str(cli.public_key) in out
    private = serialization.load_pem_private_key(cli.private_key.read_bytes(), password=None)
    public = serialization.load_pem_public_key(cli.public_key.read_bytes())
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(cli.private_key.stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite_without_force(cli):
    assert cli("keygen")[0] == 0
    private_before, public_before = cli.private_key.read_bytes(), cli.public_key.read_bytes()
    code, out, err = cli("keygen")
    assert code == 2
    assert "--force" in err and str(cli.private_key) in err
    assert cli.private_key.read_bytes() == private_before
    assert cli.public_key.read_bytes() == public_before


def test_keygen_force_replaces_the_pair(cli):
    assert cli("keygen")[0] == 0
    private_before = cli.private_key.read_bytes()
    code, _, _ = cli("keygen", "--force")
    assert code == 0
    assert cli.private_key.read_bytes() != private_before
    private = serialization.load_pem_private_key(cli.private_key.read_bytes(), password=None)
    public = serialization.load_pem_public_key(cli.public_key.read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(cli.private_key.stat().st_mode) == 0o600


def test_keygen_force_makes_an_existing_readable_private_key_owner_only(cli):
    assert cli("keygen")[0] == 0
    cli.private_key.chmod(0o644)
    assert cli("keygen", "--force")[0] == 0
    assert stat.S_IMODE(cli.private_key.stat().st_mode) == 0o600


# --- init / register ------------------------------------------------------------------------------------

def test_init_creates_the_registry_and_is_safe_to_repeat(cli):
    assert not cli.registry_path.exists()
    code, out, _ = cli("init")
    assert code == 0 and str(cli.registry_path) in out
    assert cli.registry_path.exists()
    assert cli.names() == []  # the table exists and is empty
    assert cli("init")[0] == 0
    assert cli.names() == []


def test_register_names_reports_new_and_present_and_repeating_changes_nothing(cli):
    code, out, _ = cli("register", "dev-a", "dev_b", "thing:c", "dev-a")
    assert code == 0
    assert "registered 3 new" in out and "0 already present" in out
    assert cli.names() == ["dev-a", "dev_b", "thing:c"]
    assert all(record.status == "unprovisioned" for record in cli.registry().list())

    code, out, _ = cli("register", "dev-a", "dev-d")
    assert code == 0
    assert "registered 1 new" in out and "1 already present" in out
    assert cli.names() == ["dev-a", "dev-d", "dev_b", "thing:c"]

    before = list(cli.registry().list())
    code, out, _ = cli("register", "dev-a", "dev_b", "thing:c", "dev-d")
    assert code == 0 and "registered 0 new" in out and "4 already present" in out
    assert list(cli.registry().list()) == before


def test_register_with_prefix_count_and_start(cli):
    code, out, _ = cli("register", "--prefix", "sensor-", "--count", "3", "--start", "7")
    assert code == 0 and "registered 3 new" in out and "0 already present" in out
    assert cli.names() == ["sensor-7", "sensor-8", "sensor-9"]

    code, out, _ = cli("register", "--prefix", "sensor-", "--count", "4", "--start", "8")
    assert code == 0 and "registered 2 new" in out and "2 already present" in out
    assert sorted(cli.names()) == ["sensor-10", "sensor-11", "sensor-7", "sensor-8", "sensor-9"]

    code, out, _ = cli("register", "--prefix", "sensor-", "--count", "5", "--start", "7")
    assert code == 0 and "registered 0 new" in out and "5 already present" in out
    assert len(cli.names()) == 5


def test_register_prefix_start_defaults_to_one(cli):
    assert cli("register", "--prefix", "d", "--count", "2")[0] == 0
    assert cli.names() == ["d1", "d2"]


def test_a_name_of_128_characters_is_accepted(cli):
    assert cli("register", "x" * 128)[0] == 0
    assert cli.names() == ["x" * 128]


@pytest.mark.parametrize("bad", ["bad/name", "a+b", "", "x" * 129, "with space", "dévice"])
def test_invalid_names_are_refused_and_nothing_is_written(cli, bad):
    code, out, err = cli("register", "good-1", bad, "good-2")
    assert code == 2
    assert "not valid thing names" in err
    assert "registered" not in out
    assert not cli.registry_path.exists()  # refused before the registry is even opened


def test_invalid_names_on_an_existing_registry_add_nothing(cli):
    assert cli("register", "existing")[0] == 0
    assert cli("register", "new-1", "bad/name")[0] == 2
    assert cli.names() == ["existing"]


def test_an_invalid_prefix_is_refused(cli):
    code, _, err = cli("register", "--prefix", "bad/", "--count", "2")
    assert code == 2 and "bad/1" in err
    assert not cli.registry_path.exists()


def test_a_name_with_a_trailing_newline_is_refused(cli):
    code, _, err = cli("register", "dev\n")
    assert code == 2 and "not valid thing names" in err
    assert not cli.registry_path.exists()


def test_names_and_prefix_together_are_refused(cli):
    code, _, err = cli("register", "dev-a", "--prefix", "d", "--count", "2")
    assert code == 2 and "not both" in err
    assert not cli.registry_path.exists()


@pytest.mark.parametrize("argv", [("--prefix", "d"), ("--prefix", "d", "--count", "0")])
def test_prefix_without_a_positive_count_is_refused(cli, argv):
    code, _, err = cli("register", *argv)
    assert code == 2 and "--count" in err
    assert not cli.registry_path.exists()


def test_register_with_nothing_to_register_is_refused(cli):
    code, _, err = cli("register")
    assert code == 2 and err.startswith("error:")


# --- list / show ----------------------------------------------------------------------------------------

def test_list_prints_a_table_and_filters_by_status(cli):
    assert cli("register", "dev-b", "dev-a", "dev-c")[0] == 0
    cli.registry().claim("dev-c", datetime.now(timezone.utc), 300)  # a request in flight

    code, out, _ = cli("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["thing_name", "prov_status", "aws_region", "prov_datetime"]
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["dev-a", "unprovisioned"], ["dev-b", "unprovisioned"], ["dev-c", "provisioning"]]
    assert lines[1].split()[2:] == ["-", "-"]  # missing attributes shown as '-'
    assert lines[-1] == "(3 device(s))"

    code, out, _ = cli("list", "--status", "provisioning")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["dev-c"]
    assert out.splitlines()[-1] == "(1 device(s))"

    code, out, _ = cli("list", "--status", "provisioned")
    assert code == 0 and out.splitlines()[-1] == "(0 device(s))"


def test_list_json_is_parseable(cli):
    assert cli("register", "dev-b", "dev-a")[0] == 0
    code, out, _ = cli("list", "--json")
    assert code == 0
    assert json.loads(out) == [{"thing_name": "dev-a", "prov_status": "unprovisioned"},
                               {"thing_name": "dev-b", "prov_status": "unprovisioned"}]
    code, out, _ = cli("list", "--json", "--status", "provisioned")
    assert code == 0 and json.loads(out) == []


def test_list_refuses_an_unknown_status(cli):
    with pytest.raises(SystemExit) as exit_:
        cli("list", "--status", "done")
    assert exit_.value.code == 2


def _provisioned(cli, name, region, expires):
    registry = cli.registry()
    claim = registry.claim(name, datetime.now(timezone.utc), 300)
    registry.finalize(claim, region, f"cert-{name}", datetime.now(timezone.utc), expires=expires)


def test_list_by_region_finds_devices_in_a_region_disabled_since(cli, monkeypatch):
    assert cli("register", "dev-a", "dev-b", "dev-c")[0] == 0
    _provisioned(cli, "dev-a", "eu-west-2", "2030-01-01T00:00:00Z")
    _provisioned(cli, "dev-b", "us-west-1", "2030-01-01T00:00:00Z")  # a region the stage enabled then
    monkeypatch.setenv("GIP_ENABLED_REGIONS", "eu-west-2,us-east-1")
    monkeypatch.setenv("GIP_DEFAULT_REGION", "eu-west-2")
    code, out, err = cli("list", "--region", "us-west-1")
    assert code == 0 and err == ""
    assert [line.split()[:3] for line in out.splitlines()[1:-1]] == [["dev-b", "provisioned", "us-west-1"]]
    code, out, _ = cli("list", "--region", "us-east-1")  # enabled, nobody there yet: an empty list, no error
    assert code == 0 and out.splitlines()[-1] == "(0 device(s))"


def test_list_expiring_within_zero_days_lists_what_has_expired(cli):
    assert cli("register", "dev-a", "dev-b")[0] == 0
    _provisioned(cli, "dev-a", "eu-west-2", "2020-01-01T00:00:00Z")
    _provisioned(cli, "dev-b", "eu-west-2", "2999-01-01T00:00:00Z")
    code, out, _ = cli("list", "--expiring-within", "0", "--json")
    assert code == 0
    assert [(item["thing_name"], item["certificate_expires"]) for item in json.loads(out)] == [
        ("dev-a", "2020-01-01T00:00:00Z")]


@pytest.mark.parametrize("argv", [("list",), ("show", "dev-a")])
def test_list_and_show_before_init_do_not_crash(cli, argv):
    code, out, err = cli(*argv)
    assert (code == 0 and "(0 device(s))" in out) or (code == 2 and err.startswith("error:"))


def test_show_prints_the_item_like_the_samples_get_item(cli):
    assert cli("register", "dev-a")[0] == 0
    code, out, _ = cli("show", "dev-a")
    assert code == 0
    assert json.loads(out) == {"thing_name": "dev-a", "prov_status": "unprovisioned", "attempts": 0}


def test_show_unknown_name_is_an_error_on_stderr(cli):
    assert cli("register", "dev-a")[0] == 0
    code, out, err = cli("show", "ghost")
    assert code == 2
    assert out == ""
    assert "ghost" in err and "not registered" in err


def test_show_and_list_after_a_real_provisioning(cli):
    assert cli("keygen")[0] == 0
    assert cli("register", "dev-a", "dev-b")[0] == 0
    fleet_key = serialization.load_pem_private_key(cli.private_key.read_bytes(), password=None)
    # The service built from the same stage settings the CLI reads: both must look at the same files.
    service = Container(Settings.for_stage("local", str(cli.state_dir))).provisioning
    csr_pem, _ = make_csr("dev-a")
    result = service.provision(ProvisioningRequest.from_body(
        {"thing-name": "dev-a", "thing-name-sig": sign_v1(fleet_key, "dev-a"), "CSR": csr_pem}), LONDON_IP)

    code, out, _ = cli("show", "dev-a")
    assert code == 0
    item = json.loads(out)
    assert item["prov_status"] == "provisioned" and item["aws_region"] == "eu-west-2"
    assert item["certificate_id"] == result.issued.certificate_id
    assert item["certificate"]["certificate_id"] == result.issued.certificate_id
    assert item["certificate"]["status"] == "ACTIVE"
    assert item["certificate"]["region"] == "eu-west-2"
    assert item["certificate"]["thing_name"] == "dev-a"

    code, out, _ = cli("list", "--status", "provisioned")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert [row[:3] for row in rows] == [["dev-a", "provisioned", "eu-west-2"]]
    assert rows[0][3] == item["prov_datetime"]

    code, out, _ = cli("list", "--status", "unprovisioned")
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["dev-b"]

    code, out, _ = cli("show", "dev-b")
    assert "certificate" not in json.loads(out)


# --- help and stages -----------------------------------------------------------------------------------

def _subcommands() -> list[str]:
    action = next(a for a in admin.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_the_cli_has_the_commands_this_file_tests():
    assert {"keygen", "init", "register", "list", "show"} <= set(_subcommands())


@pytest.mark.parametrize("argv", [[]] + [[name] for name in _subcommands()], ids=lambda a: " ".join(a) or "top")
def test_help_exits_zero_and_prints_usage(cli, capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        admin.main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m admin")
    if argv:
        assert f"admin {argv[0]}" in out.splitlines()[0]
    else:
        assert all(name in out for name in _subcommands())


def test_no_command_is_a_usage_error(cli):
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2


def test_unknown_stage_is_refused_with_a_clear_message(cli):
    code, out, err = cli("--stage", "nope", "init")
    assert code == 2
    assert err.startswith("error:") and "'nope'" in err and "local" in err and "prod" in err
    assert "Traceback" not in err
    assert not cli.registry_path.exists()
