"""A loopback fake of Function Compute 3.0: the invoke API the FC SDK calls, and container instances.

``FakeFC`` answers ``POST /2023-03-30/functions/{name}/invocations`` with
``x-fc-invocation-type: Async``: 202 and an ``x-fc-request-id``, or
``{Code, Message}`` JSON errors (``FunctionNotFound``, 404). Each instance is
a separate process running the real HTTP server of ``backends/alibaba_fc``
on a port of its own; a dispatcher thread per instance forwards queued
payloads to its ``POST /invoke`` one at a time, as FC does.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.fakes.http import Server, serve
from tests.fakes.startup import STALL_S, wait_started

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "backends" / "alibaba_fc" / "server.py"
INVOKE_PREFIX = "/2023-03-30/functions/"


@dataclasses.dataclass
class Invocation:
    function: str
    payload: bytes
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    status: int = 0  # the instance's answer to /invoke
    x_fc_status: str = ""
    taken: threading.Event = dataclasses.field(default_factory=threading.Event)
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)


class _InvokeHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake: FakeFC = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        if not (path.startswith(INVOKE_PREFIX) and path.endswith("/invocations")):
            self._error(404, "PathNotSupported", f"no route {path}")
            return
        name = path[len(INVOKE_PREFIX):-len("/invocations")]
        if name not in fake.functions:
            self._error(404, "FunctionNotFound", f"function '{name}' does not exist")
            return
        if self.headers.get("x-fc-invocation-type") != "Async":
            self._error(400, "InvalidArgument", "this fake only takes Async invocations")
            return
        invocation = Invocation(name, body)
        fake.submit(invocation)
        self.send_response(202)
        self.send_header("x-fc-request-id", invocation.request_id)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"Code": code, "Message": message, "RequestId": uuid.uuid4().hex}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-fc-request-id", uuid.uuid4().hex)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class FakeFC:
    """The FC invoke API on one port; ``instances`` container servers behind it.

    Args:
        functions: the names of the deployed functions.
        instances: how many function instances run at once.
        env: extra environment of the instances (storage endpoint, credentials).
    """

    def __init__(self, functions: list[str], *, instances: int, env: Mapping[str, str]) -> None:
        self.functions = set(functions)
        self.invocations: list[Invocation] = []
        self._queue: queue.Queue[Invocation | None] = queue.Queue()
        self._server: Server = serve(_InvokeHandler, self)
        self.endpoint = f"127.0.0.1:{self._server.server_address[1]}"
        self._instances: list[tuple[subprocess.Popen[bytes], int]] = []
        self._dispatchers: list[threading.Thread] = []
        for _ in range(instances):
            port = _free_port()
            process = subprocess.Popen(
                [sys.executable, str(SERVER)],
                env={
                    **os.environ, **env,
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
                    "FC_SERVER_HOST": "127.0.0.1", "FC_SERVER_PORT": str(port),
                    "FC_FUNCTION_MEMORY_SIZE": "2048",  # as FC tells an instance its function's memory
                },
                stdin=subprocess.DEVNULL,
            )
            self._instances.append((process, port))

    def wait_ready(self, stall_s: float = STALL_S) -> None:
        """Block until every instance's server accepts connections, starting its dispatcher as it does;
        no fixed bound: fails when an instance exits, or all stall for ``stall_s`` (see ``startup``)."""

        def accepts(index: int) -> bool:
            try:
                socket.create_connection(("127.0.0.1", self._instances[index][1]), timeout=1).close()
                return True
            except OSError:
                return False

        def dispatch(index: int) -> None:
            dispatcher = threading.Thread(target=self._dispatch, args=(self._instances[index][1],), daemon=True)
            dispatcher.start()
            self._dispatchers.append(dispatcher)

        wait_started([process for process, _ in self._instances], accepts, dispatch,
                     what="FC instance", stall_s=stall_s)

    def _dispatch(self, port: int) -> None:
        while True:
            invocation = self._queue.get()
            if invocation is None:
                return
            invocation.taken.set()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            try:
                connection.request("POST", "/invoke", invocation.payload, {
                    "Content-Type": "application/octet-stream",
                    "x-fc-request-id": invocation.request_id,
                })
                response = connection.getresponse()
                response.read()
                invocation.status, invocation.x_fc_status = response.status, response.getheader("x-fc-status", "")
            except OSError:
                invocation.status = -1  # the instance died
            finally:
                connection.close()
                invocation.ended.set()

    def submit(self, invocation: Invocation) -> None:
        self.invocations.append(invocation)
        self._queue.put(invocation)

    def close(self) -> None:
        for _ in self._dispatchers:
            self._queue.put(None)
        for process, _ in self._instances:
            process.terminate()
        for process, _ in self._instances:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._server.shutdown()
        self._server.server_close()
