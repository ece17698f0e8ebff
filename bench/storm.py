"""make storm: a fleet powers on at once; is it provisioned at AWS IoT's quota pace, with no failure and no orphan?

The real service code (ProvisioningService, DynamoDB registry, AWS IoT issuer, admission control) runs against
moto, behind a throttling layer made of botocore event hooks: per API and per region, a token bucket holding one
second's worth of the (scaled) quota, a ThrottlingException (HTTP 400, as AWS IoT answers) when it is empty, and
a fixed latency per IoT call, throttled or not. K Lambda "containers" (each its own service and botocore clients;
they share only the DynamoDB tables and AWS, as Lambda containers do; each busy for the whole of its request)
serve the requests of M devices that run the device client's own retry logic, under the function's real request
deadline on a clock that leaves out the time spent waiting for moto (Stalls). The same storm runs twice in one
process, with admission control and without it (botocore's retries, no shared budget, Lambda's concurrency
uncapped), and the results go to bench/storm.json, a table, and a chart.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import contextvars
import importlib.util
import json
import os
import queue
import random
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

import boto3  # noqa: E402
from botocore.awsrequest import AWSResponse  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

SIZES = {
    # devices; Lambda containers with admission control (None: what the deployment's formula gives for the budget,
    # admission.reserved_concurrency: 11 for 3 regions at 2.4/s); containers without it (Lambda uncapped: as many
    # as requests in flight, here as many as this machine can simulate); IoT latency (s); power-on spread (s);
    # scaled quota (req/s of the binding calls, CreateCertificateFromCsr and AttachPolicy).
    # More containers made the storm with admission slower here, not faster: they fight over this one
    # interpreter's CPU and moto's lock (48: 98 s against 76 s with 11, in the same hour).
    # The default is the largest storm this simulator serves at the quota's pace on this machine: the issue's
    # 1,000 devices at 10/s admit 24 devices a second, about 2.5 cores of one interpreter (docs/performance.md, "Onboarding
    # storm"); "large" is that size, for a machine that can.
    "default": dict(devices=450, containers=None, uncapped=150, latency=0.1, ramp=5.0, quota=3.0),
    "large": dict(devices=1000, containers=None, uncapped=300, latency=0.1, ramp=2.0, quota=10.0),
    "small": dict(devices=150, containers=None, uncapped=32, latency=0.05, ramp=1.0, quota=3.0),
    "tiny": dict(devices=30, containers=4, uncapped=8, latency=0.01, ramp=0.2, quota=5.0),
}
# One address per region, where the bundled geolocation database puts it (nearest enabled region).
REGION_IPS = {"eu-west-2": "81.2.69.142", "ap-northeast-1": "126.0.0.1", "ap-southeast-2": "1.1.1.1"}
TABLE = "iot-global-provisioning"
# Quotas of the calls outside admission's table (chalicelib.domain.admission.IOT_QUOTAS), requests per second, scaled
# like the others: DescribeEndpoint (L-F30831DF) and GetPolicy (L-5CE9072D) are small (10/s assumed here), which
# is why the issuer shares the endpoint and never reads the policy; DescribeThing only by the operator's tools.
OTHER_QUOTAS = {"DescribeEndpoint": 10.0, "GetPolicy": 10.0, "CreatePolicy": 10.0, "DescribeThing": 350.0,
                "ListThingPrincipals": 10.0}
OTHER_DEFAULT = 10.0
# What bounds a request on AWS: API Gateway answers 504 after 29 s (REST API integration timeout) whatever the
# function does; the function's own deadline (lambda_timeout 25 s, the service's 20 s budget) comes first.
GATEWAY_TIMEOUT_SECONDS = 29.0
LAMBDA_TIMEOUT_SECONDS = 25.0  # .chalice/config.json, prod
DEBUG: list | None = [] if os.environ.get("STORM_DEBUG") else None  # (start, wall s, simulated s, status)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_device_module() -> Any:
    spec = importlib.util.spec_from_file_location("global_device", PROJECT_DIR / "device" / "global_device.py")
    if "global_device" in sys.modules:
        return sys.modules["global_device"]
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["global_device"] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


class Cut(BaseException):
    """The run's time cap was reached: the device stops where it is (reported as unprovisioned)."""


# ---------------------------------------------------------------- AWS: moto behind per-API token buckets

