from __future__ import annotations

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
