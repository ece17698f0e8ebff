"""The caller's address as the HTTP edge sees it."""
from __future__ import annotations

import ipaddress
from typing import Mapping


def client_ip(source_ip: str, headers: Mapping[str, str], trust_forwarded_for: bool) -> str:
    """The caller's address: the connection's source, or with a trusted proxy the last X-Forwarded-For hop.

    The right-most hop is the one the nearest proxy appended; hops to its left are whatever the client wrote.
    When the right-most hop is not an address (empty, garbage, a port appended), the header is not trusted for
    this request and the connection's source is used: never a hop further left, which the client chose.
    """
    if trust_forwarded_for:
        forwarded = headers.get("x-forwarded-for") or headers.get("X-Forwarded-For") or ""
        if forwarded.strip():
            try:
                return str(ipaddress.ip_address(forwarded.rsplit(",", 1)[-1].strip()))
            except ValueError:
                pass
    return source_ip
