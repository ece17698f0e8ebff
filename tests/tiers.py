"""The install tiers of the Makefile, read from the installed packages' metadata: which distributions
requirements-local.txt resolves to (what `make demo` and `make local` install), and a guard that gives a Python
process, and every Python process it starts, the view of a virtualenv holding that tier only.

The guard is a sitecustomize module on PYTHONPATH: an import of a top-level module that only distributions outside
the tier provide fails as it would there (ModuleNotFoundError), whatever the process (make, chalice local, a device).
"""
import importlib.metadata
import json
import os
import re
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from chalicelib.config import PROJECT_DIR

LOCAL_TIER = PROJECT_DIR / "requirements-local.txt"
# What `python -m venv` puts into every virtualenv before any requirement (counted by `pip list` too).
VENV_SEED = frozenset({"pip", "setuptools"})
PROJECT_PACKAGES = frozenset({"app", "chalicelib", "admin", "devstack", "device", "bench", "tests"})
BLOCKED_ENV = "TIER_GUARD_BLOCKED"

SITECUSTOMIZE = '''\
"""Written by tests/tiers.py: this process sees only the distributions of one install tier."""
import json
import os
import sys

with open(os.environ["{env}"]) as _file:
    _BLOCKED = json.load(_file)


class _TierGuard:
    def find_spec(self, name, path=None, target=None):
        owners = _BLOCKED.get(name.partition(".")[0])
        if owners:
            raise ModuleNotFoundError(f"No module named {{name!r}} (from {{', '.join(owners)}}, not in this tier)",
                                      name=name)
        return None


sys.meta_path.insert(0, _TierGuard())
'''.format(env=BLOCKED_ENV)


def requirements(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements file, following its `-r` includes."""
    found: list[Requirement] = []
    for line in path.read_text().splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line.startswith("-r "):
            found += requirements(path.parent / line[3:].strip())
        elif line:
            found.append(Requirement(line))
    return found


def closure(requirements: list[Requirement]) -> set[str]:
    """The canonical names of the installed distributions these requirements resolve to, dependencies included,
    with each dependency's environment marker and extras evaluated for this interpreter."""
    seen: set[str] = set()
    pending = [(requirement, frozenset(requirement.extras)) for requirement in requirements]
    done: set[tuple[str, frozenset]] = set()
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        seen.add(name)
        for text in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(text)
            wanted = [{**default_environment(), "extra": extra} for extra in (extras or {""})]
            if child.marker is None or any(child.marker.evaluate(environment) for environment in wanted):
                pending.append((child, frozenset(child.extras)))
    return seen


def local_tier() -> set[str]:
    return closure(requirements(LOCAL_TIER))


def modules_outside(tier: set[str]) -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it, for modules no distribution of `tier` provides."""
    allowed = tier | VENV_SEED
    return {module: sorted(owners) for module, owners in importlib.metadata.packages_distributions().items()
            if not {canonicalize_name(owner) for owner in owners} & allowed and module not in PROJECT_PACKAGES}


def guarded_environment(directory: Path, tier: set[str], env: dict) -> dict:
    """`env` for a process that sees only `tier`'s distributions (and the standard library, and the project)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    blocked = directory / "blocked.json"
    blocked.write_text(json.dumps(modules_outside(tier)))
    path = os.pathsep.join(filter(None, [str(directory), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, BLOCKED_ENV: str(blocked)}
