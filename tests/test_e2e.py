"""End to end on one machine: real mosquitto brokers, real chalice local, the real device client, as processes."""
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from admin import cli as admin
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings
from chalicelib.domain.records import UNPROVISIONED, DeviceRecord
from devstack.monitor import Monitor
from devstack.stack import LocalStack, free_port, free_port_run, mosquitto_binary
from tests.conftest import LONDON_IP, TOKYO_IP, needs_tool

pytestmark = needs_tool(mosquitto_binary(), "mosquitto")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("e2e-state")
    env = {"GIP_STATE_DIR": str(state), "GIP_MQTT_BASE_PORT": str(free_port_run(11))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = Settings.for_stage("local", str(state))
        assert admin.main(["--state-dir", str(state), "keygen"]) == 0
        assert admin.main(["--state-dir", str(state), "register", "--prefix", "mydevice", "--count", "10"]) == 0
        with LocalStack(settings, free_port(), quiet=True) as running:
            yield running
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def monitor(stack):
    with Monitor(stack.files) as m:
        yield m


def run_device(stack, thing, *flags, ip=LONDON_IP, api=None, count=2):
    argv = [sys.executable, "device/global_device.py", "-t", thing, "-a", api or stack.api_url, "-c",
            "--forwarded-for", ip, "--state-dir", str(stack.settings.state_dir / "devices"),
            "--root-ca", str(stack.files.bundle),
            "--signing-key", str(stack.settings.keys_dir / FLEET_PRIVATE_KEY_NAME),
            "--count", str(count), "--interval", "0.1", "--max-attempts", "1", *flags]
    return subprocess.run(argv, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)


def device_files(stack, thing):
    base = stack.settings.state_dir / "devices"
    return base / f"{thing}.device.key.pem", base / f"{thing}.device.cert.pem", base / f"{thing}.endpoint"


def listener(stack, region):
    return next(item for item in stack.files.listeners() if item.region == region)


def messages_by_region(monitor, thing, wait=3.0):
    deadline = time.monotonic() + wait
    got = []
    while time.monotonic() < deadline:
        got += [m for m in monitor.drain(wait=0.2) if m.topic.startswith(f"data/{thing}/")]
    return {m.region for m in got}, got


def connect(port, ca, cert=None, key=None, client_id="probe", timeout=5.0):
    """Connect over TLS; returns (client, connected: bool)."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None)
    done, result = threading.Event(), {}

    def on_connect(c, u, flags, reason_code, properties):
        result["ok"] = not reason_code.is_failure
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *a: done.set()
    try:
        client.connect("localhost", port)
    except OSError:
        return client, False  # the TLS handshake was refused outright
    client.loop_start()
    done.wait(timeout)
    return client, result.get("ok", False)


def test_server_made_key_device_publishes_to_its_own_region(stack, monitor):
    result = run_device(stack, "mydevice1", ip=LONDON_IP)
    assert result.returncode == 0, result.stdout + result.stderr
    regions, got = messages_by_region(monitor, "mydevice1")
    assert regions == {"eu-west-2"}, got
    assert len(got) == 2 and got[0].payload["thing-name"] == "mydevice1"
    key, cert, endpoint = device_files(stack, "mydevice1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert SqliteRegistry(stack.settings.registry_path).get("mydevice1").region == "eu-west-2"


def test_own_key_device_publishes_to_its_own_region(stack, monitor):
    result = run_device(stack, "mydevice2", "-k", "--key-type", "ec", ip=TOKYO_IP)
    assert result.returncode == 0, result.stdout + result.stderr
    regions, got = messages_by_region(monitor, "mydevice2")
    assert regions == {"ap-northeast-1"}, got
    key, _, _ = device_files(stack, "mydevice2")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_second_start_reuses_credentials_without_a_request(stack, monitor):
    assert run_device(stack, "mydevice4", ip=LONDON_IP, count=1).returncode == 0
    before = [p.read_bytes() for p in device_files(stack, "mydevice4")]
    monitor.drain()
    # Nothing listens on port 9: a provisioning request would fail with exit code 6.
    result = run_device(stack, "mydevice4", ip=LONDON_IP, api="http://127.0.0.1:9", count=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipping provisioning" in result.stdout
    assert [p.read_bytes() for p in device_files(stack, "mydevice4")] == before
    assert messages_by_region(monitor, "mydevice4")[0] == {"eu-west-2"}


def test_fake_signature_is_refused_and_changes_nothing(stack, monitor):
    registry = SqliteRegistry(stack.settings.registry_path)
    before = registry.get("mydevice3")
    result = run_device(stack, "mydevice3", "-f")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "signature" in result.stderr
    assert registry.get("mydevice3") == before == DeviceRecord("mydevice3", UNPROVISIONED)
    assert not any(p.exists() for p in device_files(stack, "mydevice3")[1:])


def test_publishing_to_another_devices_topic_is_not_authorized(stack, monitor):
    assert run_device(stack, "mydevice5", ip=LONDON_IP, count=0).returncode == 0
    key, cert, _ = device_files(stack, "mydevice5")
    eu = listener(stack, "eu-west-2")
    client, ok = connect(eu.port, eu.ca_file, cert, key, client_id="mydevice5")
    assert ok
    try:
        monitor.drain()
        acks = {}
        client.on_publish = lambda c, u, mid, reason_code, props: acks.setdefault(mid, reason_code)
        spoofed = client.publish("data/mydevice1/misc", b'{"spoofed": true}', qos=1)
        deadline = time.monotonic() + 5
        while spoofed.mid not in acks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert str(acks[spoofed.mid]) == "Not authorized"
        own = client.publish("data/mydevice5/misc", b'{"own": true}', qos=1)
        own.wait_for_publish(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()
    regions, got = messages_by_region(monitor, "mydevice5")
    assert regions == {"eu-west-2"}  # its own topic works ...
    assert not [m for m in monitor.drain(wait=0.5) if m.topic.startswith("data/mydevice1/")]  # ... the other not


def test_certificate_of_one_region_is_refused_by_another(stack):
    assert run_device(stack, "mydevice6", ip=LONDON_IP, count=0).returncode == 0
    key, cert, _ = device_files(stack, "mydevice6")
    tokyo = listener(stack, "ap-northeast-1")
    client, ok = connect(tokyo.port, tokyo.ca_file, cert, key, client_id="mydevice6")
    client.loop_stop()
    assert not ok
    eu = listener(stack, "eu-west-2")
    client, ok = connect(eu.port, eu.ca_file, cert, key, client_id="mydevice6")
    client.disconnect()
    client.loop_stop()
    assert ok  # the same credentials work at home


def test_client_without_certificate_is_refused(stack):
    eu = listener(stack, "eu-west-2")
    client, ok = connect(eu.port, eu.ca_file)
    client.loop_stop()
    assert not ok


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_killing_make_local_leaves_no_process(tmp_path, how):
    env = {**os.environ, "GIP_STATE_DIR": str(tmp_path), "GIP_MQTT_BASE_PORT": str(free_port_run(11))}
    runner = subprocess.Popen([sys.executable, "-m", "devstack.local", "--api-port", str(free_port())],
                              cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in runner.stdout:
            if "Press Ctrl-C" in line:
                break
        children = _children(runner.pid)
        assert len(children) == 12  # 11 brokers and chalice local
        runner.send_signal(how)
        # What matters is that the runner ends and no child outlives it. On a busy machine stopping twelve
        # processes can take long, so wait for exactly that; the deadline only keeps a real hang from
        # blocking the suite forever.
        deadline = time.monotonic() + 180
        while (runner.poll() is None or any(map(_alive, children))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runner.poll() is not None, "make local did not stop"
        assert not [pid for pid in children if _alive(pid)]
    finally:
        if runner.poll() is None:
            runner.kill()
