"""make bench: how fast provisioning is, next to what the hardware allows and to the original sample.

Every ratio is measured within one run (this machine is shared and noisy); times are medians of several
repetitions. Prints a Markdown table and writes bench/results.json. Run from the project directory as a
module: python -m bench.run --size quick
"""
import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from bench import local_http, timing
from bench.devices import make_csr
from chalicelib.config import PROJECT_DIR

SIZES = {  # devices in-process, devices over HTTP, rows into SQLite, rows into DynamoDB, repetitions, AWS-path devices
    "full": dict(inproc=2000, http=1000, sqlite_rows=100_000, dynamo_rows=10_000, reps=3, aws=9, cold=5),
    "quick": dict(inproc=300, http=200, sqlite_rows=20_000, dynamo_rows=1_000, reps=3, aws=5, cold=3),
    "tiny": dict(inproc=5, http=5, sqlite_rows=50, dynamo_rows=30, reps=1, aws=1, cold=1),
}
LONDON_IP = "81.2.69.142"
_CHUNK = 100  # devices per turn when the service and the crypto floor are timed in turns


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sign(key, text: bytes) -> str:
    return base64.b64encode(key.sign(text, padding.PKCS1v15(), hashes.SHA256())).decode()


def v2_body(key, name: str) -> dict:
    from chalicelib.domain.signatures import v2_text
    stamp, nonce = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), os.urandom(12).hex()
    return {"thing-name": name, "thing-name-sig": sign(key, v2_text(name, stamp, nonce, None)),
            "timestamp": stamp, "nonce": nonce}


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ---------------------------------------------------------------- 1. in-process throughput vs the crypto floor

def service_settings(state: Path):
    from chalicelib.config import Settings
    return Settings.from_env({"GIP_STATE_DIR": str(state), "GIP_FLEET_PUBLIC_KEY": str(state / "fleet.pub.pem"),
                              "GIP_TRUST_FORWARDED_FOR": "true"})


def local_container(state: Path, fleet_key):
    """The local stage's container (chalicelib/container.py) on a fresh state directory: the service and the
    handler's app are built on it, exactly as chalice local builds them."""
    from chalicelib.container import Container
    public = state / "fleet.pub.pem"
    public.write_bytes(fleet_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return Container(service_settings(state))


def v2_csr_body(key, name: str, csr: str) -> dict:
    """The device's default request (signed request v2) in CSR mode, signed now (the timestamp is checked)."""
    from chalicelib.domain.signatures import v2_text
    stamp, nonce = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), os.urandom(12).hex()
    return {"thing-name": name, "thing-name-sig": sign(key, v2_text(name, stamp, nonce, csr)), "CSR": csr,
            "timestamp": stamp, "nonce": nonce}


def api_event(body: dict, ip: str) -> dict:
    """An API Gateway proxy event as Lambda hands it to the function (the local stage trusts X-Forwarded-For)."""
    return {"resource": "/device-provisioning", "path": "/device-provisioning", "httpMethod": "POST",
            "headers": {"Content-Type": "application/json", "X-Forwarded-For": ip},
            "multiValueHeaders": {}, "queryStringParameters": None, "multiValueQueryStringParameters": None,
            "pathParameters": None, "stageVariables": None, "body": json.dumps(body), "isBase64Encoded": False,
            "requestContext": {"resourcePath": "/device-provisioning", "httpMethod": "POST", "stage": "api",
                               "requestId": os.urandom(8).hex(), "identity": {"sourceIp": ip}}}


