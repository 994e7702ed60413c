"""errors: the exception tree, ObjectNotFound's message, WorkerFailed pickling, the package's exports."""

from __future__ import annotations

import importlib
import pickle

import pytest

import funcpipe
from funcpipe import errors
from funcpipe.errors import (
    BackendError,
    BucketNotFound,
    CheckpointCorrupt,
    ConfigError,
    FitInProgress,
    ForeignObject,
    FuncpipeError,
    FunctionNotDeployed,
    IntegrityError,
    JobBusy,
    JobUnfinished,
    LeaseLost,
    NonFiniteTraining,
    ObjectNotFound,
    PayloadTooLarge,
    PlanInfeasible,
    PlanTimeout,
    StorageAccessDenied,
    StorageError,
    StorageFailure,
    StorageTimeout,
    UserCodeError,
    VersionMismatch,
    WorkerFailed,
    WorkerNotStarted,
    WorkerSilent,
    WorkerTimeout,
)

# (class, its parent in the tree of the errors module's docstring)
TREE: list[tuple[type[Exception], type[Exception]]] = [
    (ConfigError, FuncpipeError),
    (VersionMismatch, ConfigError),
    (JobBusy, ConfigError),
    (JobUnfinished, ConfigError),
    (FitInProgress, ConfigError),
    (UserCodeError, ConfigError),
    (NonFiniteTraining, FuncpipeError),
    (LeaseLost, FuncpipeError),
    (PlanInfeasible, FuncpipeError),
    (PlanTimeout, FuncpipeError),
    (StorageError, FuncpipeError),
    (ObjectNotFound, StorageError),
    (BucketNotFound, StorageError),
    (StorageAccessDenied, StorageError),
    (StorageFailure, StorageError),
    (StorageTimeout, StorageError),
    (StorageTimeout, TimeoutError),
    (IntegrityError, StorageError),
    (ForeignObject, IntegrityError),
    (CheckpointCorrupt, IntegrityError),
    (WorkerFailed, FuncpipeError),
    (BackendError, FuncpipeError),
    (WorkerNotStarted, WorkerFailed),
    (WorkerSilent, WorkerFailed),
    (WorkerTimeout, WorkerFailed),
    (FunctionNotDeployed, BackendError),
    (PayloadTooLarge, BackendError),
]


@pytest.mark.parametrize(("cls", "parent"), TREE, ids=[cls.__name__ for cls, _ in TREE])
def test_tree(cls: type[Exception], parent: type[Exception]) -> None:
    assert issubclass(cls, parent)


def test_base_is_an_exception() -> None:
    assert issubclass(FuncpipeError, Exception)
    assert not issubclass(FuncpipeError, (ValueError, KeyError))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (ObjectNotFound, IntegrityError),
        (BucketNotFound, ObjectNotFound),
        (StorageAccessDenied, BucketNotFound),
        (StorageError, ConfigError),
        (WorkerFailed, BackendError),
        (PlanInfeasible, ConfigError),
        (ConfigError, PlanInfeasible),
    ],
)
def test_siblings_are_not_related(a: type[Exception], b: type[Exception]) -> None:
    assert not issubclass(a, b)


def test_every_error_class_is_in_the_tree() -> None:
    declared = {cls for cls, _ in TREE} | {FuncpipeError}
    defined = {
        value for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, FuncpipeError)
    }
    assert defined == declared


def test_config_error_is_a_value_error() -> None:
    # Callers that validate with ``except ValueError`` keep working.
    assert issubclass(ConfigError, ValueError)


def test_object_not_found_str_is_the_plain_message() -> None:
    error = ObjectNotFound("a/b")
    assert str(error) == "no object at key 'a/b'"
    assert error.key == "a/b"
    custom = ObjectNotFound("a/b", "object 'a/b' did not appear within 5 s")
    assert str(custom) == "object 'a/b' did not appear within 5 s"
    assert custom.key == "a/b"


def test_object_not_found_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        raise ObjectNotFound("k")
    assert isinstance(ObjectNotFound("k"), StorageError)


@pytest.mark.parametrize("traceback_text", ["", "Traceback (most recent call last):\n  ...\nValueError: boom\n"])
def test_worker_failed_pickles_with_its_fields(traceback_text: str) -> None:
    error = WorkerFailed("stage 1 replica 0", "ValueError: boom", traceback_text)
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is WorkerFailed
    assert restored.worker == "stage 1 replica 0"
    assert restored.cause == "ValueError: boom"
    assert restored.remote_traceback == traceback_text
    assert str(restored) == str(error)


def test_worker_failed_message() -> None:
    assert str(WorkerFailed("w", "ValueError: x")) == "w failed: ValueError: x"
    with_tb = WorkerFailed("w", "ValueError: x", "Traceback:\n  line\n\n")
    assert str(with_tb) == "w failed: ValueError: x\n\nRemote traceback:\nTraceback:\n  line"


