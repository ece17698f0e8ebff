"""make demo: the whole story on the local stage, non-interactive, in a directory of its own.

Starts the local stage (a CA and a broker per region, the API) in the demo's directory (default ./demo, which git
ignores; never the local stage of `make local`), then: the fleet key; the allow-list, with one device registered
with its own signing key; two devices on two continents provision and publish; a fake device is refused; a
running device renews in place (SIGUSR1); a device renews from Tokyo and moves there from London, and its old
certificate is refused by the London broker; an operator revokes a connected device (admin reset): the broker
closes its session and the device provisions again by itself; the audit comes out clean; everything stops; the
fleet report is written with the audit in it.

The directory is replaced at every run, and only when the demo made it (it leaves a marker file in it): a
directory that exists without the marker is left alone and the demo stops. The demo runs the local stage's
defaults: GIP_* variables of the caller's environment are not passed on.

    python -m devstack.demo [--dir DIR]          (make demo [DEMO_DIR=DIR] [API_PORT=PORT])
"""
import argparse
import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from admin import cli as admin
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR, Settings
from chalicelib.domain.errors import ConfigError
from devstack.monitor import Monitor
from devstack.stack import LocalStack, StackError, die_with_parent, free_port_run

LONDON, TOKYO, SYDNEY, RIO = "81.2.69.142", "126.0.0.1", "1.1.1.1", "200.147.67.142"
OWN_KEY_DEVICE = "sydney-sensor-1"  # registered with its own signing key, not the fleet key
MARKER = ".made-by-make-demo"  # what makes a directory the demo's own, so the next run may replace it
WAIT = 30.0  # seconds any one expected outcome may take before the demo says it did not come
HEADER_WIDTH = 80


def device_module() -> Any:
    """device/global_device.py, loaded by its path as its tests load it: the device ships alone, outside any package
    (its state files and its question to a broker are the device's own, so the demo reads them with its code)."""
    if "global_device" not in sys.modules:
        spec = importlib.util.spec_from_file_location("global_device", PROJECT_DIR / "device" / "global_device.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["global_device"] = module  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return sys.modules["global_device"]


class DemoFailed(Exception):
    """Something did not happen as the demo says it should; the message says what."""


def section(number: int, title: str) -> None:
    """One header per step, all as wide as HEADER_WIDTH, numbers aligned (titles are kept shorter than that)."""
    head = f"=== {number:>2}. {title} "
    print(f"\n{head}{'=' * max(3, HEADER_WIDTH - len(head))}", flush=True)


def notice(text: str) -> None:
    """What the reader should take from the lines above."""
    print(f"-> {text}", flush=True)


def expect(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'FAILED'}] {what}", flush=True)
    if not ok:
        raise DemoFailed(f"{what}: not as expected")


def brief(line: str) -> str:
    """A device's output line, without the payload of each acknowledged message (the monitor shows one)."""
    return re.sub(r"^(<= message \d+ acknowledged): .*", r"\1", line)


def command(words: list[str], width: int = 100) -> str:
    """A command line as a person would type it: `$ ` first, an option kept with its value, lines continued with a
    backslash past `width` characters."""
    groups: list[str] = []
    for word in map(shlex.quote, words):
        if groups and not word.startswith("-") and groups[-1].startswith("-") and " " not in groups[-1]:
            groups[-1] += f" {word}"
        else:
            groups.append(word)
    lines = ["$"]
    for group in groups:
        if len(lines[-1]) + 1 + len(group) > width and lines[-1].strip() != "$":
            lines[-1] += " \\"
            lines.append("   ")
        lines[-1] += f" {group}"
    return "\n".join(lines)


def shown(path: Path) -> str:
    """A path as the commands use it: relative to the project (they run there) when it is inside it."""
    try:
        return str(path.relative_to(PROJECT_DIR))
    except ValueError:
        return str(path)


def own_directory(path: Path) -> None:
    """Make `path` the demo's fresh directory: replace it if an earlier demo made it, use it if it is empty, and
    otherwise stop without touching it."""
    if path.exists() and not (path / MARKER).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise DemoFailed(f"{path} exists and was not made by make demo; it is left as it is. Move it away, or give "
                         "the demo another directory: make demo DEMO_DIR=<dir>")
    if (path / MARKER).is_file():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("Made by make demo (devstack/demo.py), which replaces this directory at every run.\n")


