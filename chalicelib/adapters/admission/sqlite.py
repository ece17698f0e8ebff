"""The local stage's admission schedule: one row per region in the registry's SQLite file, one statement each."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from chalicelib.domain.admission import Ticket

_SCHEMA = """
CREATE TABLE IF NOT EXISTS admission (
    region     TEXT PRIMARY KEY,
    tat        REAL NOT NULL,            -- when the next admitted request is due (GCRA)
    horizon    REAL NOT NULL DEFAULT 0,  -- the last slot promised to a refused request
    slow_until REAL NOT NULL DEFAULT 0,
    admitted   INTEGER NOT NULL DEFAULT 1  -- what the last statement decided, for RETURNING
) WITHOUT ROWID;
"""
# SET expressions all read the row as it was, so the decision and both moves happen in one statement.
_SCHEDULE = """
INSERT INTO admission (region, tat) VALUES (:region, :now + :interval)
ON CONFLICT (region) DO UPDATE SET
    tat = CASE WHEN tat <= :now + :tolerance THEN max(tat, :now) + :interval ELSE tat END,
    horizon = CASE WHEN tat <= :now + :tolerance THEN horizon ELSE max(horizon, tat) + :interval END,
    admitted = tat <= :now + :tolerance
RETURNING admitted, horizon, slow_until
"""
_CHARGE = """
INSERT INTO admission (region, tat, slow_until) VALUES (:region, :now + :seconds, :slow_until)
ON CONFLICT (region) DO UPDATE SET tat = max(tat, :now) + :seconds, slow_until = max(slow_until, :slow_until)
"""


class SqliteAdmissionStore:
    def __init__(self, path: Path):
        self._path = Path(path)
        self._local = threading.local()  # a sqlite3 connection belongs to one thread

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, timeout=10)
            try:
                db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:  # another connection is making the new file WAL now (the mode is the
                pass                          # file's, and the registry made it WAL first anyway); no busy wait here
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._local.db = db
        return db

    def schedule(self, region: str, now: float, interval: float, tolerance: float) -> Ticket:
        admitted, horizon, slow_until = self._db().execute(
            _SCHEDULE, {"region": region, "now": now, "interval": interval, "tolerance": tolerance}).fetchone()
        return Ticket(bool(admitted), max(0.0, horizon - now), slow_until)

    def charge(self, region: str, now: float, seconds: float, slow_until: float | None = None) -> None:
        self._db().execute(_CHARGE, {"region": region, "now": now, "seconds": seconds,
                                     "slow_until": slow_until or 0.0})
