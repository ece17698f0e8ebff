"""`admin reset` and `admin audit --fix` are all or nothing from the operator's view (issue 26, item 4), on both
backends: the reset's intent is recorded first, so a reset stopped by a storage fault or a crash is listed by the
audit and finished by the next reset or `audit --fix`, and the message names the real cause and what was done.

Real faults only: SQLite's own (PRAGMA query_only: a read-only registry; PRAGMA max_page_count: a full one) on
the registry's connections, a lock held on the CA records and `kill -9` of the CLI; on DynamoDB, a botocore hook
failing the one UpdateItem. The CLI is given the container with that registry (`admin.main(argv, parts)`).
"""
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager

import pytest

from admin import cli as admin
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import PROJECT_DIR
from chalicelib.container import Container
from chalicelib.domain.certificates import CertificateRef
from tests import test_exactly_once
from tests.conftest import LONDON_IP, make_csr
from tests.test_exactly_once import aws_error

backend = test_exactly_once.backend  # SQLite + local CA; DynamoDB + AWS IoT under moto


def provisioned(b, thing: str = "dev-1") -> str:
    answer = b.service().provision(b.request(thing, make_csr(thing)[0]), LONDON_IP)
    return answer.issued.certificate_id


def run(b, capsys, *argv: str, parts=None) -> tuple[int, str, str]:
    capsys.readouterr()
    code = admin.main([*b.cli_prefix, *argv], parts)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@contextmanager
def faulty(b, write: str):
    """The stage's parts, except that the registry's `write` fails for real: 'intent' (the reset's first write),
    'reset' (its last). Yields (parts, how the cause reads)."""
    if b.name == "local":
        path = b.settings.registry_path
        if write == "intent":  # a read-only registry: nothing can be written
            yield Container(b.settings, registry=SqliteRegistry(path, lambda db: db.execute("PRAGMA query_only = ON"))), \
                "it cannot be written (read-only)"
            return
        # A full registry: no page more than it has; the reset's last write needs room (as a device's row moved
        # onto a new page would), the trigger's, which the intent does not.
        with closing(sqlite3.connect(path)) as db:
            db.executescript("CREATE TABLE ballast (x); CREATE TRIGGER reset_needs_room AFTER UPDATE OF reset_pending "
                             "ON devices WHEN OLD.reset_pending IS NOT NULL AND NEW.reset_pending IS NULL "
                             "BEGIN INSERT INTO ballast VALUES (zeroblob(100000)); END;")

        def full(db):
            db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0] + 1}")
        try:
            yield Container(b.settings, registry=SqliteRegistry(path, full)), "the disk is full (SQLITE_FULL)"
        finally:
            with closing(sqlite3.connect(path)) as db:
                db.executescript("DROP TRIGGER reset_needs_room; DROP TABLE ballast;")
        return
    client = b.parts.aws.client("dynamodb")  # the registry's, in the parts the CLI is given

    def hook(params, **_):
        update = params.get("UpdateExpression", "")
        if "#reset" in params.get("ExpressionAttributeNames", {}) and update.startswith(
                "SET #reset" if write == "intent" else "SET #status"):
            raise aws_error("UpdateItem", "InternalServerError", 500)
    client.meta.events.register("provide-client-params.dynamodb.UpdateItem", hook)
    try:
        yield b.parts, "DynamoDB update_item failed with InternalServerError"
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.UpdateItem", hook)


def test_a_reset_stopped_before_its_intent_is_recorded_changes_nothing_and_says_why(backend, capsys):
    b = backend
    certificate = provisioned(b)
    with faulty(b, "intent") as (parts, cause):
        code, out, err = run(b, capsys, "reset", "dev-1", parts=parts)
    assert code == 1 and out == ""
    [line] = err.splitlines()
    assert line.startswith("error: reset of dev-1 stopped: nothing changed: ") and cause in line
    assert line.endswith("run `python -m admin reset dev-1` again")
    assert b.active_certificates("dev-1") == {("eu-west-2", certificate)}
    record = b.registry.get("dev-1")
    assert record.status == "provisioned" and record.reset_pending == ()


