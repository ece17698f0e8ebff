"""Provisioning request signatures (design.md, "Wire protocol").

v1 is the original sample's: RSA PKCS#1 v1.5 / SHA-256 over the UTF-8 thing name, made with the
fleet-wide provisioning key. v2 also covers a timestamp, a nonce and the CSR, so a captured request can
neither be replayed nor have its CSR swapped; it is RSA or ECDSA P-256 by key type.
renew-v1 (POST /device-renewal) is v2's form plus the certificate id, signed with the key of the device's
current certificate.
"""
import base64
import binascii
import hashlib
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from chalicelib.clock import TIMESTAMP_FORMAT
from chalicelib.errors import ConfigError, MalformedRequest



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


def v1_text(thing_name: str) -> bytes:
    return thing_name.encode("utf-8")


def v2_text(thing_name: str, timestamp: str, nonce: str, csr_pem: str | None) -> bytes:
    csr_hash = hashlib.sha256(csr_pem.encode("utf-8")).hexdigest() if csr_pem else ""
    return f"v2\n{thing_name}\n{timestamp}\n{nonce}\n{csr_hash}".encode("utf-8")


def renew_v1_text(thing_name: str, certificate_id: str, timestamp: str, nonce: str, csr_pem: str | None) -> bytes:
    csr_hash = hashlib.sha256(csr_pem.encode("utf-8")).hexdigest() if csr_pem else ""
    return f"renew-v1\n{thing_name}\n{certificate_id}\n{timestamp}\n{nonce}\n{csr_hash}".encode("utf-8")


def verifies(public_key, text: bytes, signature: bytes) -> bool:
    """RSA PKCS#1 v1.5 or ECDSA (DER), SHA-256, by the key's type."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, text, padding.PKCS1v15(), hashes.SHA256())
        else:
            public_key.verify(signature, text, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def check_signing_key(key) -> None:
    """A provisioning key must be RSA of 2048 bits or more, or EC P-256; raises ValueError naming the rule."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA signing key must have at least 2048 bits, not {key.key_size}")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"an EC signing key must be on P-256, not {key.curve.name}")
    else:
        raise ValueError("a signing key must be RSA (2048 bits or more) or EC P-256")


def load_device_key(pem: str | bytes):
    """A per-device public key from PEM; ValueError with a clear message when it is not acceptable."""
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    check_signing_key(key)
    return key


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"fleet provisioning public key not found at {path}; "
            "make it with: python -m chalicelib.admin keygen") from None
    except ValueError as exc:
        raise ConfigError(f"fleet provisioning public key at {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise ConfigError(f"fleet provisioning public key at {path} must be RSA of at least 2048 bits")
    return key


class FleetKeyVerifier:
    """The fleet-wide provisioning key the service checks signatures with when a device has none of its own;
    during a rotation, the previous key too."""

    def __init__(self, public_key: rsa.RSAPublicKey, *previous: rsa.RSAPublicKey):
        self.keys = (public_key, *previous)

    def verifies(self, text: bytes, signature: bytes) -> bool:
        return any(verifies(key, text, signature) for key in self.keys)
