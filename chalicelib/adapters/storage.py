"""Storage faults, answered (issue 16): a full disk, a read-only file or file system, a damaged or missing file.

SQLite's errors become one domain error that names the file and what to do, for the operator (CLI, logs); a
device gets a 503 with Retry-After and a message without server paths (app.py).
"""
from __future__ import annotations

import functools
import inspect
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from chalicelib.domain.errors import ServiceUnavailable

F = TypeVar("F", bound=Callable[..., Any])

# SQLite's message (lower case) -> what it means and what the operator does about it.
_CAUSES = (
    ("disk is full", "the disk is full (SQLITE_FULL); free space on its file system"),
    ("readonly", "it cannot be written (read-only); check the file system's mount and the file's permissions"),
    ("read-only", "it cannot be written (read-only); check the file system's mount and the file's permissions"),
    ("not a database", "it is damaged (not a database); restore it from a backup, or move it away and run "
                       "`python -m admin init`"),
    ("malformed", "it is damaged (malformed); restore it from a backup, or move it away and run "
                  "`python -m admin init`"),
    ("unable to open", "it cannot be opened; check that its directory exists and can be written"),
    ("disk i/o error", "the disk failed to read or write it (I/O error); check the file system"),
    ("locked", "it is locked by another process for too long; try again"),
)
DEVICE_MESSAGE = "the service's storage is unavailable; try again later"


class StorageUnavailable(ServiceUnavailable):
    """A store (the registry, the local CA's records) cannot be used; `message` names the file and the cure
    (operators only)."""

    code = "storage-unavailable"

    def __init__(self, path: Path, cause: str, store: str = "registry"):
        super().__init__(f"{store} {path}: {cause}", retry_after=30)
        self.path = path
        self.cause = cause


def explain(path: Path, error: sqlite3.Error, store: str = "registry") -> StorageUnavailable:
    text = str(error).lower()
    cause = next((meaning for needle, meaning in _CAUSES if needle in text), f"SQLite failed: {error}")
    return StorageUnavailable(path, cause, store)


def translated(method: F) -> F:
    """Storage errors of a SQLite-backed method (or generator) become StorageUnavailable; constraint failures
    (IntegrityError: a refused write, a trigger) stay what they are."""
    def translate(self: Any, error: sqlite3.Error) -> Exception:
        if isinstance(error, sqlite3.IntegrityError):
            return error
        return explain(self.path, error)

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def generator(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                yield from method(self, *args, **kwargs)
            except sqlite3.Error as error:
                raised = translate(self, error)
                if raised is error:
                    raise
                raise raised from error
        return generator  # type: ignore[return-value]

    @functools.wraps(method)
    def plain(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as error:
            raised = translate(self, error)
            if raised is error:
                raise
            raise raised from error
    return plain  # type: ignore[return-value]