def can_listen(port: int) -> bool:
    """Whether the API could listen on `port` now: bound as its server binds (SO_REUSEADDR, so the connections of
    an earlier run, closed moments ago, do not count), refused only while something listens there."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Demo:
    def __init__(self, home: Path, stack: LocalStack, monitor: Monitor):
        self.home, self.stack, self.monitor = home, stack, monitor
        self.devices = home / "devices"
        self.running: dict[str, RunningDevice] = {}

    # ---- the two tools the story uses, each shown as a short command line

    def admin(self, *argv: str, code: int = 0) -> None:
        print(command(["python", "-m", "admin", "--state-dir", shown(self.home), *argv]), flush=True)
        got = admin.main(["--state-dir", str(self.home), *argv])
        expect(got == code, f"admin {argv[0]} exit code {got}")

    def device_argv(self, thing: str, *options: str) -> tuple[list[str], str]:
        """The device client's command line, and how it is shown: `device` and what differs per device."""
        common = ["device/global_device.py", "-a", self.stack.api_url, "-c", "--state-dir", shown(self.devices),
                  "--root-ca", shown(self.stack.files.bundle),
                  "--signing-key", shown(self.home / "keys" / FLEET_PRIVATE_KEY_NAME)]
        return [*common, "-t", thing, *options], command(["device", "-t", thing, *options])

    def explain_device(self) -> None:
        argv, _ = self.device_argv("NAME")
        print("The devices run the device client, device/global_device.py, each as a process of its own. Its options\n"
              "common to every device are written once here, and `device` stands for them below:\n"
              f"  device = python {shlex.join(argv[:6])} \\\n"
              f"             {shlex.join(argv[6:-2])}\n"
              "    -a             the API's URL (chalice local)           -c  no pauses between the steps\n"
              "    --state-dir    where each device keeps its key, certificate and endpoint (<thing>.*)\n"
              "    --root-ca      the region CAs, with which a device checks its broker's certificate\n"
              "    --signing-key  the fleet key the factory puts on every device: it signs the provisioning request\n"
              "  and per device: -t its thing name; --forwarded-for the client IP the API is to see (the local stage\n"
              "  trusts X-Forwarded-For; on AWS the caller's own address counts); --count N: publish N messages, then\n"
              "  exit (without it a device runs until stopped); --interval: seconds between messages.", flush=True)

    def device(self, thing: str, *options: str) -> subprocess.CompletedProcess:
        argv, line = self.device_argv(thing, *options)
        print(line, flush=True)
        result = subprocess.run([sys.executable, *argv], cwd=PROJECT_DIR, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for text in result.stdout.splitlines():
            print(f"  {thing} | {brief(text)}")
        return result

    def start_device(self, thing: str, *options: str) -> "RunningDevice":
        argv, line = self.device_argv(thing, *options)
        print(f"{line} &", flush=True)
        self.running[thing] = RunningDevice(thing, argv)
        return self.running[thing]

    def messages(self, what: str, expected: dict[tuple[str, str], int], show_one: bool = False) -> Counter:
        """What reached each regional broker since the last look, per device, as the monitor saw it: waits until
        each (device, region) in `expected` has at least its count (messages that were acknowledged are on their
        way to the monitor), for at most WAIT seconds."""
        seen: Counter = Counter()
        example = None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and any(seen[key] < count for key, count in expected.items()):
            for message in self.monitor.drain(wait=0.2):
                payload = message.payload if isinstance(message.payload, dict) else {}
                seen[(payload.get("thing-name"), message.region)] += 1
                example = example or message
        print(f"monitor ({what}):")
        if example is not None and show_one:
            print(f"  e.g. on {example.topic}: {json.dumps(example.payload)}")
        for (thing, region), count in sorted(seen.items(), key=lambda item: str(item[0])):
            print(f"  broker {region:<15} <- {count} message(s) from {thing}")
        return seen

    # ---- the story

    def run(self) -> None:
        section(2, "The fleet provisioning key pair (the original sample made it with openssl)")
        self.admin("keygen")
        notice("the service trusts this key's public half; every device of the fleet carries the private half")

        section(3, "The allow-list: three fleet devices, and one with its own signing key")
        self.admin("register", "--prefix", "mydevice", "--count", "3")
        public_key = self.own_signing_key(OWN_KEY_DEVICE)
        self.admin("register", OWN_KEY_DEVICE, "--public-key", shown(public_key))
        notice(f"only registered names can provision; {OWN_KEY_DEVICE}'s requests must be signed with its own key "
               "(the fleet key is refused for it)")

        section(4, f"Provisioning: mydevice1 from London ({LONDON}), {OWN_KEY_DEVICE} from Sydney ({SYDNEY})")
        self.explain_device()
        result = self.device("mydevice1", "--forwarded-for", LONDON, "--count", "3", "--interval", "0.2")
        expect(result.returncode == 0 and "provisioned in region eu-west-2" in result.stdout,
               "mydevice1 provisioned in eu-west-2 (London) with a key the service made, and published")
        own_key = shown(self.devices / f"{OWN_KEY_DEVICE}.signing.key.pem")
        sensor = self.start_device(OWN_KEY_DEVICE, "--signing-key", own_key, "-k", "--forwarded-for", SYDNEY,
                                   "--interval", "0.5", "--reprovision-if-revoked")
        print("  (runs in the background until stopped, as a real device; -k: it makes its key and sends a CSR, the\n"
              "  private key never leaves it; --reprovision-if-revoked: if its certificate is revoked, it provisions\n"
              "  again)")
        sensor.follow(r"provisioned in region ap-southeast-2", r"message \d+ acknowledged")
        seen = self.messages("a client subscribed to data/# on every regional broker",
                             {("mydevice1", "eu-west-2"): 3, (OWN_KEY_DEVICE, "ap-southeast-2"): 1}, show_one=True)
        expect(seen[("mydevice1", "eu-west-2")] >= 3, "mydevice1's 3 messages reached the London broker")
        expect(seen[(OWN_KEY_DEVICE, "ap-southeast-2")] > 0, f"{OWN_KEY_DEVICE}'s messages reach the Sydney broker")
        notice("each device got its identity from the nearest region in one HTTPS call, then talks MQTT over mutual "
               "TLS to that region only")

        section(5, f"A fake device is refused (mydevice3 from Rio, {RIO}, signing with a key of its own)")
        result = self.device("mydevice3", "-f", "--forwarded-for", RIO, "--count", "1")
        expect(result.returncode == 3, f"mydevice3 refused: exit code {result.returncode} (3: provisioning refused)")
        notice("a signature that does not verify gets a 403 and changes nothing: mydevice3 stays unprovisioned")

        section(6, f"Renewal in place: the running {OWN_KEY_DEVICE} renews now (SIGUSR1)")
        before = self.certificate_id(OWN_KEY_DEVICE)
        print(f"$ kill -USR1 {sensor.process.pid}    # {OWN_KEY_DEVICE}'s process; a device also renews by itself "
              "30 days before expiry")
        sensor.process.send_signal(signal.SIGUSR1)
        renewed = sensor.follow(r"<= renewed \((\w+)\): region (\S+),", r"<= connected", r"message \d+ acknowledged")
        expect(renewed.group(1) == "renewal" and renewed.group(2) == "ap-southeast-2",
               f"renewed in place: same region ({renewed.group(2)}), a new key and certificate")
        expect(self.certificate_id(OWN_KEY_DEVICE) != before, "the device holds the new certificate, "
               f"{self.certificate_id(OWN_KEY_DEVICE)[:16]}... (was {before[:16]}...)")
        notice("the device kept running and publishing; the server revoked the previous certificate once the new "
               "one was issued")

        self.relocation()
        self.revocation(sensor)

        section(9, "The audit: registry, CAs and things agree")
        self.admin("audit")
        notice("no stuck claim, no orphan certificate or thing, no device without its certificate: every renewal, "
               "move and reset above left nothing behind (exit code 0; 1 when something is found)")
        self.admin("list")

        section(10, f"Stop {OWN_KEY_DEVICE} (SIGTERM, as a service manager does)")
        print(f"$ kill {sensor.process.pid}")
        sensor.process.terminate()
        sensor.follow(r"session closed \(MQTT DISCONNECT\)", r"SIGTERM: stopped")
        expect(sensor.process.wait(WAIT) == 0, f"{OWN_KEY_DEVICE} closed its session and exited 0")

    def relocation(self) -> None:
        section(7, f"Relocation: mydevice1 moves from London to Tokyo ({TOKYO})")
        copy = self.home / "mydevice1-london"
        print("Keep a copy of its London credentials (key, certificate, endpoint), to try them afterwards:\n"
              f"$ mkdir {shlex.quote(shown(copy))} && cp {shlex.quote(shown(self.devices))}/mydevice1.* "
              f"{shlex.quote(shown(copy))}/")
        copy.mkdir()
        for path in self.devices.glob("mydevice1.*"):
            shutil.copy2(path, copy / path.name)
        result = self.device("mydevice1", "--forwarded-for", TOKYO, "--renew", "--count", "2", "--interval", "0.2")
        expect(result.returncode == 0 and "renewed (relocated): region ap-northeast-1" in result.stdout,
               "mydevice1 renewed from a Tokyo IP and was moved to ap-northeast-1 (the default rule: move when "
               "another region is more than 1000 km nearer)")
        seen = self.messages("after the move", {("mydevice1", "ap-northeast-1"): 2})
        expect(seen[("mydevice1", "ap-northeast-1")] >= 2 and not seen[("mydevice1", "eu-west-2")],
               "mydevice1's messages now reach the Tokyo broker, none the London one")
        client = device_module()
        old = client.StatePaths.for_thing(str(copy), "mydevice1")
        london = client.read_endpoint(old.endpoint, old.cert)
        print("Now the old London credentials, from the copy:")
        # The revocation reaches the broker a moment after the answer (its CRL is rewritten, then reloaded): wait
        # until the broker refuses the certificate, asking as the device asks (a TLS handshake only).
        deadline = time.monotonic() + WAIT
        while client.probe_certificate(london["endpointAddress"], int(london["endpointPort"]),
                                       str(self.stack.files.bundle), old)[0] is None:
            if time.monotonic() > deadline:
                raise DemoFailed("the London broker still accepts mydevice1's old certificate")
            time.sleep(0.1)
        result = self.device("mydevice1", "--state-dir", shown(copy), "--count", "1")
        expect(result.returncode == 8 and "certificate revoked" in result.stdout,
               "the London broker refuses the old certificate: revoked (exit code 8)")
        notice("a relocation is a renewal into another region: the new identity is issued there, the old one is "
               "revoked and removed")

    def revocation(self, sensor: "RunningDevice") -> None:
        section(8, f"Revocation: an operator resets {OWN_KEY_DEVICE} while it is connected")
        self.admin("reset", OWN_KEY_DEVICE)
        sensor.follow(r"connection to \S+ lost")
        expect(True, f"the broker closed {OWN_KEY_DEVICE}'s session: its certificate is revoked")
        sensor.follow(r"refused the certificate \(certificate revoked\)",
                      r"provisioned in region ap-southeast-2", r"<= connected", r"message \d+ acknowledged")
        expect(True, f"{OWN_KEY_DEVICE} provisioned again by itself, with its own signing key, and publishes again")
        notice("revocation closes live sessions, as on AWS IoT; without --reprovision-if-revoked the device would "
               "stop with exit code 8 and say how to recover")

    # ---- helpers

    def own_signing_key(self, thing: str) -> Path:
        """An EC P-256 signing key pair for one device, as its factory would make it: the private half stays on
        the device, the public half is registered."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.devices.mkdir(parents=True, exist_ok=True)
        private, public = self.devices / f"{thing}.signing.key.pem", self.devices / f"{thing}.signing.pub.pem"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        private.chmod(0o600)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        print(f"made {thing}'s own signing key pair (EC P-256): {shown(private)}, {shown(public)}")
        return public

    def certificate_id(self, thing: str) -> str:
        client = device_module()
        paths = client.StatePaths.for_thing(str(self.devices), thing)
        return str(client.read_endpoint(paths.endpoint, paths.cert).get("certificateId"))

    def stop(self) -> None:
        for running in self.running.values():
            running.stop()


class RunningDevice:
    """A device client in the background; its output is read line by line and shown when the story follows it."""

    def __init__(self, thing: str, argv: list[str]):
        self.thing = thing
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.process = subprocess.Popen([sys.executable, *argv], cwd=PROJECT_DIR, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=die_with_parent)
        threading.Thread(target=self._read, name=f"output of {thing}", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def follow(self, *patterns: str) -> re.Match:
        """Show the device's lines until each pattern has matched a line, in order; the first pattern's match.
        Of the lines printed before this step, acknowledgements are counted rather than shown."""
        first = None
        deadline = time.monotonic() + WAIT
        backlog, skipped = True, 0
        for pattern in patterns:
            while True:
                try:
                    line = (self.lines.get_nowait() if backlog
                            else self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    if not backlog:
                        raise DemoFailed(f"{self.thing} did not print /{pattern}/ within {WAIT:.0f} s") from None
                    backlog = False
                    continue
                if line is None:
                    self.lines.put(None)
                    raise DemoFailed(f"{self.thing} exited (code {self.process.wait()}) before printing /{pattern}/")
                match = re.search(pattern, line)
                if backlog and not match and "acknowledged: " in line:
                    skipped += 1
                    continue
                if skipped:
                    print(f"  {self.thing} | ({skipped} message(s) acknowledged meanwhile)")
                    skipped = 0
                print(f"  {self.thing} | {brief(line)}", flush=True)
                if match:
                    first = first or match
                    break
        if skipped:
            print(f"  {self.thing} | ({skipped} message(s) acknowledged meanwhile)", flush=True)
        assert first is not None
        return first

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="demo", help="the demo's directory, replaced at every run if the demo "
                                                      "made it (default: demo, in the project)")
    args = parser.parse_args(argv)
    die_with_parent()
    home = (PROJECT_DIR / args.dir).resolve()  # a relative --dir is the project's, where make runs
    api_port = int(os.environ.get("API_PORT") or 8000)
    for name in [name for name in os.environ if name.startswith("GIP_")]:
        del os.environ[name]  # the local stage's defaults, whatever the caller's stage is set to
    if not can_listen(api_port):
        print(f"error: port {api_port} is in use (is make local running?); give the demo another: "
              "make demo API_PORT=<port>", file=sys.stderr)
        return 1
    try:
        own_directory(home)
    except DemoFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    os.environ.update(GIP_STATE_DIR=str(home), GIP_MQTT_BASE_PORT=str(free_port_run(11)))
    settings = Settings.for_stage("local", str(home))

    section(1, "Start the local stage: a CA and an MQTT broker per region, the API")
    print(f"The demo's state (registry, CAs, keys, devices' files, logs, report): {shown(home)}/\n"
          "  (made for the demo and replaced by the next make demo; the local stage of make local is elsewhere)")
    stack = LocalStack(settings, api_port)
    demo = None
    try:
        stack.start()
        with Monitor(stack.files) as monitor:
            demo = Demo(home, stack, monitor)
            demo.run()
    except (StackError, ConfigError, DemoFailed, TimeoutError) as exc:
        print(f"error: {exc}\n(what the demo made, the services' logs included, is in {shown(home)}/)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if demo is not None:
            demo.stop()
        section(11, "Stop everything")
        stack.stop()
        print("mosquitto and chalice local stopped", flush=True)
    return fleet_report(home)


def fleet_report(home: Path) -> int:
    section(12, "The fleet report, with the audit: one HTML page with a world map, no network needed")
    path = home / "report.html"
    print(command(["python", "-m", "admin", "--state-dir", shown(home), "report", "--html", shown(path), "--audit"]),
          flush=True)
    if admin.main(["--state-dir", str(home), "report", "--html", str(path), "--audit"]) != 0:
        return 1
    notice("counts by status, region and country, the map, certificates expiring soon, and the audit's findings "
           "(none)")
    print(f"Open it in a browser: {path.as_uri()}\n  or from here: python -m webbrowser {path.as_uri()}", flush=True)
    print(f"Everything the demo made is in {shown(home)}/ (the next make demo replaces it).", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
