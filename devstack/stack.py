"""The local stack on one machine: a CA per region, mosquitto with a mutual-TLS listener per region, chalice local.

Used by `make local` (devstack/local.py), `make demo` (devstack/demo.py) and the end-to-end tests.
"""
import ctypes
import getpass
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chalicelib.adapters.files import write_private
from chalicelib.adapters.issuers.local_ca import (
    CRL_LIFETIME,
    LocalIssuer,
    certificate_revocation_list,
    index_revocations,
    local_endpoints,
    records_version,
    revoked_serials,
)
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.container import Container

# Not a valid thing name ('@' is outside AWS IoT's alphabet), so no device can ever be issued this identity.
MONITOR_IDENTITY = "monitor@devstack"
MOSQUITTO_INSTALL = "apt-get install -y mosquitto"
PLUGIN_SOURCE = PROJECT_DIR / "devstack" / "plugin" / "gip_auth.c"
# What building the broker plugin needs, and the file that shows each one is there.
PLUGIN_BUILD_NEEDS = {"gcc": None, "mosquitto-dev": "/usr/include/mosquitto_broker.h",
                      "libmosquitto-dev": "/usr/include/mosquitto.h", "libssl-dev": "/usr/include/openssl/x509.h"}


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


def build_plugin(build_dir: Path, needs: dict[str, str | None] = PLUGIN_BUILD_NEEDS, root: bool | None = None) -> Path:
    """The brokers' auth plugin (devstack/plugin/gip_auth.c), compiled once per version of its source.

    Missing tools are installed when we are root (as mosquitto itself is), else the message says what to install.
    """
    source = PLUGIN_SOURCE.read_bytes()
    target = build_dir / f"gip_auth-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return target
    missing = [package for package, path in needs.items()
               if not (os.path.exists(path) if path else shutil.which(package))]
    install = f"apt-get install -y {' '.join(needs)}"
    if missing and not (os.geteuid() == 0 if root is None else root):
        raise StackError(f"building the brokers' plugin needs {', '.join(missing)}. Install with: sudo {install}")
    if missing:
        print(f"building the brokers' plugin needs {', '.join(missing)}; installing ({install}) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            if subprocess.run(command, env=env, check=False).returncode != 0:
                raise StackError(f"could not install {', '.join(missing)}; run: {install}")
    build_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    result = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(partial),
                             str(PLUGIN_SOURCE), "-lcrypto"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise StackError(f"could not build {PLUGIN_SOURCE.name} (needs {install}):\n{result.stderr.strip()}")
    os.replace(partial, target)  # another stack building the same source at once makes the same file
    return target


def catches_sighup(pid: int) -> bool:
    """True once the process handles SIGHUP: mosquitto installs its handler only after it opened its listeners,
    and before that a SIGHUP would end it. Where /proc is missing, assume it does."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "1")
    return bool(int(caught, 16) & (1 << (signal.SIGHUP - 1)))


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
        self.build_dir = settings.state_dir / "build"
        self.issuer = LocalIssuer(settings.ca_dir, local_endpoints(settings.enabled_regions, settings.mqtt_host,
                                                                     settings.mqtt_base_port))
        self.bundle = settings.ca_dir / "bundle.pem"
        self.monitor_key = self.dir / "monitor.key.pem"

    def config(self, region: str) -> Path:
        return self.dir / f"mosquitto.{region}.conf"

    def crl(self, region: str) -> Path:
        return self.dir / f"crl.{region}.pem"

    def listeners(self) -> list[Listener]:
        return [Listener(region, self.issuer.endpoint(region).port,
                         self.issuer.authority(region).cert_path, self.dir / f"monitor.{region}.cert.pem")
                for region in self.settings.enabled_regions]

    def write_crl(self, region: str, serials: frozenset[int], lifetime: timedelta = CRL_LIFETIME) -> None:
        """Atomically: a broker reloading at any moment reads the old list or the new one, never half of it."""
        path = self.crl(region)
        partial = path.with_name(f"{path.name}.tmp")
        partial.write_bytes(certificate_revocation_list(self.issuer.authority(region), serials, lifetime))
        os.replace(partial, path)

    def write(self, plugin: Path, log_dir: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        server_key = ec.generate_private_key(ec.SECP256R1())
        monitor_key = ec.generate_private_key(ec.SECP256R1())
        private = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_private(self.dir / "server.key.pem", server_key.private_bytes(pem, *private))
        write_private(self.monitor_key, monitor_key.private_bytes(pem, *private))
        common = ["# Written by devstack/stack.py; remade at every start.",
                  "per_listener_settings false", "allow_anonymous false", "persistence false",
                  "log_type error", "log_type warning",
                  "log_type notice", "log_type information", "connection_messages true",
                  # Run as the caller so the broker can read keys that only the caller may read.
                  f"user {getpass.getuser()}",
                  # The rules AWS IoT applies to a device connection (client id = the certificate's CN, revoked
                  # certificates' sessions closed, topics data/<thing>/ only): why a plugin, see its source.
                  f"plugin {plugin}", f"plugin_opt_observer {MONITOR_IDENTITY}"]
        bundle = []
        for listener in self.listeners():
            ca = self.issuer.authority(listener.region)
            bundle.append(ca.cert_path.read_text())
            server_cert = ca.sign("localhost", server_key.public_key(), server_names=["localhost", "127.0.0.1"])
            (self.dir / f"server.{listener.region}.cert.pem").write_bytes(server_cert.public_bytes(pem))
            listener.monitor_cert.write_bytes(ca.sign(MONITOR_IDENTITY, monitor_key.public_key()).public_bytes(pem))
            # One broker process per region, as regions do not share messages; it trusts only its region's CA.
            # No use_identity_as_username: with it mosquitto skips the plugin's check (the plugin sets the CN).
            self.config(listener.region).write_text("\n".join(common + [
                # Its own file, line-buffered: what a broker said before a kill -9 is kept (stdout would lose it).
                f"log_dest file {log_dir / f'mosquitto.{listener.region}.log'}",
                f"plugin_opt_crl_file {self.crl(listener.region)}",
                f"listener {listener.port} 127.0.0.1",
                f"cafile {ca.cert_path}",
                f"certfile {self.dir / f'server.{listener.region}.cert.pem'}",
                f"keyfile {self.dir / 'server.key.pem'}",
                # Refuses a revoked certificate at the TLS handshake, as AWS IoT does; re-read on SIGHUP.
                f"crlfile {self.crl(listener.region)}",
                "require_certificate true", ""]))
        self.bundle.write_text("".join(bundle))


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies, even by SIGKILL (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalStack:
    """Starts the CAs' files, mosquitto and chalice local; stops every child it started.

    While it runs, one thread keeps the brokers as strict as AWS IoT about revocation and keeps the children
    alive. Why this way (measured on Debian's mosquitto 2.0.11): a revocation, whatever made it (admin reset,
    audit --fix, a rollback, a renewal), is a status change in the CA records, so the thread watches those
    (PRAGMA data_version: one cheap read per poll), rewrites the region's CRL and sends that broker SIGHUP. On
    SIGHUP mosquitto re-reads the CRL (new connections with the certificate fail the TLS handshake) and re-runs
    its auth check on every connected client, where the plugin refuses the revoked serial, so that certificate's
    sessions close within a few hundred milliseconds, per certificate: other devices' sessions, other regions'
    brokers and the device's own newer certificate are untouched. The dynamic-security plugin could close a
    session too (deleteClient), but only per client identity, needs a role per device and an admin connection,
    and cannot bind the client id to the certificate.
    """

    POLL_SECONDS = 0.25
    RESTARTS_PER_MINUTE = 3  # a broker that dies more often than this is not coming back by itself

    def __init__(self, settings: Settings, api_port: int, log_dir: Path | None = None, quiet: bool = False,
                 crl_lifetime: timedelta = CRL_LIFETIME):
        self.settings = settings
        self.api_port = api_port
        self.files = StackFiles(settings)
        self.log_dir = log_dir or settings.state_dir / "logs"
        self.quiet = quiet
        self.crl_lifetime = crl_lifetime
        self.processes: list[subprocess.Popen] = []
        self.brokers: dict[str, subprocess.Popen] = {}
        self.api: subprocess.Popen | None = None
        self.failure: str | None = None  # set when the stack cannot go on; `failed` is set with it
        self.failed = threading.Event()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._published: dict[str, frozenset[int]] = {}
        self._reload_pending: set[str] = set()
        self._restarts: dict[str, list[float]] = {}
        self._mosquitto = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict:
        s = self.settings
        return {**os.environ, "GIP_STATE_DIR": str(s.state_dir), "GIP_MQTT_BASE_PORT": str(s.mqtt_base_port),
                "GIP_ENABLED_REGIONS": ",".join(s.enabled_regions), "GIP_DEFAULT_REGION": s.default_region,
                "GIP_MQTT_HOST": s.mqtt_host, "GIP_FLEET_PUBLIC_KEY": str(s.fleet_public_key),
                "PYTHONUNBUFFERED": "1"}

    def _spawn(self, name: str, argv: list[str], append: bool = False) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{name}.log"
        if not append:
            path.write_bytes(b"")
        log = open(path, "ab")  # appending, as mosquitto writes the same file
        process = subprocess.Popen(argv, cwd=PROJECT_DIR, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        log.close()
        self.processes.append(process)
        return process

    def _spawn_broker(self, region: str, append: bool = False) -> subprocess.Popen:
        broker = self._spawn(f"mosquitto.{region}", [self._mosquitto, "-c", str(self.files.config(region))], append)
        self.brokers[region] = broker
        return broker

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def start(self) -> "LocalStack":
        self._stopping.clear()
        try:
            Container(self.settings).validate()  # a wrong setting is reported here, before anything starts
            self._mosquitto = ensure_mosquitto()
            plugin = build_plugin(self.files.build_dir)
            self._say(f"[stack] region CAs and broker certificates in {self.settings.state_dir}")
            self.files.write(plugin, self.log_dir)
            index_revocations(self.files.issuer)
            # Every revocation made while the brokers were down is in the CRLs they start with.
            self._publish(revoked_serials(self.files.issuer), force=True)
            listeners = self.files.listeners()
            for listener in listeners:
                self._spawn_broker(listener.region)
            for listener in listeners:
                self._wait_port(listener.port, self.brokers[listener.region], f"mosquitto.{listener.region}")
            self._say(f"[stack] mosquitto: a mutual-TLS broker per region ({len(listeners)}) on 127.0.0.1:"
                      f"{listeners[0].port}-{listeners[-1].port}")
            self.api = self._spawn("chalice", [sys.executable, str(PROJECT_DIR / "devstack" / "chalice_local.py"),
                                               "local", "--stage", "local", "--host", "127.0.0.1",
                                               "--port", str(self.api_port), "--no-autoreload"])
            self._wait_http(f"{self.api_url}/health", self.api)
            self._say(f"[stack] API (chalice local): {self.api_url}")
            self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
            self._supervisor.start()
        except BaseException:
            self.stop()
            raise
        return self

    # ---- supervision: revocations to the brokers, fresh CRLs, no dead child left unnoticed

    def _supervise(self) -> None:
        version = None  # data_version values of different connections do not compare: read everything once
        refreshed = time.monotonic()
        refresh_every = self.crl_lifetime.total_seconds() / 8  # new CRLs long before OpenSSL would refuse all
        while not self._stopping.wait(self.POLL_SECONDS):
            try:
                now = records_version(self.files.issuer)
                due = time.monotonic() - refreshed >= refresh_every
                if now != version or due:
                    version = now
                    self._publish(revoked_serials(self.files.issuer), force=due)
                    refreshed = time.monotonic() if due else refreshed
                self._signal_reloads()
                self._check_children()
            except sqlite3.Error as exc:  # a busy or briefly unreadable CA file: the next poll tries again
                self._say(f"[stack] could not read the CA records ({exc}); trying again")
            except StackError as exc:
                # The owner reports it and stops the stack (make local: exit 1). This thread lives on until
                # stop(): the brokers it restarted get SIGTERM when it ends (PR_SET_PDEATHSIG is per thread).
                self.failure = str(exc)
                self.failed.set()

    def _publish(self, revoked: dict[str, frozenset[int]], force: bool = False) -> None:
        for region in self.settings.enabled_regions:
            serials = revoked.get(region, frozenset())
            if force or serials != self._published.get(region):
                self.files.write_crl(region, serials, self.crl_lifetime)
                self._published[region] = serials
                self._reload_pending.add(region)
        self._signal_reloads()

    def _signal_reloads(self) -> None:
        for region in list(self._reload_pending):
            broker = self.brokers.get(region)
            if broker is None or broker.poll() is not None:
                self._reload_pending.discard(region)  # not started yet, or restarting: it reads the new CRL
            elif catches_sighup(broker.pid):
                broker.send_signal(signal.SIGHUP)
                self._reload_pending.discard(region)

    def _check_children(self) -> None:
        if self.failed.is_set():
            return
        if self.api is not None and self.api.poll() is not None:
            raise StackError(f"chalice local stopped (exit status {self.api.returncode}); last lines of its log:\n"
                             f"{self._log_tail('chalice')}")
        for region, broker in list(self.brokers.items()):
            if broker.poll() is None:
                continue
            name = f"mosquitto.{region}"
            now = time.monotonic()
            recent = [t for t in self._restarts.get(region, []) if now - t < 60] + [now]
            self._restarts[region] = recent
            stopped = (f"the mosquitto broker of {region} stopped (exit status {broker.returncode}); "
                       f"last lines of {self.log_dir / (name + '.log')}:\n{self._log_tail(name)}")
            if len(recent) > self.RESTARTS_PER_MINUTE:
                raise StackError(f"{stopped}\nit stopped {len(recent)} times within a minute; stopping the stack")
            self._say(f"[stack] {stopped}\n[stack] restarting the broker of {region}")
            self.processes.remove(broker)
            self._spawn_broker(region, append=True)

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
            except urllib.error.HTTPError:  # it answers; /health names what is not ready (e.g. no fleet key yet)
                return
            except OSError:
                time.sleep(0.1)
        raise StackError(f"chalice local did not answer {url} within {timeout:.0f} s:\n{self._log_tail('chalice')}")

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=30)
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
