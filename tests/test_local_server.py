"""devstack's wrapper around `chalice local` (devstack/chalice_local.py), as `make local` runs it, over real sockets:
no Nagle stall; hostile framing answered at once in the design's error body; no thread held by a slow or lying
client (a total deadline per request); a bound on connections; every method answered in JSON."""
import json
import os
import re
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from chalice import local
from chalice.config import Config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from admin import cli as admin
from chalicelib.config import FLEET_PRIVATE_KEY_NAME, PROJECT_DIR
from chalicelib.container import Container
from chalicelib.edge.http import create_app
from chalicelib.edge.wire import MAX_BODY_BYTES
from devstack.chalice_local import MAX_HEADER_BYTES, RequestHandler
from devstack.stack import free_port
from tests.conftest import LONDON_IP, make_csr, sign_v1

DEADLINE = 1  # seconds, for the servers below (the default is 30)
MISSING_TOKEN = {"message": "Missing Authentication Token"}


def test_every_connection_gets_tcp_nodelay(stage):  # a stage with keys and a registry: /health is 200
    """Chalice sends headers and body in two writes; with Nagle on, the body waits for the client's delayed ACK."""
    seen = []

    class Recording(RequestHandler):
        def setup(self):
            super().setup()
            seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    app = create_app(Container())  # the stage's settings from the environment, as chalice local's app
    server = local.LocalDevServer(app, Config(chalice_stage="local"), "127.0.0.1", free_port(), handler_cls=Recording)
    thread = threading.Thread(target=server.server.handle_request, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=30) as response:
            assert response.status == 200
    finally:
        thread.join(30)
        server.server.server_close()
    assert seen and all(seen)


# --- the wrapper as `make local` starts it ----------------------------------------------------------------------

@dataclass
class Server:
    port: int
    pid: int
    log: Path
    fleet_key: rsa.RSAPrivateKey

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(20)  # far above the server's deadline: a server that waits for ever fails the test
        return sock

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))

    def assert_no_traceback(self) -> None:
        assert "Traceback" not in self.log.read_text(errors="replace")


def start_server(state_dir: Path, log: Path, **env: str):
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GIP_", "DEVSTACK_"))}
    environ.update({"GIP_STATE_DIR": str(state_dir), "DEVSTACK_REQUEST_DEADLINE": str(DEADLINE), **env})
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "devstack/chalice_local.py", "local", "--stage", "local",
                                    "--host", "127.0.0.1", "--port", str(port), "--no-autoreload"],
                                   cwd=PROJECT_DIR, env=environ, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    return process, port


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """Keys and mydevice1..5, made by the CLI; shared by the module's servers."""
    state_dir = tmp_path_factory.mktemp("local-server") / "state"
    for argv in (["keygen"], ["register", "--prefix", "mydevice", "--count", "5"]):
        assert admin.main(["--state-dir", str(state_dir), *argv]) == 0
    key = serialization.load_pem_private_key((state_dir / "keys" / FLEET_PRIVATE_KEY_NAME).read_bytes(), None)
    return state_dir, key


