"""One run of a fit: every stage worker launched once, fed its batches, awaited, and ended at one boundary.

A run is one ``run`` call on every worker (:meth:`StageWorker.run`) from
the job's restore point on. The driver uploads the micro-batches of
:data:`LOOKAHEAD` iterations ahead of the last one the last stage reported,
deletes each finished iteration's messages, and makes every checkpoint the
workers completed the job's restore point (:mod:`funcpipe.restore`). When
the executor's calls have a lifetime, it ends the run early at an iteration
boundary (the stop object) and the fit's next run continues from there. On
any failure the run kills its workers and abandons the attempt.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from funcpipe import binding, protocol
from funcpipe.batches import InputDtype, Replay, check_batch, micro_batches
from funcpipe.collectives import put_tensor, put_values
from funcpipe.errors import BackendError, ConfigError, LeaseLost, ObjectNotFound, WorkerNotStarted, WorkerTimeout
from funcpipe.executors import Executor
from funcpipe.executors.base import ActorHandle, CallGroup, Resources
from funcpipe.lease import Lease
from funcpipe.plans import Plan
from funcpipe.protocol import JobKeys
from funcpipe.restore import JobState
from funcpipe.stall import find_stall
from funcpipe.storage import Storage, WaitCancelled
from funcpipe.storage.counting import RequestCounter
from funcpipe.worker import REPORT_TIMES, StageWorker, WorkerConfig

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from funcpipe.trainer import History

__all__ = ["LOOKAHEAD", "Fit", "Run", "Setup"]

#: Global batches the driver uploads ahead of the slowest finished iteration.
LOOKAHEAD = 2

#: The progress bar's name (while the workers start: "funcpipe: starting N workers").
BAR_NAME = "funcpipe"

#: Threads that upload the driver's micro-batches.
FEED_THREADS = 4

@dataclasses.dataclass(frozen=True)
class Setup:
    """What every run of a trainer launches with.

    Attributes:
        plan: the plan the workers run.
        executor: launches them.
        storage: the job's storage, and ``storage_url`` its URL, which the workers open.
        timeout_s: the driver's longest wait for one iteration (a run's first
            counts from when every worker started, which may take the executor's
            ``start_timeout_s`` longer).
        worker_timeout_s: a worker's longest wait for one object.
        threads_per_worker: torch threads (and CPUs asked for) per worker.
        signing_key: the key the stage definitions are signed with.
        gradient_bytes: per stage, :func:`funcpipe.protocol.gradient_bytes` of its parameters.
        input_dtype: what the model's inputs must be (:func:`funcpipe.batches.model_input_dtype`).
        lease: the job's lease the fit holds (a takeover fails the run, :class:`~funcpipe.LeaseLost`).
    """

    plan: Plan
    executor: Executor
    storage: Storage
    storage_url: str
    timeout_s: float
    worker_timeout_s: float
    threads_per_worker: int
    signing_key: str = dataclasses.field(repr=False)  # never logged
    gradient_bytes: Sequence[int]
    input_dtype: InputDtype | None
    lease: Lease | None = None
    #: The model's inputs (a tensor, tuple or dict) as the first stage takes them (:mod:`funcpipe.stages`).
    flatten_inputs: Callable[[Any], tuple[Any, ...]] = lambda x: (x,)
    #: Whether the first stage takes one tensor (its input messages are one tensor, else several values).
    one_input: bool = True
    #: The largest global gradient norm (the workers clip to it); ``None``: no clipping.
    clip_grad_norm: float | None = None
    #: The stored data set the workers read (:attr:`WorkerConfig.data`); ``None``: the driver feeds the batches.
    data: dict[str, Any] | None = None
    data_key: str = dataclasses.field(default="", repr=False)  # never logged
    #: The driver's storage requests (the trainer's storage counts into it; ``History.runs``).
    requests: RequestCounter | None = None


@dataclasses.dataclass(frozen=True)
class Fit:
    """One call of :meth:`Trainer.fit`, as its runs see it.

    Attributes:
        replay: its batches, by iteration (``None``: the workers read a stored data set).
        history: what its runs measured so far.
        bar: its progress bar.
        first: the iteration it began at.
        total: the iterations it makes.
        checkpoint_every: every stage checkpoints before each iteration that is a multiple of this (0: never).
        on_nonfinite: what a worker does with a NaN or infinite loss or gradient
            (:data:`funcpipe.worker.NONFINITE_POLICIES`).
    """

    replay: Replay | None
    history: History
    bar: tqdm
    first: int
    total: int
    checkpoint_every: int
    on_nonfinite: str = "raise"
    #: Called with an iteration whose checkpoint every stage completed, to evaluate its weights
    #: (every ``eval_every`` iterations and at the fit's end; ``None``: no evaluation).
    evaluate: Callable[[int], None] | None = None
    eval_every: int = 0

    @property
    def done(self) -> bool:
        return len(self.history) >= self.total

    @property
    def next_iteration(self) -> int:
        """The iteration the next run begins at."""
        return self.first + len(self.history)

    def checkpoint_due(self, iteration: int) -> bool:
        """Whether the workers checkpoint before ``iteration`` when a run gets there from an earlier one."""
        return bool(self.checkpoint_every) and iteration % self.checkpoint_every == 0

    def rollback(self, restart: int) -> None:
        """Forget what was measured from iteration ``restart`` on, to run it again."""
        done = restart - self.first
        del self.history.losses[done:], self.history.seconds[done:]
        self.history.evals[:] = [(i, value) for i, value in self.history.evals if i <= restart]
        if self.replay is not None:
            self.replay.rewind(restart)
        self.bar.n = done
        self.bar.refresh()


class Run:
    """One run of ``fit`` from its next iteration: made per launch, :meth:`execute` once.

    Args:
        setup: what the workers are launched with.
        job: the job; the run starts from its restore point, and moves it on.
        fit: the fit the run belongs to.
    """

    def __init__(self, setup: Setup, job: JobState, fit: Fit) -> None:
        self.setup = setup
        self.job = job
        self.fit = fit
        self.first = fit.next_iteration  # the run's first iteration
        self.count = fit.total - len(fit.history)  # iterations asked of it
        self.fed = 0  # iterations of the run whose batches the driver fed
        self.stop_at: int | None = None  # the iteration the run ends before, once decided
        self._handles: list[ActorHandle] = []
        self._calls = CallGroup([])
        self._uploads: list[Future[None]] = []
        self._feed_errors: list[BaseException] = []  # a failed upload ends the waits at once (workers would hang)
        self._deadline: float | None = None  # when the calls' time budget ends (monotonic)
        self._finished = 0.0  # when the last iteration finished, or the run began (perf_counter)
        self._starting = False  # the bar says the workers are starting
        self._called = 0.0  # when the workers' calls were made (monotonic)
        self.index = len(fit.history.runs)  # this run's entry in History.runs
        self.invocations = 0  # calls made (each a function invocation on a serverless backend)

    def execute(self) -> int:
        """Launch a run of every worker and drive it; the iterations it made.

        On any failure the attempt is abandoned: the workers are killed, the
        attempt's abort object written (for workers that cannot be killed),
        what it fed deleted, and the job moved to a fresh attempt, with new
        keys, so nothing of the failed one is ever consumed
        (:meth:`JobState.abandon`).
        """
        driver, watcher = _counts(self.setup.requests), _counts(self.setup.executor.requests)
        completed = False
        try:
            self._launch()
            self._drive()
            completed = True
        except BaseException:
            for handle in self._handles:
                handle.kill()
            self._abandon()
            raise
        finally:
            self.fit.history.runs.append({
                "first": self.first, "iterations": self.fed, "invocations": self.invocations, "completed": completed,
                "driver_requests": _since(self.setup.requests, driver),
                "watcher_requests": _since(self.setup.executor.requests, watcher),
            })
        for handle in self._handles:
            handle.release()
        return self.fed

    def _launch(self) -> None:
        """One worker per (stage, replica), to start from the job's restore point."""
        setup, plan = self.setup, self.setup.plan
        assert self.job.restore_iteration == self.first
        workers = [(s, r) for s in range(plan.num_stages) for r in range(plan.replicas[s])]
        # Until every worker runs, the bar says so (starting a local Ray takes seconds), and its rate waits.
        self.fit.bar.set_description_str(f"{BAR_NAME}: starting {len(workers)} workers", refresh=True)
        self._starting = True
        requested = [
            Resources(setup.threads_per_worker, plan.memory_mb[s] if plan.memory_mb else None) for s, _ in workers
        ]
        for (stage, replica), resources in zip(workers, setup.executor.fit_resources(requested), strict=True):
            config = WorkerConfig(
                job=self.job.keys.job,
                attempt=self.job.keys.attempt,
                storage_url=setup.storage_url,
                stage=stage,
                replica=replica,
                plan=plan.to_dict(),
                timeout_s=setup.worker_timeout_s,
                threads=setup.threads_per_worker,
                resume_attempt=self.job.restore_attempt,
                checkpoint_every=self.fit.checkpoint_every,
                signing_key=setup.signing_key,
                run=self.job.keys.run,
                on_nonfinite=self.fit.on_nonfinite,
                clip_grad_norm=setup.clip_grad_norm,
                data=setup.data,
                data_key=setup.data_key,
            )
            self._handles.append(
                setup.executor.launch(StageWorker, config.to_payload(), name=config.name, resources=resources)
            )

    def _drive(self) -> None:
        """One call of ``run`` on every worker, fed and awaited; then the workers' reports.

        When the executor's calls have a time budget (a function's lifetime),
        the driver stops the run before the first iteration that would end
        after it: it writes the stop object *before* that iteration's
        micro-batches, which it then does not feed, so every worker stops at
        the same boundary with nothing of that iteration done.
        """
        budget = self.setup.executor.call_budget_s
        if budget is not None:
            self._deadline = time.monotonic() + budget
        calls = []
        for handle in self._handles:
            calls.append((handle, handle.call("run", self.first, self.count)))
            self.invocations += 1
        self._calls = CallGroup(calls)
        self._called = time.monotonic()
        self._finished = time.perf_counter()
        with ThreadPoolExecutor(FEED_THREADS, thread_name_prefix="funcpipe-feed") as feeder:
            try:
                while self.fed < self.count and not self._ends_here():
                    self._feed(feeder)
                    if self.fed > LOOKAHEAD:
                        self._finish(self.first + self.fed - 1 - LOOKAHEAD)
                for iteration in range(self.fit.next_iteration, self.first + self.fed):
                    self._finish(iteration)
                for upload in self._uploads:
                    upload.result()
            except BaseException:
                # Uploads not begun are dropped: on a hung storage each would wait out its own timeout.
                feeder.shutdown(wait=False, cancel_futures=True)
                raise
        self._collect()

    def _ends_here(self) -> bool:
        """Whether the run ends before its next iteration.

        With a time budget, the stop is decided (and its object written) once
        the next iteration or the one after would finish too late.
        """
        if self._deadline is not None and self.stop_at is None:
            self.stop_at = self._stop_point()
            if self.stop_at is not None:
                key = self.job.keys.stop(self.first)
                self.setup.storage.put(key, protocol.encode_stop(key, self.stop_at))
        return self.stop_at == self.first + self.fed

    def _stop_point(self) -> int | None:
        """The iteration to end this run before, if the next one or the one after would finish too late.

        Deciding a step ahead lets workers read the stop at an iteration
        boundary instead of noticing it while they wait for an iteration
        that will not come. Every run makes at least one iteration.
        """
        for candidate in (self.fed, self.fed + 1):
            if 0 < candidate < self.count and self._past_budget(self.first + candidate):
                return self.first + candidate
        return None

    def _past_budget(self, iteration: int) -> bool:
        """Whether ``iteration``, fed now, would likely finish after the calls' time budget.

        It is judged by the finish-to-finish times of the run's iterations
        finished so far; the first of them includes starting the workers, so
        it counts only while it is the only measure.
        """
        assert self._deadline is not None
        seconds = self.fit.history.seconds[self.first - self.fit.first:]
        if seconds:
            recent = seconds[1:][-5:] or seconds
            per_iteration = max(recent)
        else:
            per_iteration = 0.0  # nothing measured yet: feed (each run makes progress)
        next_done = self.first + len(seconds)
        return time.monotonic() + (iteration - next_done + 1) * per_iteration > self._deadline

    def _feed(self, feeder: ThreadPoolExecutor) -> None:
        """Upload the micro-batches of the run's next iteration: stage 0's inputs, the last stage's targets
        (of a stored data set, the workers read them: only a gated run's go object)."""
        plan, iteration = self.setup.plan, self.first + self.fed
        if self.setup.data is not None:
            if self.setup.data["gated"]:
                key = self.job.keys.go(iteration)
                go = feeder.submit(self.setup.storage.put, key, binding.encode_json(key, {}))
                go.add_done_callback(self._note_upload)
                self._uploads.append(go)
            self.fed += 1
            return
        assert self.fit.replay is not None
        batch = self.fit.replay.get(iteration)
        if batch is None:
            raise ConfigError(
                f"data ran out after {iteration - self.fit.first} batches, but {self.fit.total} iterations "
                "were asked for; hint: pass data that can be iterated again (a list or a DataLoader)"
            )
        inputs, targets = check_batch(batch, plan.global_batch_size, iteration, self.setup.input_dtype)
        last = plan.num_stages - 1
        micro = plan.micro_batch_size
        pairs = zip(micro_batches(inputs, micro), torch.split(targets, micro), strict=True)
        for m, (x, y) in enumerate(pairs):
            values = self.setup.flatten_inputs(x)
            for kind, stage, value in (("input", 0, values[0] if self.setup.one_input else values),
                                       ("target", last, y)):
                key = self.job.keys.message_for(plan, iteration, kind, stage, m)
                write: Callable[[Storage, str, Any], None] = put_values if isinstance(value, tuple) else put_tensor
                upload = feeder.submit(write, self.setup.storage, key, value)
                upload.add_done_callback(self._note_upload)
                self._uploads.append(upload)
        self.fed += 1

    def _note_upload(self, upload: Future[None]) -> None:
        if not upload.cancelled() and upload.exception() is not None:
            self._feed_errors.append(upload.exception())  # type: ignore[arg-type]

    def _failure(self) -> BaseException | None:
        """The first failure of the workers' calls or of the driver's own uploads, or the lease lost, if any."""
        if self.setup.lease is not None:
            try:
                self.setup.lease.check()
            except LeaseLost as exc:
                return exc
        return self._feed_errors[0] if self._feed_errors else self._calls.failure()

    def _finish(self, iteration: int) -> None:
        """Await ``iteration``, then make the checkpoint before it the restore point if one was due.

        Once the last stage reported ``iteration``, every worker has begun it,
        and so wrote its checkpoint before it if one was due (see :meth:`StageWorker.run`).
        """
        self._await(iteration)
        if iteration != self.first and self.fit.checkpoint_due(iteration):
            self._checkpoint_complete(iteration)

    def _await(self, iteration: int) -> None:
        """Wait for the last stage's reports of ``iteration``; a failure (:meth:`_failure`) ends the wait."""
        plan = self.setup.plan
        last = plan.num_stages - 1
        wait_s = self._first_wait() if iteration == self.first else self.setup.timeout_s
        loss = sum((self._await_report(iteration, replica, wait_s) for replica in range(plan.replicas[last])), 0.0)
        self._started()  # a backend that cannot tell when its workers started: by their first report
        now = time.perf_counter()
        history = self.fit.history
        history.seconds.append(now - self._finished)
        self._finished = now
        history.losses.append(loss)
        self.fit.bar.set_postfix(_postfix(history, plan.predicted_cost_usd), refresh=False)
        self.fit.bar.update(1)
        if len(history) > 1:
            self._forget(iteration - 1)

    def _first_wait(self) -> float:
        """The first iteration's wait for its reports: ``timeout_s`` from when every worker started.

        Workers may take the executor's ``start_timeout_s`` longer than ``timeout_s`` to
        start (a cold start, a loaded machine); the driver waits for that first, so a
        slow start does not count against the iteration. A worker not started by then
        is :class:`~funcpipe.WorkerNotStarted`. When a backend cannot tell whether its
        actors started, the wait is both together.
        """
        timeout_s, allowance_s = self.setup.timeout_s, self.setup.timeout_s + self.setup.executor.start_timeout_s
        if any(handle.started() is None for handle in self._handles):
            return allowance_s
        left_s = max(0.0, allowance_s - (time.monotonic() - self._called))
        if self._calls.wait_started(left_s, stop=lambda: self._failure() is not None):
            failure = self._failure()
            if failure is not None:
                raise failure
            raise self._stalled(self.first, allowance_s)
        self._started()
        return timeout_s

    def _started(self) -> None:
        """Every worker runs: the bar's name back, and, before the fit's first iteration, its clock reset,
        so that its rate counts iterations only, not the start."""
        if not self._starting:
            return
        self._starting = False
        bar = self.fit.bar
        bar.set_description_str(BAR_NAME, refresh=False)
        if bar.n == 0:
            bar.reset()
        else:
            bar.refresh()

    def _await_report(self, iteration: int, replica: int, wait_s: float) -> float:
        """The loss ``replica`` of the last stage reports for ``iteration``."""
        key = self.job.keys.metrics(iteration, self.setup.plan.num_stages - 1, replica)
        decode = functools.partial(protocol.decode_metrics, key=key)
        try:
            return binding.wait(self.setup.storage, key, wait_s, decode, cancelled=lambda: self._failure() is not None)
        except WaitCancelled:
            failure = self._failure()
            assert failure is not None
            raise failure from None
        except ObjectNotFound:
            raise self._stalled(iteration, wait_s) from None

    def _stalled(self, iteration: int, waited_s: float) -> Exception:
        """The error for an iteration that did not finish in time: who never started, or who hangs."""
        failure = self._calls.failure()  # a worker may have failed just now
        if failure is not None:
            return failure
        hint = "hint: raise Trainer(timeout_s=...) if it is only slow"
        not_started = self._calls.not_started()
        if not_started:
            return WorkerNotStarted(
                not_started[0],
                f"it had not started {waited_s:g} s after it was launched, when iteration {iteration} should "
                f"have finished (not started: {', '.join(not_started)}); the backend could not place or start "
                "it (too few free resources, a cold start); hint: if it is only slow, raise the backend's "
                "start allowance (Ray(start_timeout_s=...), Timing(start_timeout_s=...)) or Trainer(timeout_s=...)",
            )
        stall = find_stall(self.setup.storage, self.job.keys, self.setup.plan, self.setup.gradient_bytes, iteration)
        if stall is None:
            return BackendError(
                f"iteration {iteration} did not finish within {waited_s:g} s, and no worker reported an error "
                f"or can be blamed; {hint}"
            )
        return WorkerTimeout(
            stall.worker,
            f"no progress in iteration {stall.iteration} for {waited_s:g} s: stage {stall.stage} has not "
            f"written {stall.missing}, though its inputs are there; it hangs (a layer, the loss or an "
            f"upload blocks) or is far slower than planned; {hint}",
        )

    def _collect(self) -> None:
        """The workers' returns, into the fit's history; the run's last messages and stop object deleted."""
        try:
            reports = self._calls.results(timeout=self.setup.timeout_s)
        except TimeoutError:
            late = self._calls.unfinished()
            raise WorkerTimeout(
                late[0],
                f"did not return within {self.setup.timeout_s:g} s after iteration {self.first + self.fed - 1}, "
                f"the run's last, finished (unfinished: {', '.join(late)}); it hangs in a backward, the "
                "all-reduce, the update or its checkpoint; hint: raise Trainer(timeout_s=...) if it is only slow",
            ) from None
        self.fit.history.workers.extend(self._summary(report) for report in reports)
        self._forget(self.first + self.fed - 1)
        if self.stop_at is not None:
            self.setup.storage.delete([self.job.keys.stop(self.first)])
        self._checkpoint_complete(self.first + self.fed)  # every worker wrote its own

    def _summary(self, report: dict[str, Any]) -> dict[str, Any]:
        """A worker's return, summed over the run's iterations (see :attr:`History.workers`)."""
        iterations = report["iterations"]
        if len(iterations) != self.fed:
            raise BackendError(
                f"stage {report['stage']} replica {report['replica']} ran {len(iterations)} "
                f"iterations from {self.first}, the driver fed {self.fed}"
            )
        summary = {"stage": report["stage"], "replica": report["replica"], "iterations": len(iterations)}
        for field in REPORT_TIMES:
            summary[field] = sum(it[field] for it in iterations)
        summary["peak_rss_bytes"] = report.get("peak_rss_bytes")
        summary["start_rss_bytes"] = report.get("start_rss_bytes")
        # The call's measure: a function's own (from its invocation's start), else the worker's.
        function = report.get("function")
        plan = self.setup.plan
        summary["run"] = self.index
        summary["first"] = self.first
        summary["billed"] = function is not None
        summary["call_s"] = function["seconds"] if function is not None else report["call_s"]
        summary["iterations_s"] = summary["total_s"]
        memory = function.get("memory_mb") if function is not None else None
        summary["memory_mb"] = memory if memory is not None else (
            plan.memory_mb[report["stage"]] if plan.memory_mb else None)
        summary["cold"] = function.get("cold") if function is not None else None
        summary["requests"] = dict(report["requests"])
        summary["status_requests"] = dict(function["requests"]) if function is not None else _zero()
        return summary

    def _forget(self, iteration: int) -> None:
        """Delete the messages of a finished iteration, so storage holds about two at a time.

        Safe once the last stage reported the *next* iteration: every replica
        of every stage owns a micro-batch of it, so each has finished reading
        (and sending) everything of this one.
        """
        self.setup.storage.delete(self._iteration_keys(self.job.keys, iteration))

    def _iteration_keys(self, keys: JobKeys, iteration: int) -> list[str]:
        """Every key of ``iteration`` under ``keys`` (:meth:`JobKeys.iteration_keys`)."""
        setup, data = self.setup, self.setup.data
        clipped = setup.clip_grad_norm is not None
        return keys.iteration_keys(iteration, setup.plan, setup.gradient_bytes, clipped=clipped,
                                   fed=data is None, gated=data is not None and data["gated"])

    def _checkpoint_complete(self, iteration: int) -> None:
        """Every stage has its checkpoint before ``iteration`` of this attempt: the job's restore point
        (and the weights an evaluation due there reads)."""
        self.job.complete((iteration, self.job.keys.attempt))
        self._forget_replayed()
        fit = self.fit
        end = fit.first + fit.total
        due = iteration == end or (fit.eval_every and iteration % fit.eval_every == 0)
        if fit.evaluate is not None and fit.first < iteration <= end and due:
            fit.evaluate(iteration)

    def _forget_replayed(self) -> None:
        """Drop the batches no retry or fall-back can go back to: those before the oldest checkpoint kept."""
        if self.fit.replay is not None:
            self.fit.replay.forget_before(max(self.fit.first, self.job.oldest_kept_iteration))

    def _abandon(self) -> None:
        """Move the job past this run's failed attempt, keeping its newest complete checkpoint."""
        failed, fed_to = self.job.keys, self.first + self.fed
        due = [i for i in range(self.first + 1, fed_to + 1) if self.fit.checkpoint_due(i)]
        # Iterations before these were deleted as they finished (see _await).
        unfinished = range(max(self.first, fed_to - LOOKAHEAD - 2), fed_to)
        self.job.abandon(due, [key for i in unfinished for key in self._iteration_keys(failed, i)])
        self._forget_replayed()


def _zero() -> dict[str, int]:
    return RequestCounter().counts()


def _counts(counter: RequestCounter | None) -> dict[str, int]:
    return counter.counts() if counter is not None else _zero()


def _since(counter: RequestCounter | None, earlier: dict[str, int]) -> dict[str, int]:
    """Requests ``counter`` counted since ``earlier`` (all zero without a counter)."""
    return counter.since(earlier) if counter is not None else _zero()


def _postfix(history: History, usd_per_iteration: float | None) -> dict[str, str]:
    """The progress bar's: last loss, seconds of the last iteration and, when the plan carries its
    predicted price, the dollars the iterations so far cost at it."""
    postfix = {"loss": f"{history.losses[-1]:.4f}", "s/it": f"{history.seconds[-1]:.3f}"}
    if usd_per_iteration is not None:
        postfix["$"] = f"{usd_per_iteration * len(history):.4g}"
    return postfix