@pytest.mark.parametrize("finisher", ["reset", "audit --fix"])
def test_a_reset_stopped_after_revoking_says_what_was_done_and_the_next_reset_or_the_audit_finishes_it(
        backend, capsys, finisher):
    b = backend
    certificate = provisioned(b)
    with faulty(b, "reset") as (parts, cause):
        code, out, err = run(b, capsys, "reset", "dev-1", parts=parts)
    assert code == 1 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"error: reset of dev-1 stopped: certificate {certificate} in eu-west-2 revoked, "
                           "registry not updated (the reset is recorded as pending): ")
    assert cause in line and "cannot rollback" not in line  # the real cause, not a failed ROLLBACK's
    assert "run `python -m admin reset dev-1` again; `python -m admin audit` lists it meanwhile" in line
    assert b.active_certificates("dev-1") == set()  # the revocation stands: no working credential is left
    record = b.registry.get("dev-1")
    assert record.status == "provisioned" and [r.certificate_id for r in record.reset_pending] == [certificate]

    code, out, _ = run(b, capsys, "audit")
    assert code == 1 and f"unfinished reset: dev-1 is still provisioned; its reset revokes {certificate}" in out
    assert "missing certificate" not in out and "1 finding(s)" in out  # reported once, as the reset it is

    code, out, _ = run(b, capsys, *(["reset", "dev-1"] if finisher == "reset" else ["audit", "--fix"]))
    assert code == 0
    if finisher == "reset":
        assert "finishing a reset begun earlier" in out and "provisioned -> unprovisioned" in out
    else:
        assert "fixed: finished the reset of dev-1: unprovisioned" in out
    record = b.registry.get("dev-1")
    assert record.status == "unprovisioned" and record.certificate_id is None and record.reset_pending == ()
    assert run(b, capsys, "audit")[0] == 0
    assert provisioned(b) != certificate  # it provisions again


def test_audit_fix_resets_a_device_whose_certificate_is_gone_all_or_nothing_too(backend, capsys):
    b = backend
    certificate, other = provisioned(b), provisioned(b, "dev-2")
    for thing, cert in (("dev-1", certificate), ("dev-2", other)):  # revoked out of band (an operator, the console)
        if b.name == "local":
            b.issuer.revoke(CertificateRef("eu-west-2", cert, thing), delete_thing=False)
        else:
            b.look["eu-west-2"].update_certificate(certificateId=cert, newStatus="REVOKED")
    with faulty(b, "reset") as (parts, cause):
        code, out, _ = run(b, capsys, "audit", "--fix", parts=parts)
    assert code == 1
    not_fixed = [line for line in out.splitlines() if line.startswith("not fixed:")]
    assert len(not_fixed) == 2 and all(cause in line for line in not_fixed)
    assert not_fixed[0].startswith(f"not fixed: reset of dev-1 stopped: certificate {certificate} in eu-west-2 "
                                   "revoked, registry not updated")
    assert not_fixed[0].endswith("run `python -m admin audit --fix` again; `python -m admin audit` lists it meanwhile")
    code, out, _ = run(b, capsys, "audit")
    assert code == 1 and out.count("unfinished reset:") == 2
    code, out, _ = run(b, capsys, "audit", "--fix")
    assert code == 0 and "2 finding(s), 2 fixed" in out
    assert [b.registry.get(t).status for t in ("dev-1", "dev-2")] == ["unprovisioned", "unprovisioned"]
    assert run(b, capsys, "audit")[0] == 0


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_reset_killed_after_recording_its_intent_is_finished_by_the_next_one(backend, capsys):
    """kill -9 of `admin reset` while it waits to revoke (the CA records locked by another writer)."""
    b = backend
    certificate = provisioned(b)
    with closing(sqlite3.connect(b.settings.ca_dir / "certificates.sqlite3", isolation_level=None)) as ca:
        ca.execute("BEGIN IMMEDIATE")  # the CLI's revocation waits for this lock (its busy timeout is 10 s)
        cli = subprocess.Popen([sys.executable, "-m", "admin", *b.cli_prefix, "reset", "dev-1"], cwd=PROJECT_DIR,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 8
            while not b.registry.get("dev-1").reset_pending and time.monotonic() < deadline:
                time.sleep(0.05)
            cli.kill()
        finally:
            cli.wait(timeout=10)
            ca.execute("ROLLBACK")
    assert cli.returncode == -9
    record = b.registry.get("dev-1")
    assert record.status == "provisioned" and [r.certificate_id for r in record.reset_pending] == [certificate]
    assert b.active_certificates("dev-1") == {("eu-west-2", certificate)}  # killed before it revoked
    code, out, _ = run(b, capsys, "reset", "dev-1")
    assert code == 0 and f"revoked certificate {certificate} in eu-west-2" in out
    assert b.active_certificates("dev-1") == set() and b.registry.get("dev-1").status == "unprovisioned"
    assert run(b, capsys, "audit")[0] == 0
