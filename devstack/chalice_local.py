"""`chalice local`, with a listen backlog fit for a burst of devices.

chalice's local server keeps the standard library's backlog of 5 pending connections: a factory line of
devices starting at once gets connections reset before the app sees them. Same CLI, same arguments.
"""
import sys

from chalice import local
from chalice.cli import main

local.ThreadedHTTPServer.request_queue_size = 1024


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
