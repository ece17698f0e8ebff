"""A child process for tests/test_storage_faults.py: `admin reset` on a disk that fills up while it revokes.

    unshare -m python -m tests.full_disk_child DIR

In its own mount namespace (so nothing outside sees it) it mounts a 1 MiB tmpfs on DIR (an empty directory) as a
local stage's state directory, provisions dev1 there, and runs `admin reset dev1` with an issuer that, once it has revoked, fills the
disk to the last byte (another process filling it, at the worst moment). Then it frees the space and runs the
reset again. It prints one JSON object: each run's exit code and stderr, and the record and certificate after each.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from admin import cli as admin
from chalicelib.adapters.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import Settings
from chalicelib.container import Container
from chalicelib.domain.clock import utcnow
from tests.conftest import make_csr


class FillsTheDisk:
    """The stage's issuer; its revoke, once done, fills the file system of `filler` until it refuses a byte."""

    def __init__(self, inner: LocalIssuer, filler: Path) -> None:
        self._inner, self._filler = inner, filler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def revoke(self, certificate: Any, *, delete_thing: bool) -> None:
        self._inner.revoke(certificate, delete_thing=delete_thing)
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT)
        try:
            for size in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)


def reset(state: Path, parts: Container | None = None) -> dict[str, Any]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = admin.main(["--state-dir", str(state), "reset", "dev1"], parts)
    return {"code": code, "stderr": err.getvalue()}


def main() -> None:
    state = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)], check=True)
    os.environ["GIP_STATE_DIR"] = str(state)
    settings = Settings.for_stage("local", str(state))
    endpoints = local_endpoints(["eu-west-2"], "localhost", 18883)
    registry, issuer = SqliteRegistry(settings.registry_path), LocalIssuer(settings.ca_dir, endpoints)
    registry.register(["dev1"])
    claim = registry.claim("dev1", utcnow(), 300)
    issued = issuer.issue("dev1", "eu-west-2", x509.load_pem_x509_csr(make_csr("dev1")[0].encode()))
    registry.finalize(claim, "eu-west-2", issued.certificate_id, utcnow())

    def seen() -> dict[str, Any]:
        record = SqliteRegistry(settings.registry_path).get("dev1")
        cert = issuer.certificate(issued.certificate_id)
        return {"status": record.status.value if record else None,
                "reset_pending": [r.certificate_id for r in record.reset_pending] if record else None,
                "certificate": issued.certificate_id, "certificate_status": cert.status if cert else None}

    filler = state / "filler"
    first = reset(state, Container(settings, registry=SqliteRegistry(settings.registry_path),
                                   issuer=FillsTheDisk(LocalIssuer(settings.ca_dir, endpoints), filler)))
    first.update(seen())
    filler.unlink()
    second = reset(state)
    second.update(seen())
    print(json.dumps({"first": first, "second": second}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
