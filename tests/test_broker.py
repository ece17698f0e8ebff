"""The local brokers are as strict as AWS IoT Core (issue 15), proved against real mosquitto and chalice local.

A revoked certificate, whatever revoked it, is refused and its open session closed within 5 s while every other
session stays; the client id must be the certificate's thing name; forbidden subscriptions get SUBACK failure
codes; a broker that dies is noticed.
"""
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization

from admin import cli as admin
from chalicelib.adapters.fleet_keys import load_public_key
from chalicelib.adapters.issuers.local_ca import StackRevocations
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings
from chalicelib.container import Container
from chalicelib.domain.errors import ServiceUnavailable
from chalicelib.domain.requests import ProvisioningRequest
from chalicelib.domain.signatures import FleetKeyVerifier
from chalicelib.edge.health import Health
from chalicelib.services.provisioning import ProvisioningService
from devstack.stack import (
    LocalStack,
    StackError,
    StackFiles,
    build_plugin,
    free_port,
    free_port_run,
    mosquitto_binary,
)
from tests.conftest import LONDON_IP, TOKYO_IP, make_csr, needs_tool, sign_v1
from tests.tmpfs import fill, tmpfs

pytestmark = needs_tool(mosquitto_binary(), "mosquitto")

REGIONS = "eu-west-2,ap-northeast-1"  # LONDON_IP -> eu-west-2, TOKYO_IP -> ap-northeast-1
DEADLINE = 5.0  # the issue's bound: a revoked certificate's session ends within 5 s


@contextmanager
def local_env(state: Path):
    env = {"GIP_STATE_DIR": str(state), "GIP_MQTT_BASE_PORT": str(free_port_run(2)),
           "GIP_ENABLED_REGIONS": REGIONS, "GIP_DEFAULT_REGION": "eu-west-2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield Settings.for_stage("local", str(state))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("broker-state")
    with local_env(state) as settings:
        assert admin.main(["--state-dir", str(state), "keygen"]) == 0
        assert admin.main(["--state-dir", str(state), "register", "--prefix", "dev", "--count", "30"]) == 0
        with LocalStack(settings, free_port(), quiet=True) as running:
            yield running


def fleet_key(stack):
    return serialization.load_pem_private_key(
        (stack.settings.keys_dir / FLEET_PRIVATE_KEY_NAME).read_bytes(), password=None)


def post(stack, thing: str, csr_pem: str, ip: str = LONDON_IP) -> dict:
    body = json.dumps({"thing-name": thing, "thing-name-sig": sign_v1(fleet_key(stack), thing), "CSR": csr_pem})
    request = urllib.request.Request(f"{stack.api_url}/device-provisioning", body.encode(),
                                     {"Content-Type": "application/json", "X-Forwarded-For": ip})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class Device:
    """A thing's certificate and key on disk, as a device holds them."""

    def __init__(self, stack, thing: str, certificate_pem: str, key, region: str):
        folder = stack.settings.state_dir / "held"
        folder.mkdir(exist_ok=True)
        self.thing, self.region, self.stack = thing, region, stack
        self.cert = folder / f"{thing}.{secrets.token_hex(4)}.cert.pem"
        self.key = self.cert.with_suffix(".key")
        self.cert.write_text(certificate_pem)
        self.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))

    @property
    def listener(self):
        return next(item for item in self.stack.files.listeners() if item.region == self.region)


def provision(stack, thing: str, ip: str = LONDON_IP) -> Device:
    csr_pem, key = make_csr(thing)
    reply = post(stack, thing, csr_pem, ip)
    assert reply["status"] == "success", reply
    return Device(stack, thing, reply["certificatePem"], key, reply["region"])


def client_for(device: Device, client_id: str | None = None, protocol=mqtt.MQTTv5) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=device.thing if client_id is None else client_id, protocol=protocol)
    client.tls_set(ca_certs=str(device.listener.ca_file), certfile=str(device.cert), keyfile=str(device.key))
    return client


