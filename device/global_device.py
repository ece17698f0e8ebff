#!/usr/bin/env python3
"""Sample device for Global IoT Device Provisioning.

The device asks the provisioning API for credentials once (signed request v1 as in the original
aws-samples device, or v2 with timestamp, nonce and CSR hash), stores them, then connects to the regional
MQTT endpoint over mutual TLS and publishes to data/<thing-name>/misc. A second start reuses the stored credentials.
Left running, it lives through its bad days: it reconnects with back-off, keeps unsent messages in a bounded queue,
renews its certificate in place, and decides once what a refused certificate means. docs/device.md describes its
states, files, exit codes and behaviour on each failure.

Standalone on purpose: it ships to devices, so it never imports the service's code.
"""
from __future__ import annotations

import argparse
import base64
import collections
import datetime as dt
import email.utils
import hashlib
import io
import json
import os
import queue
import random
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import certifi
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

EXIT_OK, EXIT_LOCAL, EXIT_REFUSED, EXIT_CONFLICT, EXIT_BAD_REQUEST = 0, 2, 3, 4, 5
EXIT_UNAVAILABLE, EXIT_MQTT, EXIT_INTERRUPTED = 6, 7, 130
EXIT_CERT_REFUSED = 8  # the broker refused our certificate (revoked, or not issued for its region)
# Busy, down, or a gateway that gave up waiting: the same request may work a little later.
RETRYABLE_STATUS = {429, 502, 503, 504}
# The longest Retry-After the device waits out (main's default). In an onboarding storm the service gives each
# device its own slot; 100,000 devices in one region at AWS IoT's default quotas take about 2.3 h
# (docs/performance.md, the storm).
MAX_RETRY_AFTER = 6 * 3600
# Signed request version sent unless --signature-version/--legacy-signature says otherwise.
DEFAULT_SIGNATURE_VERSION = 2
# Nothing listening, a name that does not resolve, no answer: retried this long, then exit 6 (a wrong -a should
# not look like an outage for minutes). --max-attempts 0 retries forever, for service managers.
NETWORK_GIVE_UP_SECONDS = 10.0
# The MQTT reconnection back-off is the AWS IoT Device SDKs v2' (their MQTT5 client, aws-c-mqtt:
# include/aws/mqtt/private/v5/mqtt5_utils.h, source/v5/mqtt5_client.c): full jitter, each delay drawn from
# [0, min(1 s * 2^n, 120 s)] for the n-th attempt in a row, n back to 0 once a connection has lasted 30 s, so a fleet
# that lost its broker at once does not come back in lockstep; a CONNACK is awaited 20 s.
RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS, RECONNECT_RESET_AFTER_SECONDS = 1.0, 120.0, 30.0
CONNACK_TIMEOUT_SECONDS = 20.0
KEEPALIVE_SECONDS = 60
IN_FLIGHT_WINDOW = 20  # paho's default max_inflight_messages
DEFAULT_QUEUE_SIZE = 1000  # at the default interval, about 33 minutes without a broker
RENEWAL_CHECK_SECONDS = 3600  # a running device looks at its certificate's expiry this often
# The original sample's <thing>.endpoint is "host::region": AWS IoT's MQTT port is implied.
SAMPLE_ENDPOINT_PORT = 8883
# CONNACK reason codes that another attempt cannot change (MQTT 5, 3.2.2.2): the rest (server unavailable or busy,
# quota, connection rate) are retried with the back-off.
PERMANENT_CONNACK_CODES = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}
EXIT_BY_STATUS = {401: EXIT_REFUSED, 403: EXIT_REFUSED, 409: EXIT_CONFLICT,
                  400: EXIT_BAD_REQUEST, 413: EXIT_BAD_REQUEST}
CAUSE = {EXIT_REFUSED: "{call} refused", EXIT_CONFLICT: "already provisioned or in progress",
         EXIT_BAD_REQUEST: "bad {call} request", EXIT_UNAVAILABLE: "{call} failed"}

EPILOG = """exit codes:
  0    done (provisioned and/or published --count messages, all acknowledged; --count 0 = provision only,
       no MQTT), or stopped by SIGTERM (session closed, files intact)
  2    usage or local problem (bad flags or URL, unreadable signing key or --root-ca, damaged state files)
  3    provisioning or renewal refused (HTTP 401/403: bad signature or device not allowed); a renewal refused
       403 is followed by asking the broker about the current certificate (see 8)
  4    already provisioned or provisioning in progress (HTTP 409)
  5    bad request (HTTP 400/413)
  6    server or network failure after all retries (429/502/503/504 and 409 in progress are retried up to
       --max-attempts, honouring Retry-After; nothing listening or a name that does not resolve for about 10 s;
       --max-attempts 0 retries forever)
  7    MQTT broker refused the connection for good, a publish was not authorized, or --max-reconnects ran out
  8    MQTT broker refused the device's certificate: revoked (see --reprovision-if-revoked) or not issued for
       this broker's region
  130  interrupted (Ctrl-C)
A running device reconnects by itself (back-off with jitter, 1-120 s) and renews its certificate in place
within --renew-before days of its expiry, or at once on SIGUSR1. docs/device.md has the details."""


