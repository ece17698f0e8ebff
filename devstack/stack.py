"""The local stack on one machine: a CA per region, mosquitto with a mutual-TLS listener per region, chalice local.

Used by `make local` (devstack/local.py), `make demo` (devstack/demo.py) and the end-to-end tests.
"""
import ctypes
import errno
import functools
import getpass
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chalicelib.adapters.files import write_private
from chalicelib.adapters.issuers.local_ca import (
    CRL_LIFETIME,
    STACK_OK,
    LocalIssuer,
    certificate_revocation_list,
    index_revocations,
    local_endpoints,
    records_version,
    revoked_serials,
    stack_address,
    stack_status_path,
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


_handed_out: set[int] = set()  # ports this process gave a server that may not have bound them yet


def _listening_ports() -> range:
    """Where to look for a port to listen on: below the kernel's ephemeral range. Ports in it are handed out as
    outgoing connections' source ports, so one found free there can be taken before the server binds it (mosquitto's
    "Address already in use" in a CI run)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(10000, low) if low > 12000 else range(20000, 60000)


def free_port() -> int:
    return free_port_run(1)


def free_port_run(count: int) -> int:
    """The first port of `count` consecutive free ports (one MQTT listener per region), never one this process
    handed out before; where the search starts depends on the process, so that two test runs rarely meet."""
    ports = _listening_ports()
    slots = len(ports) // count
    first = os.getpid() * 37 % slots
    for i in range(slots):
        base = ports.start + (first + i) % slots * count
        run = range(base, base + count)
        if not _handed_out.intersection(run) and all(_port_free(port) for port in run):
            _handed_out.update(run)
            return base
    raise StackError(f"no {count} consecutive free ports found in {ports.start}-{ports.stop - 1}")


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

    def loaded(self, region: str) -> Path:
        """Where the region's broker writes the number of the CRL it has loaded (the plugin's loaded_file)."""
        return self.dir / f"crl.{region}.loaded"

    def loaded_number(self, region: str) -> int:
        try:
            return int(self.loaded(region).read_bytes().strip() or 0)
        except (OSError, ValueError):
            return 0

    def listeners(self) -> list[Listener]:
        return [Listener(region, self.issuer.endpoint(region).port,
                         self.issuer.authority(region).cert_path, self.dir / f"monitor.{region}.cert.pem")
                for region in self.settings.enabled_regions]

    def write_crl(self, region: str, serials: frozenset[int], lifetime: timedelta = CRL_LIFETIME,
                  number: int | None = None) -> None:
        """Atomically: a broker reloading at any moment reads the old list or the new one, never half of it."""
        path = self.crl(region)
        partial = path.with_name(f"{path.name}.tmp")
        partial.write_bytes(certificate_revocation_list(self.issuer.authority(region), serials, lifetime, number))
        os.replace(partial, path)

    def write(self, plugin: Path, log_dir: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for region in self.settings.enabled_regions:  # a number left by an earlier run's broker says nothing now
            self.loaded(region).unlink(missing_ok=True)
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
                f"plugin_opt_loaded_file {self.loaded(listener.region)}",
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


LOG_MAX_BYTES = 4 * 2**20  # a log over this size is rotated while the stack runs
LOG_KEEP = 3  # rotated files kept per log: <name>.log.1 (the newest) to <name>.log.3


def rotate_log(path: Path, keep: int = LOG_KEEP, in_use: bool = False) -> None:
    """<name>.log becomes <name>.log.1, the older ones move up one, the oldest beyond `keep` goes.

    A log that a running process appends to is copied, then emptied in place: its writer (O_APPEND) goes on at the
    new end, where a rename would leave it writing to the renamed file. A line written between the copy and the
    emptying is lost; a restart (nothing writing) renames, and loses nothing.
    """
    if not path.exists():
        return
    path.with_name(f"{path.name}.{keep}").unlink(missing_ok=True)
    for number in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{number}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{number + 1}"))
    if in_use:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        os.truncate(path, 0)
    else:
        os.replace(path, path.with_name(f"{path.name}.1"))


class StackStatus:
    """What /health needs to know of the stack (chalicelib.edge.health reads it): the supervisor's heartbeat, the faults
    by part, each CRL's nextUpdate. One record of a fixed size rewritten in place: no new file and no new block,
    so it still works on a full disk or in a directory that became unwritable, and a reader gets a whole record."""

    SIZE = 4096

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(self._fd, b" " * self.SIZE, 0)  # its blocks, once

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record).encode()
        if len(text) > self.SIZE:  # long fault messages: keep their starts
            record = {**record, "faults": {part: message[:200] for part, message in record["faults"].items()}}
            text = json.dumps(record).encode()[:self.SIZE]
        os.pwrite(self._fd, text.ljust(self.SIZE), 0)

    def close(self) -> None:
        os.close(self._fd)


class Fault(Exception):
    """A part of the supervisor's work that failed: `public` says it without server paths (for /health), the
    exception's own text says it whole (for the console)."""

    def __init__(self, detail: str, public: str):
        super().__init__(detail)
        self.public = public


