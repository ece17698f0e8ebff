"""The bundled geolocation database and the builder that makes it (devstack/build_geodata.py).

The builder's output is read back with maxminddb (an independent implementation of the format, C and pure
Python) and checked against a brute-force lookup over the networks it was given.
"""
import bisect
import ipaddress
import random
import re
from datetime import datetime, timezone

import maxminddb
import pytest

from chalicelib.adapters.geo import MaxMindLocator, bundled_database
from chalicelib.config import PROJECT_DIR
from devstack import build_geodata

README = (PROJECT_DIR / "README.md").read_text()
GEOLOCATION = (PROJECT_DIR / "docs" / "geolocation.md").read_text()


def city_record(latitude, longitude, country, continent, city="Somewhere"):
    """A record shaped like DB-IP's and MaxMind's City records (names the service never reads included)."""
    record = {"city": {"names": {"en": city}}, "subdivisions": [{"names": {"en": "A region"}}]}
    if latitude is not None:
        record["location"] = {"latitude": latitude, "longitude": longitude}
    if country:
        record["country"] = {"iso_code": country, "geoname_id": 1, "names": {"en": country, "de": country}}
    if continent:
        record["continent"] = {"code": continent, "names": {"en": continent}}
    return record


def source_networks():
    """Sorted, disjoint networks (IPv4 then IPv6, as a reader iterates them) with City records: adjacent
    ones that differ only in names the service does not read, gaps, a record without coordinates."""
    rng = random.Random(7)
    places = [(51.5074, -0.127758, "GB", "EU"), (35.6895, 139.692, "JP", "AS"), (-33.8688, 151.209, "AU", "OC"),
              (None, None, "DE", "EU"), (40.7128, -74.006, "US", "NA")]
    networks, address, place = [], int(ipaddress.IPv4Address("1.0.0.0")), places[0]
    while address < int(ipaddress.IPv4Address("1.4.0.0")):
        prefix = rng.choice([20, 22, 24, 24, 24, 26, 32])
        while address % (1 << (32 - prefix)):  # a network starts on a multiple of its size
            prefix += 1
        if rng.random() < 0.1:
            address += 1 << (32 - prefix)  # a gap
        network = ipaddress.IPv4Network((address, prefix))
        if rng.random() < 0.2:
            place = rng.choice(places)
        networks.append((network, city_record(*place, city=rng.choice(["A", "B"]))))
        address += 1 << (32 - prefix)
    for text, place in [("2a00:1450::/33", places[0]), ("2a00:1450:8000::/33", places[0]),
                        ("2a00:1451::/32", places[3]), ("2400:4050::/32", places[1])]:
        networks.append((ipaddress.IPv6Network(text), city_record(*place)))
    networks.sort(key=lambda item: (item[0].version, item[0].network_address))
    return networks


def oracle(networks, keys, address):
    """The reduced record of the network holding `address`: the last network starting at or before it."""
    at = bisect.bisect_right(keys, (address.version, int(address))) - 1
    network, record = networks[at] if at >= 0 else (None, None)
    return build_geodata.reduce(record) if network is not None and address in network else (None, None, None, None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    networks = source_networks()
    intervals, records = build_geodata.read_source(iter(networks), progress=False)
    left, right = build_geodata.build_tree(intervals)
    build_geodata.add_ipv4_aliases(left, right)
    data, offsets = build_geodata.data_section(records)
    path = tmp_path_factory.mktemp("geodata") / "reduced.mmdb"
    build_geodata.write_database(path, left, right, data, offsets, 1680308777, "test data")
    return networks, intervals, path


@pytest.mark.parametrize("mode", [maxminddb.MODE_AUTO, maxminddb.MODE_MMAP])  # C extension, pure Python
def test_the_written_database_answers_what_the_source_says(built, mode):
    networks, _, path = built
    rng = random.Random(19)
    with maxminddb.open_database(str(path), mode) as reader:
        addresses = [ipaddress.IPv4Address(rng.randint(int(ipaddress.IPv4Address("0.255.255.0")),
                                                       int(ipaddress.IPv4Address("1.4.1.0")))) for _ in range(1000)]
        addresses += [network.network_address for network, _ in networks]
        addresses += [network.broadcast_address for network, _ in networks]
        addresses += [ipaddress.ip_address(a) for a in ("2a00:1450:ffff::1", "2a00:1451::9", "2400:4050::1",
                                                        "2a00:1452::1", "8.8.8.8")]
        keys = [(network.version, int(network.network_address)) for network, _ in networks]
        wrong = [str(a) for a in addresses if build_geodata.reduce(reader.get(a)) != oracle(networks, keys, a)]
        assert wrong == []
        # the IPv4-mapped and 6to4 forms of an address find the IPv4 answer, as in MaxMind's files
        network, record = networks[0]
        v4 = network.network_address
        assert reader.get(f"::ffff:{v4}") == reader.get(v4) == reader.get(ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80)))
        assert build_geodata.reduce(reader.get(v4)) == build_geodata.reduce(record)


