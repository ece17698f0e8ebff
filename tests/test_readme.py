"""The commands of the README and of docs/*.md run as written, from the project directory, offline.

A command is a line of a ```sh block (continuation lines joined, comments dropped). RUN is the explicit list of the
commands this test runs, page by page, in the pages' order: all of them in one session of `make local`, one shell
after another, as a reader would with `make local` in a first terminal. NOT_RUN lists the other offline commands,
with the reason; AWS commands (AWS_PREFIXES) are listed as not run, since they need an account. A command added to,
changed in or removed from a page without these lists fails test_the_lists_are_the_pages_commands, so the two cannot
drift apart. The README's "Common tasks" table gives one command per task: each must be one of the pages' commands.
`.venv/bin/python` is the interpreter running the tests (the same one under `make test`), and `make` is told the
virtualenv is installed. `make demo` is run by tests/test_demo.py.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from chalicelib.config import PROJECT_DIR
from devstack.stack import free_port, free_port_run, mosquitto_binary
from tests.conftest import needs_tool
from tests.tiers import guarded_environment, local_tier

README = PROJECT_DIR / "README.md"
PAGES = [README, *sorted((PROJECT_DIR / "docs").glob("*.md"))]
RUN = {  # with `make local` running, as the pages say; one script, in this order
    "docs/local.md": [
        "STATE=${GIP_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/iot-global-provisioning/local}",
        'device() { .venv/bin/python device/global_device.py -a http://127.0.0.1:${API_PORT:-8000} --signing-key '
        '"$STATE/keys/global-provisioning.priv.key.pem" --root-ca "$STATE/ca/bundle.pem" --state-dir "$STATE/devices" '
        '"$@"; }',
        ".venv/bin/python -m admin keygen",
        ".venv/bin/python -m admin register --prefix mydevice --count 10",
        "device -t mydevice1 -c --count 3 --interval 0.5 --forwarded-for 81.2.69.142",
        ".venv/bin/python -m admin list",
        # day two
        "device -t mydevice1 -c --renew --count 1 --forwarded-for 81.2.69.142",
        "device -t mydevice1 -c --renew --count 1 --forwarded-for 126.0.0.1",
        ".venv/bin/python -m admin show mydevice1",
        ".venv/bin/python -m admin list --expiring-within 400",
        ".venv/bin/python -m admin reset mydevice1",
        "device -t mydevice1 -c --count 1 --forwarded-for 126.0.0.1 --reprovision-if-revoked",
    ],
    "docs/operations.md": [
        ".venv/bin/python -m admin stats",
        ".venv/bin/python -m admin where 126.0.0.1",
        ".venv/bin/python -m admin audit",
        ".venv/bin/python -m admin report --html $STATE/fleet.html --audit",
    ],
}
NOT_RUN = {
    "README.md": {
        "make demo": "run by tests/test_demo.py, as written, with the checks of the story it tells",
        "make test": "the test suite itself",
    },
    "docs/local.md": {
        "make local": "runs until Ctrl-C: started around the commands of RUN, stopped after them",
    },
    "docs/device.md": {
        "python device/global_device.py -t mydevice1 -a http://127.0.0.1:8000 -c --signing-key "
        "$STATE/keys/global-provisioning.priv.key.pem --root-ca $STATE/ca/bundle.pem --state-dir $STATE/devices":
            "publishes until stopped, as a device does; docs/local.md's walkthrough runs the same with --count",
    },
}
AWS = "needs an AWS account and credentials"
AWS_PREFIXES = (". .venv/bin/activate", "python -m admin --stage prod", "aws ", "chalice deploy", "make deploy",
                "chalice package", "python device/global_device.py -t mydevice1 -a https://")

pytestmark = needs_tool(mosquitto_binary(), "mosquitto")


def page_commands(page: Path) -> list[str]:
    """Every command of a page's ```sh blocks, in order: continuation lines joined, comments dropped."""
    commands: list[str] = []
    in_shell, pending = False, ""
    for line in page.read_text().splitlines():
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


def name(page: Path) -> str:
    return str(page.relative_to(PROJECT_DIR))


