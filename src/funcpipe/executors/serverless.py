"""Serverless actors: each call is one asynchronous function invocation that reports through storage.

A function platform (AWS Lambda, Function Compute) runs a call and returns
nothing to the caller: an asynchronous invocation is only *accepted*. So the
call's payload names a *status object* in the job's storage, and the function
writes its progress there::

    driver (this module)                     function (backends/<platform>/, funcpipe.function.handle())
    --------------------                     -----------------------------------------------------------
    call(): payload = actor + args +         {"state": "started"}
            method + status key   ──invoke──▶ builds the actor, runs the method;
    watcher polls the status key ◀────────── {"state": "running", "beat": n} every heartbeat_s
    future resolved               ◀────────── {"state": "done", "result": ...}
                                              | {"state": "failed", "cause": ..., "traceback": ...}
    kill(): writes <status key>.cancel ─────▶ the heartbeat thread sees it, cancels the actor

The driver notices a function that never starts (no status within
``start_timeout_s``) or stops heart-beating (no new beat within
``silence_timeout_s``, by the driver's own clock) and fails the call with
:class:`~funcpipe.WorkerNotStarted` / :class:`~funcpipe.WorkerSilent`.

Functions keep no state between invocations, so every call builds its actor
anew from the launch arguments. The payload is JSON and carries no cloud
credentials: the function gets those from its own role. It carries the
driver's torch and funcpipe versions, which the function checks. The status
and cancel objects' keys and encodings are :mod:`funcpipe.protocol`'s; the
function side is :mod:`funcpipe.function`, which imports nothing of this module.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

from funcpipe import protocol
from funcpipe.errors import (
    ConfigError,
    ForeignObject,
    IntegrityError,
    PayloadTooLarge,
    StorageError,
    WorkerFailed,
    WorkerNotStarted,
    WorkerSilent,
)
from funcpipe.executors.base import Actor, ActorHandle, Executor, Resources
from funcpipe.storage import Storage, open_storage
from funcpipe.storage.authenticated import AuthenticatedStorage
from funcpipe.storage.counting import CountingStorage, RequestCounter
from funcpipe.storage.throttled import SCHEME_PREFIX

__all__ = [
    "ServerlessActor", "ServerlessExecutor", "Timing",
]

log = logging.getLogger(__name__)

#: Storage schemes a function in the cloud cannot reach.
LOCAL_SCHEMES = ("file", "memory")


@dataclasses.dataclass(frozen=True)
class Timing:
    """How the driver and the functions keep track of each other (seconds).

    Attributes:
        poll_s: how often the driver reads the status objects of running calls.
        heartbeat_s: how often a running function writes its status.
        start_timeout_s: longest wait from invocation to the first status
            (queueing, a cold start pulling the container image, importing torch).
        silence_timeout_s: longest wait for a new heartbeat from a call that started.
    """

    poll_s: float = 1.0
    heartbeat_s: float = 5.0
    start_timeout_s: float = 300.0
    silence_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"Timing.{field.name} must be a positive number of seconds, got {value!r}")
        if self.silence_timeout_s <= self.heartbeat_s:
            raise ConfigError(
                f"Timing.silence_timeout_s ({self.silence_timeout_s:g} s) must exceed heartbeat_s "
                f"({self.heartbeat_s:g} s), or every call would look silent; hint: a few heartbeats"
            )


class ServerlessExecutor(Executor):
    """The platform-independent part of a function backend; subclasses implement :meth:`invoke`.

    Args:
        function_prefix: functions are named ``{function_prefix}-{memory_mb}``,
            one per memory tier (``funcpipe deploy`` creates them).
        default_memory_mb: the tier of actors launched without ``memory_mb``.
        lifetime_s: the functions' timeout: the longest one invocation runs.
        lifetime_margin_s: how long before ``lifetime_s`` the driver ends a run
            (time to notice the stop, write the checkpoint and report).
        payload_limit_bytes: the platform's asynchronous payload limit.
        timing: polling, heartbeat and deadline settings.
        allow_local_storage: accept ``file://`` storage, for functions that run on
            this machine (tests, local emulators). Off: storage the cloud cannot
            reach is refused before anything is launched.
    """

    #: Shown in errors: "AWS Lambda", "Function Compute".
    platform_label: str = ""
    #: The CLI command that creates the functions.
    deploy_command: str = ""

    def __init__(
        self,
        *,
        function_prefix: str,
        default_memory_mb: int,
        lifetime_s: float,
        lifetime_margin_s: float,
        payload_limit_bytes: int,
        timing: Timing | None = None,
        allow_local_storage: bool = False,
    ) -> None:
        if not function_prefix or not all(c.isalnum() or c in "-_" for c in function_prefix):
            raise ConfigError(
                f"function_prefix {function_prefix!r} must be letters, digits, '-' or '_'; "
                "hint: the default 'funcpipe-worker'"
            )
        if not 0 <= lifetime_margin_s < lifetime_s:
            raise ConfigError(
                f"lifetime_margin_s must be >= 0 and below lifetime_s (got {lifetime_margin_s:g} and "
                f"{lifetime_s:g}); hint: leave a minute on a 900 s Lambda"
            )
        self.function_prefix = function_prefix
        self.default_memory_mb = default_memory_mb
        self.lifetime_s = float(lifetime_s)
        self.lifetime_margin_s = float(lifetime_margin_s)
        self.call_budget_s = self.lifetime_s - self.lifetime_margin_s
        self.payload_limit_bytes = payload_limit_bytes
        self.timing = timing or Timing()
        self.start_timeout_s = self.timing.start_timeout_s
        self.allow_local_storage = allow_local_storage
        self._storage_url: str | None = None
        #: The driver's requests for the calls (status polls, cancel objects, their deletes).
        self.requests = RequestCounter()
        self._watcher = _Watcher(self.timing.poll_s, self.requests)
        #: The driver's torch and funcpipe versions, which every payload carries (the function checks them).
        self.versions = protocol.versions()

    # -- what a platform implements -----------------------------------------------

    @abc.abstractmethod
    def invoke(self, function: str, payload: bytes) -> None:
        """Start one asynchronous invocation of ``function``; return once the platform accepted it.

        Raises:
            FunctionNotDeployed: no function of that name.
            PayloadTooLarge: the platform refused the payload's size.
            BackendError: any other refusal or transport failure (after the SDK's retries).
        """

    # -- the executor interface ------------------------------------------------------

    def function_name(self, resources: Resources) -> str:
        """The function that runs an actor with ``resources``: one per memory tier."""
        return f"{self.function_prefix}-{resources.memory_mb or self.default_memory_mb}"

    def check_storage(self, url: str) -> None:
        """Refuse storage the functions cannot reach; calls of later launches report through ``url``."""
        inner = url[len(SCHEME_PREFIX):] if url.startswith(SCHEME_PREFIX) else url
        parts = urlsplit(inner)
        scheme = parts.scheme.lower()
        if parts.password:
            raise ConfigError(
                "the storage URL carries a password, and it would travel in every invocation payload; "
                "hint: give credentials through the SDK's standard chain (environment, role), not the URL"
            )
        if scheme == "memory" or (scheme in LOCAL_SCHEMES and not self.allow_local_storage):
            raise ConfigError(
                f"storage {url!r} is on this machine, which {self.platform_label} functions cannot reach; "
                "hint: use object storage (s3://bucket/prefix on AWS Lambda, oss://bucket/prefix on "
                "Function Compute); for functions that run on this machine (tests), "
                f"{type(self).__name__}(..., allow_local_storage=True) accepts file://"
            )
        self._storage_url = url

    def launch(self, actor_cls: type[Actor], *args: Any, name: str, resources: Resources) -> ServerlessActor:
        if self._storage_url is None:
            raise ConfigError(
                f"{type(self).__name__} reports calls through the job's storage, but none was given; "
                "hint: call check_storage(url) first (Trainer does)"
            )
        module = actor_cls.__module__
        if module == "__main__" or "<locals>" in actor_cls.__qualname__:
            raise ConfigError(
                f"actor class {actor_cls.__qualname__} is not importable by name in a function "
                f"(module {module!r}); hint: define it at the top level of an installed module"
            )
        return ServerlessActor(
            self, f"{module}:{actor_cls.__qualname__}", list(args), name, self.function_name(resources),
            self._storage_url,
        )

    def shutdown(self) -> None:
        self._watcher.stop()


class ServerlessActor(ActorHandle):
    """A launched serverless actor: the arguments each call rebuilds it from."""

    def __init__(
        self,
        executor: ServerlessExecutor,
        actor: str,
        args: list[Any],
        name: str,
        function: str,
        storage_url: str,
    ) -> None:
        self.name = name
        self.function = function
        self._executor = executor
        self._actor = actor
        self._args = args
        self._storage_url = storage_url
        self._calls: list[_Call] = []

    def payload(self, method: str, args: tuple[Any, ...], status_key: str, status_secret: str = "") -> bytes:
        """The JSON bytes one invocation carries (``status_secret``: the key the call's status objects are
        authenticated under, fresh per call)."""
        document = {
            "funcpipe": protocol.PAYLOAD_FORMAT,
            "name": self.name,
            "actor": self._actor,
            "args": self._args,
            "method": method,
            "call_args": list(args),
            "storage_url": self._storage_url,
            "status_key": status_key,
            "status_secret": status_secret,
            "heartbeat_s": self._executor.timing.heartbeat_s,
            "versions": self._executor.versions,
        }
        try:
            return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.name}: the arguments of {method}() are not JSON ({exc})") from exc

    def call(self, method: str, *args: Any) -> Future[Any]:
        if method.startswith("_"):
            raise ConfigError(f"{self.name}: cannot call private method {method!r} in a function")
        status_key = f"{protocol.STATUS_PREFIX}{uuid.uuid4().hex}"
        status_secret = secrets.token_hex(32)
        body = self.payload(method, args, status_key, status_secret)
        limit = self._executor.payload_limit_bytes
        if len(body) > limit:
            raise PayloadTooLarge(
                len(body), limit, self._executor.platform_label,
                f"the payload of {self.name} holds its actor's arguments (the worker config with the "
                "plan and storage URL); keep them small and move data through storage, or raise "
                "payload_limit_bytes if your platform allows more",
            )
        call = _Call(self.name, status_key, Future(), status_secret=status_secret)
        call.future.set_running_or_notify_cancel()
        storage = self._executor._watcher.storage_for(self._storage_url)
        self._executor.invoke(self.function, body)  # raises before anything is watched
        call.invoked = time.monotonic()
        self._calls.append(call)
        self._executor._watcher.watch(call, storage, self._executor.timing)
        return call.future

    def started(self) -> bool | None:
        """Whether the function of the latest call has reported that it started; ``None``: no call yet."""
        if not self._calls:
            return None
        call = self._calls[-1]
        return call.beat >= 0 or call.future.done()

    def kill(self) -> None:
        """Ask every running call to stop (a cancel object its function polls) and fail its future."""
        calls, self._calls = self._calls, []
        for call in calls:
            if call.future.done():
                continue
            self._executor._watcher.forget(call)
            try:
                storage = self._executor._watcher.storage_for(self._storage_url)
                storage.put(call.status_key + protocol.CANCEL_SUFFIX, b"")
            except (StorageError, ConfigError) as exc:
                log.warning("%s: could not write the cancel object of %s: %s", self.name, call.status_key, exc)
            _settle(call.future, exception=WorkerFailed(self.name, "killed by the driver"))

    def release(self) -> None:
        """No call is running: nothing is held between invocations."""
        self._calls = [c for c in self._calls if not c.future.done()]
        if self._calls:
            self.kill()


@dataclasses.dataclass
class _Call:
    name: str
    status_key: str
    future: Future[Any]
    invoked: float = 0.0
    beat: int = -1  # last heartbeat seen; -1: not started
    last_change: float = 0.0
    foreign: str | None = None  # the binding of a foreign status object last warned about
    status_secret: str = dataclasses.field(default="", repr=False)  # its status objects' MAC key
    deleted: bool = False  # its status objects were deleted


def _settle(future: Future[Any], *, result: Any = None, exception: BaseException | None = None) -> None:
    """Resolve ``future`` unless it already is (a kill and the watcher may race)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except Exception:  # concurrent.futures.InvalidStateError: already resolved
        return


class _Watcher:
    """One thread that polls the status objects of an executor's running calls."""

    def __init__(self, poll_s: float, requests: RequestCounter | None = None) -> None:
        self._poll_s = poll_s
        self._requests = RequestCounter() if requests is None else requests
        self._lock = threading.Lock()
        self._calls: dict[str, tuple[_Call, Storage, Timing]] = {}
        self._storages: dict[str, Storage] = {}
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def storage_for(self, url: str) -> Storage:
        with self._lock:
            if url not in self._storages:
                self._storages[url] = CountingStorage(open_storage(url), self._requests, client="watcher")
            return self._storages[url]

    def watch(self, call: _Call, storage: Storage, timing: Timing) -> None:
        with self._lock:
            call.last_change = call.invoked
            self._calls[call.status_key] = (call, storage, timing)
            if self._thread is None or not self._thread.is_alive():
                self._stopped.clear()
                self._thread = threading.Thread(target=self._loop, name="funcpipe-serverless-watch", daemon=True)
                self._thread.start()

    def forget(self, call: _Call) -> None:
        with self._lock:
            self._calls.pop(call.status_key, None)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            thread = self._thread
            for call, _, _ in self._calls.values():
                _settle(call.future, exception=WorkerFailed(call.name, "the executor was shut down"))
            self._calls.clear()
            for storage in self._storages.values():
                storage.close()
            self._storages.clear()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while not self._stopped.wait(self._poll_s):
            with self._lock:
                if not self._calls:
                    self._thread = None
                    return
                pending = list(self._calls.values())
            for call, storage, timing in pending:
                try:
                    finished = self._check(call, storage, timing)
                except ForeignObject as exc:  # not this call's: its function's own status overwrites it
                    if exc.written_for != call.foreign:
                        call.foreign = exc.written_for
                        log.warning("%s: %s; ignoring it", call.name, exc)
                    finished = self._overdue(call, timing, time.monotonic())
                except IntegrityError as exc:
                    _settle(call.future, exception=WorkerFailed(call.name, f"{type(exc).__name__}: {exc}"))
                    finished = True
                except StorageError as exc:  # the deadlines bound how long this may go on
                    log.warning("%s: could not read status %s: %s", call.name, call.status_key, exc)
                    finished = self._overdue(call, timing, time.monotonic())
                except Exception as exc:
                    _settle(call.future, exception=WorkerFailed(
                        call.name, f"unreadable status object {call.status_key!r}: {type(exc).__name__}: {exc}"
                    ))
                    finished = True
                if finished:
                    self.forget(call)
                    if not call.deleted:
                        self._delete(call, storage)

    @staticmethod
    def _delete(call: _Call, storage: Storage) -> None:
        """Delete a finished call's status and cancel objects."""
        call.deleted = True
        try:
            storage.delete([call.status_key, call.status_key + protocol.CANCEL_SUFFIX])
        except StorageError as exc:
            log.warning("could not delete status object %s: %s", call.status_key, exc)

    def _check(self, call: _Call, storage: Storage, timing: Timing) -> bool:
        """Read one call's status and resolve its future if it ended; ``True`` once it is resolved."""
        if call.future.done():
            return True
        data = AuthenticatedStorage(storage, call.status_secret).get_if_exists(call.status_key)
        now = time.monotonic()
        if data is None:
            return self._overdue(call, timing, now)
        status = protocol.decode_status(data, call.status_key)
        state = status["state"]
        if state == "done":
            # Deleted before the result is handed over: the requests the run counts hold this delete.
            self._delete(call, storage)
            _settle(call.future, result=status["result"])
            return True
        if state == "failed":
            _settle(call.future, exception=WorkerFailed(call.name, status["cause"], status["traceback"]))
            return True
        beat = status["beat"]
        if beat != call.beat:
            call.beat, call.last_change = beat, now
            return False
        return self._overdue(call, timing, now)

    @staticmethod
    def _overdue(call: _Call, timing: Timing, now: float) -> bool:
        """Fail a call that never started or went silent; ``True`` if it did."""
        waited = now - call.last_change
        if call.beat < 0 and waited > timing.start_timeout_s:
            _settle(call.future, exception=WorkerNotStarted(
                call.name,
                f"the function never reported that it started ({waited:.1f} s after it was invoked, "
                f"start_timeout_s={timing.start_timeout_s:g}); hint: look at the platform's logs for the "
                "invocation (cold start, image pull, throttling, or a crash on import), or raise "
                "Timing(start_timeout_s=...)",
            ))
            return True
        if call.beat >= 0 and waited > timing.silence_timeout_s:
            _settle(call.future, exception=WorkerSilent(
                call.name,
                f"the function stopped reporting: no heartbeat for {waited:.1f} s after beat {call.beat} "
                f"(silence_timeout_s={timing.silence_timeout_s:g}); it was killed (out of memory, lifetime "
                "limit) or hangs; hint: look at the platform's logs",
            ))
            return True
        return False
