"""No test leaves a process behind: at the end of the session every process the tests started must be gone, else
the run fails naming each one and the test that was running when it started (and stops it, so that the run itself
leaves nothing behind). tests/conftest.py registers these hooks; `-p tests.process_check` loads them alone.

Every process the suite starts inherits SESSION_MARK from this process's environment: one that outlived its parent
(and so is no longer a descendant of this process) is still known as this session's at the end. A process started
with an environment of its own is still found while it descends from this process.
"""
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

SESSION_MARK = "SUITE_SESSION_MARK"  # not GIP_: tests pass on the environment without the stage's GIP_ settings
# A process being stopped as the last test ends gets this long to go (tests of this check make it short).
STRAGGLER_GRACE = "SUITE_STRAGGLER_GRACE_SECONDS"
_TICKS = os.sysconf("SC_CLK_TCK")
_begun: list[tuple[float, str]] = []  # (seconds since boot, test id) as each test began: who started a leftover
_before: set[int] = set()


def stop_group(process: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started with `start_new_session=True` and every process of its group (children that would
    outlive it, as `chalice local`'s reloader leaves its worker): SIGTERM, then SIGKILL to what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process.poll()  # reap our child, so that only the rest of the group keeps the group alive
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                process.wait()
                return
            time.sleep(0.05)
    process.wait(timeout)


def _since_boot() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def _session_processes() -> dict[int, tuple[float, str]]:
    """Live processes of this session (its mark in their environment, or descendants of this process): pid ->
    (when it started, in seconds since boot; its command line)."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    me = os.getpid()
    parents: dict[int, int] = {}
    marked: set[int] = set()
    seen: dict[int, tuple[float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        if fields[0] in ("Z", "X"):  # dead, only waiting to be reaped
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        seen[pid] = (int(fields[19]) / _TICKS, command)
        if mark in environ:
            marked.add(pid)

    def descends(pid: int) -> bool:
        for _ in range(len(parents)):  # a parent chain is never longer than the process table
            if pid not in parents:
                return False
            pid = parents[pid]
            if pid == me:
                return True
        return False

    return {pid: info for pid, info in seen.items() if pid in marked or descends(pid)}


def pytest_configure(config):
    os.environ[SESSION_MARK] = f"{os.getpid()}-{secrets.token_hex(4)}"  # fresh: a pytest inside a test has its own
    _before.update(_session_processes())


def pytest_runtest_logstart(nodeid, location):
    _begun.append((_since_boot(), nodeid))


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish, which tears the last fixtures down
def pytest_sessionfinish(session, exitstatus):
    """Fail the run, naming them, when processes the tests started are still running (after a short grace for
    those being stopped), and stop them so that the run itself leaves nothing behind."""
    deadline = time.monotonic() + float(os.environ.get(STRAGGLER_GRACE, "10"))
    while True:
        left = {pid: info for pid, info in _session_processes().items() if pid not in _before}
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = []
    for pid, (started, command) in sorted(left.items()):
        during = next((nodeid for began, nodeid in reversed(_begun) if began <= started), "before the first test")
        lines.append(f"pid {pid}, started during {during}: {command[:300]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if reporter is not None:
        reporter.write_line("")  # end the progress line
        reporter.write_sep("=", f"{len(left)} process(es) started by the tests still running (now killed)", red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