def bench_inprocess(n: int, reps: int) -> dict:
    from bench.geo_compare import sample
    from chalicelib.adapters import observability
    from chalicelib.domain.requests import ProvisioningRequest
    from chalicelib.domain.steps import Steps
    from chalicelib.edge.http import create_app
    fleet = rsa_key()
    say(f"  making {n} RSA-2048 device keys and CSRs (not timed) ...")
    names = [f"bench-{i}" for i in range(n)]
    keys = [rsa_key() for _ in range(n)]
    csrs = [make_csr(name, key) for name, key in zip(names, keys)]
    # The same device keys behind the handler, under other names: the two rows do the same crypto.
    handler_names = [f"handler-{i}" for i in range(n)]
    handler_csrs = [make_csr(name, key) for name, key in zip(handler_names, keys)]
    addresses = sample(2 * n, seed=8)  # a new public address per device: every geolocation a cache miss

    def provision_all(service, items, ips, spent: dict | None = None) -> float:
        """Seconds for all; `spent` gains each step's seconds (parse = body and CSR checks, then the service's)."""
        started = time.perf_counter()
        for body, ip in zip(items, ips):
            steps = Steps()
            with steps.step("parse"):
                request = ProvisioningRequest.from_body(body)
            service.provision(request, ip, steps)
            if spent is not None:
                for step, ms in steps.ms.items():
                    spent[step] = spent.get(step, 0.0) + ms / 1000
        return time.perf_counter() - started

    def handle_all(app, events) -> float:
        """Seconds for all, through the Chalice handler as Lambda calls it: routing, parsing, service, log line,
        metrics, response."""
        started = time.perf_counter()
        for event in events:
            answer = app(event, None)
            if answer["statusCode"] != 200:
                raise RuntimeError(f"handler refused a bench device: {answer['body']}")
        return time.perf_counter() - started

    def floor_once(items, ca_key, fleet_public) -> float:
        """Per device: the request signature check, the CSR's self-signature check, one CA signature."""
        from chalicelib.domain.signatures import v2_text
        parsed = [x509.load_pem_x509_csr(b["CSR"].encode()) for b in items]
        tbs = [c.tbs_certrequest_bytes for c in parsed]  # a few hundred bytes, like a certificate's TBS part
        texts = [v2_text(b["thing-name"], b["timestamp"], b["nonce"], b["CSR"]) for b in items]
        started = time.perf_counter()
        for body, csr, data, text in zip(items, parsed, tbs, texts):
            fleet_public.verify(base64.b64decode(body["thing-name-sig"]), text, padding.PKCS1v15(), hashes.SHA256())
            csr.public_key().verify(csr.signature, csr.tbs_certrequest_bytes, padding.PKCS1v15(),
                                    csr.signature_hash_algorithm)
            ca_key.sign(data, ec.ECDSA(hashes.SHA256()))
        return time.perf_counter() - started

    def log_cost(count: int) -> float:
        """Seconds per request for the request's log line and metrics line alone (what the handler adds)."""
        steps = Steps()
        steps.ms.update({"verify": 0.3, "claim": 0.1, "geo": 0.01, "issue": 0.5, "finalize": 0.1})
        started = time.perf_counter()
        for i in range(count):
            observability.request_done(request_id="0123456789abcdef", thing_name=f"handler-{i}", status=200,
                                       code="provisioned", steps=steps, region="eu-west-2", reason="nearest",
                                       country="GB", detail={"client_ip": "81.2.69.142"})
        return (time.perf_counter() - started) / count

    rates, floors, ratios, server_key_rates, breakdowns, handler_us, service_us, log_us = ([] for _ in range(8))
    real_stdout = sys.stdout
    for rep in range(reps):
        with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
            state = Path(tmp)
            parts = local_container(state, fleet)
            service, app = parts.provisioning, create_app(parts)
            service.registry.register(names)
            service.registry.register(handler_names)
            warm = [f"warm-{rep}-{i}" for i in range(2)]
            service.registry.register(warm)
            service.provision(ProvisioningRequest.from_body(v2_csr_body(fleet, warm[0], make_csr(warm[0], keys[0]))),
                              LONDON_IP)  # first use: makes the region's CA (not timed)
            sys.stdout = devnull  # the log lines go where Lambda's go: a pipe, not a terminal
            try:
                handle_all(app, [api_event(v2_csr_body(fleet, warm[1], make_csr(warm[1], keys[1])), LONDON_IP)])
            finally:
                sys.stdout = real_stdout
            ca_key = service.issuer.authority("eu-west-2").key
            # Everything is timed in turns, a chunk of devices each, so the machine's drifts (it is shared)
            # weigh on all alike; each repetition's ratios pair them.
            spent: dict = {}
            provisioning_s = floor_s = handler_s = 0.0
            for start in range(0, n, _CHUNK):
                chunk = range(start, min(n, start + _CHUNK))
                bodies = [v2_csr_body(fleet, names[i], csrs[i]) for i in chunk]
                events = [api_event(v2_csr_body(fleet, handler_names[i], handler_csrs[i]), addresses[n + i])
                          for i in chunk]
                provisioning_s += provision_all(service, bodies, [addresses[i] for i in chunk], spent)
                floor_s += floor_once(bodies, ca_key, fleet.public_key())
                sys.stdout = devnull
                try:
                    handler_s += handle_all(app, events)
                finally:
                    sys.stdout = real_stdout
            sys.stdout = devnull
            try:
                log_us.append(log_cost(max(200, n)) * 1e6)
            finally:
                sys.stdout = real_stdout
            rates.append(n / provisioning_s)
            floors.append(n / floor_s)
            ratios.append(floor_s / provisioning_s)
            service_us.append(provisioning_s / n * 1e6)
            handler_us.append(handler_s / n * 1e6)
            breakdowns.append({step: seconds / n * 1e6 for step, seconds in spent.items()})
            # server-made keys: RSA-2048 generation dominates; a smaller batch is plenty
            m = max(2, n // 20)
            from chalicelib.domain.signatures import v2_text
            plain = []
            for i in range(m):
                name, stamp, nonce = f"srv-{rep}-{i}", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), f"n{rep}-{i}"
                plain.append({"thing-name": name, "thing-name-sig": sign(fleet, v2_text(name, stamp, nonce, None)),
                              "timestamp": stamp, "nonce": nonce})
            service.registry.register(b["thing-name"] for b in plain)
            server_key_rates.append(m / provision_all(service, plain, addresses[:m]))
        say(f"  rep {rep + 1}: {rates[-1]:.0f}/s, floor {floors[-1]:.0f}/s, ratio {ratios[-1]:.2f}, "
            f"handler {handler_us[-1]:.0f} us, service {service_us[-1]:.0f} us, log+metrics {log_us[-1]:.0f} us")
    median = ratios.index(statistics.median_low(ratios))  # the median repetition, reported whole
    rate, floor = rates[median], floors[median]
    return {"devices": n, "csr_mode_per_s": round(rate, 1), "crypto_floor_per_s": round(floor, 1),
            "ratio_to_floor": round(ratios[median], 3),
            "server_key_mode_per_s": round(statistics.median(server_key_rates), 1),
            "us_per_device": round(1e6 / rate), "floor_us_per_device": round(1e6 / floor),
            # where a device's time goes, microseconds per step, next to the floor's
            "us_per_step": {step: round(us) for step, us in breakdowns[median].items()},
            # the same devices' twins through the Chalice handler: what a request really costs in the function
            "handler_us_per_device": round(handler_us[median]), "service_us_per_device": round(service_us[median]),
            "log_and_metrics_us": round(log_us[median], 1),
            "log_and_metrics_share_of_handler": round(log_us[median] / handler_us[median], 3)}


