"""make local: run the local stage (region CAs, mosquitto, chalice local) until Ctrl-C, then stop it all.

Run from the project directory as a module: python -m devstack.local
"""
import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

from chalicelib.config import Settings
from chalicelib.domain.errors import ConfigError
from devstack.stack import LocalStack, StackError, die_with_parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make local", description=__doc__)
    parser.add_argument("--api-port", type=int, default=int(os.environ.get("API_PORT", 8000)),
                        help="HTTP port of the API (default: $API_PORT or 8000)")
    parser.add_argument("--state-dir", help="state directory (default: $GIP_STATE_DIR, else "
                                            "$XDG_STATE_HOME/iot-global-provisioning/local, "
                                            "XDG_STATE_HOME defaulting to ~/.local/state)")
    args = parser.parse_args(argv)
    die_with_parent()  # if make is killed, we hear of it and stop our children
    try:
        settings = Settings.for_stage("local", args.state_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = unwritable(settings.state_dir)
    if problem:
        print(f"error: the state directory {settings.state_dir} cannot be written ({problem}); make it writable, "
              "or choose another with --state-dir or GIP_STATE_DIR", file=sys.stderr)
        return 1
    stack = LocalStack(settings, args.api_port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below on kill too
    # Ctrl-C stops everything even when started in the background (`make local &` inherits SIGINT ignored, while
    # the brokers take it and stop: they must not be restarted as if they had died).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start()
        print("\nRunning. Region endpoints (mqtts, mutual TLS):")
        for listener in stack.files.listeners():
            print(f"  {listener.region:<15} localhost:{listener.port}")
        print(f"State (registry, CAs, keys, devices' files, logs): {settings.state_dir}")
        print(f"API for devices (-a): {stack.api_url}")
        print(f"CA bundle for devices (--root-ca): {stack.files.bundle}")
        print(f"Logs: {stack.log_dir} ({', '.join(f'{name}.log' for name in stack.log_names()[:2])}, ...; the "
              f"previous runs' as .log.1 to .log.{stack.log_keep}, each file at most "
              f"{stack.log_max_bytes // 2**20} MB)\nPress Ctrl-C to stop.", flush=True)
        # A broker that dies is restarted by the stack; one that keeps dying, a dead API or a supervisor that ended
        # (it sets `failed` itself; checked here too) ends it all here.
        while not stack.failed.wait(1):
            if not stack.supervising and not stack.failed.is_set():
                stack.failure = "the stack's supervisor is not running"
                break
        print(f"error: stopping the local stack: {stack.failure}", file=sys.stderr)
        return 1
    except (StackError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if stack.processes:
            stack.stop()
            print("stopped mosquitto and chalice local", flush=True)
    return 0


def unwritable(directory: Path) -> str | None:
    """Why nothing can be written in `directory` (made if missing), or None: the stack writes everything there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
