"""The operator CLI's errors are one line an operator can act on, never a traceback, and never a side effect."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from admin import cli as admin
from chalicelib.config import PROJECT_DIR


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("GIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    yield tmp_path


@pytest.mark.parametrize("argv", [["list"], ["init"], ["register", "mydevice1"], ["where", "81.2.69.142"],
                                  ["stats"], ["keygen"]])
def test_prod_without_an_aws_region_says_how_to_set_it(clean_env, argv):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")}
    env.update(AWS_CONFIG_FILE=str(clean_env / "none"), AWS_SHARED_CREDENTIALS_FILE=str(clean_env / "none"),
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run([sys.executable, "-m", "admin", "--stage", "prod", *argv], cwd=PROJECT_DIR,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2  # a setup problem, as the README says
    assert result.stderr.splitlines() == [
        "error: no AWS region: set one with `export AWS_DEFAULT_REGION=eu-west-2` (the region of the table and the "
        "API), or `aws configure`"]
    assert not (clean_env / "xdg" / "iot-global-provisioning" / "prod" / "keys").exists()  # keygen wrote nothing


@pytest.mark.parametrize("address", ["notanip", "81.2.69", "999.1.1.1", ""])
def test_where_refuses_what_is_not_an_ip_address(clean_env, capsys, address):
    with pytest.raises(SystemExit) as exit_:
        admin.main(["where", address])
    assert exit_.value.code == 2
    assert "not an IPv4 or IPv6 address" in capsys.readouterr().err


def test_where_answers_for_an_ipv6_address_too(clean_env, capsys):
    assert admin.main(["where", "2001:4860:4860::8888"]) == 0
    assert json.loads(capsys.readouterr().out)["region"]


@pytest.mark.parametrize("argv", [["list"], ["stats"], ["show", "mydevice1"], ["reset", "mydevice1"], ["audit"]])
def test_a_mistyped_state_dir_is_an_error_not_a_new_empty_registry(clean_env, capsys, argv):
    typo = clean_env / "stat-dir"
    assert admin.main(["--state-dir", str(typo), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no registry at {typo / 'registry.sqlite3'}") and "init" in err
    assert not typo.exists()


@pytest.mark.parametrize("argv", [["init"], ["register", "mydevice1"]])
def test_init_and_register_create_the_registry(clean_env, capsys, argv):
    state = clean_env / "new-state"
    assert admin.main(["--state-dir", str(state), *argv]) == 0
    assert (state / "registry.sqlite3").is_file()
    assert admin.main(["--state-dir", str(state), "list"]) == 0


def test_list_sorts_names_naturally(clean_env, capsys):
    state = str(clean_env / "state")
    assert admin.main(["--state-dir", state, "register", "--prefix", "mydevice", "--count", "12"]) == 0
    assert admin.main(["--state-dir", state, "register", "sensor-b2", "sensor-a10", "sensor-a9"]) == 0
    expected = [f"mydevice{i}" for i in range(1, 13)] + ["sensor-a9", "sensor-a10", "sensor-b2"]
    capsys.readouterr()
    assert admin.main(["--state-dir", state, "list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]] == expected
    for fmt in ("--json", "--csv"):
        assert admin.main(["--state-dir", state, "list", fmt]) == 0
        out = capsys.readouterr().out
        names = ([item["thing_name"] for item in json.loads(out)] if fmt == "--json"
                 else [line.split(",")[0] for line in out.splitlines()[1:]])
        assert names == expected


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in admin.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_commands_help_says_what_it_does(name, capsys):
    with pytest.raises(SystemExit):
        admin.main([name, "--help"])
    lines = capsys.readouterr().out.split("\n\n")
    assert lines[0].startswith(f"usage: python -m admin {name}")
    assert lines[1].strip() and not lines[1].startswith(("positional arguments", "options")), lines[1]


def test_the_top_help_names_the_state_directory(clean_env, capsys):
    with pytest.raises(SystemExit):
        admin.main(["--help"])
    assert str(clean_env / "xdg" / "iot-global-provisioning") in " ".join(capsys.readouterr().out.split())


def _usage_error(capsys, argv) -> str:
    """argparse's refusal: exit 2 and its last line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        admin.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_an_unknown_status_is_named_with_the_statuses_not_an_internal_type(clean_env, capsys):
    line = _usage_error(capsys, ["list", "--status", "bogus"])
    assert line == ("python -m admin list: error: argument --status: not a device status: 'bogus' "
                    "(choose from unprovisioned, provisioning, provisioned)")
    assert "DeviceStatus" not in line


@pytest.mark.parametrize("days", ["-1", "-0.5", "nan", "inf", "1e7"])
def test_expiring_within_refuses_what_is_not_a_number_of_days_ahead(clean_env, capsys, days):
    line = _usage_error(capsys, ["list", "--expiring-within", days])
    assert line == (f"python -m admin list: error: argument --expiring-within: a number of days from 0 to "
                    f"{admin.MAX_DAYS} is expected, not '{days}'")


def test_expiring_within_refuses_what_is_not_a_number(clean_env, capsys):
    assert _usage_error(capsys, ["list", "--expiring-within", "soon"]).endswith(
        "argument --expiring-within: not a number of days: 'soon'")


@pytest.mark.parametrize("region", ["eu-wset-2", "us-west-1", ""])  # a typo; a real region this stage does not use
def test_list_refuses_a_region_the_stage_does_not_have_naming_the_enabled_ones(clean_env, capsys, monkeypatch,
                                                                              region):
    monkeypatch.setenv("GIP_ENABLED_REGIONS", "eu-west-2,us-east-1")
    monkeypatch.setenv("GIP_DEFAULT_REGION", "eu-west-2")
    state = str(clean_env / "state")
    assert admin.main(["--state-dir", state, "register", "dev-a"]) == 0
    capsys.readouterr()
    assert admin.main(["--state-dir", state, "list", "--region", region]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"error: --region {region}: not an enabled region of the local stage, and no device is in it; "
                   "the enabled regions: eu-west-2, us-east-1\n")
