"""The local stage's issuer: a real certificate authority per simulated region.

Each region's CA is made on first use under the stage's state directory; every certificate it issues is
recorded (serial, thing, region, time, status) in one SQLite file, so revocation and audits can work.
"""
import fcntl
import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
import warnings
from datetime import datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chalicelib.adapters.files import write_private
from chalicelib.adapters.storage import explain
from chalicelib.domain import deadline
from chalicelib.domain.certificates import CertificateInfo, CertificateRef, Endpoint, IssuedCertificate
from chalicelib.domain.clock import timestamp, utcnow
from chalicelib.domain.errors import ServiceUnavailable
from chalicelib.domain.keypolicy import MIN_RSA_BITS

# See LocalCertificateAuthority.sign: a CN over 64 characters is deliberate here.
warnings.filterwarnings("ignore", message="Attribute's length must be", category=UserWarning)

log = logging.getLogger(__name__)

CA_LIFETIME = timedelta(days=3650 * 3)
DEVICE_LIFETIME = timedelta(days=3650)
_BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between issuer and broker


def _private_pem(key: PrivateKeyTypes, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


class LocalCertificateAuthority:
    """One region's CA: an EC P-256 key (fast to sign with) and a self-signed certificate."""

    def __init__(self, region: str, directory: Path, clock: Callable[[], datetime] = utcnow):
        self.region = region
        self.directory = Path(directory) / region
        self.cert_path = self.directory / "ca.cert.pem"
        self.key_path = self.directory / "ca.key.pem"
        self._clock = clock
        self._load_or_create()

    def _load_or_create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Another process (the admin CLI, devstack, a second server) may be making the same CA right now.
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.cert_path.exists():
                self._create()
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.key_path} is not the EC key this CA makes")
        self.key = key
        self.certificate = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        self._authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        self._client_base = self._leaf_base(ExtendedKeyUsageOID.CLIENT_AUTH)
        self._server_base = self._leaf_base(ExtendedKeyUsageOID.SERVER_AUTH)

    def _create(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Global IoT Device Provisioning (local)"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Local IoT CA {self.region}"),
        ])
        now = self._clock()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE).not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        write_private(self.key_path, _private_pem(key))
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def sign(self, common_name: str, public_key: CertificatePublicKeyTypes, *, server_names: Iterable[str] = (),
             lifetime: timedelta = DEVICE_LIFETIME) -> x509.Certificate:
        """A leaf certificate for `public_key`; a client certificate, or a server one when names are given."""
        now = self._clock()
        server_names = list(server_names)
        builder = ((self._server_base if server_names else self._client_base)
                   # Thing names may have 128 characters, X.509's CN only 64; brokers map CN to the MQTT user,
                   # so the whole name goes in (OpenSSL and mosquitto read longer CNs without complaint).
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)]))
                   .public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - _BACKDATE).not_valid_after(now + lifetime))
        if server_names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
                                            critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _leaf_base(self, usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
        """What every leaf of this CA shares, built once: a builder is immutable, so each leaf extends a copy."""
        return (x509.CertificateBuilder()
                .issuer_name(self.certificate.subject)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(self._authority_key_id, critical=False))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def certificate_id(cert: x509.Certificate) -> str:
    """64 hex digits, the SHA-256 of the DER certificate: the same form as AWS IoT certificate ids."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


_CERT_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    certificate_id TEXT PRIMARY KEY,
    serial         TEXT NOT NULL,
    thing_name     TEXT NOT NULL,
    region         TEXT NOT NULL,
    issued_at      TEXT NOT NULL,
    not_after      TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('ACTIVE', 'REVOKED')),
    certificate_pem TEXT NOT NULL
);
"""


class LocalIssuer:
    """Issues device certificates from the chosen region's local CA and records each one.

    `enforce` (wiring: a `StackRevocations`) is called after every revocation is recorded and returns once the
    brokers refuse it, or raises `RevocationNotEnforced`: so "revoked" means refused when `revoke` returns.
    """

    def __init__(self, ca_dir: Path, endpoints: Mapping[str, Endpoint],
                 clock: Callable[[], datetime] = utcnow, validity_days: int = 365,
                 enforce: Callable[[], None] | None = None) -> None:
        self._lifetime = timedelta(days=validity_days)  # GIP_CERT_VALIDITY_DAYS
        self._enforce = enforce
        self._ca_dir = Path(ca_dir)
        self._endpoints = dict(endpoints)
        self._clock = clock
        self._cas: dict[str, LocalCertificateAuthority] = {}
        self._ca_lock = threading.Lock()
        self._local = threading.local()

    def authority(self, region: str) -> LocalCertificateAuthority:
        ca = self._cas.get(region)
        if ca is None:
            with self._ca_lock:
                ca = self._cas.get(region) or LocalCertificateAuthority(region, self._ca_dir, self._clock)
                self._cas[region] = ca
        return ca

    def endpoint(self, region: str) -> Endpoint:
        return self._endpoints[region]

    def check(self, regions: Iterable[str]) -> None:
        """Raise unless every region's CA can sign (its key file still there) and the records can be written:
        a committed write on a fresh connection (one opened before a read-only remount keeps writing), in a
        table of its own that no listing or audit reads."""
        for region in regions:
            if not self.authority(region).key_path.is_file():
                raise FileNotFoundError(f"the CA key of {region} is missing")
        path = self._ca_dir / "certificates.sqlite3"
        try:
            self._db().execute("SELECT 1 FROM certificates LIMIT 1").fetchall()
            probe = sqlite3.connect(path, isolation_level=None, timeout=2)
            try:
                probe.execute("CREATE TABLE IF NOT EXISTS health_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL)")
                probe.execute("INSERT OR REPLACE INTO health_probe VALUES (1, ?)", (time.time(),))
            finally:
                probe.close()
        except sqlite3.Error as error:
            raise explain(path, error, "certificate records") from error

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self._ca_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._ca_dir / "certificates.sqlite3", isolation_level=None, timeout=10)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # as the registry: no fsync per commit, safe with WAL
            db.executescript(_CERT_SCHEMA)
            self._local.db = db
        return db

    def issue(self, thing_name: str, region: str, csr: x509.CertificateSigningRequest | None,
              in_place: bool = False) -> IssuedCertificate:
        # The local stage has no things: in place or not, only the certificate is made.
        endpoint = self.endpoint(region)
        private_key_pem = None
        public_key: CertificatePublicKeyTypes
        if csr is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
            public_key = key.public_key()
            # The form AWS IoT returns ("BEGIN RSA PRIVATE KEY"), which the sample's device expects.
            private_key_pem = _private_pem(key, serialization.PrivateFormat.TraditionalOpenSSL).decode()
        else:
            public_key = csr.public_key()
        # The subject is always the thing name, whatever the CSR asked for: brokers map CN to the MQTT user.
        cert = self.authority(region).sign(thing_name, public_key, lifetime=self._lifetime)
        cert_id = certificate_id(cert)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        self._db().execute(
            "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, 'ACTIVE', ?)",
            (cert_id, format(cert.serial_number, "x"), thing_name, region,
             timestamp(self._clock()), timestamp(cert.not_valid_after_utc), pem))
        return IssuedCertificate(region, cert_id, pem, endpoint, private_key_pem, thing_name)

    def revoke(self, certificate: IssuedCertificate | CertificateRef, *, delete_thing: bool) -> None:
        self._db().execute("UPDATE certificates SET status = 'REVOKED' WHERE certificate_id = ?",
                           (certificate.certificate_id,))
        if self._enforce is not None:  # also when it was revoked before: then it confirms that one is in force
            self._enforce()

    def find_issued(self, thing_name: str, region: str, since: datetime, fingerprint: str | None) -> list[str]:
        # issued_at has whole seconds: one second of slack keeps a certificate signed in the same second.
        return [row[0] for row in self._db().execute(
            "SELECT certificate_id FROM certificates WHERE thing_name = ? AND region = ? AND status = 'ACTIVE' "
            "AND issued_at >= ? ORDER BY issued_at", (thing_name, region, timestamp(since - timedelta(seconds=1))))]

    def adopt(self, thing_name: str, region: str, certificate_id: str, in_place: bool = False) -> IssuedCertificate:
        found = self.certificate(certificate_id)
        if found is None or not found.active or found.thing_name != thing_name or found.certificate_pem is None:
            raise LookupError(f"certificate {certificate_id} of {thing_name} is not active")
        return IssuedCertificate(region, certificate_id, found.certificate_pem, self.endpoint(region),
                                 thing_name=thing_name)

    def certificate(self, certificate_id: str, region: str | None = None) -> CertificateInfo | None:
        row = self._db().execute("SELECT * FROM certificates WHERE certificate_id = ?",
                                 (certificate_id,)).fetchone()
        return _info(row) if row else None

    def certificates(self, thing_name: str) -> list[CertificateInfo]:
        """Every certificate ever issued to the thing, oldest first (tests, the fleet report)."""
        return [_info(row) for row in self._db().execute(
            "SELECT * FROM certificates WHERE thing_name = ? ORDER BY issued_at", (thing_name,))]

    # The local stage has certificates only (brokers know devices by their certificate), so no ThingInventory.
    def active_certificates(self, region: str) -> Iterator[CertificateInfo]:
        for row in self._db().execute(
                "SELECT certificate_id, thing_name, region, status FROM certificates "
                "WHERE region = ? AND status = 'ACTIVE' ORDER BY issued_at", (region,)):
            yield CertificateInfo(row["certificate_id"], row["region"], row["status"], row["thing_name"])


