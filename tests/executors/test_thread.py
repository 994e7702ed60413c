"""executors.thread: one thread per actor, calls in order, kill asks the actor to stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from funcpipe.errors import WorkerFailed
from funcpipe.executors.base import Actor, CallGroup, Resources
from funcpipe.executors.thread import ThreadExecutor

TIMEOUT_S = 10.0  # only reached when the code under test is broken


class Recorder(Actor):
    """Records which thread ran each call, and in what order."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.calls: list[tuple[int, int]] = []  # (value, thread id)
        self.release = threading.Event()
        self.running = 0
        self.overlapped = False
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def record(self, value: int) -> str:
        with self._lock:
            self.running += 1
            self.overlapped |= self.running > 1
        try:
            self.calls.append((value, threading.get_ident()))
            return f"{self.label}:{value}"
        finally:
            with self._lock:
                self.running -= 1

    def blocked(self, value: int) -> str:
        """Runs only once the test sets ``release``."""
        with self._lock:
            self.running += 1
        try:
            if not self.release.wait(TIMEOUT_S):
                raise AssertionError("release was never set")
            self.calls.append((value, threading.get_ident()))
            return f"{self.label}:{value}"
        finally:
            with self._lock:
                self.running -= 1

    def fail_when_released(self, message: str) -> None:
        if not self.release.wait(TIMEOUT_S):
            raise AssertionError("release was never set")
        raise ValueError(message)

    def wait_for_cancel(self) -> str:
        if not self.cancelled.wait(TIMEOUT_S):
            raise AssertionError("cancel() was never called")
        return "stopped"

    def cancel(self) -> None:
        self.cancelled.set()


@pytest.fixture
def executor() -> Iterator[ThreadExecutor]:
    executor = ThreadExecutor()
    yield executor
    for actor in executor.actors:
        if isinstance(actor.instance, Recorder):
            actor.instance.release.set()
    executor.shutdown()


def test_launch_builds_the_actor_from_its_arguments(executor: ThreadExecutor) -> None:
    handle = executor.launch(Recorder, "x", name="stage 0 replica 0", resources=Resources())
    assert handle.name == "stage 0 replica 0"
    assert isinstance(handle.instance, Recorder)
    assert handle.instance.label == "x"
    assert executor.actors == [handle]


def test_calls_of_one_actor_run_in_order_on_one_thread(executor: ThreadExecutor) -> None:
    handle = executor.launch(Recorder, "x", name="a", resources=Resources())
    actor = handle.instance
    assert isinstance(actor, Recorder)
    # The first call blocks until every later call has been posted.
    futures = [handle.call("blocked", 0)] + [handle.call("record", value) for value in range(1, 20)]
    actor.release.set()
    assert [future.result(timeout=TIMEOUT_S) for future in futures] == [f"x:{v}" for v in range(20)]
    assert [value for value, _ in actor.calls] == list(range(20))
    threads = {thread for _, thread in actor.calls}
    assert len(threads) == 1
    assert threads != {threading.get_ident()}
    assert not actor.overlapped


def test_actors_run_concurrently(executor: ThreadExecutor) -> None:
    first = executor.launch(Recorder, "a", name="a", resources=Resources())
    second = executor.launch(Recorder, "b", name="b", resources=Resources())
    blocked = first.call("blocked", 0)
    # "b" is not queued behind "a", which waits for the test.
    assert second.call("record", 1).result(timeout=TIMEOUT_S) == "b:1"
    assert not blocked.done()
    first.instance.release.set()  # type: ignore[attr-defined]
    assert blocked.result(timeout=TIMEOUT_S) == "a:0"


def test_call_group_results_in_launch_order(executor: ThreadExecutor) -> None:
    handles = [executor.launch(Recorder, label, name=label, resources=Resources()) for label in "abc"]
    futures = [handle.call("blocked", i) for i, handle in enumerate(handles)]
    group = CallGroup(list(zip(handles, futures, strict=True)))
    for handle, future in zip(reversed(handles), reversed(futures), strict=True):  # finish c, then b, then a
        handle.instance.release.set()  # type: ignore[attr-defined]
        future.result(timeout=TIMEOUT_S)
    assert group.results(timeout=TIMEOUT_S) == ["a:0", "b:1", "c:2"]


