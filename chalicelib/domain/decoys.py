"""Equal time for every 403: a signature check that costs the same whether or not the device exists.

The refusal bodies are byte-identical, so how long a refusal takes is all an attacker without the key has to go
on. Checked naively, an unknown device costs nothing (there is no key to check), a registered one a key load and a
verification: over loopback the medians of 101 refusals told a registered name from an unknown one nearly every
time (bench/timing.py). So every check does one key load from PEM and one verification of the signature's kind,
against the device's key when it is of that kind, else against a decoy key no device holds.

A signature's kind is read from its bytes: a DER ECDSA signature whose integers fit P-256 (or P-384), else RSA
of the signature's length. A genuine signature is always of its key's kind, so a decoy never refuses one.
"""
from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from chalicelib.domain.keypolicy import MIN_RSA_BITS, RSA_EXPONENT
from chalicelib.domain.signatures import verifies

_CURVES: dict[int, type[ec.EllipticCurve]] = {256: ec.SECP256R1, 384: ec.SECP384R1}
_MAX_RSA_BYTES = 1024  # 8192 bits: past it no decoy is made (a signature that long is refused by its length)


@dataclass(frozen=True)
class Decoy:
    pem: str  # loaded on every check, as a device's key is
    key: PublicKeyTypes  # verified against when the device's key, loaded, is of another kind


@dataclass(frozen=True)
class _Kind:
    ecdsa_bits: int = 0  # the curve's size for an ECDSA signature; 0 for RSA
    rsa_bytes: int = 0  # the signature's length for RSA

    def fits(self, key: object) -> bool:
        if isinstance(key, rsa.RSAPublicKey):
            return self.rsa_bytes == (key.key_size + 7) // 8
        return isinstance(key, ec.EllipticCurvePublicKey) and 0 < self.ecdsa_bits <= key.curve.key_size


def _kind(signature: bytes) -> _Kind:
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        r = s = 0
    bits = max(r.bit_length(), s.bit_length())
    if r > 0 and s > 0:
        size = next((size for size in sorted(_CURVES) if bits <= size), 0)
        if size:
            return _Kind(ecdsa_bits=size)
    return _Kind(rsa_bytes=len(signature))


@functools.lru_cache(maxsize=None)
def _decoy(kind: _Kind) -> Decoy:
    """One per kind for the process's life. RSA: a random odd modulus of the signature's length (a verification's
    cost is the modular exponentiation, whoever made the modulus); lengths no accepted key has use the smallest
    accepted size, which refuses them by length as a device's key would."""
    key: PublicKeyTypes
    if kind.ecdsa_bits:
        key = ec.generate_private_key(_CURVES[kind.ecdsa_bits]()).public_key()
    else:
        bits = kind.rsa_bytes * 8 if MIN_RSA_BITS // 8 <= kind.rsa_bytes <= _MAX_RSA_BYTES else MIN_RSA_BITS
        modulus = secrets.randbits(bits) | (1 << (bits - 1)) | 1
        key = rsa.RSAPublicNumbers(RSA_EXPONENT, modulus).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return Decoy(pem, key)


def load_pem(pem: str) -> PublicKeyTypes:
    return serialization.load_pem_public_key(pem.encode())


def signed_by(pem: str | None, text: bytes, signature: bytes,
              load: Callable[[str], PublicKeyTypes] = load_pem) -> bool:
    """Whether `signature` over `text` is the key's (`pem`; None when the device is unknown or has no key), doing the
    same work either way: `load` (how the caller reads a device's key) of one PEM, one verification of the signature's
    kind. A device's `pem` that `load` refuses raises its ValueError after that work."""
    kind = _kind(signature)
    decoy = _decoy(kind)
    try:
        key = load(pem if pem is not None else decoy.pem)
    except ValueError:  # the device's key, or a decoy of a kind the caller's policy does not accept
        verifies(decoy.key, text, signature)
        if pem is None:
            return False
        raise
    if pem is None:
        verifies(key, text, signature)  # the decoy as loaded just now, as a device's key would be
        return False
    if not kind.fits(key):
        verifies(decoy.key, text, signature)
        return False
    return verifies(key, text, signature)
