"""The local stage's registry: one SQLite file in WAL mode, the original sample's attribute names."""
from __future__ import annotations

import builtins
import secrets
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

from chalicelib.adapters.registry.items import (
    STAND_IN_ITEM,
    STAND_IN_NAME,
    attributes_json,
    record_from_item,
    revocations_json,
)
from chalicelib.adapters.storage import StorageUnavailable, explain, translated
from chalicelib.domain.clock import timestamp as _timestamp
from chalicelib.domain.errors import (
    ProvisioningInProgress,
    RenewalInProgress,
    RenewalRefused,
    replayed_request,
)
from chalicelib.domain.records import (
    PROVISIONED,
    PROVISIONING,
    UNPROVISIONED,
    Claim,
    ClaimState,
    DeviceRecord,
    DeviceStatus,
    Nonce,
    PendingIssue,
    RenewalState,
    RenewedCertificate,
    Revocation,
)
from chalicelib.domain.refusals import claim_refusal, rekey_refusal

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
    attributes     TEXT,
    claimed_at     REAL,
    -- the write-ahead record of an issuance (registry/base.py PendingIssue)
    pending_region TEXT,
    pending_since  REAL,
    pending_fingerprint TEXT,
    pending_certificate_id TEXT,
    pending_created_thing INTEGER,
    pending_move   INTEGER,
    -- renewal (POST /device-renewal): the current certificate's key and end, the history, what is left to retire
    certificate_public_key TEXT,
    certificate_expires TEXT,
    previous_certificate_id TEXT,
    previous_public_key TEXT,
    previous_region TEXT,
    retire_pending INTEGER,
    renewal_count  INTEGER,
    last_renewal   TEXT,
    renewal_token  TEXT,
    renewal_lease  REAL,
    -- the current certificate's key was made by the service (no CSR): a re-key may replace it in its window
    server_key     INTEGER,
    -- a reset begun and not finished: the certificates it revokes (items.revocations_json)
    reset_pending  TEXT
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
# Renewal's columns, added to a registry made before renewal existed (SQLite adds a column in place).
_RENEWAL_COLUMNS = {"certificate_public_key": "TEXT", "previous_certificate_id": "TEXT", "previous_public_key": "TEXT",
                    "previous_region": "TEXT", "retire_pending": "INTEGER", "renewal_count": "INTEGER",
                    "last_renewal": "TEXT", "renewal_token": "TEXT", "renewal_lease": "REAL",
                    "certificate_expires": "TEXT"}
_PUBLIC_COLUMNS = ("thing_name", "prov_status", "prov_datetime", "aws_region", "certificate_id",
                   "public_key_fingerprint", "public_key", "country", "region_reason", "last_error", "attempts",
                   "attributes", "lease_expires", "certificate_expires", "renewal_count", "last_renewal",
                   "previous_certificate_id", "previous_region", "retire_pending", "renewal_lease", "server_key",
                   "reset_pending")
# Added after the first release: a registry made before them gets them on first open.
_ADDED_COLUMNS = (("claimed_at", "REAL"), ("pending_region", "TEXT"), ("pending_since", "REAL"),
                  ("pending_fingerprint", "TEXT"), ("pending_certificate_id", "TEXT"),
                  ("pending_created_thing", "INTEGER"), *_RENEWAL_COLUMNS.items(), ("pending_move", "INTEGER"),
                  ("server_key", "INTEGER"), ("reset_pending", "TEXT"))
# What renewal_state reads.
_RENEWAL_STATE = ("thing_name", "prov_status", "aws_region", "certificate_id", "certificate_public_key",
                  "public_key_fingerprint", "previous_certificate_id", "previous_public_key", "previous_region",
                  "retire_pending", "renewal_lease", "renewal_count", "last_renewal")
_PENDING = ("pending_region, pending_since, pending_fingerprint, pending_certificate_id, pending_created_thing, "
            "pending_move")
_NO_PENDING = ("pending_region = NULL, pending_since = NULL, pending_fingerprint = NULL, "
               "pending_certificate_id = NULL, pending_created_thing = NULL, pending_move = NULL")
_INTENT = ("pending_region = ?, pending_since = ?, pending_fingerprint = ?, pending_certificate_id = NULL, "
           "pending_created_thing = NULL, pending_move = ?")
