"""Real storage faults for the tests (they run as root, where a file's mode stops nothing): a small tmpfs filled to
its last block and emptied again, and a file made read-only by a read-only bind mount over it. Skips where mounting
is not allowed."""
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def tmpfs(where: Path, size: str = "16m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        remount(where, "rw")
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)  # still open somewhere: detach it now


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True, capture_output=True)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (a file nobody has open for writing) cannot be written while inside: the file itself, bound over itself
    read-only; its directory stays writable."""
    bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True, check=False)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {bound.stderr.strip()}")
    try:
        remount(path, "bind,ro")
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(where: Path) -> Path:
    """Writes one file until the file system has no block left (ENOSPC); returns it (unlink it to free the space)."""
    filler = where / "filler"
    chunk = b"\0" * 2**16
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError:
            pass
    for size in (4096, 512, 1):  # the last partial chunk's worth
        try:
            with open(filler, "ab", buffering=0) as out:
                while True:
                    out.write(b"\0" * size)
        except OSError:
            pass
    assert os.statvfs(where).f_bavail == 0
    return filler