# ---------------------------------------------------------------- 2. HTTP throughput against the local stage

def bench_http(n: int, clients: int = 8) -> dict:
    import requests

    from devstack.stack import LocalStack, free_port
    with local_http.registered_stage("http-", n) as (settings, fleet):
        say(f"  making {n} EC device keys and CSRs (not timed) ...")
        bodies = [{"thing-name": f"http-{i}", "thing-name-sig": sign(fleet, f"http-{i}".encode()),
                   "CSR": make_csr(f"http-{i}", ec.generate_private_key(ec.SECP256R1()))} for i in range(1, n + 1)]
        with LocalStack(settings, free_port(), quiet=True) as stack:
            url = f"{stack.api_url}/device-provisioning"
            latencies, errors, lock = [], [], threading.Lock()
            local = threading.local()

            def one(body):
                session = getattr(local, "session", None) or requests.Session()
                local.session = session
                began = time.perf_counter()
                response = session.post(url, json=body, headers={"X-Forwarded-For": LONDON_IP}, timeout=60)
                took = time.perf_counter() - began
                with lock:
                    latencies.append(took)
                    if response.status_code != 200:
                        errors.append(response.status_code)

            requests.post(url, json={}, timeout=60)  # first request builds the service (not timed)
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, bodies))
            elapsed = time.perf_counter() - started
    latencies.sort()
    return {"devices": n, "clients": clients, "requests_per_s": round(n / elapsed, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "errors": len(errors)}


# ---------------------------------------------------------------- 3. AWS path: calls and simulated latency

AWS_RUNS = 3  # the measured ratio is the median run's: this shared machine moves one run's ratio by about 10%
TOKYO = {"latitude": 35.7, "longitude": 139.7, "country_code": "JP", "continent_code": "AS"}
LONDON = {"latitude": 51.5, "longitude": -0.12, "country_code": "GB", "continent_code": "EU"}


def bench_aws(reps: int) -> dict:
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_SESSION_TOKEN="testing",
                      AWS_DEFAULT_REGION="eu-west-2", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    prod_env = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]["environment_variables"]
    delays = {"dynamodb": 0.008, "ssm": 0.008, "iot": 0.120, "http": 0.080}
    fleet = rsa_key()
    results = {}
    # moto plays AWS inside this process, so its work on concurrent calls competes for the GIL, which the
    # interpreter hands over only every 5 ms; a real endpoint works on its own machines while our threads wait
    # on sockets. A finer switch interval brings the model closer to that (the sample's calls are sequential).
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        for geo in ("bundled", "ipstack"):
            results[geo] = _aws_path(geo, reps, fleet, delays, prod_env)
    finally:
        sys.setswitchinterval(switch_interval)
    return {"delays_ms": {k: v * 1000 for k, v in delays.items()}, **results}


