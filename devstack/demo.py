"""make demo: the original sample's README walkthrough on the local stage, non-interactive.

Starts the stack on free ports in a fresh state directory (its own, next to the local stage's), makes the
signing keys, registers mydevice1..10, provisions two devices from two continents, shows a refusal, shows
the registry, shows each device's messages arriving at its own region's broker, restarts a device, stops
everything, and ends by writing the fleet report (an HTML page with a world map) and printing its path.
Run from the project directory as a module: python -m devstack.demo
"""
import os
import shutil
import subprocess
import sys

from admin import cli as admin
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings, default_state_dir
from chalicelib.domain.errors import ConfigError
from devstack.monitor import Monitor
from devstack.stack import LocalStack, StackError, die_with_parent, free_port, free_port_run

LONDON, TOKYO, SAO_PAULO = "81.2.69.142", "126.0.0.1", "200.147.67.142"
STATE = default_state_dir("demo")  # like the local stage's, outside the project


HEADER_WIDTH = 80


def section(number: int, title: str) -> None:
    """One header per step, all as wide as HEADER_WIDTH, numbers aligned (titles are kept shorter than that)."""
    head = f"=== {number:>2}. {title} "
    print(f"\n{head}{'=' * max(3, HEADER_WIDTH - len(head))}", flush=True)


def run_admin(*argv: str) -> None:
    print(f"$ python -m admin {' '.join(argv)}", flush=True)
    if admin.main(["--state-dir", str(STATE), *argv]) != 0:
        raise SystemExit(f"demo: admin {argv[0]} failed")


def device(stack: LocalStack, thing: str, ip: str, *flags: str, count: int = 3) -> int:
    argv = ["device/global_device.py", "-t", thing, "-a", stack.api_url, "-c", "--forwarded-for", ip,
            "--state-dir", str(STATE / "devices"), "--root-ca", str(stack.files.bundle),
            "--signing-key", str(STATE / "keys" / FLEET_PRIVATE_KEY_NAME),
            "--count", str(count), "--interval", "0.3", *flags]
    print(f"$ python {' '.join(argv)}", flush=True)
    return subprocess.run([sys.executable, *argv], cwd=PROJECT_DIR, stdin=subprocess.DEVNULL).returncode


def expect(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'FAILED'}] {what}", flush=True)
    if not ok:
        raise SystemExit(f"demo: {what}: not as expected")


def show_messages(monitor: Monitor) -> set:
    seen = set()
    for message in monitor.drain(wait=2):
        payload = message.payload if isinstance(message.payload, dict) else {}
        print(f"  monitor <- broker {message.region:<15} {message.topic}: {payload.get('datetime', message.payload)}")
        seen.add((payload.get("thing-name"), message.region))
    return seen


def main() -> int:
    die_with_parent()
    shutil.rmtree(STATE, ignore_errors=True)  # each demo starts from factory-fresh devices
    os.environ.update(GIP_STATE_DIR=str(STATE), GIP_MQTT_BASE_PORT=str(free_port_run(11)))
    settings = Settings.for_stage("local", str(STATE))

    section(1, "Start the local stage: a CA and an MQTT broker per region, the API")
    stack = LocalStack(settings, free_port())
    try:
        stack.start()
        with Monitor(stack.files) as monitor:
            return walkthrough(stack, monitor)
    except (StackError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        section(10, "Stop everything")
        stack.stop()
        print("mosquitto and chalice local stopped", flush=True)


def walkthrough(stack: LocalStack, monitor: Monitor) -> int:
    section(2, "Make the fleet provisioning key pair (the sample used openssl)")
    run_admin("keygen")

    section(3, "Register mydevice1..10 on the allow-list")
    run_admin("register", "--prefix", "mydevice", "--count", "10")

    section(4, f"mydevice1, server-made key, from a London IP ({LONDON})")
    expect(device(stack, "mydevice1", LONDON) == 0, "mydevice1 provisioned and published")

    section(5, f"mydevice2, its own key and a CSR, from a Tokyo IP ({TOKYO})")
    expect(device(stack, "mydevice2", TOKYO, "-k") == 0, "mydevice2 provisioned and published")

    section(6, "mydevice3 with a fake signature is refused")
    code = device(stack, "mydevice3", SAO_PAULO, "-f")
    expect(code == 3, f"mydevice3 refused (exit code {code})")

    section(7, "The registry")
    run_admin("list")

    section(8, "What the monitor received on each regional broker")
    seen = show_messages(monitor)
    expect(("mydevice1", "eu-west-2") in seen, "mydevice1's messages reached the eu-west-2 broker")
    expect(("mydevice2", "ap-northeast-1") in seen, "mydevice2's messages reached the ap-northeast-1 broker")

    section(9, "Restart mydevice1: stored credentials, no provisioning request")
    expect(device(stack, "mydevice1", LONDON, count=2) == 0, "mydevice1 reconnected with stored credentials")
    expect(("mydevice1", "eu-west-2") in show_messages(monitor), "and publishes to eu-west-2 again")
    return 0


def fleet_report() -> int:
    section(11, "The fleet report: one HTML page with a world map, no network needed")
    path = STATE / "report.html"
    run_admin("report", "--html", str(path))
    print(f"open it in a browser: {path.as_uri()}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.exit(code or fleet_report())
