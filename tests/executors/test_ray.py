from __future__ import annotations

import sys

import pytest

from funcpipe import ConfigError
from funcpipe.executors import Resources
from funcpipe.executors.ray import Ray

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def test_requests_that_fit_are_kept() -> None:
    requested = [Resources(0.5, 100), Resources(1.0, None)]
    assert Ray().fit_resources(requested) == requested


def test_too_many_cpus_are_shared_when_oversubscribing() -> None:
    fitted = Ray().fit_resources([Resources(1.0)] * 8)  # the session's Ray has 2 CPUs
    assert [r.num_cpus for r in fitted] == pytest.approx([0.25] * 8)


def test_too_much_memory_is_dropped_when_oversubscribing() -> None:
    fitted = Ray().fit_resources([Resources(0.1, 10**9)])  # a petabyte
    assert fitted == [Resources(0.1, None)]


def test_without_oversubscribing_the_error_names_what_was_asked() -> None:
    with pytest.raises(ConfigError, match=r"asks for 8 CPUs and 0 MB, but the Ray cluster has 2 CPUs"):
        Ray(oversubscribe=False).fit_resources([Resources(1.0)] * 8)


def test_memory_storage_is_refused() -> None:
    with pytest.raises(ConfigError, match="lives inside one process"):
        Ray().check_storage("memory://x")
    Ray().check_storage("file:///tmp/x")  # a shared directory works


def test_a_constructor_that_raises_fails_every_call() -> None:
    from funcpipe.executors.base import Actor

    class Broken(Actor):
        def __init__(self) -> None:
            raise RuntimeError("cannot build")

        def ping(self) -> str:
            return "pong"

    handle = Ray().launch(Broken, name="broken actor", resources=Resources(0.1))
    future = handle.call("ping")
    with pytest.raises(Exception) as info:
        future.result(timeout=60)
    failure = handle.failure(info.value)
    assert failure.worker == "broken actor"
    assert failure.cause == "RuntimeError: cannot build"
    handle.kill()


def test_release_kills_a_host_that_does_not_stop_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import ray
    import ray.exceptions

    from funcpipe.executors import ray as ray_executor
    from funcpipe.executors.base import Actor

    class StuckInCancel(Actor):
        def ping(self) -> str:
            return "pong"

        def cancel(self) -> None:
            threading.Event().wait()  # never returns

    monkeypatch.setattr(ray_executor, "RELEASE_TIMEOUT_S", 1.0)
    handle = Ray().launch(StuckInCancel, name="stuck", resources=Resources(0.1))
    assert handle.call("ping").result(timeout=60) == "pong"
    handle.release()
    assert all(handle.host not in hosts for hosts in ray_executor._IDLE.values())
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.host.stop.remote(), timeout=60)


def _can_lower_niceness() -> bool:
    """Whether this process may lower a thread's niceness (root, CAP_SYS_NICE or RLIMIT_NICE), tried in a thread."""
    import os
    import threading

    result: list[bool] = []

    def attempt() -> None:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, min(mine + 5, 19))
            os.setpriority(os.PRIO_PROCESS, 0, mine)
        except PermissionError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return result == [True]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")


@linux_only
def test_match_priority_lowers_niceness_and_never_raises_it() -> None:
    import os
    import threading

    from funcpipe.executors.ray import match_priority

    if not _can_lower_niceness():
        pytest.skip("this process may not lower niceness")
    seen: list[object] = []

    def in_a_thread() -> None:  # niceness is per thread on Linux: the test's own stays as it is
        os.setpriority(os.PRIO_PROCESS, 0, 12)
        seen.append((match_priority(15), os.getpriority(os.PRIO_PROCESS, 0)))  # 12 is less nice already
        seen.append((match_priority(4), os.getpriority(os.PRIO_PROCESS, 0)))
        seen.append(match_priority(None))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [(True, 12), (True, 4), False]


@linux_only
def test_a_host_and_the_threads_its_actor_starts_run_at_the_drivers_niceness() -> None:
    """A local Ray starts its workers at niceness 15; a host runs at the driver's."""
    import os

    from funcpipe.executors.base import Actor

    if not _can_lower_niceness():
        pytest.skip("this process may not lower niceness")

    class Niceness(Actor):
        def read(self) -> tuple[int, int]:
            import threading

            started: list[int] = []
            thread = threading.Thread(target=lambda: started.append(os.getpriority(os.PRIO_PROCESS, 0)))
            thread.start()
            thread.join()
            return os.getpriority(os.PRIO_PROCESS, 0), started[0]

    driver = os.getpriority(os.PRIO_PROCESS, 0)
    handle = Ray().launch(Niceness, name="niceness", resources=Resources(0.1))
    try:
        assert tuple(handle.call("read").result(timeout=60)) == (driver, driver)
    finally:
        handle.kill()
