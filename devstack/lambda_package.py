"""The prod stage's Lambda package with bytecode: `chalice package`, then compiled and trimmed in chalice's cache.

    python -m devstack.lambda_package [--stage prod] [--deploy] [OUT]      (make package, make deploy)

Chalice installs the dependencies' wheels without compiling them, and Lambda's /var/task is read-only, so
without this every cold start compiles botocore, cryptography, chalice and our modules in memory (the
runtime's own boto3 ships compiled). This step:
1. runs `chalice package --stage prod OUT`, which builds the zip into chalice's cache
   (.chalice/deployments/<hash of requirements.txt and the app's files>-python3.X.zip);
2. rewrites that zip: drops any __pycache__ chalice copied from chalicelib/, drops botocore's data for the
   services the function never calls (all but those of iam_policy.ACTIONS: 15 MiB zipped of 400 services),
   and adds bytecode for every module, compiled by this interpreter (the runtime chalice chose is this
   Python's version, checked) as unchecked-hash pycs: valid whatever the files' times after unzipping, and
   read from __pycache__ by the runtime without writing anything;
3. copies the result to OUT/deployment.zip; with --deploy, runs `chalice deploy --stage prod`, which reuses the
   cached zip (its hash is of the inputs, which have not changed) and uploads it inline.
"""
import argparse
import compileall
import hashlib
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from chalicelib.config import PROJECT_DIR

ZIP_LIMIT = 50 * 1024 * 1024        # chalice uploads the function's zip inline: at most 50 MiB
UNZIPPED_LIMIT = 250 * 1000 * 1000  # Lambda unpacks at most 250 MB (function and layers)
REUSED = "Reusing existing deployment package."


class PackageError(Exception):
    pass


def kept_botocore_services() -> set[str]:
    """The AWS services the function calls: botocore keeps their data (endpoint rules), drops the others'."""
    from admin import iam_policy, lean_models
    return set(lean_models.operations(list(iam_policy.ACTIONS)))


def _dropped(name: str, services: set[str]) -> bool:
    if "/__pycache__/" in f"/{name}" or name.endswith((".pyc", ".pyo")):
        return True  # whatever chalice copied from a working tree; compiled again below
    parts = name.split("/")
    # botocore/data/<service>/<version>/...: services only (the top-level files are endpoints and defaults)
    return parts[:2] == ["botocore", "data"] and len(parts) > 3 and parts[2] not in services


