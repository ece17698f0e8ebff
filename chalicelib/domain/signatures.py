"""Provisioning request signatures (docs/protocol.md).

v1 is the original sample's: RSA PKCS#1 v1.5 / SHA-256 over the UTF-8 thing name, made with the
fleet-wide provisioning key. v2 also covers a timestamp, a nonce and the CSR, so a captured request can
neither be replayed nor have its CSR swapped; it is RSA or ECDSA P-256 by key type.
renew-v1 (POST /device-renewal) is v2's form plus the certificate id, signed with the key of the device's
current certificate.
"""
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from chalicelib.domain.keypolicy import SIGNING_KEYS


def v1_text(thing_name: str) -> bytes:
    return thing_name.encode("utf-8")


def v2_text(thing_name: str, timestamp: str, nonce: str, csr_pem: str | None) -> bytes:
    csr_hash = hashlib.sha256(csr_pem.encode("utf-8")).hexdigest() if csr_pem else ""
    return f"v2\n{thing_name}\n{timestamp}\n{nonce}\n{csr_hash}".encode("utf-8")


def renew_v1_text(thing_name: str, certificate_id: str, timestamp: str, nonce: str, csr_pem: str | None) -> bytes:
    csr_hash = hashlib.sha256(csr_pem.encode("utf-8")).hexdigest() if csr_pem else ""
    return f"renew-v1\n{thing_name}\n{certificate_id}\n{timestamp}\n{nonce}\n{csr_hash}".encode("utf-8")


def verifies(public_key: PublicKeyTypes, text: bytes, signature: bytes) -> bool:
    """RSA PKCS#1 v1.5 or ECDSA (DER), SHA-256, by the key's type."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, text, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, text, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def check_signing_key(key: object) -> None:
    """A provisioning key must be RSA of 2048 bits or more with exponent 65537, or EC P-256 (keypolicy); raises
    ValueError naming the rule."""
    problem = SIGNING_KEYS.problem(key)
    if problem:
        raise ValueError(problem)


def load_device_key(pem: str | bytes) -> PublicKeyTypes:
    """A per-device public key from PEM; ValueError with a clear message when it is not acceptable."""
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    check_signing_key(key)
    return key




class FleetKeyVerifier:
    """The fleet-wide provisioning key the service checks signatures with when a device has none of its own;
    during a rotation, the previous key too."""

    def __init__(self, public_key: rsa.RSAPublicKey, *previous: rsa.RSAPublicKey) -> None:
        self.keys = (public_key, *previous)

    def verifies(self, text: bytes, signature: bytes) -> bool:
        return any(verifies(key, text, signature) for key in self.keys)
