"""`chalice package --stage prod` from a clean copy of the project: the template deploys what the code needs,
nothing broader, no secrets, the SDK the tests ran, within Lambda's size limits. Then what `make package`
ships (devstack/lambda_package.py: chalice's package trimmed and compiled): within Lambda's limits, and a
cold start from it, unzipped read-only, compiles nothing.

Chalice fetches Lambda-platform wheels from the package index; everything else is offline.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from chalicelib.config import PROJECT_DIR


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    # What a clean clone holds (tracked and new files, as git would commit them): no .state, no __pycache__,
    # which chalice would otherwise copy from chalicelib/ as it finds it.
    clone = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_DIR,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (PROJECT_DIR / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_DIR / name, clone / name)
    return clone


@pytest.fixture(scope="module")
def package(clone, tmp_path_factory):
    out = tmp_path_factory.mktemp("package") / "out"
    env = {**os.environ, "AWS_DEFAULT_REGION": "eu-west-2", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "PYTHONDONTWRITEBYTECODE": "1"}
    chalice = str(Path(sys.executable).with_name("chalice"))
    result = subprocess.run([chalice, "package", "--stage", "prod", str(out)], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "sam.json").read_text()), out / "deployment.zip"


@pytest.fixture(scope="module")
def built(clone, package, tmp_path_factory):
    """`make package` in the same clone, after the plain package (whose chalice cache it reuses and rewrites)."""
    out = tmp_path_factory.mktemp("built") / "out"
    env = {**os.environ, "AWS_DEFAULT_REGION": "eu-west-2", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    result = subprocess.run([sys.executable, "-m", "devstack.lambda_package", str(out)], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=900)
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


@pytest.mark.parametrize("which", ["package", "built"])
def test_zip_holds_no_operator_code_and_no_map_data(which, request):
    """The function never imports the operator's tools (admin/: CLI, use cases, report, world map, IAM policy and
    lean-model generators): they stay out of its package (size, attack surface)."""
    _, zip_path = request.getfixturevalue(which)
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert not [n for n in names if n.startswith("admin/") or "world-countries" in n or "worldmap" in n]
    ours = {n.split("/")[0] for n in names if n.endswith(".py") and (n == "app.py" or n.startswith("chalicelib/"))}
    assert ours == {"app.py", "chalicelib"}


@pytest.mark.parametrize("which", ["package", "built"])
def test_zip_holds_no_secret(which, request):
    _, zip_path = request.getfixturevalue(which)
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        assert "app.py" in names and "chalicelib/services/provisioning.py" in names
        assert not [n for n in names if n.startswith((".state", "tests/", "device/", "devstack/", "bench/"))]
        private = re.compile(rb"-----BEGIN (RSA |EC |ENCRYPTED )?PRIVATE KEY-----")
        leaked = [n for n in names if n.endswith((".pem", ".key", ".py", ".json"))
                  and private.search(archive.read(n))]
        assert leaked == []


@pytest.mark.parametrize("which", ["package", "built"])
def test_the_sdk_inside_is_the_one_the_tests_ran_and_sizes_fit_lambda(which, request):
    """Both fit: `make deploy` uploads the built zip, a plain `chalice deploy --stage prod` the other."""
    _, zip_path = request.getfixturevalue(which)
    # Chalice uploads the zip inline: at most 50 MiB; Lambda unpacks at most 250 MB (function and layers).
    zipped = zip_path.stat().st_size
    assert zipped <= 50 * 1024 * 1024, (
        f"{which}: {zipped / 2**20:.1f} MiB, past the 50 MiB chalice deploy uploads inline"
        + (": a plain `chalice deploy --stage prod` no longer works; `make deploy` (README) does while its zip fits"
           if which == "package" else ""))
    with zipfile.ZipFile(zip_path) as archive:
        unzipped = sum(info.file_size for info in archive.infolist())
        assert unzipped <= 250 * 1000 * 1000, f"{which}: {unzipped / 1e6:.0f} MB unzipped, past Lambda's 250 MB"
        for package_name, dist in (("botocore", "botocore"), ("boto3", "boto3")):
            text = archive.read(f"{package_name}/__init__.py").decode()
            assert f"__version__ = '{version(dist)}'" in text, package_name
        names = archive.namelist()
    # what the function never uses stays out
    assert not [n for n in names if n.startswith("aws_lambda_powertools") or "swagger" in n.lower()]
    assert "chalicelib/adapters/botocore_models/iot/2015-05-28/service-2.json" in names


def test_plain_package_takes_no_bytecode_from_the_working_tree(package):
    _, zip_path = package
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert not [n for n in names if n.startswith(("chalicelib/", "app.py")) and ("__pycache__" in n or n.endswith(".pyc"))]


def _pyc_of(name: str) -> str:
    folder, _, file = name.rpartition("/")
    return f"{folder}/__pycache__/{file[:-3]}.{sys.implementation.cache_tag}.pyc".lstrip("/")


def test_built_package_has_unchecked_bytecode_for_the_runtime_for_every_module(built):
    template, zip_path = built
    [function] = resources_of_type(template, "AWS::Serverless::Function")
    # bytecode is per Python version: the runtime chalice chose is the one that compiled it (this one)
    assert function["Properties"]["Runtime"] == f"python{sys.version_info.major}.{sys.version_info.minor}"
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
        sources = sorted(n for n in names if n.endswith(".py"))
        assert {"app.py", "chalicelib/container.py", "botocore/client.py", "cryptography/x509/base.py"} <= set(sources)
        assert [n for n in sources if _pyc_of(n) not in names] == []
        headers = {archive.read(_pyc_of(n))[:8] for n in sources}
    # PEP 552: the magic number of this (the runtime's) Python; flags 0b01 = checked by hash, never against
    # the source (so neither the zip's times nor a read-only /var/task matter)
    assert headers == {importlib.util.MAGIC_NUMBER + (0b01).to_bytes(4, "little")}
    assert not [n for n in names if n.endswith(".pyc") and "__pycache__/" not in n]


def test_chalice_reuses_the_built_package_so_chalice_deploy_uploads_it(clone, built, tmp_path):
    """`make deploy` runs `chalice deploy --stage prod` after the build: chalice builds (or reuses) its package
    the same way for `package` and `deploy`, so a second `chalice package` shows what deploy would upload."""
    _, zip_path = built
    env = {**os.environ, "AWS_DEFAULT_REGION": "eu-west-2", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "PYTHONDONTWRITEBYTECODE": "1"}
    chalice = str(Path(sys.executable).with_name("chalice"))
    result = subprocess.run([chalice, "package", "--stage", "prod", str(tmp_path / "again")], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    from devstack.lambda_package import REUSED
    assert REUSED in result.stdout + result.stderr
    assert (tmp_path / "again" / "deployment.zip").read_bytes() == zip_path.read_bytes()


def test_built_package_keeps_botocore_data_of_the_function_services_only(built):
    from admin import iam_policy, lean_models
    _, zip_path = built
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    services = {n.split("/")[2] for n in names if n.startswith("botocore/data/") and n.count("/") > 2}
    assert services == set(lean_models.operations(list(iam_policy.ACTIONS))) == {"dynamodb", "iot", "ssm"}
    assert {"botocore/data/endpoints.json", "botocore/data/partitions.json", "botocore/data/_retry.json",
            "botocore/data/sdk-default-configuration.json"} <= set(names)


def test_a_cold_start_from_the_built_package_unzipped_read_only_compiles_nothing(built, tmp_path):
    """The app imported and the service built (botocore, the lean clients, cryptography, the geolocation
    database) in an interpreter that sees only the package and the standard library and writes no bytecode.
    The same package without its __pycache__ compiles every module: the check can fail."""
    from devstack import lambda_package
    _, zip_path = built
    env = lambda_package.lambda_env()
    with_bytecode = lambda_package.probe(lambda_package.unzip(zip_path, tmp_path / "with"), env)
    without = lambda_package.probe(lambda_package.unzip(zip_path, tmp_path / "without", bytecode=False), env)
    assert with_bytecode["compiled"] == []
    assert with_bytecode["sources"] > 150 and with_bytecode["from_pyc"] == with_bytecode["sources"]
    assert {"app.py", "chalicelib/container.py", "botocore/client.py"} <= set(without["compiled"])
    assert without["from_pyc"] == 0
    for run, root in ((with_bytecode, tmp_path / "with"), (without, tmp_path / "without")):
        assert run["botocore"] == version("botocore") and run["botocore_file"].startswith(str(root))
    assert not [p for p in (tmp_path / "without").rglob("__pycache__")]  # nothing written


def test_pinned_sdk_is_what_is_installed():
    pins = dict(line.split("#")[0].strip().split("==") for line in
                (PROJECT_DIR / "requirements.txt").read_text().splitlines() if "==" in line.split("#")[0])
    assert pins["boto3"] == version("boto3") and pins["botocore"] == version("botocore")


def test_template_policy_scopes_destructive_iot_actions_to_the_enabled_regions(package):
    template, _ = package
    [role] = resources_of_type(template, "AWS::IAM::Role")
    regions = set(json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]
                  ["environment_variables"].get("GIP_ENABLED_REGIONS", "").split(",")) - {""}
    from chalicelib.domain.regions import SAMPLE_REGIONS
    regions = regions or set(SAMPLE_REGIONS)
    for statement in role["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if any(a.startswith(("iot:Delete", "iot:Detach", "iot:Update")) for a in statement["Action"]):
            assert "*" not in resources
            assert {arn.split(":")[3] for arn in resources} == regions
        if any(a.startswith("logs:") for a in statement["Action"]):
            assert all(":log-group:/aws/lambda/" in arn for arn in resources)