class _Raw:
    def __init__(self, body: dict):
        self._body = json.dumps(body).encode()

    def stream(self, **_: Any):
        yield self._body


class SigningCa:
    """AWS IoT signs the CSR's own key; moto makes an RSA key per certificate instead (tens of ms of CPU, which
    would make the simulator, not the quotas, the bottleneck). The layer signs the CSR with a CA of its own and
    hands the certificate to moto with RegisterCertificateWithoutCA, so moto knows it like any other."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storm simulated AWS IoT CA")])

    def sign(self, csr_pem: str) -> str:
        import datetime as dt
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.name)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM).decode()


class Stalls:
    """The time a request spends waiting on moto, which is not AWS's time: moto serves every container's calls one
    at a time on one core (seconds of queue under a storm), where DynamoDB answers in milliseconds. A request's
    deadline runs on a clock that stops while any of its calls is inside moto (the union of those intervals);
    the injected IoT latency and botocore's back-off sleeps still count, as they would on AWS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._since = 0.0
        self._total = 0.0

    def begin(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._since = time.monotonic()
            self._inside += 1

    def end(self) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                self._total += time.monotonic() - self._since

    def clock(self) -> float:
        with self._lock:
            ongoing = time.monotonic() - self._since if self._inside else 0.0
            return time.monotonic() - self._total - ongoing


_stalls: contextvars.ContextVar[Stalls | None] = contextvars.ContextVar("stalls", default=None)


class SimulatedAws:
    """Throttling and latency in front of moto (in this process, behind one lock: moto is not thread-safe), and
    moto's own CPU time, for every client attached; calls and throttles per operation."""

    def __init__(self, quotas: dict[str, float], default_quota: float, latency: float):
        from moto.core.models import botocore_stubber
        self._stubber = botocore_stubber
        self._ca = SigningCa()
        self._quotas, self._default = quotas, default_quota
        self._latency = latency
        self._buckets: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()
        self._moto = threading.Lock()  # moto serves one call at a time
        self.moto_cpu = 0.0
        self.calls: Counter = Counter()
        self.throttled: Counter = Counter()

    def _take(self, region: str, operation: str) -> bool:
        rate = self._quotas.get(operation, self._default)
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault((region, operation), [rate, now])  # full: one second's worth
            bucket[0] = min(rate, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return True
            return False

    @contextlib.contextmanager
    def _in_moto(self) -> Any:
        """Waiting for moto and moto's work are the simulator's time (Stalls), and its CPU."""
        stalls = _stalls.get()
        if stalls is not None:
            stalls.begin()
        try:
            with self._moto:
                started = time.thread_time()
                try:
                    yield
                finally:
                    self.moto_cpu += time.thread_time() - started
        finally:
            if stalls is not None:
                stalls.end()

    def _serve(self, request: Any, event_name: str, **kwargs: Any) -> Any:
        with self._in_moto():
            return self._stubber(event_name=event_name, request=request, **kwargs)

    def _from_csr(self, request: Any, region: str) -> Any:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.iot.models import iot_backends
        pem = self._ca.sign(json.loads(request.body)["certificateSigningRequest"])
        with self._in_moto():
            cert = iot_backends[DEFAULT_ACCOUNT_ID][region].register_certificate_without_ca(pem, "ACTIVE")
        return AWSResponse(request.url, 200, {"Content-Type": "application/json"},
                           _Raw({"certificateArn": cert.arn, "certificateId": cert.certificate_id,
                                 "certificatePem": cert.certificate_pem}))

    def attach_iot(self, client: Any, region: str) -> None:
        def before_send(request: Any, event_name: str, **kwargs: Any) -> Any:
            operation = event_name.rsplit(".", 1)[-1]
            # A throttled call costs its round trip too: AWS IoT answers it, HTTP 400 ThrottlingException
            # (docs.aws.amazon.com/iot/latest/apireference/API_CreateThing.html, "Errors").
            time.sleep(self._latency)
            with self._lock:
                self.calls[operation] += 1
            if not self._take(region, operation):
                with self._lock:
                    self.throttled[operation] += 1
                return AWSResponse(request.url, 400, {"x-amzn-ErrorType": "ThrottlingException:",
                                                      "Content-Type": "application/json"},
                                   _Raw({"message": "Rate exceeded"}))
            if operation == "CreateCertificateFromCsr":
                return self._from_csr(request, region)
            return self._serve(request, event_name, **kwargs)
        # botocore runs every before-send handler and takes the first answer: moto's own would serve the call
        # too (even a throttled one), so it is taken off the client and called by this layer instead.
        client.meta.events.unregister("before-send", self._stubber)
        client.meta.events.register_first("before-send.iot", before_send)

    def attach(self, client: Any) -> None:
        client.meta.events.unregister("before-send", self._stubber)
        client.meta.events.register_first("before-send", self._serve)


# ---------------------------------------------------------------- containers

@dataclass
class Reply:
    status_code: int
    body: dict
    headers: dict

    @property
    def reason(self) -> str:
        return str(self.status_code)

    def json(self) -> dict:
        return self.body


class LambdaContext:
    """What the handler reads of Lambda's context: the time left before the function is stopped."""

    def __init__(self, timeout: float, clock: Any = time.monotonic):
        self._clock = clock
        self._end = clock() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return int((self._end - self._clock()) * 1000)


class Container:
    """One Lambda container: its own clients and service; serves one request at a time."""

    def __init__(self, index: int, sim: SimulatedAws, admission: bool, rate: float, verifier: Any,
                 session: Any):
        from chalicelib.adapters.admission.dynamodb import DynamoDbAdmissionStore
        from chalicelib.adapters.aws import AwsClients
        from chalicelib.adapters.geo import CachingLocator, MaxMindLocator
        from chalicelib.adapters.issuers.aws_iot import AwsIotIssuer
        from chalicelib.adapters.issuers.endpoints_dynamodb import DynamoDbEndpoints
        from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
        from chalicelib.domain.admission import DEFAULT_BUDGET, budgets_from
        from chalicelib.domain.regions import RegionPolicy
        from chalicelib.services.admission import Admission
        from chalicelib.services.provisioning import ProvisioningService
        clients = AwsClients(session=session)
        regions = list(REGION_IPS)
        for region in regions:
            sim.attach_iot(clients.client("iot", region), region)
            sim.attach_iot(clients.client("iot", region, retries=False), region)
        dynamodb = clients.client("dynamodb")
        sim.attach(dynamodb)
        executor = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"iot-{index}")
        shared = DynamoDbEndpoints(dynamodb, f"{TABLE}-nonces")
        gate = None
        if admission:  # as chalicelib.container composes the prod stage
            gate = Admission(DynamoDbAdmissionStore(dynamodb, f"{TABLE}-nonces"),
                             budgets_from({"*": rate}, DEFAULT_BUDGET), executor=ContextExecutor(2))

            issuer = AwsIotIssuer(lambda region: clients.client("iot", region), executor,
                                  mutating_client_for_region=lambda region: clients.client("iot", region, retries=False),
                                  on_throttle=gate.throttled,
                                  shared_endpoints=shared)
        else:  # botocore's standard retries on every call, no shared budget
            issuer = AwsIotIssuer(lambda region: clients.client("iot", region), executor, shared_endpoints=shared)
        self.service = ProvisioningService(
            registry=DynamoDbRegistry(dynamodb, TABLE, executor=ContextExecutor(2)), issuer=issuer,
            locator=CachingLocator(MaxMindLocator.bundled()),
            regions=RegionPolicy(regions, "eu-west-2"), verifier=verifier, allow_v1=False, admission=gate)
        self.started, self.stalls = 0.0, Stalls()  # the request being served: its start on its clock
        self.clock = self.stalls.clock

    def handle(self, body: dict, ip: str) -> Reply:
        """What app.py's route does, minus HTTP: parse, one service call under the function's deadline, domain
        errors to statuses."""
        from chalicelib.domain.deadline import DEFAULT_BUDGET_SECONDS, Deadline
        from chalicelib.domain.errors import ProvisioningError, ServiceUnavailable
        from chalicelib.domain.requests import ProvisioningRequest
        from chalicelib.edge.http import HTTP_STATUS
        from chalicelib.edge.wire import error_body, response_body
        stalls = self.stalls = Stalls()
        _stalls.set(stalls)
        deadline = Deadline.for_request(LambdaContext(LAMBDA_TIMEOUT_SECONDS, stalls.clock), DEFAULT_BUDGET_SECONDS,
                                        stalls.clock)
        self.started = stalls.clock()
        self.clock = stalls.clock
        try:
            if DEBUG is not None:
                began = time.monotonic()
                try:
                    result = self.service.provision(ProvisioningRequest.from_body(body), ip, deadline=deadline)
                    DEBUG.append((began, time.monotonic() - began, stalls.clock() - self.started, 200))
                except Exception:
                    DEBUG.append((began, time.monotonic() - began, stalls.clock() - self.started, 503))
                    raise
            else:
                result = self.service.provision(ProvisioningRequest.from_body(body), ip, deadline=deadline)
            return Reply(200, response_body(result), {})
        except ProvisioningError as exc:
            status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 400)
            headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ServiceUnavailable) else {}
            return Reply(status, error_body(exc.code, exc.message), headers)
        except Exception as exc:
            return Reply(503, error_body("service-unavailable", f"{type(exc).__name__}"), {"Retry-After": "30"})