def _cause(exc: BaseException) -> str:
    """An error's cause without the file name an OSError carries (/health is public)."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


# Exit statuses of a child that was asked to stop (SIGINT or SIGTERM: mosquitto then exits 0), not one that died.
_ASKED_TO_STOP = (0, -signal.SIGINT, -signal.SIGTERM)


class LocalStack:
    """Starts the CAs' files, mosquitto and chalice local; stops every child it started.

    While it runs, one thread (the supervisor) keeps the brokers as strict as AWS IoT about revocation and keeps the
    children alive. Why this way (measured on Debian's mosquitto 2.0.11): a revocation, whatever made it (admin
    reset, audit --fix, a rollback, a renewal), is a status change in the CA records, so the supervisor rewrites the
    region's CRL (numbered) and sends that broker SIGHUP. On SIGHUP mosquitto re-reads the CRL (new connections with
    the certificate fail) and re-runs its auth check on every connected client, where the plugin refuses the revoked
    serial, so that certificate's sessions close, per certificate: other devices' sessions, other regions' brokers
    and the device's own newer certificate are untouched. The plugin then writes the number of the CRL it loaded.

    The revoking process (the admin CLI, chalice local) asks the supervisor on a Unix socket
    (`local_ca.StackRevocations`): the supervisor reads the CA records, writes and signals, and answers once every
    broker reports the new number, or says why it cannot. So a revocation is in force when the command returns.
    Revocations made while the stack was down are in the CRLs it starts with; the supervisor also watches the CA
    records (PRAGMA data_version: one cheap read per poll) as a safety net. The dynamic-security plugin could close a
    session too (deleteClient), but only per client identity, needs a role per device and an admin connection, and
    cannot bind the client id to the certificate.

    Each part of the supervisor's work (revocation, brokers, logs) is isolated: a failure is said on the console
    with its cause, written to the status /health reads, and tried again with a back-off; a revoker asking meanwhile
    is told at once. If the supervisor itself ends, `failed` is set and make local stops everything.
    """

    POLL_SECONDS = 0.25
    BACKOFF_MAX_SECONDS = 5.0
    RESTARTS_PER_MINUTE = 3  # a broker that dies more often than this is not coming back by itself
    RELOAD_SECONDS = 5.0  # a broker that has not loaded its new CRL by then is a fault
    CONFIRM_SECONDS = 6.0  # a revoker waiting longer is told what is missing (local_ca waits 10 s)
    START_SECONDS = 20.0  # a restarted broker that does not listen by then is a fault
    STOP_GRACE_SECONDS = 2.0  # a child asked to stop from outside: time for our own stop to begin
    STALE_SECONDS = 15.0  # /health calls the supervisor gone when its heartbeat is older
    LOG_CHECK_SECONDS = 5.0
    HEALTH_PARTS = ("revocation", "brokers")  # the supervisor's parts /health names (with "supervisor" itself)

    def __init__(self, settings: Settings, api_port: int, log_dir: Path | None = None, quiet: bool = False,
                 crl_lifetime: timedelta = CRL_LIFETIME, log_max_bytes: int = LOG_MAX_BYTES, log_keep: int = LOG_KEEP,
                 crl_writer: Callable[[str, frozenset[int], timedelta, int], None] | None = None):
        self.settings = settings
        self.api_port = api_port
        self.files = StackFiles(settings)
        self.log_dir = log_dir or settings.state_dir / "logs"
        self.log_max_bytes = log_max_bytes
        self.log_keep = log_keep
        self.quiet = quiet
        self.crl_lifetime = crl_lifetime
        self._write_crl = crl_writer or self.files.write_crl  # tests: a writer that fails as a disk would
        self.processes: list[subprocess.Popen] = []
        self.brokers: dict[str, subprocess.Popen] = {}
        self.api: subprocess.Popen | None = None
        self.failure: str | None = None  # set when the stack cannot go on; `failed` is set with it
        self.failed = threading.Event()
        self.faults: dict[str, str] = {}  # part -> what is wrong now (as /health says it)
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._control: socket.socket | None = None
        self._waiters: list[tuple[socket.socket, float]] = []
        self._status: StackStatus | None = None
        self._status_written = 0.0
        self._faults_written: dict[str, str] = {}
        self._published: dict[str, frozenset[int]] = {}
        self._numbers: dict[str, int] = {}  # the number of the CRL last written per region
        self._number = 0
        self._next_update: dict[str, float] = {}
        self._reload_pending: set[str] = set()
        self._signalled: dict[str, float] = {}
        self._unconfirmed_since: dict[str, float] = {}
        self._listening: dict[str, bool] = {}
        self._started: dict[str, float] = {}
        self._restarts: dict[str, list[float]] = {}
        self._counted: set[int] = set()  # pids of dead children already counted
        self._asked_to_stop: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._said: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
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

    def log_names(self) -> list[str]:
        return ["chalice", *(f"mosquitto.{region}" for region in self.settings.enabled_regions)]

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # appending, as mosquitto writes the same file
        process = subprocess.Popen(argv, cwd=PROJECT_DIR, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        log.close()
        self.processes.append(process)
        return process

    def _spawn_broker(self, region: str) -> subprocess.Popen:
        broker = self._spawn(f"mosquitto.{region}", [self._mosquitto, "-c", str(self.files.config(region))])
        self.brokers[region] = broker
        self._listening[region] = False
        self._started[region] = time.monotonic()
        return broker

    def _say(self, text: str) -> None:
        if not self.quiet:
            try:
                print(text, flush=True)
            except (OSError, ValueError):  # a console on a full disk, or closed: the status file still says it
                pass

    def _listen(self) -> socket.socket:
        """The socket revokers ask on (local_ca.stack_address): one stack per state directory."""
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            control.bind(stack_address(self.settings.state_dir))
        except OSError as exc:
            control.close()
            if exc.errno == errno.EADDRINUSE:
                raise StackError(f"a local stack is already running on {self.settings.state_dir}; stop it first, "
                                 "or give this one another state directory (--state-dir)") from None
            raise
        control.listen(64)
        control.setblocking(False)
        return control

    def start(self) -> "LocalStack":
        self._stopping.clear()
        try:
            Container(self.settings).validate()  # a wrong setting is reported here, before anything starts
            self._control = self._listen()
            self._mosquitto = ensure_mosquitto()
            plugin = build_plugin(self.files.build_dir)
            self._say(f"[stack] region CAs and broker certificates in {self.settings.state_dir}")
            for name in self.log_names():  # the previous run's logs are kept, never emptied
                rotate_log(self.log_dir / f"{name}.log", self.log_keep)
            self.files.write(plugin, self.log_dir)
            index_revocations(self.files.issuer)
            self._status = StackStatus(stack_status_path(self.settings.state_dir))
            # Every revocation made while the brokers were down is in the CRLs they start with.
            self._publish(revoked_serials(self.files.issuer), force=True)
            listeners = self.files.listeners()
            for listener in listeners:
                self._spawn_broker(listener.region)
            for listener in listeners:
                self._wait_port(listener.port, self.brokers[listener.region], f"mosquitto.{listener.region}")
                self._listening[listener.region] = True
            self._say(f"[stack] mosquitto: a mutual-TLS broker per region ({len(listeners)}) on 127.0.0.1:"
                      f"{listeners[0].port}-{listeners[-1].port}")
            self._write_status(force=True)  # before chalice local: its /health finds the stack it serves
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

    @property
    def supervising(self) -> bool:
        return self._supervisor is not None and self._supervisor.is_alive()

    # ---- supervision: revocations to the brokers (confirmed), fresh CRLs, no dead child left unnoticed

    def _supervise(self) -> None:
        reason = "it returned"
        try:
            self._supervise_until_stopped()
        except BaseException as exc:  # nothing may end this thread quietly
            reason = f"{type(exc).__name__}: {exc}"
        if self._stopping.is_set():
            return
        message = (f"the stack's supervisor stopped ({reason}): revocations, broker restarts and new CRLs have "
                   "stopped; stopping the stack")
        self.faults["supervisor"] = message[:300]
        self._fail(message)
        try:
            self._write_status(force=True)
        except OSError:
            pass
        self._answer_waiters(time.monotonic(), final=message)

    def _supervise_until_stopped(self) -> None:
        assert self._control is not None
        selector = selectors.DefaultSelector()
        selector.register(self._control, selectors.EVENT_READ)
        version: int | None = None  # data_version values of different connections do not compare: read once
        refreshed = time.monotonic()
        refresh_every = self.crl_lifetime.total_seconds() / 8  # new CRLs long before OpenSSL would refuse all
        logs_checked = time.monotonic()

        def revocation(asked: bool, now: float) -> None:
            nonlocal version, refreshed
            current = records_version(self.files.issuer)
            due = now - refreshed >= refresh_every
            if asked or due or current != version:
                version = None  # until the CRLs are written: a failure reads the records again next time
                try:
                    revoked = revoked_serials(self.files.issuer)
                except Exception as exc:
                    raise Fault(f"the CA records cannot be read ({exc})",
                                f"the CA records cannot be read ({_cause(exc)}): new revocations do not reach the "
                                "brokers") from exc
                self._publish(revoked, force=due)
                version = current
                refreshed = now if due else refreshed
            self._signal_reloads()
            self._confirm_reloads(now)

        selector_wait = self.POLL_SECONDS
        try:
            while not self._stopping.is_set():
                selector.select(selector_wait)
                if self._stopping.is_set():
                    break
                asked = self._accept()
                now = time.monotonic()
                if self._due("brokers", now):
                    self._attempt("brokers", self._check_children)
                if asked or self._due("revocation", now):  # a revoker waiting is tried at once, back-off or not
                    self._attempt("revocation", functools.partial(revocation, asked, now))
                if now - logs_checked >= self.LOG_CHECK_SECONDS and self._due("logs", now):
                    logs_checked = now
                    self._attempt("logs", self._rotate_logs)
                self._attempt("status", self._write_status)  # before answering: /health agrees with the answer
                self._answer_waiters(time.monotonic())
                # While a revoker waits, look at the brokers' reports often: they answer within milliseconds.
                selector_wait = 0.005 if self._waiters else self.POLL_SECONDS
        finally:
            selector.close()

    def _due(self, part: str, now: float) -> bool:
        return now >= self._retry_at.get(part, 0.0)

    def _attempt(self, part: str, work: Callable[[], None]) -> None:
        """One part's work, isolated: a failure is said with its cause and tried again after a back-off."""
        try:
            work()
        except StackError as exc:  # the stack cannot go on: the owner reports it and stops everything
            self._fail(str(exc))
            return
        except Exception as exc:
            failures = self._failures.get(part, 0) + 1
            self._failures[part] = failures
            delay = min(self.POLL_SECONDS * 2 ** (failures - 1), self.BACKOFF_MAX_SECONDS)
            self._retry_at[part] = time.monotonic() + delay
            public = exc.public if isinstance(exc, Fault) else f"{type(exc).__name__}: {_cause(exc)}"
            if self._said.get(part) != public:  # said once, not at every try
                self._said[part] = public
                self._say(f"[stack] {part}: {exc if isinstance(exc, Fault) else repr(exc)}; trying again in "
                          f"{delay:.2f} s, with a back-off" + (" (/health says so meanwhile)"
                                                               if part in self.HEALTH_PARTS else ""))
            if part in self.HEALTH_PARTS:
                self.faults[part] = public[:300]
            return
        if self._failures.pop(part, None):
            self._retry_at.pop(part, None)
            self._said.pop(part, None)
            self.faults.pop(part, None)
            self._say(f"[stack] {part}: working again")

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
        # /health is public: the console has the whole message (with its log paths), the status file the gist.
        self.faults.setdefault("supervisor", "the local stack is stopping (make local's console says why)")
        self.failed.set()
        # This thread lives on until stop() (unless it is the one that ended): the brokers it restarted get SIGTERM
        # when it ends (PR_SET_PDEATHSIG is per thread).

    def _next_number(self) -> int:
        """CRL numbers only grow, across runs too (milliseconds since the epoch, or one more)."""
        self._number = max(self._number + 1, time.time_ns() // 1_000_000)
        return self._number

    def _publish(self, revoked: dict[str, frozenset[int]], force: bool = False) -> None:
        for region in self.settings.enabled_regions:
            serials = revoked.get(region, frozenset())
            if force or serials != self._published.get(region):
                number = self._next_number()
                try:
                    self._write_crl(region, serials, self.crl_lifetime, number)
                except OSError as exc:
                    raise Fault(f"the CRL of {region} could not be written ({exc}): revoked certificates may still "
                                "connect", f"the CRL of {region} could not be written ({_cause(exc)}): revoked "
                                "certificates may still connect") from exc
                self._published[region] = serials
                self._numbers[region] = number
                self._next_update[region] = time.time() + self.crl_lifetime.total_seconds()
                self._reload_pending.add(region)
        self._signal_reloads()

    def _signal_reloads(self) -> None:
        for region in list(self._reload_pending):
            broker = self.brokers.get(region)
            if broker is None or broker.poll() is not None:
                self._reload_pending.discard(region)  # not started yet, or restarting: it reads the new CRL
            elif catches_sighup(broker.pid):
                broker.send_signal(signal.SIGHUP)
                self._wake(region)
                self._signalled[region] = time.monotonic()
                self._reload_pending.discard(region)

    def _wake(self, region: str) -> None:
        """mosquitto blocks signals while it waits for traffic (up to 100 ms): a connection to its listener ends the
        wait, so the SIGHUP is taken now. It costs one line in the broker's log ("Client connection ... failed")."""
        with socket.socket() as poke:
            poke.connect_ex(("127.0.0.1", self.files.issuer.endpoint(region).port))

    def _confirm_reloads(self, now: float) -> None:
        """Each running broker must report the number of the CRL last written for it; ask again meanwhile."""
        for region, number in self._numbers.items():
            broker = self.brokers.get(region)
            loaded = self.files.loaded_number(region)
            if broker is None or broker.poll() is not None or loaded >= number:
                self._unconfirmed_since.pop(region, None)  # a restarted broker loads the file as it starts
                continue
            since = self._unconfirmed_since.setdefault(region, now)
            if now - since > self.RELOAD_SECONDS:
                raise Fault(f"the broker of {region} has not loaded CRL number {number} within "
                            f"{self.RELOAD_SECONDS:.0f} s (it reports {loaded}); see "
                            f"{self.log_dir / f'mosquitto.{region}.log'}",
                            f"the broker of {region} has not loaded the new CRL within {self.RELOAD_SECONDS:.0f} s: "
                            "revoked certificates may still connect")
            if now - self._signalled.get(region, since) > 1.0:
                self._reload_pending.add(region)  # a SIGHUP that came before mosquitto could take it: again
        self._signal_reloads()

    def _not_in_force(self) -> str | None:
        """None once every broker runs, listens and reports the CRL last written for it; else what is missing."""
        for region in self.settings.enabled_regions:
            broker = self.brokers.get(region)
            if region not in self._numbers:
                return f"the CRL of {region} has not been written"
            if broker is None or broker.poll() is not None:
                return f"the broker of {region} is not running"
            if not self._listening.get(region):
                return f"the broker of {region} is starting"
            if self.files.loaded_number(region) < self._numbers[region]:
                return f"the broker of {region} has not loaded the new CRL"
        return None

    def _accept(self) -> bool:
        arrived = False
        while self._control is not None:
            try:
                link, _ = self._control.accept()
            except (BlockingIOError, InterruptedError):
                break
            link.setblocking(False)
            self._waiters.append((link, time.monotonic() + self.CONFIRM_SECONDS))
            arrived = True
        return arrived

    def _answer_waiters(self, now: float, final: str | None = None) -> None:
        if not self._waiters:
            return
        fault = final or self.failure or self.faults.get("revocation") or self.faults.get("brokers")
        missing = None if fault else self._not_in_force()
        waiting = []
        for link, until in self._waiters:
            if fault or (missing and now >= until):
                answer = f"error {fault or missing}"
            elif missing is None:
                answer = STACK_OK
            else:
                waiting.append((link, until))
                continue
            try:
                link.send(answer.encode() + b"\n")
            except OSError:  # the revoker is gone
                pass
            link.close()
        self._waiters = waiting

    def _check_children(self) -> None:
        if self.failed.is_set() or self._stopping.is_set():
            return
        now = time.monotonic()
        if self.api is not None and self.api.poll() is not None:
            if self._stopped_from_outside("chalice local", self.api.returncode, now):
                return
            raise StackError(f"chalice local stopped (exit status {self.api.returncode}); last lines of its log:\n"
                             f"{self._log_tail('chalice')}")
        for region, broker in list(self.brokers.items()):
            name = f"mosquitto.{region}"
            if broker.poll() is None:
                if not self._listening.get(region):
                    self._check_listening(region, now)
                continue
            if self._stopped_from_outside(f"the mosquitto broker of {region}", broker.returncode, now):
                continue
            stopped = (f"the mosquitto broker of {region} stopped (exit status {broker.returncode}); "
                       f"last lines of {self.log_dir / (name + '.log')}:\n{self._log_tail(name)}")
            if broker.pid not in self._counted:
                self._counted.add(broker.pid)
                recent = [t for t in self._restarts.get(region, []) if now - t < 60] + [now]
                self._restarts[region] = recent
                if len(recent) > self.RESTARTS_PER_MINUTE:
                    raise StackError(f"{stopped}\nit stopped {len(recent)} times within a minute; stopping the stack")
                self._say(f"[stack] {stopped}\n[stack] restarting the broker of {region}")
            try:
                self._spawn_broker(region)
            except OSError as exc:
                raise Fault(f"the broker of {region} could not be restarted ({exc})",
                            f"the broker of {region} is down and could not be restarted ({_cause(exc)})") from exc
            self.processes.remove(broker)

    def _stopped_from_outside(self, name: str, status: int, now: float) -> bool:
        """A child asked to stop (SIGINT, SIGTERM) is never restarted: the stack's own stop is on its way (a SIGINT to
        make local's process group reaches every child), or someone stopped a part of it, which stops it all."""
        if status not in _ASKED_TO_STOP:
            return False
        since = self._asked_to_stop.setdefault(name, now)
        if now - since < self.STOP_GRACE_SECONDS:
            return True
        raise StackError(f"{name} was stopped from outside (exit status {status}, as after SIGINT or SIGTERM); "
                         "stopping the stack")

    def _check_listening(self, region: str, now: float) -> None:
        port = self.files.issuer.endpoint(region).port
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                self._listening[region] = True
                return
        if now - self._started.get(region, now) > self.START_SECONDS:
            raise Fault(f"the broker of {region} does not listen on port {port} {self.START_SECONDS:.0f} s after its "
                        f"start; see {self.log_dir / f'mosquitto.{region}.log'}",
                        f"the broker of {region} does not listen {self.START_SECONDS:.0f} s after its start")

    def _rotate_logs(self) -> None:
        for name in self.log_names():
            path = self.log_dir / f"{name}.log"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size > self.log_max_bytes:
                rotate_log(path, self.log_keep, in_use=True)

    def _write_status(self, force: bool = False) -> None:
        wall = time.time()
        changed = self.faults != self._faults_written
        if self._status is None or (not force and not changed and wall - self._status_written < 0.5):
            return
        self._status.write({"pid": os.getpid(), "heartbeat": wall, "stale_after": self.STALE_SECONDS,
                            "stopped": self._stopping.is_set(), "faults": dict(self.faults),
                            "crl_next_update": dict(self._next_update),
                            # /health fails this long before a CRL's nextUpdate (new ones come every 1/8 of it)
                            "crl_margin": self.crl_lifetime.total_seconds() / 4})
        self._status_written = wall
        self._faults_written = dict(self.faults)

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
        # Revokers from now on find no stack: the brokers are gone, the next ones start from the CA records.
        self._answer_waiters(time.monotonic(), final="the local stack stopped before its brokers confirmed")
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._status is not None:
            try:
                self._write_status(force=True)
            except OSError:
                pass
            self._status.close()
            self._status = None

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
