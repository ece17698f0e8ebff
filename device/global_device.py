#!/usr/bin/env python3
"""Sample device for Global IoT Device Provisioning.

The device asks the provisioning API for credentials once (signed request v1 as in the original
aws-samples device, or v2 with timestamp, nonce and CSR hash), stores them, then connects to the regional
MQTT endpoint over mutual TLS and publishes to data/<thing-name>/misc. A second start reuses the stored credentials.

Standalone on purpose: it ships to devices, so it never imports the service's code.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import email.utils
import hashlib
import json
import os
import random
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

import certifi
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

EXIT_OK, EXIT_LOCAL, EXIT_REFUSED, EXIT_CONFLICT, EXIT_BAD_REQUEST = 0, 2, 3, 4, 5
EXIT_UNAVAILABLE, EXIT_MQTT, EXIT_INTERRUPTED = 6, 7, 130
EXIT_CERT_REFUSED = 8  # the broker refused our certificate at the TLS handshake
# Busy, down, or a gateway that gave up waiting: the same request may work a little later.
RETRYABLE_STATUS = {429, 502, 503, 504}
# The longest Retry-After the device waits out (main's default). In an onboarding storm the service gives each
# device its own slot; 100,000 devices in one region at AWS IoT's default quotas take about 2.3 h (README).
MAX_RETRY_AFTER = 6 * 3600
# Signed request version sent unless --signature-version/--legacy-signature says otherwise.
DEFAULT_SIGNATURE_VERSION = 2
EXIT_BY_STATUS = {401: EXIT_REFUSED, 403: EXIT_REFUSED, 409: EXIT_CONFLICT,
                  400: EXIT_BAD_REQUEST, 413: EXIT_BAD_REQUEST}
CAUSE = {EXIT_REFUSED: "provisioning refused", EXIT_CONFLICT: "already provisioned or in progress",
         EXIT_BAD_REQUEST: "bad request", EXIT_UNAVAILABLE: "provisioning failed"}

EPILOG = """exit codes:
  0    done (provisioned and/or published --count messages; --count 0 = provision only, no MQTT)
  2    usage or local problem (bad flags or URL, unreadable signing key or --root-ca, damaged state files)
  3    provisioning refused (HTTP 401/403: bad signature or device not allowed)
  4    already provisioned or provisioning in progress (HTTP 409)
  5    bad request (HTTP 400/413)
  6    server or network failure after all retries (429/502/503/504, 409 provisioning-in-progress,
       connection errors and timeouts are retried; other errors)
  7    MQTT broker refused the connection or a publish was not authorized
  8    MQTT broker refused the device's certificate at the TLS handshake: revoked (see
       --reprovision-if-revoked) or not issued for this broker's region
  130  interrupted (Ctrl-C)
A renewal (--renew, or by itself within --renew-before days of expiry) exits with the same codes
(3: renewal refused; 409 renewal-in-progress is retried)."""


class ClientError(Exception):
    """A failure that ends the program with a specific exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class CertificateRefused(ClientError):
    """The broker's TLS alert about our certificate; `revoked` when it said so (alert certificate_revoked)."""

    def __init__(self, alert: str, detail: str):
        self.revoked = alert == "certificate revoked"
        hint = ("; an operator revoked it (reset, audit): run with --reprovision-if-revoked after the reset"
                if self.revoked else "; is this the endpoint of the region that issued it?")
        super().__init__(EXIT_CERT_REFUSED, f"the broker refused this device's certificate ({alert}){hint}: {detail}")


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


def read_endpoint(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict) or not info.get("endpointAddress"):
            raise ValueError("no endpointAddress")
        return info
    except (OSError, ValueError) as err:
        raise ClientError(EXIT_LOCAL, f"damaged state file {path} ({err}); remove the "
                                      "thing's files to provision again") from err


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

