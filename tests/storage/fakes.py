"""Test doubles: a fake clock, and loopback HTTP fakes for error paths real servers here cannot produce."""

from __future__ import annotations

import http
import http.server
import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters
import requests.structures


@dataclass
class CannedResponse:
    """What :func:`canned_http_server` answers to every request, and what it was asked.

    ``first``: answers ``(status, body)`` given to the first requests, one each, in
    order, before every later request gets ``status`` and ``body``.
    """

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    first: list[tuple[int, bytes]] = field(default_factory=list)


@contextmanager
def canned_http_server(response: CannedResponse) -> Iterator[str]:
    """Serve ``response`` to every request on 127.0.0.1; yields ``http://127.0.0.1:PORT``.

    Records ``(method, path, headers)`` of each request in ``response.requests``.
    """

    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            with lock:
                answer = len(response.requests)
                response.requests.append((self.command, self.path, dict(self.headers)))
            status, body = response.first[answer] if answer < len(response.first) else (response.status, response.body)
            self.send_response(status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class FakeClock:
    """A clock whose ``sleep`` records the request and, if ``advance``, moves time on.

    With ``advance=False`` time stands still, so successive calls behave like
    requests issued at the same instant by concurrent threads.
    """

    def __init__(self, *, advance: bool = True) -> None:
        self.now = 0.0
        self.advance = advance
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            if self.advance:
                self.now += seconds


#: A handler of :class:`ReplayAdapter`: request -> (status, headers, body).
Handler = Callable[[requests.PreparedRequest], tuple[int, dict[str, str], bytes]]


class ReplayAdapter(requests.adapters.BaseAdapter):
    """A ``requests`` transport that answers from ``handler`` instead of the network.

    oss2 sends every request through a ``requests`` session whose adapter
    ``oss2.Session(adapter=...)`` accepts, so this runs oss2's own signing,
    XML writing and XML parsing against recorded OSS answers. Every request
    is kept in :attr:`requests` (with its body as bytes).
    """

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[requests.PreparedRequest] = []
        self._lock = threading.Lock()

    def send(  # type: ignore[override]  # requests' signature, loosely typed upstream
        self, request: requests.PreparedRequest, stream: bool = False, **kwargs: Any
    ) -> requests.Response:
        body = request.body
        if body is not None and not isinstance(body, bytes):
            request.body = body.encode() if isinstance(body, str) else b"".join(body)  # type: ignore[union-attr]
        with self._lock:
            self.requests.append(request)
        status, headers, content = self.handler(request)
        response = requests.Response()
        response.status_code = status
        response.headers = requests.structures.CaseInsensitiveDict(
            {"Content-Length": str(len(content)), "x-oss-request-id": "5C3D9175B6FC2012930000FF", **headers}
        )
        response.raw = io.BytesIO(b"" if request.method == "HEAD" else content)
        response.request = request
        response.url = request.url or ""
        response.reason = http.HTTPStatus(status).phrase
        return response

    def close(self) -> None:
        pass
