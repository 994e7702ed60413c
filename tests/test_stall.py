"""stall: naming the worker a timed-out iteration waits on; end to end, hangs are bounded on threads and Ray.

The end-to-end tests give ``fit`` a short timeout and a layer that hangs
(:mod:`tests.fakes.layers`); ``fit`` must raise a named error within the
timeout plus a margin for a loaded machine, and leave no actor or thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from funcpipe import Plan, Trainer, WorkerNotStarted, WorkerTimeout
from funcpipe.protocol import JobKeys
from funcpipe.stall import Stall, find_stall
from funcpipe.storage import MemoryStorage
from tests.fakes.layers import Hang, HangOnLoad
from tests.helpers import SpyExecutor, assert_no_funcpipe_thread_left, mlp7, regression_batches

SGD = lambda p: torch.optim.SGD(p, lr=0.05)

#: Slack over the configured timeout for ``fit`` to raise, on a loaded two-core machine.
MARGIN_S = 30.0

# -- find_stall, on messages laid out by hand ----------------------------------------------

KEYS = JobKeys("job-stall")
#: Three stages, the middle one with two replicas (micro-batches 0, 2 and 1, 3); four micro-batches.
PLAN = Plan.manual([1, 1, 1], replicas=[1, 2, 1], micro_batch_size=1, global_batch_size=4)
GRADIENT_BYTES = [64, 64, 64]


def storage_with(*iterations: int, without: tuple[str, ...] = ()) -> MemoryStorage:
    """A storage holding every object of ``iterations`` except the keys ``without``."""
    storage = MemoryStorage(f"stall-{time.monotonic_ns()}")
    for it in iterations:
        for key in KEYS.iteration_keys(it, PLAN, GRADIENT_BYTES):
            if key not in without:
                storage.put(key, b"x")
    return storage


def test_a_stage_stuck_in_forward() -> None:
    # Stage 1 replica 1 has the activations of micro-batches 1 and 3 but sent neither on.
    missing = tuple(KEYS.message(5, "act", 2, 0, m) for m in (1, 3))
    storage = storage_with(4, 5, without=missing)
    assert find_stall(storage, KEYS, PLAN, GRADIENT_BYTES, 5) == Stall(
        1, 1, 5, "its activation of micro-batch 1 for stage 2"
    )


def test_a_stage_stuck_in_the_previous_iteration_s_backward_is_found_before_those_waiting_on_it() -> None:
    # Iteration 4 was reported (the last stage does not wait for the backward above it), but
    # stage 1 never sent its input gradients; so stage 0 never began iteration 5 either.
    backward = tuple(KEYS.message(4, "grad", 0, 0, m) for m in range(4))
    forward = tuple(KEYS.message(5, "act", 1, m % 2, m) for m in range(4))
    storage = storage_with(4, 5, without=backward + forward)
    assert find_stall(storage, KEYS, PLAN, GRADIENT_BYTES, 5) == Stall(
        1, 0, 4, "its input gradient of micro-batch 0 for stage 0"
    )


def test_a_replica_that_never_joins_the_all_reduce() -> None:
    storage = storage_with(5, without=(KEYS.chunk(5, 1, 0, 1), KEYS.metrics(5, 2, 0)))
    assert find_stall(storage, KEYS, PLAN, GRADIENT_BYTES, 5) == Stall(
        1, 1, 5, "its share of replica 0's gradient chunk (the all-reduce)"
    )


def test_a_last_stage_that_does_not_report() -> None:
    storage = storage_with(0, without=(KEYS.metrics(0, 2, 0),))
    assert find_stall(storage, KEYS, PLAN, GRADIENT_BYTES, 0) == Stall(
        2, 0, 0, "its report of the iteration (it hangs in a backward, the all-reduce or the update)"
    )


def test_nobody_is_blamed_for_a_missing_input() -> None:
    # The driver's own upload is missing: every worker only waits.
    everything = tuple(KEYS.iteration_keys(3, PLAN, GRADIENT_BYTES))
    storage = storage_with(3, without=everything)
    storage.put(KEYS.message(3, "target", 2, 0, 0), b"x")
    assert find_stall(storage, KEYS, PLAN, GRADIENT_BYTES, 3) is None


def test_a_previous_run_whose_objects_are_gone_is_not_blamed() -> None:
    # Iteration 7 begins a run (resumed from a checkpoint): iteration 6's objects were deleted.
    storage = storage_with(7, without=(KEYS.message(7, "act", 1, 0, 0),))
    assert find_stall(storage, KEYS, PLAN, GRADIENT_BYTES, 7) == Stall(
        0, 0, 7, "its activation of micro-batch 0 for stage 1"
    )


@pytest.mark.parametrize(("schedule", "blamed"), [
    ("gpipe", Stall(0, 0, 5, "its activation of micro-batch 4 for stage 1")),
    ("1f1b", Stall(2, 0, 5, "its input gradient of micro-batch 0 for stage 1")),
], ids=["gpipe", "1f1b"])
def test_a_1f1b_forward_waits_on_the_backward_before_it(schedule: str, blamed: Stall) -> None:
    # Eight micro-batches; the 1F1B windows are 4, 2 (micro-batches 0, 2, 4, 6 and 1, 3, 5, 7) and 1.
    # The last stage hangs in its first backward: under 1F1B every stage above it has run its window's
    # forwards and waits for a gradient, its next inputs there; under GPipe stage 0 would have sent on
    # every activation, so the same objects mean that it hangs in a forward.
    plan = Plan.manual([1, 1, 1], replicas=[1, 2, 1], micro_batch_size=1, global_batch_size=8, schedule=schedule)
    storage = MemoryStorage(f"stall-1f1b-{schedule}")
    for key in KEYS.iteration_keys(4, plan, GRADIENT_BYTES):
        storage.put(key, b"x")
    for m in range(8):
        storage.put(KEYS.message(5, "input", 0, 0, m), b"x")
        storage.put(KEYS.message(5, "target", 2, 0, m), b"x")
    for m in range(4):
        storage.put(KEYS.message(5, "act", 1, m % 2, m), b"x")
        storage.put(KEYS.message(5, "act", 2, 0, m), b"x")
    assert find_stall(storage, KEYS, plan, GRADIENT_BYTES, 5) == blamed


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Path]:
    """The file that ends a hang; created at teardown whatever happened, so no thread stays blocked."""
    path = tmp_path / "release"
    yield path
    path.touch()


def fit_expecting(
    error: type[Exception], trainer: Trainer, batches: list[Any], release: Path
) -> tuple[Exception, float]:
    """Run ``fit`` until it raises ``error``; the error and the seconds it took. Releases the hang."""
    started = time.monotonic()
    try:
        with pytest.raises(error) as info:
            trainer.fit(batches, progress=False)
    finally:
        release.touch()
    return info.value, time.monotonic() - started


class TestThreads:
    #: The driver's timeout; workers wait twice as long for one object.
    TIMEOUT_S = 5.0
    #: A cancelled worker stops at its next poll; one that was not cancelled would wait
    #: 2 * TIMEOUT_S for its next object: this bound tells the two apart.
    STOP_S = 8.0

    def test_a_hang_in_forward_names_the_stage_and_the_iteration(self, release: Path) -> None:
        plan = Plan.manual([2, 2], replicas=[1, 2], micro_batch_size=2, global_batch_size=8)
        # Stage 0 runs 4 forwards per iteration: the 5th, micro-batch 0 of iteration 1, hangs.
        model = nn.Sequential(nn.Linear(8, 8), Hang(str(release), after=4), nn.Tanh(), nn.Linear(8, 3))
        trainer = Trainer(model, nn.functional.mse_loss, SGD, plan, backend="thread",
                          storage="memory://hang-forward", timeout_s=self.TIMEOUT_S)
        error, elapsed = fit_expecting(WorkerTimeout, trainer, regression_batches(3, 8), release)
        assert self.TIMEOUT_S <= elapsed < self.TIMEOUT_S + MARGIN_S
        assert isinstance(error, WorkerTimeout)
        assert error.worker == "stage 0 replica 0"
        assert error.cause.startswith(
            "no progress in iteration 1 for 5 s: stage 0 has not written its activation of micro-batch 0 "
            "for stage 1, though its inputs are there"
        )
        assert "hint: raise Trainer(timeout_s=...)" in str(error)
        assert Path(f"{release}.entered").exists()
        assert_no_funcpipe_thread_left(within_s=self.STOP_S)

    def test_a_hang_after_the_last_iteration_reported_is_bounded_too(self, release: Path) -> None:
        # The last stage reports iteration 0 without waiting for stage 0's backward, which hangs:
        # the driver's wait for the workers to return must time out, not block.
        plan = Plan.manual([2, 2], micro_batch_size=2, global_batch_size=4)
        model = nn.Sequential(nn.Linear(8, 8), Hang(str(release), phase="backward"), nn.Tanh(), nn.Linear(8, 3))
        trainer = Trainer(model, nn.functional.mse_loss, SGD, plan, backend="thread",
                          storage="memory://hang-backward", timeout_s=self.TIMEOUT_S)
        error, elapsed = fit_expecting(WorkerTimeout, trainer, regression_batches(1, 4), release)
        assert self.TIMEOUT_S <= elapsed < self.TIMEOUT_S + MARGIN_S
        assert str(error).startswith(
            "stage 0 replica 0 failed: did not return within 5 s after iteration 0, the run's last, finished "
            "(unfinished: stage 0 replica 0)"
        )
        assert Path(f"{release}.entered").exists()
        assert_no_funcpipe_thread_left(within_s=self.STOP_S)

    def test_a_1f1b_hang_in_a_backward_is_blamed_on_its_stage_not_on_the_one_waiting_for_it(
        self, release: Path
    ) -> None:
        # Stage 0 runs its window of two forwards, then waits for the gradient of micro-batch 0; its
        # later inputs are there, but the activations it has not sent are not its fault.
        plan = Plan.manual([2, 2], micro_batch_size=2, global_batch_size=8, schedule="1f1b")
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), Hang(str(release), phase="backward"), nn.Linear(8, 3))
        trainer = Trainer(model, nn.functional.mse_loss, SGD, plan, backend="thread",
                          storage="memory://hang-1f1b-backward", timeout_s=self.TIMEOUT_S)
        error, elapsed = fit_expecting(WorkerTimeout, trainer, regression_batches(2, 8), release)
        assert self.TIMEOUT_S <= elapsed < self.TIMEOUT_S + MARGIN_S
        assert str(error).startswith(
            "stage 1 replica 0 failed: no progress in iteration 0 for 5 s: stage 1 has not written its input "
            "gradient of micro-batch 0 for stage 0"
        )
        assert Path(f"{release}.entered").exists()
        assert_no_funcpipe_thread_left(within_s=self.STOP_S)

    def test_a_worker_that_never_gets_to_its_first_iteration(self, release: Path) -> None:
        # Stage 1's worker hangs while it loads its layers: it never starts iteration 0.
        plan = Plan.manual([2, 2], micro_batch_size=2, global_batch_size=4)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), HangOnLoad(str(release)), nn.Linear(8, 3))
        trainer = Trainer(model, nn.functional.mse_loss, SGD, plan, backend="thread",
                          storage="memory://hang-on-load", timeout_s=self.TIMEOUT_S)
        error, elapsed = fit_expecting(WorkerTimeout, trainer, regression_batches(2, 4), release)
        assert self.TIMEOUT_S <= elapsed < self.TIMEOUT_S + MARGIN_S
        assert str(error).startswith(
            "stage 1 replica 0 failed: no progress in iteration 0 for 5 s: stage 1 has not written its input "
            "gradient of micro-batch 0 for stage 0"
        )
        assert Path(f"{release}.entered").exists()
        assert_no_funcpipe_thread_left(within_s=self.STOP_S)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
class TestRay:
    #: The driver's timeout: above a Ray actor's start (a process importing torch) on a loaded machine.
    TIMEOUT_S = 40.0

    @staticmethod
    def assert_dead(executor: SpyExecutor) -> None:
        """Every actor the job launched is gone: a call on it fails with RayActorError."""
        import ray
        import ray.exceptions

        assert executor.launched
        for handle in executor.launched:
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(handle.host.stop.remote(), timeout=60)  # type: ignore[attr-defined]

    def test_a_hang_in_forward_names_the_stage_and_kills_every_actor(self, release: Path) -> None:
        from funcpipe.executors.ray import Ray

        executor = SpyExecutor(Ray())
        plan = Plan.manual([2, 2], micro_batch_size=2, global_batch_size=4)
        # Stage 0 runs 2 forwards per iteration: the 3rd, micro-batch 0 of iteration 1, hangs.
        model = nn.Sequential(nn.Linear(8, 8), Hang(str(release), after=2), nn.Tanh(), nn.Linear(8, 3))
        trainer = Trainer(model, nn.functional.mse_loss, SGD, plan, backend=executor, timeout_s=self.TIMEOUT_S)
        error, elapsed = fit_expecting(WorkerTimeout, trainer, regression_batches(3, 4), release)
        assert elapsed < self.TIMEOUT_S + MARGIN_S
        assert str(error).startswith(
            "stage 0 replica 0 failed: no progress in iteration 1 for 40 s: stage 0 has not written its "
            "activation of micro-batch 0 for stage 1"
        )
        assert Path(f"{release}.entered").exists()
        self.assert_dead(executor)
        assert_no_funcpipe_thread_left(within_s=10)

    def test_an_actor_that_cannot_be_placed_is_named_and_killed(self) -> None:
        import ray

        from funcpipe.executors.ray import Ray

        Ray().shutdown()  # idle hosts of earlier tests hold CPUs

        @ray.remote
        class Blocker:
            def ping(self) -> bool:
                return True

        blocker = Blocker.options(num_cpus=ray.cluster_resources()["CPU"]).remote()  # type: ignore[attr-defined]
        try:
            ray.get(blocker.ping.remote(), timeout=120)  # it holds every CPU now
            # Not started within timeout_s + start_timeout_s (both short: nothing can start here).
            executor = SpyExecutor(Ray(start_timeout_s=4.0))
            plan = Plan.manual([7], micro_batch_size=2, global_batch_size=4)
            trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD, plan, backend=executor, timeout_s=3.0)
            started = time.monotonic()
            with pytest.raises(WorkerNotStarted) as info:
                trainer.fit(regression_batches(1, 4), progress=False)
            assert 7.0 <= time.monotonic() - started < 7.0 + MARGIN_S
            assert str(info.value).startswith(
                "stage 0 replica 0 failed: it had not started 7 s after it was launched, when iteration 0 "
                "should have finished (not started: stage 0 replica 0)"
            )
            assert "Ray(start_timeout_s=...)" in str(info.value)
            self.assert_dead(executor)
        finally:
            ray.kill(blocker)
        assert_no_funcpipe_thread_left(within_s=10)