def _info(row: sqlite3.Row) -> CertificateInfo:
    return CertificateInfo(row["certificate_id"], row["region"], row["status"], row["thing_name"],
                           row["certificate_pem"], datetime.fromisoformat(row["issued_at"]),
                           datetime.fromisoformat(row["not_after"]), row["serial"])


def local_endpoints(regions: Iterable[str], host: str, base_port: int) -> dict[str, Endpoint]:
    """Each enabled region's broker listener: base_port + its position in the enabled list."""
    return {region: Endpoint(host, base_port + i) for i, region in enumerate(regions)}


# ---- revocation lists for the local brokers (devstack watches these; the CA records stay the truth) ----

CRL_LIFETIME = timedelta(days=1)


def index_revocations(issuer: LocalIssuer) -> None:
    """A partial index holding only revoked certificates: the brokers' watcher reads them often, and issuing
    (status ACTIVE) never writes to it, so the hot path keeps its single-table insert."""
    issuer._db().execute("CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (region, serial) "
                         "WHERE status = 'REVOKED'")


def revoked_serials(issuer: LocalIssuer) -> dict[str, frozenset[int]]:
    """Serial numbers of every revoked certificate, by region."""
    found: dict[str, set[int]] = {}
    for region, serial in issuer._db().execute(
            "SELECT region, serial FROM certificates WHERE status = 'REVOKED'"):
        found.setdefault(region, set()).add(int(serial, 16))
    return {region: frozenset(serials) for region, serials in found.items()}