# What a claim or a renewal lease changes, read as it was so that `withdraw` can put it back.
_CLAIM_COLUMNS = "prov_status, claim_token, lease_expires, claimed_at, attempts, renewal_token, renewal_lease"
_REGISTER_CHUNK = 5000  # rows per executemany between progress reports, all inside one transaction


class SqliteRegistry:
    def __init__(self, path: Path, on_connect: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self._path = Path(path)
        # chalice local serves each request on its own thread; a sqlite3 connection belongs to one thread.
        self._local = threading.local()
        self._on_connect = on_connect  # tests: e.g. PRAGMA max_page_count, PRAGMA query_only

    @property
    def path(self) -> Path:
        return self._path

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, timeout=10)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; safe with WAL
            db.executescript(_SCHEMA)  # idempotent; a new state directory just works
            _add_columns(db)
            if self._on_connect is not None:
                self._on_connect(db)
            self._local.db = db
        return db

    @translated
    def create(self) -> None:
        self._db()

    @translated
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
            if db.in_transaction:  # not after SQLite ended it itself (SQLITE_FULL): the cause is the error raised
                db.execute("ROLLBACK")
            raise
        return added

    @translated
    def get(self, thing_name: str) -> DeviceRecord | None:
        record = record_from_item(dict(self._row(_PUBLIC_COLUMNS, thing_name)))
        return None if record.thing_name == STAND_IN_NAME else record

    def _row(self, columns: tuple[str, ...], thing_name: str) -> sqlite3.Row:
        """The device's row, else (not registered) the stand-in's (items.STAND_IN_ITEM): one statement run to its end
        (two lookups), one row and the same work after it either way, so that an unknown device costs what a
        registered one does."""
        [row] = self._db().execute(
            f"SELECT {', '.join(columns)} FROM devices WHERE thing_name = ? UNION ALL SELECT "
            f"{', '.join('?' * len(columns))} WHERE NOT EXISTS (SELECT 1 FROM devices WHERE thing_name = ?)",
            (thing_name, *(STAND_IN_ITEM.get(column) for column in columns), thing_name)).fetchall()
        return row

    @translated
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

    @translated
    def claim(self, thing_name: str, now: datetime, lease_seconds: int, fleet_key: bool = False,
              nonce: Nonce | None = None, intent: PendingIssue | None = None) -> Claim:
        token = secrets.token_hex(16)
        at = now.timestamp()
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the nonce, the claim and the write-ahead intent in one commit
        try:
            before = db.execute(f"SELECT {_CLAIM_COLUMNS}, public_key FROM devices WHERE thing_name = ?",
                                (thing_name,)).fetchone()
            own_key = fleet_key and before is not None and before["public_key"] is not None
            # A fleet-key signature does not count for a device with its own key: such a request uses up nothing.
            if nonce is not None and not own_key and not self._remember_nonce(db, thing_name, nonce, at):
                db.execute("ROLLBACK")
                raise replayed_request()
            # The write-ahead record is left as it is: RETURNING hands over what a dead attempt wrote.
            won = db.execute(
                "UPDATE devices SET prov_status = 'provisioning', claim_token = ?, lease_expires = ?, "
                "claimed_at = ?, attempts = COALESCE(attempts, 0) + 1 "
                "WHERE thing_name = ? AND (prov_status = 'unprovisioned' "
                "OR (prov_status = 'provisioning' AND lease_expires < ?)) AND (? = 0 OR public_key IS NULL) "
                f"RETURNING {_PENDING}",
                (token, at + lease_seconds, at, thing_name, at, int(fleet_key))).fetchone()
            written = self._intent_if_none(db, thing_name, "claim_token", token, won, intent)
            db.execute("COMMIT")  # a refused claim still uses up its nonce
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if won is not None:
            return Claim(thing_name, token, None if written else _pending(won), intent=written,
                         restore=dict(before))
        # The write was refused; read only to say why.
        raise claim_refusal(thing_name, self.get(thing_name), fleet_key, now)

    @staticmethod
    def _intent_if_none(db: sqlite3.Connection, thing_name: str, token_column: str, token: str,
                        won: sqlite3.Row | None, intent: PendingIssue | None) -> PendingIssue | None:
        """In the claim's transaction: `intent` becomes the write-ahead record unless a dead attempt left one."""
        if won is None or intent is None or won["pending_region"] is not None:
            return None
        db.execute(f"UPDATE devices SET {_INTENT} WHERE thing_name = ? AND {token_column} = ?",
                   (*_intent_values(intent), thing_name, token))
        return intent

    @translated
    def withdraw(self, claim: Claim) -> None:
        if not claim.restore:  # not a claim of this registry's making: its lease frees it
            return
        columns: tuple[str, ...] = ("renewal_token", "renewal_lease", "claimed_at")
        where = "renewal_token = ? AND prov_status = ?"
        if not claim.renewal:
            columns = ("prov_status", "claim_token", "lease_expires", "claimed_at", "attempts")
            where = "claim_token = ? AND prov_status = ?"
        assignments = ", ".join(f"{column} = ?" for column in columns)
        if claim.intent is not None:  # the claim wrote the write-ahead record: it goes too
            assignments += f", {_NO_PENDING}"
        self._db().execute(f"UPDATE devices SET {assignments} WHERE thing_name = ? AND {where}",
                           (*(claim.restore.get(column) for column in columns), claim.thing_name, claim.token,
                            (PROVISIONED if claim.renewal else PROVISIONING).value))

    @translated
    def finalize(self, claim: Claim, region: str, certificate_id: str, now: datetime,
                 fingerprint: str | None = None, country: str | None = None, reason: str | None = None,
                 public_key: str | None = None, expires: str | None = None, server_key: bool = False) -> None:
        changed = self._db().execute(
            "UPDATE devices SET prov_status = ?, prov_datetime = ?, aws_region = ?, certificate_id = ?, "
            "public_key_fingerprint = ?, country = ?, region_reason = ?, claim_token = NULL, lease_expires = NULL, "
            "certificate_public_key = ?, certificate_expires = ?, server_key = ?, "
            f"last_error = NULL, {_NO_PENDING} WHERE thing_name = ? AND prov_status = ? AND claim_token = ?",
            (PROVISIONED.value, _timestamp(now), region, certificate_id, fingerprint, country, reason, public_key,
             expires, int(server_key) or None, claim.thing_name, PROVISIONING.value, claim.token)).rowcount
        if changed != 1:
            raise ProvisioningInProgress(f"{claim.thing_name}: the claim's lease ran out before provisioning ended")

    @translated
    def release(self, claim: Claim, error: str, keep_pending: bool = False) -> None:
        if claim.renewal:  # the renewal lease: the device stays provisioned with its current certificate
            return self._abandon_renewal(claim, error, keep_pending)
        self._db().execute(
            "UPDATE devices SET prov_status = ?, claim_token = NULL, lease_expires = NULL, last_error = ?"
            + ("" if keep_pending else f", {_NO_PENDING}")
            + " WHERE thing_name = ? AND prov_status = ? AND claim_token = ?",
            (UNPROVISIONED.value, error, claim.thing_name, PROVISIONING.value, claim.token))

    @translated
    def record_intent(self, claim: Claim, pending: PendingIssue) -> None:
        self._holding(claim, _INTENT, _intent_values(pending))

    @translated
    def record_certificate(self, claim: Claim, certificate_id: str, created_thing: bool) -> None:
        self._holding(claim, "pending_certificate_id = ?, pending_created_thing = ?",
                      (certificate_id, int(created_thing)))

    def _holding(self, claim: Claim, assignments: str, values: tuple) -> None:
        """A write that only the holder of `claim` (a provisioning claim or a renewal lease) may make."""
        token, status = ("renewal_token", PROVISIONED) if claim.renewal else ("claim_token", PROVISIONING)
        changed = self._db().execute(
            f"UPDATE devices SET {assignments} WHERE thing_name = ? AND prov_status = ? AND {token} = ?",
            (*values, claim.thing_name, status.value, claim.token)).rowcount
        if changed != 1:
            if claim.renewal:
                raise RenewalInProgress(f"{claim.thing_name}: the renewal's lease ran out before it was recorded")
            raise ProvisioningInProgress(f"{claim.thing_name}: the claim's lease ran out before provisioning ended")

    @translated
    def claims(self, now: datetime) -> builtins.list[ClaimState]:
        # A provisioned device's claim is its renewal lease.
        rows = self._db().execute(
            "SELECT thing_name, prov_status, claimed_at, CASE prov_status WHEN 'provisioned' THEN renewal_lease "
            f"ELSE lease_expires END AS lease, {_PENDING} FROM devices WHERE prov_status = 'provisioning' "
            "OR pending_region IS NOT NULL OR renewal_lease IS NOT NULL ORDER BY thing_name")
        return [ClaimState(row["thing_name"], DeviceStatus(row["prov_status"]), _moment(row["claimed_at"]),
                           _moment(row["lease"]), _pending(row)) for row in rows]

    def check(self) -> None:
        """Raise StorageUnavailable unless the file is whole (quick_check) and a write to it commits. A missing file
        is made, as on any first use."""
        try:
            db = self._db()
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise StorageUnavailable(self._path, "it is damaged (" + "; ".join(problems)[:200] + "); restore it "
                                         "from a backup, or move it away and run `python -m admin init`")
            # A committed write on a fresh connection (one opened before a read-only remount keeps writing), in a
            # table of its own that no list, report or stat reads. A full disk may still take it (WAL reuses its
            # space): health's free-space floor covers that.
            probe = sqlite3.connect(self._path, isolation_level=None, timeout=2)
            try:
                if self._on_connect is not None:
                    self._on_connect(probe)
                probe.execute("CREATE TABLE IF NOT EXISTS health_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL)")
                probe.execute("INSERT OR REPLACE INTO health_probe VALUES (1, ?)", (time.time(),))
            finally:
                probe.close()
        except sqlite3.Error as error:
            self.close()  # a damaged file may be replaced: the next use opens it afresh
            raise explain(self._path, error) from error

    @staticmethod
    def _remember_nonce(db: sqlite3.Connection, thing_name: str, nonce: Nonce, at: float) -> bool:
        if secrets.randbelow(100) == 0:  # now and then, forget nonces whose timestamps are out of the window
            db.execute("DELETE FROM nonces WHERE expires < ?", (at,))
        return db.execute(
            "INSERT INTO nonces VALUES (?, ?, ?) "
            "ON CONFLICT (thing_name, nonce) DO UPDATE SET expires = excluded.expires "
            "WHERE nonces.expires < ?", (thing_name, nonce.value, nonce.expires.timestamp(), at)).rowcount == 1

    @translated
    def stuck(self, now: datetime) -> builtins.list[DeviceRecord]:
        rows = self._db().execute(
            f"SELECT {', '.join(_PUBLIC_COLUMNS)} FROM devices "
            "WHERE prov_status = 'provisioning' AND lease_expires < ? ORDER BY thing_name", (now.timestamp(),))
        return [record_from_item(dict(row)) for row in rows]

    @translated
    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        return self._db().execute(
            "UPDATE devices SET prov_status = 'unprovisioned', claim_token = NULL, lease_expires = NULL, "
            "last_error = 'claim expired; released by audit' "
            "WHERE thing_name = ? AND prov_status = 'provisioning' AND lease_expires < ?",
            (thing_name, now.timestamp())).rowcount == 1

    @translated
    def begin_reset(self, thing_name: str, revocations: Sequence[Revocation]) -> bool:
        return self._db().execute("UPDATE devices SET reset_pending = ? WHERE thing_name = ?",
                                  (revocations_json(revocations), thing_name)).rowcount == 1

    @translated
    def reset(self, thing_name: str, revoked: Collection[str] | None = None) -> DeviceRecord | None:
        condition, ids = "", sorted(set(revoked or ()))
        if revoked is not None:  # nothing the device may still use is left out
            marks = ", ".join("?" * len(ids))
            current = "certificate_id IS NULL" + (f" OR certificate_id IN ({marks})" if ids else "")
            previous = "COALESCE(retire_pending, 0) = 0" + (f" OR previous_certificate_id IN ({marks})" if ids else "")
            condition = f" AND ({current}) AND ({previous})"
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the item returned is the one replaced
        try:
            before = self.get(thing_name)
            changed = db.execute(
                "UPDATE devices SET prov_status = 'unprovisioned', prov_datetime = NULL, aws_region = NULL, "
                "certificate_id = NULL, public_key_fingerprint = NULL, country = NULL, region_reason = NULL, "
                "claim_token = NULL, lease_expires = NULL, "
                "certificate_public_key = NULL, previous_certificate_id = NULL, previous_public_key = NULL, "
                "previous_region = NULL, retire_pending = NULL, renewal_token = NULL, renewal_lease = NULL, "
                "certificate_expires = NULL, server_key = NULL, reset_pending = NULL, "
                "last_error = NULL WHERE thing_name = ?" + condition, (thing_name, *ids, *ids)).rowcount
            db.execute("COMMIT")
        except BaseException:
            # SQLite ends the transaction itself on some faults (SQLITE_FULL): a ROLLBACK then would hide the cause.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return before if changed == 1 else None

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- renewal -------------------------------------------------------------------------------------------

    @translated
    def renewal_state(self, thing_name: str) -> RenewalState | None:
        row = self._row(_RENEWAL_STATE, thing_name)
        state = RenewalState(
            row["thing_name"], row["prov_status"] == PROVISIONED.value, row["aws_region"], row["certificate_id"],
            row["certificate_public_key"], row["public_key_fingerprint"], row["previous_certificate_id"],
            row["previous_public_key"], row["previous_region"], bool(row["retire_pending"]), row["renewal_lease"],
            row["renewal_count"] or 0, row["last_renewal"])
        return None if state.thing_name == STAND_IN_NAME else state

    @translated
    def begin_renewal(self, thing_name: str, certificate_id: str, now: datetime, lease_seconds: int,
                      nonce: Nonce | None = None, intent: PendingIssue | None = None) -> Claim:
        at = now.timestamp()
        claim = self._lease(thing_name, at, lease_seconds, nonce, intent,
                            "prov_status = ? AND certificate_id = ? AND (renewal_lease IS NULL OR renewal_lease < ?) "
                            "AND COALESCE(retire_pending, 0) = 0", (PROVISIONED.value, certificate_id, at))
        if claim is not None:
            return claim
        state = self.renewal_state(thing_name)
        if state is not None and state.certificate_id == certificate_id and state.renewing_until:
            raise RenewalInProgress(f"{thing_name} is being renewed by another request",
                                    retry_after=max(1, min(30, int(state.renewing_until - at) + 1)))
        raise RenewalRefused()

    @translated
    def begin_rekey(self, thing_name: str, now: datetime, lease_seconds: int, window_seconds: int,
                    fleet_key: bool = False, quiet_seconds: int = 0, intent: PendingIssue | None = None) -> Claim:
        at, quiet = now.timestamp(), _timestamp(now - timedelta(seconds=quiet_seconds))
        # prov_datetime and last_renewal are clock.timestamp text: they sort as time does.
        claim = self._lease(thing_name, at, lease_seconds, None, intent,
                            "prov_status = ? AND server_key = 1 AND prov_datetime >= ? AND prov_datetime <= ? "
                            "AND (last_renewal IS NULL OR last_renewal <= ?) "
                            "AND (renewal_lease IS NULL OR renewal_lease < ?) AND COALESCE(retire_pending, 0) = 0 "
                            "AND (? = 0 OR public_key IS NULL)",
                            (PROVISIONED.value, _timestamp(now - timedelta(seconds=window_seconds)), quiet, quiet,
                             at, int(fleet_key)))
        if claim is not None:
            return claim
        raise rekey_refusal(thing_name, self.get(thing_name), fleet_key, now, quiet_seconds)

    def _lease(self, thing_name: str, at: float, lease_seconds: int, nonce: Nonce | None,
               intent: PendingIssue | None, condition: str, values: tuple) -> Claim | None:
        """A renewal lease where `condition` holds, with the nonce and the write-ahead intent, in one commit; None
        when the condition refused it. The write-ahead record is left as it is: RETURNING hands over what a dead
        renewal wrote."""
        token, db = secrets.token_hex(16), self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.execute(f"SELECT {_CLAIM_COLUMNS} FROM devices WHERE thing_name = ?", (thing_name,)).fetchone()
            won = db.execute(
                "UPDATE devices SET renewal_token = ?, renewal_lease = ?, claimed_at = ? WHERE thing_name = ? "
                f"AND {condition} RETURNING {_PENDING}", (token, at + lease_seconds, at, thing_name, *values)
            ).fetchone()
            if won is not None and nonce is not None and not self._remember_nonce(db, thing_name, nonce, at):
                db.execute("ROLLBACK")
                raise replayed_request()
            written = self._intent_if_none(db, thing_name, "renewal_token", token, won, intent)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if won is None:
            return None
        return Claim(thing_name, token, None if written else _pending(won), renewal=True, intent=written,
                     restore=dict(before))

    @translated
    def complete_renewal(self, claim: Claim, renewed: RenewedCertificate, now: datetime) -> None:
        changed = self._db().execute(
            "UPDATE devices SET previous_certificate_id = certificate_id, "
            "previous_public_key = certificate_public_key, "
            "previous_region = aws_region, retire_pending = 1, aws_region = ?, certificate_id = ?, "
            "certificate_public_key = ?, public_key_fingerprint = ?, country = COALESCE(?, country), "
            "certificate_expires = ?, server_key = ?, "
            "region_reason = COALESCE(?, region_reason), renewal_count = COALESCE(renewal_count, 0) + 1, "
            f"last_renewal = ?, renewal_token = NULL, renewal_lease = NULL, last_error = NULL, {_NO_PENDING} "
            "WHERE thing_name = ? AND renewal_token = ? AND prov_status = ?",
            (renewed.region, renewed.certificate_id, renewed.public_key, renewed.fingerprint, renewed.country,
             renewed.expires, int(renewed.server_key) or None, renewed.reason, _timestamp(now), claim.thing_name,
             claim.token, PROVISIONED.value)).rowcount
        if changed != 1:
            raise RenewalInProgress(f"{claim.thing_name}: the renewal's lease ran out before it was recorded")

    @translated
    def _abandon_renewal(self, claim: Claim, error: str, keep_pending: bool) -> None:
        self._db().execute(
            "UPDATE devices SET renewal_token = NULL, renewal_lease = NULL, last_error = ?"
            + ("" if keep_pending else f", {_NO_PENDING}")
            + " WHERE thing_name = ? AND renewal_token = ?", (error, claim.thing_name, claim.token))

    @translated
    def reopen_renewal(self, thing_name: str, certificate_id: str, previous_fingerprint: str, now: datetime) -> bool:
        # SET's right-hand sides read the row as it was: the current certificate moves to the write-ahead record.
        return self._db().execute(
            "UPDATE devices SET pending_region = aws_region, pending_since = ?, "
            "pending_fingerprint = public_key_fingerprint, pending_certificate_id = certificate_id, "
            "pending_created_thing = aws_region IS NOT previous_region, "
            "pending_move = aws_region IS NOT previous_region, "
            "aws_region = previous_region, certificate_id = previous_certificate_id, "
            "certificate_public_key = previous_public_key, public_key_fingerprint = ?, certificate_expires = NULL, "
            "previous_certificate_id = NULL, previous_public_key = NULL, previous_region = NULL, "
            "retire_pending = NULL, "
            "renewal_count = MAX(COALESCE(renewal_count, 1) - 1, 0), last_error = ? "
            "WHERE thing_name = ? AND prov_status = ? AND certificate_id = ? AND COALESCE(retire_pending, 0) = 1 "
            "AND previous_certificate_id IS NOT NULL AND (renewal_lease IS NULL OR renewal_lease < ?)",
            (now.timestamp(), previous_fingerprint, f"renewal to {certificate_id} never answered; reopened",
             thing_name, PROVISIONED.value, certificate_id, now.timestamp())).rowcount == 1

    @translated
    def previous_retired(self, thing_name: str, certificate_id: str) -> None:
        self._db().execute("UPDATE devices SET retire_pending = NULL WHERE thing_name = ? "
                           "AND previous_certificate_id = ?", (thing_name, certificate_id))

    @translated
    def set_public_key(self, thing_name: str, certificate_id: str, public_key: str) -> None:
        self._db().execute("UPDATE devices SET certificate_public_key = ? WHERE thing_name = ? "
                           "AND certificate_id = ?", (public_key, thing_name, certificate_id))


def _add_columns(db: sqlite3.Connection) -> None:
    have = {row[1] for row in db.execute("PRAGMA table_info(devices)")}
    for column, kind in _ADDED_COLUMNS:
        if column not in have:
            try:
                db.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as exc:  # another connection added it meanwhile
                if "duplicate column" not in str(exc):
                    raise


def _moment(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


def _intent_values(pending: PendingIssue) -> tuple:
    return pending.region, pending.since.timestamp(), pending.fingerprint, int(pending.move)


def _pending(row: sqlite3.Row) -> PendingIssue | None:
    if row["pending_region"] is None:
        return None
    created = row["pending_created_thing"]
    return PendingIssue(row["pending_region"], datetime.fromtimestamp(row["pending_since"], timezone.utc),
                        row["pending_fingerprint"], row["pending_certificate_id"],
                        None if created is None else bool(created), bool(row["pending_move"]))
