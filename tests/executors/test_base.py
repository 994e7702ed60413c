"""executors.base (and get_executor): failure mapping and CallGroup, with hand-made handles and futures."""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pytest

import funcpipe.executors
from funcpipe.errors import ConfigError, WorkerFailed
from funcpipe.executors import ThreadExecutor, get_executor
from funcpipe.executors.base import Actor, ActorHandle, CallGroup, Executor, Resources


class FakeHandle(ActorHandle):
    """A handle whose calls are futures the test completes by hand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.futures: list[Future[Any]] = []
        self.kills = 0

    def call(self, method: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.futures.append(future)
        return future

    def kill(self) -> None:
        self.kills += 1


class FakeExecutor(Executor):
    name = "fake"

    def launch(self, actor_cls: type[Actor], *args: Any, name: str, resources: Resources) -> ActorHandle:
        return FakeHandle(name)


def group_of(names: Sequence[str]) -> tuple[list[FakeHandle], list[Future[Any]], CallGroup]:
    handles = [FakeHandle(name) for name in names]
    futures = [handle.call("run") for handle in handles]
    return handles, futures, CallGroup(list(zip(handles, futures, strict=True)))


# --------------------------------------------------------------------------- ActorHandle


def test_failure_maps_a_plain_exception_to_worker_failed() -> None:
    failure = FakeHandle("stage 1 replica 0").failure(ValueError("boom"))
    assert isinstance(failure, WorkerFailed)
    assert failure.worker == "stage 1 replica 0"
    assert failure.cause == "ValueError: boom"
    assert str(failure) == "stage 1 replica 0 failed: ValueError: boom"


def test_failure_passes_worker_failed_through() -> None:
    original = WorkerFailed("stage 0 replica 1", "KeyError: 'x'", "Traceback ...")
    assert FakeHandle("stage 2 replica 0").failure(original) is original


def test_release_defaults_to_kill() -> None:
    handle = FakeHandle("a")
    handle.release()
    assert handle.kills == 1


def test_an_actor_subclass_inherits_a_harmless_cancel() -> None:
    class Plain(Actor):
        pass

    Plain().cancel()  # nothing to interrupt: must not raise


# --------------------------------------------------------------------------- Executor defaults


def test_executor_defaults() -> None:
    executor = FakeExecutor()
    requested = [Resources(2.0, 512), Resources()]
    assert executor.fit_resources(requested) == [Resources(2.0, 512), Resources(1.0, None)]
    executor.check_storage("memory://anything")  # accepts every storage
    executor.shutdown()


def test_resources_defaults() -> None:
    assert Resources() == Resources(num_cpus=1.0, memory_mb=None)


# --------------------------------------------------------------------------- CallGroup


def test_results_in_launch_order_whatever_the_completion_order() -> None:
    _, futures, group = group_of(["a", "b", "c"])
    futures[2].set_result("c")
    futures[0].set_result("a")
    assert not group.wait(timeout=0)
    futures[1].set_result("b")
    assert group.results(timeout=0) == ["a", "b", "c"]


def test_wait_is_false_while_a_call_runs() -> None:
    _, futures, group = group_of(["a", "b"])
    futures[0].set_result(1)
    assert group.wait(timeout=0.01) is False
    with pytest.raises(TimeoutError, match=r"0\.01"):
        group.results(timeout=0.01)
    futures[1].set_result(2)
    assert group.wait(timeout=0) is True
    assert group.results() == [1, 2]


def test_first_failure_in_completion_order_wins() -> None:
    # "b" is launched first but "a" fails first.
    handles, futures, group = group_of(["b", "a", "c"])
    assert group.failure() is None
    futures[1].set_exception(ValueError("first"))
    futures[0].set_exception(RuntimeError("second"))
    failure = group.failure()
    assert isinstance(failure, WorkerFailed)
    assert failure.worker == "a"
    assert failure.cause == "ValueError: first"
    assert group.failed()
    # wait() returns as soon as one call failed, even though "c" still runs.
    assert group.wait(timeout=0) is True
    with pytest.raises(WorkerFailed) as info:
        group.results(timeout=0)
    assert info.value is failure
    assert not futures[2].done()
    assert [handle.kills for handle in handles] == [0, 0, 0]  # killing is the caller's choice


def test_a_cancelled_call_is_a_failure() -> None:
    _, futures, group = group_of(["a", "b"])
    assert futures[0].cancel()
    failure = group.failure()
    assert isinstance(failure, WorkerFailed)
    assert failure.worker == "a"
    assert "cancelled" in failure.cause


def test_calls_already_finished_when_grouped_are_counted() -> None:
    handle = FakeHandle("a")
    done = handle.call("run")
    done.set_result(42)
    failed = handle.call("run")
    failed.set_exception(KeyError("k"))
    assert CallGroup([(handle, done)]).results(timeout=0) == [42]
    failure = CallGroup([(handle, done), (handle, failed)]).failure()
    assert failure is not None and failure.cause == "KeyError: 'k'"


def test_empty_group_is_done() -> None:
    assert CallGroup([]).results(timeout=0) == []


def test_kill_all_kills_every_handle() -> None:
    handles, _, group = group_of(["a", "b"])
    group.kill_all()
    assert [handle.kills for handle in handles] == [1, 1]


# --------------------------------------------------------------------------- get_executor


def test_get_executor_thread() -> None:
    executor = get_executor("thread")
    assert isinstance(executor, ThreadExecutor)
    assert executor.name == "thread"


def test_get_executor_passes_an_instance_through() -> None:
    executor = FakeExecutor()
    assert get_executor(executor) is executor


def test_get_executor_unknown_backend_lists_the_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'lambda'; choose one of alibaba_fc, aws_lambda, ray, thr"):
        get_executor("lambda")


#: backend -> (the module of its SDK that its extra installs, the extra)
CLOUD_SDKS = {"aws_lambda": ("boto3", "aws"), "alibaba_fc": ("alibabacloud_fc20230330", "alibaba")}


def without(monkeypatch: pytest.MonkeyPatch, backend: str, module: str) -> None:
    """As if ``module`` were not installed: ``import module`` fails, and so does the backend's own import."""
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: the import machinery refuses it
    # Imported afresh: neither the cached module nor the package's attribute for it stand in.
    monkeypatch.delitem(sys.modules, f"funcpipe.executors.{backend}", raising=False)
    monkeypatch.delattr(funcpipe.executors, backend, raising=False)


