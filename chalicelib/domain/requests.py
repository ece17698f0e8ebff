"""The wire format of POST /device-provisioning and POST /device-renewal (docs/protocol.md): the
request schemas, checked and decoded once into a typed `ProvisioningRequest` / `RenewalRequest`, and the JSON
bodies of the answers."""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from chalicelib.domain.clock import TIMESTAMP_FORMAT, timestamp
from chalicelib.domain.errors import MalformedRequest, SignatureInvalid
from chalicelib.domain.keypolicy import CERTIFICATE_KEYS
from chalicelib.domain.records import Nonce
from chalicelib.domain.signatures import renew_v1_text, v1_text, v2_text

MAX_NONCE_CHARS = 128
# AWS IoT's rule for thing names; it also keeps MQTT wildcards and '/' out of topics and ACLs.
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")


@dataclass(frozen=True)
class ProvisioningRequest:
    thing_name: str
    signature: bytes
    csr: x509.CertificateSigningRequest | None
    csr_pem: str | None = None
    timestamp: datetime | None = None  # with nonce: a signed request v2
    nonce: str | None = None
    signed: bytes = b""  # the text the signature must cover, as the device composed it

    @property
    def version(self) -> int:
        return 2 if self.timestamp is not None else 1

    def signed_text(self) -> bytes:
        return self.signed

    @classmethod
    def from_body(cls, body: Any) -> ProvisioningRequest:
        """Check the wire format; anything wrong is a MalformedRequest naming the field and rule."""
        thing_name = _thing_name(_object(body))
        signature = decode_signature(_required_text(body, "thing-name-sig"))
        stamp, timestamp, nonce = None, None, None
        if body.get("timestamp") is not None or body.get("nonce") is not None:  # v2
            stamp, timestamp, nonce = _stamped(body)
        csr_pem, csr = _csr(body, thing_name)
        # v2 covers the timestamp as sent, not as re-formatted
        signed = v1_text(thing_name) if stamp is None or nonce is None else v2_text(thing_name, stamp, nonce, csr_pem)
        return cls(thing_name, signature, csr, csr_pem, timestamp, nonce, signed)




def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise MalformedRequest("the body must be a JSON object")
    return body


def _stamped(body: Mapping[str, Any]) -> tuple[str, datetime, str]:
    """A signed request's timestamp (as sent, and parsed) and nonce."""
    stamp, nonce = _required_text(body, "timestamp"), _required_text(body, "nonce")
    timestamp = parse_timestamp(stamp)
    if len(nonce) > MAX_NONCE_CHARS:
        raise MalformedRequest(f"nonce must be at most {MAX_NONCE_CHARS} characters", "malformed-nonce")
    return stamp, timestamp, nonce


def _csr(body: Mapping[str, Any], thing_name: str) -> tuple[str | None, x509.CertificateSigningRequest | None]:
    """The optional CSR as sent (PEM; empty is none) and parsed."""
    csr_pem = body.get("CSR")
    if csr_pem == "":
        csr_pem = None
    if csr_pem is not None and not isinstance(csr_pem, str):
        raise MalformedRequest("CSR must be a PEM string", "malformed-csr")
    return csr_pem, parse_csr(csr_pem, thing_name) if csr_pem is not None else None


def _thing_name(body: Mapping[str, Any]) -> str:
    thing_name = _required_text(body, "thing-name")
    if not THING_NAME.fullmatch(thing_name):
        raise MalformedRequest("thing-name must be 1-128 letters, digits, ':', '_' or '-'", "invalid-thing-name")
    return thing_name


def _required_text(body: Mapping[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None or value == "":
        raise MalformedRequest(f"{field} is missing", "missing-field")
    if not isinstance(value, str):
        raise MalformedRequest(f"{field} must be a string", "malformed-request")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates, which no signed text can hold
        raise MalformedRequest(f"{field} is not valid Unicode text", "malformed-request") from None
    return value


def decode_signature(signature_b64: str, field: str = "thing-name-sig") -> bytes:
    try:
        return base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest(f"{field} is not valid base64", "malformed-signature") from None


def parse_timestamp(text: str) -> datetime:
    try:
        return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise MalformedRequest("timestamp must be UTC in the form 2026-11-28T12:00:00Z",
                               "malformed-timestamp") from None


def parse_csr(csr_pem: str, thing_name: str) -> x509.CertificateSigningRequest:
    """A CSR the service will sign: each rule that fails is named in the 400 answer."""
    def refuse(rule: str) -> MalformedRequest:
        return MalformedRequest(f"CSR refused: {rule}", "malformed-csr")

    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):  # UnicodeEncodeError is a ValueError
        raise refuse("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise refuse("its self-signature is not valid")
    constraints: x509.BasicConstraints | None
    try:  # cryptography parses the subject and extensions only when first read
        names = [n.value for n in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise refuse("its subject or extensions cannot be parsed") from None
    if names != [thing_name]:
        raise refuse(f"the subject CN must be the thing name {thing_name!r}")
    problem = CERTIFICATE_KEYS.problem(key)
    if problem:
        raise refuse(problem)
    if constraints is not None and constraints.ca:
        raise refuse("it asks for a CA certificate")
    return csr




# --- POST /device-renewal ---------------------------------------------------------------------------------------

MAX_CERTIFICATE_ID_CHARS = 128  # AWS IoT's ids are 64 hex digits, as are the local CA's


@dataclass(frozen=True)
class RenewalRequest:
    thing_name: str
    certificate_id: str
    timestamp: datetime
    nonce: str
    signature: bytes
    csr: x509.CertificateSigningRequest | None = None
    csr_pem: str | None = None
    signed: bytes = b""  # renew-v1's text, with the timestamp as sent

    def signed_text(self) -> bytes:
        return self.signed

    @classmethod
    def from_body(cls, body: Any) -> RenewalRequest:
        """Check the wire format; anything wrong is a MalformedRequest naming the field and rule."""
        thing_name = _thing_name(_object(body))
        certificate_id = _required_text(body, "certificateId")
        if len(certificate_id) > MAX_CERTIFICATE_ID_CHARS or not certificate_id.isascii() \
                or not certificate_id.isalnum():
            raise MalformedRequest("certificateId must be the certificate id the device was given", "malformed-request")
        stamp, timestamp, nonce = _stamped(body)
        signature = decode_signature(_required_text(body, "signature"), "signature")
        csr_pem, csr = _csr(body, thing_name)
        return cls(thing_name, certificate_id, timestamp, nonce, signature, csr, csr_pem,
                   renew_v1_text(thing_name, certificate_id, stamp, nonce, csr_pem))


def check_fresh(signed_at: datetime, now: datetime, skew_seconds: int) -> None:
    """A signed request's timestamp is within the allowed skew of the server's clock, either way (a device without
    NTP learns the server's time from the refusal)."""
    off = abs((now - signed_at).total_seconds())
    if off > skew_seconds:
        raise SignatureInvalid(f"the timestamp is {off:.0f} s away from the server's clock, {timestamp(now)} "
                               f"(at most {skew_seconds} s allowed)", "stale-timestamp")


def remembered(nonce: str, now: datetime, skew_seconds: int) -> Nonce:
    """A nonce is remembered until its request's timestamp is stale anyway: twice the allowed skew."""
    return Nonce(nonce, now + timedelta(seconds=2 * skew_seconds))
