"""make bench: python -m bench.run (see run.py)."""
import argparse
import json
from typing import Any, Callable


def run_alone(prog: str, doc: str | None, sizes: dict, bench: Callable[[str], dict],
              rows: Callable[[dict], list[tuple[str, str, str]]], argv: list[str] | None = None) -> int:
    """`python -m bench.<row>` for a row of make bench: its JSON, then its table rows."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--size", choices=sizes, default="quick")
    args = parser.parse_args(argv)
    result: Any = bench(args.size)
    print(json.dumps(result, indent=2))
    for row in rows(result):
        print(f"| {' | '.join(row)} |")
    return 0