class _Calls:
    """What one request sent: each AWS call (and each ipstack lookup) with when it started and ended."""

    def __init__(self, delays: dict) -> None:
        self.delays = delays
        self.spans: list[tuple[str, float, float]] = []
        self._began = threading.local()

    def before(self, event_name, **_):
        self._began.t = time.perf_counter()

    def after(self, event_name, **_):
        # Each call lasts `delay` in all, moto's own work included, as a real round trip does: moto's key
        # generation would otherwise add its time to every call on both sides of the comparison.
        name = event_name.split(".", 1)[1]
        time.sleep(max(0.0, self.delays[name.split(".")[0]] - (time.perf_counter() - self._began.t)))
        self.spans.append((name, self._began.t, time.perf_counter()))

    def names(self) -> list[str]:
        return sorted(name for name, _, _ in self.spans)

    def critical_path(self, http: list[tuple[float, float]]) -> tuple[float, list[list[str]]]:
        """The longest chain of calls one after another (a call follows another that ended before it started),
        summed in the simulated delays, not the measured times: no noise, only the shape. Returns it in ms and the
        rounds (calls side by side) along it."""
        spans = sorted([*self.spans, *(("http.ipstack", began, ended) for began, ended in http)],
                       key=lambda span: span[1])
        cost = [self.delays[name.split(".")[0]] * 1000 for name, _, _ in spans]
        best: list[tuple[float, int]] = []  # per span: the longest chain ending with it, and its predecessor
        for i, (_, began, _) in enumerate(spans):
            before = [(best[j][0], j) for j in range(i) if spans[j][2] <= began]
            length, previous = max(before, default=(0.0, -1))
            best.append((length + cost[i], previous))
        if not best:
            return 0.0, []
        at = max(range(len(spans)), key=lambda i: best[i][0])
        chain = []
        while at >= 0:
            chain.append(at)
            at = best[at][1]
        rounds = [sorted(name for name, began, ended in spans
                         if began < spans[i][2] and ended > spans[i][1]) for i in reversed(chain)]
        return round(best[chain[0]][0], 1), rounds


