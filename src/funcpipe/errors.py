"""The exception tree of funcpipe.

::

    FuncpipeError
    ├── ConfigError          the user asked for something that cannot work
    ├── PlanInfeasible       no plan fits the model on the platform
    ├── StorageError         an object store failed
    │   ├── ObjectNotFound   a key is not there (or did not appear in time)
    │   └── IntegrityError   an object failed its signature or job/iteration check
    ├── WorkerFailed         a stage worker raised or died; carries the remote traceback
    └── BackendError         an executor backend (Ray, Lambda, FC) failed

Third-party exceptions are translated where they cross into funcpipe, with
``raise Mapped(...) from exc``, so callers only ever catch these.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "FuncpipeError",
    "IntegrityError",
    "ObjectNotFound",
    "PlanInfeasible",
    "StorageError",
    "WorkerFailed",
]


class FuncpipeError(Exception):
    """Base class of every error funcpipe raises on purpose."""


class ConfigError(FuncpipeError, ValueError):
    """The user asked for something that cannot work (bad plan, URL, data...)."""


class PlanInfeasible(FuncpipeError):
    """No plan satisfies the model, platform and constraints."""


class PlanTimeout(FuncpipeError, TimeoutError):
    """The planner's solver found no plan at all within its time limit."""


class StorageError(FuncpipeError):
    """An object store operation failed."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist (or did not appear before a wait timed out)."""

    def __init__(self, key: str, message: str | None = None) -> None:
        self.key = key
        super().__init__(message or f"no object at key {key!r}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])

    def __reduce__(self) -> tuple[type[ObjectNotFound], tuple[str, str]]:
        # Ray pickles a worker's exception; keep the key and the message apart.
        return (type(self), (self.key, str(self)))


class IntegrityError(StorageError):
    """An object read from storage failed its signature or header check."""


class BackendError(FuncpipeError):
    """An executor backend failed to launch, reach or stop a worker."""


class WorkerFailed(FuncpipeError):
    """A stage worker raised an exception or died.

    Attributes:
        worker: the worker's name, ``"stage S replica R"``.
        cause: one line naming the original exception (``"ValueError: boom"``).
        remote_traceback: the traceback text from the worker's process.
    """

    def __init__(self, worker: str, cause: str, remote_traceback: str = "") -> None:
        self.worker = worker
        self.cause = cause
        self.remote_traceback = remote_traceback
        message = f"{worker} failed: {cause}"
        if remote_traceback:
            message += "\n\nRemote traceback:\n" + remote_traceback.rstrip()
        super().__init__(message)

    def __reduce__(self) -> tuple[type[WorkerFailed], tuple[str, str, str]]:
        return (type(self), (self.worker, self.cause, self.remote_traceback))
