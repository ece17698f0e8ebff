"""`make local` (python -m devstack.local) on a state directory it cannot write: one line naming the directory, exit 1,
no traceback, nothing started. The directory is made unwritable for real: a read-only tmpfs mounted in a mount
namespace of the command's own when we are root (chmod does not stop root), else a mode without write bits."""
import os
import shutil
import subprocess
import sys

import pytest

from chalicelib.config import PROJECT_DIR
from devstack.stack import free_port


def run_local(state_dir, *wrap: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIP_")}
    return subprocess.run([*wrap, sys.executable, "-m", "devstack.local", "--state-dir", str(state_dir),
                           "--api-port", str(free_port())], cwd=PROJECT_DIR, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_naming(result: subprocess.CompletedProcess, state_dir, cause: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == "" and "Traceback" not in result.stderr, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert str(state_dir) in result.stderr and cause in result.stderr, result.stderr


def test_a_read_only_state_directory_is_named_in_one_line(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if os.geteuid() != 0:
        state_dir.chmod(0o555)
        assert_one_line_naming(run_local(state_dir), state_dir, "Permission denied")
        return
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("root without a mount namespace of its own: no way to make a directory read-only")
    # In a private mount namespace: the mount ends with the command, and nobody else sees it.
    mount = f"mount -t tmpfs -o ro tmpfs '{state_dir}' && exec \"$@\""
    assert_one_line_naming(run_local(state_dir, unshare, "-m", "sh", "-c", mount, "sh"), state_dir,
                           "Read-only file system")


def test_a_state_directory_under_a_file_is_named_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    state_dir = tmp_path / "file" / "state"
    assert_one_line_naming(run_local(state_dir), state_dir, "Not a directory")
