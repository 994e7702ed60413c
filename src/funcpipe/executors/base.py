"""The executor interface: launch actors with resources, call their methods, collect results.

An *actor* is an object of a class, built from plain-data arguments, whose
methods are called one at a time and return plain data. On Ray it is a Ray
actor; on a serverless platform it is an asynchronous function invocation
per call that reports back through storage. Stage workers are written once
against this interface, so they cannot tell which one runs them.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from funcpipe.errors import WorkerFailed
from funcpipe.storage.counting import RequestCounter

__all__ = ["Actor", "ActorHandle", "CallGroup", "Executor", "Resources"]


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one actor asks for: CPUs (threads it may use) and memory (MB, or backend default)."""

    num_cpus: float = 1.0
    memory_mb: int | None = None


class Actor(Protocol):
    """What executors run: a class built from plain data, whose methods are called one at a time.

    A protocol, so the classes it describes (:class:`funcpipe.worker.StageWorker`) need not
    import this module: an actor does not know how it is launched.
    """

    def cancel(self) -> None:
        """Stop a running call soon and release what the actor holds (threads).

        Called from another thread, whether or not a call is running.
        """


class ActorHandle(abc.ABC):
    """A launched actor. ``name`` identifies it in errors ("stage 1 replica 0")."""

    name: str

    @abc.abstractmethod
    def call(self, method: str, *args: Any) -> Future[Any]:
        """Call ``method(*args)`` on the actor; the future holds its return value."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the actor now, whatever it is doing. Idempotent."""

    def started(self) -> bool | None:
        """Whether the actor is up (built, able to run a call); ``None``: the backend cannot tell.

        The driver asks when an iteration times out, to tell a worker that never
        started (:class:`~funcpipe.WorkerNotStarted`) from one that hangs.
        """
        return None

    def release(self) -> None:
        """The job is done with this actor and no call is running; default: :meth:`kill`.

        Backends whose actors are costly to start may keep the process for the next job.
        """
        self.kill()

    def failure(self, exc: BaseException) -> WorkerFailed:
        """Translate the exception a call's future raised into :class:`WorkerFailed`."""
        if isinstance(exc, WorkerFailed):
            return exc
        return WorkerFailed(self.name, f"{type(exc).__name__}: {exc}")


class Executor(abc.ABC):
    """Launches actors on some compute backend."""

    #: The name ``Trainer(backend=...)`` accepts for this executor.
    name: str = ""

    #: Seconds one call may run before the platform ends it, less a margin for stopping
    #: and checkpointing; ``None``: no limit. The driver ends a run before it and re-invokes.
    call_budget_s: float | None = None

    #: Seconds an actor may take from its launch to running a call, beyond the driver's
    #: per-iteration timeout (a function's cold start, a Ray worker process starting). The
    #: driver waits that much longer for every worker of a run to start, then ``timeout_s``
    #: for the first iteration (:meth:`CallGroup.wait_started`); workers add it to their waits.
    start_timeout_s: float = 0.0

    #: The storage requests the executor itself makes on the driver (a serverless executor's
    #: status polls, cancel objects and deletes), counted by kind; ``None``: it makes none.
    requests: RequestCounter | None = None

    @abc.abstractmethod
    def launch(
        self, actor_cls: type[Actor], *args: Any, name: str, resources: Resources
    ) -> ActorHandle:
        """Start one actor of ``actor_cls`` built from ``args`` (plain data)."""

    def fit_resources(self, requested: Sequence[Resources]) -> list[Resources]:
        """Adjust a job's requests to what the backend can hold at once (default: as asked)."""
        return list(requested)

    def check_storage(self, url: str) -> None:  # noqa: B027 - default accepts every storage
        """Raise :class:`~funcpipe.ConfigError` if actors here cannot reach storage ``url``."""

    def shutdown(self) -> None:  # noqa: B027 - default holds nothing
        """Release what the executor started (clusters, pools)."""


class CallGroup:
    """Calls running on several actors, watched together.

    Keeps the order in which the calls finish, so the *first* failure is the
    one reported: when one worker raises, its peers soon fail too, waiting
    for data that will never come, and those later errors are noise.
    """

    def __init__(self, calls: Sequence[tuple[ActorHandle, Future[Any]]]) -> None:
        self._calls = list(calls)
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)
        self._done = 0
        self._first_failure: WorkerFailed | None = None
        for handle, future in self._calls:
            future.add_done_callback(functools.partial(self._on_done, handle))

    def _on_done(self, handle: ActorHandle, future: Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        with self._lock:
            self._done += 1
            if future.cancelled() and self._first_failure is None:
                self._first_failure = WorkerFailed(handle.name, "call was cancelled")
            elif exc is not None and self._first_failure is None:
                self._first_failure = handle.failure(exc)
            self._finished.notify_all()

    def failure(self) -> WorkerFailed | None:
        """The first failure so far, or ``None``."""
        with self._lock:
            return self._first_failure

    def failed(self) -> bool:
        return self.failure() is not None

    def unfinished(self) -> list[str]:
        """Names of the actors whose call has not returned yet, in launch order."""
        return [handle.name for handle, future in self._calls if not future.done()]

    def not_started(self) -> list[str]:
        """Names of the actors that say they have not started yet (:meth:`ActorHandle.started`)."""
        return [handle.name for handle, _ in self._calls if handle.started() is False]

    def wait_started(
        self,
        timeout: float,
        *,
        stop: Callable[[], bool] = lambda: False,
        poll_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[str]:
        """Wait until every actor started, a call failed or all finished, ``stop()``, or ``timeout`` passed.

        Returns :meth:`not_started` then: empty unless the wait ended some other way
        than by every actor starting. Actors that cannot tell count as started.
        """
        deadline = clock() + timeout
        while True:
            waiting = self.not_started()
            if not waiting or stop() or self.wait(0) or clock() >= deadline:
                return waiting
            self.wait(min(poll_s, max(0.0, deadline - clock())))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every call finished or one failed; ``False`` on timeout."""
        with self._lock:
            return self._finished.wait_for(
                lambda: self._first_failure is not None or self._done == len(self._calls),
                timeout,
            )

    def results(self, timeout: float | None = None) -> list[Any]:
        """Every call's return value, in launch order.

        Raises:
            WorkerFailed: the first call that failed (the others are left to the caller to kill).
            TimeoutError: not all calls finished within ``timeout``.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"calls did not finish within {timeout} s")
        failure = self.failure()
        if failure is not None:
            raise failure
        return [future.result() for _, future in self._calls]

    def kill_all(self) -> None:
        for handle, _ in self._calls:
            handle.kill()