def _aws_path(geo: str, reps: int, fleet, delays: dict, prod_env: dict) -> dict:
    import boto3
    import urllib3
    from moto import mock_aws

    from chalicelib.config import Settings
    from chalicelib.container import Container
    from chalicelib.domain.requests import ProvisioningRequest, RenewalRequest
    from chalicelib.domain.signatures import renew_v1_text
    from tests.fake_ipstack import FakeIpstack
    # ipstack: a stand-in on 127.0.0.1 answering every address from London after the simulated delay
    with tempfile.TemporaryDirectory() as tmp, mock_aws(), FakeIpstack(delay=delays["http"]) as http:
        public = Path(tmp) / "fleet.pem"
        public.write_bytes(fleet.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
        env = {**prod_env, "GIP_FLEET_PUBLIC_KEY": str(public), "GIP_STATE_DIR": tmp, "GIP_IPSTACK_URL": http.url}
        if geo == "bundled":
            env.pop("GIP_IPSTACK_KEY_PARAMETER")
        settings = Settings.from_env(env)
        parts = Container(settings)
        registry = parts.registry
        registry.create()
        per_run = reps + 1  # the run's devices, and one more with a CSR
        names = ["aws-first", *(f"aws-{run}-{i}" for run in range(AWS_RUNS) for i in range(per_run))]
        registry.register(names)
        boto3.client("ssm").put_parameter(Name=prod_env["GIP_IPSTACK_KEY_PARAMETER"], Value="k",
                                          Type="SecureString")
        addresses = iter(range(10, 250))  # a new device, a new address: never a geolocation cache hit
        calls = _Calls(delays)
        clients = parts.aws
        # moto builds its IoT request router on first use, not thread-safely (getmoto/moto#7166), and our first
        # provisioning calls IoT from four threads at once: build it here, on one thread, before timing anything.
        clients.client("iot", settings.default_region).list_things(maxResults=1)
        for client in [clients.client("dynamodb"), clients.client("ssm"),
                       *(clients.client("iot", r, retries=retries) for r in settings.enabled_regions
                         for retries in (True, False))]:
            client.meta.events.register("before-call.*.*", calls.before)
            client.meta.events.register("after-call.*.*", calls.after)

        def timed(run, *args) -> tuple[object, float, dict]:
            """One request: its answer, its simulated latency (ms), its calls and critical path."""
            calls.spans.clear()
            http.spans.clear()
            began = time.perf_counter()
            answer = run(*args)
            took = (time.perf_counter() - began) * 1000
            path, rounds = calls.critical_path(list(http.spans))
            return answer, took, {"calls": calls.names(), "critical_path_ms": path, "rounds": rounds}

        def address(where: dict) -> str:
            ip = f"81.2.69.{next(addresses)}" if where is LONDON else f"126.0.0.{next(addresses)}"
            http.answers[ip] = where
            return ip

        def device_request(name: str, csr: str | None = None) -> ProvisioningRequest:
            """The device's default request (signed request v2), made before the clock starts, as the device does."""
            return ProvisioningRequest.from_body(v2_csr_body(fleet, name, csr) if csr else v2_body(fleet, name))

        def provision(request: ProvisioningRequest):
            return parts.provisioning.provision(request, address(LONDON))

        def renewal(answer, key) -> tuple[RenewalRequest, object]:
            """The device's renewal request (a CSR for a new key), signed with its current key; and the new key."""
            new_key = ec.generate_private_key(ec.SECP256R1())
            csr = make_csr(answer.thing_name, new_key)
            stamp, nonce = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), os.urandom(12).hex()
            text = renew_v1_text(answer.thing_name, answer.issued.certificate_id, stamp, nonce, csr)
            signature = (key.sign(text, ec.ECDSA(hashes.SHA256())) if isinstance(key, ec.EllipticCurvePrivateKey)
                         else key.sign(text, padding.PKCS1v15(), hashes.SHA256()))
            return RenewalRequest.from_body({
                "thing-name": answer.thing_name, "certificateId": answer.issued.certificate_id, "timestamp": stamp,
                "nonce": nonce, "signature": base64.b64encode(signature).decode(), "CSR": csr}), new_key

        def renew(request: RenewalRequest, where: dict):
            return parts.renewal.renew(request, address(where))

        iot, ddb = clients.client("iot", "eu-west-2"), clients.client("dynamodb")
        web = urllib3.PoolManager(retries=False)

        def sample(name: str) -> None:
            """The original sample's sequence, one call after another, under the same delays."""
            ddb.get_item(TableName=settings.table_name, Key={"thing_name": {"S": name}})
            # the sample's plain-HTTP ipstack lookup: the same stand-in, the same delay as ours
            web.request("GET", http.url.replace("{ip}", address(LONDON)), fields={"access_key": "k"})
            iot.describe_endpoint(endpointType="iot:Data-ATS")
            try:
                iot.get_policy(policyName="iot-global-provisioning-device")
            except iot.exceptions.ResourceNotFoundException:
                pass
            iot.create_thing(thingName=name)
            cert = iot.create_keys_and_certificate(setAsActive=True)
            iot.attach_policy(policyName="iot-global-provisioning-device", target=cert["certificateArn"])
            iot.attach_thing_principal(thingName=name, principal=cert["certificateArn"])
            ddb.update_item(TableName=settings.table_name, Key={"thing_name": {"S": name}},
                            UpdateExpression="SET prov_status = :p",
                            ExpressionAttributeValues={":p": {"S": "provisioned"}})

        _, first_ms, first = timed(provision, device_request("aws-first"))  # a new container in a new account
        runs, steady, csr_path, in_place, relocation = [], [], [], [], []
        for run in range(AWS_RUNS):
            ours, theirs, answers = [], [], []
            for i in range(reps):  # in turns, so that the machine's drifts weigh on both alike
                answer, took, shape = timed(provision, device_request(f"aws-{run}-{i}"))
                ours.append(took)
                steady.append(shape)
                answers.append(answer)
                registry.register([f"sample-{run}-{i}"])
                theirs.append(timed(sample, f"sample-{run}-{i}")[1])
            csr_path.append(timed(provision, device_request(f"aws-{run}-{reps}", make_csr(f"aws-{run}-{reps}")))[2])
            # A renewal in place (London still), then the same device renewed from Tokyo: a relocation.
            request, renewed_key = renewal(answers[0], serialization.load_pem_private_key(
                answers[0].issued.private_key_pem.encode(), password=None))
            renewed, took, shape = timed(renew, request, LONDON)
            in_place.append((took, shape))
            relocation.append(timed(renew, renewal(renewed, renewed_key)[0], TOKYO)[1:])
            ours_ms, theirs_ms = statistics.median(ours), statistics.median(theirs)
            runs.append({"steady_ms": round(ours_ms), "sample_ms": round(theirs_ms),
                         "ratio": round(theirs_ms / ours_ms, 2)})
        median_run = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]

        def noise_free(shapes: list[dict]) -> dict:
            """The last one's calls (a warm container), the shortest critical path (the others only add noise)."""
            best = min(shapes, key=lambda shape: shape["critical_path_ms"])
            return {"calls": shapes[-1]["calls"], "critical_path_ms": best["critical_path_ms"],
                    "rounds": best["rounds"]}

        def renewals(measured: list[tuple[float, dict]]) -> dict:
            return {**noise_free([shape for _, shape in measured]),
                    "ms": round(statistics.median(took for took, _ in measured))}
        shape = noise_free(steady)
        return {"first_calls": first["calls"], "steady_calls": shape["calls"], "first_ms": round(first_ms),
                "steady_ms": median_run["steady_ms"], "sample_ms": median_run["sample_ms"],
                "speedup": median_run["ratio"], "runs": runs,
                "critical_path_ms": shape["critical_path_ms"], "rounds": shape["rounds"],
                "sample_critical_path_ms": round(delays["http"] * 1000 + 2 * delays["dynamodb"] * 1000
                                                 + 6 * delays["iot"] * 1000, 1),
                "csr": noise_free(csr_path), "renewal": renewals(in_place), "relocation": renewals(relocation)}


