"""make demo: the original sample's README walkthrough on the local stage, non-interactive.

Starts the stack on free ports in a fresh state directory (.state/demo), makes the signing keys, registers
mydevice1..10, provisions two devices from two continents, shows a refusal, shows the registry, shows
each device's messages arriving at its own region's broker, restarts a device, and stops everything.
Run from the project directory as a module: python -m devstack.demo
"""
import os
import shutil
import subprocess
import sys

from chalicelib import admin
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings
from chalicelib.errors import ConfigError
from devstack.monitor import Monitor
from devstack.stack import LocalStack, StackError, die_with_parent, free_port, free_port_run

LONDON, TOKYO, SAO_PAULO = "81.2.69.142", "126.0.0.1", "200.147.67.142"
STATE = PROJECT_DIR / ".state" / "demo"


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run_admin(*argv: str) -> None:
    print(f"$ python -m chalicelib.admin {' '.join(argv)}", flush=True)
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

    section("1. Start the local stage: a CA and an MQTT broker per region, the API")
    stack = LocalStack(settings, free_port())
    try:
        stack.start()
        with Monitor(stack.files) as monitor:
            return walkthrough(stack, monitor)
    except (StackError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        section("10. Stop everything")
        stack.stop()
        print("mosquitto and chalice local stopped", flush=True)


def walkthrough(stack: LocalStack, monitor: Monitor) -> int:
    section("2. Make the fleet provisioning key pair (the sample used openssl)")
    run_admin("keygen")

    section("3. Register mydevice1..10 on the allow-list")
    run_admin("register", "--prefix", "mydevice", "--count", "10")

    section(f"4. mydevice1, server-made key, from a London IP ({LONDON})")
    expect(device(stack, "mydevice1", LONDON) == 0, "mydevice1 provisioned and published")

    section(f"5. mydevice2, its own key and a CSR, from a Tokyo IP ({TOKYO})")
    expect(device(stack, "mydevice2", TOKYO, "-k") == 0, "mydevice2 provisioned and published")

    section("6. mydevice3 with a fake signature is refused")
    code = device(stack, "mydevice3", SAO_PAULO, "-f")
    expect(code == 3, f"mydevice3 refused (exit code {code})")

    section("7. The registry")
    run_admin("list")

    section("8. What the monitor received on each regional broker")
    seen = show_messages(monitor)
    expect(("mydevice1", "eu-west-2") in seen, "mydevice1's messages reached the eu-west-2 broker")
    expect(("mydevice2", "ap-northeast-1") in seen, "mydevice2's messages reached the ap-northeast-1 broker")

    section("9. Restart mydevice1: it reuses its stored credentials, no provisioning request")
    expect(device(stack, "mydevice1", LONDON, count=2) == 0, "mydevice1 reconnected with stored credentials")
    expect(("mydevice1", "eu-west-2") in show_messages(monitor), "and publishes to eu-west-2 again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