def test_call_group_reports_the_first_failure(executor: ThreadExecutor) -> None:
    # "b" is launched first; "a" fails first, then "b" fails too.
    b = executor.launch(Recorder, "b", name="stage 1 replica 0", resources=Resources())
    a = executor.launch(Recorder, "a", name="stage 0 replica 0", resources=Resources())
    b_future = b.call("fail_when_released", "second")
    a_future = a.call("fail_when_released", "first")
    group = CallGroup([(b, b_future), (a, a_future)])

    a.instance.release.set()  # type: ignore[attr-defined]
    assert group.wait(timeout=TIMEOUT_S)
    # Callbacks run in the order they were added: once ours runs, the group has seen b fail.
    b_seen = threading.Event()
    b_future.add_done_callback(lambda _: b_seen.set())
    b.instance.release.set()  # type: ignore[attr-defined]
    assert b_seen.wait(TIMEOUT_S)

    failure = group.failure()
    assert isinstance(failure, WorkerFailed)
    assert failure.worker == "stage 0 replica 0"
    assert failure.cause == "ValueError: first"
    with pytest.raises(WorkerFailed, match="stage 0 replica 0 failed: ValueError: first"):
        group.results(timeout=TIMEOUT_S)


def test_wait_times_out_while_a_call_is_blocked(executor: ThreadExecutor) -> None:
    handle = executor.launch(Recorder, "x", name="x", resources=Resources())
    future = handle.call("blocked", 0)
    group = CallGroup([(handle, future)])
    assert group.wait(timeout=0.01) is False
    handle.instance.release.set()  # type: ignore[attr-defined]
    assert group.wait(timeout=TIMEOUT_S) is True
    assert group.results() == ["x:0"]


def test_kill_cancels_the_actor_and_rejects_later_calls(executor: ThreadExecutor) -> None:
    handle = executor.launch(Recorder, "x", name="x", resources=Resources())
    running = handle.call("wait_for_cancel")
    handle.kill()
    assert running.result(timeout=TIMEOUT_S) == "stopped"
    with pytest.raises(RuntimeError):
        handle.call("record", 1)
    handle.kill()  # idempotent
    handle.join()
    assert handle.instance.calls == []  # type: ignore[attr-defined]


def test_shutdown_cancels_every_actor(executor: ThreadExecutor) -> None:
    handles = [executor.launch(Recorder, label, name=label, resources=Resources()) for label in "ab"]
    futures = [handle.call("wait_for_cancel") for handle in handles]
    instances = [handle.instance for handle in handles]
    executor.shutdown()
    assert [future.result(timeout=TIMEOUT_S) for future in futures] == ["stopped", "stopped"]
    assert all(instance.cancelled.is_set() for instance in instances)  # type: ignore[attr-defined]
    assert executor.actors == []


class _Queued(Actor):
    """``first`` runs until cancel(); ``second`` is queued behind it.

    ``cancel()`` returns once it is decided whether ``second`` runs: either it
    started, or its future was cancelled. Nothing here depends on timing.
    """

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.decided = threading.Event()
        self.second_ran = False

    def watch(self, second: Future[Any]) -> None:
        second.add_done_callback(lambda f: self.decided.set() if f.cancelled() else None)

    def first(self) -> None:
        if not self.cancelled.wait(TIMEOUT_S):
            raise AssertionError("cancel() was never called")

    def second(self) -> None:
        self.second_ran = True
        self.decided.set()

    def cancel(self) -> None:
        self.cancelled.set()
        if not self.decided.wait(TIMEOUT_S):
            raise AssertionError("the queued call neither ran nor was cancelled")


def test_kill_does_not_start_a_queued_call(executor: ThreadExecutor) -> None:
    handle = executor.launch(_Queued, name="q", resources=Resources())
    actor = handle.instance
    assert isinstance(actor, _Queued)
    first = handle.call("first")
    second = handle.call("second")
    actor.watch(second)
    handle.kill()
    handle.join()
    assert first.result(timeout=TIMEOUT_S) is None
    assert second.cancelled()
    assert not actor.second_ran
