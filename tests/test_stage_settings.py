"""Settings.for_stage: a stage's settings outside Lambda, merged the way Chalice merges them."""
import json

import pytest

from chalicelib.config import Settings
from chalicelib.domain.errors import ConfigError


def write_config(tmp_path, config: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_stage_variables_override_the_top_level_ones_and_the_process_overrides_both(tmp_path):
    config = write_config(tmp_path, {
        "environment_variables": {"GIP_TABLE_NAME": "top", "GIP_CLAIM_LEASE_SECONDS": "30",
                                  "GIP_DEFAULT_REGION": "us-east-1"},
        "stages": {"prod": {"environment_variables": {"GIP_TABLE_NAME": "stage", "GIP_REGISTRY": "dynamodb"}}}})

    settings = Settings.for_stage("prod", environ={"GIP_DEFAULT_REGION": "eu-west-2", "PATH": "/bin"},
                                  config_file=config)

    assert settings.stage == "prod"
    assert settings.table_name == "stage"             # the stage's value wins over the top level
    assert settings.claim_lease_seconds == 30         # top-level only: kept
    assert settings.registry == "dynamodb"            # stage only: kept
    assert settings.default_region == "eu-west-2"     # GIP_* of the process environment wins over both


def test_state_dir_overrides_and_an_unknown_stage_is_a_config_error(tmp_path):
    config = write_config(tmp_path, {"stages": {"local": {}}})
    settings = Settings.for_stage("local", tmp_path / "state", environ={}, config_file=config)
    assert settings.state_dir == (tmp_path / "state").resolve()
    with pytest.raises(ConfigError, match="stage 'nope' is not in"):
        Settings.for_stage("nope", environ={}, config_file=config)


def test_the_project_config_has_the_two_stages():
    assert Settings.for_stage("prod", environ={}).registry == "dynamodb"
    local = Settings.for_stage("local", environ={})
    assert (local.stage, local.registry, local.trust_forwarded_for) == ("local", "sqlite", True)
