"""`make demo` (devstack/demo.py) tells the whole story, with nothing but the local tier's packages, in a directory of
its own that it replaces only when it made it.

The README's `make demo` is run here, once, as the README gives it (tests/test_readme.py lists it as run here).
"""
import os
import re
import socket
import subprocess
import sys

import pytest

from chalicelib.config import PROJECT_DIR
from devstack.demo import MARKER, DemoFailed, own_directory
from devstack.stack import free_port, mosquitto_binary
from tests.conftest import needs_tool
from tests.tiers import guarded_environment, local_tier


def clean_environment(home) -> dict:
    """The caller's environment without the service's settings; HOME: no state of the user's is read or written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIP_") and k not in ("XDG_STATE_HOME", "DEMO_DIR")}
    return {**env, "HOME": str(home), "API_PORT": str(free_port())}


def run_demo(directory, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devstack.demo", "--dir", str(directory)], cwd=PROJECT_DIR, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


@needs_tool(mosquitto_binary(), "mosquitto")
def test_make_demo_tells_the_whole_story_with_the_local_tier_only(tmp_path):
    home, directory = tmp_path / "home", tmp_path / "the demo"
    env = guarded_environment(tmp_path / "guard", local_tier(), clean_environment(home))
    port = env["API_PORT"]
    # -o: the virtualenv running the tests holds the tiers already; the guard hides the development tier from every
    # Python process the demo starts (chalice local, the devices) as from the demo itself.
    make = ["make", "--no-print-directory", "-o", ".venv/.installed-local", f"PY={sys.executable}",
            f"DEMO_DIR={directory}", "demo"]
    result = subprocess.run(make, cwd=PROJECT_DIR, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-3000:]
    assert "Traceback" not in out + result.stderr and "FAILED" not in out
    story = [
        r"\$ python -m admin --state-dir .* register sydney-sensor-1 --public-key ",
        r"mydevice1 \| <= provisioned in region eu-west-2 ",
        r"sydney-sensor-1 \| <= provisioned in region ap-southeast-2 ",
        r"broker eu-west-2 +<- 3 message\(s\) from mydevice1",
        r"mydevice3 refused: exit code 3",
        r"sydney-sensor-1 \| <= renewed \(renewal\): region ap-southeast-2,",              # renewal in place
        r"mydevice1 \| <= renewed \(relocated\): region ap-northeast-1,",                   # relocation
        r"broker ap-northeast-1 +<- 2 message\(s\) from mydevice1",
        r"mydevice1 \| error: the broker refused this device's certificate \(certificate revoked\)",  # the London copy
        r"\$ python -m admin --state-dir .* reset sydney-sensor-1\n",                       # revocation
        r"sydney-sensor-1 \| <= connection to \S+ lost",
        r"sydney-sensor-1 \| <= provisioned in region ap-southeast-2 ",                     # by itself, again
        r"\$ python -m admin --state-dir .* audit\n0 finding\(s\)\n\[ok\] admin audit exit code 0",
        r"sydney-sensor-1 \| => session closed \(MQTT DISCONNECT\)",
        r"\$ python -m admin --state-dir .* report --html .*report\.html'? --audit\n",
        r"Open it in a browser: file://",
    ]
    joined = out.replace(" \\\n    ", " ")  # a long command line is continued on the next
    at = 0
    for step in story:  # in this order
        found = re.compile(step).search(joined, at)
        assert found, f"/{step}/ not found after:\n{joined[at:at + 3000]}"
        at = found.end()
    assert f"-a http://127.0.0.1:{port} " in out  # API_PORT honoured
    # Short command lines: with the demo's directory (absolute here) written as DIR, none is long.
    lines = out.replace(str(directory), "DIR").splitlines()
    commands = [line for before, line in zip([""] + lines, lines) if line.startswith("$ ") or before.endswith(" \\")]
    assert sum(line.startswith("$ ") for line in commands) >= 12
    assert max(map(len, commands)) <= 110, max(commands, key=len)
    # Everything is in the demo's directory; nothing in the local stage's default state directory.
    assert (directory / MARKER).is_file() and (directory / "registry.sqlite3").is_file()
    report = (directory / "report.html").read_text()
    assert "Not checked" not in report  # the audit's panels are filled
    assert not (home / ".local" / "state" / "iot-global-provisioning").exists()


def test_a_directory_the_demo_did_not_make_is_left_alone(tmp_path):
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")
    result = run_demo(directory, clean_environment(tmp_path))
    assert result.returncode == 1 and result.stdout == "", result
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert f"{directory} exists and was not made by make demo" in result.stderr
    assert [p.name for p in directory.iterdir()] == ["notes.txt"] and (directory / "notes.txt").read_text() == "keep me"


def test_a_busy_api_port_is_named_before_anything_is_made(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_demo(tmp_path / "demo", {**clean_environment(tmp_path), "API_PORT": str(port)})
    assert result.returncode == 1 and result.stdout == "", result
    assert result.stderr == (f"error: port {port} is in use (is make local running?); give the demo another: "
                             "make demo API_PORT=<port>\n")
    assert not (tmp_path / "demo").exists()


def test_the_demo_replaces_its_own_directory_and_uses_an_empty_one(tmp_path):
    ours = tmp_path / "ours"
    own_directory(ours)
    (ours / "registry.sqlite3").write_text("an earlier run")
    (ours / "devices").mkdir()
    own_directory(ours)
    assert [p.name for p in ours.iterdir()] == [MARKER]

    empty = tmp_path / "empty"
    empty.mkdir()
    own_directory(empty)
    assert [p.name for p in empty.iterdir()] == [MARKER]

    a_file = tmp_path / "a file"
    a_file.write_text("not a directory")
    with pytest.raises(DemoFailed, match="was not made by make demo"):
        own_directory(a_file)
    assert a_file.read_text() == "not a directory"

