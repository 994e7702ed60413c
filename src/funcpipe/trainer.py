"""Trainer: the driver a notebook uses to train a model (any ``nn.Module``) with a plan.

:class:`Trainer` checks what it is given, uploads the signed stage
definitions, and trains in *runs* (:mod:`funcpipe.run`): one launch of every
stage worker each, retried from the job's restore point (:mod:`funcpipe.restore`)
when one fails. The batches it feeds are checked and kept by :mod:`funcpipe.batches`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from funcpipe import data as stored_data
from funcpipe import secret, signed
from funcpipe.batches import (
    Batch,
    Replay,
    check_batch,
    check_loader,
    micro_batches,
    model_input_dtype,
    training_batches,
)
from funcpipe.errors import (
    BackendError,
    CheckpointCorrupt,
    ConfigError,
    FitInProgress,
    JobUnfinished,
    NonFiniteTraining,
    StorageError,
    UserCodeError,
    WorkerFailed,
)
from funcpipe.executors import Executor, get_executor
from funcpipe.lease import Lease
from funcpipe.manifest import JobManifest, check_job_name, find_job, read_manifest
from funcpipe.plans import Plan
from funcpipe.protocol import JobKeys
from funcpipe.restore import JobState
from funcpipe.run import BAR_NAME, Fit, Run, Setup
from funcpipe.stages import ModelStages
from funcpipe.storage import Storage, open_storage
from funcpipe.storage.authenticated import AuthenticatedStorage
from funcpipe.storage.bounded import BoundedStorage
from funcpipe.storage.counting import CountingStorage, RequestCounter
from funcpipe.worker import NONFINITE_POLICIES, REPORT_TIMES, is_one_tensor

if TYPE_CHECKING:
    from funcpipe.billing import MeasuredCost
    from funcpipe.platforms import Platform
    from funcpipe.report import Report
    from funcpipe.simulator import Simulation

__all__ = ["History", "Trainer"]

log = logging.getLogger(__name__)

#: Free space /dev/shm needs for the default storage to go there.
SHM_MIN_FREE_BYTES = 2 * 2**30

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
        workers: per call of a worker (stage, replica) — one per run — the seconds it spent per
            iteration computing, blocked on downloads, syncing gradients and
            updating, summed over the run, and the peak resident memory of its
            process during the run (``peak_rss_bytes``: on a function platform, the
            function's) and its resident memory when the run began (``start_rss_bytes``);
            the call's measure: ``run`` (its index in ``runs``), ``call_s`` (the call's
            seconds: on a function platform from the start of the invocation to its last
            status write, else the worker's), ``billed`` (whether a function platform ran
            it), ``memory_mb``, ``cold`` (a function's first invocation; ``None`` off one),
            ``iterations_s`` (its iterations' seconds), ``requests`` (its worker's storage
            requests by kind) and ``status_requests`` (the function's status object's:
            heartbeats, cancel checks).
        runs: per run (one launch of every worker; a lifetime stop or a retry starts
            another): ``first`` iteration, ``iterations`` made, ``invocations`` (calls
            made), ``completed``, and the driver's storage requests during it by kind:
            ``driver_requests`` (feeds, report polls, deletes, lease, manifest) and
            ``watcher_requests`` (a serverless executor's status polls and cancels).
        driver_requests: every request of the driver's storage during the fit by kind: the runs'
            and those before and after them (lease, stage definitions, manifest, gathering the weights).
        plan: the plan the run trained with (and its predictions, if it carries them).
        iterations_per_epoch: iterations of one pass over the data, when ``fit`` was given epochs.
        evals: ``(iterations trained, metric)`` of each evaluation ``fit(eval_data=...)`` made.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    plan: Plan | None = None
    iterations_per_epoch: int | None = None
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    driver_requests: dict[str, int] = dataclasses.field(default_factory=dict)

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
            for field in REPORT_TIMES:
                row[field] = sum(w[field] for w in workers) / iterations
            rows.append(row)
        return rows

    def compare(self, predicted: Simulation | Plan) -> Report:
        """A report of this run next to ``predicted``: a :func:`funcpipe.simulate` result or a plan
        carrying predictions, e.g. ``history.compare(funcpipe.simulate(plan, profile, "local"))``."""
        from funcpipe.report import history_report

        return history_report(self, predicted)

    def measured_cost(self, platform: Platform | str | None = None) -> MeasuredCost | None:
        """What the run cost as measured (:mod:`funcpipe.billing`): every call's seconds rounded as
        ``platform`` bills them at its memory tier, every storage request by kind, every invocation.

        Args:
            platform: whose prices and billing rule (default: the plan's platform). ``None`` is
                returned when there is none, or it is ``"local"`` (whose prices only rank plans).
        """
        from funcpipe.billing import measure

        return measure(self, platform)

    def to_dict(self) -> dict[str, Any]:
        """Losses, seconds, the per-stage summary, every call and run, and the measured cost as JSON-able data."""
        cost = self.measured_cost()
        return {
            "losses": list(self.losses),
            "seconds": list(self.seconds),
            "stages": self.stage_summary(),
            "iterations_per_epoch": self.iterations_per_epoch,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "evals": [list(entry) for entry in self.evals],
            "calls": [dict(worker) for worker in self.workers],
            "runs": [dict(run) for run in self.runs],
            "driver_requests": dict(self.driver_requests),
            "measured_cost": cost.to_dict() if cost is not None else None,
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
    """Train any ``nn.Module`` as a pipeline of stage workers that talk through storage.

    Args:
        model: the model. An ``nn.Sequential`` is cut between its layers; any
            other module is split into units (:func:`funcpipe.split.split`: its
            embeddings, each block or transformer layer, its head) on the first
            micro-batch :meth:`fit` is given, and the plan's balance counts those
            units (``funcpipe.profile`` of the model measures the same units).
            It is trained in place: after :meth:`fit` its parameters are the
            trained ones.
        loss_fn: ``loss_fn(output, target)`` returning the *mean* loss over
            the samples it is given, as a scalar tensor; ``output`` is what the
            model returns (a tensor, a tuple, a Hugging Face ``ModelOutput``).
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
        cuts: for a traced model, the module names where units start instead
            of one unit per block (as :func:`funcpipe.split.split` takes them;
            profile with the same ``cuts``).
        scheduler: a callable ``optimizer -> torch.optim.lr_scheduler.LRScheduler``,
            e.g. ``lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1,
            total_steps=100)``; each stage builds one on its optimizer and steps it
            once per iteration, after the optimizer's step, as a plain loop does;
            its state is checkpointed (so resumed and retried runs continue it).
        clip_grad_norm: clip the gradients by their norm over the whole model (every
            stage's, after the replicas summed them) to at most this, as
            ``torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)``
            before every optimizer step: each stage writes its squared norm to
            storage and reads the others' (one small object per stage and iteration).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer],
        plan: Plan,
        *,
        backend: str | Executor = "ray",
        storage: str | None = None,
        timeout_s: float | None = None,
        threads_per_worker: int = 1,
        job: str | None = None,
        cuts: Sequence[str] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        _check_model(model, loss_fn, optimizer, plan)
        if clip_grad_norm is not None and not _finite_positive(clip_grad_norm):
            raise ConfigError(f"clip_grad_norm must be a positive finite number, got {clip_grad_norm!r}; hint: "
                              "clip_grad_norm=1.0 clips the gradient of the whole model to a norm of at most 1")
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        if scheduler is not None and not callable(scheduler):
            raise ConfigError(f"scheduler must be callable (optimizer -> LRScheduler), got {type(scheduler).__name__}")
        self._stages = ModelStages(model, plan, cuts)
        self.scheduler = scheduler
        if self._stages.ready:
            self._stages.check_optimizer(optimizer, scheduler)
        if timeout_s is None:
            timeout_s = _derived_timeout(plan)
        if not _finite_positive(timeout_s) or threads_per_worker < 1:
            raise ConfigError(
                f"timeout_s must be > 0 and finite, and threads_per_worker >= 1 (got {timeout_s}, "
                f"{threads_per_worker}); hint: timeout_s is the longest wait for one iteration in seconds, "
                "e.g. timeout_s=600; leave it out to derive it from the plan"
            )
        self._model = model
        self._input_dtype = model_input_dtype(model) if isinstance(model, nn.Sequential) else None
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
        # The driver's own storage operations are bounded by the timeout, as the workers' waits are,
        # and counted (History.runs: its feeds, report polls, deletes, lease renewals, manifest).
        self.requests = RequestCounter()
        self._raw_storage: Storage = BoundedStorage(
            CountingStorage(open_storage(self.storage_url), self.requests, client="driver"), timeout_s)
        self.timeout_s = timeout_s
        self.threads_per_worker = threads_per_worker
        #: This trainer's run id: in every key its fits write, and the holder of the job's lease.
        self.run_id = f"r{secrets.token_hex(6)}"
        name = check_job_name(job) if job is not None else f"job-{uuid.uuid4().hex[:12]}"
        self._job = JobState(self._raw_storage, plan, model, JobKeys(name, 0, self.run_id), named=job is not None)
        self._use_job(name)
        self._uploaded = False  # the signed stage definitions are in storage
        self._data: dict[str, Any] | None = None  # the stored data set a fit reads (WorkerConfig.data)
        self._data_order: tuple[bool, int] = (True, 0)
        self._first_micro: tuple[Any, torch.Tensor] | None = None  # an nn.Sequential's, checked before launch
        self._fit_lock = threading.Lock()

    def _use_job(self, name: str) -> None:
        """Train job ``name``: its key, its authenticated storage, its lease."""
        #: The job's key (:func:`funcpipe.secret.job_key`): the definitions are signed and every object
        #: authenticated under it; the payloads carry it to the workers.
        self._signing_key = secret.job_key(name)
        self.storage: Storage = AuthenticatedStorage(self._raw_storage, self._signing_key)
        self._job.storage = self.storage
        self._job.keys = dataclasses.replace(self._job.keys, job=name)
        self._lease = Lease(self.storage, name, self.run_id)

    @property
    def model(self) -> nn.Module:
        """The model with the parameters of the last finished :meth:`fit`."""
        return self._model

    @property
    def keys(self) -> JobKeys:
        """The keys of the job's current attempt (a failed attempt moves the job to the next)."""
        return self._job.keys

    @keys.setter
    def keys(self, keys: JobKeys) -> None:
        self._job.keys = keys

    def fit(
        self,
        data: Iterable[Batch] | stored_data.StoredDataset,
        *,
        iterations: int | None = None,
        epochs: int | None = None,
        progress: bool = True,
        max_retries: int = 0,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        resume: bool = False,
        on_nonfinite: str = "raise",
        eval_data: Iterable[Batch] | None = None,
        eval_every: int | None = None,
        eval_metric: Callable[[Any, torch.Tensor], Any] | None = None,
        shuffle: bool | None = None,
        seed: int | None = None,
    ) -> History:
        """Train on global batches of ``(inputs, targets)``; a ``DataLoader`` works.

        Args:
            data: an iterable of global batches of ``plan.global_batch_size`` samples: ``inputs`` as
                the model takes them (a tensor, a tuple for ``model(*inputs)``, a dict for
                ``model(**inputs)``, each tensor with the samples on dim 0), ``targets`` a tensor;
                the driver uploads each iteration's micro-batches. Or a data set in storage
                (:func:`funcpipe.data.upload`): stage 0 reads the inputs of its micro-batches and the
                last stage their targets, and the driver writes no data.
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
            on_nonfinite: what to do when the last stage's loss of a micro-batch,
                or a stage's gradient (summed over its replicas) before its optimizer
                step, is NaN or infinite. ``"raise"`` (default): stop with
                :class:`~funcpipe.NonFiniteTraining`, naming the stage, replica,
                iteration (and micro-batch, for a loss); the failing stage takes no
                step, the fit is not retried (the same batch would fail again), and the
                model holds the weights of the last complete checkpoint. ``"skip"``: a
                stage whose gradient is not finite skips its optimizer step of that
                iteration (the gradient is dropped, a warning logged) and training goes
                on; each stage decides on its own gradient, but a NaN loss makes every
                upstream gradient NaN too, so then every stage skips together.
                ``"ignore"``: no checks (NaN losses end up in the history).
            eval_data: batches of ``(inputs, targets)`` to evaluate the weights on, at the end of the
                fit and every ``eval_every`` iterations: the driver loads the checkpoint of that
                iteration into a copy of the model, in ``eval()`` mode and without gradients, and
                appends ``(iteration, metric)`` to :attr:`History.evals`, the metric averaged over
                the samples. Evaluating holds up the next iterations for as long as it takes.
            eval_every: iterations between evaluations; a multiple of ``checkpoint_every``
                (the weights are the checkpoint's). Default: only at the end.
            eval_metric: ``eval_metric(output, targets)``, a number (or scalar tensor) that is a mean
                over the batch, e.g. an accuracy. Default: ``loss_fn``.
            shuffle: with a stored data set, whether each epoch takes its samples in a fresh random
                order (default ``True``; :meth:`funcpipe.data.StoredDataset.order` gives it).
            seed: with a stored data set, the seed of those orders (default 0).

        Raises:
            ConfigError: a malformed argument, no data or bad data (the first batch is
                checked before anything is launched), or nothing to resume.
            NonFiniteTraining: a loss or gradient was NaN or infinite (``on_nonfinite="raise"``);
                its ``__cause__`` is the worker's :class:`~funcpipe.WorkerFailed` with the
                remote traceback.
            WorkerFailed: a worker raised or died, and no retry was left (with
                ``max_retries``, the message lists every attempt's cause). Every other
                worker is stopped; the model holds the weights of the last complete
                checkpoint, from which the next ``fit`` continues. Its subclasses name
                a worker that never started (:class:`~funcpipe.WorkerNotStarted`) or
                that an iteration waited on for ``timeout_s`` (:class:`~funcpipe.WorkerTimeout`).
        """
        _check_fit_options(iterations, epochs, max_retries, checkpoint_every)
        data_order = _check_data_options(data, shuffle, seed)
        _check_eval_options(eval_data, eval_every, eval_metric, checkpoint_every)
        self._eval = (eval_data, eval_every or 0, eval_metric or self.loss_fn)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(
                f"on_nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {on_nonfinite!r}"
            )
        if not self._fit_lock.acquire(blocking=False):
            raise FitInProgress(
                f"this Trainer (job {self.keys.job!r}) is already running a fit, from another thread; one "
                "Trainer trains one fit at a time; hint: wait for the first fit to return, or make another "
                "Trainer (with its own job name) for a second model"
            )
        try:
            self._data_order = data_order
            return self._fit(data, iterations, epochs, progress, max_retries, checkpoint_every, resume, on_nonfinite)
        finally:
            self._fit_lock.release()

    def _fit(
        self, data: Iterable[Batch] | stored_data.StoredDataset, iterations: int | None, epochs: int | None,
        progress: bool, max_retries: int, checkpoint_every: int, resume: bool, on_nonfinite: str,
    ) -> History:
        if not resume:
            self._check_not_cleaned()
        if isinstance(data, stored_data.StoredDataset):
            stored_data.check_fits(data, self.plan.global_batch_size, self.plan.memory_mb,
                                   self.executor.check_storage)
            batches: Iterator[Batch] = iter(())  # the workers read them
            total = stored_data.fit_iterations(data, epochs, iterations)
        else:
            check_loader(data, self.plan.global_batch_size)
            batches, total = training_batches(data, iterations, epochs or 1)
        history = History(plan=self.plan, iterations_per_epoch=total // (epochs or 1) if iterations is None else None)
        counted = self.requests.counts()
        try:
            return self._fit_counted(history, batches, total, data, resume, checkpoint_every, on_nonfinite,
                                     max_retries, progress)
        finally:  # every request of the driver's storage in this fit, the runs' and those around them
            history.driver_requests = self.requests.since(counted)

    def _fit_counted(
        self, history: History, batches: Iterator[Batch], total: int, data: Iterable[Batch] | stored_data.StoredDataset,
        resume: bool, checkpoint_every: int, on_nonfinite: str, max_retries: int, progress: bool,
    ) -> History:
        job = self._job
        stored = data if isinstance(data, stored_data.StoredDataset) else None
        if resume and not job.named:  # the most recently updated unfinished job in storage
            self._use_job(find_job(self.storage, None).job)
            job.named = True
        self._take_lease(resume)
        try:
            fit_first = job.iteration
            if resume:
                done = job.resume(total)
                if done is None:  # the job had finished: its final weights are loaded
                    return history
                batches, fit_first, total = itertools.islice(batches, done, None), job.iteration - done, total - done
            if total == 0:
                if not resume:
                    raise _no_batches(data, self.plan.global_batch_size)  # type: ignore[arg-type]  # fed data
                return history
            first = job.iteration
            if stored is not None:
                self._data = self._first_stored(stored, first, first - fit_first)
            else:
                batches = self._first_checked(batches, total)
            if not self._uploaded:
                self._upload_definitions()
            if self._first_micro is not None:
                # After the upload: a layer that keeps state of its own calls (a counter) is uploaded unchanged.
                inputs, targets = self._first_micro
                self._first_micro = None
                self._stages.check(inputs, targets, self.loss_fn)
            job.begin_fit(fit_first, total + first - fit_first)
            with tqdm(total=total, disable=not progress, unit="it", desc=BAR_NAME) as bar:
                try:
                    evaluate = self._evaluator(history) if self._eval[0] is not None else None
                    replay = Replay(batches, first) if stored is None else None
                    self._train(Fit(replay, history, bar, first, total, checkpoint_every,
                                    on_nonfinite, evaluate, self._eval[1]), max_retries)
                except BaseException:
                    job.after_failure()
                    raise
            job.finish(first + len(history))
            return history
        finally:
            self._data = None
            self._lease.release()

    def _evaluator(self, history: History) -> Callable[[int], None]:
        """What evaluates the weights of an iteration's checkpoint on ``eval_data`` into ``history.evals``."""
        data, _, metric = self._eval
        assert data is not None
        copied = copy.deepcopy(self._model)

        def evaluate(iteration: int) -> None:
            if history.evals and history.evals[-1][0] == iteration:
                return
            self._job.load_into(copied, (iteration, self._job.keys.attempt))
            copied.eval()
            total, samples = 0.0, 0
            with torch.no_grad():
                for index, batch in enumerate(data):
                    if not _is_pair(batch):
                        raise ConfigError(f"eval batch {index} is a {type(batch).__name__}, not an (inputs, targets) "
                                          "pair with a tensor of targets; hint: eval_data=[(test_x, test_y)]")
                    inputs, targets = batch
                    try:
                        value = float(metric(_call(copied, inputs), targets))
                    except Exception as exc:
                        raise UserCodeError(
                            f"evaluating after iteration {iteration}: eval batch {index} raised "
                            f"{type(exc).__name__}: {exc}; hint: eval_metric(output, targets) returns a number, "
                            "the mean over the batch (default: loss_fn)"
                        ) from exc
                    total += value * len(targets)
                    samples += len(targets)
            if not samples:
                raise ConfigError("eval_data yielded no batch; hint: pass a list or a DataLoader that can be "
                                  "iterated again (it is read at every evaluation)")
            history.evals.append((iteration, total / samples))
            log.info("evaluation after iteration %d: %.6g", iteration, total / samples)

        return evaluate

    def _take_lease(self, resume: bool) -> None:
        """Hold the job's lease for the fit: one live run per job.

        Raises:
            JobBusy: another fit holds a live lease on the job.
            JobUnfinished: a fresh fit (not ``resume``) of a job whose last run, another trainer's, did not finish.
        """
        holder = self._lease.busy()
        if holder is None and not resume:
            manifest = read_manifest(self.storage, self.keys.job)
            if manifest is not None and not manifest.finished and manifest.run != self.keys.run:
                raise JobUnfinished(_unfinished(manifest, self.storage_url))
        self._lease.acquire()  # JobBusy if another fit holds it, or takes it first

    def clean(self, *, checkpoints: bool = True) -> None:
        """Delete what the job keeps in storage: its model blobs, manifest and (by default) checkpoints.

        Messages are deleted as iterations finish; what a fit keeps is the
        state the next ``fit`` (or a resume) continues from. Without its
        checkpoint the job cannot continue: a later ``fit`` of this trainer
        raises :class:`~funcpipe.ConfigError` (``trainer.model`` keeps the weights).
        """
        self._lease.refuse_if_busy()
        self._job.clean(checkpoints=checkpoints)
        self._lease.delete_all()
        self._uploaded = False

    # -- internals -----------------------------------------------------------

    def _check_not_cleaned(self) -> None:
        """Refuse to continue a job whose checkpoint :meth:`clean` deleted (a resume may start it over)."""
        if self._job.iteration and self._job.point is None:
            raise ConfigError(
                f"job {self.keys.job!r} was cleaned (trainer.clean()) after {self._job.iteration} iterations: its "
                "checkpoint is gone, so this trainer cannot continue it; hint: start a new Trainer with "
                "trainer.model, or clean(checkpoints=False) to keep what a later fit needs"
            )

    def _first_checked(self, batches: Iterator[Batch], total: int) -> Iterator[Batch]:
        """``batches``, whose first is checked before anything is launched (later ones as they are fed)."""
        head = next(batches, None)
        if head is None:
            raise ConfigError(
                f"data yielded no batch, but {total} iterations were asked for; hint: pass a non-empty list "
                "or DataLoader (a generator that was iterated before yields nothing)"
            )
        inputs, targets = check_batch(head, self.plan.global_batch_size, self._job.iteration, self._input_dtype)
        micro = self.plan.micro_batch_size
        if not self._stages.ready:  # a traced model: split it on the first micro-batch, as the stages will run
            self._stages.build(micro_batches(inputs, micro)[0], targets[:micro], self.loss_fn)
            self._stages.check_optimizer(self.optimizer, self.scheduler)
        else:  # an nn.Sequential: its layers and the loss run on the first micro-batch, once it is uploaded
            self._first_micro = (micro_batches(inputs, micro)[0], targets[:micro])
        self._stages.flatten_inputs(inputs)  # the inputs' structure is the one the model was split with
        return itertools.chain([head], batches)

    def _first_stored(self, stored: stored_data.StoredDataset, first: int, k: int) -> dict[str, Any]:
        """What the workers read ``stored`` with (:attr:`WorkerConfig.data`), once the first micro-batch
        of the fit's batch ``k`` (iteration ``first``), read from storage, was checked (and a traced
        model split on it) as :meth:`_first_checked` checks a fed one."""
        shuffle, seed = self._data_order
        reader = stored_data.Reader(stored_data.data_storage(stored.url, stored.name), stored.to_spec(),
                                    parts=("inputs", "targets"))
        try:
            micro = self.plan.micro_batch_size
            indices = reader.batch_indices(k, shuffle, seed)[:micro]
            leaves, targets = reader.input_leaves(indices), reader.targets(indices)
        finally:
            reader.storage.close()
        inputs = stored_data.rebuild(stored.structure, [leaves[leaf.name] for leaf in stored.inputs])
        check_batch((inputs, targets), micro, first, self._input_dtype)
        if not self._stages.ready:
            self._stages.build(inputs, targets, self.loss_fn)
            self._stages.check_optimizer(self.optimizer, self.scheduler)
        else:
            self._first_micro = (inputs, targets)
        by_identity = {id(tensor): name for name, tensor in leaves.items()}
        flat = self._stages.flatten_inputs(inputs)
        ports = [by_identity.get(id(value)) for value in flat]
        if None in ports:  # the first stage takes something other than the data set's own tensors
            raise ConfigError(
                f"the model's first stage takes {len(flat)} values that are not the stored data set's input "
                f"tensors ({', '.join(leaf.name for leaf in stored.inputs)}); hint: feed the data from the "
                "driver, fit(data_loader)"
            )
        gated = self.executor.call_budget_s is not None
        return {**stored.to_spec(), "first": first - k, "shuffle": shuffle, "seed": seed, "ports": ports,
                "gated": gated}

    def _upload_definitions(self) -> None:
        for stage in range(self.plan.num_stages):
            definition = self._stages.definition(stage, self.optimizer, self.loss_fn, self.scheduler)
            key = self.keys.model_blob(stage)
            self.storage.put(key, signed.seal(definition, self._signing_key, name=key))
        self._uploaded = True

    def _train(self, fit: Fit, max_retries: int) -> None:
        """Run until ``fit`` is done, retrying a failed run from the last complete checkpoint.

        One run per launch: on a platform with a lifetime limit the driver ends
        a run early at an iteration boundary and the next run resumes from there.
        """
        failures: list[BaseException] = []
        while not fit.done:
            start = fit.next_iteration
            try:
                ran = Run(self._setup(), self._job, fit).execute()
            except (WorkerFailed, BackendError, StorageError) as exc:
                if isinstance(exc, WorkerFailed) and exc.cause.startswith(_NONFINITE):
                    raise _nonfinite(exc) from exc
                corrupt = _corrupt_checkpoint(exc)
                if corrupt is not None and len(failures) < max_retries and self._can_fall_back(fit):
                    # The restore point's checkpoint failed its check: go back to the one before it.
                    self._job.fall_back(corrupt)
                    failures.append(exc)
                    fit.rollback(self._job.restore_iteration)
                    log.warning("attempt %d of %d failed (%s); rolling back to the checkpoint before iteration %d",
                                len(failures), max_retries + 1, _one_line(exc), self._job.restore_iteration)
                    continue
                if _retryable(exc) and len(failures) < max_retries:
                    failures.append(exc)
                    restart = self._job.restore_iteration
                    fit.rollback(restart)
                    log.warning("attempt %d of %d failed (%s); rolling back to iteration %d and running again",
                                len(failures), max_retries + 1, _one_line(exc), restart)
                    continue
                if failures:
                    raise _final_failure(exc, failures) from exc
                raise
            if not fit.done:
                log.info("run from iteration %d stopped after %d iterations (lifetime limit); "
                         "continuing from the checkpoint", start, ran)

    def _can_fall_back(self, fit: Fit) -> bool:
        """Whether the job keeps a checkpoint before its restore point that this fit can replay from."""
        return len(self._job.points) == 2 and self._job.oldest_kept_iteration >= fit.first

    def _setup(self) -> Setup:
        """What a run launches with, from the trainer's settings as they are now."""
        return Setup(
            plan=self.plan,
            executor=self.executor,
            storage=self.storage,
            storage_url=self.storage_url,
            timeout_s=self.timeout_s,
            worker_timeout_s=WORKER_TIMEOUT_FACTOR * self.timeout_s + self.executor.start_timeout_s,
            threads_per_worker=self.threads_per_worker,
            signing_key=self._signing_key,
            gradient_bytes=self._stages.gradient_bytes(),
            input_dtype=self._input_dtype,
            lease=self._lease,
            requests=self.requests,
            flatten_inputs=self._stages.flatten_inputs,
            one_input=is_one_tensor(self._stages.ports[0]),
            clip_grad_norm=self.clip_grad_norm,
            data=self._data,
            data_key=secret.data_key(self._data["name"]) if self._data is not None else "",
        )


def _check_model(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer],
    plan: Plan,
) -> None:
    """Refuse what :class:`Trainer` cannot train (:class:`~funcpipe.ConfigError`, naming what is wrong)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; hint: pass the model itself (an "
            "nn.Sequential is cut between its layers, any other module split by tracing)"
        )
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a funcpipe.Plan, got {type(plan).__name__}; hint: Plan.manual(...)")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "optimizer must be a factory, not an optimizer instance; hint: "
            "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    for name, fn in (("loss_fn", loss_fn), ("optimizer", optimizer)):
        if not callable(fn):
            raise ConfigError(f"{name} must be callable, got {type(fn).__name__}")
    if isinstance(model, nn.Sequential) and len(model) == 0:
        raise ConfigError("model is an empty nn.Sequential; hint: a model with at least one layer")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        raise ConfigError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")


def _check_fit_options(iterations: int | None, epochs: int | None, max_retries: int, checkpoint_every: int) -> None:
    """Refuse :meth:`Trainer.fit` options that are not integers in range, or both iterations and epochs."""
    if iterations is not None and epochs is not None:
        raise ConfigError("give iterations or epochs, not both")
    for name, value, least in (("iterations", iterations, 1), ("epochs", epochs, 1),
                               ("max_retries", max_retries, 0), ("checkpoint_every", checkpoint_every, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_eval_options(eval_data: object, eval_every: object, eval_metric: object, checkpoint_every: int) -> None:
    """Refuse evaluation options that cannot work (before anything is launched)."""
    if eval_data is None:
        if eval_every is not None or eval_metric is not None:
            raise ConfigError("eval_every and eval_metric need eval_data; hint: fit(..., eval_data=test_batches)")
        return
    if isinstance(eval_data, (torch.Tensor, str, bytes)) or not hasattr(eval_data, "__iter__"):
        raise ConfigError(f"eval_data must be an iterable of (inputs, targets) batches, got {type(eval_data).__name__}"
                          "; hint: eval_data=[(test_x, test_y)] or a DataLoader")
    if eval_metric is not None and not callable(eval_metric):
        raise ConfigError(f"eval_metric must be callable (output, targets) -> number, got {type(eval_metric).__name__}")
    if eval_every is None:
        return
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ConfigError(f"eval_every must be an integer >= 1, got {eval_every!r}")
    if checkpoint_every == 0 or eval_every % checkpoint_every:
        raise ConfigError(
            f"eval_every={eval_every} is not a multiple of checkpoint_every={checkpoint_every}: an evaluation reads "
            f"the weights of a checkpoint; hint: fit(..., checkpoint_every={eval_every}, eval_every={eval_every}), "
            f"or a checkpoint_every that divides eval_every"
        )


def _check_data_options(data: object, shuffle: object, seed: object) -> tuple[bool, int]:
    """``(shuffle, seed)`` of a fit on a stored data set (defaults ``True``, 0).

    Raises:
        ConfigError: they are given for data the driver feeds (its order is the data's own), or are
            not a bool and an int.
    """
    if not isinstance(data, stored_data.StoredDataset):
        if shuffle is not None or seed is not None:
            raise ConfigError(
                "shuffle= and seed= order a stored data set (funcpipe.data.upload); data the driver feeds is "
                "trained on in the order it yields; hint: DataLoader(..., shuffle=True, generator=...) for that, "
                "or upload it"
            )
        return True, 0
    if shuffle is not None and not isinstance(shuffle, bool):
        raise ConfigError(f"shuffle must be True or False, got {shuffle!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    return (True if shuffle is None else shuffle), (seed or 0)


def _is_pair(batch: object) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)


def _call(model: nn.Module, inputs: Any) -> Any:
    """The model on inputs as :meth:`Trainer.fit` takes them: a tensor, a tuple (``*inputs``) or a dict (``**``)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _finite_positive(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and > 0."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _no_batches(data: Iterable[Batch], global_batch_size: int) -> ConfigError:
    """The error of a fit on data with no batch (``len(data) == 0``), naming the data and its length."""
    what = f"{type(data).__name__} of length 0"
    dataset, batch_size = getattr(data, "dataset", None), getattr(data, "batch_size", None)
    try:
        samples = len(dataset) if dataset is not None else None
    except TypeError:
        samples = None
    if samples is not None:
        what += f" (its dataset holds {samples} samples, in batches of {batch_size}"
        what += ", drop_last=True)" if getattr(data, "drop_last", False) else ")"
    return ConfigError(
        f"data is a {what}: it yields no batch, so there is nothing to train; the plan's global batch is "
        f"{global_batch_size} samples; hint: pass at least one batch of {global_batch_size} samples, e.g. "
        f"DataLoader(dataset, batch_size={global_batch_size}, drop_last=True) over at least {global_batch_size} samples"
    )


def _derived_timeout(plan: Plan) -> float:
    """The driver's wait for one iteration when the user gives none: see :class:`Trainer`'s ``timeout_s``."""
    if plan.predicted_iteration_s is None:
        return DEFAULT_TIMEOUT_S
    return max(TIMEOUT_FLOOR_S, TIMEOUT_PREDICTED_ITERATIONS * plan.predicted_iteration_s)


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


#: How a worker's :class:`~funcpipe.NonFiniteTraining` begins its :attr:`WorkerFailed.cause`.
_NONFINITE = f"{NonFiniteTraining.__name__}: "


def _retryable(exc: BaseException) -> bool:
    """Whether running again may help: not when a worker found the user's code or data at fault,
    nor the training non-finite (the same batch would fail the same way)."""
    if isinstance(exc, WorkerFailed):
        return not exc.cause.startswith(("ConfigError", "VersionMismatch", "UserCodeError", _NONFINITE))
    return not isinstance(exc, (ConfigError, NonFiniteTraining))


def _nonfinite(exc: WorkerFailed) -> NonFiniteTraining:
    """The driver's :class:`~funcpipe.NonFiniteTraining` for a worker's (which ``exc`` carries)."""
    return NonFiniteTraining(
        exc.cause.removeprefix(_NONFINITE)
        + "; the fit is not retried, and trainer.model holds the weights of the last complete checkpoint"
    )


def _corrupt_checkpoint(exc: BaseException) -> CheckpointCorrupt | None:
    """The :class:`~funcpipe.CheckpointCorrupt` a run failed with (raised by a worker or the driver), if it did."""
    if isinstance(exc, CheckpointCorrupt):
        return exc
    if isinstance(exc, WorkerFailed) and exc.cause.startswith("CheckpointCorrupt"):
        return CheckpointCorrupt(exc.cause)
    return None


def _unfinished(manifest: JobManifest, url: str) -> str:
    """:class:`~funcpipe.JobUnfinished`'s message for the job ``manifest`` describes."""
    where = ("no checkpoint yet" if manifest.restore_iteration is None
             else f"its last complete checkpoint is before iteration {manifest.restore_iteration}")
    ago = max(0.0, time.time() - manifest.updated)
    return (
        f"job {manifest.job!r} in {url} has an unfinished run ({manifest.run}, a fit of {manifest.fit_total} "
        f"iterations from iteration {manifest.fit_first}, last updated {ago:.0f} s ago; {where}); a fresh fit "
        "would train over it; hint: fit(..., resume=True) with the same data and iterations continues it, or "
        "trainer.clean() deletes it and a fit then starts the job over"
    )


def _one_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0]


def _final_failure(exc: BaseException, earlier: list[BaseException]) -> BaseException:
    """The error ``fit`` raises when retries were made and none is left: a :class:`WorkerFailed`
    that names every attempt's cause (``earlier``, then ``exc``)."""
    causes = [f"attempt {n}: {_one_line(e)}" for n, e in enumerate([*earlier, exc], 1)]
    worker = exc.worker if isinstance(exc, WorkerFailed) else "the job"
    trace = exc.remote_traceback if isinstance(exc, WorkerFailed) else ""
    failure = WorkerFailed(
        worker, f"{len(causes)} attempts failed (max_retries={len(earlier)}): " + "; ".join(causes), trace
    )
    failure.attempts = [*earlier, exc]
    return failure
