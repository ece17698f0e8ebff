"""Provisioning request signatures.

v1 is the original sample's: RSA PKCS#1 v1.5 with SHA-256 over the UTF-8 thing name, made with the
fleet-wide provisioning key.
"""
import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from chalicelib.errors import ConfigError, MalformedRequest, SignatureInvalid


def decode_signature(signature_b64: str) -> bytes:
    try:
        return base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("thing-name-sig is not valid base64", "malformed-signature") from None


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
    """Checks v1 signatures against the fleet's provisioning public key."""

    def __init__(self, public_key: rsa.RSAPublicKey):
        self._key = public_key

    def verify(self, thing_name: str, signature: bytes) -> None:
        try:
            self._key.verify(signature, thing_name.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise SignatureInvalid("the signature does not match the thing name") from None
