"""What a cold prod container pays, next to a bare `import boto3` plus one client, in one paired run.

    python -m bench.cold_start [--reps 7] [--importtime]

moto's server stands in for AWS (DynamoDB, SSM, IoT) in a separate process, so its own imports and work
are not charged to either side. Each repetition starts two fresh interpreters, in turns:
- bare: `import boto3; boto3.client("dynamodb")`;
- prod: `import app` with the prod stage's environment (.chalice/config.json), then the first provisioning
  through the Chalice handler (`app.app(event, context)`, an API Gateway proxy event), the device's default
  request (signature v2) with a CSR, every AWS client created and called on the way.
Both are timed inside the interpreter from its first statement (its own start-up is the same for both):
wall time, which includes moto's own work and the waits on it; wall time less the time moto's server spent
inside its app during that run (on AWS that work is AWS's); and the process's CPU time, which is what the
function itself computes (the waits on AWS are network latency on a real account, the same for any SDK).
--importtime prints each side's import time per top-level package (python -X importtime, own modules only);
--profile a CPU profile of one prod cold start (cProfile).

--package ZIP (the zip `make package` builds) adds what bytecode is worth on Lambda, where /var/task is
read-only: the zip unzipped twice, with its __pycache__ and without, each read-only, and in turns a fresh
interpreter that sees only the package and the standard library and writes no bytecode imports the app and
builds the service (devstack/lambda_package.py's probe); the CPU time of each, and how many of the package's
files it compiled.
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from chalicelib.config import PROJECT_DIR

BARE = ("import time; t0, c0 = time.perf_counter(), time.process_time()\n"
        "import boto3\n"
        "boto3.client('dynamodb')\n"
        "print(time.perf_counter() - t0, time.process_time() - c0)\n")

PROD = ("import time; t0, c0 = time.perf_counter(), time.process_time()\n"
        "import json, sys\n"
        "import app\n"
        "t1 = time.perf_counter()\n"
        "answer = app.app(json.loads(sys.argv[1]), None)\n"
        "t2 = time.perf_counter()\n"
        "assert answer['statusCode'] == 200, answer\n"
        "print(json.dumps({'import': t1 - t0, 'first': t2 - t1, 'total': t2 - t0, 'cpu': time.process_time() - c0}))\n")


def event(body: dict, source_ip: str) -> dict:
    """An API Gateway REST proxy event as Lambda hands it to the function."""
    return {"resource": "/device-provisioning", "path": "/device-provisioning", "httpMethod": "POST",
            "headers": {"Content-Type": "application/json"},
            "multiValueHeaders": {"Content-Type": ["application/json"]},
            "queryStringParameters": None, "multiValueQueryStringParameters": None, "pathParameters": None,
            "stageVariables": None, "body": json.dumps(body), "isBase64Encoded": False,
            "requestContext": {"resourcePath": "/device-provisioning", "httpMethod": "POST", "stage": "api",
                               "requestId": os.urandom(8).hex(), "path": "/api/device-provisioning",
                               "identity": {"sourceIp": source_ip}}}


def v2_csr_body(fleet_key, name: str) -> dict:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    from bench.devices import make_csr
    from chalicelib.domain.signatures import v2_text
    csr = make_csr(name, ec.generate_private_key(ec.SECP256R1()))
    stamp, nonce = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), os.urandom(12).hex()
    signature = fleet_key.sign(v2_text(name, stamp, nonce, csr), padding.PKCS1v15(), hashes.SHA256())
    return {"thing-name": name, "thing-name-sig": base64.b64encode(signature).decode(), "CSR": csr,
            "timestamp": stamp, "nonce": nonce}


class _TimedMotoServer:
    """moto's server (as ThreadedMotoServer runs it) with the seconds it spends inside its app counted, so
    that moto's own work can be told from the function's: on AWS it happens on AWS's machines."""

    def __init__(self, port: int):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server
        self.busy = 0.0
        lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def timed(environ, start_response):
            began = time.perf_counter()
            try:
                return list(app(environ, start_response))
            finally:
                with lock:
                    self.busy += time.perf_counter() - began

        self._server = make_server("127.0.0.1", port, timed, True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


def _self_times(stderr: str) -> dict[str, int]:
    """python -X importtime's lines as {top-level package: microseconds spent in its own modules}."""
    totals: dict[str, int] = {}
    for line in stderr.splitlines():
        if line.startswith("import time:") and not line.endswith("| imported package"):
            head, _, name = line.split("|")
            self_us = head.split(":")[1]
            package = name.strip().split(".")[0]
            totals[package] = totals.get(package, 0) + int(self_us)
    return totals


def print_importtime(base: dict, aws: dict, env: dict, request: str) -> None:
    """Each side's import time per top-level package (own modules only), the prod side's extras first."""
    bare = subprocess.run([sys.executable, "-X", "importtime", "-c", BARE], env={**base, **aws},
                          capture_output=True, text=True)
    prod = subprocess.run([sys.executable, "-X", "importtime", "-c", PROD, request], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True)
    bare_us, prod_us = _self_times(bare.stderr), _self_times(prod.stderr)
    rows = sorted(set(bare_us) | set(prod_us), key=lambda k: bare_us.get(k, 0) - prod_us.get(k, 0))
    print(f"{'package':24} {'prod ms':>8} {'bare ms':>8}", file=sys.stderr)
    for name in rows[:30]:
        print(f"{name:24} {prod_us.get(name, 0) / 1000:8.1f} {bare_us.get(name, 0) / 1000:8.1f}", file=sys.stderr)
    print(f"{'all':24} {sum(prod_us.values()) / 1000:8.1f} {sum(bare_us.values()) / 1000:8.1f}", file=sys.stderr)


PROFILED = ("import cProfile, pstats, sys, time\n"
            "profile = cProfile.Profile(time.process_time)\n"
            "profile.enable()\n"
            "import json, app\n"
            "answer = app.app(json.loads(sys.argv[1]), None)\n"
            "profile.disable()\n"
            "assert answer['statusCode'] == 200, answer\n"
            "stats = pstats.Stats(profile, stream=sys.stderr)\n"
            "stats.sort_stats('tottime').print_stats(40)\n"
            "stats.sort_stats('cumulative').print_stats(60)\n")


def bytecode_effect(zip_path: Path, reps: int) -> dict:
    """A cold start's CPU from the unzipped package, read-only, with and without its bytecode, in turns."""
    from devstack import lambda_package
    env = lambda_package.lambda_env(PROJECT_DIR)
    with tempfile.TemporaryDirectory(prefix="cold-start-package-") as tmp:
        roots = {"with": lambda_package.unzip(zip_path, Path(tmp) / "with"),
                 "without": lambda_package.unzip(zip_path, Path(tmp) / "without", bytecode=False)}
        try:
            runs: dict[str, list[dict]] = {"with": [], "without": []}
            for root in roots.values():  # once each first: the files into the page cache, not counted
                lambda_package.probe(root, env)
            for _ in range(reps):
                for kind, root in roots.items():
                    runs[kind].append(lambda_package.probe(root, env))
        finally:
            for path in Path(tmp).rglob("*"):  # writable again, so that the directory can be removed
                path.chmod(path.stat().st_mode | 0o200)
            for root in roots.values():
                root.chmod(0o755)
    cpu = {kind: statistics.median(r["cpu_ms"] for r in results) for kind, results in runs.items()}
    return {"package": str(zip_path), "package_cpu_ms_with_bytecode": round(cpu["with"], 1),
            "package_cpu_ms_without_bytecode": round(cpu["without"], 1),
            "package_without_to_with_bytecode_cpu_ratio": round(cpu["without"] / cpu["with"], 2),
            "package_files_compiled_with_bytecode": len(runs["with"][0]["compiled"]),
            "package_files_compiled_without_bytecode": len(runs["without"][0]["compiled"])}


def run(reps: int, importtime: bool, verbose: bool = False, profile: bool = False) -> dict:
    import boto3
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
    from devstack.stack import free_port
    config = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]
    port = free_port()
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = _TimedMotoServer(port)
    server.start()
    saved_env = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fleet = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            public = Path(tmp) / "fleet.pub.pem"
            public.write_bytes(fleet.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
            aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                   "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": str(Path(tmp) / "none"),
                   "AWS_SHARED_CREDENTIALS_FILE": str(Path(tmp) / "none")}
            base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GIP_", "PYTHON"))}
            env = {**base, **aws, **config["environment_variables"], "GIP_FLEET_PUBLIC_KEY": str(public),
                   "AWS_LAMBDA_FUNCTION_NAME": "cold-start-bench",
                   # this shared machine's load can make a cold start's wall time several seconds: a longer
                   # request budget than Lambda's keeps a busy moment from failing the run (CPU is unaffected)
                   "GIP_REQUEST_BUDGET_SECONDS": "120"}
            os.environ.update(aws)
            with ThreadPoolExecutor(max_workers=4) as pool:
                registry = DynamoDbRegistry(boto3.client("dynamodb", endpoint_url=aws["AWS_ENDPOINT_URL"]),
                                            env["GIP_TABLE_NAME"], executor=pool)
                registry.create()
                names = [f"cold-{i}" for i in range(reps + 3)]
                registry.register(names)
            # moto builds each service's backend on its first request (seconds for IoT): not the function's cost.
            # So each service is called once first, then one cold start is served and not counted.
            endpoint = aws["AWS_ENDPOINT_URL"]
            boto3.client("iot", region_name="eu-west-2", endpoint_url=endpoint).describe_endpoint(
                endpointType="iot:Data-ATS")
            ssm = boto3.client("ssm", region_name="eu-west-2", endpoint_url=endpoint)
            try:
                ssm.get_parameter(Name=env["GIP_IPSTACK_KEY_PARAMETER"], WithDecryption=True)
            except ssm.exceptions.ParameterNotFound:
                pass
            subprocess.run([sys.executable, "-c", PROD, json.dumps(event(v2_csr_body(fleet, names[-1]), "81.2.1.1"))],
                           cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
            bare, bare_cpu, imports, firsts, totals, cpus, ratios, cpu_ratios = [], [], [], [], [], [], [], []
            own: list[float] = []
            own_ratios: list[float] = []
            for i in range(reps):
                out = subprocess.run([sys.executable, "-c", BARE], env={**base, **aws}, capture_output=True,
                                     text=True, check=True)
                wall, cpu = map(float, out.stdout.split())
                bare.append(wall)
                bare_cpu.append(cpu)
                # a different public address each time, so no process finds anything cached
                ip = f"81.2.{69 + i}.{10 + i}"
                request = json.dumps(event(v2_csr_body(fleet, names[i]), ip))
                moto_before = server.busy
                out = subprocess.run([sys.executable, "-c", PROD, request], cwd=PROJECT_DIR, env=env,
                                     capture_output=True, text=True)
                moto_s = server.busy - moto_before
                if out.returncode:
                    raise RuntimeError(f"prod cold start failed:\n{out.stderr[-3000:]}")
                timing = json.loads(out.stdout.strip().splitlines()[-1])
                if verbose:
                    print(out.stdout, out.stderr, file=sys.stderr)
                imports.append(timing["import"])
                firsts.append(timing["first"])
                totals.append(timing["total"])
                cpus.append(timing["cpu"])
                own.append(timing["total"] - moto_s)
                own_ratios.append(own[-1] / bare[-1])
                ratios.append(timing["total"] / bare[-1])
                cpu_ratios.append(timing["cpu"] / bare_cpu[-1])
            if importtime:
                print_importtime(base, aws, env, json.dumps(event(v2_csr_body(fleet, names[reps]), "81.2.200.1")))
            if profile:
                out = subprocess.run([sys.executable, "-c", PROFILED,
                                      json.dumps(event(v2_csr_body(fleet, names[reps + 1]), "81.2.201.1"))],
                                     cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
                print(out.stderr, file=sys.stderr)
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved_env)
    ms = lambda values: round(statistics.median(values) * 1000, 1)  # noqa: E731
    return {"reps": reps, "bare_boto3_import_and_client_ms": ms(bare), "prod_import_ms": ms(imports),
            "prod_first_provisioning_ms": ms(firsts), "prod_total_ms": ms(totals),
            "prod_to_bare_ratio": round(statistics.median(ratios), 2),
            "prod_total_less_moto_ms": ms(own), "prod_less_moto_to_bare_ratio": round(statistics.median(own_ratios), 2),
            "bare_cpu_ms": ms(bare_cpu), "prod_cpu_ms": ms(cpus),
            "prod_to_bare_cpu_ratio": round(statistics.median(cpu_ratios), 2),
            "prod_to_bare_cpu_ratio_range": [round(min(cpu_ratios), 2), round(max(cpu_ratios), 2)],
            # other processes' load only ever adds CPU time: each side's least disturbed repetition
            "bare_cpu_min_ms": round(min(bare_cpu) * 1000, 1), "prod_cpu_min_ms": round(min(cpus) * 1000, 1),
            "prod_to_bare_cpu_ratio_of_minimums": round(min(cpus) / min(bare_cpu), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="paired repetitions (default 7)")
    parser.add_argument("--importtime", action="store_true", help="also list the prod side's costliest imports")
    parser.add_argument("--profile", action="store_true",
                        help="also print a CPU profile of one prod cold start (cProfile: import and first request)")
    parser.add_argument("--package", type=Path, metavar="ZIP",
                        help="also a cold start from this Lambda zip (make package), with and without its bytecode")
    parser.add_argument("--verbose", action="store_true", help="show the prod side's output")
    args = parser.parse_args(argv)
    if args.package and not args.package.is_file():
        parser.error(f"{args.package}: no such file (make package builds build/lambda/deployment.zip)")
    result = run(args.reps, args.importtime, args.verbose, args.profile)
    if args.package:
        result.update(bytecode_effect(args.package, args.reps))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