class ClientError(Exception):
    """A failure that ends the program with a specific exit code (`status`: the HTTP status that caused it)."""

    def __init__(self, exit_code: int, message: str, status: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


class RenewalImpossible(ClientError):
    """A renewal that cannot even be asked for (no certificate id): the device carries on with its certificate."""

    def __init__(self, message: str):
        super().__init__(EXIT_LOCAL, message)


# Why a certificate may be revoked: the server answers every renewal refusal alike, so the device cannot tell which.
REVOCATION_CAUSES = ("an operator reset it or `admin audit --fix` revoked it, or another copy of this device (same "
                     "thing name) provisioned again, renewed or was re-keyed, which revokes this copy's certificate")


class CertificateRefused(ClientError):
    """The broker's TLS alert about our certificate; `revoked` when it said so (alert certificate_revoked)."""

    def __init__(self, alert: str, detail: str):
        self.alert = alert
        self.revoked = alert == "certificate revoked"
        if self.revoked:
            hint = (f". Possible causes: {REVOCATION_CAUSES}. To recover, once no other copy runs: start again with "
                    "--reprovision-if-revoked (it sets the revoked credentials aside and provisions again with "
                    "--signing-key)")
        else:
            hint = "; is this the endpoint of the region that issued it?"
        super().__init__(EXIT_CERT_REFUSED, f"the broker refused this device's certificate ({alert}){hint} "
                                            f"[{detail}]")


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so the session is closed and no file is left half-written; exit 0."""


# The TLS alerts a broker sends about a client certificate, as OpenSSL words them in its error text.
CERTIFICATE_ALERTS = ("certificate revoked", "unknown ca", "bad certificate", "certificate unknown",
                      "certificate expired", "unsupported certificate")


def certificate_refusal(text: str) -> CertificateRefused | None:
    alert = next((a for a in CERTIFICATE_ALERTS if a in text.lower()), None)
    return CertificateRefused(alert, text) if alert else None


# ---------- signing: v1 (the sample's, thing name only) and v2 (timestamp, nonce, CSR hash) ----------

def v1_signed_text(thing_name: str) -> bytes:
    return thing_name.encode("utf-8")


def v2_signed_text(thing_name: str, timestamp: str, nonce: str, csr_pem: str | None) -> bytes:
    csr_hash = hashlib.sha256(csr_pem.encode("utf-8")).hexdigest() if csr_pem else ""
    return f"v2\n{thing_name}\n{timestamp}\n{nonce}\n{csr_hash}".encode("utf-8")


def renew_v1_signed_text(thing_name: str, certificate_id: str, timestamp: str, nonce: str,
                         csr_pem: str | None) -> bytes:
    csr_hash = hashlib.sha256(csr_pem.encode("utf-8")).hexdigest() if csr_pem else ""
    return f"renew-v1\n{thing_name}\n{certificate_id}\n{timestamp}\n{nonce}\n{csr_hash}".encode("utf-8")


def sign(private_key, text: bytes) -> bytes:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(text, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(text, ec.ECDSA(hashes.SHA256()))
    raise ClientError(EXIT_LOCAL, f"unsupported signing key type {type(private_key).__name__}")


def build_v1_request(thing_name: str, signing_key, csr_pem: str | None) -> dict:
    body = {"thing-name": thing_name,
            "thing-name-sig": base64.b64encode(sign(signing_key, v1_signed_text(thing_name))).decode()}
    if csr_pem:
        body["CSR"] = csr_pem
    return body


def build_v2_request(thing_name: str, signing_key, csr_pem: str | None,
                     timestamp: str | None = None, nonce: str | None = None) -> dict:
    # Fresh timestamp and nonce on every call: the server refuses a replayed nonce.
    timestamp = timestamp or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    nonce = nonce or secrets.token_urlsafe(16)
    sig = sign(signing_key, v2_signed_text(thing_name, timestamp, nonce, csr_pem))
    body = {"thing-name": thing_name, "thing-name-sig": base64.b64encode(sig).decode(),
            "timestamp": timestamp, "nonce": nonce}
    if csr_pem:
        body["CSR"] = csr_pem
    return body


def build_renewal_request(thing_name: str, certificate_id: str, current_key, csr_pem: str | None,
                          timestamp: str | None = None, nonce: str | None = None) -> dict:
    """POST /device-renewal's body, signed with the key of the device's current certificate."""
    timestamp = timestamp or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    nonce = nonce or secrets.token_urlsafe(16)
    sig = sign(current_key, renew_v1_signed_text(thing_name, certificate_id, timestamp, nonce, csr_pem))
    body = {"thing-name": thing_name, "certificateId": certificate_id}
    if csr_pem:
        body["CSR"] = csr_pem
    body.update({"timestamp": timestamp, "nonce": nonce, "signature": base64.b64encode(sig).decode()})
    return body


def check_signing_key(signing_key, version: int, path: str) -> None:
    if isinstance(signing_key, ec.EllipticCurvePrivateKey):
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise ClientError(EXIT_LOCAL, f"signing key {path} is EC {signing_key.curve.name}; only P-256 is supported")
        if version == 1:
            raise ClientError(EXIT_LOCAL, f"signing key {path} is an EC key, but signature v1 (the original "
                                          "sample's) is RSA-only; use --signature-version 2 with an EC key")
    elif not isinstance(signing_key, rsa.RSAPrivateKey):
        raise ClientError(EXIT_LOCAL, f"signing key {path} must be an RSA or EC P-256 private key")


def load_signing_key(path: str):
    try:
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError:
        raise ClientError(EXIT_LOCAL, f"no provisioning signing key at {path}. Make the fleet key pair with "
                                      "`python -m admin keygen` (for the local stage it writes "
                                      f"{local_stage_signing_key()}) and pass it with --signing-key") from None
    except (OSError, ValueError, TypeError) as err:
        raise ClientError(EXIT_LOCAL, f"cannot read provisioning signing key {path}: {err}") from err


def local_stage_signing_key() -> str:
    """Where `admin keygen` puts the local stage's fleet private key (chalicelib/config.py's rule, restated here
    because the device never imports the service)."""
    state = os.environ.get("GIP_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"),
        "iot-global-provisioning", "local")
    return os.path.join(state, "keys", "global-provisioning.priv.key.pem")


def check_root_ca(path: str) -> None:
    """Before any request: a device that cannot verify its broker should not take an identity it cannot use."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        raise ClientError(EXIT_LOCAL, f"--root-ca {path} is not a readable PEM CA bundle: {err}") from None