def rebuild(zip_path: Path, runtime: str) -> dict:
    """Rewrite `zip_path` in place: trimmed and compiled (see the module's docstring). Returns its sizes."""
    this = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if runtime != this:
        raise PackageError(f"the function's runtime is {runtime} but this is {this}: bytecode is per Python "
                           f"version; run this with {runtime} (chalice chooses the runtime from its own Python)")
    services = kept_botocore_services()
    with tempfile.TemporaryDirectory(prefix="lambda-package-") as tmp:
        root = Path(tmp) / "package"
        kept: list[zipfile.ZipInfo] = []
        with zipfile.ZipFile(zip_path) as original:
            for info in original.infolist():
                if not _dropped(info.filename, services):
                    original.extract(info, root)
                    kept.append(info)
        # quiet=1: errors only. A file that does not compile (a template, another Python's syntax) is listed
        # and left as source: it would fail the same way if the function ever imported it.
        compileall.compile_dir(str(root), ddir="/var/task", quiet=1, optimize=0, workers=0,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        compiled = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.pyc"))
        staged = zip_path.with_suffix(".rebuilt")
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for info in kept:
                if not info.is_dir():
                    out.writestr(info, (root / info.filename).read_bytes(), compress_type=zipfile.ZIP_DEFLATED,
                                 compresslevel=9)
            for name in compiled:
                entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                entry.external_attr = 0o100644 << 16
                out.writestr(entry, (root / name).read_bytes(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        staged.replace(zip_path)
    return sizes(zip_path)


# What a cold container runs before its first request, in a fresh interpreter isolated from this venv (-I -S:
# only the unzipped package and the standard library) that writes no bytecode (-B, as on a read-only
# /var/task): the app with the prod stage's settings, the service built (botocore, its three lean clients,
# cryptography, the geolocation database), the IoT client made. It reports its CPU time and every module
# file of the package it had to compile (the audit event `compile`, raised by the import system's compile of
# a source file; a module loaded from its pyc raises none).
PROBE = """import sys, time
c0 = time.process_time()
root = sys.argv[1]
sys.path.insert(0, root)
compiled = []
sys.addaudithook(lambda event, args: event == "compile" and isinstance(args[1], str)
                 and args[1].startswith(root) and compiled.append(args[1][len(root) + 1:]))
import json
import app
app.container.provisioning
app.container.aws.client("iot", "eu-west-2")

cpu = time.process_time() - c0
from_package = [m for m in list(sys.modules.values()) if (getattr(m, "__file__", None) or "").startswith(root)]
sources = [m for m in from_package if m.__file__.endswith(".py")]
cached = [m for m in sources if m.__cached__ and __import__("os").path.exists(m.__cached__)]
import botocore, boto3
print(json.dumps({"cpu_ms": cpu * 1000, "compiled": compiled, "sources": len(sources), "from_pyc": len(cached),
                  "botocore": botocore.__version__, "botocore_file": botocore.__file__}))
"""


def unzip(zip_path: Path, into: Path, bytecode: bool = True) -> Path:
    """The package as Lambda unpacks it, read-only; without bytecode when `bytecode` is false."""
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(into, [n for n in archive.namelist() if bytecode or "__pycache__/" not in n])
    for path in [into, *into.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    return into


def probe(root: Path, env: dict[str, str]) -> dict:
    """PROBE run on an unzipped package (`env`: the prod stage's environment variables, AWS settings)."""
    out = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", PROBE, str(root)], env=env, cwd=root,
                         capture_output=True, text=True)
    if out.returncode:
        raise PackageError(f"the package at {root} does not start:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def lambda_env(project: Path = PROJECT_DIR, stage: str = "prod") -> dict[str, str]:
    """The function's environment as the template sets it, plus what Lambda itself sets (no AWS call is made)."""
    config = json.loads((project / ".chalice" / "config.json").read_text())
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AWS_LAMBDA_FUNCTION_NAME": "lambda-package-probe",
            "AWS_DEFAULT_REGION": "eu-west-2", "AWS_REGION": "eu-west-2", "AWS_ACCESS_KEY_ID": "probe",
            "AWS_SECRET_ACCESS_KEY": "probe", **config.get("environment_variables", {}),
            **config["stages"][stage].get("environment_variables", {})}


def sizes(zip_path: Path) -> dict:
    with zipfile.ZipFile(zip_path) as archive:
        unzipped = sum(info.file_size for info in archive.infolist())
    zipped = zip_path.stat().st_size
    return {"zip": str(zip_path), "zipped_mib": round(zipped / 2**20, 2), "unzipped_mb": round(unzipped / 1e6, 1),
            "zip_headroom_mib": round((ZIP_LIMIT - zipped) / 2**20, 2),
            "unzipped_headroom_mb": round((UNZIPPED_LIMIT - unzipped) / 1e6, 1)}


def _cached_zip(project: Path, built: Path) -> Path:
    """The file in chalice's cache that `chalice package` copied to OUT (same bytes)."""
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    for candidate in sorted((project / ".chalice" / "deployments").glob("*.zip")):
        if candidate.stat().st_size == built.stat().st_size \
                and hashlib.sha256(candidate.read_bytes()).hexdigest() == digest:
            return candidate
    raise PackageError(f"chalice's cached copy of {built} was not found under {project}/.chalice/deployments")


def _chalice(project: Path, *args: str) -> subprocess.CompletedProcess:
    chalice = str(Path(sys.executable).with_name("chalice"))
    # No bytecode written into chalicelib/ by chalice's import of the app: chalice hashes those files too, and
    # the deploy must find the same hash as the package.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([chalice, *args], cwd=project, env=env, capture_output=True, text=True)
    if result.returncode:
        raise PackageError(f"chalice {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def build(out: Path, stage: str = "prod", project: Path = PROJECT_DIR) -> dict:
    print(f"lambda_package: chalice package --stage {stage} {out} (downloads the Lambda wheels once)", flush=True)
    _chalice(project, "package", "--stage", stage, str(out))
    built = out / "deployment.zip"
    cached = _cached_zip(project, built)
    template = json.loads((out / "sam.json").read_text())
    [runtime] = {r["Properties"]["Runtime"] for r in template["Resources"].values()
                 if r["Type"] == "AWS::Serverless::Function"}
    print(f"lambda_package: compiling {runtime} bytecode into {cached.relative_to(project)}", flush=True)
    result = rebuild(cached, runtime)
    shutil.copyfile(cached, built)
    result["zip"] = str(built)
    if result["zip_headroom_mib"] < 0 or result["unzipped_headroom_mb"] < 0:
        raise PackageError(f"the package is past Lambda's limits: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="build/lambda", help="where sam.json and deployment.zip go "
                        "(default build/lambda)")
    parser.add_argument("--stage", default="prod")
    parser.add_argument("--deploy", action="store_true",
                        help="then `chalice deploy --stage STAGE`, which uploads this package")
    args = parser.parse_args(argv)
    try:
        result = build(Path(args.out).resolve(), args.stage)
        print(json.dumps(result, indent=2))
        if args.deploy:
            print(f"lambda_package: chalice deploy --stage {args.stage}", flush=True)
            deployed = _chalice(PROJECT_DIR, "deploy", "--stage", args.stage)
            print(deployed.stdout, end="")
            if REUSED not in deployed.stdout + deployed.stderr:
                raise PackageError("chalice deploy built its own package instead of reusing this one (a file "
                                   "changed in between?): the function runs without bytecode; run it again")
    except PackageError as exc:
        print(f"lambda_package: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
