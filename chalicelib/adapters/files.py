"""Files the service and its tools write: private keys readable by their owner only."""
import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only when the file is new
    with os.fdopen(fd, "wb") as out:
        out.write(data)