def generate_device_key(key_type: str):
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_csr(thing_name: str, device_key) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing_name)]))
           .sign(device_key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def key_to_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ---------- local state ----------

@dataclass
class StatePaths:
    key: str
    cert: str
    endpoint: str

    @classmethod
    def for_thing(cls, state_dir: str, thing: str) -> "StatePaths":
        join = lambda suffix: os.path.join(state_dir, thing + suffix)  # noqa: E731
        return cls(join(".device.key.pem"), join(".device.cert.pem"), join(".endpoint"))

    def complete(self) -> bool:
        # The endpoint file is written last, so all three present means a whole credential set.
        return all(os.path.isfile(p) for p in (self.key, self.cert, self.endpoint))

    # Renewal: the next key waits in `pending_key` until the answer comes (a retry after a lost answer must
    # send the same key); the answer is kept in `answer` until applied; the credentials it replaces stay in
    # `previous` until the new certificate has connected once.
    @property
    def pending_key(self) -> str:
        return self.key.replace(".device.key.pem", ".renewal.key.pem")

    @property
    def answer(self) -> str:
        return self.endpoint + ".renewal.json"

    def previous(self) -> "StatePaths":
        return StatePaths(*(p + ".previous" for p in (self.key, self.cert, self.endpoint)))


def write_file_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    # The mode is set at creation, before any byte is written, and the rename means readers
    # see either the old file or the whole new one, never half of it.
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def certificate_id_of(cert_path: str) -> str | None:
    """The issuer's id of the certificate in `cert_path`, or None when the file cannot be read as one.

    AWS IoT's certificateId is the SHA-256 of the certificate's DER, in lower-case hex (not in its API reference,
    which says only "64 hex characters"; confirmed by AWS support in getmoto/moto#3321, which moto follows), and the
    local CA forms its ids the same way (chalicelib/adapters/issuers/local_ca.py, certificate_id): so a state
    directory that never stored one, the original sample's, still renews."""
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def read_endpoint(path: str, cert_path: str | None = None) -> dict:
    """The endpoint file: ours (JSON), or the original sample's one line `host::region` (port 8883 implied), used as it
    is; the first credentials this client writes replace it with ours. Without a stored certificate id, the id is
    derived from `cert_path`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            info = json.loads(text)
        except ValueError:
            host, separator, region = text.strip().partition("::")
            if not separator or not host or any(c.isspace() for c in host):
                raise ValueError("neither JSON nor the original sample's host::region") from None
            info = {"endpointAddress": host, "endpointPort": SAMPLE_ENDPOINT_PORT, "region": region or None}
        if not isinstance(info, dict) or not info.get("endpointAddress"):
            raise ValueError("no endpointAddress")
    except (OSError, ValueError) as err:
        raise ClientError(EXIT_LOCAL, f"damaged state file {path} ({err}); remove the "
                                      "thing's files to provision again") from err
    if not info.get("certificateId") and cert_path:
        info["certificateId"] = certificate_id_of(cert_path)
    return info


def load_or_create_device_key(path: str, key_type: str):
    # A key saved by an earlier -k run whose response was lost is reused, so its CSR stays valid.
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            print(f"=> reusing the device private key in {path}")
            return key
        except ValueError:
            print(f"=> {path} is not a usable key; making a new one")
    key = generate_device_key(key_type)
    write_file_atomically(path, key_to_pem(key), 0o600)
    print(f"=> created a {'P-256' if key_type == 'ec' else 'RSA-2048'} device key, saved to {path} (0600)")
    return key


# ---------- provisioning over HTTP ----------

def api_base(url: str) -> str:
    """The API's base URL, also from the full URL the original sample takes (.../device-provisioning)."""
    base = url.rstrip("/")
    for route in ("/device-provisioning", "/device-renewal"):
        if base.endswith(route):
            return base[:-len(route)]
    return base


def _causes(err: BaseException):
    """The exception and what it wraps (requests -> urllib3 -> socket), nearest first."""
    seen: list[BaseException] = []
    todo = [err]
    while todo and len(seen) < 20:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.append(current)
        todo += [e for e in (getattr(current, "reason", None), current.__cause__, current.__context__, *current.args)
                 if isinstance(e, BaseException)]
    return seen


def network_problem(err: BaseException, url: str) -> str:
    """One short line naming the URL, instead of urllib3's 400-character chain."""
    causes = _causes(err)
    if any(isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError" for e in causes):
        host = urllib.parse.urlsplit(url).hostname
        return f"the host name {host} of {url} does not resolve"
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return f"nothing is listening at {url} (connection refused)"
    if isinstance(err, requests.ConnectTimeout):
        return f"no connection to {url} within the connect timeout"
    if isinstance(err, requests.Timeout):
        return f"no answer from {url} within the read timeout"
    if any(isinstance(e, ssl.SSLError) for e in causes):
        return f"TLS failed with {url}: {next(e for e in causes if isinstance(e, ssl.SSLError))}"
    deepest = causes[-1]
    return f"cannot reach {url} ({type(deepest).__name__}: {str(deepest)[:120]})"


class ProvisioningClient:
    """POSTs the request, retrying throttling and outages with jittered exponential backoff."""

    def __init__(self, api_url: str, session: requests.Session | None = None, *, max_attempts: int = 10,
                 base_delay: float = 1.0, max_delay: float = 30.0, timeout: tuple = (10, 35),
                 forwarded_for: str | None = None, sleep=time.sleep, clock=None,
                 max_retry_after: float | None = None, monotonic=time.monotonic):
        base = api_base(api_url)
        self.url = base + "/device-provisioning"
        self.renewal_url = base + "/device-renewal"
        # The device's clock, corrected once from the server's when a v2 timestamp is refused as stale.
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self.clock_offset: dt.timedelta | None = None
        self.session = session or requests.Session()
        # max_attempts 0: forever (service managers), also through network failures.
        self.max_attempts, self.base_delay, self.max_delay = max(0, max_attempts), base_delay, max_delay
        self.give_up_after = NETWORK_GIVE_UP_SECONDS if self.max_attempts else None
        self.timeout, self.sleep, self.monotonic = timeout, sleep, monotonic
        self.max_retry_after = max_delay if max_retry_after is None else max_retry_after
        self.headers = {"Content-Type": "application/json"}
        if forwarded_for:
            self.headers["X-Forwarded-For"] = forwarded_for

    def provision(self, make_body, url: str | None = None) -> dict:
        """make_body() is called for every attempt, so each retry is signed afresh (v2 nonces)."""
        url = url or self.url
        call = "renewal" if url == self.renewal_url else "provisioning"
        last_problem, said, unreachable_since, attempt = "no attempt made", None, None, 0
        while True:
            attempt += 1
            retry_after = None
            try:
                resp = self.session.post(url, data=json.dumps(make_body()), headers=self.headers,
                                         timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as err:
                last_problem = network_problem(err, url)
                now = self.monotonic()
                unreachable_since = now if unreachable_since is None else unreachable_since
                waited = now - unreachable_since
                if self.give_up_after is not None and waited >= self.give_up_after:
                    raise ClientError(EXIT_UNAVAILABLE, f"{call} failed: {last_problem}; gave up after {waited:.0f} s "
                                                        "(--max-attempts 0 retries forever)") from None
            else:
                unreachable_since = said = None
                data = _json_or_empty(resp)
                if resp.status_code == 200 and data.get("status") == "success":
                    return data
                problem = f"HTTP {resp.status_code} {data.get('code', '')}: {data.get('message') or resp.reason}"
                server_time = _server_time(resp, data) if data.get("code") == "stale-timestamp" else None
                if server_time is not None and self.clock_offset is None:  # no NTP yet: once, not in a loop
                    self.clock_offset = server_time - self.clock()
                    ahead = -self.clock_offset.total_seconds()
                    print(f"<= the device clock is {abs(ahead):.0f} s {'ahead of' if ahead > 0 else 'behind'} the "
                          f"server's ({server_time:%Y-%m-%dT%H:%M:%SZ}); corrected, retrying now")
                    continue
                # Another attempt of ours may still hold the claim (its answer was lost): wait it out.
                in_progress = resp.status_code == 409 and data.get("code") in ("provisioning-in-progress",
                                                                               "renewal-in-progress")
                if resp.status_code not in RETRYABLE_STATUS and not in_progress:
                    code = EXIT_BY_STATUS.get(resp.status_code, EXIT_UNAVAILABLE)
                    raise ClientError(code, f"{CAUSE[code].format(call=call)}: {problem}", resp.status_code)
                last_problem, retry_after = problem, _retry_after_seconds(resp)
            if self.max_attempts and attempt >= self.max_attempts:
                break
            delay = self._delay(attempt, retry_after)
            if unreachable_since is not None:
                if self.give_up_after is not None:  # the last attempt at about the time limit, not long after it
                    delay = min(delay, max(0.0, unreachable_since + self.give_up_after - self.monotonic()))
                if last_problem != said:  # one line per cause, not one per attempt
                    limit = "forever" if self.give_up_after is None else f"for up to {self.give_up_after:g} s"
                    print(f"<= {call}: {last_problem}; retrying {limit}")
                    said = last_problem
            else:
                told = "the server's Retry-After" if retry_after is not None else "back-off"
                limit = f"/{self.max_attempts}" if self.max_attempts else ""
                print(f"<= {call} attempt {attempt}{limit} failed ({last_problem}); retrying in {delay:.1f} s ({told})")
            self.sleep(delay)
        raise ClientError(EXIT_UNAVAILABLE,
                          f"{call} failed: service unavailable, gave up after {attempt} attempt(s): {last_problem}")

    def now(self) -> dt.datetime:
        return self.clock() + (self.clock_offset or dt.timedelta(0))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best when it will have capacity again
            return min(retry_after, self.max_retry_after)
        # Full jitter keeps a fleet that lost the service at once from retrying in lockstep.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 30)))


def _server_time(resp: requests.Response, data: dict) -> dt.datetime | None:
    """The server's time from a stale-timestamp refusal: its serverTime field, else its Date header."""
    try:
        if data.get("serverTime"):
            return dt.datetime.strptime(data["serverTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
        return email.utils.parsedate_to_datetime(resp.headers["Date"])
    except (KeyError, TypeError, ValueError):
        return None


def _json_or_empty(resp: requests.Response) -> dict:
    try:
        data = resp.json()
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _retry_after_seconds(resp: requests.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None  # absent or an HTTP date: fall back to our own backoff


def provision(args, paths: StatePaths, client: ProvisioningClient, pause, after_revocation: bool = False) -> dict:
    print(f"=> provisioning {args.thing_name} via {client.url}")
    print(f"   own key (CSR): {args.own_key}, fake device: {args.fake_device}")
    pause()
    version = args.signature_version
    if args.fake_device:
        # A key the service has never seen: the signature cannot verify, so the service must refuse.
        print("=> fake device: signing with a throwaway key (--signing-key is not read)")
        signing_key = generate_device_key("rsa")
    else:
        signing_key = load_signing_key(args.signing_key)
        check_signing_key(signing_key, version, args.signing_key)
    csr_pem = None
    if args.own_key:
        csr_pem = make_csr(args.thing_name, load_or_create_device_key(paths.key, args.key_type))
    print(f"=> sending a signed request v{version}: thing-name={args.thing_name!r}, "
          f"CSR={'yes' if csr_pem else 'no (server makes the key)'}"
          + (f", X-Forwarded-For={args.forwarded_for}" if args.forwarded_for else ""))
    pause()

    signed: list[bool] = []

    def make_body() -> dict:  # signed at send time, so a retry never replays a timestamp/nonce
        if version == 1:
            body = build_v1_request(args.thing_name, signing_key, csr_pem)
        else:
            body = build_v2_request(args.thing_name, signing_key, csr_pem,
                                    timestamp=client.now().strftime("%Y-%m-%dT%H:%M:%SZ"))
        if not signed:  # shown once: a retry is signed again alike, and says only why it retries
            print((f"   timestamp={body['timestamp']}, nonce={body['nonce']}\n" if version == 2 else "")
                  + f"   thing-name-sig={body['thing-name-sig'][:16]}...")
        signed.append(True)
        return body

    reply = client.provision(make_body)
    missing = [k for k in ("certificatePem", "endpointAddress") if not reply.get(k)]
    if not csr_pem and not reply.get("PrivateKey"):
        missing.append("PrivateKey")
    if missing:
        raise ClientError(EXIT_UNAVAILABLE, f"success reply without {', '.join(missing)}")
    distance = reply.get("distance")
    away = f"{distance} km away" if isinstance(distance, (int, float)) else "distance unknown"
    print(f"<= provisioned in region {reply.get('region')} ({away}), "
          f"endpoint {reply['endpointAddress']}:{reply.get('endpointPort', 8883)}, "
          f"certificate {reply.get('certificateId')}")
    if reply.get("reason") == "rekeyed":
        print("<= the service re-keyed this device: it was already provisioned with a key the service made (its answer "
              "was lost, or another copy of this device holds that identity), and that certificate is now revoked")
    if reply.get("message"):
        print(f"<= message: {reply['message']}")
    save_credentials(paths, reply, server_key=None if csr_pem else reply["PrivateKey"],
                     after_revocation=after_revocation)
    return read_endpoint(paths.endpoint)


def save_credentials(paths: StatePaths, reply: dict, server_key: str | None, after_revocation: bool = False) -> None:
    if server_key:
        write_file_atomically(paths.key, server_key.encode(), 0o600)
    write_file_atomically(paths.cert, reply["certificatePem"].encode())
    endpoint = {"endpointAddress": reply["endpointAddress"], "endpointPort": int(reply.get("endpointPort") or 8883),
                "region": reply.get("region"), "certificateId": reply.get("certificateId")}
    if after_revocation:  # what keeps two copies of one device from revoking each other for ever: stop_or_reprovision
        endpoint.update(reprovisioned=True, reason=reply.get("reason"))
    write_file_atomically(paths.endpoint, json.dumps(endpoint, indent=2).encode())  # last: marks completion
    print(f"=> saved {paths.key}, {paths.cert}, {paths.endpoint}")


def discard_credentials(paths: StatePaths) -> None:
    # The endpoint file goes first: without it the set is incomplete and the next start provisions.
    for path in (paths.endpoint, paths.cert, paths.key):
        if os.path.exists(path):
            os.replace(path, path + ".revoked")
            print(f"=> moved {path} to {path}.revoked")


def stop_or_reprovision(args, paths: StatePaths, refused: CertificateRefused) -> None:
    """The one decision on a certificate the broker refused, wherever that was learnt (a connection, or a renewal
    refused 403 and then the broker asked): returns when the device is to provision again, raises otherwise.

    Two copies of one device with a server-made key would otherwise revoke each other for ever: each
    re-provisioning re-keys the device and revokes the other copy's certificate. A certificate that itself came
    from a re-provisioning the service answered as a re-key (`reason: rekeyed`) proves such another holder, so when
    it is revoked in turn, this copy stops: each copy re-provisions at most once."""
    if not (refused.revoked and args.reprovision_if_revoked):
        raise refused
    current = read_endpoint(paths.endpoint) if os.path.isfile(paths.endpoint) else {}
    if current.get("reprovisioned") and current.get("reason") == "rekeyed":
        raise ClientError(EXIT_CERT_REFUSED, (
            "the broker refused this device's certificate (certificate revoked); not provisioning again: this "
            "certificate came from a re-provisioning that re-keyed the device, revoking another holder of its "
            "identity, so another copy of this device (same thing name) is most likely running, and each "
            "re-provisioning would revoke the other's certificate (an operator's reset or audit may have revoked it "
            f"too). To recover: stop the other copy, then `mv {paths.endpoint} {paths.endpoint}.revoked` and start "
            "this one again"))
    print(f"<= the broker refused the certificate ({refused.alert})\n"
          "=> --reprovision-if-revoked: setting the revoked credentials aside")


def reprovision(args, paths: StatePaths, client: ProvisioningClient, pause) -> dict:
    discard_credentials(paths)
    return provision(args, paths, client, pause, after_revocation=True)


# ---------- renewal (POST /device-renewal) ----------

def renewal_due(paths: StatePaths, renew_before_days: float) -> dt.datetime | None:
    """The certificate's expiry when it falls within `renew_before_days` from now, else None."""
    try:
        with open(paths.cert, "rb") as f:
            expires = x509.load_pem_x509_certificate(f.read()).not_valid_after_utc
    except (OSError, ValueError) as err:  # the broker will say more when the device connects with it
        print(f"warning: cannot read the expiry of {paths.cert} ({err}); not renewing by itself")
        return None
    if expires - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=renew_before_days):
        return expires
    return None


def renew(args, paths: StatePaths, client: ProvisioningClient, pause) -> dict:
    """A new key and CSR, signed with the current certificate's key; the answer is stored only once it came.

    Always with a CSR: a renewal whose answer is lost can then be asked again with the same key and gets the
    same certificate (the server never keeps a key it made)."""
    current = read_endpoint(paths.endpoint, paths.cert)
    certificate_id = current.get("certificateId")
    if not certificate_id:
        raise RenewalImpossible(f"cannot renew: {paths.endpoint} names no certificate id and {paths.cert} is not a "
                                "readable certificate to derive it from; provision again to renew")
    current_key = load_signing_key(paths.key)
    key_type = "ec" if isinstance(current_key, ec.EllipticCurvePrivateKey) else "rsa"
    csr_pem = make_csr(args.thing_name, load_or_create_device_key(paths.pending_key, key_type))
    print(f"=> renewing {args.thing_name} (certificate {certificate_id[:16]}...) via {client.renewal_url}")
    pause()

    def make_body() -> dict:  # signed afresh for every attempt: a new timestamp and nonce
        return build_renewal_request(args.thing_name, certificate_id, current_key, csr_pem,
                                     timestamp=client.now().strftime("%Y-%m-%dT%H:%M:%SZ"))

    reply = client.provision(make_body, client.renewal_url)
    missing = [k for k in ("certificatePem", "endpointAddress", "certificateId") if not reply.get(k)]
    if missing:
        raise ClientError(EXIT_UNAVAILABLE, f"success reply without {', '.join(missing)}")
    write_file_atomically(paths.answer, json.dumps(reply).encode())  # from here on, the answer is not lost
    apply_renewal(paths)
    print(f"<= renewed ({reply.get('reason')}): region {reply.get('region')}, endpoint "
          f"{reply['endpointAddress']}:{reply.get('endpointPort', 8883)}, certificate {reply['certificateId']}, "
          f"previous {reply.get('previousCertificateId')}")
    return read_endpoint(paths.endpoint)


def try_renewal(args, paths: StatePaths, client: ProvisioningClient, pause, explicit: bool) -> dict | None:
    """A renewal, and what its failure means: the new endpoint, or None when the device carries on with its
    current certificate (said why, to be tried again at the next check). A renewal refused 403 is followed by asking
    the broker about the current certificate, as the server's 403 is the same for every cause: CertificateRefused
    when the broker refuses it. `explicit` (--renew at start-up): any other failure ends the program."""
    try:
        return renew(args, paths, client, pause)
    except RenewalImpossible as err:
        print(f"warning: {err}; carrying on with the current certificate")
        return None
    except ClientError as err:
        failure = err
        if err.status in (401, 403):
            endpoint = read_endpoint(paths.endpoint)
            print(f"<= {err}; asking the broker whether the current certificate still works")
            refused, verdict = probe_certificate(endpoint["endpointAddress"],
                                                 int(endpoint.get("endpointPort") or 8883), args.root_ca, paths)
            if refused:
                raise refused from err
            failure = ClientError(err.exit_code, f"{err} ({verdict})", err.status)
        if explicit:
            raise failure from None
        print(f"warning: {failure}; carrying on with the current certificate, asking again within "
              f"{RENEWAL_CHECK_SECONDS // 60} minutes")
        return None


def apply_renewal(paths: StatePaths) -> None:
    """Make a stored renewal answer the current credentials; safe to repeat after a crash at any point."""
    with open(paths.answer, encoding="utf-8") as f:
        reply = json.load(f)
    if read_endpoint(paths.endpoint, paths.cert).get("certificateId") != reply["certificateId"]:
        previous = paths.previous()  # kept until the new certificate has connected once
        for src, dst in ((paths.key, previous.key), (paths.cert, previous.cert), (paths.endpoint, previous.endpoint)):
            with open(src, "rb") as f:
                write_file_atomically(dst, f.read(), 0o600 if src == paths.key else 0o644)
    write_file_atomically(paths.cert, reply["certificatePem"].encode())
    if os.path.exists(paths.pending_key):
        os.replace(paths.pending_key, paths.key)  # created 0600; a rename keeps it
    endpoint = {"endpointAddress": reply["endpointAddress"], "endpointPort": int(reply.get("endpointPort") or 8883),
                "region": reply.get("region"), "certificateId": reply["certificateId"]}
    write_file_atomically(paths.endpoint, json.dumps(endpoint, indent=2).encode())  # last: marks completion
    os.unlink(paths.answer)


def drop_previous(paths: StatePaths) -> None:
    """The new certificate connected: the credentials it replaced are of no more use."""
    for path in (paths.previous().endpoint, paths.previous().cert, paths.previous().key):
        if os.path.exists(path):
            os.unlink(path)


# ---------- MQTT ----------

def probe_certificate(host: str, port: int, root_ca: str, paths: StatePaths,
                      timeout: float = 2.0) -> tuple[CertificateRefused | None, str]:
    """What the broker says of our certificate to a client that only shakes hands and listens: (its refusal, or
    None; what happened). With TLS 1.3 its refusal (an alert such as certificate_revoked) comes after the handshake,
    and a client that has already sent CONNECT, as paho does, sees only the connection close."""
    try:
        context = ssl.create_default_context(cafile=root_ca)
        context.load_cert_chain(paths.cert, paths.key)
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            if tls.recv(1) == b"":
                return None, "the broker closed the connection without a word about the certificate"
    except (TimeoutError, socket.timeout):  # it waits for our CONNECT: the certificate passed
        return None, "the broker still accepts the current certificate, so it was not revoked"
    except OSError as err:  # ssl.SSLError is an OSError
        return certificate_refusal(str(err)), f"the broker could not be asked: {err}"
    return None, "the broker still accepts the current certificate, so it was not revoked"


def connection_problem(err: OSError) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused: the broker is not listening"
    if isinstance(err, socket.gaierror):
        return f"the host name does not resolve ({err})"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "no answer (timed out)"
    return str(err) or type(err).__name__


def reconnect_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The wait before attempt `attempt` (0: the first) of an outage: full jitter, see RECONNECT_MIN_SECONDS."""
    return rand() * min(RECONNECT_MAX_SECONDS, RECONNECT_MIN_SECONDS * 2 ** min(attempt, 30))


def sample_message(thing: str, sequence: int) -> dict:
    # The original sample device's fields and meanings, plus a sequence number: a message resent after a reconnection
    # may arrive twice (QoS 1), and the number lets a consumer drop the copy.
    return {"thing-name": thing, "global": "device provisioning",
            "datetime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "sequence": sequence}


@dataclass
class Message:
    sequence: int
    payload: str


class Outbox:
    """The messages not yet acknowledged by the broker (PUBACK), oldest first: waiting, or sent on a connection.

    Bounded: when full, the oldest waiting message is dropped and counted. A message sent on a connection that was
    lost goes back to waiting and is sent again on the next one, so every message is acknowledged or counted as
    dropped, or is still here (and said) when the program ends."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self.waiting: collections.deque[Message] = collections.deque()
        self.sent: dict[tuple[int, int], Message] = {}  # (connection, mid) -> message
        self.dropped = self.acknowledged = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.sent)

    def add(self, message: Message) -> bool:
        """Queue `message`; False when the queue was full and a message was dropped."""
        if len(self) < self.size:
            self.waiting.append(message)
            return True
        self.dropped += 1
        if self.waiting:  # the oldest waiting one makes room; with everything in flight, the new one is the one
            self.waiting.popleft()
            self.waiting.append(message)
        return False

    def in_flight(self, connection: int) -> int:
        return sum(1 for (c, _) in self.sent if c == connection)

    def mark_sent(self, connection: int, mid: int) -> None:
        self.sent[(connection, mid)] = self.waiting.popleft()

    def acknowledge(self, connection: int, mid: int, accepted: bool = True) -> Message | None:
        """The broker's PUBACK: the message is done, unless the broker did not accept it (then it stays, unsent)."""
        message = self.sent.pop((connection, mid), None)
        if message is not None and accepted:
            self.acknowledged += 1
        elif message is not None:
            self.waiting.appendleft(message)
        return message

    def requeue(self, connection: int) -> None:
        """The connection is gone: what it did not get acknowledged waits again, in order, before newer messages."""
        unacknowledged = [self.sent.pop(key) for key in [k for k in self.sent if k[0] == connection]]
        self.waiting.extendleft(sorted(unacknowledged, key=lambda m: m.sequence, reverse=True))


class RenewalRequest:
    """Set by SIGUSR1 (a plain attribute: a signal handler must not take locks); read by the publisher."""

    def __init__(self) -> None:
        self.requested = False


class Publisher:
    """A provisioned device's life on MQTT: connect, publish every `interval`, reconnect when the connection drops,
    renew in place, and decide once what a refused certificate means.

    One thread (the caller's) owns all state; paho's network thread and the credentials worker (a renewal, a
    re-provisioning: HTTP that may wait) only post events to `self.events`. Each connection is a new paho client
    without its own reconnection, so the back-off, the queue and a change of certificate stay here."""

    def __init__(self, args, paths: StatePaths, endpoint: dict, http: ProvisioningClient, pause,
                 renewal: RenewalRequest, monotonic: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random):
        self.args, self.paths, self.endpoint, self.http, self.pause = args, paths, endpoint, http, pause
        self.renewal, self.now, self.rand = renewal, monotonic, rand
        self.topic = f"data/{args.thing_name}/misc"
        self.outbox = Outbox(args.queue_size)
        self.events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.backlog: collections.deque[tuple] = collections.deque()  # events taken out early by _close
        self.client: Any = None
        self.connection = 0  # the current connection's number; events of older ones are stale
        self.connected_at = 0.0
        self.ever_connected = False
        self.announce = True  # say where we connect: at start and after a change of endpoint or certificate
        self.backoff_exponent = 0
        self.failures = 0  # attempts failed in a row
        self.next_attempt = monotonic()
        self.outage: tuple[float, int] | None = None  # (since, messages dropped before it) while not connected
        self.worker: threading.Thread | None = None
        self.next_renewal_check = monotonic() + RENEWAL_CHECK_SECONDS
        self.sequence = 0
        self.drop_said = False  # the queue-full warning, once until the next connection
        self.fatal: str | None = None

    # ---- the loop

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.client is not None:
                self._close()
                print("=> session closed (MQTT DISCONNECT)")
            self._report()

    def _run(self) -> int:
        count, interval = self.args.count, self.args.interval
        next_message = self.now()
        while True:
            now = self.now()
            if self.fatal:
                print(f"error: {self.fatal}", file=sys.stderr)
                return EXIT_MQTT
            if self.client is None and self.worker is None and now >= self.next_attempt:
                try:
                    self._attempt()
                except CertificateRefused as refused:
                    self._refused(refused)
                continue
            if self.worker is None and (self.renewal.requested or now >= self.next_renewal_check):
                self._maybe_renew()
            producing = count is None or self.sequence < count
            if producing and now >= next_message:
                self._produce()
                next_message = max(next_message + interval, now)  # no burst to catch up after a long wait
            self._send()
            if not producing and not self.outbox and self.worker is None:
                print(f"=> published {self.outbox.acknowledged} message(s); disconnecting")
                return EXIT_OK
            wake = [now + 0.5]  # SIGUSR1 is noticed within this
            if producing:
                wake.append(next_message)
            if self.client is None and self.worker is None:
                wake.append(self.next_attempt)
            self._wait(max(0.0, min(wake) - self.now()))

    def _next_event(self, timeout: float) -> tuple | None:
        if self.backlog:
            return self.backlog.popleft()
        try:
            return self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return None

    def _wait(self, timeout: float) -> None:
        event = self._next_event(timeout)
        while event is not None:
            self._handle(event)
            event = self._next_event(0)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "ack":
            _, connection, mid, reason = event
            message = self.outbox.acknowledge(connection, mid, accepted=not reason.is_failure)
            if reason.is_failure:
                self.fatal = f"publish to {self.topic} not accepted: {reason}"
            elif message is not None:
                print(f"<= message {message.sequence} acknowledged: {json.dumps(json.loads(message.payload))}")
        elif kind == "closed":
            _, connection, flags, reason = event
            if connection == self.connection and self.client is not None:
                self._lost(f"the broker closed it: {reason}" if flags.is_disconnect_packet_from_server
                           else "the connection closed without a DISCONNECT")
        elif kind == "credentials":
            self.worker = None
            if event[1] is not None:
                self._switch(event[1])
        elif kind == "refused":
            self.worker = None
            self._refused(event[1])
        elif kind == "stop":
            self.worker = None
            raise event[1]
        # a late "connack" of an attempt that gave up waiting: that client is closed already

    # ---- connections

    def _new_client(self, connection: int):
        import paho.mqtt.client as mqtt  # only needed once provisioned

        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.args.thing_name,
                             protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        put = self.events.put
        client.on_connect = lambda c, u, flags, reason, props: put(("connack", connection, reason))
        client.on_disconnect = lambda c, u, flags, reason, props: put(("closed", connection, flags, reason))
        client.on_publish = lambda c, u, mid, reason, props: put(("ack", connection, mid, reason))
        client.connect_timeout = 10.0  # the SDKs' socket connect timeout
        try:
            client.tls_set(ca_certs=self.args.root_ca, certfile=self.paths.cert, keyfile=self.paths.key)
        except (OSError, ValueError) as err:  # unreadable CA bundle, a key that does not match the certificate
            raise ClientError(EXIT_LOCAL, f"cannot set up TLS with {self.args.root_ca}, {self.paths.cert}, "
                                          f"{self.paths.key}: {err}") from None
        return client

    def _address(self) -> tuple[str, int]:
        return self.endpoint["endpointAddress"], int(self.endpoint.get("endpointPort") or 8883)

    def _attempt(self) -> None:
        """One connection attempt; on success self.client is set. Raises CertificateRefused, or ClientError when the
        broker refused for good; anything else is retried after the back-off."""
        host, port = self._address()
        if self.announce:
            print(f"=> connecting to {host}:{port} (region {self.endpoint.get('region')}) as {self.args.thing_name}")
            self.announce = False
        self.connection += 1
        connection, client = self.connection, self._new_client(self.connection)
        try:
            client.connect(host, port, keepalive=KEEPALIVE_SECONDS)
        except ssl.SSLCertVerificationError as err:  # the broker's certificate: another try cannot change it
            raise ClientError(EXIT_MQTT, f"cannot verify the broker at {host}:{port} with --root-ca "
                                         f"{self.args.root_ca}: {err}") from None
        except OSError as err:  # includes a TLS handshake refused outright (TLS 1.2)
            refused = certificate_refusal(str(err))
            if refused:
                raise refused from err
            return self._failed(connection_problem(err))
        client.loop_start()
        outcome, deadline = None, self.now() + CONNACK_TIMEOUT_SECONDS
        while outcome is None and self.now() < deadline:
            event = self._next_event(min(0.5, max(0.0, deadline - self.now())))
            if event is None:
                continue
            if event[0] in ("connack", "closed") and event[1] == connection:
                outcome = event
            else:
                self._handle(event)
        if outcome is not None and outcome[0] == "connack" and not outcome[2].is_failure:
            self.client = client
            return self._connected()
        client.disconnect()
        client.loop_stop()
        if outcome is None:
            return self._failed(f"no CONNACK within {CONNACK_TIMEOUT_SECONDS:g} s")
        kind, reason = outcome[0], outcome[-1]
        # Closed before CONNACK, or refused: was it the certificate? (A revocation that reaches the broker between our
        # handshake and our CONNECT is refused by its auth check, as "not authorized".)
        refused, _ = probe_certificate(host, port, self.args.root_ca, self.paths)
        if refused:
            raise refused
        if kind == "connack":
            if reason.value in PERMANENT_CONNACK_CODES:
                raise ClientError(EXIT_MQTT, f"the broker at {host}:{port} refused the connection: {reason}")
            return self._failed(f"connection refused: {reason}")
        return self._failed(f"connection closed before CONNACK ({reason})")

    def _connected(self) -> None:
        now = self.now()
        host, port = self._address()
        if not self.ever_connected:
            print(f"<= connected; subscribe to {self.topic} to watch the messages")
        else:
            since, dropped_before = self.outage or (now, self.outbox.dropped)
            dropped = self.outbox.dropped - dropped_before
            print(f"<= connected again to {host}:{port} after {now - since:.1f} s ({self.failures + 1} attempt(s)); "
                  f"{len(self.outbox)} message(s) to send" + (f", {dropped} dropped (queue full)" if dropped else ""))
        self.connected_at, self.failures, self.outage, self.drop_said = now, 0, None, False
        drop_previous(self.paths)  # a renewal's new certificate has connected once
        if not self.ever_connected:
            self.ever_connected = True
            self.pause()

    def _backoff(self) -> float:
        delay = reconnect_delay(self.backoff_exponent, self.rand)
        self.backoff_exponent += 1
        return delay

    def _failed(self, problem: str) -> None:
        self.failures += 1
        host, port = self._address()
        limit = self.args.max_reconnects
        if limit and self.failures >= limit:
            raise ClientError(EXIT_MQTT, f"could not connect to {host}:{port} in {self.failures} attempt(s) "
                                         f"(--max-reconnects {limit}): {problem}")
        if self.outage is None:  # the first failure of an outage is said; the next ones are not
            self.outage = (self.now(), self.outbox.dropped)
            print(f"<= cannot connect to {host}:{port} ({problem}); retrying with back-off (at most "
                  f"{RECONNECT_MAX_SECONDS:g} s between attempts)")
        self.next_attempt = self.now() + self._backoff()

    def _lost(self, reason) -> None:
        now = self.now()
        if now - self.connected_at >= RECONNECT_RESET_AFTER_SECONDS:
            self.backoff_exponent = 0
        self._close()
        self.outage = (now, self.outbox.dropped)
        self.next_attempt = now + self._backoff()
        host, port = self._address()
        print(f"<= connection to {host}:{port} lost ({reason}); reconnecting with back-off (at most "
              f"{RECONNECT_MAX_SECONDS:g} s between attempts); {len(self.outbox)} message(s) wait for the broker")

    def _close(self) -> None:
        """Close the current connection (a DISCONNECT when it is still open); what it sent unacknowledged waits."""
        client, self.client = self.client, None
        if client is None:
            return
        client.disconnect()
        client.loop_stop()
        # Its thread has ended: acknowledgements it received are all in the queue by now. Count them before what is
        # left unacknowledged waits again (else those messages would be sent twice).
        while True:
            try:
                self.backlog.append(self.events.get_nowait())
            except queue.Empty:
                break
        for event in [e for e in self.backlog if e[0] == "ack" and e[1] == self.connection]:
            self.backlog.remove(event)
            self._handle(event)
        self.outbox.requeue(self.connection)

    # ---- messages

    def _produce(self) -> None:
        self.sequence += 1
        message = sample_message(self.args.thing_name, self.sequence)
        if not self.outbox.add(Message(self.sequence, json.dumps(message, indent=4))) and not self.drop_said:
            self.drop_said = True  # once until the next connection; the count is said then and at the end
            print(f"warning: the queue is full ({self.outbox.size} messages, --queue-size): dropping the oldest "
                  f"waiting message; {self.outbox.dropped} dropped so far")

    def _send(self) -> None:
        import paho.mqtt.client as mqtt

        while (self.client is not None and self.outbox.waiting
               and self.outbox.in_flight(self.connection) < min(IN_FLIGHT_WINDOW, self.outbox.size)):
            info = self.client.publish(self.topic, self.outbox.waiting[0].payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:  # the connection is going away: its "closed" event follows
                return
            self.outbox.mark_sent(self.connection, info.mid)

    def _report(self) -> None:
        left = len(self.outbox)
        print(f"=> {self.outbox.acknowledged} message(s) acknowledged by the broker"
              + (f", {self.outbox.dropped} dropped (queue full)" if self.outbox.dropped else "")
              + (f", {left} not sent or not acknowledged" if left else ""))

    # ---- credentials: renewal in place, and a refused certificate

    def _maybe_renew(self) -> None:
        asked, self.renewal.requested = self.renewal.requested, False
        self.next_renewal_check = self.now() + RENEWAL_CHECK_SECONDS
        due = renewal_due(self.paths, self.args.renew_before)
        if due:
            print(f"=> the certificate expires {due:%Y-%m-%d %H:%M} UTC, within {self.args.renew_before:g} days: "
                  "renewing")
        elif asked:
            print("=> renewal asked for (SIGUSR1): renewing")
        else:
            return
        self._in_background("renewal", lambda: try_renewal(self.args, self.paths, self.http, lambda: None,
                                                           explicit=False))

    def _in_background(self, name: str, job: Callable[[], dict | None]) -> None:
        """HTTP that may wait minutes (Retry-After) runs beside the loop, which keeps publishing or queueing; no
        connection attempt is made meanwhile, as the job may be rewriting the credential files."""
        def run() -> None:
            try:
                self.events.put(("credentials", job()))
            except CertificateRefused as refused:
                self.events.put(("refused", refused))
            except ClientError as err:
                self.events.put(("stop", err))
            except Exception as err:  # a bug: end the program with a clear line rather than lose the thread
                self.events.put(("stop", ClientError(EXIT_UNAVAILABLE, f"{name} failed: {err!r}")))

        self.worker = threading.Thread(target=run, name=name, daemon=True)
        self.worker.start()

    def _switch(self, endpoint: dict) -> None:
        """New credentials (renewed, or provisioned again): leave the current connection and connect with them."""
        self.endpoint, self.announce = endpoint, True
        if self.client is not None:
            print("=> reconnecting with the new certificate")
            self._close()
            self.outage = (self.now(), self.outbox.dropped)
        self.backoff_exponent, self.failures, self.next_attempt = 0, 0, self.now()

    def _refused(self, refused: CertificateRefused) -> None:
        self._close()
        stop_or_reprovision(self.args, self.paths, refused)  # raises when the device is to stop
        if self.outage is None:
            self.outage = (self.now(), self.outbox.dropped)
        self._in_background("re-provisioning", lambda: reprovision(self.args, self.paths, self.http, lambda: None))


# ---------- CLI ----------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Sample device for global provisioning with AWS IoT Core.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--thing-name", required=True, help="thing name of this device")
    p.add_argument("-a", "--api-gw", required=True, metavar="URL",
                   help="the API's URL: its base (the client POSTs to URL/device-provisioning and "
                        "URL/device-renewal) or, as the original sample takes it, URL/device-provisioning")
    p.add_argument("-k", "--own-key", action="store_true",
                   help="make the private key on the device and send a CSR (CN=<thing name>)")
    p.add_argument("--key-type", choices=("rsa", "ec"), default="rsa",
                   help="device key type with -k: RSA-2048 (default) or EC P-256")
    p.add_argument("-f", "--fake-device", action="store_true",
                   help="sign with a throwaway key to demonstrate that the service refuses it")
    p.add_argument("-c", "--continue", dest="no_prompts", action="store_true",
                   help="continue without interaction (prompts only appear on a terminal anyway)")
    p.add_argument("--signing-key", default="global-provisioning.priv.key.pem", metavar="PATH",
                   help="provisioning signing key, PEM: the fleet RSA key or a per-device RSA or "
                        "EC P-256 key; EC needs signature v2 (default: %(default)s)")
    version = p.add_mutually_exclusive_group()
    version.add_argument("--signature-version", type=int, choices=(1, 2), default=DEFAULT_SIGNATURE_VERSION,
                         help="signed request version: 1 = the original sample's (thing name only, RSA "
                              "only); 2 = also signs a timestamp, a nonce and the CSR's SHA-256, RSA or "
                              "EC P-256 (default: %(default)s)")
    version.add_argument("--legacy-signature", dest="signature_version", action="store_const", const=1,
                         help="same as --signature-version 1")
    p.add_argument("--state-dir", default=".", metavar="DIR",
                   help="where <thing>.device.key.pem, .device.cert.pem and .endpoint live; the original sample's "
                        "files are used as they are (default: ., as the sample)")
    p.add_argument("--root-ca", default=certifi.where(), metavar="PATH",
                   help="CA bundle that verifies the MQTT endpoint (default: certifi's, holds the Amazon roots)")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="publish N messages, wait until the broker acknowledged them, then exit (default: "
                        "forever); 0 = provision only, no MQTT")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between messages (default: 2)")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                   help="messages kept while the broker cannot be reached; when full, the oldest is dropped and "
                        "counted (default: %(default)s)")
    p.add_argument("--max-reconnects", type=int, default=0, metavar="N",
                   help="exit 7 after N MQTT connection attempts in a row failed (default: 0, never)")
    p.add_argument("--forwarded-for", metavar="IP",
                   help="local stage only: send X-Forwarded-For: IP so the server geolocates that IP")
    p.add_argument("--max-attempts", type=int, default=10, metavar="N",
                   help="HTTP attempts on 429/502/503/504 and 409 in progress (default: 10); nothing listening or a "
                        "name that does not resolve is retried for about 10 s; 0 = retry everything forever")
    p.add_argument("--renew", action="store_true",
                   help="renew the certificate now with a new key (POST /device-renewal), then connect to the "
                        "endpoint of the answer, which may be another region's")
    p.add_argument("--renew-before", type=float, default=30.0, metavar="DAYS",
                   help="renew by itself (at start-up, then checked hourly while running) when the certificate "
                        "expires within DAYS (default: 30); SIGUSR1 asks a running device to renew now")
    p.add_argument("--retry-base-delay", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--reprovision-if-revoked", action="store_true",
                   help="when the broker says the stored certificate is revoked (an operator reset, or another copy "
                        "of this device), set the stored credentials aside (<file>.revoked) and provision again with "
                        "--signing-key; a copy whose re-provisioned certificate is revoked again stops (exit 8)")
    args = p.parse_args(argv)
    if args.count is not None and args.count < 0:
        p.error("--count must be >= 0")
    for flag in ("queue_size", "max_reconnects", "max_attempts"):
        if getattr(args, flag) < (1 if flag == "queue_size" else 0):
            p.error(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'queue_size' else 0}")
    url = urllib.parse.urlsplit(args.api_gw)
    if url.scheme not in ("http", "https") or not url.netloc:
        p.error(f"--api-gw {args.api_gw!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000)")
    return args


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the unwinding it starts is not interrupted again
    raise Terminated()


def install_signals(renewal: RenewalRequest) -> dict:
    """SIGTERM ends the program like Ctrl-C but with exit 0; SIGUSR1 asks for a renewal now. Returns what to restore
    (main() may run inside another program, the tests)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    wanted: dict[int, Any] = {signal.SIGTERM: _on_sigterm}
    if hasattr(signal, "SIGUSR1"):
        wanted[signal.SIGUSR1] = lambda signum, frame: setattr(renewal, "requested", True)
    return {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}


def main(argv=None, *, session: requests.Session | None = None, sleep=time.sleep, clock=None,
         monotonic=time.monotonic) -> int:
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # under a service manager, each line as it happens

    def pause():
        # Like the sample, wait between steps, but never block a script or a service manager.
        if not args.no_prompts and sys.stdin is not None and sys.stdin.isatty():
            input("== press <enter> to continue, <ctrl+c> to abort\n")

    paths = StatePaths.for_thing(args.state_dir, args.thing_name)
    renewal = RenewalRequest()
    restore = install_signals(renewal)
    try:
        if args.count != 0:
            check_root_ca(args.root_ca)
        client = ProvisioningClient(args.api_gw, session, max_attempts=args.max_attempts,
                                    base_delay=args.retry_base_delay, forwarded_for=args.forwarded_for,
                                    sleep=sleep, clock=clock, max_retry_after=MAX_RETRY_AFTER, monotonic=monotonic)
        if paths.complete():
            if os.path.exists(paths.answer):  # a renewal's answer came but was not applied (a crash)
                apply_renewal(paths)
            endpoint = read_endpoint(paths.endpoint, paths.cert)
            print(f"=> {args.thing_name} is already provisioned (credentials in {args.state_dir}); "
                  f"skipping provisioning. region: {endpoint.get('region')}, endpoint: {endpoint['endpointAddress']}")
            due = renewal_due(paths, args.renew_before)
            if due:
                print(f"=> the certificate expires {due:%Y-%m-%d %H:%M} UTC, "
                      f"within {args.renew_before:g} days: renewing")
            if due or args.renew:
                try:
                    endpoint = try_renewal(args, paths, client, pause, explicit=args.renew) or endpoint
                except CertificateRefused as refused:
                    stop_or_reprovision(args, paths, refused)
                    endpoint = reprovision(args, paths, client, pause)
        else:
            os.makedirs(args.state_dir, exist_ok=True)
            endpoint = provision(args, paths, client, pause)
        if args.count == 0:
            print("=> --count 0: provisioning only, not connecting")
            return EXIT_OK
        pause()
        return Publisher(args, paths, endpoint, client, pause, renewal, monotonic=monotonic).run()
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\n=> interrupted; bye", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("=> SIGTERM: stopped, files intact")
        return EXIT_OK
    finally:
        for signum, handler in restore.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
