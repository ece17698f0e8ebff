"""`chalice local` as devstack runs it: a server that answers every request and that no client can hold or swell.

chalice's local server is the standard library's, which trusts its clients. Here, on top of it:
- a listen backlog of 1024 (not 5: a factory line of devices starting at once got connections reset) and
  TCP_NODELAY (chalice writes an answer's headers and body in two sends; with Nagle the body waited for the
  client's delayed ACK, about 40 ms on Linux loopback, on every request);
- the framing checked before any body is read: `Content-Length` not a number, negative, or over the body limit
  (wire.MAX_BODY_BYTES), missing on a POST/PUT/PATCH, or `Transfer-Encoding` (chunked bodies are not accepted)
  is answered 400, 411 or 413 at once, so a lying length reserves nothing (`Content-Length: 8000000000` made
  the process reserve 8.9 GB) and a large body is never read into memory (a 200 MB one was, before the 16 KiB
  check); the request line and headers are bounded too (MAX_HEADER_BYTES);
- a total deadline per request for its request line, headers and body (DEVSTACK_REQUEST_DEADLINE), counted
  from when the server starts waiting for it, not per `recv`: a client sending a header line every few
  seconds was held for ever, a thread each; past it the request gets 408 (a connection that sent nothing of
  its next request is just closed);
- at most DEVSTACK_MAX_CONNECTIONS connections at once, each with its thread; the next gets 503 with
  Retry-After from the accepting thread, without a thread of its own;
- every error in the design's body `{"status": "error", "code", "message"}` (never the standard library's HTML),
  and every method, whatever its spelling (`get`, TRACE, anything), goes to the app, which answers a method
  or path the API does not have as API Gateway does (403 `{"message": "Missing Authentication Token"}`,
  app.answer_undefined_methods_like_api_gateway), not the standard library's 501 HTML.
Prod has API Gateway in front of the function; none of this is in the Lambda package. Same CLI, same arguments.
"""
import io
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from pathlib import Path
from typing import Any

from chalice import local
from chalice.cli import main

# Run as a script (stack.py does), this file's folder is on sys.path, not the project: chalice adds the project
# only when it loads app.py, and the limits below come from the service's own modules.
PROJECT_DIR = str(Path(__file__).resolve().parent.parent)
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)

from chalicelib.domain.errors import BodyTooLarge, MalformedRequest, ServiceUnavailable  # noqa: E402
from chalicelib.edge.wire import MAX_BODY_BYTES, error_body  # noqa: E402

# A request's line, headers and body arrive whole within this many seconds of the server starting to wait for
# it (the connection accepted, or the previous answer sent); it also ends an idle kept-alive connection.
REQUEST_DEADLINE_SECONDS = float(os.environ.get("DEVSTACK_REQUEST_DEADLINE", "30"))
# Connections served at once (a thread each). `make chaos` keeps about 76 requests in flight.
MAX_CONNECTIONS = int(os.environ.get("DEVSTACK_MAX_CONNECTIONS", "256"))
# The request line and headers together; devices and browsers send well under 2 KiB. Bounds what a connection
# holds before its body (the standard library allows 100 lines of 64 KiB each).
MAX_HEADER_BYTES = 32 * 1024
# After refusing a request whose body was not read, how long the unread bytes are drained before the socket is
# closed: closing with unread input sends a reset, which can reach the client before it reads the refusal.
LINGER_SECONDS = 2.0

_DIGITS = re.compile(r"[0-9]+")
_BODY_METHODS = ("POST", "PUT", "PATCH")  # a request with these methods says how long its body is
# The design's error codes for the dev server's own refusals; 408 has none of its own in the design.
_ERROR_CODES = {HTTPStatus.REQUEST_ENTITY_TOO_LARGE: BodyTooLarge.code,
                HTTPStatus.SERVICE_UNAVAILABLE: ServiceUnavailable.code,
                HTTPStatus.REQUEST_TIMEOUT: "request-timeout"}


class RequestDeadlinePassed(Exception):
    """The request did not arrive whole within REQUEST_DEADLINE_SECONDS."""


class HeadersTooLarge(Exception):
    """The request line and headers are over MAX_HEADER_BYTES."""


