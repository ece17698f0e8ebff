"""The prod stage's fleet public key(s), kept in SSM Parameter Store (a String parameter, PEM: the current key,
then the previous one during a rotation) instead of a file in the Lambda package.

Why: a deploy from a fresh clone needs no key file, and `admin --stage prod keygen` rotates the key without a
redeploy. Cost: one `ssm:GetParameter` per container, on its first signature check (a few ms in the Lambda's
region), and again at most once a minute when a signature verifies with none of the known keys (a key rotated
since the container started), or while the parameter is missing.
"""
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.adapters import observability
from chalicelib.domain.errors import ConfigError
from chalicelib.domain.keypolicy import check_fleet_key
from chalicelib.domain.signatures import FleetKeyVerifier, verifies

_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)
REREAD_SECONDS = 60.0


def fleet_keys_from_pem(text: str, where: str) -> tuple[rsa.RSAPublicKey, ...]:
    """Every PEM public key in `text`, in order; each must pass the fleet key rule (keypolicy)."""
    keys = []
    for block in _PEM.findall(text):
        try:
            key = serialization.load_pem_public_key(block.encode())
        except ValueError as exc:
            raise ConfigError(f"fleet public key in {where} is not a PEM public key: {exc}") from None
        keys.append(check_fleet_key(key, where))
    if not keys:
        raise ConfigError(f"{where} holds no PEM public key")
    return tuple(keys)


def rotated_value(new_key: rsa.RSAPublicKey, current_value: str | None) -> str:
    """The parameter's value after a rotation: the new key, then the current one (devices in the field still
    sign with it); a key older than that is dropped."""
    new = new_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    previous = _PEM.findall(current_value or "")[:1]
    return new + "".join(f"{pem}\n" for pem in previous)


def read_parameter(ssm: Any, name: str) -> str | None:
    """The parameter's value, or None when it does not exist yet."""
    from botocore.exceptions import ClientError
    try:
        value: str = ssm.get_parameter(Name=name)["Parameter"]["Value"]
        return value
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
            return None
        raise


def publish(ssm: Any, name: str, new_key: rsa.RSAPublicKey, current_value: str | None) -> None:
    """Written by `admin keygen`: running functions pick it up without a redeploy (SsmFleetKeyVerifier)."""
    ssm.put_parameter(Name=name, Value=rotated_value(new_key, current_value), Type="String", Overwrite=True)


class SsmFleetKeyVerifier(FleetKeyVerifier):
    """FleetKeyVerifier whose keys come from an SSM parameter: read on first use, then again (at most once a
    minute) when a signature verifies with none of them, or while the parameter cannot be read."""

    def __init__(self, ssm: Any, name: str, clock: Callable[[], float] = time.monotonic,
                 reread_seconds: float = REREAD_SECONDS):
        self._ssm, self._name, self._clock, self._reread = ssm, name, clock, reread_seconds
        self._keys: tuple[rsa.RSAPublicKey, ...] | None = None
        self._value: str | None = None
        self._read_at: float | None = None
        self._lock = threading.Lock()

    @property  # a property here, an attribute of the file-based verifier
    def keys(self) -> tuple[rsa.RSAPublicKey, ...]:  # type: ignore[override]
        if self._keys is None:
            self._read()
        if self._keys is None:
            raise ConfigError(f"fleet public key parameter {self._name} cannot be read; "
                              "make it with: python -m admin --stage prod keygen")
        return self._keys

    def verifies(self, text: bytes, signature: bytes) -> bool:
        if any(verifies(key, text, signature) for key in self.keys):
            return True
        return self._read() and any(verifies(key, text, signature) for key in self.keys)

    def _read(self) -> bool:
        """Reads the parameter unless it was read less than `reread_seconds` ago; True when the keys changed."""
        from botocore.exceptions import BotoCoreError, ClientError  # prod only: the local stage has no boto3
        with self._lock:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self._reread:
                return False
            self._read_at = now
            try:
                value = self._ssm.get_parameter(Name=self._name)["Parameter"]["Value"]
            except (ClientError, BotoCoreError) as exc:
                observability.logger.error("cannot read fleet public key parameter %s (%s); run: python -m "
                                           "admin --stage prod keygen", self._name, type(exc).__name__)
                return False
            if value == self._value:
                return False
            self._keys, self._value = fleet_keys_from_pem(value, f"SSM parameter {self._name}"), value
            return True


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"fleet provisioning public key not found at {path}; "
            "make it with: python -m admin keygen") from None
    except ValueError as exc:
        raise ConfigError(f"fleet provisioning public key at {path} is not a PEM public key: {exc}") from None
    return check_fleet_key(key, str(path))
