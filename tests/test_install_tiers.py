"""The Makefile's two install tiers: `make demo` and `make local` install requirements-local.txt only, and that is
enough for everything they run; `make test` adds requirements-dev.txt on top, without rebuilding the virtualenv.

The tiers are read from the installed packages' metadata (tests/tiers.py); tests/test_demo.py runs `make demo` with
the local tier's view of the packages.
"""
import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

from chalicelib.config import PROJECT_DIR
from tests.tiers import PROJECT_PACKAGES, VENV_SEED, closure, local_tier, requirements

# What `make demo` and `make local` run, and what their users run beside them (the operator CLI, the device client);
# chalice local loads app.py. Every module these import, at any depth and inside functions too, is followed.
ENTRY_POINTS = ["devstack/demo.py", "devstack/local.py", "devstack/chalice_local.py", "app.py",
                "device/global_device.py", *sorted(str(p.relative_to(PROJECT_DIR)) for p in
                                                    (PROJECT_DIR / "admin").glob("*.py"))]
BUDGET = 45  # packages in the virtualenv of `make demo`, pip and setuptools included (issue 28)


def module_file(name: str) -> Path | None:
    base = PROJECT_DIR.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, wherever the statement is (function bodies included): `from a import b` gives
    a and, when b is a module of ours, a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if module_file(f"{node.module}.{alias.name}"))
    return found


def third_party_imports(entry_points: list[str]) -> dict[str, set[str]]:
    """Top-level third-party module -> the project files that import it, over the modules reachable from the entries."""
    pending = [PROJECT_DIR / entry for entry in entry_points]
    seen: set[Path] = set()
    found: dict[str, set[str]] = {}
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path):
            top = name.partition(".")[0]
            if top in PROJECT_PACKAGES:
                parts = name.split(".")
                pending += [f for f in (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f]
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault(top, set()).add(str(path.relative_to(PROJECT_DIR)))
    return found


def test_everything_make_demo_and_make_local_import_comes_with_the_local_tier():
    tier = local_tier() | VENV_SEED
    providers = importlib.metadata.packages_distributions()
    found = third_party_imports(ENTRY_POINTS)
    assert {"chalice", "paho", "cryptography", "requests"} <= set(found), found  # the walk reaches them
    missing = {module: sorted(files) for module, files in found.items()
               if not {canonicalize_name(owner) for owner in providers.get(module, [])} & tier}
    assert missing == {}, f"imported on the path of make demo / make local but not in requirements-local.txt: {missing}"


def test_the_local_tier_is_small_and_holds_no_development_tool():
    tier = local_tier()
    assert len(tier | VENV_SEED) <= BUDGET, sorted(tier)
    assert {"chalice", "paho-mqtt", "boto3", "cryptography", "requests", "maxminddb"} <= tier
    development = closure(requirements(PROJECT_DIR / "requirements-dev.txt")) - tier
    assert {"pytest", "moto", "mypy", "ruff", "matplotlib", "selenium", "hypothesis"} <= development
    # chalice runs the local stage and builds the package; inside the Lambda, chalice adds its own runtime.
    lambda_tier = closure(requirements(PROJECT_DIR / "requirements.txt"))
    assert "chalice" not in lambda_tier and lambda_tier <= tier


def make_dry_run(target: str, venv: Path) -> str:
    """The commands `make TARGET` would run with this virtualenv directory (make -n: nothing is run)."""
    result = subprocess.run(["make", "-n", "--no-print-directory", f"VENV={venv}", target], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def stamp(venv: Path, *names: str) -> None:
    venv.mkdir(exist_ok=True)
    for name in ("pyvenv.cfg", *names):
        (venv / name).touch()


def test_make_demo_installs_the_local_tier_and_make_test_adds_the_development_tier_without_rebuilding(tmp_path):
    venv = tmp_path / "venv"
    fresh = make_dry_run("demo", venv)
    assert "-m venv" in fresh and "-r requirements-local.txt" in fresh and "requirements-dev.txt" not in fresh

    stamp(venv, ".installed-local")  # what `make demo` leaves
    assert "pip install" not in make_dry_run("demo", venv)  # a second make demo installs nothing
    after_demo = make_dry_run("test", venv)
    assert "-r requirements-dev.txt" in after_demo and "-m pytest" in after_demo
    assert "-m venv" not in after_demo and "-r requirements-local.txt" not in after_demo

    stamp(venv, ".installed-dev")  # what `make test` leaves
    for target in ("demo", "local", "test"):
        assert "pip install" not in make_dry_run(target, venv), target

    older = os.stat(PROJECT_DIR / "requirements.txt").st_mtime - 10  # a requirements file changed since
    for name in (".installed-local", ".installed-dev"):
        os.utime(venv / name, (older, older))
    changed = make_dry_run("test", venv)
    assert "-m venv" not in changed
    assert changed.index("-r requirements-local.txt") < changed.index("-r requirements-dev.txt")
