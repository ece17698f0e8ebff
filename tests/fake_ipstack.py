"""A stand-in for ipstack on 127.0.0.1 (the prod stage's HTTP geolocation), for tests and the bench.

Answers GET /<ip> with what was put in `answers` (404 otherwise), after `delay` seconds; records each call, and
when it started and ended (`spans`, perf_counter seconds: the bench's critical path).
"""
import json
import time
from urllib.parse import parse_qs, urlsplit

from tests.loopback import LoopbackServer, QuietHandler


class FakeIpstack(LoopbackServer):
    def __init__(self, delay: float = 0.0):
        self.answers: dict[str, dict] = {}
        self.calls: list[tuple[str, dict]] = []
        self.spans: list[tuple[float, float]] = []
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                parts = urlsplit(self.path)
                ip = parts.path.strip("/")
                fake.calls.append((ip, parse_qs(parts.query)))
                began = time.perf_counter()
                time.sleep(fake.delay)
                answer = fake.answers.get(ip)
                body = json.dumps(answer if answer is not None else {"success": False}).encode()
                self.send_response(200 if answer is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                fake.spans.append((began, time.perf_counter()))

        self.delay = delay
        super().__init__(Handler, path="/{ip}", poll=0.05)