def records_version(issuer: LocalIssuer) -> int:
    """Changes whenever another connection commits to the CA records: a cheap test before reading them."""
    return issuer._db().execute("PRAGMA data_version").fetchone()[0]


def certificate_revocation_list(ca: LocalCertificateAuthority, serials: Iterable[int],
                                lifetime: timedelta = CRL_LIFETIME, number: int | None = None) -> bytes:
    """The CA's signed CRL (PEM) naming `serials`. OpenSSL refuses every certificate once nextUpdate has
    passed, so whoever serves it must make a new one well before `lifetime` ends. `number` (the CRL Number
    extension, increasing) is what the brokers' plugin reports having loaded."""
    now = ca._clock()
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.certificate.subject)
               .last_update(now - _BACKDATE).next_update(now + lifetime)
               .add_extension(ca._authority_key_id, critical=False))
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in sorted(serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - _BACKDATE).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# ---- "revoked" means refused when the command returns: the running local stack confirms it ----
# devstack/stack.py serves the other end (chalicelib never imports devstack); wiring gives the local issuer a
# StackRevocations, so the admin CLI and chalice local both wait, and a process with no stack pays one failed
# connect per revocation.

STACK_CONFIRM_SECONDS = 10.0  # a revoker's wait for the stack; the stack itself gives up on a broker sooner
STACK_OK = "ok"


def stack_address(state_dir: Path) -> bytes:
    """The abstract Unix socket (Linux) of the local stack serving `state_dir`: named after the directory's
    real path, and gone with the process that holds it, so there is no file to go stale after a kill -9."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:32]
    return f"\0gip-stack-{digest}".encode()


def stack_status_path(state_dir: Path) -> Path:
    """The local stack's status file (devstack.stack.StackStatus writes it, chalicelib.edge.health reads it)."""
    return Path(state_dir) / "mqtt" / "stack.json"


class RevocationNotEnforced(ServiceUnavailable):
    """The revocation is in the CA records, but the running local stack could not confirm that its brokers refuse
    it; the stack keeps trying, and /health and make local's console name the fault."""

    code = "revocation-not-enforced"


class StackRevocations:
    """Returns once the local stack serving `state_dir` has written the CA records' revocations into its brokers'
    CRLs and every broker has reported loading them (each broker's plugin names the CRL number it loaded).

    With no stack running there is nothing to wait for: brokers start from the CA records. That is said once.
    """

    def __init__(self, state_dir: Path, timeout: float = STACK_CONFIRM_SECONDS) -> None:
        self._state_dir = Path(state_dir)
        self._address = stack_address(self._state_dir)
        self._timeout = timeout
        self._told = False

    def __call__(self) -> None:
        timeout = self._timeout
        current = deadline.current()
        if current is not None:  # inside a request: never past its deadline (the revoke then counts as not done)
            timeout = max(0.1, min(timeout, current.remaining() - deadline.ANSWER_MARGIN_SECONDS))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as link:
            link.settimeout(timeout)
            try:
                link.connect(self._address)
            except (ConnectionRefusedError, FileNotFoundError):
                if not self._told:
                    self._told = True
                    log.warning("no local stack is running on %s: its brokers refuse the revoked certificate from "
                                "their start (they build their CRLs from the CA records)", self._state_dir)
                return
            except OSError as exc:
                raise RevocationNotEnforced(f"the local stack on {self._state_dir} could not be asked to load the "
                                            f"revocation into its brokers ({exc}); run the command again") from exc
            answer = b""
            try:
                while not answer.endswith(b"\n"):
                    chunk = link.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            except OSError as exc:  # socket.timeout included
                raise RevocationNotEnforced(
                    f"the local stack on {self._state_dir} did not confirm within {timeout:.0f} s that its brokers "
                    f"refuse the revoked certificate ({exc or 'timed out'}); see make local's console and /health, "
                    "then run the command again") from exc
        text = answer.decode(errors="replace").strip()
        if text != STACK_OK:
            raise RevocationNotEnforced(
                f"revoked in the CA records, but not yet refused by the brokers: {text or 'the stack hung up'}; "
                "the stack keeps trying (make local's console and /health name the fault): run the command again")
