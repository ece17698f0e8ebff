"""What a provisioning or a renewal answers the device (edge/wire.py puts it on the wire)."""
from __future__ import annotations

from dataclasses import dataclass

from chalicelib.domain.certificates import IssuedCertificate
from chalicelib.domain.regions import RegionChoice


@dataclass(frozen=True)
class Answer:
    """What a provisioning or a renewal gives the device (edge/wire.py says it)."""

    thing_name: str
    choice: RegionChoice
    issued: IssuedCertificate
    note: str | None = None                     # the answer's `message`: something to explain
    previous_certificate_id: str | None = None  # a renewal's: the certificate it replaces
    recovered: bool = False                     # a lost answer given back: nothing was created
