"""The exception tree of funcpipe.

::

    FuncpipeError
    ├── ConfigError          the user asked for something that cannot work
    │   ├── VersionMismatch  a function runs another torch or funcpipe than the driver
    │   ├── JobBusy          another live fit holds the job's lease
    │   ├── JobUnfinished    a fresh fit of a job whose last run did not finish
    │   ├── FitInProgress    a second concurrent fit on one Trainer
    │   └── UserCodeError    the user's layers, loss or optimizer raised (the same batch fails again)
    ├── NonFiniteTraining    a loss, gradient or weight became NaN or infinite
    ├── LeaseLost            another fit took over this fit's job while it ran
    ├── PlanInfeasible       no plan fits the model on the platform
    ├── PlanTimeout          the planner found no plan within its time limit (also a TimeoutError)
    ├── StorageError         an object store failed
    │   ├── ObjectNotFound   a key is not there (or did not appear in time)
    │   ├── BucketNotFound   the bucket a storage URL names does not exist
    │   ├── StorageAccessDenied  the credentials may not do an operation on a bucket/key
    │   ├── StorageFailure   a storage adapter or plugin raised something else (translated at the boundary)
    │   ├── StorageTimeout   a storage operation of the driver did not finish in time (also a TimeoutError)
    │   └── IntegrityError   an object failed its MAC, signature, header or key check
    │       ├── ForeignObject  an object was written for another key (another job, attempt, iteration...)
    │       └── CheckpointCorrupt  a checkpoint failed its check
    ├── WorkerFailed         a stage worker raised or died; carries the remote traceback
    │   ├── WorkerNotStarted a worker never started (a serverless call never reported, a Ray actor was never placed)
    │   ├── WorkerSilent     a serverless call stopped heart-beating
    │   └── WorkerTimeout    a worker made no progress within the driver's timeout (it hangs)
    └── BackendError         an executor backend (Ray, Lambda, FC) failed
        ├── FunctionNotDeployed  the function a call needs does not exist
        └── PayloadTooLarge      an invocation payload is over the platform's limit

Third-party exceptions are translated where they cross into funcpipe, with
``raise Mapped(...) from exc``, so callers only ever catch these.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BucketNotFound",
    "CheckpointCorrupt",
    "ConfigError",
    "FitInProgress",
    "ForeignObject",
    "FuncpipeError",
    "FunctionNotDeployed",
    "IntegrityError",
    "JobBusy",
    "JobUnfinished",
    "LeaseLost",
    "NonFiniteTraining",
    "ObjectNotFound",
    "PayloadTooLarge",
    "PlanInfeasible",
    "PlanTimeout",
    "StorageAccessDenied",
    "StorageError",
    "StorageFailure",
    "StorageTimeout",
    "UserCodeError",
    "VersionMismatch",
    "WorkerFailed",
    "WorkerNotStarted",
    "WorkerSilent",
    "WorkerTimeout",
]


class FuncpipeError(Exception):
    """Base class of every error funcpipe raises on purpose."""


class ConfigError(FuncpipeError, ValueError):
    """The user asked for something that cannot work (bad plan, URL, data...)."""


class VersionMismatch(ConfigError):
    """A function runs another torch or funcpipe version than the driver; it refuses the call."""


class JobBusy(ConfigError):
    """Another fit holds the job's lease and keeps it fresh: one live run per job (:mod:`funcpipe.lease`)."""


class JobUnfinished(ConfigError):
    """A fresh fit (no ``resume=True``) of a job whose last run did not finish."""


class FitInProgress(ConfigError):
    """A second :meth:`Trainer.fit` on one trainer while another is running (from another thread)."""


class UserCodeError(ConfigError):
    """The user's layers, loss function or optimizer raised: the same batch would fail the same way again."""


class NonFiniteTraining(FuncpipeError):
    """A loss, a gradient or a weight became NaN or infinite (``fit(on_nonfinite="raise")``, the default)."""


class LeaseLost(FuncpipeError):
    """Another fit took over this fit's job (its lease) while this one ran: this one stops."""


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


class BucketNotFound(StorageError):
    """The bucket a storage URL names does not exist (or is not in that region/endpoint).

    Attributes:
        bucket: the bucket's name.
    """

    def __init__(self, bucket: str, message: str | None = None) -> None:
        self.bucket = bucket
        super().__init__(message or f"bucket {bucket!r} does not exist")

    def __reduce__(self) -> tuple[type[BucketNotFound], tuple[str, str]]:
        return (type(self), (self.bucket, str(self)))