# ---------------------------------------------------------------- 4. cold start

def bench_cold(reps: int) -> dict:
    """The prod function's cold start against bare boto3 + one client (bench/cold_start.py, moto's server)."""
    from bench.cold_start import run
    return run(reps, importtime=False)


# ---------------------------------------------------------------- 5. bulk enrolment

def bench_bulk(sqlite_rows: int, dynamo_rows: int) -> dict:
    import boto3
    from moto import mock_aws

    from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
    from chalicelib.adapters.registry.sqlite import SqliteRegistry
    names = [f"bulk-{i:07d}" for i in range(sqlite_rows)]
    with tempfile.TemporaryDirectory() as tmp:
        registry = SqliteRegistry(Path(tmp) / "r.sqlite3")
        registry.create()
        began = time.perf_counter()
        added = registry.register(names)
        sqlite_s = time.perf_counter() - began
        assert added == sqlite_rows
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="eu-west-2")
    with mock_aws(), ThreadPoolExecutor(max_workers=2) as pool:
        registry = DynamoDbRegistry(boto3.client("dynamodb"), "bench", executor=pool)
        registry.create()
        began = time.perf_counter()
        added = registry.register(names[:dynamo_rows])
        dynamo_s = time.perf_counter() - began
        assert added == dynamo_rows
    return {"sqlite_rows": sqlite_rows, "sqlite_s": round(sqlite_s, 2), "sqlite_rows_per_s": round(sqlite_rows / sqlite_s),
            "dynamodb_moto_rows": dynamo_rows, "dynamodb_moto_rows_per_s": round(dynamo_rows / dynamo_s)}


