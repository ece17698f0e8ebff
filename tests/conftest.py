import base64
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from chalice.test import Client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from admin import cli as admin
from chalicelib.adapters.geo import MaxMindLocator
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR
from chalicelib.container import Container
from chalicelib.domain.clock import timestamp, utcnow
from chalicelib.domain.signatures import v2_text
from chalicelib.edge.http import create_app

# No test leaves a process behind: the check's hooks, registered here (tests/process_check.py).
from tests.process_check import pytest_configure, pytest_runtest_logstart, pytest_sessionfinish  # noqa: F401

# The wire-protocol vectors live in ../shared beside the repository; a copy travels with the repository so a
# clone anywhere runs the whole suite, and test_signatures keeps the copy equal to the original.
SHARED_VECTORS_PATH = PROJECT_DIR.parent / "shared" / "vectors" / "signatures.json"
VECTORS_COPY_PATH = PROJECT_DIR / "tests" / "vectors" / "signatures.json"
VECTORS_PATH = SHARED_VECTORS_PATH if SHARED_VECTORS_PATH.is_file() else VECTORS_COPY_PATH

# Well-known public addresses and where the bundled DB-IP City Lite database puts them.
LONDON_IP = "81.2.69.142"      # GB, London
TOKYO_IP = "126.0.0.1"         # JP, Tokyo
SYDNEY_IP = "1.1.1.1"          # AU, Melbourne area


@pytest.fixture(scope="session", autouse=True)
def state_home_of_the_tests(tmp_path_factory):
    """The local stage keeps its state in $XDG_STATE_HOME (config.default_state_dir): point it, for this process
    and every process a test starts, at a temporary directory, so no test reads or writes the real home's."""
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield Path(os.environ["XDG_STATE_HOME"])
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(scope="session", autouse=True)
def moto_routers_built_on_one_thread():
    """moto builds each service's request router on first use, not thread-safely (getmoto/moto#7166); the AWS
    issuer's first provisioning calls IoT from four threads at once. Build them once, here, on one thread."""
    import boto3
    from moto import mock_aws
    with mock_aws():
        boto3.client("iot", region_name="eu-west-2").list_things()
        boto3.client("dynamodb", region_name="eu-west-2").list_tables()
        boto3.client("ssm", region_name="eu-west-2").describe_parameters()


@pytest.fixture(scope="session")
def executor():
    """The thread pool a composition root would give the AWS backends (Container.pool)."""
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-pool") as pool:
        yield pool


def sign_v1(private_key, thing_name: str) -> str:
    return base64.b64encode(
        private_key.sign(thing_name.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


def v2_body(private_key, thing_name: str, csr_pem: str | None = None, at: datetime | None = None) -> dict:
    """A signed request v2 by an RSA key (the fleet key's kind): timestamp `at` (now unless told), a fresh nonce."""
    stamp, nonce = timestamp(at or utcnow()), secrets.token_hex(16)
    signature = private_key.sign(v2_text(thing_name, stamp, nonce, csr_pem), padding.PKCS1v15(), hashes.SHA256())
    body = {"thing-name": thing_name, "thing-name-sig": base64.b64encode(signature).decode(), "timestamp": stamp,
            "nonce": nonce}
    if csr_pem:
        body["CSR"] = csr_pem
    return body


def make_csr(thing_name: str, key=None) -> tuple[str, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing_name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


@dataclass
class Stage:
    state_dir: Path
    fleet_key: rsa.RSAPrivateKey

    def admin(self, *argv: str) -> int:
        return admin.main(["--state-dir", str(self.state_dir), *argv])

    def body(self, thing_name: str, csr_pem: str | None = None, version: int = 1) -> dict:
        if version == 2:
            return v2_body(self.fleet_key, thing_name, csr_pem)
        body = {"thing-name": thing_name, "thing-name-sig": sign_v1(self.fleet_key, thing_name)}
        if csr_pem:
            body["CSR"] = csr_pem
        return body


@pytest.fixture
def stage(tmp_path, monkeypatch) -> Stage:
    """A fresh local stage in a temporary directory: keys made and mydevice1..5 registered by the CLI."""
    state_dir = tmp_path / "state"
    monkeypatch.setenv("GIP_STATE_DIR", str(state_dir))
    for name in ("GIP_FLEET_PUBLIC_KEY", "GIP_ENABLED_REGIONS", "GIP_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    s = Stage(state_dir, None)
    assert s.admin("keygen") == 0
    assert s.admin("register", "--prefix", "mydevice", "--count", "5") == 0
    s.fleet_key = serialization.load_pem_private_key(
        (state_dir / "keys" / FLEET_PRIVATE_KEY_NAME).read_bytes(), password=None)
    return s


def api(stage: str = "local", parts: Container | None = None) -> Client:
    """chalice's test client over an app of its own: on `parts`, else on a container built from the stage's
    environment on first use (as chalice local's is)."""
    return Client(create_app(parts or Container()), stage_name=stage, project_dir=str(PROJECT_DIR))


@pytest.fixture(scope="session")
def fleet_key() -> rsa.RSAPrivateKey:
    """A fleet signing key for tests that build the service by hand (the `stage` fixture makes its own)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def locator():
    return MaxMindLocator.bundled()


@pytest.fixture(scope="session")
def vectors() -> dict:
    return json.loads(VECTORS_PATH.read_text())


# --- tools a module cannot run without ----------------------------------------------------------------------------

def needs_tool(found: object, what: str) -> pytest.MarkDecorator:
    """The mark of a module that cannot run without `what` (mosquitto, Chromium): its tests are skipped where it is
    missing, except under CI (the CI variable set, as CI services do and .ci/run does), where the missing tool fails
    the run: a suite that skips what it guards would pass while that code is broken."""
    reason = f"{what} is not installed (.ci/run installs it)"
    if not found and os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}; CI is set, so this fails the run instead of skipping its tests", pytrace=False)
    return pytest.mark.skipif(not found, reason=reason)