class ProvisioningClient:
    """POSTs the request, retrying throttling and outages with jittered exponential backoff."""

    def __init__(self, api_base: str, session: requests.Session | None = None, *, max_attempts: int = 10,
                 base_delay: float = 1.0, max_delay: float = 30.0, timeout: tuple = (10, 35),
                 forwarded_for: str | None = None, sleep=time.sleep, clock=None,
                 max_retry_after: float | None = None):
        self.url = api_base.rstrip("/") + "/device-provisioning"
        # The device's clock, corrected once from the server's when a v2 timestamp is refused as stale.
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self.clock_offset: dt.timedelta | None = None
        self.renewal_url = api_base.rstrip("/") + "/device-renewal"
        self.session = session or requests.Session()
        self.max_attempts, self.base_delay, self.max_delay = max(1, max_attempts), base_delay, max_delay
        self.timeout, self.sleep = timeout, sleep
        self.max_retry_after = max_delay if max_retry_after is None else max_retry_after
        self.headers = {"Content-Type": "application/json"}
        if forwarded_for:
            self.headers["X-Forwarded-For"] = forwarded_for

    def provision(self, make_body, url: str | None = None) -> dict:
        """make_body() is called for every attempt, so each retry is signed afresh (v2 nonces)."""
        last_problem = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            retry_after = None
            try:
                resp = self.session.post(url or self.url, data=json.dumps(make_body()), headers=self.headers,
                                         timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as err:
                last_problem = f"network error: {err.__class__.__name__}: {err}"
            else:
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
                    raise ClientError(code, f"{CAUSE[code]}: {problem}")
                last_problem, retry_after = problem, _retry_after_seconds(resp)
            if attempt == self.max_attempts:
                break
            delay = self._delay(attempt, retry_after)
            print(f"<= attempt {attempt}/{self.max_attempts} failed ({last_problem}); retrying in {delay:.1f}s")
            self.sleep(delay)
        raise ClientError(EXIT_UNAVAILABLE,
                          f"service unavailable, gave up after {self.max_attempts} attempts: {last_problem}")

    def now(self) -> dt.datetime:
        return self.clock() + (self.clock_offset or dt.timedelta(0))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best when it will have capacity again
            return min(retry_after, self.max_retry_after)
        # Full jitter keeps a fleet that lost the service at once from retrying in lockstep.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


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


def provision(args, paths: StatePaths, client: ProvisioningClient, pause) -> dict:
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

    def make_body() -> dict:  # signed at send time, so a retry never replays a timestamp/nonce
        if version == 1:
            body = build_v1_request(args.thing_name, signing_key, csr_pem)
        else:
            body = build_v2_request(args.thing_name, signing_key, csr_pem,
                                    timestamp=client.now().strftime("%Y-%m-%dT%H:%M:%SZ"))
            print(f"   timestamp={body['timestamp']}, nonce={body['nonce']}")
        print(f"   thing-name-sig={body['thing-name-sig'][:16]}...")
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
    if reply.get("message"):
        print(f"<= message: {reply['message']}")
    save_credentials(paths, reply, server_key=None if csr_pem else reply["PrivateKey"])
    return read_endpoint(paths.endpoint)


def save_credentials(paths: StatePaths, reply: dict, server_key: str | None) -> None:
    if server_key:
        write_file_atomically(paths.key, server_key.encode(), 0o600)
    write_file_atomically(paths.cert, reply["certificatePem"].encode())
    endpoint = {"endpointAddress": reply["endpointAddress"], "endpointPort": int(reply.get("endpointPort") or 8883),
                "region": reply.get("region"), "certificateId": reply.get("certificateId")}
    write_file_atomically(paths.endpoint, json.dumps(endpoint, indent=2).encode())  # last: marks completion
    print(f"=> saved {paths.key}, {paths.cert}, {paths.endpoint}")


def discard_credentials(paths: StatePaths) -> None:
    # The endpoint file goes first: without it the set is incomplete and the next start provisions.
    for path in (paths.endpoint, paths.cert, paths.key):
        if os.path.exists(path):
            os.replace(path, path + ".revoked")
            print(f"=> moved {path} to {path}.revoked")


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
    current = read_endpoint(paths.endpoint)
    certificate_id = current.get("certificateId")
    if not certificate_id:
        raise ClientError(EXIT_LOCAL, f"{paths.endpoint} has no certificateId; provision again to renew")
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


def apply_renewal(paths: StatePaths) -> None:
    """Make a stored renewal answer the current credentials; safe to repeat after a crash at any point."""
    with open(paths.answer, encoding="utf-8") as f:
        reply = json.load(f)
    if read_endpoint(paths.endpoint).get("certificateId") != reply["certificateId"]:
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

def tls_verdict(host: str, port: int, root_ca: str, paths: StatePaths, timeout: float = 2.0) -> str:
    """What the broker says of our certificate to a client that only shakes hands and listens. With TLS 1.3 its
    refusal (an alert such as certificate_revoked) comes after the handshake, and a client that has already sent
    CONNECT, as paho does, sees only the connection close."""
    import socket
    import ssl
    context = ssl.create_default_context(cafile=root_ca)
    try:
        context.load_cert_chain(paths.cert, paths.key)
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            tls.recv(1)
    except OSError as err:  # ssl.SSLError is an OSError
        return str(err)
    return ""

def sample_message(thing: str) -> dict:
    # Same fields and meanings as the original sample device's message.
    return {"thing-name": thing, "global": "device provisioning",
            "datetime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def publish_loop(thing: str, paths: StatePaths, endpoint: dict, root_ca: str, count: int | None,
                 interval: float, pause, sleep=time.sleep, on_connected=None) -> int:
    import paho.mqtt.client as mqtt  # only needed once provisioned

    host, port, region = endpoint["endpointAddress"], int(endpoint.get("endpointPort") or 8883), endpoint.get("region")
    topic = f"data/{thing}/misc"
    connack, acks, refusal = threading.Event(), {}, []

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            refusal.append(f"connection refused: {reason_code}")
        connack.set()

    def on_publish(client, userdata, mid, reason_code, properties):
        acks[mid] = reason_code

    def on_disconnect(client, userdata, flags, reason_code, properties):
        if getattr(reason_code, "value", 0) == 135:  # Not authorized: retrying cannot help
            refusal.append(f"disconnected by broker: {reason_code}")
        if not connack.is_set():  # closed before answering: with TLS 1.3 a refused certificate shows up here
            refusal.append(f"connection closed before CONNACK ({reason_code})")
            connack.set()

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=thing,
                         protocol=mqtt.MQTTv5)
    client.on_connect, client.on_publish, client.on_disconnect = on_connect, on_publish, on_disconnect
    try:
        client.tls_set(ca_certs=root_ca, certfile=paths.cert, keyfile=paths.key)
    except (OSError, ValueError) as err:  # unreadable CA bundle, a key that does not match the certificate
        print(f"error: cannot set up TLS with {root_ca}, {paths.cert}, {paths.key}: {err}", file=sys.stderr)
        return EXIT_LOCAL
    client.reconnect_delay_set(min_delay=1, max_delay=32)
    print(f"=> connecting to {host}:{port} (region {region}) as {thing}")
    try:
        client.connect(host, port, keepalive=60)
    except OSError as err:  # includes TLS handshake refusals
        refused = certificate_refusal(str(err))
        if refused:
            raise refused from err
        print(f"error: could not connect to {host}:{port}: {err}", file=sys.stderr)
        return EXIT_MQTT
    client.loop_start()
    try:
        if not connack.wait(30) or refusal:
            closed_early = bool(refusal) and refusal[0].startswith("connection closed before CONNACK")
            refused = certificate_refusal(tls_verdict(host, port, root_ca, paths)) if closed_early else None
            if refused:
                raise refused
            print(f"error: {refusal[0] if refusal else 'no CONNACK within 30 s'}", file=sys.stderr)
            return EXIT_MQTT
        print(f"<= connected; subscribe to {topic} to watch the messages")
        if on_connected:
            on_connected()
        pause()
        sent = 0
        while count is None or sent < count:
            message = sample_message(thing)
            print(f"=> publishing to {topic}: {json.dumps(message)}")
            info = client.publish(topic, json.dumps(message, indent=4), qos=1)
            try:
                info.wait_for_publish(timeout=10)
            except (RuntimeError, ValueError) as err:
                print(f"warning: publish not queued: {err}")
            if refusal or (info.mid in acks and acks[info.mid].is_failure):
                reason = refusal[0] if refusal else acks[info.mid]
                print(f"error: publish to {topic} not accepted: {reason}", file=sys.stderr)
                return EXIT_MQTT
            if not info.is_published():
                print("warning: publish not acknowledged within 10 s; paho resends it after reconnecting")
            sent += 1
            if count is None or sent < count:
                sleep(interval)
        print(f"=> published {sent} message(s); disconnecting")
        return EXIT_OK
    finally:
        client.disconnect()
        client.loop_stop()


