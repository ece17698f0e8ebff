"""`chalice local`, with a listen backlog fit for a burst of devices.

chalice's local server keeps the standard library's backlog of 5 pending connections: a factory line of
devices starting at once gets connections reset before the app sees them. Same CLI, same arguments.
"""
import sys

from chalice import local
from chalice.cli import main

local.ThreadedHTTPServer.request_queue_size = 1024

# The access log line is written before the answer: on a full disk (ENOSPC) or a closed stream the handler
# thread died and the device got an empty reply. The answer matters more than its log line.
_log_message = local.ChaliceRequestHandler.log_message


def _log_message_or_not(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
    try:
        _log_message(self, format, *args)
    except (OSError, ValueError):
        pass


local.ChaliceRequestHandler.log_message = _log_message_or_not

if __name__ == "__main__":
    sys.exit(main())
