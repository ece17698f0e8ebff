"""The caller's address as the HTTP edge sees it."""
from __future__ import annotations

import ipaddress
from typing import Mapping


def client_ip(source_ip: str, headers: Mapping[str, str], trust_forwarded_for: bool) -> str:
    """The caller's address: the connection's source, or with a trusted proxy the last X-Forwarded-For hop.

    The right-most hop is the one the nearest proxy appended; hops to its left are whatever the client wrote.
    """
    if trust_forwarded_for:
        forwarded = headers.get("x-forwarded-for") or headers.get("X-Forwarded-For") or ""
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                continue
    return source_ip