def test_adjacent_networks_with_the_same_answer_are_merged(built):
    networks, intervals, path = built
    assert len(intervals) < len(networks) / 2  # the source's city names split what the service reads as one
    with maxminddb.open_database(str(path)) as reader:
        ranges: list[list] = []  # the file's networks, adjacent ones with one answer joined again
        for network, record in reader:
            start, end = int(network.network_address), int(network.broadcast_address)
            if ranges and ranges[-1][1] + 1 == start and ranges[-1][2] == record:
                ranges[-1][1] = end
            else:
                ranges.append([start, end, record])
    assert [(start, end) for start, end, _ in ranges] == list(zip(intervals.starts, intervals.ends))
    assert len(ranges) == len(intervals)


def test_reading_a_file_by_its_tree_gives_back_the_ranges_written(built):
    networks, intervals, path = built
    again, records = build_geodata.read_tree(path, progress=False)  # the aliases are not read twice
    _, original_records = build_geodata.read_source(iter(networks), progress=False)
    assert [(s, e, records[n]) for s, e, n in zip(again.starts, again.ends, again.records)] == \
        [(s, e, original_records[n]) for s, e, n in zip(intervals.starts, intervals.ends, intervals.records)]


def test_records_hold_only_what_the_service_reads(built):
    _, _, path = built
    with maxminddb.open_database(str(path)) as reader:
        records = [record for _, record in reader]
        meta = reader.metadata()
    assert {key for record in records for key in record} == {"location", "country", "continent"}
    assert {"latitude": 51.5074, "longitude": -0.127758} in [r.get("location") for r in records]
    assert any("location" not in r and r["country"] == {"iso_code": "DE"} for r in records)  # no coordinates
    assert (meta.database_type, meta.ip_version, meta.build_epoch) == ("DBIP-City-Lite-Reduced", 6, 1680308777)


def test_the_bundled_database_is_what_the_readme_and_the_credit_say():
    with maxminddb.open_database(bundled_database()) as reader:
        meta = reader.metadata()
    built = datetime.fromtimestamp(meta.build_epoch, timezone.utc).date().isoformat()
    assert meta.database_type == build_geodata.DATABASE_TYPE
    assert meta.description["en"] == build_geodata.DESCRIPTION.format(date=built)
    assert "IP Geolocation by DB-IP" in meta.description["en"] and "https://db-ip.com" in meta.description["en"]
    section = GEOLOCATION[GEOLOCATION.index("## The bundled database"):]
    section = section[:section.index("\n## ", 1)]
    assert f"DB-IP City Lite of {built}" in section
    credits = README[README.index("## Credits"):]
    assert "IP Geolocation by DB-IP" in credits and "https://db-ip.com" in credits and "CC BY 4.0" in credits
    assert not re.search(r"GeoLite2 data created by MaxMind", credits)  # no longer shipped


def test_the_bundled_database_locates_like_a_city_database():
    locator = MaxMindLocator.bundled()
    location = locator.locate("81.2.69.142")
    assert location is not None and (location.country, location.continent) == ("GB", "EU")
    assert abs(location.latitude - 51.5) < 1 and abs(location.longitude) < 1


def test_joining_neighbours_keeps_countries_and_moves_addresses_a_bounded_distance():
    london, reading, paris, tokyo = ((51.5074, -0.1278, "GB", "EU"), (51.4543, -0.9781, "GB", "EU"),
                                     (48.8566, 2.3522, "FR", "EU"), (35.6895, 139.692, "JP", "AS"))
    records = [london, reading, paris, tokyo, (None, None, "GB", "EU")]

    def ranges():
        intervals = build_geodata.Intervals()
        for start, end, number in [(0, 255, 0), (256, 511, 1), (512, 1023, 0), (1024, 1279, 2), (1280, 1535, 3),
                                   (1536, 1791, 4), (4096, 4351, 0)]:
            intervals.add(start, end, number)
        return intervals

    kept = build_geodata.coarsen(ranges(), records, 10)  # Reading is 59 km from London
    assert list(zip(kept.starts, kept.ends, kept.records)) == list(zip(*[ranges().starts, ranges().ends,
                                                                         ranges().records]))
    joined, used = build_geodata.compact(build_geodata.coarsen(ranges(), records, 100), records)
    # London, Reading and London again are one range, at London's place (its largest part); Paris is
    # another country, Tokyo too; a range without coordinates is never joined to one with; a gap splits
    assert [(start, end, used[number]) for start, end, number in zip(joined.starts, joined.ends, joined.records)] \
        == [(0, 1023, london), (1024, 1279, paris), (1280, 1535, tokyo), (1536, 1791, records[4]), (4096, 4351, london)]
    assert sorted(used, key=str) == sorted([london, paris, tokyo, records[4]], key=str)  # Reading is gone
