"""`chalice local`, with a listen backlog fit for a burst of devices.

chalice's local server keeps the standard library's backlog of 5 pending connections: a factory line of
devices starting at once gets connections reset before the app sees them. Same CLI, same arguments.
"""
import sys

from chalice import local
from chalice.cli import main

local.ThreadedHTTPServer.request_queue_size = 1024

if __name__ == "__main__":
    sys.exit(main())
