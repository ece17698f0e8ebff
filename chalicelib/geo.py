"""Where a caller is: its IP address, and that address's estimated location."""
import ipaddress
from typing import Mapping, Protocol

from chalicelib.regions import Location


class GeoLocator(Protocol):
    def locate(self, ip: str) -> Location | None: ...


class MaxMindLocator:
    """Reads a MaxMind City database (the bundled GeoLite2-City by default), offline."""

    def __init__(self, reader):
        self._reader = reader

    @classmethod
    def bundled(cls) -> "MaxMindLocator":
        import maxminddb
        from _maxminddb_geolite2 import geolite2_database

        # mmap: opening is instant and the 56 MB file is paged in only where looked up.
        return cls(maxminddb.open_database(geolite2_database(), maxminddb.MODE_MMAP))

    def locate(self, ip: str) -> Location | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if not address.is_global:
            return None  # private, loopback, reserved: no database knows where they are
        record = self._reader.get(address)
        location = (record or {}).get("location") or {}
        if "latitude" not in location or "longitude" not in location:
            return None
        country = ((record.get("country") or record.get("registered_country") or {}).get("iso_code"))
        return Location(location["latitude"], location["longitude"], country)


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