class _DeadlineSocket(io.RawIOBase):
    """The connection's input; each `recv` may wait only for what is left of the current request's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = float("inf")
        self.received = 0  # bytes received since the deadline was set

    def start(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestDeadlinePassed()
        self._sock.settimeout(left)
        try:
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            raise RequestDeadlinePassed() from None
        self.received += count
        return count


class _RequestReader(io.BufferedReader):
    """Buffered input whose lines, while `header_budget` is set, may together take at most that many bytes."""

    header_budget: int | None = None

    def readline(self, size: int | None = -1) -> bytes:
        if self.header_budget is None:
            return super().readline(size)
        limit = self.header_budget + 1 if size is None or size < 0 else min(size, self.header_budget + 1)
        line = super().readline(limit)
        self.header_budget -= len(line)
        if self.header_budget < 0:
            raise HeadersTooLarge()
        return line


class RequestHandler(local.ChaliceRequestHandler):
    disable_nagle_algorithm = True  # socketserver sets TCP_NODELAY on each connection
    timeout = REQUEST_DEADLINE_SECONDS  # socketserver sets it on each connection; _DeadlineSocket narrows it
    rfile: Any  # chalice imports the standard library's handler through six.moves: mypy sees no types there

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the standard library's reader: an open one would keep the socket from closing
        self._input = _DeadlineSocket(self.connection)
        self._reader = _RequestReader(self._input)
        self.rfile = self._reader
        self._body: bytes | None = None
        self._expects_continue = False
        self._answered = False
        self._unread_input = False

    def handle_one_request(self) -> None:
        """The standard library's, with the framing checked before the body is read, the body read here under
        the deadline, every method handed to the app, and every failure answered or closed without a trace."""
        self._input.start(REQUEST_DEADLINE_SECONDS)
        self._reader.header_budget = MAX_HEADER_BYTES
        self._body, self._expects_continue, self._answered = None, False, False
        # What an answer before parse_request needs (as the standard library sets them for its 414).
        self.command, self.request_version, self.requestline, self.raw_requestline = "", "", "", b""
        try:
            line = self.rfile.readline()
            while line in (b"\r\n", b"\n"):  # RFC 9112 2.2: empty lines before a request line are ignored
                line = self.rfile.readline()
            self.raw_requestline = line
            if not line:
                self.close_connection = True
                return
            if not self.parse_request():  # it answered (400, 431, 505) through send_error, but for a blank line
                if not self._answered:
                    self.send_error(HTTPStatus.BAD_REQUEST, "the request line is blank")
                self._unread_input = True
                return
            self._reader.header_budget = None
            length = self._content_length()
            if length is None:  # answered
                self._unread_input = True
                return
            if not self._read_body(length):
                return
            self.connection.settimeout(REQUEST_DEADLINE_SECONDS)  # the answer's writes
            self._generic_handle()  # any method: the app answers those the API does not have (see module doc)
            self.wfile.flush()
        except HeadersTooLarge:
            self._unread_input = True
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"the request line and headers must be at most {MAX_HEADER_BYTES} bytes")
        except RequestDeadlinePassed:
            self.close_connection = True
            begun = self._input.received or self.raw_requestline  # (a pipelined request is already buffered)
            if begun and not self._answered:  # a request begun and not finished: say why
                self.connection.settimeout(REQUEST_DEADLINE_SECONDS)
                self._unread_input = True
                self.send_error(HTTPStatus.REQUEST_TIMEOUT,
                                f"the request did not arrive whole within {REQUEST_DEADLINE_SECONDS:g} s")
        except OSError as exc:  # the client went away, or stopped reading its answer: nothing to answer
            self.close_connection = True
            self.log_error("connection dropped: %s", exc)
        except Exception:  # a bug (here or in chalice's gateway): logged in full, answered 503, never a 500
            self.close_connection = True
            self.log_error("unexpected failure answering %r", self.requestline)
            traceback.print_exc()
            if not self._answered:
                self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "the dev server failed unexpectedly; try again")

    def _content_length(self) -> int | None:
        """The body's length, or None once the framing has been refused (400, 411, 413)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.send_error(HTTPStatus.LENGTH_REQUIRED, "Transfer-Encoding is not accepted: send the body with a "
                                                        f"Content-Length (at most {MAX_BODY_BYTES} bytes)")
            return None
        values = {value.strip() for value in self.headers.get_all("Content-Length") or ()}
        if not values:
            if self.command in _BODY_METHODS:
                self.send_error(HTTPStatus.LENGTH_REQUIRED, f"a {self.command} needs a Content-Length "
                                                            f"(at most {MAX_BODY_BYTES} bytes)")
                return None
            return 0
        text = values.pop()
        if values:
            self.send_error(HTTPStatus.BAD_REQUEST, "Content-Length is given twice, with different values")
            return None
        if not _DIGITS.fullmatch(text):
            self.send_error(HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of bytes, not {text[:40]!r}")
            return None
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(MAX_BODY_BYTES)) or int(digits) > MAX_BODY_BYTES:  # no int() of 5000 digits
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body must be at most {MAX_BODY_BYTES} "
                                                                 f"bytes; Content-Length says {text[:40]}")
            return None
        return int(digits)

    def handle_expect_100(self) -> bool:
        # parse_request would send 100 Continue at once; it is sent once the framing is accepted (_read_body).
        self._expects_continue = True
        return True

    def _read_body(self, length: int) -> bool:
        """Read the announced body (at most MAX_BODY_BYTES, under the request's deadline); False once answered."""
        if length and self._expects_continue:
            super().handle_expect_100()
            self.wfile.flush()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.send_error(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of the {length} bytes "
                                                    "Content-Length announced")
            return False
        self._body = body or None  # as chalice's own reading: no body is None
        return True

    def _parse_payload(self) -> tuple[dict[str, Any], bytes | None]:
        return dict(self.headers), self._body  # read by _read_body, never by chalice

    def send_response_only(self, code: int, message: str | None = None) -> None:
        if code >= 200:
            self._answered = True
        super().send_response_only(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every refusal of the dev server itself, and those of the standard library's parse_request, in the
        design's error body; the connection is closed after it."""
        status = HTTPStatus(code)
        text = (message or status.phrase) + (f": {explain}" if explain else "")
        self.log_error("code %d, message %s", code, text)
        body = json.dumps(error_body(_ERROR_CODES.get(status, MalformedRequest.code), text)).encode()
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # parse_request's default, also when the version was refused
            self.request_version = ""  # (HTTP/0.9 would mean a body without a status line)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the answer could not be flushed: the client is gone
            pass
        if self._unread_input:
            _linger(self.connection)


def _linger(sock: socket.socket) -> None:
    """End our side of the connection, then drain what the client still sends for a while, without keeping it, so
    that closing does not reset the connection before the client has read our answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
        until = time.monotonic() + LINGER_SECONDS
        scratch = bytearray(16384)  # per lingering connection: 256 of them at once hold 4 MB
        while (left := until - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv_into(scratch):
                break
    except OSError:  # timed out, or reset by the client: done either way
        pass


class BoundedHTTPServer(local.ThreadedHTTPServer):
    """chalice's threaded server with a deep listen backlog and at most `max_connections` connections at once."""

    request_queue_size = 1024
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[Any] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = len(self._open) >= self.max_connections
            if not full:
                self._open.add(request)
        if full:
            self._refuse(request)
            return
        super().process_request(request, client_address)  # a thread; on failure socketserver shuts it down

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)  # before the close, so a client that saw it closed finds the slot free
        super().shutdown_request(request)

    def _refuse(self, request: socket.socket) -> None:
        """503 from the accepting thread, which must never wait on a client: non-blocking writes and reads only."""
        body = json.dumps(error_body(ServiceUnavailable.code, f"the dev server has {self.max_connections} "
                                                              "connections open; try again")).encode()
        answer = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                  f"{len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode() + body
        sys.stderr.write(f"refused a connection: {self.max_connections} open (DEVSTACK_MAX_CONNECTIONS)\n")
        try:
            request.setblocking(False)
            request.send(answer)
            for _ in range(16):  # what the client already sent, so that the close is not a reset
                if not request.recv(65536):
                    break
        except OSError:  # nothing more arrived yet (EAGAIN), or the client is gone
            pass
        self.shutdown_request(request)


class DevServer(local.LocalDevServer):
    """chalice's LocalDevServer with this module's handler and server."""

    def __init__(self, app_object: Any, config: Any, host: str, port: int,
                 handler_cls: Any = RequestHandler, server_cls: Any = BoundedHTTPServer) -> None:
        super().__init__(app_object, config, host, port, handler_cls, server_cls)


# chalice's create_local_server (what `chalice local` calls) looks the class up when it runs.
setattr(local, "LocalDevServer", DevServer)  # noqa: B010 - an assignment mypy would refuse (a class attribute)


class _LogStream:
    """stdout/stderr that lose a line rather than raise. The access log line is written before the answer, and
    the app's log lines and metrics go to stdout: on a full disk (ENOSPC) the handler thread died and the device
    got an empty reply. The answer matters more than its log line."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


if __name__ == "__main__":
    sys.stdout, sys.stderr = _LogStream(sys.stdout), _LogStream(sys.stderr)
    sys.exit(main())
