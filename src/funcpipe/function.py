"""The function side of a serverless call: what a deployed function runs (``backends/*/`` import only this).

A function platform (AWS Lambda, Function Compute) hands each invocation's
JSON payload, written by :class:`funcpipe.executors.serverless.ServerlessActor`,
to :func:`handle`, which builds the actor it names, calls the method, and
reports through the job's storage (:mod:`funcpipe.protocol`): a status
object that says started, beats while the call runs, then done with the
result or failed with the cause and traceback; a cancel object the driver
writes stops the call.

This module is the function's whole import: torch, safetensors, the stage
worker and what it uses (protocol, codec, binding, signed, checkpoint, the
storage adapter the payload names). It imports no planner, simulator,
trainer, report, plot or executor module, nor ortools, ray, matplotlib,
tqdm or yaml, so a cold start loads only what a worker runs
(``benchmarks/coldstart.py`` measures it; ``tests/test_imports.py`` holds it).

A payload names its actor class as ``module:qualname``; the class must be
built from plain data and have a ``cancel()`` method (the
:class:`funcpipe.executors.base.Actor` protocol). The payload also carries the
driver's torch and funcpipe versions: a function whose versions differ
refuses the call with :class:`~funcpipe.VersionMismatch`, since the stage
definitions it would load are cloudpickled against the driver's.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from funcpipe import protocol, worker
from funcpipe.errors import ConfigError, StorageError, VersionMismatch, WorkerFailed
from funcpipe.storage import Storage, open_storage
from funcpipe.storage.authenticated import AuthenticatedStorage
from funcpipe.storage.counting import CountingStorage, RequestCounter

__all__ = ["MEMORY_ENVIRONMENT", "handle", "preload"]

log = logging.getLogger(__name__)

#: The environment variables in which the platforms tell a function its memory, MB (Lambda, Function Compute).
MEMORY_ENVIRONMENT = ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "FC_FUNCTION_MEMORY_SIZE")

#: Invocations this process has served (the first is a cold start's).
_served = 0
_served_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class _Request:
    name: str
    actor: str
    args: list[Any]
    method: str
    call_args: list[Any]
    storage_url: str
    status_key: str
    status_secret: str = dataclasses.field(repr=False)  # the status objects' MAC key, fresh per call
    heartbeat_s: float
    versions: dict[str, str]

    @classmethod
    def from_event(cls, event: Any) -> _Request:
        if not isinstance(event, dict) or event.get("funcpipe") != protocol.PAYLOAD_FORMAT:
            got = event.get("funcpipe") if isinstance(event, dict) else type(event).__name__
            raise ConfigError(
                f"not a funcpipe invocation payload (format {got!r}, expected {protocol.PAYLOAD_FORMAT}); "
                "hint: driver and function must run the same funcpipe version"
            )
        fields: dict[str, Any] = {f.name: event.get(f.name) for f in dataclasses.fields(cls)}
        missing = sorted(k for k, v in fields.items() if v is None)
        if missing:
            raise ConfigError(f"invocation payload lacks {missing}")
        if not str(fields["status_key"]).startswith(protocol.STATUS_PREFIX) or str(fields["method"]).startswith("_"):
            raise ConfigError("invocation payload has a malformed status key or method")
        if not (isinstance(fields["status_secret"], str) and re.fullmatch(r"[0-9a-f]{64}", fields["status_secret"])):
            raise ConfigError("invocation payload has a malformed status secret (expected 64 hex digits)")
        if not isinstance(fields["versions"], dict):
            raise ConfigError(f"invocation payload has versions {fields['versions']!r:.80}, not an object")
        return cls(**fields)


def _check_versions(driver: dict[str, str]) -> None:
    mine = protocol.versions()
    differ = {name: (driver.get(name), mine[name]) for name in mine if driver.get(name) != mine[name]}
    if differ:
        raise VersionMismatch(
            "this function runs " + ", ".join(f"{n} {m}" for n, (_, m) in differ.items())
            + " but the driver runs " + ", ".join(f"{n} {d}" for n, (d, _) in differ.items())
            + "; stage definitions are pickled against the driver's versions; hint: rebuild the image "
            "with the driver's (backends/README.md: --build-arg TORCH_VERSION=...) and redeploy, "
            "or install the function's versions on the driver"
        )


def _load_actor(target: str) -> Callable[..., Any]:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and callable(getattr(obj, "cancel", None))):
        raise ConfigError(f"{target!r} is not an actor class (a class with a cancel() method)")
    return obj


class _Reporter:
    """Writes a call's status object: started, heartbeats, then done or failed (exactly once)."""

    def __init__(
        self, storage: Storage, key: str, heartbeat_s: float, remaining_s: Callable[[], float] | None
    ) -> None:
        self.storage = storage
        self.key = key
        self.heartbeat_s = heartbeat_s
        self.remaining_s = remaining_s
        #: Seconds before the platform's hard end at which the call gives up and says so.
        self.lifetime_guard_s = 2 * heartbeat_s + 0.5
        self.expired = False
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, status: dict[str, Any]) -> None:
        self.storage.put(self.key, protocol.encode_status(self.key, status))

    def watch(self, actor: Any) -> None:
        self._thread = threading.Thread(target=self._run, args=(actor,), name="funcpipe-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, actor: Any) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self.storage.exists(self.key + protocol.CANCEL_SUFFIX):
                    actor.cancel()
                if (
                    not self.expired and self.remaining_s is not None
                    and self.remaining_s() < self.lifetime_guard_s
                ):
                    self.expired = True
                    actor.cancel()
                self._beat += 1
                self.write({"state": "running", "beat": self._beat})
            except StorageError as exc:  # a missed beat; the driver's silence timeout covers many
                log.warning("heartbeat to %s failed: %s", self.key, exc)


def preload() -> None:
    """Import what a worker's first call would otherwise import inside the time-limited invocation.

    Function entries call it at init (Lambda does not bill, nor count toward the
    timeout, an init of up to 10 s): the stage worker and torch, and torch's
    optimizer machinery, which the first optimizer built imports (about 2 s).
    """
    import torch

    worker.limit_allocator_retention()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def handle(event: Any, *, remaining_s: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run one invocation: build the actor, call the method, report through storage.

    The function entries in ``backends/`` call this with the decoded payload
    and, where the platform says, a callable giving the seconds left before
    it ends the invocation. Failures of the call are *reported* (so the
    platform does not retry the invocation); only a payload that names no
    status object to report to raises.

    A result that is a JSON object gets the call's own measure under ``"function"``
    (:func:`_usage`): the seconds from the start of this call to its last status
    write, which the platform bills, the requests of the status object (heartbeats,
    cancel checks, that last write included), the function's memory and whether the
    call was this process's first (a cold start). The actor's own requests are its own
    to count (:meth:`funcpipe.worker.StageWorker.run`).

    Returns:
        ``{"state": "done"}`` or ``{"state": "failed", "cause": ...}``, for the platform's logs.
    """
    started = time.perf_counter()
    global _served
    with _served_lock:
        cold = _served == 0
        _served += 1
    request = _Request.from_event(event)
    # The call's status (and the driver's cancel object, which is only looked for) are authenticated
    # under the call's own key: a status object someone else wrote is refused by the driver.
    requests = RequestCounter()
    storage = AuthenticatedStorage(CountingStorage(open_storage(request.storage_url), requests), request.status_secret)
    reporter = _Reporter(storage, request.status_key, float(request.heartbeat_s), remaining_s)
    try:
        reporter.write({"state": "started", "beat": 0})
        status: dict[str, Any]
        try:
            _check_versions(request.versions)
            actor = _load_actor(request.actor)(*request.args)
            reporter.watch(actor)
            try:
                result = getattr(actor, request.method)(*request.call_args)
            finally:
                reporter.stop()
                actor.cancel()  # release its threads: a warm function serves the next invocation
            json.dumps(result, allow_nan=False)  # a result the driver cannot read is a failure here
            if isinstance(result, dict):
                result = {**result, "function": _usage(started, requests, cold)}
            status = {"state": "done", "result": result}
        except BaseException as exc:
            reporter.stop()
            status = _failure(request.name, exc, reporter.expired)
        reporter.write(status)
        return {"state": status["state"], **({"cause": status["cause"]} if "cause" in status else {})}
    finally:
        storage.close()


def _usage(started: float, requests: RequestCounter, cold: bool) -> dict[str, Any]:
    """The call's measure, taken just before its last status write (counted here as the PUT it is)."""
    counts = requests.counts()
    counts["PUT"] += 1  # the "done" status that carries this
    memory = next((os.environ[name] for name in MEMORY_ENVIRONMENT if os.environ.get(name)), None)
    return {"seconds": time.perf_counter() - started, "requests": counts, "cold": cold,
            "memory_mb": int(memory) if memory is not None and memory.isdigit() else None}


def _failure(name: str, exc: BaseException, expired: bool) -> dict[str, Any]:
    if expired:
        return {
            "state": "failed",
            "cause": "the function reached its lifetime limit before the call ended; hint: the driver "
                     "ends runs lifetime_margin_s before lifetime_s: make lifetime_s the functions' "
                     "timeout and leave a larger margin",
            "traceback": "",
        }
    if isinstance(exc, WorkerFailed):
        return {"state": "failed", "cause": exc.cause, "traceback": exc.remote_traceback}
    return {"state": "failed", "cause": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