def attempt(device: Device, client_id: str | None = None, protocol=mqtt.MQTTv5, timeout: float = DEADLINE) -> str:
    """One connection attempt, no retry: 'connected', or how it was refused."""
    client = client_for(device, client_id, protocol)
    result: list[str] = []
    client.on_connect = lambda c, u, f, rc, p: result.append("connected" if not rc.is_failure else f"CONNACK {rc}")
    client.on_disconnect = lambda c, u, f, rc, p: result.append(f"closed ({rc})")
    try:
        client.connect("localhost", device.listener.port)
    except OSError as exc:  # a TLS handshake refused outright (TLS 1.2)
        return f"handshake refused ({exc})"
    deadline = time.monotonic() + timeout
    while not result and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    return result[0] if result else "no answer"


class Session:
    """A connected device that does not reconnect by itself; remembers whether and when it was closed."""

    def __init__(self, device: Device, client_id: str | None = None):
        self.device = device
        self.client = client_for(device, client_id)
        self.client.reconnect_delay_set(600, 600)  # a closed session stays closed during the test
        self.connected, self.closed = threading.Event(), threading.Event()
        self.closed_at: float | None = None
        self.client.on_connect = lambda c, u, f, rc, p: (self.connected.set() if not rc.is_failure
                                                         else self._close())
        self.client.on_disconnect = lambda *args: self._close()
        self.client.connect("localhost", device.listener.port)
        self.client.loop_start()
        assert self.connected.wait(DEADLINE), f"{device.thing} could not connect"

    def _close(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
        self.closed.set()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def sessions(*devices: Device):
    opened = [Session(device) for device in devices]
    try:
        yield opened
    finally:
        for session in opened:
            session.stop()


def assert_closed_within_deadline(session: Session, since: float) -> float:
    assert session.closed.wait(DEADLINE), f"{session.device.thing}'s session was still open after {DEADLINE} s"
    return session.closed_at - since


def assert_alive(session: Session) -> None:
    """The session still carries a QoS 1 publish. The broker serves its clients' packets in order after a reload,
    so an acknowledgement now proves the session outlived every reload that came before (no sleep needed)."""
    sent = session.client.publish(f"data/{session.device.thing}/alive", b"1", qos=1)
    sent.wait_for_publish(DEADLINE)
    assert sent.is_published() and not session.closed.is_set(), f"{session.device.thing}'s session was closed"


def confirmed(stack) -> None:
    """What every revoking command waits for: the stack's brokers all run and have loaded the current CRLs."""
    StackRevocations(stack.settings.state_dir)()


def cli(stack, *argv: str) -> int:
    return admin.main(["--state-dir", str(stack.settings.state_dir), *argv])


# ------------------------------------------------------------------------------------------------ revocation

def test_reset_closes_the_session_and_refuses_the_certificate_while_others_stay(stack, capsys):
    victim, neighbour, far = provision(stack, "dev1"), provision(stack, "dev2"), provision(stack, "dev3", TOKYO_IP)
    assert (victim.region, neighbour.region, far.region) == ("eu-west-2", "eu-west-2", "ap-northeast-1")
    with sessions(victim, neighbour, far) as (open_victim, open_neighbour, open_far):
        started = time.monotonic()
        assert cli(stack, "reset", "dev1") == 0
        returned = time.monotonic()
        refusal = attempt(victim)  # at once, no retry: the brokers have the new CRL when the command returns
        refused_after = time.monotonic() - returned
        latency = assert_closed_within_deadline(open_victim, started)
        assert_alive(open_neighbour)
        assert_alive(open_far)
    assert refusal != "connected", refusal
    with capsys.disabled():
        print(f"\n[reset] admin reset took {returned - started:.2f} s, the session closed {latency:.2f} s after it "
              f"started; a new connection right after: {refusal} after {refused_after:.2f} s")
    # The device provisions again after the reset, and its new certificate works at once.
    assert attempt(provision(stack, "dev1")) == "connected"


def test_audit_fix_closes_an_orphan_certificates_session(stack, capsys):
    csr_pem, key = make_csr("orphan1")
    issued = stack.files.issuer.issue("orphan1", "eu-west-2", _load_csr(csr_pem))  # issued, never recorded
    orphan, neighbour = Device(stack, "orphan1", issued.certificate_pem, key, "eu-west-2"), provision(stack, "dev4")
    with sessions(orphan, neighbour) as (open_orphan, open_neighbour):
        started = time.monotonic()
        cli(stack, "audit", "--fix")
        assert f"revoked orphan certificate {issued.certificate_id}" in capsys.readouterr().out
        assert attempt(orphan) != "connected"
        latency = assert_closed_within_deadline(open_orphan, started)
        assert_alive(open_neighbour)
    with capsys.disabled():
        print(f"\n[audit --fix] orphan's session closed {latency:.2f} s after the command")


def _load_csr(pem: str):
    from cryptography import x509
    return x509.load_pem_x509_csr(pem.encode())


class SessionOpeningIssuer:
    """The stage's real issuer; right after a certificate is issued, a device connects with it (as a device whose
    answer is already on its way could), so the rollback that follows has a session to close."""

    def __init__(self, issuer, key, stack):
        self._issuer, self._key, self._stack = issuer, key, stack
        self.session: Session | None = None

    def __getattr__(self, name):
        return getattr(self._issuer, name)

    def issue(self, thing_name, region, csr, in_place=False):
        issued = self._issuer.issue(thing_name, region, csr, in_place)
        self.session = Session(Device(self._stack, thing_name, issued.certificate_pem, self._key, region))
        return issued


def test_a_rollback_closes_the_session_of_the_certificate_it_revokes(stack, capsys):
    thing = "dev5"
    with sqlite3.connect(stack.settings.registry_path) as db:  # finalize fails after the certificate is issued
        db.execute(f"CREATE TRIGGER fail_{thing} BEFORE UPDATE OF prov_status ON devices WHEN NEW.thing_name = "
                   f"'{thing}' AND NEW.prov_status = 'provisioned' BEGIN SELECT RAISE(ABORT, 'injected'); END")
    csr_pem, key = make_csr(thing)
    neighbour = provision(stack, "dev6")
    settings = stack.settings
    issuer = SessionOpeningIssuer(Container(settings).issuer, key, stack)
    service = ProvisioningService(registry=Container(settings).registry, issuer=issuer, locator=Container(settings).locator,
                                  regions=Container(settings).regions,
                                  verifier=FleetKeyVerifier(load_public_key(settings.fleet_public_key)))
    request = ProvisioningRequest.from_body({"thing-name": thing, "thing-name-sig": sign_v1(fleet_key(stack), thing),
                                             "CSR": csr_pem})
    with sessions(neighbour) as (open_neighbour,):
        with pytest.raises(ServiceUnavailable):
            service.provision(request, LONDON_IP)
        started = time.monotonic()
        session = issuer.session
        try:
            assert attempt(session.device) != "connected"
            latency = assert_closed_within_deadline(session, started)
        finally:
            session.stop()
        assert_alive(open_neighbour)
    with capsys.disabled():
        print(f"\n[rollback] session closed {latency:.2f} s after the rollback")


def test_a_broker_started_later_refuses_what_was_revoked_while_it_was_down(tmp_path, caplog):
    with local_env(tmp_path / "state") as settings:
        assert admin.main(["--state-dir", str(settings.state_dir), "keygen"]) == 0
        assert admin.main(["--state-dir", str(settings.state_dir), "register", "--prefix", "dev", "--count", "2"]) == 0
        with LocalStack(settings, free_port(), quiet=True) as first:
            held = provision(first, "dev1")
            assert attempt(held) == "connected"
        assert cli(first, "reset", "dev1") == 0  # no broker is running: nothing to wait for, and it says so
        # Said on the CLI's stderr (logging's last resort), caught here.
        assert caplog.messages == [f"no local stack is running on {settings.state_dir}: its brokers refuse the "
                                   "revoked certificate from their start (they build their CRLs from the CA records)"]
        with LocalStack(settings, free_port(), quiet=True) as second:
            held.stack = second
            assert attempt(held) != "connected"
            # A restart keeps the previous run's logs (rotated, not emptied).
            assert f"Serving on {first.api_url}" in (second.log_dir / "chalice.log.1").read_text()
            assert "Opening ipv4 listen socket" in (second.log_dir / "mosquitto.eu-west-2.log.1").read_text()
            assert f"Serving on {first.api_url}" not in (second.log_dir / "chalice.log").read_text()


def test_crls_are_renewed_before_they_expire(tmp_path):
    """OpenSSL refuses every certificate once the CRL's nextUpdate has passed: the stack makes new ones in time."""
    lifetime = timedelta(seconds=4)
    with local_env(tmp_path / "state") as settings:
        assert admin.main(["--state-dir", str(settings.state_dir), "keygen"]) == 0
        assert admin.main(["--state-dir", str(settings.state_dir), "register", "--prefix", "dev", "--count", "1"]) == 0
        with LocalStack(settings, free_port(), quiet=True, crl_lifetime=lifetime) as running:
            held = provision(running, "dev1")
            time.sleep(2 * lifetime.total_seconds())  # the first CRLs have expired by now
            assert attempt(held) == "connected"


def fresh_health(stack) -> dict:
    """/health's answer now (not the one chalice local cached): the probes run in this process, which is the
    stack's, so the stack's parts are among them."""
    return Health(Container(stack.settings).health_probes()).check()


def test_a_crl_that_cannot_be_written_fails_the_reset_loudly_until_it_can(stack, capsys):
    device = provision(stack, "dev18")
    blocker = stack.files.crl("eu-west-2").with_name("crl.eu-west-2.pem.tmp")
    blocker.mkdir()  # the CRL's temporary path cannot be written: a real OSError (EISDIR), as root too
    stack.quiet = False  # make local's console
    try:
        with sessions(device) as (open_device,):
            capsys.readouterr()
            assert cli(stack, "reset", "dev18") == 1
            out, err = capsys.readouterr()
            assert "[stack] revocation: the CRL of eu-west-2 could not be written ([Errno 21] Is a directory" in out
            error = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(error) == 1 and "the CRL of eu-west-2 could not be written (Is a directory)" in error[0], err
            assert "run the command again" in error[0]
            health = fresh_health(stack)
            assert health["status"] == "failing" and health["checks"]["revocation"]["status"] == "failing", health
            assert "could not be written" in health["checks"]["revocation"]["detail"]
            assert_alive(open_device)  # not refused yet: the command said so

            blocker.rmdir()
            assert cli(stack, "reset", "dev18") == 0  # as the message says: again, once it can be written
            assert attempt(device) != "connected"
            assert_closed_within_deadline(open_device, time.monotonic())
        assert "[stack] revocation: working again" in capsys.readouterr().out
        assert fresh_health(stack)["status"] == "ok"
    finally:
        stack.quiet = True
        if blocker.is_dir():
            blocker.rmdir()


class Abort(BaseException):
    """Ends the thread it is raised in: no part of the supervisor's work may catch it (they catch Exception)."""


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A stack whose state directory is a 24 MB tmpfs, and whose CRL writer ends the supervisor on request."""
    where = tmp_path_factory.mktemp("small-disk") / "state"
    with tmpfs(where, "24m"), local_env(where) as settings:
        assert admin.main(["--state-dir", str(where), "keygen"]) == 0
        assert admin.main(["--state-dir", str(where), "register", "--prefix", "dev", "--count", "3"]) == 0
        files, doomed = StackFiles(settings), threading.Event()

        def write_crl(region: str, serials: frozenset[int], lifetime: timedelta, number: int) -> None:
            if doomed.is_set():
                raise Abort("the CRL writer ended the thread")
            files.write_crl(region, serials, lifetime, number)

        with LocalStack(settings, free_port(), quiet=True, crl_writer=write_crl) as running:
            yield running, doomed


def test_a_full_disk_fails_health_until_space_returns_and_revocation_works_after(small_disk):
    stack, _ = small_disk
    held = provision(stack, "dev1")
    with sessions(held) as (session,):
        assert fresh_health(stack)["status"] == "ok"
        filler = fill(stack.settings.state_dir)
        try:
            health = fresh_health(stack)
            assert health["status"] == "failing", health
            assert health["checks"]["free_space"]["status"] == "failing"
            assert "below the floor" in health["checks"]["free_space"]["detail"]
            assert cli(stack, "reset", "dev1") == 1  # the CA records or the CRL cannot be written: said, exit 1
        finally:
            filler.unlink()
        assert cli(stack, "reset", "dev1") == 0  # after the episode: revoked, and refused when it returns
        assert attempt(held) != "connected"
        assert_closed_within_deadline(session, time.monotonic())
    assert fresh_health(stack)["status"] == "ok"


def test_a_supervisor_that_ends_stops_the_stack_and_fails_health(small_disk):
    stack, doomed = small_disk
    provision(stack, "dev2")
    doomed.set()
    assert cli(stack, "reset", "dev2") == 1  # told, not left waiting
    assert stack.failed.is_set()  # what make local waits on: it stops everything and exits 1
    assert stack.failure.startswith("the stack's supervisor stopped (Abort: the CRL writer ended the thread)")
    health = fresh_health(stack)
    assert health["checks"]["supervisor"]["status"] == "failing"
    assert health["checks"]["supervisor"]["detail"].startswith("the stack's supervisor stopped (Abort")


# ------------------------------------------------------------------------------------ client id = thing name

def test_a_foreign_client_id_is_refused_and_the_owner_stays_connected(stack):
    owner, intruder = provision(stack, "dev7"), provision(stack, "dev8")
    with sessions(owner) as (open_owner,):
        assert attempt(intruder, client_id="dev7") == "CONNACK Not authorized"
        assert attempt(intruder, client_id="dev7", protocol=mqtt.MQTTv311) == "CONNACK Not authorized"
        assert_alive(open_owner)
    assert attempt(intruder) == "connected"  # its own id works


def test_one_certificate_cannot_open_sessions_under_other_client_ids(stack):
    device = provision(stack, "dev9")
    outcomes = [attempt(device, client_id=f"dev9-{secrets.token_hex(6)}") for _ in range(200)]
    assert [o for o in outcomes if o != "CONNACK Not authorized"] == []


# -------------------------------------------------------------------------------------------- subscriptions

_provisioned: dict = {}


def provisioned(stack, thing: str) -> Device:
    """The thing's device, provisioned on first use (the parametrized test runs twice)."""
    if thing not in _provisioned:
        _provisioned[thing] = provision(stack, thing)
    return _provisioned[thing]


FORBIDDEN = ["#", "$SYS/#", "data/#", "data/+/misc", "data/dev11/#", "dev10/#", "data/dev10x/#"]


@pytest.mark.parametrize("protocol, refused", [(mqtt.MQTTv311, 0x80), (mqtt.MQTTv5, 0x87)])
def test_forbidden_subscriptions_get_a_failure_code(stack, protocol, refused):
    device = provisioned(stack, "dev10")
    client = client_for(device, protocol=protocol)
    granted: list = []
    client.on_subscribe = lambda c, u, mid, codes, p: granted.extend(codes)
    client.connect("localhost", device.listener.port)
    client.loop_start()
    try:
        client.subscribe([(topic, 1) for topic in FORBIDDEN + ["data/dev10/#", "data/dev10"]])
        deadline = time.monotonic() + DEADLINE
        while not granted and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
    assert [code.value for code in granted] == [refused] * len(FORBIDDEN) + [1, 1]


# ----------------------------------------------------------------------------------------- dead brokers

def test_a_dead_broker_is_restarted_and_keeps_its_revocations(stack):
    device = provision(stack, "dev12")
    revoked = provision(stack, "dev13")
    assert cli(stack, "reset", "dev13") == 0
    broker = stack.brokers["eu-west-2"]
    os.kill(broker.pid, signal.SIGKILL)
    broker.wait(timeout=10)
    confirmed(stack)  # returns once the broker runs again, listens, and has loaded the CRL
    assert stack.brokers["eu-west-2"] is not broker, "the dead broker was not restarted"
    assert attempt(device) == "connected"
    assert attempt(revoked) != "connected"
    assert stack.failure is None


def test_make_local_names_a_dead_broker_and_stops_when_it_keeps_dying(tmp_path):
    env = {**os.environ, "GIP_STATE_DIR": str(tmp_path), "GIP_MQTT_BASE_PORT": str(free_port_run(2)),
           "GIP_ENABLED_REGIONS": REGIONS, "GIP_DEFAULT_REGION": "eu-west-2"}
    runner = subprocess.Popen([sys.executable, "-m", "devstack.local", "--api-port", str(free_port())],
                              cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in runner.stdout:
            if "Press Ctrl-C" in line:
                break
        killed = 0
        deadline = time.monotonic() + 60
        while runner.poll() is None and time.monotonic() < deadline:
            for pid in _broker_pids(runner.pid, "ap-northeast-1"):
                os.kill(pid, signal.SIGKILL)
                killed += 1
            time.sleep(0.2)
        assert runner.wait(timeout=30) == 1
        output = runner.stdout.read()
    finally:
        if runner.poll() is None:
            runner.kill()
    assert "the mosquitto broker of ap-northeast-1 stopped" in output
    assert "restarting the broker of ap-northeast-1" in output
    assert "Opening ipv4 listen socket" in output  # the tail of the broker's log
    assert "error: stopping the local stack" in output and "stopping the stack" in output
    assert killed > LocalStack.RESTARTS_PER_MINUTE


def test_sigint_to_a_background_make_local_stops_it_without_restarting_a_broker(tmp_path):
    """`make local &` inherits SIGINT ignored, while mosquitto takes it and stops: it must not look like a death."""
    env = {**os.environ, "GIP_STATE_DIR": str(tmp_path), "GIP_MQTT_BASE_PORT": str(free_port_run(2)),
           "GIP_ENABLED_REGIONS": REGIONS, "GIP_DEFAULT_REGION": "eu-west-2"}
    runner = subprocess.Popen([sys.executable, "-m", "devstack.local", "--api-port", str(free_port())],
                              cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        started = []
        for line in runner.stdout:
            started.append(line)
            if "Press Ctrl-C" in line:
                break
        os.killpg(runner.pid, signal.SIGINT)  # what Ctrl-C does to the whole process group
        assert runner.wait(timeout=60) == 0
        output = "".join(started) + runner.stdout.read()
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    assert "restarting" not in output and "error" not in output, output
    assert "stopped mosquitto and chalice local" in output
    assert f"Logs: {tmp_path / 'logs'} (chalice.log, mosquitto.eu-west-2.log, ...; the previous runs' as .log.1" in output


def _broker_pids(parent: int, region: str) -> list[int]:
    # Every thread's children: the stack restarts brokers from its supervising thread.
    children = [int(p) for task in Path(f"/proc/{parent}/task").glob("*") for p in (task / "children").read_text().split()]
    found = []
    for pid in children:
        try:
            if f"mosquitto.{region}.conf" in Path(f"/proc/{pid}/cmdline").read_text():
                found.append(pid)
        except OSError:
            pass
    return found


# ------------------------------------------------------------------------------- the device client says why

def run_device(stack, thing: str, *flags: str, count: int = 1) -> tuple[subprocess.CompletedProcess, float]:
    argv = [sys.executable, "device/global_device.py", "-t", thing, "-a", stack.api_url, "-c", "-k",
            "--forwarded-for", LONDON_IP, "--state-dir", str(stack.settings.state_dir / "devices"),
            "--root-ca", str(stack.files.bundle),
            "--signing-key", str(stack.settings.keys_dir / FLEET_PRIVATE_KEY_NAME),
            "--count", str(count), "--interval", "0.1", "--max-attempts", "1", *flags]
    started = time.monotonic()
    result = subprocess.run(argv, check=False, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - started


def endpoint_file(stack, thing: str) -> Path:
    return stack.settings.state_dir / "devices" / f"{thing}.endpoint"


def test_device_exits_at_once_when_its_certificate_is_revoked(stack, capsys):
    assert run_device(stack, "dev14")[0].returncode == 0
    assert cli(stack, "reset", "dev14") == 0
    result, took = run_device(stack, "dev14")
    assert result.returncode == 8, result.stdout + result.stderr
    assert "certificate revoked" in result.stderr and "--reprovision-if-revoked" in result.stderr
    assert took < DEADLINE, f"took {took:.1f} s"
    assert endpoint_file(stack, "dev14").exists()  # without the flag, nothing is discarded
    with capsys.disabled():
        print(f"\n[device] revoked certificate: exit 8 after {took:.2f} s (process start included)")


def test_device_exits_at_once_on_another_regions_broker(stack):
    assert run_device(stack, "dev15")[0].returncode == 0
    path = endpoint_file(stack, "dev15")
    endpoint = json.loads(path.read_text())
    tokyo = next(item for item in stack.files.listeners() if item.region == "ap-northeast-1")
    path.write_text(json.dumps({**endpoint, "endpointPort": tokyo.port}))
    result, took = run_device(stack, "dev15")
    assert result.returncode == 8, result.stdout + result.stderr
    assert "unknown ca" in result.stderr and "region" in result.stderr
    assert took < DEADLINE, f"took {took:.1f} s"


def test_device_provisions_again_after_a_reset_when_told_to(stack, monitor_messages):
    assert run_device(stack, "dev16")[0].returncode == 0
    before = json.loads(endpoint_file(stack, "dev16").read_text())["certificateId"]
    monitor_messages("dev16", 1.0)  # the first run's message
    assert cli(stack, "reset", "dev16") == 0
    result, _ = run_device(stack, "dev16", "--reprovision-if-revoked", count=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "certificate revoked" in result.stdout and "setting the revoked credentials aside" in result.stdout
    after = json.loads(endpoint_file(stack, "dev16").read_text())["certificateId"]
    assert after != before
    assert json.loads(Path(f"{endpoint_file(stack, 'dev16')}.revoked").read_text())["certificateId"] == before
    assert [m.payload["thing-name"] for m in monitor_messages("dev16")] == ["dev16", "dev16"]


def test_device_keeps_its_credentials_when_the_refusal_is_not_a_revocation(stack):
    assert run_device(stack, "dev17")[0].returncode == 0
    path = endpoint_file(stack, "dev17")
    endpoint = json.loads(path.read_text())
    tokyo = next(item for item in stack.files.listeners() if item.region == "ap-northeast-1")
    path.write_text(json.dumps({**endpoint, "endpointPort": tokyo.port}))
    result, _ = run_device(stack, "dev17", "--reprovision-if-revoked")
    assert result.returncode == 8, result.stdout + result.stderr
    assert path.exists() and not Path(f"{path}.revoked").exists()


@pytest.fixture
def monitor_messages(stack):
    from devstack.monitor import Monitor
    with Monitor(stack.files) as monitor:
        def received(thing: str, wait: float = 3.0) -> list:
            deadline, got = time.monotonic() + wait, []
            while time.monotonic() < deadline:
                got += [m for m in monitor.drain(wait=0.2) if m.topic.startswith(f"data/{thing}/")]
            return got
        yield received


def test_without_the_build_tools_the_stack_says_what_to_install(tmp_path):
    needs = {"gcc": None, "no-such-dev": str(tmp_path / "no-such-header.h")}
    with pytest.raises(StackError) as raised:
        build_plugin(tmp_path / "build", needs, root=False)
    assert "needs no-such-dev. Install with: sudo apt-get install -y gcc no-such-dev" in str(raised.value)
    assert not (tmp_path / "build").exists()