# ---------- CLI ----------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Sample device for global provisioning with AWS IoT Core.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--thing-name", required=True, help="thing name of this device")
    p.add_argument("-a", "--api-gw", required=True, metavar="URL",
                   help="API base URL; the client POSTs to URL/device-provisioning")
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
                   help="where <thing>.device.key.pem, .device.cert.pem and .endpoint live (default: .)")
    p.add_argument("--root-ca", default=certifi.where(), metavar="PATH",
                   help="CA bundle that verifies the MQTT endpoint (default: certifi's, holds the Amazon roots)")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="publish N messages then exit (default: forever); 0 = provision only, no MQTT")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between messages (default: 2)")
    p.add_argument("--forwarded-for", metavar="IP",
                   help="local stage only: send X-Forwarded-For: IP so the server geolocates that IP")
    p.add_argument("--max-attempts", type=int, default=10, metavar="N",
                   help="provisioning attempts on 429/502/503/504, 409 in progress and network errors (default: 10)")
    p.add_argument("--renew", action="store_true",
                   help="renew the certificate now with a new key (POST /device-renewal), then connect to the "
                        "endpoint of the answer, which may be another region's")
    p.add_argument("--renew-before", type=float, default=30.0, metavar="DAYS",
                   help="renew by itself at start-up when the certificate expires within DAYS (default: 30)")
    p.add_argument("--retry-base-delay", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--reprovision-if-revoked", action="store_true",
                   help="when the broker says the stored certificate is revoked (after an operator reset), set the "
                        "stored credentials aside (<file>.revoked) and provision again with --signing-key")
    args = p.parse_args(argv)
    if args.count is not None and args.count < 0:
        p.error("--count must be >= 0")
    url = urllib.parse.urlsplit(args.api_gw)
    if url.scheme not in ("http", "https") or not url.netloc:
        p.error(f"--api-gw {args.api_gw!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000)")
    return args