# ---------------------------------------------------------------- report

def aws_rows(a: dict) -> list[tuple[str, str, str]]:
    """The AWS path's rows: calls by name, the critical path by geolocation mode, the measured ratios."""
    def names(calls: list[str]) -> str:
        return ", ".join(f"{name} x{calls.count(name)}" if calls.count(name) > 1 else name
                         for name in dict.fromkeys(calls))

    def rounds(shape: dict) -> str:
        return " -> ".join(" + ".join(r) for r in shape["rounds"])
    b, i = a["bundled"], a["ipstack"]
    return [
        ("AWS calls, first provisioning in a container", str(len(b["first_calls"])), names(b["first_calls"])),
        ("AWS calls, steady state (signed request v2, no CSR)", str(len(b["steady_calls"])),
         f"{names(b['steady_calls'])} (target <= 7)"),
        ("AWS calls, steady state with a CSR", str(len(b["csr"]["calls"])), names(b["csr"]["calls"])),
        ("AWS calls, renewal in place (CSR)", str(len(b["renewal"]["calls"])), names(b["renewal"]["calls"])),
        ("AWS calls, relocation (CSR)", str(len(b["relocation"]["calls"])), names(b["relocation"]["calls"])),
        *((f"Critical path (simulated delays along the longest chain of rounds), {what}, {geo}",
           f"{shape['critical_path_ms']} ms", rounds(shape) + note)
          for geo, mode in (("bundled", b), ("ipstack", i))
          for what, shape, note in (
              ("provisioning", mode, f" (target <= {256 if geo == 'bundled' else 336} ms; the sample: "
                                     f"{mode['sample_critical_path_ms']} ms)"),
              ("renewal in place", mode["renewal"], f"; measured {mode['renewal']['ms']} ms"),
              ("relocation", mode["relocation"], f"; measured {mode['relocation']['ms']} ms"))),
        *((f"Simulated latency, steady state, {geo} geolocation", f"{mode['steady_ms']} ms",
           f"sample {mode['sample_ms']} ms: {mode['speedup']}x lower, the median of {len(mode['runs'])} runs "
           f"({', '.join(str(run['ratio']) for run in mode['runs'])}; target >= {target}x)")
          for geo, mode, target in (("bundled", b, 2.8), ("ipstack", i, 2.25))),
    ]


