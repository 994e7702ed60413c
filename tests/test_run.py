"""One run of a fit: the fit's bookkeeping across runs, and where a run with a time budget stops."""

from __future__ import annotations

import time

import pytest
from tqdm.auto import tqdm

from funcpipe import Plan, protocol
from funcpipe.batches import Replay
from funcpipe.executors.thread import ThreadExecutor
from funcpipe.protocol import JobKeys
from funcpipe.restore import JobState
from funcpipe.run import Fit, Run, Setup
from funcpipe.storage import MemoryStorage
from funcpipe.trainer import History
from tests.helpers import mlp7, regression_batches

PLAN = Plan.manual([7], micro_batch_size=4, global_batch_size=8)


def make_fit(*, first: int = 0, total: int = 10, seconds: tuple[float, ...] = (), checkpoint_every: int = 0) -> Fit:
    """A fit from ``first`` whose earlier runs measured ``seconds``."""
    history = History(losses=[0.0] * len(seconds), seconds=list(seconds))
    replay = Replay(iter(regression_batches(total, 8)), first)
    return Fit(replay, history, tqdm(total=total, disable=True), first, total, checkpoint_every)


def make_run(fit: Fit, storage: MemoryStorage) -> Run:
    setup = Setup(plan=PLAN, executor=ThreadExecutor(), storage=storage, storage_url=storage.url, timeout_s=1.0,
                  worker_timeout_s=2.0, threads_per_worker=1, signing_key="k", gradient_bytes=[0], input_dtype=None)
    return Run(setup, JobState(storage, PLAN, mlp7(), JobKeys("run-test"), named=False), fit)


def measured(run: Run, *seconds: float) -> None:
    """The run's own iterations finished, ``seconds`` apart."""
    run.fit.history.seconds.extend(seconds)
    run.fit.history.losses.extend([0.0] * len(seconds))
    run.fed = len(seconds)


class TestFit:
    def test_a_rollback_forgets_what_was_measured_after_the_restore_point(self) -> None:
        fit = make_fit(first=4, seconds=(1.0, 2.0, 3.0))
        for i in range(4, 7):
            fit.replay.get(i)
        assert (fit.next_iteration, fit.done) == (7, False)
        fit.rollback(5)
        assert (fit.history.seconds, len(fit.history), fit.bar.n, fit.next_iteration) == ([1.0], 1, 1, 5)

    def test_checkpoints_are_due_at_multiples_of_checkpoint_every(self) -> None:
        assert [i for i in range(10) if make_fit(checkpoint_every=3).checkpoint_due(i)] == [0, 3, 6, 9]
        assert not any(make_fit(checkpoint_every=0).checkpoint_due(i) for i in range(10))


class TestStopPoint:
    """Iterations of 1 s after a slow start; an earlier run of the fit took 50 s per iteration."""

    @pytest.fixture
    def run(self) -> Run:
        run = make_run(make_fit(seconds=(50.0, 50.0)), MemoryStorage("run-stop-point"))
        assert run.first == 2
        measured(run, 10.0, 1.0, 1.0)  # the first includes starting the workers
        return run

    def test_the_run_ends_before_the_first_iteration_that_would_finish_after_the_budget(self, run: Run) -> None:
        run._deadline = time.monotonic() + 1.5  # the next iteration (5) ends in 1 s, the one after (6) in 2 s
        assert run._stop_point() == 6

    def test_no_stop_while_the_next_two_iterations_fit_in_the_budget(self, run: Run) -> None:
        run._deadline = time.monotonic() + 2.5
        assert run._stop_point() is None

    def test_the_start_counts_while_it_is_the_only_measure(self) -> None:
        run = make_run(make_fit(), MemoryStorage("run-stop-start"))
        measured(run, 10.0)
        run._deadline = time.monotonic() + 5.0
        assert run._stop_point() == 1

    @pytest.mark.parametrize(("count", "expected"), [(5, 1), (1, None)])
    def test_every_run_makes_at_least_one_iteration(self, count: int, expected: int | None) -> None:
        run = make_run(make_fit(total=count), MemoryStorage("run-stop-one"))
        run._deadline = time.monotonic() - 1.0  # the budget is spent before anything was fed
        assert run._stop_point() == expected

    def test_the_stop_is_written_once_it_is_decided(self, run: Run) -> None:
        run._deadline = time.monotonic() + 1.5
        assert not run._ends_here()  # the stop is before 6; 5 is still fed
        key = run.job.keys.stop(run.first)
        assert protocol.decode_stop(run.setup.storage.get(key), key) == 6
        run.fed += 1
        assert run._ends_here()
