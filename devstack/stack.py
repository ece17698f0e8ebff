"""The local stack on one machine: a CA per region, mosquitto with a mutual-TLS listener per region, chalice local.

Used by `make local` (devstack/local.py), `make demo` (devstack/demo.py) and the end-to-end tests.
"""
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.files import write_private
from chalicelib.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.wiring import region_policy

# Not a valid thing name ('@' is outside AWS IoT's alphabet), so no device can ever be issued this identity.
MONITOR_IDENTITY = "monitor@devstack"
MOSQUITTO_INSTALL = "apt-get install -y mosquitto"


class StackError(Exception):
    """The stack could not start; the message says what to do."""


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def ensure_mosquitto() -> str:
    """Find mosquitto; install it when we are root, else say the exact command."""
    found = mosquitto_binary()
    if found:
        return found
    if os.geteuid() != 0:
        raise StackError(f"mosquitto is not installed. Install it with: sudo {MOSQUITTO_INSTALL}")
    print(f"mosquitto is not installed; installing it ({MOSQUITTO_INSTALL}) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "mosquitto"]):
        if subprocess.run(command, env=env).returncode != 0:
            raise StackError(f"could not install mosquitto; run: {MOSQUITTO_INSTALL}")
    found = mosquitto_binary()
    if not found:
        raise StackError(f"mosquitto still not found after installing; run: {MOSQUITTO_INSTALL}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int, start: int = 20000, stop: int = 60000) -> int:
    """The first port of `count` consecutive free ports (one MQTT listener per region)."""
    for base in range(start + (os.getpid() % 997) * 37, stop, count):
        if base + count >= stop:
            break
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise StackError(f"no {count} consecutive free ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Listener:
    region: str
    port: int
    ca_file: Path
    monitor_cert: Path


class StackFiles:
    """Writes what the brokers need into <state>/mqtt, from the region CAs (made on first use)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = settings.state_dir / "mqtt"
        self.issuer = LocalIssuer(settings.ca_dir, local_endpoints(settings.enabled_regions, settings.mqtt_host,
                                                                     settings.mqtt_base_port))
        self.bundle = settings.ca_dir / "bundle.pem"
        self.monitor_key = self.dir / "monitor.key.pem"

    def config(self, region: str) -> Path:
        return self.dir / f"mosquitto.{region}.conf"

    def listeners(self) -> list[Listener]:
        return [Listener(region, self.issuer.endpoint(region).port,
                         self.issuer.authority(region).cert_path, self.dir / f"monitor.{region}.cert.pem")
                for region in self.settings.enabled_regions]

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        server_key = ec.generate_private_key(ec.SECP256R1())
        monitor_key = ec.generate_private_key(ec.SECP256R1())
        private = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_private(self.dir / "server.key.pem", server_key.private_bytes(pem, *private))
        write_private(self.monitor_key, monitor_key.private_bytes(pem, *private))
        common = ["# Written by devstack/stack.py; remade at every start.",
                  "per_listener_settings false", "allow_anonymous false", "persistence false",
                  f"acl_file {self.dir / 'acl'}", "log_dest stdout", "log_type error", "log_type warning",
                  "log_type notice", "connection_messages true",
                  # Run as the caller so the broker can read keys that only the caller may read.
                  f"user {getpass.getuser()}"]
        bundle = []
        for listener in self.listeners():
            ca = self.issuer.authority(listener.region)
            bundle.append(ca.cert_path.read_text())
            server_cert = ca.sign("localhost", server_key.public_key(), server_names=["localhost", "127.0.0.1"])
            (self.dir / f"server.{listener.region}.cert.pem").write_bytes(server_cert.public_bytes(pem))
            listener.monitor_cert.write_bytes(ca.sign(MONITOR_IDENTITY, monitor_key.public_key()).public_bytes(pem))
            # One broker process per region, as regions do not share messages; it trusts only its region's CA.
            self.config(listener.region).write_text("\n".join(common + [
                f"listener {listener.port} 127.0.0.1",
                f"cafile {ca.cert_path}",
                f"certfile {self.dir / f'server.{listener.region}.cert.pem'}",
                f"keyfile {self.dir / 'server.key.pem'}",
                "require_certificate true", "use_identity_as_username true", ""]))
        # Same rule as the AWS IoT device policy: a device reads and writes only under its own topic tree.
        (self.dir / "acl").write_text(f"user {MONITOR_IDENTITY}\ntopic read data/#\n\npattern readwrite data/%u/#\n")
        self.bundle.write_text("".join(bundle))


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies, even by SIGKILL (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalStack:
    """Starts the CAs' files, mosquitto and chalice local; stops every child it started."""

    def __init__(self, settings: Settings, api_port: int, log_dir: Path | None = None, quiet: bool = False):
        self.settings = settings
        self.api_port = api_port
        self.files = StackFiles(settings)
        self.log_dir = log_dir or settings.state_dir / "logs"
        self.quiet = quiet
        self.processes: list[subprocess.Popen] = []

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict:
        s = self.settings
        return {**os.environ, "GIP_STATE_DIR": str(s.state_dir), "GIP_MQTT_BASE_PORT": str(s.mqtt_base_port),
                "GIP_ENABLED_REGIONS": ",".join(s.enabled_regions), "GIP_DEFAULT_REGION": s.default_region,
                "GIP_MQTT_HOST": s.mqtt_host, "GIP_FLEET_PUBLIC_KEY": str(s.fleet_public_key),
                "PYTHONUNBUFFERED": "1"}

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, cwd=PROJECT_DIR, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        log.close()
        self.processes.append(process)
        return process

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def start(self) -> "LocalStack":
        try:
            region_policy(self.settings)  # a wrong setting is reported here, before anything starts
            mosquitto = ensure_mosquitto()
            self._say(f"[stack] region CAs and broker certificates in {self.settings.state_dir}")
            self.files.write()
            listeners = self.files.listeners()
            brokers = [self._spawn(f"mosquitto.{listener.region}",
                                   [mosquitto, "-c", str(self.files.config(listener.region))])
                       for listener in listeners]
            for listener, broker in zip(listeners, brokers):
                self._wait_port(listener.port, broker, f"mosquitto.{listener.region}")
            self._say(f"[stack] mosquitto: a mutual-TLS broker per region ({len(listeners)}) on 127.0.0.1:"
                      f"{listeners[0].port}-{listeners[-1].port}")
            api = self._spawn("chalice", [sys.executable, str(PROJECT_DIR / "devstack" / "chalice_local.py"),
                                          "local", "--stage", "local", "--host", "127.0.0.1",
                                          "--port", str(self.api_port), "--no-autoreload"])
            self._wait_http(f"{self.api_url}/health", api)
            self._say(f"[stack] API (chalice local): {self.api_url}/device-provisioning")
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _wait_port(self, port: int, process: subprocess.Popen, name: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StackError(f"{name} exited with {process.returncode}:\n{self._log_tail(name)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise StackError(f"{name} did not listen on port {port} within {timeout:.0f} s:\n{self._log_tail(name)}")

    def _wait_http(self, url: str, process: subprocess.Popen, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StackError(f"chalice local exited with {process.returncode}:\n{self._log_tail('chalice')}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise StackError(f"chalice local did not answer {url} within {timeout:.0f} s:\n{self._log_tail('chalice')}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
