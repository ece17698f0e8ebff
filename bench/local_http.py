"""Local HTTP latency: GET /health and provisioning through devstack's `chalice local` (what `make local` runs),
with 1 and 8 clients each keeping its connection alive, as a device fleet behind one gateway would.

The in-process row times the service alone; this one adds Chalice's dev server, HTTP and loopback, so the
gap between the two is what the local HTTP server costs. `python -m bench.local_http [--size quick]` runs it
alone; `make bench` runs it as one of its rows.
"""
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from bench import run_alone

SIZES = {"full": dict(health=2000, devices=400), "quick": dict(health=500, devices=100),
         "tiny": dict(health=16, devices=8)}
LONDON_IP = "81.2.69.142"
CLIENTS = (1, 8)


@contextmanager
def registered_stage(prefix: str, count: int) -> Iterator[tuple[Any, Any]]:
    """A throw-away local stage's (settings, fleet private key), with a fleet key and devices
    `<prefix>1`..`<prefix><count>` registered (quietly: the CLI's own output is not the bench's)."""
    from cryptography.hazmat.primitives import serialization

    from admin import cli as admin
    from chalicelib.config import Settings
    from devstack.stack import free_port_run
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(GIP_STATE_DIR=tmp, GIP_MQTT_BASE_PORT=str(free_port_run(11)))
        settings = Settings.for_stage("local", tmp)
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                admin.main(["--state-dir", tmp, "keygen"])
                admin.main(["--state-dir", tmp, "register", "--prefix", prefix, "--count", str(count)])
            finally:
                sys.stdout = stdout
        yield settings, serialization.load_pem_private_key(
            (settings.keys_dir / "global-provisioning.priv.key.pem").read_bytes(), password=None)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


def _timed(calls: list[Callable[[Any], int]], clients: int) -> dict[str, Any]:
    """Runs call(session) for each of `calls` on `clients` threads, one kept-alive session per thread."""
    import requests
    latencies: list[float] = []
    errors: list[int] = []
    lock, local = threading.Lock(), threading.local()

    def one(call) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        began = time.perf_counter()
        status = call(session)
        took = time.perf_counter() - began
        with lock:
            latencies.append(took)
            if status != 200:
                errors.append(status)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, calls))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": len(calls), "requests_per_s": round(len(calls) / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * _percentile(latencies, 0.99), 2), "errors": len(errors)}


def bench(size: str = "full") -> dict:
    import requests
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from bench.devices import make_csr
    from devstack.stack import LocalStack, free_port

    n = SIZES[size]
    devices = n["devices"] * len(CLIENTS)  # each run provisions devices of its own
    with registered_stage("lat-", devices) as (settings, fleet):

        def body(name: str) -> str:
            signature = fleet.sign(name.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
            return json.dumps({"thing-name": name, "thing-name-sig": base64.b64encode(signature).decode(),
                               "CSR": make_csr(name)})

        bodies = [body(f"lat-{i}") for i in range(1, devices + 1)]  # not timed
        headers = {"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP}
        results: dict = {"health": [], "provisioning": []}
        with LocalStack(settings, free_port(), quiet=True) as stack:
            health, provision = f"{stack.api_url}/health", f"{stack.api_url}/device-provisioning"
            requests.post(provision, json={}, timeout=60)  # the first request builds the service (not timed)
            for clients in CLIENTS:
                results["health"].append(_timed(
                    [lambda s: s.get(health, timeout=30).status_code] * n["health"], clients))
            for i, clients in enumerate(CLIENTS):
                mine = bodies[i * n["devices"]:(i + 1) * n["devices"]]
                results["provisioning"].append(_timed(
                    [lambda s, b=b: s.post(provision, data=b, headers=headers, timeout=60).status_code
                     for b in mine], clients))
    return results


def rows(result: dict, inprocess_us_per_device: float | None = None) -> list[tuple[str, str, str]]:
    """Table rows for bench/run.py: one per route and client count."""
    out = []
    for route, label in (("health", "GET /health"), ("provisioning", "provisioning (CSR)")):
        for r in result[route]:
            note = f"p99 {r['p99_ms']} ms, {r['requests_per_s']} req/s, errors {r['errors']}"
            if route == "provisioning" and r["clients"] == 1 and inprocess_us_per_device:
                note += f"; in-process {inprocess_us_per_device / 1000:.2f} ms per device"
            out.append((f"Local HTTP latency, {label}, {r['clients']} client(s), chalice local",
                        f"p50 {r['p50_ms']} ms", note))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_alone("python -m bench.local_http", __doc__, SIZES, bench, rows, argv)


if __name__ == "__main__":
    sys.exit(main())
