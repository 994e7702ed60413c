"""Trainer: the driver a notebook uses to train an ``nn.Sequential`` with a plan."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from funcpipe import binding, checkpoint, protocol, signed
from funcpipe.collectives import put_tensor
from funcpipe.errors import (
    BackendError,
    ConfigError,
    IntegrityError,
    ObjectNotFound,
    StorageError,
    WorkerFailed,
    WorkerNotStarted,
    WorkerTimeout,
)
from funcpipe.executors import Executor, get_executor
from funcpipe.executors.base import ActorHandle, CallGroup, Resources
from funcpipe.manifest import JobManifest, check_job_name, find_job, manifest_key
from funcpipe.plans import Plan
from funcpipe.protocol import JobKeys
from funcpipe.stall import find_stall
from funcpipe.storage import Storage, WaitCancelled, open_storage
from funcpipe.worker import StageDefinition, StageWorker, WorkerConfig

if TYPE_CHECKING:
    from funcpipe.report import Report
    from funcpipe.simulator import Simulation

__all__ = ["History", "Trainer"]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

#: Free space /dev/shm needs for the default storage to go there.
SHM_MIN_FREE_BYTES = 2 * 2**30

#: Global batches the driver uploads ahead of the slowest finished iteration.
LOOKAHEAD = 2

#: Iterations between checkpoints of every stage (the rollback point of a retry or resume).
DEFAULT_CHECKPOINT_EVERY = 10

#: The driver's wait for one iteration, when the plan predicts none (:meth:`Plan.manual`).
DEFAULT_TIMEOUT_S = 300.0
#: With a predicted iteration time, the wait is this many predicted iterations...
TIMEOUT_PREDICTED_ITERATIONS = 10.0
#: ... but never less than this: start-up, a cold cache and a loaded machine are not in the prediction.
TIMEOUT_FLOOR_S = 60.0
#: Workers wait this many times longer than the driver for one object: the driver, which sees
#: every worker, is the one to judge a hang and name the worker that causes it.
WORKER_TIMEOUT_FACTOR = 2.0


@dataclasses.dataclass
class History:
    """What :meth:`Trainer.fit` measured.

    ``str(history)`` is a table of the measured seconds (and dollars) per
    iteration and per stage next to the predictions of the plan it trained
    with; in a notebook it shows as HTML. :meth:`compare` puts it next to
    another prediction, such as a simulation on the machine that ran it.

    Attributes:
        losses: mean loss over each iteration's global batch.
        seconds: wall-clock seconds of each iteration, as the driver saw them.
        workers: per worker (stage, replica), the seconds it spent per
            iteration computing, blocked on downloads, syncing gradients and
            updating, summed over the run, and the peak resident memory of its
            process during the run (``peak_rss_bytes``: on a function platform, the
            function's) and its resident memory when the run began (``start_rss_bytes``).
        plan: the plan the run trained with (and its predictions, if it carries them).
        iterations_per_epoch: iterations of one pass over the data, when ``fit`` was given epochs.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    plan: Plan | None = None
    iterations_per_epoch: int | None = None

    def __len__(self) -> int:
        return len(self.losses)

    def stage_summary(self) -> list[dict[str, float]]:
        """Per stage: mean seconds per iteration in compute, waiting, sync and update."""
        per_stage: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        for worker in self.workers:
            per_stage[worker["stage"]].append(worker)
        rows = []
        for stage in sorted(per_stage):
            workers = per_stage[stage]
            iterations = max(1, sum(w["iterations"] for w in workers))
            row: dict[str, float] = {"stage": stage, "replicas": len(workers)}
            for field in ("compute_s", "wait_s", "sync_s", "update_s", "total_s"):
                row[field] = sum(w[field] for w in workers) / iterations
            rows.append(row)
        return rows

    def compare(self, predicted: Simulation | Plan) -> Report:
        """A report of this run next to ``predicted``: a :func:`funcpipe.simulate` result or a plan
        carrying predictions, e.g. ``history.compare(funcpipe.simulate(plan, profile, "local"))``."""
        from funcpipe.report import history_report

        return history_report(self, predicted)

    def to_dict(self) -> dict[str, Any]:
        """Losses, seconds and the per-stage summary as JSON-able data."""
        return {
            "losses": list(self.losses),
            "seconds": list(self.seconds),
            "stages": self.stage_summary(),
            "iterations_per_epoch": self.iterations_per_epoch,
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }

    def __str__(self) -> str:
        from funcpipe.report import history_report

        return str(history_report(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text display (a terminal, or a notebook without HTML): the table."""
        printer.text(str(self))

    def _repr_html_(self) -> str:
        from funcpipe.report import history_report

        return history_report(self)._repr_html_()


class Trainer:
    """Train an ``nn.Sequential`` as a pipeline of stage workers that talk through storage.

    Args:
        model: the model, an ``nn.Sequential`` whose layers the plan cuts into
            stages. It is trained in place: after :meth:`fit` its parameters
            are the trained ones.
        loss_fn: ``loss_fn(output, target)`` returning the *mean* loss over
            the samples it is given, as a scalar tensor.
        optimizer: a callable ``parameters -> torch.optim.Optimizer``, for
            example ``lambda p: torch.optim.SGD(p, lr=0.1)``; each stage
            builds its own.
        plan: how to cut and run the model (:meth:`Plan.manual`).
        backend: ``"ray"`` (default: local Ray), ``"thread"`` (in-process,
            for debugging), ``"aws_lambda"`` / ``"alibaba_fc"`` (configured
            from the environment), or an executor object from
            :mod:`funcpipe.backends` (``AWSLambda(region=...)``, ``Ray(address=...)``).
            A backend that cannot reach ``storage`` is refused with
            :class:`~funcpipe.ConfigError` before anything is launched.
        storage: a storage URL (``file:///dir``, ``memory://``, ...); default:
            a fresh local directory (in ``/dev/shm`` when it has room),
            removed when the trainer is.
        timeout_s: longest the driver waits for one iteration before it names the worker
            that hangs (:class:`~funcpipe.WorkerTimeout`); workers wait
            ``WORKER_TIMEOUT_FACTOR`` times longer for one object. Default: derived
            from the plan, ``max(TIMEOUT_FLOOR_S, TIMEOUT_PREDICTED_ITERATIONS *
            plan.predicted_iteration_s)`` (60 s floor, 10 predicted iterations), or
            ``DEFAULT_TIMEOUT_S`` (300 s) for a plan without a prediction. The
            value in use is :attr:`timeout_s`.
        threads_per_worker: torch threads (and CPUs asked for) per worker.
        job: the job's name, its key prefix in ``storage`` (default: a fresh
            random one); name it to resume it by name after the driver died.
    """

    def __init__(
        self,
        model: nn.Sequential,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer],
        plan: Plan,
        *,
        backend: str | Executor = "ray",
        storage: str | None = None,
        timeout_s: float | None = None,
        threads_per_worker: int = 1,
        job: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Sequential):
            raise ConfigError(
                f"model must be a torch.nn.Sequential, got {type(model).__name__}; hint: "
                "wrap your layers in nn.Sequential(...) so the plan can cut between them"
            )
        if not isinstance(plan, Plan):
            raise ConfigError(f"plan must be a funcpipe.Plan, got {type(plan).__name__}; hint: Plan.manual(...)")
        if sum(plan.balance) != len(model):
            raise ConfigError(
                f"model and sum of balance have different length (model: {len(model)} layers, "
                f"sum of balance {list(plan.balance)}: {sum(plan.balance)}); hint: the balance gives the "
                f"layers of each stage and must add up to len(model) = {len(model)}"
            )
        if isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                "optimizer must be a factory, not an optimizer instance; hint: "
                "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
            )
        for name, fn in (("loss_fn", loss_fn), ("optimizer", optimizer)):
            if not callable(fn):
                raise ConfigError(f"{name} must be callable, got {type(fn).__name__}")
        dtypes = {p.dtype for p in model.parameters()}
        if len(dtypes) > 1:
            raise ConfigError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")
        if timeout_s is None:
            timeout_s = _derived_timeout(plan)
        if timeout_s <= 0 or threads_per_worker < 1:
            raise ConfigError(
                f"timeout_s must be > 0 and threads_per_worker >= 1 (got {timeout_s}, {threads_per_worker})"
            )
        self._model = model
        self._input_dtype = _input_dtype(model)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.plan = plan
        self.executor = get_executor(backend)
        if storage is None:
            directory = _fresh_directory()
            # The default storage belongs to this trainer: remove it with the trainer.
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
            storage = Path(directory).as_uri()
        self.storage_url = storage
        self.executor.check_storage(self.storage_url)
        self.storage: Storage = open_storage(self.storage_url)
        self.timeout_s = timeout_s
        self.threads_per_worker = threads_per_worker
        self._named = job is not None
        self.keys = JobKeys(check_job_name(job) if job is not None else f"job-{uuid.uuid4().hex[:12]}")
        self._signing_key = signed.new_key()
        self._iteration = 0  # iterations finished by this trainer so far
        self._uploaded = False  # the signed stage definitions are in storage
        # The latest state every stage has a checkpoint of: (iteration, attempt that wrote it),
        # or None: the initial weights, in the model blobs.
        self._restore: tuple[int, int] | None = None
        self._extra: dict[str, Any] = {}  # attached to the job's manifest (see manifest.JobManifest)
        self._fit_span = (0, 0)  # (first iteration, iterations asked for) of the current fit
        self._fed = 0  # the iteration after the last one the current run was fed
        self._run_first = 0  # the first iteration of the run in progress

    @property
    def model(self) -> nn.Sequential:
        """The model with the parameters of the last finished :meth:`fit`."""
        return self._model

    def fit(
        self,
        data: Iterable[Batch],
        *,
        iterations: int | None = None,
        epochs: int | None = None,
        progress: bool = True,
        max_retries: int = 0,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        resume: bool = False,
    ) -> History:
        """Train on global batches of ``(inputs, targets)``; a ``DataLoader`` works.

        Args:
            data: an iterable of global batches of ``plan.global_batch_size`` samples.
            iterations: optimizer steps to take, cycling over ``data`` if needed.
            epochs: passes over ``data`` (default 1 when ``iterations`` is not given).
            progress: show a progress bar.
            max_retries: when a worker fails (raises, dies, never starts, stops
                reporting) or an iteration times out, roll every stage back to
                the last checkpoint every stage completed and run again from
                there, at most this many times. The retried iterations get the
                same batches again, so the result equals an undisturbed run.
            checkpoint_every: every stage checkpoints its weights and optimizer
                state (safetensors, in storage) before every iteration that is
                a multiple of this, the rollback point of a retry or a resume;
                0: only at the end of the fit.
            resume: continue the job a driver that died left in ``storage`` —
                the one named ``Trainer(job=...)``, else the most recently
                updated unfinished one — from its last complete checkpoint.
                Pass the same ``data`` and ``iterations`` / ``epochs`` as the
                interrupted call: the batches it finished are skipped. Of a
                job that had finished, the final weights are loaded and
                nothing is trained.

        Raises:
            ConfigError: a malformed argument or bad data (the first batch is checked
                before anything is launched), or nothing to resume.
            WorkerFailed: a worker raised or died, and no retry was left (with
                ``max_retries``, the message lists every attempt's cause). Every other
                worker is stopped; the model holds the weights of the last complete
                checkpoint, from which the next ``fit`` continues. Its subclasses name
                a worker that never started (:class:`~funcpipe.WorkerNotStarted`) or
                that an iteration waited on for ``timeout_s`` (:class:`~funcpipe.WorkerTimeout`).
        """
        if iterations is not None and epochs is not None:
            raise ConfigError("give iterations or epochs, not both")
        for name, value, least in (("iterations", iterations, 1), ("epochs", epochs, 1),
                                   ("max_retries", max_retries, 0), ("checkpoint_every", checkpoint_every, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        if self._iteration and self._restore is None and not resume:
            raise ConfigError(
                f"job {self.keys.job!r} was cleaned (trainer.clean()) after {self._iteration} iterations: its "
                "checkpoint is gone, so this trainer cannot continue it; hint: start a new Trainer with "
                "trainer.model, or clean(checkpoints=False) to keep what a later fit needs"
            )
        batches, total = _batches(data, iterations, epochs or 1)
        per_epoch = total // (epochs or 1) if iterations is None else None
        if resume:
            done = self._resume_job(total)
            if done is None:  # the job had finished: its final weights are loaded
                return History(plan=self.plan, iterations_per_epoch=per_epoch)
            batches = itertools.islice(batches, done, None)
            fit_first, total = self._iteration - done, total - done
        else:
            fit_first = self._iteration
        history = History(plan=self.plan, iterations_per_epoch=per_epoch)
        if total == 0:
            return history
        # The first batch is checked before anything is launched; later ones as they are fed.
        head = next(batches, None)
        if head is None:
            raise ConfigError(
                f"data yielded no batch, but {total} iterations were asked for; hint: pass a non-empty list "
                "or DataLoader (a generator that was iterated before yields nothing)"
            )
        _check_batch(head, self.plan.global_batch_size, self._iteration, self._input_dtype)
        batches = itertools.chain([head], batches)
        first = self._iteration
        if not self._uploaded:
            self._upload_definitions()
        self._fit_span = (fit_first, total + first - fit_first)
        self._write_manifest(finished=False)
        replay = _Replay(batches, first)
        bar = tqdm(total=total, disable=not progress, unit="it", desc="funcpipe")
        failures: list[BaseException] = []
        try:
            # One run per launch; on a platform with a lifetime limit the driver ends a
            # run early at an iteration boundary and the next run resumes from there.
            while len(history) < total:
                start = first + len(history)
                try:
                    ran = self._launch_and_run(replay, start, total - len(history), history, bar, checkpoint_every)
                except (WorkerFailed, BackendError, StorageError) as exc:
                    if not _retryable(exc) or len(failures) >= max_retries:
                        if not failures:
                            raise
                        raise _final_failure(exc, failures) from exc
                    failures.append(exc)
                    restart = self._rollback(first, history, bar, replay)
                    log.warning("attempt %d of %d failed (%s); rolling back to iteration %d and running again",
                                len(failures), max_retries + 1, _one_line(exc), restart)
                    continue
                if len(history) < total:
                    log.info("run from iteration %d stopped after %d iterations (lifetime limit); "
                             "continuing from the checkpoint", start, ran)
        except BaseException:
            self._after_final_failure()
            raise
        finally:
            bar.close()
        self._iteration = first + len(history)
        self._gather()
        self._write_manifest(finished=True)
        return history

    def clean(self, *, checkpoints: bool = True) -> None:
        """Delete what the job keeps in storage: its model blobs, manifest and (by default) checkpoints.

        Messages are deleted as iterations finish; what a fit keeps is the
        state the next ``fit`` (or a resume) continues from. Without its
        checkpoint the job cannot continue: a later ``fit`` of this trainer
        raises :class:`~funcpipe.ConfigError` (``trainer.model`` keeps the weights).
        """
        keys = [self.keys.model_blob(s) for s in range(self.plan.num_stages)] + [manifest_key(self.keys.job)]
        keys += [JobKeys(self.keys.job, attempt).abort for attempt in range(self.keys.attempt)]
        if checkpoints and self._restore is not None:
            keys += self._checkpoint_keys(self._restore)
            self._restore = None
        self.storage.delete(keys)
        self._uploaded = False

    # -- internals -----------------------------------------------------------

    @functools.cached_property
    def _gradient_bytes(self) -> list[int]:
        """Bytes of each stage's flat gradient (its trainable parameters), as the workers sync it."""
        return [
            protocol.gradient_bytes(p for i in self.plan.layer_range(s) for p in self._model[i].parameters())
            for s in range(self.plan.num_stages)
        ]

    def _upload_definitions(self) -> None:
        for stage in range(self.plan.num_stages):
            layers = nn.Sequential(collections.OrderedDict(
                (str(i), self._model[i]) for i in self.plan.layer_range(stage)
            ))
            last = stage == self.plan.num_stages - 1
            definition = StageDefinition(layers, self.optimizer, self.loss_fn if last else None)
            key = self.keys.model_blob(stage)
            self.storage.put(key, signed.seal(definition, self._signing_key, name=key))
        self._uploaded = True

    def _launch_and_run(
        self, replay: _Replay, start: int, count: int, history: History, bar: tqdm, checkpoint_every: int
    ) -> int:
        """Launch a run of every worker from ``start`` and drive it; on any failure, abandon the attempt.

        Abandoning kills the workers, writes the attempt's abort object (for
        workers that cannot be killed), deletes what the attempt fed, and moves
        this trainer to a fresh attempt: new keys, so nothing of the failed
        one is ever consumed.
        """
        handles: list[ActorHandle] = []
        self._fed = start
        try:
            handles = self._launch(start, checkpoint_every)
            ran = self._run(handles, replay, start, count, history, bar, checkpoint_every)
        except BaseException:
            for handle in handles:
                handle.kill()
            self._abandon_attempt(start, checkpoint_every, replay)
            raise
        for handle in handles:
            handle.release()
        return ran

    def _abandon_attempt(self, start: int, checkpoint_every: int, replay: _Replay) -> None:
        """Stop the attempt's workers, keep its newest complete checkpoint, delete the rest of what it wrote."""
        failed, self.keys = self.keys, JobKeys(self.keys.job, self.keys.attempt + 1)
        try:  # tell workers we could not kill (serverless ones) to stop
            self.storage.put(failed.abort, protocol.encode_abort(failed.abort))
            # A checkpoint every stage wrote that the driver had not yet seen complete: the
            # workers write one before they begin an iteration, and may have got further.
            points = [i for i in range(start + 1, self._fed + 1) if checkpoint_every and i % checkpoint_every == 0]
            for point in reversed([p for p in points if p > self._restore_iteration]):
                if all(self.storage.exists(key) for key in self._checkpoint_keys((point, failed.attempt))):
                    self._checkpoint_complete((point, failed.attempt), replay)
                    break
            # Iterations before these were deleted as they finished (see _await).
            unfinished = range(max(start, self._fed - LOOKAHEAD - 2), self._fed)
            stale = [key for i in unfinished for key in failed.iteration_keys(i, self.plan, self._gradient_bytes)]
            stale += [key for i in points if (i, failed.attempt) != self._restore
                      for key in self._checkpoint_keys((i, failed.attempt))]
            self.storage.delete(stale)
        except StorageError as exc:  # the next attempt has keys of its own: nothing is mixed up
            log.warning("could not clean up after failed attempt %d: %s", failed.attempt, exc)

    def _rollback(self, first: int, history: History, bar: tqdm, replay: _Replay) -> int:
        """Forget the iterations after the last complete checkpoint; the iteration to run again from."""
        restart = self._restore_iteration
        done = restart - first
        del history.losses[done:], history.seconds[done:]
        replay.rewind(restart)
        bar.n = done
        bar.refresh()
        return restart

    def _checkpoint_complete(self, point: tuple[int, int], replay: _Replay) -> None:
        """Every stage has a checkpoint ``(iteration, attempt)``: make it the restore point."""
        old, self._restore = self._restore, point
        replay.forget_before(point[0])
        if old is not None and old != self._restore:
            try:
                self.storage.delete(self._checkpoint_keys(old))
            except StorageError as exc:
                log.warning("could not delete the checkpoint before iteration %d: %s", old[0], exc)
        self._write_manifest(finished=False)

    def _checkpoint_keys(self, point: tuple[int, int]) -> list[str]:
        iteration, attempt = point
        keys = JobKeys(self.keys.job, attempt)
        return [keys.checkpoint(s, iteration) for s in range(self.plan.num_stages)]

    def _after_final_failure(self) -> None:
        """Leave the trainer at the last complete checkpoint, the model holding its weights."""
        try:
            if self._restore is not None:
                self._iteration = self._restore[0]
                self._gather()
            self._write_manifest(finished=False)
        except StorageError as exc:  # do not hide the failure that got us here
            log.warning("could not load the last checkpoint after the failure: %s", exc)

    @property
    def _restore_iteration(self) -> int:
        """The iteration a relaunch starts from: the restore point's, or 0 (the model blobs' weights)."""
        return self._restore[0] if self._restore is not None else 0

    def _write_manifest(self, *, finished: bool) -> None:
        fit_first, fit_total = self._fit_span
        JobManifest(
            job=self.keys.job,
            attempt=self.keys.attempt,
            plan=self.plan.to_dict(),
            layers=len(self._model),
            fit_first=fit_first,
            fit_total=fit_total,
            restore_iteration=self._restore[0] if self._restore is not None else None,
            restore_attempt=self._restore[1] if self._restore is not None else None,
            finished=finished,
            extra=self._extra,
        ).put(self.storage)

    def _resume_job(self, total: int) -> int | None:
        """Take over the job in storage; how many of its fit's iterations are done (None: all)."""
        manifest = find_job(self.storage, self.keys.job if self._named else None)
        if Plan.from_dict(manifest.plan) != self.plan or manifest.layers != len(self._model):
            raise ConfigError(
                f"job {manifest.job!r} in storage was trained with plan {Plan.from_dict(manifest.plan)} on a "
                f"model of {manifest.layers} layers, not this trainer's plan {self.plan} and {len(self._model)} "
                "layers; hint: resume with the same model and plan, or start a new job without resume=True"
            )
        self.keys = JobKeys(manifest.job, manifest.attempt + 1)
        self._extra = dict(manifest.extra)
        try:  # workers the dead driver left running (serverless calls) stop
            abort = JobKeys(manifest.job, manifest.attempt).abort
            self.storage.put(abort, protocol.encode_abort(abort))
        except StorageError as exc:
            log.warning("could not write the abort object of attempt %d: %s", manifest.attempt, exc)
        if manifest.restore_iteration is None or manifest.restore_attempt is None:
            if manifest.fit_first != 0:
                raise IntegrityError(
                    f"job manifest of {manifest.job!r} has no checkpoint but its fit began at iteration "
                    f"{manifest.fit_first}; cannot resume it"
                )
            self._restore, self._iteration, done = None, 0, 0
        else:
            self._restore = (manifest.restore_iteration, manifest.restore_attempt)
            self._iteration = manifest.restore_iteration
            self._gather()  # also proves every stage's checkpoint is there
            done = manifest.restore_iteration - manifest.fit_first
        if manifest.finished:
            log.info("job %s had finished %d iterations; its final weights are loaded, nothing to resume",
                     manifest.job, self._iteration)
            return None
        if manifest.fit_total != total:
            raise ConfigError(
                f"job {manifest.job!r} was interrupted in a fit of {manifest.fit_total} iterations, but this fit "
                f"asks for {total}; hint: resume with the same data and iterations/epochs as the interrupted call"
            )
        log.info("resuming job %s at iteration %d (%d of its fit's %d iterations done)",
                 manifest.job, self._iteration, done, manifest.fit_total)
        return done

    def _launch(self, start: int, checkpoint_every: int) -> list[ActorHandle]:
        plan = self.plan
        assert self._restore_iteration == start
        workers = [(s, r) for s in range(plan.num_stages) for r in range(plan.replicas[s])]
        requested = [
            Resources(self.threads_per_worker, plan.memory_mb[s] if plan.memory_mb else None)
            for s, _ in workers
        ]
        handles: list[ActorHandle] = []
        try:
            for (stage, replica), resources in zip(workers, self.executor.fit_resources(requested), strict=True):
                config = WorkerConfig(
                    job=self.keys.job,
                    attempt=self.keys.attempt,
                    storage_url=self.storage_url,
                    stage=stage,
                    replica=replica,
                    plan=plan.to_dict(),
                    timeout_s=WORKER_TIMEOUT_FACTOR * self.timeout_s + self.executor.start_timeout_s,
                    threads=self.threads_per_worker,
                    resume_attempt=self._restore[1] if self._restore is not None else None,
                    checkpoint_every=checkpoint_every,
                    signing_key=self._signing_key,
                )
                handles.append(self.executor.launch(
                    StageWorker, config.to_payload(), name=config.name, resources=resources
                ))
        except BaseException:
            for handle in handles:
                handle.kill()
            raise
        return handles

    def _run(
        self,
        handles: list[ActorHandle],
        replay: _Replay,
        first: int,
        total: int,
        history: History,
        bar: tqdm,
        checkpoint_every: int,
    ) -> int:
        """One call of ``run`` on every worker, fed and awaited; returns the iterations it ran.

        When the executor's calls have a time budget (a function's lifetime),
        the driver stops the run before the first iteration that would end
        after it: it writes the stop object *before* that iteration's
        micro-batches, which it then does not feed, so every worker stops at
        the same boundary with nothing of that iteration done.
        """
        budget = self.executor.call_budget_s
        invoked = time.monotonic()
        self._run_first = first  # its wait allows for the workers' start
        calls = CallGroup([(h, h.call("run", first, total)) for h in handles])
        uploads: list[Future[None]] = []
        feed_errors: list[BaseException] = []  # a failed upload ends the waits at once (workers would hang)

        def failed() -> BaseException | None:
            return feed_errors[0] if feed_errors else calls.failure()

        def note(upload: Future[None]) -> None:
            if not upload.cancelled() and upload.exception() is not None:
                feed_errors.append(upload.exception())  # type: ignore[arg-type]

        finished = [time.perf_counter()]  # when the last iteration finished (or the run began)
        done_before = len(history)
        fed = 0
        with ThreadPoolExecutor(4, thread_name_prefix="funcpipe-feed") as feeder:
            stop_at: int | None = None  # the iteration the run ends before, once decided
            while fed < total and stop_at != first + fed:
                if budget is not None and stop_at is None:
                    stop_at = self._stop_point(first, fed, total, history.seconds[done_before:], invoked + budget)
                    if stop_at is not None:
                        key = self.keys.stop(first)
                        self.storage.put(key, protocol.encode_stop(key, stop_at))
                        if stop_at == first + fed:
                            break
                batch = replay.get(first + fed)
                if batch is None:
                    raise ConfigError(
                        f"data ran out after {done_before + fed} batches, but {done_before + total} iterations "
                        "were asked for; hint: pass data that can be iterated again (a list or a DataLoader)"
                    )
                for upload in self._feed(feeder, first + fed, batch):
                    upload.add_done_callback(note)
                    uploads.append(upload)
                fed += 1
                self._fed = first + fed
                if fed > LOOKAHEAD:
                    self._await(first + fed - 1 - LOOKAHEAD, calls, failed, history, bar, finished)
                    self._note_checkpoint(first + fed - 1 - LOOKAHEAD, first, checkpoint_every, replay)
            for k in range(len(history) - done_before, fed):
                self._await(first + k, calls, failed, history, bar, finished)
                self._note_checkpoint(first + k, first, checkpoint_every, replay)
            for upload in uploads:
                upload.result()
        try:
            reports = calls.results(timeout=self.timeout_s)
        except TimeoutError:
            late = calls.unfinished()
            raise WorkerTimeout(
                late[0],
                f"did not return within {self.timeout_s:g} s after iteration {first + fed - 1}, the run's "
                f"last, finished (unfinished: {', '.join(late)}); it hangs in a backward, the all-reduce, "
                "the update or its checkpoint; hint: raise Trainer(timeout_s=...) if it is only slow",
            ) from None
        for report in reports:
            iterations = report["iterations"]
            if len(iterations) != fed:
                raise BackendError(
                    f"stage {report['stage']} replica {report['replica']} ran {len(iterations)} "
                    f"iterations from {first}, the driver fed {fed}"
                )
            summary = {"stage": report["stage"], "replica": report["replica"], "iterations": len(iterations)}
            for field in ("compute_s", "wait_s", "sync_s", "update_s", "total_s"):
                summary[field] = sum(it[field] for it in iterations)
            summary["peak_rss_bytes"] = report.get("peak_rss_bytes")
            summary["start_rss_bytes"] = report.get("start_rss_bytes")
            history.workers.append(summary)
        self._forget(first + fed - 1)
        if stop_at is not None:
            self.storage.delete([self.keys.stop(first)])
        self._checkpoint_complete((first + fed, self.keys.attempt), replay)  # every worker wrote its own
        return fed

    def _note_checkpoint(self, iteration: int, first: int, checkpoint_every: int, replay: _Replay) -> None:
        """After the last stage reported ``iteration``: every worker has begun it, and so wrote its
        checkpoint before it if one was due (see :meth:`StageWorker.run`)."""
        if checkpoint_every and iteration % checkpoint_every == 0 and iteration != first:
            self._checkpoint_complete((iteration, self.keys.attempt), replay)

    def _stop_point(self, first: int, fed: int, total: int, seconds: list[float], deadline: float) -> int | None:
        """The iteration to end this run before, if the next one or the one after would finish too late.

        Deciding a step ahead lets workers read the stop at an iteration
        boundary instead of noticing it while they wait for an iteration
        that will not come. Every run makes at least one iteration.
        """
        next_done = first + len(seconds)
        for candidate in (fed, fed + 1):
            if 0 < candidate < total and self._past_budget(first + candidate, next_done, seconds, deadline):
                return first + candidate
        return None

    @staticmethod
    def _past_budget(iteration: int, next_done: int, seconds: list[float], deadline: float) -> bool:
        """Whether ``iteration``, fed now, would likely finish after ``deadline`` (monotonic).

        ``next_done`` is the first iteration of this run not finished yet and
        ``seconds`` the finish-to-finish times of those that are; the first
        of them includes starting the workers, so it counts only while it is
        the only measure.
        """
        if seconds:
            recent = seconds[1:][-5:] or seconds
            per_iteration = max(recent)
        else:
            per_iteration = 0.0  # nothing measured yet: feed (each run makes progress)
        return time.monotonic() + (iteration - next_done + 1) * per_iteration > deadline

    def _feed(self, feeder: ThreadPoolExecutor, iteration: int, batch: Batch) -> list[Future[None]]:
        plan = self.plan
        inputs, targets = _check_batch(batch, plan.global_batch_size, iteration, self._input_dtype)
        last = plan.num_stages - 1
        futures = []
        micro = plan.micro_batch_size
        pairs = zip(torch.split(inputs, micro), torch.split(targets, micro), strict=True)
        for m, (x, y) in enumerate(pairs):
            for kind, stage, tensor in (("input", 0, x), ("target", last, y)):
                key = self.keys.message_for(plan, iteration, kind, stage, m)
                futures.append(feeder.submit(put_tensor, self.storage, key, tensor))
        return futures

    def _await(
        self,
        iteration: int,
        calls: CallGroup,
        failed: Callable[[], BaseException | None],
        history: History,
        bar: tqdm,
        finished: list[float],
    ) -> None:
        """Wait for the last stage's reports of ``iteration``; ``failed()`` ends the wait with its error.

        ``failed()`` is the first failure of ``calls`` or of the driver's own uploads.
        """
        last = self.plan.num_stages - 1
        loss = 0.0
        wait_s = self.timeout_s
        if iteration == self._run_first:
            wait_s += self.executor.start_timeout_s
        for replica in range(self.plan.replicas[last]):
            key = self.keys.metrics(iteration, last, replica)
            try:
                loss += binding.wait(self.storage, key, wait_s, functools.partial(protocol.decode_metrics, key=key),
                                     cancelled=lambda: failed() is not None)
            except WaitCancelled:
                failure = failed()
                assert failure is not None
                raise failure from None
            except ObjectNotFound:
                raise self._stalled(iteration, wait_s, calls) from None
        now = time.perf_counter()
        history.seconds.append(now - finished[0])
        finished[0] = now
        history.losses.append(loss)
        bar.set_postfix(_postfix(history, self.plan.predicted_cost_usd), refresh=False)
        bar.update(1)
        if len(history) > 1:
            self._forget(iteration - 1)

    def _stalled(self, iteration: int, waited_s: float, calls: CallGroup) -> Exception:
        """The error for an iteration that did not finish in time: who never started, or who hangs."""
        failure = calls.failure()  # a worker may have failed just now
        if failure is not None:
            return failure
        hint = "hint: raise Trainer(timeout_s=...) if it is only slow"
        not_started = calls.not_started()
        if not_started:
            return WorkerNotStarted(
                not_started[0],
                f"it had not started {waited_s:g} s after it was launched, when iteration {iteration} should "
                f"have finished (not started: {', '.join(not_started)}); the backend could not place or start "
                f"it (too few free resources, a cold start); {hint}",
            )
        stall = find_stall(self.storage, self.keys, self.plan, self._gradient_bytes, iteration)
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

    def _forget(self, iteration: int) -> None:
        """Delete the messages of a finished iteration, so storage holds about two at a time.

        Safe once the last stage reported the *next* iteration: every replica
        of every stage owns a micro-batch of it, so each has finished reading
        (and sending) everything of this one.
        """
        self.storage.delete(self.keys.iteration_keys(iteration, self.plan, self._gradient_bytes))

    def _gather(self) -> None:
        """Load the restore point's checkpoints (before the trainer's current iteration) into the model."""
        assert self._restore is not None and self._restore[0] == self._iteration
        merged: dict[str, torch.Tensor] = {}
        for key in self._checkpoint_keys(self._restore):
            state, _ = checkpoint.decode_state(self.storage.get(key), key=key)
            merged.update(state)
        with torch.no_grad():
            self._model.load_state_dict(merged)


def _derived_timeout(plan: Plan) -> float:
    """The driver's wait for one iteration when the user gives none: see :class:`Trainer`'s ``timeout_s``."""
    if plan.predicted_iteration_s is None:
        return DEFAULT_TIMEOUT_S
    return max(TIMEOUT_FLOOR_S, TIMEOUT_PREDICTED_ITERATIONS * plan.predicted_iteration_s)


def _postfix(history: History, usd_per_iteration: float | None) -> dict[str, str]:
    """The progress bar's: last loss, seconds of the last iteration and, when the plan carries its
    predicted price, the dollars the iterations so far cost at it."""
    postfix = {"loss": f"{history.losses[-1]:.4f}", "s/it": f"{history.seconds[-1]:.3f}"}
    if usd_per_iteration is not None:
        postfix["$"] = f"{usd_per_iteration * len(history):.4g}"
    return postfix


def _fresh_directory() -> str:
    """A new directory for the default storage: memory-backed ``/dev/shm`` when it has room.

    Every hop of the pipeline writes and reads small files; on tmpfs that
    costs a fraction of what a disk file system's journal does (see
    benchmarks/results/overhead.md).
    """
    shm = "/dev/shm"
    try:
        stat = os.statvfs(shm)
        roomy = stat.f_bavail * stat.f_frsize >= SHM_MIN_FREE_BYTES and os.access(shm, os.W_OK)
    except OSError:
        roomy = False
    return tempfile.mkdtemp(prefix="funcpipe-", dir=shm if roomy else None)


def _batches(data: Iterable[Batch], iterations: int | None, epochs: int) -> tuple[Iterator[Batch], int]:
    """The batches to train on and how many: ``iterations`` steps cycling ``data``, or epochs."""
    if iterations is not None:
        def cycle() -> Iterator[Batch]:
            while True:
                empty = True
                for batch in data:
                    empty = False
                    yield batch
                if empty:  # a spent generator: stop, and let the caller say so
                    return
        return cycle(), iterations
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"data of type {type(data).__name__} has no len(), so the number of iterations is "
            "unknown; hint: pass a list or a DataLoader, or fit(..., iterations=N)"
        ) from None
    return itertools.chain.from_iterable(data for _ in range(epochs)), per_epoch * epochs


#: Layers that pass their input's dtype through and hold no parameters: the layer after them decides.
_DTYPE_TRANSPARENT: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
#: Layers that compute with their weight and accept only inputs of the weight's (floating) dtype.
_DTYPE_BOUND: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.LayerNorm, nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
)


def _input_dtype(model: nn.Sequential) -> tuple[torch.dtype, str] | None:
    """The dtype the model's inputs must have and the layer that decides it; ``None``: undecidable.

    An ``nn.Embedding`` first takes integer indices, a custom module anything:
    only layers whose arithmetic needs inputs of their weight's dtype are judged.
    """
    for index, layer in enumerate(model):
        if isinstance(layer, _DTYPE_TRANSPARENT):
            continue
        weight = next(layer.parameters(), None) if isinstance(layer, _DTYPE_BOUND) else None
        if weight is None or not weight.is_floating_point():
            return None
        return weight.dtype, f"layer {index} ({type(layer).__name__})"
    return None


def _check_batch(
    batch: Any, size: int, iteration: int, input_dtype: tuple[torch.dtype, str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ConfigError(
            f"batch {iteration} is a {type(batch).__name__}, not an (inputs, targets) pair"
        )
    inputs, targets = batch
    for name, tensor in (("inputs", inputs), ("targets", targets)):
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"batch {iteration}: {name} is a {type(tensor).__name__}, not a tensor")
        if tensor.dim() == 0 or tensor.shape[0] != size:
            shape = tuple(tensor.shape)
            raise ConfigError(
                f"batch {iteration}: {name} has shape {shape}, but the plan's global batch is "
                f"{size} samples; hint: DataLoader(..., batch_size={size}, drop_last=True)"
            )
    if input_dtype is not None and inputs.dtype != input_dtype[0]:
        dtype, layer = input_dtype
        raise ConfigError(
            f"batch {iteration}: inputs are {inputs.dtype}, but the model's {layer} computes in {dtype}; "
            f"hint: convert them with inputs.to({dtype}), e.g. in the Dataset or a DataLoader collate_fn"
        )
    return inputs, targets


class _Replay:
    """The batches of a fit by iteration, kept from the last checkpoint on so a retry feeds them again."""

    def __init__(self, batches: Iterator[Batch], first: int) -> None:
        self._source = batches
        self._kept: dict[int, Batch] = {}
        self._next = first  # the iteration the next batch from the source is for

    def get(self, iteration: int) -> Batch | None:
        """The batch of ``iteration``, or ``None`` when the data ran out."""
        if iteration in self._kept:
            return self._kept[iteration]
        assert iteration == self._next, (iteration, self._next)
        batch = next(self._source, None)
        if batch is not None:
            self._kept[iteration] = batch
            self._next += 1
        return batch

    def rewind(self, iteration: int) -> None:
        assert iteration in self._kept or iteration == self._next, (iteration, sorted(self._kept))

    def forget_before(self, iteration: int) -> None:
        for old in [i for i in self._kept if i < iteration]:
            del self._kept[old]


def _retryable(exc: BaseException) -> bool:
    """Whether running again may help: not when a worker found the user's code or data at fault."""
    if isinstance(exc, WorkerFailed):
        return not exc.cause.startswith(("ConfigError", "VersionMismatch"))
    return not isinstance(exc, ConfigError)


def _one_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0]


def _final_failure(exc: BaseException, earlier: list[BaseException]) -> BaseException:
    """The error ``fit`` raises when no retry is left: ``exc`` itself, or, after retries, a
    :class:`WorkerFailed` that names every attempt's cause."""
    if not earlier:
        return exc
    causes = [f"attempt {n}: {_one_line(e)}" for n, e in enumerate([*earlier, exc], 1)]
    worker = exc.worker if isinstance(exc, WorkerFailed) else "the job"
    trace = exc.remote_traceback if isinstance(exc, WorkerFailed) else ""
    failure = WorkerFailed(
        worker, f"{len(causes)} attempts failed (max_retries={len(earlier)}): " + "; ".join(causes), trace
    )
    failure.attempts = [*earlier, exc]
    return failure
