"""Storage faults answered, not swallowed (issue 16), made with methods that work as root and without mounting:
SQLite's `PRAGMA max_page_count` (a real SQLITE_FULL), `PRAGMA query_only` (a real SQLITE_READONLY), a file
overwritten with garbage (a real "file is not a database"), and /dev/full as chalice local's log (a real ENOSPC).

Every request gets an HTTP answer: 503 with Retry-After and the design's error body; nothing is half-written; the
operator CLI answers with one line naming the file and what to do, never a traceback.
"""
import gc
import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import replace

import pytest
import requests

from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.config import PROJECT_DIR, Settings
from chalicelib.container import Container
from devstack.stack import free_port
from tests.conftest import LONDON_IP, api, make_csr, needs_tool
from tests.tmpfs import fill, read_only, tmpfs

BODY_KEYS = {"status", "code", "message"}


def with_registry(on_connect, lease_seconds: int | None = None) -> Container:
    """The stage's container, except that its registry's connections are opened with `on_connect`."""
    config = Settings.from_env()
    if lease_seconds is not None:
        config = replace(config, claim_lease_seconds=lease_seconds)
    return Container(config, registry=SqliteRegistry(config.registry_path, on_connect))


def post(client, body: dict):
    response = client.http.post("/device-provisioning", body=json.dumps(body),
                                headers={"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP})
    return response, json.loads(response.body)


def certificates(stage) -> list:
    path = stage.state_dir / "ca" / "certificates.sqlite3"
    if not path.exists():
        return []
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT thing_name, status FROM certificates").fetchall()


def assert_storage_503(response, answer) -> None:
    assert response.status_code == 503, answer
    assert set(answer) == BODY_KEYS and answer["code"] == "storage-unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert "/" not in answer["message"]  # no server path to a device


def full_at(stage, note: int) -> Container:
    """The stage's container over a registry that cannot grow by a page, with device big1 registered with a `note`
    of that many bytes: the row grows onto a new page (and the write fails with SQLITE_FULL) once what a request
    writes on it takes it over SQLite's overflow threshold. Each column the table gains moves it by a byte."""
    SqliteRegistry(stage.state_dir / "registry.sqlite3").register(["big1"], attributes={"big1": {"note": "x" * note}})
    with closing(sqlite3.connect(stage.state_dir / "registry.sqlite3")) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    return with_registry(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"), 1)


def test_a_full_database_answers_503_and_leaves_nothing_half_written(stage):
    # Over the threshold with the claim and its write-ahead record (~130 bytes, one transaction).
    parts = full_at(stage, 860)
    before = SqliteRegistry(stage.state_dir / "registry.sqlite3").get("big1")
    csr_pem = make_csr("big1")[0]
    with api("local", parts) as client:
        response, answer = post(client, stage.body("big1", csr_pem))
        assert_storage_503(response, answer)
        # The claim and its write-ahead record could not be written: nothing was issued, nothing changed.
        assert certificates(stage) == []
        assert SqliteRegistry(stage.state_dir / "registry.sqlite3").get("big1") == before
    with api("local") as client:  # with room again
        response, answer = post(client, stage.body("big1", csr_pem))
    assert response.status_code == 200, answer
    assert certificates(stage) == [("big1", "ACTIVE")]


def test_a_database_full_at_the_commit_revokes_what_was_issued_and_the_lease_frees_the_claim(stage):
    # Under the threshold with the claim and its write-ahead record, over it with the commit's (the certificate, its
    # key), and with the rollback's last_error too.
    csr_pem = make_csr("big1")[0]
    with api("local", full_at(stage, 790)) as client:
        response, answer = post(client, stage.body("big1", csr_pem))
        assert_storage_503(response, answer)
        # The commit could not be written: the certificate issued is revoked; nor could the release (it writes
        # last_error): the claim, with its write-ahead record, is freed by its lease.
        assert certificates(stage) == [("big1", "REVOKED")]
        assert SqliteRegistry(stage.state_dir / "registry.sqlite3").get("big1").status == "provisioning"
        time.sleep(1.1)
    with api("local") as client:  # with room again: the next request settles the record, then provisions
        response, answer = post(client, stage.body("big1", csr_pem))
    assert response.status_code == 200, answer
    assert sorted(certificates(stage)) == [("big1", "ACTIVE"), ("big1", "REVOKED")]


def test_a_read_only_registry_answers_503_to_devices_and_health_names_it(stage):
    with api("local", with_registry(lambda db: db.execute("PRAGMA query_only = ON"))) as client:
        response, answer = post(client, stage.body("mydevice1"))
        assert_storage_503(response, answer)
        health = client.http.get("/health")
    status = json.loads(health.body)
    assert health.status_code == 503 and int(health.headers["Retry-After"]) > 0
    assert status["code"] == "unhealthy" and "registry: it cannot be written (read-only)" in status["message"]
    assert status["checks"]["registry"]["status"] == "failing"
    assert {part: check["status"] for part, check in status["checks"].items() if part != "registry"} == {
        "issuer": "ok", "geolocation": "ok", "fleet_key": "ok", "free_space": "ok"}
    assert SqliteRegistry(stage.state_dir / "registry.sqlite3").get("mydevice1").status == "unprovisioned"
    assert certificates(stage) == []


def test_a_corrupt_registry_answers_503_everywhere_and_the_cli_says_what_to_do(stage, capsys):
    path = stage.state_dir / "registry.sqlite3"
    gc.collect()  # the CLI's connections close now, not later over our garbage (closing checkpoints the WAL)
    for leftover in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    path.write_bytes(b"this is not a database " * 500)
    with api("local") as client:
        response, answer = post(client, stage.body("mydevice1"))
        assert_storage_503(response, answer)
        health = client.http.get("/health")
    assert health.status_code == 503
    assert "registry: it is damaged" in json.loads(health.body)["message"]

    for command in (["list"], ["show", "mydevice1"], ["stats"], ["audit"], ["init"], ["register", "x1"]):
        capsys.readouterr()
        assert stage.admin(*command) == 1, command
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err
        [line] = err.splitlines()
        assert line == (f"error: registry {path}: it is damaged (not a database); restore it from a backup, or "
                        "move it away and run `python -m admin init`"), command


def test_the_cli_says_how_to_make_a_missing_registry(stage, capsys):
    path = stage.state_dir / "registry.sqlite3"
    path.unlink()
    for command in (["list"], ["audit"], ["show", "mydevice1"]):
        capsys.readouterr()
        assert stage.admin(*command) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: no registry at {path}") and "`init`" in line
    assert not path.exists()  # reading made nothing


def test_admin_init_checks_an_existing_file_instead_of_calling_it_ready(stage, capsys):
    capsys.readouterr()
    assert stage.admin("init") == 0
    assert "registry ready" in capsys.readouterr().out
    path = stage.state_dir / "registry.sqlite3"
    with closing(sqlite3.connect(path)) as db:  # damage one page of the table, keep the header valid
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    raw = bytearray(path.read_bytes())
    raw[page_size + 8: page_size * 2 - 8] = b"\xff" * (page_size - 16)
    path.write_bytes(bytes(raw))
    assert stage.admin("init") == 1
    out, err = capsys.readouterr()
    assert "registry ready" not in out and "it is damaged" in err and "Traceback" not in err


def test_list_into_head_exits_quietly(stage):
    assert stage.admin("register", "--prefix", "many", "--count", "3000") == 0
    listing = subprocess.Popen([sys.executable, "-m", "admin", "--state-dir", str(stage.state_dir),
                                "list"], cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = listing.stdout.readline()
    listing.stdout.close()  # what `head -1` does after its line
    _, err = listing.communicate(timeout=60)
    assert first.startswith(b"thing_name")
    assert listing.returncode == 0 and err == b""


def test_a_full_disk_under_chalice_locals_log_still_answers_every_request(stage):
    """stdout and stderr of `chalice local` (the access log, the app's log lines and metrics) on /dev/full."""
    port = free_port()
    with open("/dev/full", "w") as full:
        server = subprocess.Popen([sys.executable, str(PROJECT_DIR / "devstack" / "chalice_local.py"), "local",
                                   "--stage", "local", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-autoreload"], cwd=PROJECT_DIR, stdout=full, stderr=full,
                                  env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None
            try:
                health = requests.get(f"{url}/health", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        answers = [requests.post(f"{url}/device-provisioning", json=stage.body(f"mydevice{i}", make_csr(
            f"mydevice{i}")[0]), headers={"X-Forwarded-For": LONDON_IP}, timeout=30) for i in (1, 2)]
        answers.append(requests.post(f"{url}/device-provisioning", data=b"{not json", timeout=30))
        assert [a.status_code for a in answers] == [200, 200, 400], [a.text for a in answers]
        assert server.poll() is None  # nothing died
    finally:
        server.kill()
        server.wait(10)


@pytest.fixture
def small_state(tmp_path):
    """The stage's state directory on a 16 MB tmpfs (mounted before the `stage` fixture writes into it)."""
    with tmpfs(tmp_path / "state", "16m") as where:
        yield where


def fresh_health(client) -> tuple[int, dict]:
    response = client.http.get("/health")
    return response.status_code, json.loads(response.body)


def test_a_full_disk_fails_health_and_provisioning_until_space_returns(small_state, stage):
    csr_pem = make_csr("mydevice1")[0]
    with api("local", Container(health_cache_seconds=0)) as client:  # each /health answer afresh
        assert fresh_health(client)[0] == 200
        filler = fill(small_state)
        try:
            status, health = fresh_health(client)
            response, answer = post(client, stage.body("mydevice1", csr_pem))
        finally:
            filler.unlink()
        assert status == 503 and health["checks"]["free_space"]["status"] == "failing", health
        assert health["checks"]["free_space"]["detail"].startswith("0.0 MB free on the state directory's file system, "
                                                                   "below the floor of 0.8 MB")
        assert_storage_503(response, answer)
        status, health = fresh_health(client)
        assert status == 200 and health["status"] == "ok", health
        response, answer = post(client, stage.body("mydevice1", csr_pem))
    assert response.status_code == 200, answer


def test_read_only_certificate_records_fail_health_though_they_can_be_read(stage):
    """The CA records are a store every provisioning writes: /health probes them with a committed write."""
    config = Settings.from_env()
    Container(config).issuer.check(config.enabled_regions)  # the CAs and their records exist
    gc.collect()  # their connections close now: a file open for writing keeps a remount busy
    with read_only(config.ca_dir / "certificates.sqlite3"):
        with api("local") as client:
            status, health = fresh_health(client)
    assert status == 503, health
    assert health["checks"]["issuer"] == {"status": "failing", "detail": "it cannot be written (read-only); check "
                                          "the file system's mount and the file's permissions"}, health
    assert {part: check["status"] for part, check in health["checks"].items() if part != "issuer"} == {
        "registry": "ok", "geolocation": "ok", "fleet_key": "ok", "free_space": "ok"}
    assert "/" not in health["message"]  # no server path on a public endpoint


def _can_mount_tmpfs() -> bool:
    """A private mount namespace where a tmpfs can be mounted (root, or a user namespace that allows it)."""
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],  # not seen outside
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@needs_tool(_can_mount_tmpfs(), "a private mount namespace for a small tmpfs (unshare -m, as root)")
def test_a_disk_that_fills_during_a_reset_is_named_and_the_next_reset_finishes_it(tmp_path):
    """A real ENOSPC on a 1 MiB tmpfs (tests/full_disk_child.py): the certificate was revoked, the registry's last
    write fails at its commit, where SQLite ends the transaction itself; the message names the full disk (not a
    failed ROLLBACK's 'no transaction is active') and what was done; the next reset, with room again, finishes."""
    child = subprocess.run(["unshare", "-m", sys.executable, "-m", "tests.full_disk_child", str(tmp_path)],
                           cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    runs = json.loads(child.stdout)
    first, second = runs["first"], runs["second"]
    certificate = first["certificate"]

    def errors(run: dict) -> list[str]:  # without the local issuer's note that no stack runs (nothing to tell)
        return [line for line in run["stderr"].splitlines() if not line.startswith("no local stack is running")]
    assert first["code"] == 1
    [line] = errors(first)
    assert line.startswith(f"error: reset of dev1 stopped: certificate {certificate} in eu-west-2 revoked, "
                           "registry not updated")
    assert "the disk is full (SQLITE_FULL)" in line and "rollback" not in line
    assert (first["certificate_status"], first["status"], first["reset_pending"]) == (
        "REVOKED", "provisioned", [certificate])
    assert (second["code"], errors(second), second["status"], second["reset_pending"]) == (
        0, [], "unprovisioned", [])