@pytest.fixture(scope="module")
def server(state, tmp_path_factory):
    state_dir, key = state
    log = tmp_path_factory.mktemp("local-server-log") / "chalice.log"
    process, port = start_server(state_dir, log)
    yield Server(port, process.pid, log, key)
    process.terminate()
    process.wait(10)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer: status, headers (lower-case names), body."""
    stream = sock.makefile("rb")
    status_line = stream.readline()
    match = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n", status_line)
    assert match, status_line
    headers = {}
    for line in iter(stream.readline, b"\r\n"):
        assert line, "the answer's headers ended early"
        name, value = line.decode("latin-1").split(":", 1)
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(match.group(1)), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""  # without a deadline on the server this raises TimeoutError (20 s)
    except ConnectionResetError:
        return True


def assert_design_error(status: int, headers: dict, body: bytes, expected: int, code: str) -> dict:
    assert status == expected, (status, body)
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert set(answer) == {"status", "code", "message"} and answer["status"] == "error" and answer["code"] == code
    assert answer["message"]
    return answer


def provisioning_head(length: str | None = None, extra: str = "") -> bytes:
    head = "POST /device-provisioning HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode("latin-1")


def provisioning_body(server: Server, thing: str, csr: str | None = None) -> dict:
    body = {"thing-name": thing, "thing-name-sig": sign_v1(server.fleet_key, thing)}
    return {**body, "CSR": csr} if csr else body


def post(server: Server, body: dict, headers: str = "") -> tuple[int, dict]:
    data = json.dumps(body).encode()
    with server.connect() as sock:
        sock.sendall(provisioning_head(str(len(data)), headers + "Connection: close\r\n") + data)
        status, _, answer = read_answer(sock)
    return status, json.loads(answer)


# --- framing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, status, code", [
    ("abc", 400, "malformed-request"),
    ("-1", 400, "malformed-request"),
    ("+5", 400, "malformed-request"),
    ("0x10", 400, "malformed-request"),
    ("1e3", 400, "malformed-request"),
    ("12, 12", 400, "malformed-request"),
    ("", 400, "malformed-request"),
    (str(MAX_BODY_BYTES + 1), 413, "body-too-large"),
    ("8000000000", 413, "body-too-large"),
    ("9" * 5000, 413, "body-too-large"),  # longer than int() reads by default
    (None, 411, "malformed-request"),
])
def test_hostile_content_lengths_are_answered_at_once_and_nothing_is_read(server, length, status, code):
    """Headers only, then the client waits: an answer that needed the body would come after the deadline, as 408."""
    with server.connect() as sock:
        sock.sendall(provisioning_head(length) + b"abc")
        answer = assert_design_error(*read_answer(sock), status, code)
        assert closed_by_server(sock)
    if status == 413:
        assert str(MAX_BODY_BYTES) in answer["message"]
    server.assert_no_traceback()


def test_a_length_with_leading_zeros_is_a_length(server):
    with server.connect() as sock:
        sock.sendall(provisioning_head("0" * 5000 + "7") + b'"abcde"')  # 7 bytes of JSON, not an object
        answer = assert_design_error(*read_answer(sock), 400, "malformed-request")
    assert "JSON object" in answer["message"]  # the app's answer: the dev server read the 7 bytes


@pytest.mark.parametrize("extra", ["Transfer-Encoding: chunked\r\n", "Content-Length: 5\r\nContent-Length: 6\r\n"])
def test_chunked_bodies_and_conflicting_lengths_are_refused(server, extra):
    with server.connect() as sock:
        sock.sendall(provisioning_head(None, extra) + b"5\r\nhello\r\n0\r\n\r\n")
        status, headers, body = read_answer(sock)
        assert_design_error(status, headers, body, 411 if "chunked" in extra else 400, "malformed-request")
        assert closed_by_server(sock)


def test_a_large_body_is_refused_without_being_read_into_memory(server):
    size = 64 * 1024 * 1024
    before = server.peak_rss_kib()
    with server.connect() as sock:
        sock.sendall(provisioning_head(str(size)))

        def send_body():
            try:
                for _ in range(size // 65536):
                    sock.sendall(b"x" * 65536)
            except OSError:  # the server closed after its answer: the rest was never wanted
                pass

        sender = threading.Thread(target=send_body)
        sender.start()
        assert_design_error(*read_answer(sock), 413, "body-too-large")
        assert closed_by_server(sock)
        sender.join(30)
    # Reading the body first (as chalice does) would have raised the server's peak by the whole body.
    assert server.peak_rss_kib() - before < size // 1024 // 4


def test_expect_100_continue_comes_only_for_an_acceptable_length(server):
    with server.connect() as sock:
        sock.sendall(provisioning_head(str(MAX_BODY_BYTES * 10), "Expect: 100-continue\r\n"))
        assert_design_error(*read_answer(sock), 413, "body-too-large")  # not 100 Continue
    body = json.dumps(provisioning_body(server, "mydevice4")).encode()
    with server.connect() as sock:
        sock.sendall(provisioning_head(str(len(body)), "Expect: 100-continue\r\n"))
        assert read_answer(sock)[0] == 100
        sock.sendall(body)
        status, _, answer = read_answer(sock)
        assert status == 200, answer


def test_headers_over_the_bound_get_431(server):
    with server.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n")
        assert_design_error(*read_answer(sock), 431, "malformed-request")


def test_a_bad_request_line_gets_a_status_line_and_the_design_body(server):
    for line, status in ((b"GET /health HTTP/9.1", 505), (b"GET /health HTTQ/1.1", 400), (b"GET / x HTTP/1.1", 400),
                         (b" \t ", 400)):
        with server.connect() as sock:
            sock.sendall(line + b"\r\n\r\n")
            assert_design_error(*read_answer(sock), status, "malformed-request")


# --- deadlines ---------------------------------------------------------------------------------------------------

def test_a_lying_content_length_gets_408_and_the_server_keeps_serving(server):
    with server.connect() as liar:
        liar.sendall(provisioning_head("1000") + b'{"thing-name": ')
        assert_design_error(*read_answer(liar), 408, "request-timeout")
        assert closed_by_server(liar)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=30) as response:
        assert response.status == 200


def test_a_client_sending_a_header_line_now_and_then_is_cut_off(server):
    """The deadline is the request's, not each recv's: every line arrives well within a second, yet the request
    as a whole never does."""
    with server.connect() as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(DEADLINE / 4)
        answer = b""
        for sent in range(200):  # 50 times the deadline
            try:
                slow.sendall(f"X-Line-{sent}: still here\r\n".encode())
                answer = slow.recv(4096)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert answer.startswith(b"HTTP/1.1 408 "), (sent, answer)
        assert sent < 200


def test_a_half_open_keep_alive_connection_is_closed(server):
    with server.connect() as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(idle)[0] == 200
        assert closed_by_server(idle)  # the client never sends its next request: closed, nothing said


def test_a_client_that_never_finishes_its_request_line_gets_408(server):
    with server.connect() as silent:
        silent.sendall(b"GET /hea")
        assert_design_error(*read_answer(silent), 408, "request-timeout")
        assert closed_by_server(silent)


# --- methods and paths -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["TRACE", "get", "post", "Post", "FOO", "PROPFIND", "CONNECT", "DELETE"])
@pytest.mark.parametrize("path", ["/health", "/device-provisioning", "/nowhere"])
def test_any_method_the_api_does_not_have_is_answered_as_api_gateway_does(server, method, path):
    with server.connect() as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        status, headers, body = read_answer(sock)
    assert (status, json.loads(body)) == (403, MISSING_TOKEN)
    assert headers["content-type"] == "application/json"


def test_unknown_paths_methods_and_content_types_answer_as_on_api_gateway(server):
    import urllib.error

    def call(method, path, content_type=None):
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=b'{"thing-name": "x"}',
                                         method=method, headers={"Content-Type": content_type} if content_type else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    missing = (403, MISSING_TOKEN)
    assert call("GET", "/nowhere") == missing
    assert call("GET", "/device-provisioning") == missing
    assert call("PUT", "/health") == missing
    for content_type in (None, "text/plain", "application/octet-stream"):
        status, body = call("POST", "/device-provisioning", content_type)
        assert status != 415 and body["status"] == "error" and body["code"] and body["message"], (status, body)


# --- generated requests: every one answered, with a status line and a JSON body ---------------------------------

TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=12)
FIELD_TEXT = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40)
REQUEST_PARTS = st.fixed_dictionaries({
    "method": st.one_of(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "TRACE", "get", "post"]), TOKEN),
    "path": st.one_of(st.sampled_from(["/health", "/device-provisioning", "/device-renewal", "/", "*", "//x",
                                       "/health?x=1&x", "http://x/health", "/%00", "/a/../health", "/health/"]),
                      st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n \t\x0b\x0c\x1c"
                                                                                        "\x1d\x1e\x1f\x85\xa0"),
                              min_size=1, max_size=40)),
    "version": st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1.1", "HTTPS/1.1", "HTTP/x", "http/1.1"]),
    "length": st.one_of(st.none(), st.integers(-3, 10**12).map(str), FIELD_TEXT,
                        st.sampled_from(["", " 7 ", "+3", "1e3", "0x10", "3, 3", "\xef\xbc\x99"])),
    "chunked": st.booleans(),
    "headers": st.lists(st.tuples(TOKEN, FIELD_TEXT), max_size=4),
    "body": st.binary(max_size=64),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=REQUEST_PARTS)
def test_every_generated_request_gets_an_answer_in_json(server, parts):
    head = f"{parts['method']} {parts['path']} {parts['version']}\r\nHost: x\r\n"
    for name, value in parts["headers"]:
        head += f"{name}: {value}\r\n"
    if parts["length"] is not None:
        head += f"Content-Length: {parts['length']}\r\n"
    if parts["chunked"]:
        head += "Transfer-Encoding: chunked\r\n"
    with server.connect() as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + parts["body"])
        sock.shutdown(socket.SHUT_WR)  # a body shorter than announced ends here: answered now, not at the deadline
        status, headers, body = read_answer(sock)
    assert status in (200, 400, 403, 411, 413, 431, 505), (status, body)
    if status == 200:  # GET /health, or chalice's own answer to OPTIONS (README, "Wire protocol")
        assert parts["method"] in ("GET", "OPTIONS")
    elif body or parts["method"] != "HEAD":
        answer = json.loads(body)
        assert answer == MISSING_TOKEN or (answer["status"] == "error" and answer["code"] and answer["message"])
    server.assert_no_traceback()


# --- the key policy and the client address, over a real server -------------------------------------------

def test_a_csr_with_public_exponent_3_is_400_malformed_csr(server):
    csr = make_csr("mydevice1", rsa.generate_private_key(public_exponent=3, key_size=2048))[0]
    status, answer = post(server, provisioning_body(server, "mydevice1", csr))
    assert (status, answer["code"]) == (400, "malformed-csr") and "65537" in answer["message"], answer


def test_an_invalid_right_most_forwarded_hop_makes_the_header_untrusted(server):
    """The local stage trusts X-Forwarded-For; a right-most hop that is no address must not let the client's own
    hop (London) choose the region: the socket's address (loopback: no location) does, as the default region."""
    status, answer = post(server, provisioning_body(server, "mydevice2"), f"X-Forwarded-For: {LONDON_IP}, nonsense\r\n")
    assert status == 200 and answer["reason"] == "default" and "country" not in answer, answer
    status, answer = post(server, provisioning_body(server, "mydevice3"), f"X-Forwarded-For: 10.1.1.1, {LONDON_IP}\r\n")
    assert status == 200 and answer["reason"] == "nearest" and answer["country"] == "GB", answer


# --- the bound on connections ------------------------------------------------------------------------------------

def test_connections_past_the_bound_get_503_and_a_freed_slot_serves_again(state, tmp_path):
    process, port = start_server(state[0], tmp_path / "chalice.log", DEVSTACK_MAX_CONNECTIONS="2",
                                 DEVSTACK_REQUEST_DEADLINE="30")
    held = []
    try:
        server = Server(port, process.pid, tmp_path / "chalice.log", state[1])
        with server.connect() as sock:  # read to the end: the readiness check's connection is closed by now
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_answer(sock)[0] == 200 and closed_by_server(sock)
        for _ in range(2):  # kept-alive connections, each served once: both slots held
            held.append(server.connect())
            held[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(held[-1])[0] == 200
        with server.connect() as third:
            third.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_answer(third)
            assert_design_error(status, headers, body, 503, "service-unavailable")
            assert int(headers["retry-after"]) > 0
        held.pop().close()
        for _ in range(100):  # the server frees the slot when its thread sees the close
            with server.connect() as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if read_answer(sock)[0] == 200:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("a freed slot was never used again")
        server.assert_no_traceback()
    finally:
        for sock in held:
            sock.close()
        process.terminate()
        process.wait(10)
