"""A loopback fake of AWS Lambda: the Invoke API boto3 calls, and Runtime APIs the real handler polls.

``FakeLambda`` answers ``POST /2015-03-31/functions/{name}/invocations``
(202 for ``X-Amz-Invocation-Type: Event``, a ``ResourceNotFoundException``
for a function it does not know) and queues the payload. Each runtime is a
separate ``python -m awslambdaric handler.handler`` process running the real
entry of ``backends/aws_lambda``, with a Runtime API of its own
(``AWS_LAMBDA_RUNTIME_API``) that hands it the queued payloads one at a
time, as a Lambda execution environment gets them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.fakes.http import Server, serve
from tests.fakes.startup import STALL_S, wait_started

ROOT = Path(__file__).resolve().parents[2]
HANDLER_DIR = ROOT / "backends" / "aws_lambda"
INVOKE_PREFIX = "/2015-03-31/functions/"
RUNTIME_PREFIX = "/2018-06-01/runtime/"


@dataclasses.dataclass
class Invocation:
    function: str
    payload: bytes
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    deadline: float = 0.0  # wall clock, set when a runtime takes it
    outcome: str = ""  # "response" or "error", once the runtime posts it
    finished: float = 0.0
    taken: threading.Event = dataclasses.field(default_factory=threading.Event)  # a runtime has it
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)  # its outcome is posted


class _InvokeHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        fake: FakeLambda = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        if not (path.startswith(INVOKE_PREFIX) and path.endswith("/invocations")):
            self._json(404, {"message": f"no route {path}"}, "UnknownOperationException")
            return
        name = path[len(INVOKE_PREFIX):-len("/invocations")]
        if name not in fake.functions:
            self._json(404, {"Type": "User", "message": f"Function not found: {name}"}, "ResourceNotFoundException")
            return
        if self.headers.get("X-Amz-Invocation-Type") != "Event":
            self._json(400, {"message": "this fake only takes Event invocations"}, "InvalidParameterValueException")
            return
        fake.submit(Invocation(name, body))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, status: int, body: dict[str, Any], error_type: str) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _RuntimeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        runtime: _Runtime = self.server.owner
        if self.path != RUNTIME_PREFIX + "invocation/next":
            self._reply(404, b"")
            return
        runtime.polled.set()  # the handler module imported: the environment is warm
        invocation = runtime.fake.next_invocation()
        if invocation is None:  # shutting down: the process is about to be terminated
            self._reply(503, b"")
            return
        timeout = runtime.fake.functions[invocation.function]
        invocation.deadline = time.time() + timeout
        runtime.current[invocation.request_id] = invocation
        invocation.taken.set()
        self._reply(200, invocation.payload, {
            # The runtime client reads the content type unchecked: without one it crashes.
            "Content-Type": "application/json",
            "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
            "Lambda-Runtime-Deadline-Ms": str(int(invocation.deadline * 1000)),
            "Lambda-Runtime-Invoked-Function-Arn":
                f"arn:aws:lambda:us-east-1:123456789012:function:{invocation.function}",
            "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000",
        })

    def do_POST(self) -> None:
        runtime: _Runtime = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = self.path[len(RUNTIME_PREFIX):].split("/")  # invocation/<id>/response|error, init/error
        if parts[:2] == ["init", "error"]:
            runtime.fake.init_errors.append(body.decode(errors="replace"))
        elif len(parts) == 3 and parts[0] == "invocation":
            invocation = runtime.current.pop(parts[1])
            invocation.outcome, invocation.finished = parts[2], time.time()
            invocation.ended.set()
            if parts[2] == "error":
                runtime.fake.errors.append(body.decode(errors="replace"))
        self._reply(202, b"")

    def _reply(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclasses.dataclass
class _Runtime:
    fake: FakeLambda
    current: dict[str, Invocation] = dataclasses.field(default_factory=dict)
    polled: threading.Event = dataclasses.field(default_factory=threading.Event)
    server: Server | None = None
    process: subprocess.Popen[bytes] | None = None


class FakeLambda:
    """The Invoke API on one port; ``runtimes`` awslambdaric processes behind Runtime APIs of their own.

    Args:
        functions: name -> timeout in seconds (the invocation deadline the runtime is told).
        runtimes: how many execution environments run at once.
        env: extra environment of the runtime processes (storage endpoint, credentials).
    """

    def __init__(self, functions: Mapping[str, float], *, runtimes: int, env: Mapping[str, str]) -> None:
        self.functions = dict(functions)
        self.invocations: list[Invocation] = []
        self.errors: list[str] = []
        self.init_errors: list[str] = []
        self._queue: queue.Queue[Invocation | None] = queue.Queue()
        self._server = serve(_InvokeHandler, self)
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._runtimes = [_Runtime(self) for _ in range(runtimes)]
        for runtime in self._runtimes:
            runtime.server = serve(_RuntimeHandler, runtime)
            process_env = {
                **os.environ,
                **env,
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
                "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{runtime.server.server_address[1]}",
                "LAMBDA_TASK_ROOT": str(HANDLER_DIR),
                "AWS_LAMBDA_FUNCTION_NAME": "funcpipe-fake",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048",
            }
            runtime.process = subprocess.Popen(
                [sys.executable, "-m", "awslambdaric", "handler.handler"],
                cwd=HANDLER_DIR, env=process_env, stdin=subprocess.DEVNULL,
            )

    def wait_ready(self, stall_s: float = STALL_S) -> None:
        """Block until every runtime finished its init (imported the handler) and asks for work;
        no fixed bound: fails when a runtime exits, or all stall for ``stall_s`` (see ``startup``)."""
        processes = [runtime.process for runtime in self._runtimes]
        assert all(process is not None for process in processes)
        try:
            wait_started([p for p in processes if p is not None], lambda i: self._runtimes[i].polled.is_set(),
                         what="Lambda runtime", stall_s=stall_s)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.init_errors}") from None

    def kill_runtime(self, index: int) -> None:
        """Kill one runtime's process, as Lambda does at the lifetime limit or on out-of-memory."""
        process = self._runtimes[index].process
        assert process is not None
        process.kill()
        process.wait()

    def submit(self, invocation: Invocation) -> None:
        self.invocations.append(invocation)
        self._queue.put(invocation)

    def next_invocation(self) -> Invocation | None:
        return self._queue.get()

    def close(self) -> None:
        for _ in self._runtimes:
            self._queue.put(None)
        for runtime in self._runtimes:
            assert runtime.process is not None
            runtime.process.terminate()
        for runtime in self._runtimes:
            assert runtime.process is not None and runtime.server is not None
            try:
                runtime.process.wait(10)
            except subprocess.TimeoutExpired:
                runtime.process.kill()
                runtime.process.wait()
            runtime.server.shutdown()
            runtime.server.server_close()
        self._server.shutdown()
        self._server.server_close()