def main(argv=None, *, session: requests.Session | None = None, sleep=time.sleep, clock=None) -> int:
    args = parse_args(argv)

    def pause():
        # Like the sample, wait between steps, but never block a script or a service manager.
        if not args.no_prompts and sys.stdin is not None and sys.stdin.isatty():
            input("== press <enter> to continue, <ctrl+c> to abort\n")

    paths = StatePaths.for_thing(args.state_dir, args.thing_name)
    try:
        if args.count != 0:
            check_root_ca(args.root_ca)
        client = ProvisioningClient(args.api_gw, session, max_attempts=args.max_attempts,
                                    base_delay=args.retry_base_delay, forwarded_for=args.forwarded_for,
                                    sleep=sleep, clock=clock, max_retry_after=MAX_RETRY_AFTER)
        if paths.complete():
            if os.path.exists(paths.answer):  # a renewal's answer came but was not applied (a crash)
                apply_renewal(paths)
            endpoint = read_endpoint(paths.endpoint)
            print(f"=> {args.thing_name} is already provisioned (credentials in {args.state_dir}); "
                  f"skipping provisioning. region: {endpoint.get('region')}, endpoint: {endpoint['endpointAddress']}")
            due = renewal_due(paths, args.renew_before)
            if due:
                print(f"=> the certificate expires {due:%Y-%m-%d %H:%M} UTC, "
                      f"within {args.renew_before:g} days: renewing")
            if due or args.renew:
                endpoint = renew(args, paths, client, pause)
        else:
            os.makedirs(args.state_dir, exist_ok=True)
            endpoint = provision(args, paths, client, pause)
        if args.count == 0:
            print("=> --count 0: provisioning only, not connecting")
            return EXIT_OK
        pause()
        try:
            return publish_loop(args.thing_name, paths, endpoint, args.root_ca, args.count, args.interval,
                                pause, sleep, on_connected=lambda: drop_previous(paths))
        except CertificateRefused as refused:
            if not (refused.revoked and args.reprovision_if_revoked):
                raise
            # Only now, with the broker's word that the certificate is revoked, are the credentials worthless.
            print(f"<= {refused}\n=> --reprovision-if-revoked: setting the revoked credentials aside")
            discard_credentials(paths)
            endpoint = provision(args, paths, client, pause)
            return publish_loop(args.thing_name, paths, endpoint, args.root_ca, args.count, args.interval,
                                pause, sleep)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\n=> interrupted; bye", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
