from __future__ import annotations

import sys

import pytest

from funcpipe import ConfigError
from funcpipe.executors import Resources
from funcpipe.executors.ray import Ray, RayActor

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


# --------------------------------------------------------------------------- clusters: storage, address, start


LOCAL = {"127.0.0.1", "::1", "localhost", "10.0.0.5", "driver-host"}


def _node(address: str, alive: bool = True) -> dict[str, object]:
    return {"NodeManagerAddress": address, "Alive": alive}


def test_other_hosts_are_the_live_nodes_not_on_this_host() -> None:
    from funcpipe.executors.ray import other_hosts

    # Two nodes on this host (by its IP, by loopback) are a cluster on one machine.
    assert other_hosts([_node("10.0.0.5"), _node("10.0.0.5"), _node("127.0.0.1")], LOCAL) == []
    nodes = [_node("10.0.0.5"), _node("10.0.0.7"), _node("10.0.0.8", alive=False), _node("10.0.0.7")]
    assert other_hosts(nodes, LOCAL) == ["10.0.0.7"]  # a dead node holds no workers


def test_local_storage_with_a_node_on_another_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from funcpipe.executors.ray import local_addresses

    here = sorted(local_addresses() - {"localhost", "localhost.localdomain", "::1"})[0]
    monkeypatch.setattr(ray, "nodes", lambda: [_node(here), _node("203.0.113.9")])
    for url in ("file:///data/runs", "throttled+file:///dev/shm/x"):
        with pytest.raises(ConfigError) as info:
            Ray().check_storage(url)
        message = str(info.value)
        assert f"storage {url!r} is a directory on this machine" in message
        assert "(203.0.113.9)" in message
        assert "s3://" in message and "oss://" in message and "Ray(..., shared_storage=True)" in message
    Ray(shared_storage=True).check_storage("file:///data/runs")  # the user vouches for a shared mount
    Ray().check_storage("s3://bucket/runs?endpoint_url=http://127.0.0.1:9000")
    monkeypatch.setattr(ray, "nodes", lambda: [_node(here), _node("127.0.0.1")])
    Ray().check_storage("file:///data/runs")  # every node on this machine


def test_same_address_compares_hosts_by_ip_and_this_host_as_one() -> None:
    from funcpipe.executors.ray import same_address

    assert same_address("10.0.0.5:6379", "10.0.0.5:6379", LOCAL)
    assert same_address("127.0.0.1:6379", "10.0.0.5:6379", LOCAL)  # loopback is this host too
    assert same_address("localhost:6379", "driver-host:6379", LOCAL)
    assert not same_address("10.0.0.5:6380", "10.0.0.5:6379", LOCAL)
    assert not same_address("10.0.0.7:6379", "10.0.0.5:6379", LOCAL)
    assert not same_address("ray://127.0.0.1:10001", "10.0.0.5:6379", LOCAL)  # Ray Client is not the GCS
    assert same_address("ray://10.0.0.7:10001", "ray://10.0.0.7:10001", LOCAL)
    assert not same_address("10.0.0.5", "10.0.0.5:6379", LOCAL)  # no port: nothing to compare


def test_an_address_other_than_the_running_ray_is_refused() -> None:
    import ray

    running = ray.get_runtime_context().gcs_address
    for address in ("ray://127.0.0.1:1", "127.0.0.1:1"):
        with pytest.raises(ConfigError) as info:
            Ray(address=address).fit_resources([Resources(0.1)])
        assert f"Ray(address={address!r}) asks for another Ray than the one this process already runs" in str(
            info.value
        )
        assert running in str(info.value)
    port = running.rsplit(":", 1)[1]
    assert Ray(address=f"127.0.0.1:{port}").fit_resources([Resources(0.1)]) == [Resources(0.1)]
    assert Ray(address="auto").fit_resources([Resources(0.1)]) == [Resources(0.1)]


def test_rays_own_reason_and_hint_are_kept_when_it_cannot_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from funcpipe import BackendError

    # The chain Ray 2.60 raises against a cluster with token authentication (as captured).
    inner = RuntimeError(
        "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
        '  File "ray/_private/node.py", line 996, in _init_gcs_client\n'
        "    client = GcsClient(\n"
        "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing or "
        "incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token'). Ensure that the token ...\n"
    )

    def refuse(**kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 10.9.9.9:6379") from inner

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(BackendError) as info:
        Ray(address="10.9.9.9:6379").fit_resources([Resources(1.0)])
    assert str(info.value).startswith(
        "could not start or reach 10.9.9.9:6379: Failed to connect to Ray cluster at 10.9.9.9:6379: "
        "Failed to connect to GCS. Last connection error ray.exceptions.AuthenticationError: RPC error: "
        "InvalidAuthToken: Authentication token is missing or incorrect. Note: RAY_AUTH_MODE is currently "
        "'disabled' (not 'token')."
    )
    assert "hint: a cluster with token authentication needs RAY_AUTH_MODE=token" in str(info.value)


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan"), "60", True])
def test_a_bad_start_allowance_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match=r"Ray\(start_timeout_s=.*\) must be a finite number of seconds >= 0"):
        Ray(start_timeout_s=value)  # type: ignore[arg-type]


def test_a_worker_slower_to_start_than_the_timeout_is_waited_for() -> None:
    """A loaded machine: a worker takes longer to start than ``timeout_s``, yet the fit trains as plain PyTorch."""
    import time

    from torch import nn

    from funcpipe import Plan, Trainer
    from funcpipe.executors.base import Actor
    from funcpipe.worker import StageWorker
    from tests.helpers import assert_same_parameters, mlp7, plain_training, regression_batches, sgd_momentum

    timeout_s = 5.0

    class SlowToStart(StageWorker):
        def __init__(self, payload: dict[str, object]) -> None:
            if payload["stage"] == 1:
                time.sleep(timeout_s + 4)  # stands in for a slow process start; not a race being waited out
            super().__init__(payload)

    class SlowExecutor(Ray):
        def launch(self, actor_cls: type[Actor], *args: object, name: str, resources: Resources) -> RayActor:
            return super().launch(SlowToStart, *args, name=name, resources=resources)

    batches = regression_batches(3, 4)
    model = mlp7()
    expected = plain_training(model, nn.functional.mse_loss, sgd_momentum, batches)
    plan = Plan.manual([4, 3], micro_batch_size=2, global_batch_size=4)
    trainer = Trainer(model, nn.functional.mse_loss, sgd_momentum, plan, backend=SlowExecutor(start_timeout_s=60.0),
                      timeout_s=timeout_s)
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, expected)


def test_rays_start_up_notes_go_to_our_log_and_its_errors_still_show(caplog: pytest.LogCaptureFixture) -> None:
    import io
    import logging

    from funcpipe.executors.ray import _ray_start_up_to_our_log

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # stands for Ray's own stderr handler
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="funcpipe.executors.ray"), _ray_start_up_to_our_log():
            logging.getLogger("ray._private.auth").warning("Token authentication is enabled for this Ray cluster.")
            logging.getLogger("ray._private.worker").error("the GCS did not answer")
        assert "Token authentication" not in stream.getvalue()  # not through the bar
        assert "the GCS did not answer" in stream.getvalue()
        assert [r.getMessage() for r in caplog.records if r.name == "funcpipe.executors.ray"] == [
            "ray: Token authentication is enabled for this Ray cluster."]
        logging.getLogger("ray._private.auth").warning("after the start")
        assert "after the start" in stream.getvalue()  # only the start is diverted
    finally:
        ray_logger.removeHandler(handler)