class Gateway:
    """API Gateway + Lambda as the device client's `requests` session sees them: a request goes to an idle
    container, which is busy until its request ends; an answer later than API Gateway's 29 s is a 504.

    When all K containers are busy the request waits for one instead of Lambda's 429: here a request holds its
    container far longer than on AWS (one interpreter's CPU and moto's lock are inside it; at this storm's size
    Lambda would need about 11 concurrent containers, admission.reserved_concurrency), and 429s the simulator
    caused sent devices into their exponential back-off and past their ten attempts. The wait is counted."""

    def __init__(self, idle: queue.Queue, ip: str, deadline: float, stats: Counter):
        self._idle, self._ip, self._deadline, self._stats = idle, ip, deadline, stats

    def post(self, url: str, data: str, headers: dict, timeout: Any) -> Reply:
        waited = time.monotonic()
        while True:
            if time.monotonic() > self._deadline:
                raise Cut()
            try:
                container = self._idle.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        waited = time.monotonic() - waited
        if waited > 0.1:
            self._stats["queued_for_a_container"] += 1
        try:
            reply = container.handle(json.loads(data), self._ip)
            if container.clock() - container.started > GATEWAY_TIMEOUT_SECONDS:  # simulated time, as the deadline
                self._stats["gateway_timeouts"] += 1
                return Reply(504, {"message": "Endpoint request timed out"}, {})
            if reply.status_code != 200:
                self._stats[f"refused {reply.status_code} {reply.body.get('code', '')}"] += 1
            return reply
        finally:
            self._idle.put(container)


