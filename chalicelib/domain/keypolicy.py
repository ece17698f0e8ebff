"""Which public keys the service accepts, written once: CSR keys, per-device signing keys, the fleet key.

RSA keys of devices (a CSR's, a per-device signing key) must have the public exponent 65537 (RSA_EXPONENT).
With a small exponent such as 3, anyone can forge that key's PKCS#1 v1.5 signatures wherever a verifier does
not check the whole padding (Bleichenbacher 2006, found again since in several TLS libraries, embedded ones
among them), and encryption to the key is weakened (Coppersmith, Hastad). FIPS 186-5 requires an exponent above
2**16, and every current key generator makes 65537: the rule costs a genuine device nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from chalicelib.domain.errors import (
    ConfigError,
)

MIN_RSA_BITS = 2048
RSA_EXPONENT = 65537  # the only public exponent of device RSA keys (module docstring)
KEYGEN_RSA_BITS = (2048, 3072, 4096)  # what the CLI makes for a fleet key
_CURVE_NAMES = {ec.SECP256R1: "P-256", ec.SECP384R1: "P-384"}


@dataclass(frozen=True)
class KeyPolicy:
    what: str  # how messages name the key
    curves: tuple[type[ec.EllipticCurve], ...]  # the EC curves accepted besides RSA of MIN_RSA_BITS or more
    article: str = "a"

    def problem(self, key: object) -> str | None:
        """None when `key` is acceptable, else the rule it breaks, in words."""
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                return f"an RSA {self.what} must have at least {MIN_RSA_BITS} bits, not {key.key_size}"
            exponent = key.public_numbers().e
            if exponent != RSA_EXPONENT:
                return f"an RSA {self.what} must have the public exponent {RSA_EXPONENT}, not {exponent}"
            return None
        names = [_CURVE_NAMES[curve] for curve in self.curves]
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, self.curves):
                return f"an EC {self.what} must be on {' or '.join(names)}, not {key.curve.name}"
            return None
        return f"{self.article} {self.what} must be RSA ({MIN_RSA_BITS} bits or more) or EC {'/'.join(names)}"


# A certificate's key (from a CSR): what AWS IoT signs.
CERTIFICATE_KEYS = KeyPolicy("key", (ec.SECP256R1, ec.SECP384R1), article="the")
# A key that signs provisioning requests (v2: RSA PKCS#1 v1.5 or ECDSA P-256, SHA-256).
SIGNING_KEYS = KeyPolicy("signing key", (ec.SECP256R1,))


def check_fleet_key(key: object, where: str) -> rsa.RSAPublicKey:
    """The fleet key signs v1 requests too, which are RSA only."""
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"fleet provisioning public key at {where} must be RSA of at least {MIN_RSA_BITS} bits")
    return key


def key_fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo DER, hex: what the registry remembers of a device's key."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return digest.finalize().hex()


def public_key_pem(public_key: PublicKeyTypes) -> str:
    """What the registry keeps of a certificate's key, so a renewal's signature needs no issuer call."""
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
