"""Loopback HTTP servers for the fakes, each in a thread of the test process."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: Any = None  # what the request handlers serve

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a process terminated mid-request
            super().handle_error(request, client_address)


def serve(handler: type[BaseHTTPRequestHandler], owner: Any) -> Server:
    """Serve ``handler`` on a free loopback port; ``self.server.owner`` is ``owner``."""
    server = Server(("127.0.0.1", 0), handler)
    server.owner = owner
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
