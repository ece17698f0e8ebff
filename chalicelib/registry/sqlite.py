"""The local stage's registry: one SQLite file in WAL mode, the original sample's attribute names."""
from __future__ import annotations

import builtins
import secrets
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from chalicelib.clock import timestamp as _timestamp
from chalicelib.errors import ProvisioningInProgress, replayed_request
from chalicelib.registry.base import (
    PROVISIONED,
    PROVISIONING,
    UNPROVISIONED,
    Claim,
    DeviceRecord,
    DeviceStatus,
    Nonce,
    attributes_json,
    claim_refusal,
    record_from_item,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    thing_name     TEXT PRIMARY KEY,
    prov_status    TEXT NOT NULL DEFAULT 'unprovisioned'
                   CHECK (prov_status IN ('unprovisioned', 'provisioning', 'provisioned')),
    prov_datetime  TEXT,
    aws_region     TEXT,
    certificate_id TEXT,
    public_key_fingerprint TEXT,
    public_key     TEXT,
    country        TEXT,
    region_reason  TEXT,
    claim_token    TEXT,
    lease_expires  REAL,
    last_error     TEXT,
    attempts       INTEGER,
    attributes     TEXT
) WITHOUT ROWID;
-- No index on prov_status: it would double the cost of every claim and finalize, and only operator
-- commands (list, stats, audit) filter on it, where a scan of even a million rows is quick enough.
CREATE TABLE IF NOT EXISTS nonces (
    thing_name TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires    REAL NOT NULL,
    PRIMARY KEY (thing_name, nonce)
) WITHOUT ROWID;
"""
_PUBLIC_COLUMNS = ("thing_name", "prov_status", "prov_datetime", "aws_region", "certificate_id",
                   "public_key_fingerprint", "public_key", "country", "region_reason", "last_error", "attempts",
                   "attributes", "lease_expires")
_REGISTER_CHUNK = 5000  # rows per executemany between progress reports, all inside one transaction


class SqliteRegistry:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        # chalice local serves each request on its own thread; a sqlite3 connection belongs to one thread.
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, timeout=10)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; safe with WAL
            db.executescript(_SCHEMA)  # idempotent; a new state directory just works
            self._local.db = db
        return db

    def create(self) -> None:
        self._db()

    def register(self, thing_names: Iterable[str], public_keys: Mapping[str, str] | None = None,
                 attributes: Mapping[str, Mapping[str, str]] | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
        keys, attrs = public_keys or {}, attributes or {}
        names = list(dict.fromkeys(thing_names))
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            for start in range(0, len(names), _REGISTER_CHUNK):
                db.executemany("INSERT OR IGNORE INTO devices (thing_name, public_key, attributes) VALUES (?, ?, ?)",
                               ((name, keys.get(name), attributes_json(attrs.get(name)))
                                for name in names[start:start + _REGISTER_CHUNK]))
                if progress:
                    progress(min(start + _REGISTER_CHUNK, len(names)))
            added = db.total_changes - before
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return added

    def get(self, thing_name: str) -> DeviceRecord | None:
        row = self._db().execute(
            f"SELECT {', '.join(_PUBLIC_COLUMNS)} FROM devices WHERE thing_name = ?", (thing_name,)).fetchone()
        return record_from_item(dict(row)) if row else None

    def list(self, status: DeviceStatus | None = None, region: str | None = None,
             since: datetime | None = None) -> Iterator[DeviceRecord]:
        where = [(column, value) for column, value in (("prov_status = ?", status and DeviceStatus(status).value),
                                                       ("aws_region = ?", region),
                                                       ("prov_datetime >= ?", since and _timestamp(since))) if value]
        query = f"SELECT {', '.join(_PUBLIC_COLUMNS)} FROM devices"
        if where:
            query += " WHERE " + " AND ".join(column for column, _ in where)
        for row in self._db().execute(query + " ORDER BY thing_name", [value for _, value in where]):
            yield record_from_item(dict(row))

    def claim(self, thing_name: str, now: datetime, lease_seconds: int, fleet_key: bool = False,
              nonce: Nonce | None = None) -> Claim:
        token = secrets.token_hex(16)
        at = now.timestamp()
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the nonce and the claim in one commit
        try:
            if nonce is not None and not self._remember_nonce(db, thing_name, nonce, at):
                db.execute("ROLLBACK")
                raise replayed_request()
            changed = db.execute(
                "UPDATE devices SET prov_status = 'provisioning', claim_token = ?, lease_expires = ?, "
                "attempts = COALESCE(attempts, 0) + 1 "
                "WHERE thing_name = ? AND (prov_status = 'unprovisioned' "
                "OR (prov_status = 'provisioning' AND lease_expires < ?)) AND (? = 0 OR public_key IS NULL)",
                (token, at + lease_seconds, thing_name, at, int(fleet_key))).rowcount
            db.execute("COMMIT")  # a refused claim still uses up its nonce
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if changed == 1:
            return Claim(thing_name, token)
        # The write was refused; read only to say why.
        raise claim_refusal(thing_name, self.get(thing_name), fleet_key)

    def finalize(self, claim: Claim, region: str, certificate_id: str, now: datetime,
                 fingerprint: str | None = None, country: str | None = None, reason: str | None = None) -> None:
        changed = self._db().execute(
            "UPDATE devices SET prov_status = ?, prov_datetime = ?, aws_region = ?, certificate_id = ?, "
            "public_key_fingerprint = ?, country = ?, region_reason = ?, claim_token = NULL, lease_expires = NULL, "
            "last_error = NULL WHERE thing_name = ? AND prov_status = ? AND claim_token = ?",
            (PROVISIONED.value, _timestamp(now), region, certificate_id, fingerprint, country, reason,
             claim.thing_name, PROVISIONING.value, claim.token)).rowcount
        if changed != 1:
            raise ProvisioningInProgress(f"{claim.thing_name}: the claim's lease ran out before provisioning ended")

    def release(self, claim: Claim, error: str) -> None:
        self._db().execute(
            "UPDATE devices SET prov_status = ?, claim_token = NULL, lease_expires = NULL, last_error = ? "
            "WHERE thing_name = ? AND prov_status = ? AND claim_token = ?",
            (UNPROVISIONED.value, error, claim.thing_name, PROVISIONING.value, claim.token))

    @staticmethod
    def _remember_nonce(db: sqlite3.Connection, thing_name: str, nonce: Nonce, at: float) -> bool:
        if secrets.randbelow(100) == 0:  # now and then, forget nonces whose timestamps are out of the window
            db.execute("DELETE FROM nonces WHERE expires < ?", (at,))
        return db.execute(
            "INSERT INTO nonces VALUES (?, ?, ?) "
            "ON CONFLICT (thing_name, nonce) DO UPDATE SET expires = excluded.expires "
            "WHERE nonces.expires < ?", (thing_name, nonce.value, nonce.expires.timestamp(), at)).rowcount == 1

    def stuck(self, now: datetime) -> builtins.list[DeviceRecord]:
        rows = self._db().execute(
            f"SELECT {', '.join(_PUBLIC_COLUMNS)} FROM devices "
            "WHERE prov_status = 'provisioning' AND lease_expires < ? ORDER BY thing_name", (now.timestamp(),))
        return [record_from_item(dict(row)) for row in rows]

    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        return self._db().execute(
            "UPDATE devices SET prov_status = 'unprovisioned', claim_token = NULL, lease_expires = NULL, "
            "last_error = 'claim expired; released by audit' "
            "WHERE thing_name = ? AND prov_status = 'provisioning' AND lease_expires < ?",
            (thing_name, now.timestamp())).rowcount == 1

    def reset(self, thing_name: str) -> DeviceRecord | None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the item returned is the one replaced
        try:
            before = self.get(thing_name)
            db.execute(
                "UPDATE devices SET prov_status = 'unprovisioned', prov_datetime = NULL, aws_region = NULL, "
                "certificate_id = NULL, public_key_fingerprint = NULL, country = NULL, region_reason = NULL, "
                "claim_token = NULL, lease_expires = NULL, "
                "last_error = NULL WHERE thing_name = ?", (thing_name,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return before

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

