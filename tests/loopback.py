"""A test's HTTP server on 127.0.0.1: a handler class served in a thread while the `with` block runs."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # the test's output stays the test's
        pass


class LoopbackServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler], path: str = "/api/", poll: float = 0.02):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(poll,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
