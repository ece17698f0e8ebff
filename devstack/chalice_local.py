"""`chalice local`, with a listen backlog fit for a burst of devices, no Nagle stall and a read timeout.

chalice's local server keeps the standard library's backlog of 5 pending connections: a factory line of
devices starting at once gets connections reset before the app sees them. It also writes the headers and the
body of every answer in two sends; without TCP_NODELAY the body waits for the client's delayed ACK (about
40 ms on Linux loopback, on every request). And it reads without a timeout, so a client that announces more
body than it sends, or leaves a kept-alive connection half-open, holds a server thread for ever. Same CLI,
same arguments.
"""
import os
import sys

from chalice import local
from chalice.cli import main

# A request's headers and body arrive within this many seconds of each other, or the connection is closed
# (BaseHTTPRequestHandler logs "Request timed out"); also how long an idle kept-alive connection stays open.
READ_TIMEOUT_SECONDS = float(os.environ.get("DEVSTACK_READ_TIMEOUT", "30"))

local.ThreadedHTTPServer.request_queue_size = 1024
local.ChaliceRequestHandler.disable_nagle_algorithm = True  # socketserver sets TCP_NODELAY on each connection
local.ChaliceRequestHandler.timeout = READ_TIMEOUT_SECONDS  # socketserver sets it on each connection


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
