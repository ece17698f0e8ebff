"""docs/performance.md's numbers, made from the committed bench JSON: never typed by hand, never stale.

Three runs are committed, each written only by its own full-size command: `make bench` (bench/bench.json),
`make storm` (bench/storm.json), `make chaos` (bench/chaos.json). Each records how it was made (`run`: the command,
when, the machine's cores and load average) and then runs this module (bench/provenance.py), which rewrites the
generated blocks of docs/performance.md: between `<!-- generated: NAME -->` and `<!-- end: NAME -->`; the prose
around them is edited by hand. The tables are the benches' own (their `table` functions). `make bench-quick` and the
tests write elsewhere (bench/results.json, a temporary directory), so a quick run never makes the page and the
committed JSON disagree; tests/test_docs.py fails when they do.

    python -m bench.docs            rewrite the page's generated blocks from the committed JSON
    python -m bench.docs --check    exit 1 when the page is not what the committed JSON makes
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from types import SimpleNamespace
from typing import Any, Callable

from bench.provenance import COMMITTED, PROJECT_DIR

PAGE = PROJECT_DIR / "docs" / "performance.md"
MAKE_TARGETS = {"python -m bench.run --size full": "make bench", "python -m bench.run --size quick": "make bench-quick",
                "python -m bench.storm --size default": "make storm", "python -m bench.chaos --size default": "make chaos"}

# The bench's targets, in one place: (what, where in bench.json, comparison, target, unit). A target whose number a
# run did not record is said to be not measured, never guessed.
BENCH_TARGETS: list[tuple[str, str, str, float, str]] = [
    ("in-process provisioning at least half the crypto floor's rate", "inprocess.ratio_to_floor", ">=", 0.5, ""),
    ("the log and metrics lines at most 15% of the handler's time", "inprocess.log_and_metrics_share_of_handler",
     "<=", 0.15, "%"),
    ("no HTTP error with 8 clients", "http.errors", "<=", 0, ""),
    ("AWS path, steady state, at most 7 AWS calls", "aws.bundled.steady_calls", "<=", 7, " calls"),
    ("AWS path, critical path with the bundled database at most 256 ms", "aws.bundled.critical_path_ms", "<=", 256,
     " ms"),
    ("AWS path, critical path with ipstack at most 336 ms", "aws.ipstack.critical_path_ms", "<=", 336, " ms"),
    ("AWS path, bundled geolocation, measured at least 2.8x faster than the original sample", "aws.bundled.speedup",
     ">=", 2.8, "x"),
    ("AWS path, ipstack, measured at least 2.25x faster than the original sample", "aws.ipstack.speedup", ">=", 2.25,
     "x"),
    ("prod cold start at most 1.25x a bare boto3 client's CPU time", "cold.prod_to_bare_cpu_ratio", "<=", 1.25, "x"),
    ("bulk enrolment into SQLite: 100,000 devices in under 5 s", "bulk.sqlite_rows_per_s", ">=", 20_000, " rows/s"),
]
STORM_TARGET_RATIO = 1.2  # with admission control: the makespan within 1.2x the quota bound


def load() -> dict[str, dict]:
    return {name: json.loads(path.read_text()) for name, path in COMMITTED.items()}


def render(page: str, sources: dict[str, dict]) -> str:
    """The page with every generated block made again from `sources`; a block the page lacks is an error."""
    blocks = {"bench": bench_block, "storm": storm_block, "chaos": chaos_block, "quotas": quotas_block}
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- generated: {name} [^\n]*-->\n).*?(<!-- end: {name} -->)", re.S)
        if not pattern.search(page):
            raise ValueError(f"docs/performance.md has no generated block {name!r}")
        body = make(sources)
        page = pattern.sub(lambda m, body=body: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), page)
    return page


# ---------------------------------------------------------------- blocks

def run_line(data: dict) -> str:
    run = data.get("run") or {}
    command = run.get("command", "not recorded")
    make = MAKE_TARGETS.get(command)
    load = run.get("load_average")
    load_text = (f"load average {' / '.join(f'{x:g}' for x in load)} (1, 5, 15 min) when it ended"
                 if load else "load average not recorded")
    when = run.get("when", "not recorded").replace("T", " ").replace("Z", " UTC")
    line = (f"*Run: {when}, {run.get('cpus', '?')} cores, {load_text}; "
            f"`{command}`{f' (`{make}`)' if make else ''}.*")
    if run.get("note"):
        line += f" *{run['note']}*"
    return line


def _field(data: dict, path: str) -> Any:
    """The value at `path`; a list counts its members (the calls a provisioning makes)."""
    value: Any = data
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return len(value) if isinstance(value, list) else value


def shown(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.1f}%"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value:,.3g}{unit}"


def targets_list(rows: list[tuple[str, Any, str, float, str]]) -> str:
    """One line per target: met or missed, the number and the target."""
    out = ["Targets:"]
    for what, value, comparison, target, unit in rows:
        if value is None:
            out.append(f"- {what}: not measured by this run")
            continue
        met = value >= target if comparison == ">=" else value <= target
        against = "" if target == 0 else f"; target {comparison} {shown(target, unit)}"  # "none" targets: the count
        out.append(f"- {what}: **{'met' if met else 'missed'}** ({shown(value, unit)}{against})")
    return "\n".join(out)


def bench_block(sources: dict[str, dict]) -> str:
    from bench.run import table
    data = sources["bench"]
    size = data.get("size", "?")
    lines = [run_line(data), ""]
    if size != "full":
        lines += [f"*This run is `--size {size}`, smaller than `make bench`'s: the next full run replaces it.*", ""]
    lines += [table(data), ""]
    delays = _field(data, "aws.delays_ms")
    if delays:
        names = {"http": "ipstack (HTTP)", "dynamodb": "DynamoDB", "ssm": "SSM", "iot": "IoT"}
        lines += ["Simulated delay per AWS call: " + ", ".join(f"{names.get(k, k)} {v:g} ms" for k, v in delays.items())
                  + ".", ""]
    lines.append(targets_list([(what, _field(data, path), cmp, target, unit)
                               for what, path, cmp, target, unit in BENCH_TARGETS]))
    return "\n".join(lines)


def storm_block(sources: dict[str, dict]) -> str:
    from bench.storm import table
    data = sources["storm"]
    w, wo, p = data["with_admission"], data["without_admission"], data["parameters"]
    lines = [run_line(data), "",
             f"{p['devices']} devices over {p['regions']} regions, binding quota scaled to {p['quota']:g}/s per region, "
             f"{p['admitted_per_region_s']:.3g} devices/s admitted per region after the reserve, "
             f"{p['latency'] * 1000:g} ms per IoT call, power-on spread over {p['ramp']:g} s.", "",
             # storm.table reads StormResult.summary(); the JSON holds those summaries
             table({key: SimpleNamespace(summary=lambda d=data[key]: d)
                    for key in ("with_admission", "without_admission")}), ""]

    def listing(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"
    lines += [f"Refusals by the service: with admission {listing(w['refused'])}; without {listing(wo['refused'])}.",
              f"Throttled calls by API: with admission {listing(w['throttled_by_operation'])}; "
              f"without {listing(wo['throttled_by_operation'])}.", ""]
    within = f"with admission control, every device provisioned within {STORM_TARGET_RATIO:g}x the quota bound"
    lines.append(targets_list([
        *([(within, w["ratio"], "<=", STORM_TARGET_RATIO, "x")] if w["ratio"] is not None else []),
        ("with admission control, no device gave up", w["gave_up"], "<=", 0, ""),
        ("with admission control, no orphan", w["orphans"], "<=", 0, ""),
    ]))
    if w["ratio"] is None:  # not every device was provisioned before the cap
        lines.append(f"- {within}: **missed** ({w['unprovisioned']} devices left unprovisioned)")
    lines.append(f"- with admission control, a clean audit: **{'met' if w['audit_clean'] else 'missed'}**")
    return "\n".join(lines)


def chaos_block(sources: dict[str, dict]) -> str:
    from bench.chaos import table
    data = sources["chaos"]
    p = data["parameters"]
    lines = [run_line(data), "",
             f"Seed {data['seed']}, {p['devices']} devices, {p['rounds']} kills, {p['concurrency']} requests in flight, "
             f"request budget {p['budget_s']} s, lease {p['lease_s']} s.", "", table(data), ""]
    lease = data["audit_during_lease"]
    lines.append(targets_list([
        ("every device provisioned, holding the certificate its row names", len(data["unprovisioned"])
         + len(data["stuck"]), "<=", 0, " short"),
        ("no ACTIVE certificate without a registry row", data["orphans"], "<=", 0, ""),
        ("no device holding two ACTIVE certificates", data["doubles"], "<=", 0, ""),
        ("`admin audit` clean without `--fix` (its exit code)", data["audit_exit"], "<=", 0, ""),
        ("during the lease, the audit lists every ACTIVE certificate no row names", lease["hidden"], "<=", 0,
         " not listed"),
    ]))
    return "\n".join(lines)


def quotas_block(_: dict[str, dict]) -> str:
    """How long a 100,000-device storm takes at AWS IoT's quotas: arithmetic from the admission code's own table."""
    from chalicelib.domain.admission import IOT_QUOTAS, quota_budget, reserved_concurrency
    from chalicelib.domain.regions import SAMPLE_REGIONS
    fleet, regions = 100_000, len(SAMPLE_REGIONS)
    default = quota_budget()
    raised = quota_budget({**IOT_QUOTAS, "CreateCertificateFromCsr": 50, "AttachPolicy": 50})
    unbound = quota_budget({**IOT_QUOTAS, "CreateCertificateFromCsr": 1000, "AttachPolicy": 1000})

    def duration(seconds: float) -> str:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02d} min" if hours else f"{seconds / 60:.1f} min"
    rows: list[tuple[str, float, Callable[[float], float]]] = [
        ("default quotas, CSR, one region", default.csr_per_s, lambda rate: fleet / rate),
        ("default quotas, server-made keys, one region", default.server_key_per_s, lambda rate: fleet / rate),
        (f"default quotas, CSR, spread evenly over the {regions} sample regions", default.csr_per_s,
         lambda rate: fleet / regions / rate),
        ("CreateCertificateFromCsr and AttachPolicy raised to 50/s, one region", raised.csr_per_s,
         lambda rate: fleet / rate),
        ("those two raised past 100/s: CreateThing and AttachThingPrincipal bind, one region", unbound.csr_per_s,
         lambda rate: fleet / rate),
    ]
    out = ["| 100,000 devices | admitted per region | time |", "|---|---:|---:|"]
    out += [f"| {label} | {rate:g}/s | {duration(time_of(rate))} |" for label, rate, time_of in rows]
    out += ["", f"The prod stage's reserved concurrency for the {regions} regions at the default budget: "
                f"{reserved_concurrency(regions)} (`reserved_concurrency()` in `chalicelib/domain/admission.py`)."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.docs", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is not what the JSON makes")
    args = parser.parse_args(argv)
    current = PAGE.read_text()
    text = render(current, load())
    if args.check:
        if text != current:
            print("docs/performance.md differs from what the committed bench JSON makes: run python -m bench.docs",
                  file=sys.stderr)
            return 1
        return 0
    if text != current:
        PAGE.write_text(text)
        print(f"rewrote {PAGE.relative_to(PROJECT_DIR)}")
    else:
        print(f"{PAGE.relative_to(PROJECT_DIR)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
