"""What a bench run records about itself, where the committed runs live, and the page made from them.

`make bench` (--size full), `make storm` and `make chaos` write the JSON that docs/performance.md is made from; every
other size writes elsewhere (bench/results.json, or the path given), so a quick run never makes the page and the
committed JSON disagree. After writing, a bench calls `refresh`, which regenerates the page (`python -m bench.docs`,
in a process of its own: bench/docs.py reads the benches' tables, so they do not import it) when what it wrote is a
committed file.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENCH_JSON = PROJECT_DIR / "bench" / "bench.json"      # make bench (--size full) only
SCRATCH_JSON = PROJECT_DIR / "bench" / "results.json"  # make bench-quick and the other sizes (ignored by git)
STORM_JSON = PROJECT_DIR / "bench" / "storm.json"
CHAOS_JSON = PROJECT_DIR / "bench" / "chaos.json"
COMMITTED = {"bench": BENCH_JSON, "storm": STORM_JSON, "chaos": CHAOS_JSON}


def bench_out(size: str) -> Path:
    """Where `python -m bench.run --size SIZE` writes by default: only the full size writes the committed file."""
    return BENCH_JSON if size == "full" else SCRATCH_JSON


def provenance(module: str, argv: list[str] | None) -> dict[str, Any]:
    """How a run was made, for the page: the command, when it ended, the machine's cores and load average."""
    args = sys.argv[1:] if argv is None else argv
    return {"command": f"python -m {module} {shlex.join(args)}".strip(),
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def refresh(written: Path) -> None:
    """After a bench wrote `written`: regenerate docs/performance.md when that is a committed file."""
    if Path(written).resolve() not in {path.resolve() for path in COMMITTED.values()}:
        print(f"(docs/performance.md is made from {', '.join(p.name for p in COMMITTED.values())}: not changed)",
              file=sys.stderr)
        return
    done = subprocess.run([sys.executable, "-m", "bench.docs"], cwd=PROJECT_DIR)
    if done.returncode:
        print(f"error: docs/performance.md was not regenerated from {Path(written).name}: run python -m bench.docs",
              file=sys.stderr)