class ContextExecutor(cf.ThreadPoolExecutor):
    """A container's pool (the registry's, admission's), carrying the caller's context (its Stalls) to what it runs
    beside the request's own work (admission's write beside the claim)."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> cf.Future:  # type: ignore[override]
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


# ---------------------------------------------------------------- one storm

@dataclass
class Device:
    name: str
    ip: str
    csr_pem: str
    power_on: float = 0.0
    provisioned: float | None = None
    gave_up: bool = False
    attempts: int = 0


@dataclass
class StormResult:
    label: str
    devices: int
    makespan_s: float | None
    quota_bound_s: float
    raw_quota_bound_s: float
    iot_calls: int
    throttled_calls: int
    gave_up: int
    unprovisioned: int
    orphans: int
    audit_clean: bool
    p50_s: float | None
    p99_s: float | None
    simulator_cpu_share: float
    wall_s: float
    capped_at_s: float | None
    cpu_load: float = 0.0   # the process's CPU seconds per second: near 1 (one interpreter), the simulator is the limit
    timeline: list[float] = field(default_factory=list)
    requests: int = 0
    queued: int = 0          # requests that waited for a free container (see Gateway)
    gateway_timeouts: int = 0
    containers: int = 0
    refused: dict = field(default_factory=dict)
    calls_by_operation: dict = field(default_factory=dict)
    throttled_by_operation: dict = field(default_factory=dict)

    def summary(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("timeline", "label")}
        d["ratio"] = round(self.makespan_s / self.quota_bound_s, 3) if self.makespan_s else None
        d["ratio_raw_quota"] = round(self.makespan_s / self.raw_quota_bound_s, 3) if self.makespan_s else None
        d["throttled_share"] = round(self.throttled_calls / self.iot_calls, 4) if self.iot_calls else 0.0
        return d


def make_devices(n: int) -> list[Device]:
    regions = list(REGION_IPS)
    devices = []
    for i in range(n):
        name = f"storm-{i:06d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA256()))
        devices.append(Device(name, REGION_IPS[regions[i % len(regions)]],
                              csr.public_bytes(serialization.Encoding.PEM).decode()))
    return devices


def run_storm(label: str, size: dict, admission: bool, fleet_key: Any, seed: int = 7) -> StormResult:
    import botocore.session
    from moto import mock_aws

    from admin import operations
    from chalicelib.adapters.aws_models import lean_loader
    from chalicelib.adapters.issuers.aws_iot import AwsIotIssuer
    from chalicelib.adapters.issuers.endpoints_dynamodb import DynamoDbEndpoints
    from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
    from chalicelib.domain.admission import IOT_QUOTAS, ISSUE_CSR, quota_budget, reserved_concurrency
    from chalicelib.domain.signatures import FleetKeyVerifier
    gd = load_device_module()
    rng = random.Random(seed)
    scale = size["quota"] / min(IOT_QUOTAS[c] for c in ISSUE_CSR)
    quotas = {api: q * scale for api, q in {**OTHER_QUOTAS, **IOT_QUOTAS}.items()}
    budget = quota_budget(quotas)
    devices = make_devices(size["devices"])
    per_region = Counter(d.ip for d in devices)
    busiest = max(per_region.values())
    quota_bound = busiest / budget.csr_per_s           # what the admitted budget allows
    raw_bound = busiest / size["quota"]                 # what the raw (scaled) quota allows
    cap = None if admission else 3 * quota_bound
    with mock_aws():  # a fresh AWS for each storm
        boto3.client("iot", region_name="eu-west-2").list_things()  # build moto's routers on one thread
        setup = boto3.client("dynamodb", region_name="eu-west-2")
        registry = DynamoDbRegistry(setup, TABLE, executor=cf.ThreadPoolExecutor(2))
        registry.create()
        registry.register(d.name for d in devices)
        # What `admin --stage prod init` does at deployment: each region's endpoint recorded for the containers.
        look = {r: boto3.client("iot", region_name=r) for r in REGION_IPS}
        AwsIotIssuer(lambda region: look[region], cf.ThreadPoolExecutor(4),
                     shared_endpoints=DynamoDbEndpoints(setup, f"{TABLE}-nonces")).check(tuple(REGION_IPS))
        sim = SimulatedAws(quotas, OTHER_DEFAULT * scale, size["latency"])
        idle: queue.Queue = queue.Queue()
        gateway_stats: Counter = Counter()
        # The containers share one botocore session: it holds only the (lean) service models, and a session
        # each would cost this process 130 ms of CPU and 5 MB per container. Each has its own clients.
        session = botocore.session.get_session()
        session.register_component("data_loader", lean_loader())
        limit = ((size["containers"] or reserved_concurrency(len(REGION_IPS), budget)) if admission
                 else min(size["uncapped"], len(devices)))
        threading.stack_size(512 * 1024)
        verifier = FleetKeyVerifier(fleet_key.public_key())
        containers = [Container(i, sim, admission, budget.csr_per_s, verifier, session) for i in range(limit)]
        for c in containers:
            idle.put(c)
        say(f"  {label}: {len(devices)} devices over {len(per_region)} regions, {limit} containers, "
            f"quota {size['quota']:g}/s, budget {budget.csr_per_s:g}/s, quota bound {quota_bound:.1f} s"
            + (f", capped at {cap:.0f} s" if cap else ""))
        go = threading.Event()  # every device thread is up before the fleet powers on
        clock = {"started": 0.0, "deadline": 0.0}

        def cut_sleep(seconds: float) -> None:
            remaining = clock["deadline"] - time.monotonic()
            if seconds >= remaining:
                time.sleep(max(0.0, remaining))
                raise Cut()
            time.sleep(seconds)

        def device_life(device: Device) -> None:
            go.wait()
            time.sleep(max(0.0, clock["started"] + device.power_on - time.monotonic()))
            client = gd.ProvisioningClient(
                "https://storm.invalid/api", session=Gateway(idle, device.ip, clock["deadline"], gateway_stats),
                sleep=cut_sleep, max_retry_after=gd.MAX_RETRY_AFTER)

            def body() -> dict:
                device.attempts += 1
                return gd.build_v2_request(device.name, fleet_key, device.csr_pem)
            try:
                client.provision(body)
                device.provisioned = time.monotonic() - clock["started"]
            except gd.ClientError:
                device.gave_up = True
            except Cut:
                pass

        for device in devices:
            device.power_on = rng.uniform(0, size["ramp"])
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            threads = [threading.Thread(target=device_life, args=(d,), daemon=True) for d in devices]
            for t in threads:
                t.start()
            started = clock["started"] = time.monotonic()
            clock["deadline"] = started + (cap if cap else 20 * quota_bound + 60)
            cpu_started = time.process_time()
            go.set()
            last_report = time.monotonic()
            while any(t.is_alive() for t in threads):
                time.sleep(0.5)
                if time.monotonic() - last_report > 10:
                    done = sum(d.provisioned is not None for d in devices)
                    say(f"    {time.monotonic() - started:5.0f} s: {done}/{len(devices)} provisioned")
                    last_report = time.monotonic()
        wall = time.monotonic() - started
        cpu, moto_cpu = time.process_time() - cpu_started, sim.moto_cpu
        # The audit (the operator's own use case) over clients the throttling layer does not touch.
        report = operations.audit(registry, AwsIotIssuer(lambda region: look[region], cf.ThreadPoolExecutor(4)),
                                  REGION_IPS, datetime.now(timezone.utc))
        orphans = len(report.orphan_certificates) + len(report.orphan_things)
        if DEBUG is not None:
            say(str(report)[:600])
            for b in range(0, int(wall) + 5, 5):
                rows = [d for d in DEBUG if b <= d[0] - started < b + 5]
                for status in (200, 503):
                    got = [d for d in rows if d[3] == status]
                    if got:
                        say(f"    {b:3d}-{b + 5:3d} s: {status} x{len(got)}, wall {statistics.mean(d[1] for d in got):.2f} s, "
                            f"simulated {statistics.mean(d[2] for d in got):.2f} s")
            DEBUG.clear()
            say(str(gateway_stats))
        audit_clean = report.findings == 0
    times = sorted(d.provisioned - d.power_on for d in devices if d.provisioned is not None)
    finished = [d.provisioned for d in devices if d.provisioned is not None]
    provisioned_all = len(finished) == len(devices)
    return StormResult(
        label=label, devices=len(devices),
        makespan_s=round(max(finished), 2) if provisioned_all else None,
        quota_bound_s=round(quota_bound, 2), raw_quota_bound_s=round(raw_bound, 2),
        iot_calls=sum(sim.calls.values()), throttled_calls=sum(sim.throttled.values()),
        gave_up=sum(d.gave_up for d in devices),
        unprovisioned=sum(d.provisioned is None for d in devices), orphans=orphans, audit_clean=audit_clean,
        p50_s=round(statistics.median(times), 2) if times else None,
        p99_s=round(times[min(len(times) - 1, int(0.99 * len(times)))], 2) if times else None,
        simulator_cpu_share=round(moto_cpu / cpu, 3) if cpu else 0.0, cpu_load=round(cpu / wall, 3),
        wall_s=round(wall, 1), capped_at_s=round(cap, 1) if cap else None,
        timeline=sorted(finished), requests=sum(d.attempts for d in devices),
        queued=gateway_stats["queued_for_a_container"], gateway_timeouts=gateway_stats["gateway_timeouts"],
        containers=limit,
        refused={k.removeprefix("refused "): v for k, v in sorted(gateway_stats.items()) if k.startswith("refused")},
        calls_by_operation=dict(sorted(sim.calls.items())),
        throttled_by_operation=dict(sorted(sim.throttled.items())))


# ---------------------------------------------------------------- output

def table(results: dict[str, StormResult]) -> str:
    rows = [("", "with admission", "without admission")]
    w, wo = results["with_admission"].summary(), results["without_admission"].summary()

    def fmt(value: Any, unit: str = "") -> str:
        if value is None:
            return "not reached"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:g}{unit}" if isinstance(value, (int, float)) else str(value)
    for label, key, unit in (("devices", "devices", ""), ("makespan", "makespan_s", " s"),
                             ("quota bound (admitted budget)", "quota_bound_s", " s"),
                             ("makespan / quota bound", "ratio", ""),
                             ("makespan / raw-quota bound", "ratio_raw_quota", ""),
                             ("IoT calls", "iot_calls", ""), ("throttled IoT calls", "throttled_calls", ""),
                             ("throttled share", "throttled_share", ""),
                             ("requests sent by devices", "requests", ""),
                             ("Lambda containers (concurrency)", "containers", ""),
                             ("requests that waited for a container", "queued", ""),
                             ("devices that gave up", "gave_up", ""), ("left unprovisioned", "unprovisioned", ""),
                             ("orphans (audit)", "orphans", ""), ("audit clean", "audit_clean", ""),
                             ("p50 time to provisioned", "p50_s", " s"), ("p99 time to provisioned", "p99_s", " s"),
                             ("simulator (moto) share of CPU", "simulator_cpu_share", ""),
                             ("process CPU load (s per s; 1 = the simulator's limit)", "cpu_load", ""),
                             ("answers later than 29 s (504)", "gateway_timeouts", ""), ("wall time", "wall_s", " s"),
                             ("capped at", "capped_at_s", " s")):
        rows.append((label, fmt(w[key], unit), fmt(wo[key], unit)))
    lines = ["| " + " | ".join(rows[0]) + " |", "|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def chart(results: dict[str, StormResult], path: Path, rate_per_region: float, regions: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    horizon = 0.0
    for key, style in (("with_admission", "-"), ("without_admission", "--")):
        r = results[key]
        xs = [0.0] + r.timeline
        ys = list(range(len(xs)))
        ax.step(xs, ys, style, where="post", label=key.replace("_", " "))
        horizon = max(horizon, r.wall_s)
    total = results["with_admission"].devices
    line_end = total / (rate_per_region * regions)
    ax.plot([0, line_end], [0, total], ":", color="grey",
            label=f"quota line ({rate_per_region:g}/s admitted per region)")
    ax.set_xlabel("seconds since the fleet powered on")
    ax.set_ylabel("devices provisioned")
    ax.set_title(f"Onboarding storm: {total} devices, {regions} regions")
    ax.set_xlim(0, horizon)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="storm size (default: %(default)s)")
    p.add_argument("--devices", type=int, help="override the number of devices")
    p.add_argument("--quota", type=float, help="override the scaled quota of the binding call (requests/s)")
    p.add_argument("--only", choices=("with", "without"), help="run one of the two storms (a trial; writes nothing)")
    p.add_argument("--out", type=Path, default=PROJECT_DIR / "bench" / "storm.json", help="results JSON")
    p.add_argument("--chart", type=Path, default=PROJECT_DIR / "docs" / "storm.png", help="chart PNG")
    args = p.parse_args(argv)
    size = dict(SIZES[args.size])
    if args.devices:
        size["devices"] = args.devices
    if args.quota:
        size["quota"] = args.quota
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-2",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        os.environ[name] = value
    os.environ.pop("AWS_PROFILE", None)
    sys.setswitchinterval(0.0005)  # moto's work (one lock, this interpreter) should not hold up the others' sleeps
    import chalicelib.edge.http  # noqa: F401  (the route's error map, imported once before the containers' threads use it)
    fleet_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # the fleet key is RSA
    results = {}
    for key, admission in (("with_admission", True), ("without_admission", False)):
        if args.only and not key.startswith(args.only + "_"):
            continue
        say(f"storm {key.replace('_', ' ')} ...")
        results[key] = run_storm(key, size, admission, fleet_key)
        say(json.dumps({k: v for k, v in results[key].summary().items()}, indent=None))
    if args.only:
        return 0
    from chalicelib.domain.admission import IOT_QUOTAS, ISSUE_CSR, quota_budget
    scale = size["quota"] / min(IOT_QUOTAS[c] for c in ISSUE_CSR)
    budget = quota_budget({api: q * scale for api, q in IOT_QUOTAS.items()})
    out = {key: r.summary() for key, r in results.items()}
    out["parameters"] = {**size, "regions": len(REGION_IPS), "admitted_per_region_s": budget.csr_per_s}
    from bench import provenance
    out["run"] = provenance.provenance("bench.storm", argv)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    chart(results, args.chart, budget.csr_per_s, len(REGION_IPS))
    print(table(results))
    say(f"wrote {args.out} and {args.chart}")
    provenance.refresh(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