@pytest.mark.parametrize("backend", sorted(CLOUD_SDKS))
def test_get_executor_without_the_cloud_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    sdk, extra = CLOUD_SDKS[backend]
    without(monkeypatch, backend, sdk)
    with pytest.raises(ConfigError) as info:
        get_executor(backend)
    assert str(info.value) == (
        f"backend {backend!r} needs {sdk}, which is not installed; hint: pip install 'funcpipe[{extra}]'"
    )
    assert isinstance(info.value.__cause__, ModuleNotFoundError) and info.value.__cause__.name == sdk


def test_get_executor_with_an_sdk_lacking_a_name_says_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    # An SDK too old for the backend: the module imports, the name the backend takes from it is not there.
    name = "alibabacloud_credentials.client"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.delitem(sys.modules, "funcpipe.executors.alibaba_fc", raising=False)
    monkeypatch.delattr(funcpipe.executors, "alibaba_fc", raising=False)
    with pytest.raises(ConfigError, match=(
        r"^backend 'alibaba_fc' cannot import alibabacloud_credentials.client \(cannot import name 'Client' .*\); "
        r"hint: pip install --upgrade 'funcpipe\[alibaba\]'$"
    )):
        get_executor("alibaba_fc")


def test_get_executor_lets_a_broken_funcpipe_module_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    # funcpipe's own module failing to import is a bug, not a missing extra: no install hint hides it.
    without(monkeypatch, "aws_lambda", "funcpipe.executors.serverless")
    with pytest.raises(ModuleNotFoundError, match=r"funcpipe\.executors\.serverless"):
        get_executor("aws_lambda")


def test_call_group_names_the_unfinished_and_the_not_started() -> None:
    handles, futures, group = group_of(["a", "b", "c"])
    assert group.unfinished() == ["a", "b", "c"]
    assert group.not_started() == []  # the default: a handle that cannot tell counts as started
    futures[1].set_result(None)
    assert group.unfinished() == ["a", "c"]
    handles[0].started = lambda: False  # type: ignore[method-assign]
    handles[2].started = lambda: True  # type: ignore[method-assign]
    assert group.not_started() == ["a"]


class FakeClock:
    """A monotonic clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_wait_started_returns_once_every_actor_started() -> None:
    handles, _, group = group_of(["a", "b"])
    polls = {"b": 0}

    def b_started() -> bool:
        polls["b"] += 1
        return polls["b"] > 3  # starts at the 4th look

    handles[0].started = lambda: True  # type: ignore[method-assign]
    handles[1].started = b_started  # type: ignore[method-assign]
    clock = FakeClock(step=1.0)
    assert group.wait_started(100.0, poll_s=0.001, clock=clock) == []
    assert polls["b"] == 4
    assert clock.now < 100.0  # it ended by the start, not the deadline


def test_wait_started_names_who_did_not_start_by_the_deadline() -> None:
    handles, _, group = group_of(["a", "b", "c"])
    handles[0].started = lambda: True  # type: ignore[method-assign]
    handles[1].started = lambda: False  # type: ignore[method-assign]
    handles[2].started = lambda: False  # type: ignore[method-assign]
    clock = FakeClock(step=10.0)
    assert group.wait_started(300.0, poll_s=0.001, clock=clock) == ["b", "c"]
    assert clock.now >= 300.0


def test_wait_started_ends_at_a_failure_or_at_stop() -> None:
    handles, futures, group = group_of(["a", "b"])
    handles[1].started = lambda: False  # type: ignore[method-assign]
    clock = FakeClock(step=0.0)  # the deadline never comes
    futures[0].set_exception(RuntimeError("boom"))
    assert group.wait_started(1.0, poll_s=0.001, clock=clock) == ["b"]
    _, _, fresh = group_of(["c"])
    fresh._calls[0][0].started = lambda: False  # type: ignore[method-assign]
    assert fresh.wait_started(1.0, stop=lambda: True, poll_s=0.001, clock=clock) == ["c"]