def test_the_lists_are_the_pages_commands():
    aws = []
    for page in PAGES:
        found = page_commands(page)
        offline = [c for c in found if not c.startswith(AWS_PREFIXES)]
        aws += [c for c in found if c.startswith(AWS_PREFIXES)]
        run, not_run = RUN.get(name(page), []), NOT_RUN.get(name(page), {})
        assert sorted(offline) == sorted([*run, *not_run]), name(page)
        assert [c for c in offline if c in run] == run, f"{name(page)}: RUN is in the page's order"
    assert set(RUN) | set(NOT_RUN) <= {name(page) for page in PAGES}  # no list for a page that is gone
    assert len(aws) >= 5  # the deploy page is still there, and still not run here


def test_each_common_task_of_the_readme_is_a_command_of_the_pages():
    text = README.read_text()
    section = text[text.index("## Common tasks"):]
    section = section[:section.index("\n## ", 1)]
    tasks = re.findall(r"^\| [^|]+ \| `([^`]+)` \|", section, re.M)
    everything = {command for page in PAGES for command in page_commands(page)}
    assert len(tasks) >= 8
    assert [task for task in tasks if task not in everything] == []


def test_the_state_line_is_where_the_stage_keeps_its_state(tmp_path):
    """docs/local.md's STATE line names the directory the CLI says the local stage uses: GIP_STATE_DIR, else
    XDG_STATE_HOME, else ~/.local/state."""
    [line] = [c for c in RUN["docs/local.md"] if c.startswith("STATE=")]
    base = {k: v for k, v in os.environ.items() if not k.startswith("GIP_") and k != "XDG_STATE_HOME"}
    base["HOME"] = str(tmp_path / "home")
    for extra in ({}, {"XDG_STATE_HOME": str(tmp_path / "xdg")}, {"GIP_STATE_DIR": str(tmp_path / "mine"),
                                                                   "XDG_STATE_HOME": str(tmp_path / "xdg")}):
        env = {**base, **extra}
        shown = subprocess.run(["bash", "-c", f'{line}; echo "$STATE"'], env=env, capture_output=True, text=True,
                               check=True).stdout.strip()
        said = subprocess.run([sys.executable, "-m", "admin", "--help"], cwd=PROJECT_DIR, env=env,
                              capture_output=True, text=True, check=True).stdout
        assert f"(the local stage's now: {shown})" in " ".join(said.split()), (extra, said)


def environment(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIP_") and k != "XDG_STATE_HOME"}
    # HOME: the pages' default state directory, in a temporary home. Free ports: others test on this machine.
    return {**env, "HOME": str(home), "API_PORT": str(free_port()), "GIP_MQTT_BASE_PORT": str(free_port_run(11))}


def as_written(commands: list[str]) -> str:
    script = "\n".join(commands).replace(".venv/bin/python", shlex.quote(sys.executable))
    return "set -euo pipefail\n" + re.sub(r"^make ", f"make -o .venv/.installed-local PY={shlex.quote(sys.executable)} ",
                                          script, flags=re.M)


def test_the_pages_commands_run_top_to_bottom_on_one_local_stage(tmp_path):
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
        commands = [command for page in RUN.values() for command in page]
        result = subprocess.run(["bash", "-c", as_written(commands)], cwd=PROJECT_DIR, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(local.pid, signal.SIGINT)  # Ctrl-C in the first terminal
        local.wait(30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    # provision, then renew in place, then move to Tokyo, then a reset device provisions again by itself
    story = [r"<= provisioned in region eu-west-2 ", r"<= renewed \(renewal\): region eu-west-2",
             r"<= renewed \(relocated\): region ap-northeast-1", r"--reprovision-if-revoked: setting the revoked",
             r"<= provisioned in region ap-northeast-1 ", r"^0 finding\(s\)"]
    at = 0
    for step in story:
        found = re.compile(step, re.M).search(output, at)
        assert found, f"{step!r} not found after position {at}:\n{output[at:][-4000:]}"
        at = found.end()
    assert re.search(r"^mydevice1\s+provisioned\s+eu-west-2\s", result.stdout, re.M), result.stdout
    # listed as expiring (a second date: its certificate's end), in Tokyo now
    assert re.search(r"^mydevice1 +provisioned +ap-northeast-1 +\S+ +\d{4}-\d\d-\d\dT", result.stdout, re.M)
    assert re.search(r'"renewals": \{\s*"count": 2,', result.stdout), result.stdout[-3000:]  # admin show
    assert (state / "devices" / "mydevice1.device.cert.pem").is_file()
    assert list((state / "devices").glob("mydevice1.*.revoked"))  # the reset certificate, set aside
    assert (state / "fleet.html").read_text().lower().startswith("<!doctype html>")
