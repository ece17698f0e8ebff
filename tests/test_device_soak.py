"""The device in the field (issue 25), with real processes on the local stack: one device process lives through its
broker's kill -9, an operator's reset, a renewal in place and a restart of the API, and is still the same process,
connected, without a traceback, at the end; and two copies of one device stop revoking each other.

Nothing here sleeps for a result: every step waits for what can be observed (the device's own lines, the
subscriber's messages, the stack's processes) within a generous overall limit.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings
from devstack.stack import MONITOR_IDENTITY, LocalStack, free_port, free_port_run, mosquitto_binary
from tests.conftest import LONDON_IP
from tests.test_device_client import gd

pytestmark = pytest.mark.skipif(mosquitto_binary() is None,
                                reason="mosquitto is not installed (.ci/run installs it)")

# The operator CLI, in one place (it is about to move to `python -m admin`).
ADMIN = [sys.executable, "-m", "admin"]
REGION = "eu-west-2"
PATIENCE = 60.0  # the longest any one step may take on a loaded machine; no step normally needs more than a few s
ACK = re.compile(r"^<= message (\d+) acknowledged")


def admin(stack_or_settings, *argv: str) -> subprocess.CompletedProcess:
    settings = getattr(stack_or_settings, "settings", stack_or_settings)
    env = {**os.environ, "GIP_STATE_DIR": str(settings.state_dir)}
    result = subprocess.run([*ADMIN, "--state-dir", str(settings.state_dir), *argv], cwd=PROJECT_DIR, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def wait_until(what: str, condition, patience: float = PATIENCE):
    deadline = time.monotonic() + patience
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"still waiting, after {patience:.0f} s, for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("soak-state")
    # A short claim lease: a second copy of a device is re-keyed after 2 s rather than after the default 50 s.
    env = {"GIP_STATE_DIR": str(state), "GIP_MQTT_BASE_PORT": str(free_port_run(1)), "GIP_ENABLED_REGIONS": REGION,
           "GIP_DEFAULT_REGION": REGION, "GIP_CLAIM_LEASE_SECONDS": "2"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = Settings.for_stage("local", str(state))
        admin(settings, "keygen")
        admin(settings, "register", "soak1", "copy1", "renew1", "sample1")
        with LocalStack(settings, free_port(), quiet=True) as running:
            yield running


class Api:
    """chalice local of the stack's state on a port of its own, so that the test may stop and start it (the stack's
    own API is the stack's to supervise)."""

    def __init__(self, stack: LocalStack, log: Path):
        self.stack, self.log, self.port = stack, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(PROJECT_DIR / "devstack" / "chalice_local.py"), "local", "--stage", "local",
                 "--host", "127.0.0.1", "--port", str(self.port), "--no-autoreload"],
                cwd=PROJECT_DIR, env=self.stack.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until("the API to answer", self._answers)

    def _answers(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def api(stack, tmp_path_factory):
    running = Api(stack, tmp_path_factory.mktemp("api") / "chalice.log")
    running.start()
    yield running
    running.stop()


def device_argv(stack: LocalStack, api: Api, thing: str, state_dir: Path, *flags: str) -> list[str]:
    # -a as the original sample takes it: the full URL of the provisioning route.
    return [sys.executable, "device/global_device.py", "-t", thing, "-a", f"{api.url}/device-provisioning", "-c",
            "--forwarded-for", LONDON_IP, "--state-dir", str(state_dir), "--root-ca", str(stack.files.bundle),
            "--signing-key", str(stack.settings.keys_dir / FLEET_PRIVATE_KEY_NAME), "--max-attempts", "3", *flags]


def run_device(*args, **flags) -> subprocess.CompletedProcess:
    return subprocess.run(device_argv(*args, **flags), cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


class Device:
    """A device client process; its output is read as it comes (stdout and stderr, in order)."""

    def __init__(self, stack: LocalStack, api: Api, thing: str, state_dir: Path, *flags: str):
        self.lines: list[str] = []
        self.process = subprocess.Popen(device_argv(stack, api, thing, state_dir, *flags), cwd=PROJECT_DIR,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def mark(self) -> int:
        return len(self.lines)

    def said(self, since: int, *texts: str) -> int | None:
        """The line index after `texts` appeared in this order from line `since` on, else None."""
        index = since
        for text in texts:
            index = next((i + 1 for i in range(index, len(self.lines)) if text in self.lines[i]), None)
            if index is None:
                return None
        return index

    def wait_said(self, since: int, *texts: str) -> int:
        return wait_until(f"{texts} from the device; it said:\n" + "\n".join(self.lines[since:][-40:]),
                          lambda: self.said(since, *texts) or (self.process.poll() is not None and self._died()))

    def _died(self):
        raise AssertionError(f"the device ended with {self.process.returncode}:\n{self.output()[-4000:]}")

    def acknowledged(self) -> list[tuple[int, int, int]]:
        """(sequence, connection number, line index) of every PUBACK the device reported."""
        found, connection = [], 0
        for index, line in enumerate(list(self.lines)):
            if line.startswith("<= connected"):
                connection += 1
            elif matched := ACK.match(line):
                found.append((int(matched[1]), connection, index))
        return found

    def connections(self) -> int:
        return sum(line.startswith("<= connected") for line in list(self.lines))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self._reader.join(10)
        return code


class Subscriber:
    """Watches data/<thing>/# on the region's broker with the stack's observer identity and subscribes again after
    every loss. Records in order ('subscribed',), ('lost',) and ('message', sequence)."""

    def __init__(self, stack: LocalStack, thing: str):
        listener = next(item for item in stack.files.listeners() if item.region == REGION)
        self.events: list[tuple] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"{MONITOR_IDENTITY}-{thing}", protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(listener.ca_file), certfile=str(listener.monitor_cert),
                            keyfile=str(stack.files.monitor_key))
        self.client.reconnect_delay_set(0.2, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"data/{thing}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.events.append(("subscribed",))
        self.client.on_disconnect = lambda *args: self.events.append(("lost",))
        self.client.on_message = lambda c, u, m: self.events.append(("message", json.loads(m.payload)["sequence"]))
        self.client.connect("localhost", listener.port)
        self.client.loop_start()
        wait_until("the subscriber's SUBACK", lambda: ("subscribed",) in self.events)

    def received(self, since: int = 0) -> list[int]:
        return [e[1] for e in self.events[since:] if e[0] == "message"]

    def received_after_subscribing_again(self, since: int) -> list[int]:
        """The messages after the first SUBACK recorded from event `since` on."""
        again = next((i for i in range(since, len(self.events)) if self.events[i] == ("subscribed",)), None)
        return [] if again is None else self.received(again)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def must_have_arrived(device: Device, subscriber: Subscriber, kill: dict) -> tuple[set, set]:
    """(the messages the subscriber must have received, the ones acknowledged around the broker's kill).

    The subscriber was subscribed before the device started, and only the kill of the broker took its subscription
    away. So every message acknowledged is owed to it except those the kill made uncertain: acknowledged but not yet
    reported when the broker was killed (in flight), and those sent to the restarted broker before the subscriber's
    new subscription. The first message the subscriber got after subscribing again, s0, was sent after that
    subscription, and a connection sends in order: from s0 on, in the connection that carried it, and on every later
    connection, each acknowledged message is owed again."""
    acked = device.acknowledged()
    s0 = subscriber.received_after_subscribing_again(kill["subscriber_events"])[0]
    s0_connection = min(connection for sequence, connection, _ in acked if sequence == s0)
    owed, uncertain = set(), set()
    for sequence, connection, line in acked:
        before_kill = connection <= kill["connections"] and line < kill["lines"]
        after_subscribed_again = connection > s0_connection or (connection == s0_connection and sequence >= s0)
        (owed if before_kill or after_subscribed_again else uncertain).add(sequence)
    return owed, uncertain - owed


def test_one_device_process_lives_through_its_bad_days(stack, api, tmp_path, capsys):
    subscriber = Subscriber(stack, "soak1")
    state = tmp_path / "device"
    device = Device(stack, api, "soak1", state, "-k", "--key-type", "ec", "--interval", "0.2",
                    "--reprovision-if-revoked")
    endpoint = state / "soak1.endpoint"
    try:
        device.wait_said(0, "<= connected")
        wait_until("messages at the subscriber", lambda: len(subscriber.received()) >= 3)
        pid = device.process.pid

        # 1. The broker dies (kill -9); the stack restarts it; the device reconnects and sends what waited.
        broker = stack.brokers[REGION]
        kill = {"connections": device.connections(), "lines": device.mark(), "subscriber_events": len(subscriber.events)}
        os.kill(broker.pid, signal.SIGKILL)
        mark = device.wait_said(kill["lines"], "<= connection to", "<= connected again")
        s0 = wait_until("the subscriber to subscribe again and get a message",
                        lambda: subscriber.received_after_subscribing_again(kill["subscriber_events"]))[0]
        wait_until(f"the device to report message {s0}'s acknowledgement",
                   lambda: s0 in [sequence for sequence, _, _ in device.acknowledged()])

        # 2. An operator resets the device: its session is closed, its certificate refused; it provisions again.
        revoked = json.loads(endpoint.read_text())["certificateId"]
        mark = device.mark()
        admin(stack, "reset", "soak1")
        mark = device.wait_said(mark, "certificate revoked", "setting the revoked credentials aside",
                                "<= provisioned", "<= connected again")
        provisioned = json.loads(endpoint.read_text())["certificateId"]
        assert provisioned != revoked

        # 3. Renewal in place, asked for with SIGUSR1: new certificate, a new connection, the same process. The
        #    renewal revokes the previous certificate before it answers (the local stage's brokers refuse it when
        #    the revocation returns), so the old session closes first and the device connects with the new one.
        device.process.send_signal(signal.SIGUSR1)
        mark = device.wait_said(mark, "renewal asked for", "<= renewed", "<= connected again")
        assert json.loads(endpoint.read_text())["certificateId"] not in (revoked, provisioned)

        # 4. The API stops: a renewal asked for meanwhile fails with one clear line and the device carries on;
        #    once the API is back, the renewal goes through.
        api.stop()
        device.process.send_signal(signal.SIGUSR1)
        mark = device.wait_said(mark, "renewal asked for", "nothing is listening at", "carrying on with the current")
        api.start()
        device.process.send_signal(signal.SIGUSR1)
        mark = device.wait_said(mark, "renewal asked for", "<= renewed", "<= connected again")

        # The same process, still connected: it goes on publishing, and its last state line is a connection.
        last = len(subscriber.received())
        wait_until("fresh messages after the last step", lambda: len(subscriber.received(0)) >= last + 3)
        state_lines = [line for line in device.lines if line.startswith(("<= connected", "<= connection", "<= cannot"))]
        assert state_lines[-1].startswith("<= connected"), state_lines[-5:]
        assert device.process.poll() is None and device.process.pid == pid and Path(f"/proc/{pid}").exists()

        assert device.stop() == 0  # SIGTERM: exit 0, session closed
    finally:
        if device.process.poll() is None:
            device.process.kill()
        subscriber.stop()
        if api.process.poll() is not None:
            api.start()  # for the next test
    output = device.output()
    assert "Traceback" not in output, output[-4000:]
    assert device.said(mark, "=> session closed (MQTT DISCONNECT)", "=> SIGTERM: stopped, files intact")
    assert json.loads(endpoint.read_text())["certificateId"]  # files intact

    owed, around_kill = must_have_arrived(device, subscriber, kill)
    received = set(subscriber.received())
    missing = sorted(owed - received)
    assert not missing, f"acknowledged while the subscriber was subscribed, never received: {missing}"
    with capsys.disabled():
        acked = device.acknowledged()
        print(f"\n[soak] {len(acked)} messages acknowledged over {device.connections()} connections, "
              f"{len(owed)} owed to the subscriber and all received; around the broker's kill -9, "
              f"{len(around_kill)} acknowledged while the subscriber was not subscribed (in flight at the kill, or "
              f"sent to the restarted broker before the subscriber was back; no persistence), "
              f"{len(around_kill - received)} of them never received; "
              f"{len(subscriber.received()) - len(received)} duplicates received")


def test_two_copies_of_one_device_stop_revoking_each_other(stack, api, tmp_path, capsys):
    """Two copies of a device whose key the service made, both told to provision again when revoked: each
    re-provisioning re-keys the device and revokes the other's certificate. Each copy does it at most once; then the
    one revoked again stops with exit 8, naming the other copy, and the other goes on."""
    first = Device(stack, api, "copy1", tmp_path / "first", "--interval", "0.5", "--reprovision-if-revoked")
    second = None
    try:
        first.wait_said(0, "<= connected")
        second = Device(stack, api, "copy1", tmp_path / "second", "--interval", "0.5", "--reprovision-if-revoked")
        wait_until("one copy to stop", lambda: first.process.poll() is not None or second.process.poll() is not None,
                   patience=120)
        stopped, survivor = (first, second) if first.process.poll() is not None else (second, first)
        both = f"stopped:\n{stopped.output()[-3000:]}\nsurvivor:\n{survivor.output()[-3000:]}"
        assert stopped.process.returncode == 8 and "another copy of this device" in stopped.output(), both
        mark = survivor.mark()
        wait_until("the other copy to go on publishing",
                   lambda: any(index >= mark for _, _, index in survivor.acknowledged()))
        assert survivor.process.poll() is None
        assert survivor.stop() == 0
    finally:
        for device in (first, second):
            if device is not None and device.process.poll() is None:
                device.process.kill()
    reprovisioned = [d.output().count("setting the revoked credentials aside") for d in (first, second)]
    assert max(reprovisioned) <= 1, reprovisioned
    assert "Traceback" not in first.output() + second.output()
    with capsys.disabled():
        print(f"\n[copies] re-provisionings (first, second copy): {reprovisioned}; the "
              f"{'first' if stopped is first else 'second'} copy stopped with exit 8")


def test_a_reset_device_that_renews_learns_it_from_the_broker(stack, api, tmp_path):
    """The server's 403 to a renewal is the same for every cause; the broker's refusal of the certificate says
    revoked. Without --reprovision-if-revoked: exit 8 with the causes and the cure; with it: provisioned again."""
    state = tmp_path / "device"
    assert run_device(stack, api, "renew1", state, "-k", "--count", "0").returncode == 0
    admin(stack, "reset", "renew1")
    endpoint = state / "renew1.endpoint"
    revoked = json.loads(endpoint.read_text())["certificateId"]
    held = gd.StatePaths.for_thing(str(state), "renew1")
    port = json.loads(endpoint.read_text())["endpointPort"]
    wait_until("the revocation to reach the broker",  # the stack's supervisor polls; the device asks only once
               lambda: gd.probe_certificate("localhost", port, str(stack.files.bundle), held)[0])
    for renewing in (["--renew-before", "400"], ["--renew"]):  # renewing by itself (365-day certificate), or told to
        told = run_device(stack, api, "renew1", state, *renewing, "--count", "0")
        assert told.returncode == 8, f"{renewing}: " + told.stdout + told.stderr
    assert "renewal refused: HTTP 403 renewal-refused" in told.stdout
    assert "certificate revoked" in told.stderr and "another copy of this device" in told.stderr
    assert "--reprovision-if-revoked" in told.stderr
    assert json.loads(endpoint.read_text())["certificateId"] == revoked  # nothing set aside without the flag
    again = run_device(stack, api, "renew1", state, "--renew", "--count", "1", "--reprovision-if-revoked")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "setting the revoked credentials aside" in again.stdout and "published 1 message(s)" in again.stdout
    assert json.loads(endpoint.read_text())["certificateId"] != revoked
    assert "Traceback" not in told.stdout + told.stderr + again.stdout + again.stderr


def test_a_state_directory_of_the_original_sample_is_used_and_upgraded(stack, api, tmp_path):
    """The sample's <thing>.endpoint is host::region (port 8883 implied) and it never stored a certificate id: the
    device renews with the id derived from its certificate, which the service accepts, and from then on its files
    are ours. Then it runs until Ctrl-C, which keeps its exit code 130."""
    state = tmp_path / "device"
    assert run_device(stack, api, "sample1", state, "-k", "--count", "0").returncode == 0
    endpoint = state / "sample1.endpoint"
    old = json.loads(endpoint.read_text())["certificateId"]
    endpoint.write_text(f"localhost::{REGION}")  # as the sample's script writes it
    renewed = run_device(stack, api, "sample1", state, "--renew", "--count", "0")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert f"certificate {old[:16]}..." in renewed.stdout  # the derived id is the one the service knows
    upgraded = json.loads(endpoint.read_text())
    assert upgraded["certificateId"] != old and upgraded["endpointPort"] != 8883  # the answer's, in our format
    device = Device(stack, api, "sample1", state, "--interval", "0.2")
    try:
        mark = device.wait_said(0, "<= connected", "acknowledged")
        device.process.send_signal(signal.SIGINT)
        assert device.process.wait(timeout=60) == 130
    finally:
        if device.process.poll() is None:
            device.process.kill()
    assert "Traceback" not in device.output() and device.said(mark, "interrupted")