def table(r: dict) -> str:
    i, h, a, c, b = r["inprocess"], r["http"], r["aws"], r["cold"], r["bulk"]
    rows = [
        ("In-process provisioning, v2 + CSR (RSA-2048 device keys), varied addresses, 1 core", f"{i['csr_mode_per_s']:.0f} /s", ""),
        ("Crypto floor (request sig verify + CSR sig verify + CA signature)", f"{i['crypto_floor_per_s']:.0f} /s", ""),
        ("Throughput / crypto floor", f"{i['ratio_to_floor']:.2f}", "target >= 0.5"),
        ("Microseconds per device, by step", f"{i['us_per_device']} us",
         ", ".join(f"{step} {us}" for step, us in i["us_per_step"].items()) + f"; the floor is {i['floor_us_per_device']} us"),
        ("In-process, server-made RSA-2048 keys", f"{i['server_key_mode_per_s']:.0f} /s", "key generation bound"),
        ("Through the Chalice handler (app.app(event, context)), v2 + CSR, varied addresses",
         f"{i['handler_us_per_device']} us", f"service alone {i['service_us_per_device']} us per device"),
        ("Log line + metrics line per request", f"{i['log_and_metrics_us']} us",
         f"{100 * i['log_and_metrics_share_of_handler']:.1f}% of the handler's time (target <= 15%)"),
        (f"HTTP, chalice local, {h['clients']} clients, {h['devices']} devices", f"{h['requests_per_s']:.0f} req/s",
         f"p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, errors {h['errors']}"),
        *local_http.rows(r["local_http"], i["us_per_device"]),
        *(timing.rows(r["timing"]) if "timing" in r else ()),  # a run from before the row existed has none
        *aws_rows(a),
        ("Cold start, prod: import + first provisioning (moto server) / bare boto3 import + one client, CPU",
         f"{c['prod_cpu_ms']} / {c['bare_cpu_ms']} ms", f"{c['prod_to_bare_cpu_ratio']}x (target <= 1.25x); wall "
         f"{c['prod_total_ms']} / {c['bare_boto3_import_and_client_ms']} ms = {c['prod_to_bare_ratio']}x"),
        (f"Bulk enrolment, SQLite, {b['sqlite_rows']:,} devices", f"{b['sqlite_rows_per_s']:,} rows/s",
         f"{b['sqlite_s']} s (target < 5 s for 100,000)"),
        (f"Bulk enrolment, DynamoDB under moto, {b['dynamodb_moto_rows']:,} devices",
         f"{b['dynamodb_moto_rows_per_s']:,} rows/s", "moto, not DynamoDB: shows the batching, not AWS speed"),
    ]
    out = ["| measurement | result | notes |", "|---|---|---|"]
    out += [f"| {m} | {v} | {n} |" for m, v, n in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full", help="full (make bench), quick, tiny (the tests)")
    parser.add_argument("--out", help="where to write JSON (default: bench/bench.json for --size full, which "
                        "docs/performance.md is made from; bench/results.json for the other sizes)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # "one core": the in-process numbers are single-core numbers
    results = {"size": args.size, "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "cpus": os.cpu_count()}
    say("1/5 in-process throughput and the crypto floor (one core)")
    results["inprocess"] = bench_inprocess(size["inproc"], size["reps"])
    os.sched_setaffinity(0, cpus)
    say("2/5 HTTP throughput against the local stage")
    results["http"] = bench_http(size["http"])
    results["local_http"] = local_http.bench(args.size)  # p50/p99 of GET /health and provisioning, 1 and 8 clients
    results["timing"] = timing.bench(args.size)  # how well a 403's time tells a registered name from an unknown one
    say("3/5 AWS path under moto: calls and simulated latency")
    results["aws"] = bench_aws(size["aws"])
    say("4/5 cold start")
    results["cold"] = bench_cold(size["cold"])
    say("5/5 bulk enrolment")
    results["bulk"] = bench_bulk(size["sqlite_rows"], size["dynamo_rows"])
    from bench import provenance
    out = Path(args.out) if args.out else provenance.bench_out(args.size)
    results["run"] = provenance.provenance("bench.run", argv)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n(written to {out})")
    provenance.refresh(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
