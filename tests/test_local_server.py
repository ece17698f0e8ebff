"""devstack's wrapper around `chalice local`: no Nagle stall, and no thread pinned by a slow or lying client."""
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from chalice import local
from chalice.config import Config

import devstack.chalice_local  # noqa: F401  (its import configures chalice's local server)
from chalicelib.config import PROJECT_DIR
from devstack.stack import free_port


def test_every_connection_gets_tcp_nodelay(stage):  # a stage with keys and a registry: /health is 200
    """Chalice sends headers and body in two writes; with Nagle on, the body waits for the client's delayed ACK."""
    seen = []

    class Recording(local.ChaliceRequestHandler):
        def setup(self):
            super().setup()
            seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    from app import app
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


@pytest.fixture
def server(stage):
    """The wrapper as `make local` starts it, with a 1 s read timeout, on a stage with keys and a registry."""
    port = free_port()
    env = {**os.environ, "GIP_STATE_DIR": str(stage.state_dir), "DEVSTACK_READ_TIMEOUT": "1"}
    process = subprocess.Popen([sys.executable, "devstack/chalice_local.py", "local", "--stage", "local",
                                "--host", "127.0.0.1", "--port", str(port), "--no-autoreload"],
                               cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "chalice local did not start"
            time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(10)


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(20)  # far above the server's 1 s; without a server timeout this raises TimeoutError
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_a_lying_content_length_is_cut_off_and_the_server_keeps_serving(server):
    with socket.create_connection(("127.0.0.1", server)) as liar:
        liar.sendall(b"POST /device-provisioning HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"thing-name\": ")
        assert closed_by_server(liar)
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/health", timeout=30) as response:
        assert response.status == 200


def test_a_half_open_keep_alive_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server)) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.settimeout(20)
        answer = idle.makefile("rb")
        assert answer.readline().startswith(b"HTTP/1.1 200")
        headers = dict(line.decode().strip().lower().split(": ", 1) for line in iter(answer.readline, b"\r\n"))
        answer.read(int(headers["content-length"]))
        assert closed_by_server(idle)  # the client never sends its next request


def test_a_client_that_never_sends_its_headers_is_closed(server):
    with socket.create_connection(("127.0.0.1", server)) as silent:
        silent.sendall(b"GET /hea")
        assert closed_by_server(silent)


def test_unknown_paths_methods_and_content_types_answer_as_on_api_gateway(server):
    import json
    import urllib.error

    def call(method, path, content_type=None):
        request = urllib.request.Request(f"http://127.0.0.1:{server}{path}", data=b'{"thing-name": "x"}',
                                         method=method, headers={"Content-Type": content_type} if content_type else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    missing = (403, {"message": "Missing Authentication Token"})
    assert call("GET", "/nowhere") == missing
    assert call("GET", "/device-provisioning") == missing
    assert call("PUT", "/health") == missing
    for content_type in (None, "text/plain", "application/octet-stream"):
        status, body = call("POST", "/device-provisioning", content_type)
        assert status != 415 and body["status"] == "error" and body["code"] and body["message"], (status, body)
