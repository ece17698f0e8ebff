"""Where a caller is: its IP address, and that address's estimated location.

Providers answer a Location or None (unknown, or the provider is down); FallbackLocator asks them in
order, so an outage of one never blocks provisioning: the last resort is the region policy's default.
"""
import functools
import ipaddress
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from chalicelib.regions import Location

log = logging.getLogger(__name__)
# urllib3 logs each URL at DEBUG, and ipstack's carries its access key.
logging.getLogger("urllib3").setLevel(logging.INFO)


class GeoLocator(Protocol):
    def locate(self, ip: str) -> Location | None: ...


def public_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The parsed address when it is public; None for private, loopback, reserved and garbage, which have
    no location anywhere, so nobody is asked."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return address if address.is_global else None


class MaxMindLocator:
    """Reads a MaxMind City database (the bundled GeoLite2-City by default), offline."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    @classmethod
    def bundled(cls) -> "MaxMindLocator":
        from _maxminddb_geolite2 import geolite2_database

        return cls.open(geolite2_database())

    @classmethod
    def open(cls, path: str | Path) -> "MaxMindLocator":
        import maxminddb

        # The C extension over mmap when it is there (several times faster than the pure-Python reader);
        # opening is instant and the file is paged in only where looked up.
        return cls(maxminddb.open_database(str(path), maxminddb.MODE_AUTO))

    def locate(self, ip: str) -> Location | None:
        address = public_address(ip)
        if address is None:
            return None
        record = self._reader.get(address)
        location = (record or {}).get("location") or {}
        if "latitude" not in location or "longitude" not in location:
            return None
        country = (record.get("country") or record.get("registered_country") or {}).get("iso_code")
        continent = (record.get("continent") or {}).get("code")
        return Location(location["latitude"], location["longitude"], country, continent)


class IpstackLocator:
    """ipstack over HTTPS, one reused session, a short timeout; the access key comes from `access_key()`.

    ipstack takes its key only in the query string, so URLs are never logged.
    """

    URL = "https://api.ipstack.com/{ip}"

    def __init__(self, session: Any, access_key: Callable[[], str | None], timeout: float = 1.5) -> None:
        self._session = session
        self._access_key = access_key
        self._timeout = timeout

    def locate(self, ip: str) -> Location | None:
        if not public_address(ip):
            return None
        key = self._access_key()
        if not key:
            return None
        try:
            response = self._session.get(self.URL.format(ip=ip), timeout=self._timeout,
                                         params={"access_key": key,
                                                 "fields": "latitude,longitude,country_code,continent_code"})
            body = response.json() if response.status_code == 200 else {}
        except Exception as exc:  # network, timeout, not JSON: fall back, never fail the device
            log.warning("ipstack unavailable (%s); falling back", type(exc).__name__)
            return None
        if not isinstance(body, dict) or body.get("success") is False:
            error = (body.get("error") or {}) if isinstance(body, dict) else {}
            log.warning("ipstack refused the lookup (status %s, %s); falling back",
                        response.status_code, error.get("type", "no body"))
            return None
        try:
            return Location(float(body["latitude"]), float(body["longitude"]), body.get("country_code"),
                            body.get("continent_code"))
        except (KeyError, TypeError, ValueError):  # no coordinates, or not numbers: the next provider answers
            return None


class FallbackLocator:
    """The first provider that knows the address answers."""

    def __init__(self, providers: Sequence[GeoLocator]) -> None:
        self._providers = list(providers)

    def locate(self, ip: str) -> Location | None:
        for provider in self._providers:
            location = provider.locate(ip)
            if location is not None:
                return location
        return None


class CachingLocator:
    """Remembers answers per IP for the container's life, at most `size` of them (least recently used go)."""

    def __init__(self, inner: GeoLocator, size: int = 10_000) -> None:
        self.locate = functools.lru_cache(maxsize=size)(inner.locate)


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
