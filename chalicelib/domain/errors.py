"""Domain errors. Each carries a stable machine code; app.py maps classes to HTTP statuses."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chalicelib.domain.records import DeviceRecord


class ProvisioningError(Exception):
    """Base of every error a device may be told about."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class MalformedRequest(ProvisioningError):
    code = "malformed-request"


class BodyTooLarge(ProvisioningError):
    code = "body-too-large"


class SignatureInvalid(ProvisioningError):
    code = "invalid-signature"


def replayed_request() -> SignatureInvalid:
    return SignatureInvalid("this request was seen before (nonce replayed)", "replayed-request")


# One answer for every signature refusal, so a caller cannot tell an unknown device from a wrong key.
REFUSED = "the signature does not match the thing name and the device's key"


class NotRegistered(ProvisioningError):
    code = "not-registered"


class AlreadyProvisioned(ProvisioningError):
    code = "already-provisioned"

    def __init__(self, message: str, code: str | None = None, record: DeviceRecord | None = None) -> None:
        super().__init__(message, code)
        self.record = record  # the device as the refused claim saw it, so a lost-response retry needs no read


class ProvisioningInProgress(ProvisioningError):
    code = "provisioning-in-progress"

    def __init__(self, message: str, code: str | None = None, retry_after: int | None = None):
        super().__init__(message, code)
        self.retry_after = retry_after  # seconds left on the lease that holds the device, when known


class RegionBlocked(ProvisioningError):
    """The region policy refuses devices from the caller's country."""

    code = "country-blocked"


class ServiceUnavailable(ProvisioningError):
    """An upstream part (issuer, registry) failed; the device may retry later."""

    code = "service-unavailable"

    def __init__(self, message: str, code: str | None = None, retry_after: int = 5) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class IssueIncomplete(Exception):
    """The issuer failed and could not undo all it had made: `error` is why it failed (what the device is
    told), `leftover` names what is left behind (recorded on the device for the operator and the audit)."""

    def __init__(self, error: Exception, leftover: str, certificate: tuple[str, bool] | None = None) -> None:
        super().__init__(f"{error} (left behind: {leftover})")
        self.error = error
        self.leftover = leftover
        self.certificate = certificate  # (id, whether the thing was made) for the write-ahead record


class ConfigError(Exception):
    """The stage's configuration is wrong; raised at startup with a message naming the setting."""


class RenewalRefused(ProvisioningError):
    """Unknown device, wrong certificate id, wrong key, revoked certificate: one answer for all (docs/protocol.md)."""

    code = "renewal-refused"

    def __init__(self) -> None:  # one message for every cause
        super().__init__(RENEWAL_REFUSED)


RENEWAL_REFUSED = "renewal refused: the device, its current certificate and the signature do not match"


class RenewalInProgress(ProvisioningError):
    """Another renewal of the device holds the lease; the caller may ask again after `retry_after` seconds."""

    code = "renewal-in-progress"

    def __init__(self, message: str, code: str | None = None, retry_after: int = 2):
        super().__init__(message, code)
        self.retry_after = retry_after
