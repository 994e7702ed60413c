"""Trainer: the driver a notebook uses to train an ``nn.Sequential`` with a plan."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from funcpipe import binding, checkpoint, signed
from funcpipe.collectives import put_tensor
from funcpipe.errors import BackendError, ConfigError, IntegrityError, ObjectNotFound, StorageError
from funcpipe.executors import Executor, get_executor
from funcpipe.executors.base import ActorHandle, CallGroup, Resources
from funcpipe.keys import JobKeys
from funcpipe.plan import Plan
from funcpipe.storage import Storage, WaitCancelled, open_storage
from funcpipe.worker import StageDefinition, StageWorker, WorkerConfig

__all__ = ["History", "Trainer"]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

#: Free space /dev/shm needs for the default storage to go there.
SHM_MIN_FREE_BYTES = 2 * 2**30

#: Global batches the driver uploads ahead of the slowest finished iteration.
LOOKAHEAD = 2


@dataclasses.dataclass
class History:
    """What :meth:`Trainer.fit` measured.

    Attributes:
        losses: mean loss over each iteration's global batch.
        seconds: wall-clock seconds of each iteration, as the driver saw them.
        workers: per worker (stage, replica), the seconds it spent per
            iteration computing, blocked on downloads, syncing gradients and
            updating, summed over the run.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

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

    def __str__(self) -> str:
        if not self.losses:
            return "History: no iterations"
        # The median: the first iteration also pays for starting the workers.
        median_s = statistics.median(self.seconds)
        return (
            f"History: {len(self)} iterations, loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, "
            f"median {median_s * 1000:.1f} ms per iteration"
        )


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
        timeout_s: longest a worker or the driver waits for one object.
        threads_per_worker: torch threads (and CPUs asked for) per worker.
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
        timeout_s: float = 300.0,
        threads_per_worker: int = 1,
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
                f"sum of balance {list(plan.balance)}: {sum(plan.balance)})"
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
        if timeout_s <= 0 or threads_per_worker < 1:
            raise ConfigError(
                f"timeout_s must be > 0 and threads_per_worker >= 1 (got {timeout_s}, {threads_per_worker})"
            )
        self._model = model
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
        self.keys = JobKeys(f"job-{uuid.uuid4().hex[:12]}")
        self._signing_key = signed.new_key()
        self._iteration = 0  # iterations finished by this trainer so far

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
    ) -> History:
        """Train on global batches of ``(inputs, targets)``; a ``DataLoader`` works.

        Args:
            data: an iterable of global batches of ``plan.global_batch_size`` samples.
            iterations: optimizer steps to take, cycling over ``data`` if needed.
            epochs: passes over ``data`` (default 1 when ``iterations`` is not given).
            progress: show a progress bar.

        Raises:
            WorkerFailed: a worker raised or died; every other worker is stopped.
        """
        if iterations is not None and epochs is not None:
            raise ConfigError("give iterations or epochs, not both")
        for name, value in (("iterations", iterations), ("epochs", epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        batches, total = _batches(data, iterations, epochs or 1)
        history = History()
        if total == 0:
            return history
        first = self._iteration
        if first == 0:
            self._upload_definitions()
        bar = tqdm(total=total, disable=not progress, unit="it", desc="funcpipe")
        handles: list[ActorHandle] = []
        try:
            # One run per launch; on a platform with a lifetime limit the driver ends a
            # run early at an iteration boundary and the next run resumes from there.
            while len(history) < total:
                start = first + len(history)
                handles = self._launch(resume=start > 0)
                ran = self._run(handles, batches, start, total - len(history), history, bar)
                for handle in handles:
                    handle.release()
                handles = []
                if start > first:  # an intermediate checkpoint the next run has loaded
                    self._drop_checkpoints(start)
                if len(history) < total:
                    log.info("run from iteration %d stopped after %d iterations (lifetime limit); "
                             "continuing from the checkpoint", start, ran)
        except BaseException:
            for handle in handles:
                handle.kill()
            try:  # tell workers we could not kill (serverless ones) to stop
                self.storage.put(self.keys.abort, binding.encode_json(self.keys.abort, {}))
            except StorageError as exc:
                log.warning("could not write the abort object %s: %s", self.keys.abort, exc)
            # The next fit is a new attempt: fresh keys, no abort object, no stale messages.
            self.keys = JobKeys(self.keys.job, self.keys.attempt + 1)
            raise
        finally:
            bar.close()
        self._iteration = first + len(history)
        self._gather()
        if first > 0:
            self._drop_checkpoints(first)
        return history

    # -- internals -----------------------------------------------------------

    @functools.cached_property
    def _gradient_bytes(self) -> list[int]:
        """Bytes of each stage's flat gradient (its trainable parameters), as the workers sync it."""
        return [
            sum(p.numel() * p.element_size() for i in self.plan.layer_range(s) for p in self._model[i].parameters()
                if p.requires_grad)
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

    def _launch(self, *, resume: bool) -> list[ActorHandle]:
        plan = self.plan
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
                    timeout_s=self.timeout_s,
                    threads=self.threads_per_worker,
                    resume=resume,
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
        batches: Iterator[Batch],
        first: int,
        total: int,
        history: History,
        bar: tqdm,
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
        calls = CallGroup([(h, h.call("run", first, total)) for h in handles])
        uploads: list[Future[None]] = []
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
                        self.storage.put(key, binding.encode_json(key, {"iteration": stop_at}))
                        if stop_at == first + fed:
                            break
                batch = next(batches, None)
                if batch is None:
                    raise ConfigError(
                        f"data ran out after {done_before + fed} batches, but {done_before + total} iterations "
                        "were asked for; hint: pass data that can be iterated again (a list or a DataLoader)"
                    )
                uploads += self._feed(feeder, first + fed, batch)
                fed += 1
                if fed > LOOKAHEAD:
                    self._await(first + fed - 1 - LOOKAHEAD, calls, history, bar, finished)
            for k in range(len(history) - done_before, fed):
                self._await(first + k, calls, history, bar, finished)
            for upload in uploads:
                upload.result()
        for report in calls.results():
            iterations = report["iterations"]
            if len(iterations) != fed:
                raise BackendError(
                    f"stage {report['stage']} replica {report['replica']} ran {len(iterations)} "
                    f"iterations from {first}, the driver fed {fed}"
                )
            summary = {"stage": report["stage"], "replica": report["replica"], "iterations": len(iterations)}
            for field in ("compute_s", "wait_s", "sync_s", "update_s", "total_s"):
                summary[field] = sum(it[field] for it in iterations)
            history.workers.append(summary)
        self._forget(first + fed - 1)
        if stop_at is not None:
            self.storage.delete([self.keys.stop(first)])
        return fed

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

    def _drop_checkpoints(self, iteration: int) -> None:
        self.storage.delete([self.keys.checkpoint(s, iteration) for s in range(self.plan.num_stages)])

    def _feed(self, feeder: ThreadPoolExecutor, iteration: int, batch: Batch) -> list[Future[None]]:
        plan = self.plan
        inputs, targets = _check_batch(batch, plan.global_batch_size, iteration)
        last = plan.num_stages - 1
        futures = []
        micro = plan.micro_batch_size
        pairs = zip(torch.split(inputs, micro), torch.split(targets, micro), strict=True)
        for m, (x, y) in enumerate(pairs):
            for kind, stage, tensor in (("input", 0, x), ("target", last, y)):
                key = self.keys.message(iteration, kind, stage, m % plan.replicas[stage], m)
                futures.append(feeder.submit(put_tensor, self.storage, key, tensor))
        return futures

    def _await(
        self, iteration: int, calls: CallGroup, history: History, bar: tqdm, finished: list[float]
    ) -> None:
        last = self.plan.num_stages - 1
        loss = 0.0
        for replica in range(self.plan.replicas[last]):
            key = self.keys.metrics(iteration, last, replica)
            try:
                loss += binding.wait(self.storage, key, self.timeout_s, functools.partial(_report_loss, key=key),
                                     cancelled=calls.failed)
            except WaitCancelled:
                failure = calls.failure()
                assert failure is not None
                raise failure from None
            except ObjectNotFound:
                raise BackendError(
                    f"iteration {iteration} did not finish within {self.timeout_s:g} s "
                    "(no worker reported an error); hint: raise Trainer(timeout_s=...)"
                ) from None
        now = time.perf_counter()
        history.seconds.append(now - finished[0])
        finished[0] = now
        history.losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", s_per_it=f"{history.seconds[-1]:.3f}", refresh=False)
        bar.update(1)
        if len(history) > 1:
            self._forget(iteration - 1)

    def _forget(self, iteration: int) -> None:
        """Delete the messages of a finished iteration, so storage holds about two at a time.

        Safe once the last stage reported the *next* iteration: every replica
        of every stage owns a micro-batch of it, so each has finished reading
        (and sending) everything of this one.
        """
        self.storage.delete(self.keys.iteration_keys(iteration, self.plan, self._gradient_bytes))

    def _gather(self) -> None:
        merged: dict[str, torch.Tensor] = {}
        for stage in range(self.plan.num_stages):
            key = self.keys.checkpoint(stage, self._iteration)
            state, _ = checkpoint.decode_state(self.storage.get(key), key=key)
            merged.update(state)
        with torch.no_grad():
            self._model.load_state_dict(merged)


def _report_loss(data: bytes, key: str) -> float:
    """The loss in a last-stage worker's per-iteration report read from ``key`` (:meth:`JobKeys.metrics`).

    Raises:
        IntegrityError: ``data`` is not ``{"loss": <number>, "key": key}``.
        ForeignObject: it was written for another key.
    """
    loss = binding.decode_json(data, key).get("loss")
    if not isinstance(loss, bool) and isinstance(loss, (int, float)):
        try:
            return float(loss)
        except OverflowError:  # an integer beyond float's range
            pass
    raise IntegrityError(
        f"metrics report {key!r} has loss {loss!r:.80}, not a float; expected "
        f'{{"loss": <number>, "key": {key!r}}}'
    )


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


def _check_batch(batch: Any, size: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    return inputs, targets
