"""The suite's own rules (tests/conftest.py): a test that leaves a process behind fails the run, naming it and the
test that started it; a module that needs a missing tool is skipped, except under CI, where it fails the run."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chalicelib.config import PROJECT_DIR
from tests.conftest import needs_tool
from tests.process_check import STRAGGLER_GRACE

PROBE = '''
import subprocess
from pathlib import Path


def test_stops_what_it_starts():
    subprocess.run(["sleep", "0"], check=True)


def test_leaves_an_orphan():
    # The shell exits at once; its sleep, reparented away from this process, lives on.
    out = subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    Path({pid_file!r}).write_text(out.stdout)
'''


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_process_left_behind_fails_the_run_naming_it_and_its_test_and_is_stopped(tmp_path):
    pid_file = tmp_path / "orphan.pid"
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE.format(pid_file=str(pid_file)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.process_check",
                          str(probe)], cwd=PROJECT_DIR, env={**os.environ, STRAGGLER_GRACE: "0.5"},
                         capture_output=True, text=True, timeout=120)
    orphan = int(pid_file.read_text())
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    [named] = [line for line in run.stdout.splitlines() if line.startswith("pid ")]
    assert named.startswith(f"pid {orphan}, started during ") and named.endswith(": sleep 600"), named
    assert "test_probe.py::test_leaves_an_orphan" in named
    deadline = time.monotonic() + 10  # killed by the check; its new parent reaps it
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(orphan)


def test_a_missing_tool_skips_its_module_but_fails_the_run_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    skipped = needs_tool(None, "mosquitto")
    assert skipped.args == (True,) and skipped.kwargs["reason"] == "mosquitto is not installed (.ci/run installs it)"
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="mosquitto is not installed.*CI is set, so this fails the run"):
            needs_tool(None, "mosquitto")
        assert needs_tool("/usr/sbin/mosquitto", "mosquitto").args == (False,)
    monkeypatch.setenv("CI", "false")
    assert needs_tool(None, "mosquitto").args == (True,)