class StorageAccessDenied(StorageError):
    """The credentials in use may not perform an operation on a bucket or key.

    Attributes:
        bucket: the bucket's name.
        key: the object key (with the storage's prefix), or ``""`` for a
            bucket-wide operation such as a listing.
    """

    def __init__(self, bucket: str, key: str, message: str | None = None) -> None:
        self.bucket = bucket
        self.key = key
        where = f"{bucket}/{key}" if key else bucket
        super().__init__(message or f"access denied to {where!r}")

    def __reduce__(self) -> tuple[type[StorageAccessDenied], tuple[str, str, str]]:
        return (type(self), (self.bucket, self.key, str(self)))


class StorageFailure(StorageError):
    """A storage adapter or plugin raised an exception that is not funcpipe's (translated at the boundary)."""


class StorageTimeout(StorageError, TimeoutError):
    """A storage operation of the driver did not finish within its timeout."""


class IntegrityError(StorageError):
    """An object read from storage failed its MAC, signature, header or key check."""


class CheckpointCorrupt(IntegrityError):
    """A checkpoint failed its check (its MAC, header or key); the job falls back to the one before."""


class ForeignObject(IntegrityError):
    """The object under a key was written for another key (see :mod:`funcpipe.binding`).

    Another job's or an earlier attempt's object, or one of another iteration
    or micro-batch, copied or left under this key; never consumed.

    Attributes:
        key: the key the object was read from.
        written_for: the key the object says it was written for (``None``: it names none).
    """

    def __init__(self, key: str, written_for: str | None, message: str | None = None) -> None:
        self.key = key
        self.written_for = written_for
        bound = "no key" if written_for is None else repr(written_for)
        super().__init__(
            message
            or f"object {key!r} was written for {bound}; refusing a stale or misplaced object "
            "(another job's or attempt's, or another iteration's or micro-batch's)"
        )

    def __reduce__(self) -> tuple[type[ForeignObject], tuple[str, str | None, str]]:
        return (type(self), (self.key, self.written_for, str(self)))


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
        #: After ``fit(max_retries=N)`` gave up: every attempt's error, in order.
        self.attempts: list[BaseException] = []
        message = f"{worker} failed: {cause}"
        if remote_traceback:
            message += "\n\nRemote traceback:\n" + remote_traceback.rstrip()
        super().__init__(message)

    def __reduce__(self) -> tuple[type[WorkerFailed], tuple[str, str, str]]:
        return (type(self), (self.worker, self.cause, self.remote_traceback))


class WorkerNotStarted(WorkerFailed):
    """A worker was launched but never started.

    A serverless call was accepted but its function never reported that it
    started, or a Ray actor was never placed (the cluster lacks what it asks for).
    """


class WorkerSilent(WorkerFailed):
    """A serverless call started, then stopped writing heartbeats (the function died or hung)."""


class WorkerTimeout(WorkerFailed):
    """A worker made no progress within the driver's timeout: it hangs, or is far slower than planned.

    ``worker`` is the one the stalled iteration waits on, as the driver found it
    from the messages in storage; ``cause`` names the iteration and what is missing.
    """


class FunctionNotDeployed(BackendError):
    """The function a call needs does not exist on the platform.

    Attributes:
        function: the function's name.
        where: the platform and region or account it was looked for in.
        deploy_command: the command that creates it.
    """

    def __init__(self, function: str, where: str, deploy_command: str) -> None:
        self.function = function
        self.where = where
        self.deploy_command = deploy_command
        super().__init__(
            f"function {function!r} is not deployed in {where}; hint: run `{deploy_command}` "
            "(backends/README.md) to create one function per memory tier"
        )

    def __reduce__(self) -> tuple[type[FunctionNotDeployed], tuple[str, str, str]]:
        return (type(self), (self.function, self.where, self.deploy_command))


class PayloadTooLarge(BackendError):
    """An invocation payload is larger than the platform accepts for asynchronous calls.

    Attributes:
        size: the payload's bytes.
        limit: the platform's limit in bytes.
    """

    def __init__(self, size: int, limit: int, platform: str, hint: str) -> None:
        self.size = size
        self.limit = limit
        self.platform = platform
        self.hint = hint
        super().__init__(
            f"invocation payload is {size:,} bytes, over the {limit:,}-byte asynchronous limit of "
            f"{platform}; hint: {hint}"
        )

    def __reduce__(self) -> tuple[type[PayloadTooLarge], tuple[int, int, str, str]]:
        return (type(self), (self.size, self.limit, self.platform, self.hint))