@pytest.mark.parametrize("message", [None, "object 'k' did not appear within 5 s"])
def test_object_not_found_pickles_with_its_fields(message: str | None) -> None:
    # Workers on Ray raise this across a process boundary, like WorkerFailed.
    error = ObjectNotFound("k", message)
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(restored, ObjectNotFound)
    assert restored.key == "k"
    assert str(restored) == str(error)


@pytest.mark.parametrize("message", [None, "object 'a/k' was written for 'b/k', and nothing replaced it within 5 s"])
@pytest.mark.parametrize("written_for", ["b/k", None])
def test_foreign_object_pickles_with_its_fields(written_for: str | None, message: str | None) -> None:
    error = ForeignObject("a/k", written_for, message)
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is ForeignObject
    assert (restored.key, restored.written_for) == ("a/k", written_for)
    assert str(restored) == str(error)


def test_foreign_object_message_names_both_keys() -> None:
    assert str(ForeignObject("a/k", "b/k")).startswith("object 'a/k' was written for 'b/k'; refusing a stale")
    assert str(ForeignObject("a/k", None)).startswith("object 'a/k' was written for no key; refusing a stale")


def _public_error_classes() -> set[type[FuncpipeError]]:
    found: set[type[FuncpipeError]] = set()
    pending: list[type[FuncpipeError]] = [FuncpipeError]
    while pending:
        cls = pending.pop()
        if cls.__module__.split(".")[0] == "funcpipe" and not cls.__name__.startswith("_"):
            found.add(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_package_all_is_sorted() -> None:
    assert funcpipe.__all__ == sorted(funcpipe.__all__)
    assert len(set(funcpipe.__all__)) == len(funcpipe.__all__)


def test_package_all_exports_every_public_error() -> None:
    # Load every module that could define an error (not the Ray executor: Ray is slow to import).
    for module in ("checkpoint", "collectives", "function", "plans", "protocol", "signed", "trainer", "worker",
                   "storage"):
        importlib.import_module(f"funcpipe.{module}")
    classes = _public_error_classes()
    assert {cls.__name__ for cls in classes} >= set(errors.__all__)
    for cls in classes:
        assert cls.__name__ in funcpipe.__all__, cls
        assert getattr(funcpipe, cls.__name__) is cls


def test_package_all_names_resolve() -> None:
    for name in funcpipe.__all__:
        assert hasattr(funcpipe, name), name
    namespace: dict[str, object] = {}
    exec("from funcpipe import *", namespace)
    assert set(funcpipe.__all__) <= set(namespace)


@pytest.mark.parametrize(
    "error",
    [
        BucketNotFound("bkt"),
        BucketNotFound("bkt", "bucket 'bkt' does not exist; create it with `aws s3 mb s3://bkt`"),
        StorageAccessDenied("bkt", "a/b"),
        StorageAccessDenied("bkt", "", "access denied to 'bkt': check the IAM policy"),
    ],
    ids=repr,
)
def test_bucket_errors_pickle_with_their_fields(error: StorageError) -> None:
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is type(error)
    assert vars(restored) == vars(error)
    assert str(restored) == str(error)


def test_bucket_error_messages() -> None:
    assert str(BucketNotFound("bkt")) == "bucket 'bkt' does not exist"
    assert str(StorageAccessDenied("bkt", "a/b")) == "access denied to 'bkt/a/b'"
    assert str(StorageAccessDenied("bkt", "")) == "access denied to 'bkt'"
    assert StorageAccessDenied("bkt", "a/b").key == "a/b"


@pytest.mark.parametrize(
    "error",
    [
        FunctionNotDeployed("funcpipe-worker-2048", "AWS Lambda us-east-1", "funcpipe deploy aws_lambda"),
        PayloadTooLarge(300_000, 262_144, "AWS Lambda", "a smaller plan"),
        WorkerNotStarted("stage 0 replica 1", "never started"),
        WorkerSilent("stage 0 replica 1", "stopped reporting"),
        WorkerTimeout("stage 0 replica 1", "no progress in iteration 3 for 60 s"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_serverless_errors_pickle_with_their_message(error: FuncpipeError) -> None:
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is type(error)
    assert str(restored) == str(error)


def test_function_not_deployed_names_the_deploy_command() -> None:
    error = FunctionNotDeployed("funcpipe-worker-2048", "AWS Lambda us-east-1", "funcpipe deploy aws_lambda")
    assert "'funcpipe-worker-2048'" in str(error) and "`funcpipe deploy aws_lambda`" in str(error)


def test_payload_too_large_names_size_and_limit() -> None:
    assert "300,000 bytes, over the 262,144-byte" in str(PayloadTooLarge(300_000, 262_144, "AWS Lambda", "h"))
