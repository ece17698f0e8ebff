"""The README's commands run as written, from the project directory, offline.

RUN is the explicit list of the README's commands this test runs, in the README's order; NOT_RUN the others,
with the reason. A command added to, changed in or removed from the README without this list fails
test_the_lists_are_the_readmes_commands, so the two cannot drift apart. `.venv/bin/python` is the interpreter
running the tests (the same one under `make test`), and `make` is told the virtualenv is installed. `make demo` is
run by tests/test_demo.py.
"""
import os
import re
import shlex
import signal
import subprocess
import sys

from chalicelib.config import PROJECT_DIR
from devstack.stack import free_port, free_port_run, mosquitto_binary
from tests.conftest import needs_tool
from tests.tiers import guarded_environment, local_tier

README = PROJECT_DIR / "README.md"
RUN = {
    "hand-run": [  # with `make local` running, as the README says
        "STATE=${XDG_STATE_HOME:-$HOME/.local/state}/iot-global-provisioning/local",
        ".venv/bin/python -m admin keygen",
        ".venv/bin/python -m admin register --prefix mydevice --count 10",
        ".venv/bin/python device/global_device.py -t mydevice1 -a http://127.0.0.1:${API_PORT:-8000} -c --count 3 "
        "--interval 0.5 --forwarded-for 81.2.69.142 --signing-key $STATE/keys/global-provisioning.priv.key.pem "
        "--root-ca $STATE/ca/bundle.pem --state-dir $STATE/devices",
        ".venv/bin/python -m admin list",
    ],
}
NOT_RUN = {
    "make demo": "run by tests/test_demo.py, as written, with the checks of the story it tells",
    "make test": "the test suite itself",
    "make local": "runs until Ctrl-C: started around the hand-run commands, stopped after them",
}
AWS = "needs an AWS account and credentials"
AWS_PREFIXES = (". .venv/bin/activate", "python -m admin --stage prod", "aws ", "chalice deploy", "make deploy",
                "chalice package", "python device/global_device.py -t mydevice1 -a https://")

pytestmark = needs_tool(mosquitto_binary(), "mosquitto")


def readme_commands() -> list[str]:
    """Every command of the README's ```sh blocks, in order: continuation lines joined, comments dropped."""
    commands: list[str] = []
    in_shell, pending = False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_shell = line.strip() == "```sh" and not in_shell
            continue
        if not in_shell:
            continue
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        if pending + line:
            commands.append(pending + line)
        pending = ""
    return commands


def test_the_lists_are_the_readmes_commands():
    found = readme_commands()
    offline = [c for c in found if not c.startswith(AWS_PREFIXES)]
    assert sorted(offline) == sorted([*RUN["hand-run"], *NOT_RUN])
    assert [c for c in offline if c in RUN["hand-run"]] == RUN["hand-run"]  # in the README's order
    assert len(found) - len(offline) >= 5  # the deploy section is still there, and still not run here


def environment(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIP_") and k != "XDG_STATE_HOME"}
    # HOME: the README's default state directory, in a temporary home. Free ports: others test on this machine.
    return {**env, "HOME": str(home), "API_PORT": str(free_port()), "GIP_MQTT_BASE_PORT": str(free_port_run(11))}


def as_written(commands: list[str]) -> str:
    script = "\n".join(commands).replace(".venv/bin/python", shlex.quote(sys.executable))
    return "set -euo pipefail\n" + re.sub(r"^make ", f"make -o .venv/.installed-local PY={shlex.quote(sys.executable)} ",
                                          script, flags=re.M)


def test_the_hand_run_section_runs_top_to_bottom_and_returns(tmp_path):
    # make local and the commands beside it, with the packages of make local's install only (tests/tiers.py).
    env = guarded_environment(tmp_path / "tier", local_tier(), environment(tmp_path))
    state = tmp_path / ".local" / "state" / "iot-global-provisioning" / "local"
    local = subprocess.Popen(["bash", "-c", as_written(["make local"])], cwd=PROJECT_DIR, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        printed = []
        for line in local.stdout:
            printed.append(line)
            if "Press Ctrl-C" in line:
                break
        assert f"State (registry, CAs, keys, devices' files, logs): {state}\n" in printed, "".join(printed)
        result = subprocess.run(["bash", "-c", as_written(RUN["hand-run"])], cwd=PROJECT_DIR, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(local.pid, signal.SIGINT)  # Ctrl-C in the first terminal
        local.wait(30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    assert "provisioned in region eu-west-2" in output and "published 3 message(s)" in output
    assert re.search(r"^mydevice1\s+provisioned\s+eu-west-2\s", result.stdout, re.M), result.stdout
    assert (state / "devices" / "mydevice1.device.cert.pem").is_file()
