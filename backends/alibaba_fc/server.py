"""Function Compute 3.0 entry of the funcpipe stage-worker function: a custom container's HTTP server.

FC forwards each invocation as ``POST /invoke`` (body: the payload, header
``x-fc-request-id``) to the server on the port the function's
``customContainerConfig`` names (9000). Everything else is
:func:`funcpipe.function.handle`, which runs the call and
reports its result or failure through the job's storage.
"""

from __future__ import annotations

import json
import logging
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from funcpipe.function import handle, preload

log = logging.getLogger("funcpipe.fc")

#: Set by ``funcpipe deploy alibaba_fc`` to the function's timeout.
TIMEOUT_S = float(os.environ.get("FUNCPIPE_FUNCTION_TIMEOUT_S", "3600"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        received = time.monotonic()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/initialize":
            self._reply(200, b"")
            return
        if self.path != "/invoke":
            self._reply(404, b"")
            return
        request_id = self.headers.get("x-fc-request-id", "")
        try:
            outcome = handle(json.loads(body), remaining_s=lambda: TIMEOUT_S - (time.monotonic() - received))
        except Exception as exc:  # a payload with nowhere to report: FC's log is the only witness
            log.exception("invocation %s: %s", request_id, exc)
            self._reply(404, json.dumps({"errorMessage": str(exc), "errorType": type(exc).__name__}).encode())
            return
        failed = outcome["state"] != "done"
        self._reply(404 if failed else 200, json.dumps(outcome).encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("x-fc-status", str(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s " + format, self.address_string(), *args)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    try:  # the storage this image is for; loaded before the server listens, like torch below
        import funcpipe.storage.oss  # noqa: F401
    except ImportError:
        log.warning("funcpipe.storage.oss is not available; oss:// storage will load on first use")
    preload()
    port = int(os.environ.get("FC_SERVER_PORT", "9000"))
    host = os.environ.get("FC_SERVER_HOST", "0.0.0.0")
    # One invocation at a time: FC sends an instance one request at a time (instance concurrency 1).
    HTTPServer((host, port), Handler).serve_forever()


if __name__ == "__main__":
    main()
