"""Why a conditional claim was refused: the one rule every registry backend raises from."""
from __future__ import annotations

import math
from datetime import datetime, timedelta

from chalicelib.domain.errors import (
    REFUSED,
    AlreadyProvisioned,
    NotRegistered,
    ProvisioningError,
    ProvisioningInProgress,
    SignatureInvalid,
)
from chalicelib.domain.records import PROVISIONED, DeviceRecord


def claim_refusal(thing_name: str, record: DeviceRecord | None, fleet_key: bool,
                  now: datetime | None = None) -> ProvisioningError:
    """Why a conditional claim was refused, decided from the record as the refused write saw it (None: no item).

    Every backend raises what this returns: the rule lives here, the condition that enforces it in each backend.
    A device in progress is free again, at the latest, when its lease ends: that is its Retry-After.
    """
    if record is None:
        return NotRegistered(f"{thing_name} is not on the allow-list")
    if fleet_key and record.public_key:  # the device has its own key: the fleet key's signature does not count
        return SignatureInvalid(REFUSED)
    if record.status is PROVISIONED:
        return AlreadyProvisioned(f"{thing_name} is already provisioned", record=record)
    left = (record.lease_expires - now).total_seconds() if record.lease_expires and now else None
    return ProvisioningInProgress(f"{thing_name} is being provisioned by another request",
                                  retry_after=None if left is None else max(1, math.ceil(left)))


def rekey_refusal(thing_name: str, record: DeviceRecord | None, fleet_key: bool, now: datetime,
                  quiet_seconds: int = 0) -> ProvisioningError:
    """Why a re-key claim (`begin_rekey`) was refused: claim_refusal's rule, then a re-key in flight or a
    provisioning, re-key or renewal that may still be answering (409 with the time left), else the device is
    provisioned for good (its window is over, or its key is its own)."""
    if record is None or (fleet_key and record.public_key) or record.status is not PROVISIONED:
        return claim_refusal(thing_name, record, fleet_key, now)
    if record.renewal_lease is not None and record.renewal_lease >= now:
        return ProvisioningInProgress(f"{thing_name} is being re-keyed by another request",
                                      retry_after=max(1, math.ceil((record.renewal_lease - now).total_seconds())))
    # The last certificate answered: the provisioning's, or a later re-key's (or renewal's).
    issued = max((at for at in (record.provisioned_at, record.last_renewal) if at is not None), default=None)
    opens = issued + timedelta(seconds=quiet_seconds) if issued is not None else None
    if record.server_key and opens is not None and opens > now:
        what = "provisioned" if issued == record.provisioned_at else "given a new certificate"
        return ProvisioningInProgress(f"{thing_name} was {what} just now; its answer may still be on the way",
                                      retry_after=max(1, math.ceil((opens - now).total_seconds())))
    return AlreadyProvisioned(f"{thing_name} is already provisioned; an operator must reset it (admin reset) before "
                              "it can provision again", record=record)
