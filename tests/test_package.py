"""`chalice package --stage prod`: the template deploys what the code needs, nothing broader, no secrets.

Chalice fetches Lambda-platform wheels from the package index; everything else is offline.
"""
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from chalicelib.config import PROJECT_DIR


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("package") / "out"
    env = {**os.environ, "AWS_DEFAULT_REGION": "eu-west-2", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    chalice = str(Path(sys.executable).with_name("chalice"))
    result = subprocess.run([chalice, "package", "--stage", "prod", str(out)], cwd=PROJECT_DIR, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "sam.json").read_text()), out / "deployment.zip"


def resources_of_type(template, kind):
    return [r for r in template["Resources"].values() if r["Type"] == kind]


def test_template_has_the_routes(package):
    template, _ = package
    paths = resources_of_type(template, "AWS::Serverless::Api")[0]["Properties"]["DefinitionBody"]["paths"]
    assert "post" in paths["/device-provisioning"] and "get" in paths["/health"]


def test_lambda_gets_the_prod_stage_environment(package):
    template, _ = package
    function = resources_of_type(template, "AWS::Serverless::Function")[0]["Properties"]
    config = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())
    assert function["Environment"]["Variables"] == config["stages"]["prod"]["environment_variables"]
    assert function["Environment"]["Variables"]["GIP_TRUST_FORWARDED_FOR"] == "false"


def test_role_policy_is_exactly_the_policy_file(package):
    template, _ = package
    roles = resources_of_type(template, "AWS::IAM::Role")
    assert len(roles) == 1
    policies = roles[0]["Properties"]["Policies"]
    assert len(policies) == 1
    assert policies[0]["PolicyDocument"] == json.loads((PROJECT_DIR / ".chalice" / "policy-prod.json").read_text())


def test_zip_is_small_and_holds_no_secret(package):
    _, zip_path = package
    assert zip_path.stat().st_size < 50 * 1024 * 1024
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        assert "app.py" in names and "chalicelib/provisioning.py" in names
        assert not [n for n in names if n.startswith((".state", "tests/", "device/", "devstack/", "bench/"))]
        private = re.compile(rb"-----BEGIN (RSA |EC |ENCRYPTED )?PRIVATE KEY-----")
        leaked = [n for n in names if n.endswith((".pem", ".key", ".py", ".json"))
                  and private.search(archive.read(n))]
        assert leaked == []
