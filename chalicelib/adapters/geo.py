"""Where a caller is: its IP address, and that address's estimated location.

Providers answer a Location or None (unknown, or the provider is down); FallbackLocator asks them in
order, so an outage of one never blocks provisioning: the last resort is the region policy's default.
"""
import ipaddress
import json
import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from chalicelib.adapters.observability import emit_metrics
from chalicelib.domain.clock import timestamp, utcnow
from chalicelib.domain.regions import Location
from chalicelib.ports.geo import GeoLocator

log = logging.getLogger(__name__)
# urllib3 logs each URL at DEBUG, and ipstack's carries its access key.
logging.getLogger("urllib3").setLevel(logging.INFO)




def public_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The parsed address when it is public; None for private, loopback, reserved and garbage, which have
    no location anywhere, so nobody is asked."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return address if address.is_global else None


BUNDLED_DATABASE = Path(__file__).resolve().parent.parent / "data" / "city-reduced.mmdb"
# How long a located address is kept: long enough that a burst of devices behind one address costs one lookup, short
# enough that a fallback answer given during a provider's outage (or an address that moved) does not stay for the
# container's life.
CACHE_SECONDS = 600.0


def bundled_database() -> str:
    """DB-IP City Lite of April 2023 (CC BY 4.0: "IP Geolocation by DB-IP", https://db-ip.com), reduced to the
    fields MaxMindLocator reads by `python -m devstack.build_geodata`: newer than MaxMind's last freely
    redistributable GeoLite2 (2019) and locating more addresses (bench/geo_compare.py, docs/geolocation.md)."""
    return str(BUNDLED_DATABASE)


class MaxMindLocator:
    """Reads a MaxMind-format City database (the bundled DB-IP City Lite by default), offline."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    @classmethod
    def bundled(cls) -> "MaxMindLocator":
        return cls.open(bundled_database())

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


class Backoff:
    """A provider that failed is skipped for a while, then tried again: 30 s, doubling up to 15 min.

    The first failure of an outage is logged as a warning (once, not per request) and every failure counts
    in the GeolocationProviderFailed metric, so running on the bundled database is visible, never silent;
    /health reports the outage (`outage()`) until the provider answers again.
    """

    def __init__(self, name: str, first: float = 30.0, cap: float = 900.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], datetime] = utcnow):
        self.name, self._first, self._cap, self._clock, self._wall = name, first, cap, clock, wall
        self.failures = 0
        self._retry_at = 0.0
        self._since: datetime | None = None  # the outage's first failure (wall clock, for operators)
        self._reason = ""
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return self._clock() >= self._retry_at

    def failed(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            wait = min(self._cap, self._first * 2 ** (self.failures - 1))
            self._retry_at = self._clock() + wait
            self._reason = reason
            if self.failures == 1:
                self._since = self._wall()
                log.warning("%s unavailable (%s): using the next geolocation provider; retrying in %.0f s, "
                            "backing off up to %.0f s", self.name, reason, wait, self._cap)
        emit_metrics([("GeolocationProviderFailed", "Count", 1.0, {"provider": self.name})])

    def succeeded(self) -> None:
        if self.failures:
            with self._lock:
                log.warning("%s is back after %d failed attempt(s)", self.name, self.failures)
                self.failures, self._retry_at, self._since = 0, 0.0, None

    def outage(self) -> dict[str, str] | None:
        """The facts of an outage not over yet (the provider has not answered since it failed), else None."""
        with self._lock:
            if not self.failures or self._since is None:
                return None
            wait = max(0.0, self._retry_at - self._clock())
            return {"provider": self.name, "reason": self._reason, "since": timestamp(self._since),
                    "failures": str(self.failures),
                    "next_try": f"in {wait:.0f} s" if wait else "with the next request"}


class HttpResponse:
    def __init__(self, status_code: int, data: bytes):
        self.status_code, self.data = status_code, data

    def json(self) -> object:
        return json.loads(self.data)


class HttpGet:
    """The one HTTPS GET ipstack needs, over urllib3: botocore's own HTTP library, loaded on prod anyway
    (requests would add its import to every cold start). Certificates are verified (urllib3's default)."""

    def __init__(self) -> None:
        import urllib3
        self._pool = urllib3.PoolManager(retries=False)

    def get(self, url: str, params: Mapping[str, str], timeout: float) -> HttpResponse:
        response = self._pool.request("GET", url, fields=params, timeout=timeout, preload_content=True)
        return HttpResponse(response.status, response.data)


class IpstackLocator:
    """ipstack over HTTPS, one reused session, a short timeout; the access key comes from `access_key()`.

    ipstack takes its key only in the query string, so URLs are never logged.
    """

    URL = "https://api.ipstack.com/{ip}"

    def __init__(self, session: Any, access_key: Callable[[], str | None], timeout: float = 1.5,
                 backoff: Backoff | None = None, url: str = URL) -> None:
        self._session = session
        self._url = url
        self._access_key = access_key
        self._timeout = timeout
        self.backoff = backoff or Backoff("ipstack")

    def locate(self, ip: str) -> Location | None:
        if not public_address(ip) or not self.backoff.ready():  # down: no timeout paid per device meanwhile
            return None
        key = self._access_key()
        if not key:
            return None
        try:
            response = self._session.get(self._url.format(ip=ip), timeout=self._timeout,
                                         params={"access_key": key,
                                                 "fields": "latitude,longitude,country_code,continent_code"})
            body = response.json() if response.status_code == 200 else {}
        except Exception as exc:  # network, timeout, not JSON: fall back, never fail the device
            self.backoff.failed(f"unreachable: {type(exc).__name__}")
            return None
        if not isinstance(body, dict) or body.get("success") is False or response.status_code != 200:
            error = (body.get("error") or {}) if isinstance(body, dict) else {}
            self.backoff.failed(f"refused: HTTP {response.status_code}, {error.get('type', 'no error type')}")
            return None
        self.backoff.succeeded()
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
    """Remembers answers per IP, at most `size` of them (least recently used go), each for `ttl_seconds`: an answer
    the fallback gave during an ipstack outage, or an address that moved, is asked again after that."""

    def __init__(self, inner: GeoLocator, size: int = 10_000, ttl_seconds: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inner, self._size, self._ttl, self._clock = inner, size, ttl_seconds, clock
        self._answers: OrderedDict[str, tuple[float, Location | None]] = OrderedDict()
        self._lock = threading.Lock()

    def locate(self, ip: str) -> Location | None:
        now = self._clock()
        with self._lock:
            kept = self._answers.get(ip)
            if kept is not None and now - kept[0] < self._ttl:
                self._answers.move_to_end(ip)
                return kept[1]
        location = self._inner.locate(ip)  # outside the lock: a slow provider holds up no other address
        with self._lock:
            self._answers[ip] = (now, location)
            self._answers.move_to_end(ip)
            while len(self._answers) > self._size:
                self._answers.popitem(last=False)
        return location


