"""StageWorker: one replica of one pipeline stage, the same code on every executor.

A worker is built from a JSON-able :class:`WorkerConfig` (on a serverless
platform, the invocation payload) and talks to nothing but storage: it reads
its stage's signed definition, its inputs and its peers' gradients, and
writes its outputs, a per-iteration report and a checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from torch import nn

from funcpipe import binding, checkpoint, protocol, signed
from funcpipe.collectives import Comm, all_reduce
from funcpipe.data import Reader
from funcpipe.errors import (
    CheckpointCorrupt,
    ConfigError,
    FuncpipeError,
    IntegrityError,
    NonFiniteTraining,
    UserCodeError,
    WorkerFailed,
)
from funcpipe.plans import Plan
from funcpipe.protocol import FETCH_CONNECTIONS, PUSH_CONNECTIONS, JobKeys
from funcpipe.schedule import Task, worker_tasks
from funcpipe.storage import Storage, WaitCancelled, open_storage
from funcpipe.storage.authenticated import AuthenticatedStorage
from funcpipe.storage.counting import CountingStorage, RequestCounter

__all__ = [
    "NONFINITE_POLICIES", "ONE_TENSOR", "REPORT_TIMES", "Port", "StageDefinition", "StageWorker", "WorkerConfig",
    "flatten_gradients", "is_one_tensor", "limit_allocator_retention",
    "peak_rss_bytes",
    "reset_peak_rss",
]

log = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameters (malloc.h) and the values a worker process sets.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Allocations of this many bytes or more are mmapped, and unmapped when freed.
MMAP_THRESHOLD_BYTES = 4 * 2**20
#: Malloc arenas: the compute thread and the transfer threads share these.
ARENA_MAX = 2

#: The seconds a worker's per-iteration report holds (:meth:`StageWorker.run`), ``total_s`` last:
#: computing, blocked on downloads and uploads, syncing gradients, updating, and the iteration's whole.
REPORT_TIMES = ("compute_s", "wait_s", "sync_s", "update_s", "total_s")

#: What a worker does with a NaN or infinite loss or gradient (``Trainer.fit(on_nonfinite=...)``):
#: raise :class:`~funcpipe.NonFiniteTraining`, skip the stage's optimizer step, or not check.
NONFINITE_POLICIES = ("raise", "skip", "ignore")

#: The hint of every non-finite error.
NONFINITE_HINT = (
    "hint: lower the learning rate, check the inputs for NaN, clip the gradients "
    "(e.g. in a wrapping optimizer), or fit(..., on_nonfinite=\"skip\") to skip such steps"
)

#: How often a waiting worker looks for the driver's abort object, seconds (funcpipe.protocol).
ABORT_CHECK_S = protocol.ABORT_CHECK_S



class Port(NamedTuple):
    """One value crossing a stage boundary, as the stages on both sides of it know it.

    Attributes:
        name: the value's name (:class:`funcpipe.split.Value`), for messages.
        is_tensor: a tensor (else a plain number: a symbolic size).
        requires_grad: its gradient flows back over the boundary (a floating-point tensor only).
    """

    name: str
    is_tensor: bool
    requires_grad: bool


#: What crosses a cut of an ``nn.Sequential``: one tensor, carrying a gradient when it is floating point.
ONE_TENSOR = (Port("x", True, True),)


def is_one_tensor(ports: tuple[Port, ...]) -> bool:
    """Whether a boundary is one tensor: its messages are then one tensor (:func:`collectives.put_tensor`)."""
    return len(ports) == 1 and ports[0].is_tensor


@dataclasses.dataclass(frozen=True)
class StageDefinition:
    """What the signed model blob of one stage holds.

    ``layers`` is called with the values of ``inputs`` (positionally) and returns the tuple of
    ``outputs`` (a stage before the last; a lone tensor stands for a 1-tuple) or, in the last stage,
    the model's output, which ``loss_fn`` takes with the target.
    """

    layers: nn.Module
    optimizer: Any  # callable: parameters -> torch.optim.Optimizer
    loss_fn: Any  # callable (output, target) -> scalar, last stage only
    inputs: tuple[Port, ...] = ONE_TENSOR
    outputs: tuple[Port, ...] = ONE_TENSOR  # unused by the last stage
    scheduler: Any = None  # callable: optimizer -> a learning-rate scheduler, stepped once per iteration


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, as plain data: the invocation payload."""

    job: str
    attempt: int
    storage_url: str
    stage: int
    replica: int
    plan: dict[str, Any]
    timeout_s: float
    threads: int = 1
    #: Start from the checkpoint (of this attempt) before the first iteration run;
    #: ``None``: from the weights in the model blob.
    resume_attempt: int | None = None
    #: Replica 0 also checkpoints the state before every iteration that is a
    #: multiple of this (0: only at the end of a run).
    checkpoint_every: int = 0
    #: The key the stage definitions are signed with and every object is authenticated under
    #: (:mod:`funcpipe.storage.authenticated`).
    signing_key: str = dataclasses.field(default="", repr=False)  # never logged
    #: The run id in the job's keys (:class:`funcpipe.protocol.JobKeys`).
    run: str = ""
    #: A NaN or infinite loss (last stage) or summed gradient: one of :data:`NONFINITE_POLICIES`.
    on_nonfinite: str = "raise"
    #: Clip the gradients by their global norm over every stage to at most this (``None``: no clipping).
    clip_grad_norm: float | None = None
    #: A stored data set stage 0 and the last stage read their micro-batches from
    #: (:meth:`funcpipe.data.StoredDataset.to_spec`, plus ``first``: the fit's first iteration,
    #: ``shuffle``, ``seed``, ``ports``: the input leaves in the order stage 0 takes them, and
    #: ``gated``: stage 0 waits for the driver's :meth:`JobKeys.go` before each iteration);
    #: ``None``: the driver feeds them.
    data: dict[str, Any] | None = None
    #: The key the stored data set's objects are authenticated under (:func:`funcpipe.secret.data_key`).
    data_key: str = dataclasses.field(default="", repr=False)  # never logged

    def to_payload(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> WorkerConfig:
        return cls(**payload)

    @property
    def name(self) -> str:
        return f"stage {self.stage} replica {self.replica}"


class StageWorker:
    """Runs the schedule of one (stage, replica) for a range of iterations.

    An actor (:class:`funcpipe.executors.base.Actor`): built from plain data, its
    :meth:`run` called one at a time, :meth:`cancel` from any thread.
    """

    def __init__(self, payload: dict[str, Any]) -> None:
        self.config = WorkerConfig.from_payload(payload)
        self.plan = Plan.from_dict(self.config.plan)
        self.keys = JobKeys(self.config.job, self.config.attempt, self.config.run)
        self._cancel = threading.Event()
        self._last_abort_check = 0.0
        self._first = 0  # first iteration of the current run
        self._current = 0  # iteration the worker is in
        self._stop_at: int | None = None  # from the driver's stop object, once seen
        self._foreign: set[str] = set()  # foreign stop and abort objects already warned about
        self._ready = False
        self._upload_error: BaseException | None = None  # the first upload that failed
        self._synced: torch.Tensor | None = None  # the stage's summed flat gradient, between sync and update
        # Guards the thread pools: cancel() may come from another thread while _setup makes them.
        self._pools_lock = threading.Lock()
        self._pools: list[ThreadPoolExecutor] = []
        self._requests = RequestCounter()  # the storage requests of the current call
        self._data_counted: CountingStorage | None = None  # a stored data set's storage, counted as the job's

    # -- the actor interface -------------------------------------------------

    def run(self, first_iteration: int, count: int) -> dict[str, Any]:
        """Train iterations ``first_iteration .. first_iteration + count - 1``.

        Stops earlier, at the iteration the driver's stop object names
        (:meth:`JobKeys.stop`): the driver writes it before it feeds that
        iteration's micro-batches, so no worker has begun to change its state
        for it, and every stage and replica ends at the same boundary.

        Returns a JSON-able report: per iteration run, the seconds this worker
        spent computing, blocked on downloads, syncing gradients and
        updating; the call's seconds (``call_s``) and its storage requests by kind
        (``requests``: :meth:`RequestCounter.counts`, afresh for every call).
        Replica 0 of each stage writes a checkpoint of the state before the
        first iteration not run, and, every ``checkpoint_every`` iterations, one
        of the state before that iteration, written before
        the worker sends anything of it: when the last stage has reported an
        iteration, every stage's checkpoint before it is in storage.

        Raises:
            WorkerFailed: anything went wrong; carries the traceback text.
        """
        started = time.perf_counter()
        self._requests = RequestCounter()  # this call's only: an actor or a warm function may serve several
        if self._ready:
            self._counted.requests = self._requests
            if self._data_counted is not None:
                self._data_counted.requests = self._requests
        try:
            # The peak reported is this run's (setup included): a Ray host or a warm function
            # instance may have run another job before, whose peak is not this one's.
            start_rss = reset_peak_rss()
            self._setup(first_iteration)
            self._first = first_iteration
            reports: list[dict[str, Any]] = []
            for iteration in range(first_iteration, first_iteration + count):
                self._current = iteration
                self._read_stop()  # one GET per iteration: the driver decides a step ahead
                if self._stopping():
                    break
                if iteration != first_iteration and self._checkpoint_due(iteration):
                    self._save_checkpoint(iteration)
                try:
                    reports.append(self._iteration(iteration))
                except WaitCancelled:
                    if not self._stopping():
                        raise
                    break
            if self.config.replica == 0:
                self._save_checkpoint(first_iteration + len(reports))
            return {"stage": self.config.stage, "replica": self.config.replica, "iterations": reports,
                    "peak_rss_bytes": peak_rss_bytes(), "start_rss_bytes": start_rss,
                    "call_s": time.perf_counter() - started, "requests": self._requests.counts()}
        except BaseException as exc:
            self.cancel()
            failed = self._upload_error
            if failed is not None and isinstance(exc, WaitCancelled):  # it stopped for a failed upload
                trace = "".join(traceback.format_exception(failed))
                raise WorkerFailed(self.config.name, f"{type(failed).__name__}: {failed}", trace) from None
            raise WorkerFailed(
                self.config.name, f"{type(exc).__name__}: {exc}", traceback.format_exc()
            ) from None

    def _upload_failed(self, exc: BaseException) -> None:
        """An upload failed: stop now (its reader would wait out its timeout) and report that failure."""
        if self._upload_error is None:
            self._upload_error = exc
        self._cancel.set()

    def cancel(self) -> None:
        """Stop soon: waits give up at their next poll; the worker's threads are released."""
        with self._pools_lock:
            self._cancel.set()
            for pool in self._pools:
                pool.shutdown(wait=False, cancel_futures=True)

    # -- setup ---------------------------------------------------------------

    def _setup(self, first_iteration: int) -> None:
        if self._ready:
            return
        config = self.config
        torch.set_num_threads(config.threads)
        # Every request is counted (one increment each) into the current call's counter.
        self._counted = CountingStorage(open_storage(config.storage_url), self._requests, client=config.name)
        self.storage: Storage = AuthenticatedStorage(self._counted, config.signing_key)
        blob_key = self.keys.model_blob(config.stage)
        definition = signed.unseal(self.storage.get(blob_key), config.signing_key, name=blob_key)
        if not isinstance(definition, StageDefinition):
            raise ConfigError(f"object {blob_key!r} is not a stage definition")
        self.layers = definition.layers
        self.loss_fn = definition.loss_fn
        self.ports_in, self.ports_out = definition.inputs, definition.outputs
        # A stage without parameters (an activation alone) has nothing to optimize.
        has_params = any(True for _ in self.layers.parameters())
        self.optimizer: torch.optim.Optimizer | None = (
            definition.optimizer(self.layers.parameters()) if has_params else None
        )
        # The learning-rate scheduler, stepped once per iteration (a stage without an optimizer has none).
        self.scheduler: Any = (
            definition.scheduler(self.optimizer) if definition.scheduler is not None and self.optimizer else None
        )
        if config.resume_attempt is not None:
            source = self.keys.with_attempt(config.resume_attempt).checkpoint(config.stage, first_iteration)
            try:
                data = self.storage.get(source)
                state, optim_state = checkpoint.decode_state(data, key=source)
                scheduler_state = checkpoint.decode_scheduler(data, key=source)
            except IntegrityError as exc:  # the driver falls back to the checkpoint before
                raise CheckpointCorrupt(f"checkpoint {source!r} failed its check: {exc}") from exc
            self.layers.load_state_dict(state)
            if optim_state is not None and self.optimizer is not None:
                self.optimizer.load_state_dict(optim_state)
            if scheduler_state is not None and self.scheduler is not None:
                self.scheduler.load_state_dict(scheduler_state)
        self.layers.train()
        name = f"{config.stage}-{config.replica}"
        with self._pools_lock:
            if self._cancel.is_set():  # cancelled while setting up: make no threads
                raise WaitCancelled("worker cancelled before it started")
            self._upload = ThreadPoolExecutor(1, thread_name_prefix=f"funcpipe-upload-{name}")
            self._download = ThreadPoolExecutor(1, thread_name_prefix=f"funcpipe-download-{name}")
            self._pools = [self._upload, self._download]
            fetch = push = None
            if self.plan.replicas[config.stage] > 1:
                fetch = ThreadPoolExecutor(FETCH_CONNECTIONS, thread_name_prefix=f"funcpipe-fetch-{name}")
                push = ThreadPoolExecutor(PUSH_CONNECTIONS, thread_name_prefix=f"funcpipe-push-{name}")
                self._pools += [fetch, push]
        self.comm = Comm(
            self.storage, self._upload, self._download, config.timeout_s, self._cancelled, fetch, push,
            on_failure=self._upload_failed,
        )
        self.data: Reader | None = None
        last = config.stage == self.plan.num_stages - 1
        if config.data is not None and (config.stage == 0 or last):
            parts = [part for part, reads in (("inputs", config.stage == 0), ("targets", last)) if reads]
            # Its reads are the call's requests too.
            self._data_counted = CountingStorage(open_storage(config.data["url"]), self._requests, client=config.name)
            self.data = Reader(AuthenticatedStorage(self._data_counted, config.data_key), config.data, parts)
        self._gone = -1  # the last iteration the driver's go object was seen for
        self._ready = True

    def _stored(self, part: str, iteration: int, m: int) -> Any:
        """Micro-batch ``m`` of ``iteration``: its inputs (as stage 0 takes them) or targets, from the stored
        data set; stage 0 first waits for the iteration's go object when the run is gated."""
        spec, reader = self.config.data, self.data
        assert spec is not None and reader is not None
        if part == "inputs" and spec["gated"] and self._gone != iteration:
            key = self.keys.go(iteration)
            binding.wait(self.storage, key, self.config.timeout_s, lambda data: binding.decode_json(data, key),
                         cancelled=self._cancelled)
            self._gone = iteration
        indices = reader.micro_batch_indices(iteration, m, self.plan.micro_batch_size, spec["shuffle"], spec["seed"])
        if part == "targets":
            return reader.targets(indices)
        leaves = reader.input_leaves(indices)
        values = tuple(leaves[name] for name in spec["ports"])
        return values[0] if is_one_tensor(self.ports_in) else values

    def _checkpoint_due(self, iteration: int) -> bool:
        every = self.config.checkpoint_every
        return self.config.replica == 0 and every > 0 and iteration % every == 0

    def _save_checkpoint(self, iteration: int) -> None:
        key = self.keys.checkpoint(self.config.stage, iteration)
        self.storage.put_parts(key, checkpoint.encode_state_parts(self.layers, self.optimizer, key=key,
                                                                  scheduler=self.scheduler))

    def _cancelled(self) -> bool:
        """Whether waits should give up: aborted, or the driver stopped the run at this iteration."""
        if self._cancel.is_set():
            return True
        now = time.monotonic()
        if now - self._last_abort_check >= ABORT_CHECK_S:
            self._last_abort_check = now
            if self._read_abort():
                self._cancel.set()
            else:
                self._read_stop()
        return self._cancel.is_set() or self._stopping()

    def _read_abort(self) -> bool:
        """Whether the driver's abort object for this attempt is there (one GET, as a HEAD would be)."""
        key = self.keys.abort
        try:
            data = self.storage.get_if_exists(key)
            if data is None:
                return False
            protocol.decode_abort(data, key)
        except IntegrityError as exc:  # not this attempt's, or forged: the driver's own would overwrite it
            self._ignore(exc)
            return False
        return True

    def _read_stop(self) -> None:
        if self._stop_at is None:
            key = self.keys.stop(self._first)
            try:
                stop = self.storage.get_if_exists(key)
                if stop is None:
                    return
                self._stop_at = protocol.decode_stop(stop, key)
            except IntegrityError as exc:  # not this run's, or forged: the driver's own would overwrite it
                self._ignore(exc)

    def _ignore(self, exc: IntegrityError) -> None:
        """Log, once per object and binding, that a foreign control object is ignored."""
        if str(exc) not in self._foreign:
            self._foreign.add(str(exc))
            log.warning("%s; ignoring it", exc)

    def _stopping(self) -> bool:
        """The driver's stop object names the current iteration or an earlier one."""
        return self._stop_at is not None and self._stop_at <= self._current

    # -- one iteration ---------------------------------------------------------

    def _iteration(self, iteration: int) -> dict[str, Any]:
        plan, config = self.plan, self.config
        started = time.perf_counter()
        run = _Iteration(self, iteration)
        tasks = worker_tasks(config.stage, config.replica, replicas=plan.replicas,
                             num_micro_batches=plan.num_micro_batches, schedule=plan.schedule)
        for task in tasks:
            run.do(task)
        return run.finish(started)

    def _sync_gradients(self, iteration: int) -> None:
        params = protocol.trainable(self.layers.parameters())
        if not params:
            return
        flat = flatten_gradients(params)
        total = all_reduce(
            self.comm,
            flat,
            keys=self.keys,
            iteration=iteration,
            stage=self.config.stage,
            rank=self.config.replica,
            world=self.plan.replicas[self.config.stage],
            algorithm=self.plan.stage_sync(self.config.stage),
        )
        self._synced = total
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = total[offset : offset + n].view_as(p)
            offset += n


    def _update(self, iteration: int) -> None:
        """One optimizer step on the (summed) gradients, unless they are not finite (``on_nonfinite``)."""
        optimizer, synced = self.optimizer, self._synced
        self._synced = None
        if self.config.clip_grad_norm is not None:
            self._clip(iteration, self.config.clip_grad_norm)
        if optimizer is None:
            return
        if self.config.on_nonfinite == "ignore" or self._gradients_finite(synced):
            with user_code(self.config.name, "the optimizer's step", iteration):
                optimizer.step()
        elif self.config.on_nonfinite == "skip":
            log.warning("%s: %s; skipping the stage's optimizer step of iteration %d (on_nonfinite=\"skip\")",
                        self.config.name, self._nonfinite_gradient(iteration), iteration)
        else:
            raise NonFiniteTraining(f"{self.config.name}: {self._nonfinite_gradient(iteration)}; {NONFINITE_HINT}")
        optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:  # once per iteration, a skipped step included (as the iterations count)
            with user_code(self.config.name, "the scheduler's step", iteration):
                self.scheduler.step()

    def _clip(self, iteration: int, max_norm: float) -> None:
        """Scale the stage's (summed) gradient as ``torch.nn.utils.clip_grad_norm_`` over the whole model would.

        Replica 0 of every stage writes its squared norm (0 for a stage with nothing to train); every worker
        that trains reads all of them, so the replicas of a stage, which hold the same sum, scale alike.
        """
        grads = [p.grad for p in protocol.trainable(self.layers.parameters()) if p.grad is not None]
        squared = float(sum(float(torch.sum(g.double() * g.double())) for g in grads))
        config, plan, keys = self.config, self.plan, self.keys
        if config.replica == 0:
            key = keys.norm(iteration, config.stage)
            self.storage.put(key, protocol.encode_norm(key, squared))
        if not grads:
            return
        total = squared
        for s in range(plan.num_stages):
            if s != config.stage:
                key = keys.norm(iteration, s)
                read = functools.partial(protocol.decode_norm, key=key)
                total += binding.wait(self.storage, key, config.timeout_s, read, cancelled=self._cancelled)
        coef = max_norm / (math.sqrt(total) + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if coef < 1 or not math.isfinite(coef):
            for g in grads:
                g.mul_(coef)

    def _gradients_finite(self, synced: torch.Tensor | None) -> bool:
        """Whether every gradient of the stage is finite: one check over the flat sum, when replicas synced it."""
        if synced is not None:
            return bool(torch.isfinite(synced).all())
        grads = [p.grad for p in self.layers.parameters() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _nonfinite_gradient(self, iteration: int) -> str:
        """What is not finite in the stage's gradients (called only once a check failed)."""
        bad = [name for name, p in self.layers.named_parameters()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        nan = any(bool(torch.isnan(p.grad).any()) for p in self.layers.parameters() if p.grad is not None)
        world = self.plan.replicas[self.config.stage]
        summed = f", summed over the stage's {world} replicas," if world > 1 else ""
        return (f"the gradient of iteration {iteration}{summed} is not finite ({'NaN' if nan else 'infinite'} "
                f"in parameter{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad[:3]))}"
                f"{', ...' if len(bad) > 3 else ''})")


def flatten_gradients(params: list[Any]) -> torch.Tensor:
    """The parameters' gradients, concatenated (zeros for a parameter without one); each gradient is dropped.

    The bits of ``torch.cat``, without its doubling: ``flat`` starts unwritten
    (``torch.empty`` pages are resident only once written), and each gradient is
    copied into its region and released at once (``p.grad = None``; a worker's
    allocator returns large freed blocks to the system,
    :func:`limit_allocator_retention`), so the gradients' memory moves into
    ``flat``; at any moment at most one parameter's gradient is held twice.
    """
    dtype = params[0].grad.dtype if params[0].grad is not None else params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.grad.dtype if p.grad is not None else p.dtype)
    flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
    offset = 0
    for p in params:
        n = p.numel()
        region = flat[offset : offset + n]
        if p.grad is None:
            region.zero_()
        else:
            region.view(p.shape).copy_(p.grad)
            p.grad = None
        offset += n
    return flat


class _Iteration:
    """One iteration of one worker: its tasks, and what its micro-batches hold between them.

    Each task is a method, so nothing of a micro-batch outlives its entries in the dicts below:
    its input download until its forward; its input (stages after the first, for the input
    gradient) and its output, with the autograd graph the output keeps, until its backward; its
    output gradient download until its backward; its input gradient until it is handed to the
    upload thread, which drops it once it is written (a finished future holds only ``None``). So
    a replica holds what its task list posts and nothing more: under 1F1B at most ``in_flight``
    activations, ``in_flight + 1`` inputs and one output gradient (:mod:`funcpipe.schedule`).
    """

    def __init__(self, worker: StageWorker, iteration: int) -> None:
        self.worker = worker
        self.iteration = iteration
        self.stage = worker.config.stage
        self.replica = worker.config.replica
        self.first = self.stage == 0
        self.last = self.stage == worker.plan.num_stages - 1
        self.timings = dict.fromkeys(REPORT_TIMES[:-1], 0.0)
        self.loss_sum = 0.0
        self.inputs: dict[int, Future[Any]] = {}
        self.targets: dict[int, Future[torch.Tensor]] = {}
        self.grads: dict[int, Future[Any]] = {}
        self.held_inputs: dict[int, tuple[Any, ...]] = {}
        self.outputs: dict[int, Any] = {}
        self.input_grads: dict[int, tuple[torch.Tensor | None, ...]] = {}
        self.sends: list[Future[None]] = []

    def do(self, task: Task) -> None:
        op, m = task
        ports_in, ports_out = self.worker.ports_in, self.worker.ports_out
        worker = self.worker
        if op == "recv":
            if self.first and worker.data is not None:
                self.inputs[m] = worker._download.submit(worker._stored, "inputs", self.iteration, m)
            else:
                self.inputs[m] = self._recv("input" if self.first else "act", m, ports_in)
        elif op == "recv_target":
            if worker.data is not None:
                self.targets[m] = worker._download.submit(worker._stored, "targets", self.iteration, m)
            else:
                self.targets[m] = self._recv("target", m, ONE_TENSOR)
        elif op == "recv_grad":
            self.grads[m] = self._recv("grad", m, ports_out)
        elif op == "forward":
            self._forward(m)
        elif op == "send":
            self._send(self._message("act", self.stage + 1, m), [_detached(v) for v in self.outputs[m]], ports_out)
        elif op == "backward":
            self._backward(m)
        elif op == "send_grad":
            self._send_grad(m)
        elif op == "sync":
            t0 = time.perf_counter()
            self.worker._sync_gradients(self.iteration)
            self.timings["sync_s"] += time.perf_counter() - t0
        elif op == "update":
            t0 = time.perf_counter()
            self.worker._update(self.iteration)
            self.timings["update_s"] += time.perf_counter() - t0

    def finish(self, started: float) -> dict[str, Any]:
        """Report the loss (last stage), wait for every upload; the iteration's report."""
        worker = self.worker
        if self.last:
            key = worker.keys.metrics(self.iteration, self.stage, self.replica)
            data = protocol.encode_metrics(key, self.loss_sum)
            self.sends.append(worker._upload.submit(worker.storage.put, key, data))
        t0 = time.perf_counter()
        for send in self.sends:
            send.result()
        self.timings["wait_s"] += time.perf_counter() - t0
        return {"iteration": self.iteration, "loss": self.loss_sum if self.last else None, **self.timings,
                "total_s": time.perf_counter() - started}

    def _message(self, kind: str, stage: int, m: int) -> str:
        return self.worker.keys.message_for(self.worker.plan, self.iteration, kind, stage, m)

    def _recv(self, kind: str, m: int, ports: tuple[Port, ...]) -> Future[Any]:
        """Post the download of a message: one tensor (a boundary of one tensor), else the tuple of its values."""
        key = self._message(kind, self.stage, m)
        comm = self.worker.comm
        return comm.recv(key) if is_one_tensor(ports) else comm.recv_values(key, len(ports))

    def _send(self, key: str, values: list[Any], ports: tuple[Port, ...]) -> None:
        comm = self.worker.comm
        self.sends.append(comm.send(key, values[0]) if is_one_tensor(ports) else comm.send_values(key, values))

    def _ready(self, future: Future[Any]) -> Any:
        t0 = time.perf_counter()
        value = future.result()
        self.timings["wait_s"] += time.perf_counter() - t0
        return value

    def _forward(self, m: int) -> None:
        worker = self.worker
        received = self._ready(self.inputs.pop(m))
        values = (received,) if is_one_tensor(worker.ports_in) else tuple(received)
        t0 = time.perf_counter()
        if not self.first:
            values = tuple(
                v.requires_grad_(True) if port.requires_grad and _carries_grad(v) else v
                for v, port in zip(values, worker.ports_in, strict=True)
            )
            self.held_inputs[m] = values  # their .grad is what send_grad sends
        with user_code(worker.config.name, "the stage's forward", self.iteration, m):
            y = worker.layers(*values)
        self.timings["compute_s"] += time.perf_counter() - t0
        if not self.last:
            self.outputs[m] = self._boundary(y, m)
            return
        target = self._ready(self.targets.pop(m))
        t0 = time.perf_counter()
        with user_code(worker.config.name, "loss_fn", self.iteration, m):
            loss = worker.loss_fn(y, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(
                f"loss_fn returned {shape}, not a scalar tensor; hint: reduce it "
                "with a mean over the micro-batch"
            )
        # Each micro-batch loss is a mean over its samples; scaled by its share
        # of the global batch, the sum over all micro-batches and replicas is the
        # mean over the global batch, and so are the summed gradients.
        scaled = loss * (worker.plan.micro_batch_size / worker.plan.global_batch_size)
        value = float(scaled.detach())
        if worker.config.on_nonfinite == "raise" and not math.isfinite(value):
            raise NonFiniteTraining(
                f"{worker.config.name}: the loss of iteration {self.iteration}, micro-batch {m}, is "
                f"{float(loss.detach())} (not finite); {NONFINITE_HINT}"
            )
        self.loss_sum += value
        self.outputs[m] = (scaled,)
        self.timings["compute_s"] += time.perf_counter() - t0

    def _boundary(self, y: Any, m: int) -> tuple[Any, ...]:
        """The stage's output as the values of its boundary; refuse what does not match it."""
        ports = self.worker.ports_out
        values = (y,) if isinstance(y, torch.Tensor) and len(ports) == 1 else y
        if not isinstance(values, tuple) or len(values) != len(ports) or any(
                isinstance(v, torch.Tensor) != port.is_tensor for v, port in zip(values, ports, strict=True)):
            got = type(y).__name__ if not isinstance(y, tuple) else \
                f"a tuple of {[type(v).__name__ for v in y]}"
            raise ConfigError(
                f"stage {self.stage}'s layers returned {got} (iteration {self.iteration}, micro-batch {m}), "
                f"but {len(ports)} value(s) cross its boundary: {[p.name for p in ports]}; hint: a layer of an "
                "nn.Sequential must return one tensor (move the cut so that a tuple or dict stays inside one "
                "stage), or pass the model itself (any nn.Module is split by tracing)"
            )
        return values

    def _backward(self, m: int) -> None:
        outputs = self.outputs.pop(m)
        grads: tuple[Any, ...] = (None,)
        if not self.last:
            received = self._ready(self.grads.pop(m))
            grads = (received,) if is_one_tensor(self.worker.ports_out) else tuple(received)
        t0 = time.perf_counter()
        pairs = [(out, grad) for out, grad in zip(outputs, grads, strict=True)
                 if isinstance(out, torch.Tensor) and out.requires_grad and (self.last or _is_gradient(grad, out))]
        if pairs:
            with user_code(self.worker.config.name, "the backward", self.iteration, m):
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs] if not self.last else None)
        if not self.first:
            # A value that carries no gradient (an integer tensor) sends none; across a boundary of one tensor an
            # empty one says so.
            none = _NO_GRADIENT if is_one_tensor(self.worker.ports_in) else None
            self.input_grads[m] = tuple(v.grad if isinstance(v, torch.Tensor) and v.requires_grad else none
                                        for v in self.held_inputs.pop(m))
        self.timings["compute_s"] += time.perf_counter() - t0

    def _send_grad(self, m: int) -> None:
        grads = self.input_grads.pop(m)
        ports = self.worker.ports_in
        key = self._message("grad", self.stage - 1, m)
        if is_one_tensor(ports):  # no gradient (the output does not depend on the input): an empty one
            self._send(key, [_NO_GRADIENT if grads[0] is None else grads[0]], ports)
        else:  # a value without a gradient (an int, a mask, an unused value) is sent as None
            self._send(key, [g if port.requires_grad else None for g, port in zip(grads, ports, strict=True)], ports)


#: What a boundary of one integer tensor (token ids) sends back for its gradient: nothing (the sender skips it).
_NO_GRADIENT = torch.zeros(0)


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _carries_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _is_gradient(grad: Any, out: torch.Tensor) -> bool:
    """Whether ``grad`` received for ``out`` is its gradient; ``False``: the next stage sent none (``None``,
    or an empty tensor across a boundary of one tensor).

    Raises:
        IntegrityError: it is a tensor of another shape (never sent by a worker).
    """
    if grad is None or (isinstance(grad, torch.Tensor) and grad.shape == _NO_GRADIENT.shape and out.numel()):
        return False
    if not isinstance(grad, torch.Tensor) or grad.shape != out.shape:
        got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise IntegrityError(f"received a gradient of {got} for an output of shape {tuple(out.shape)}")
    return True


#: Exceptions of the user's code that a rerun of the same batch raises again (a programming or data error).
_DETERMINISTIC = (TypeError, ValueError, IndexError, KeyError, AttributeError, NotImplementedError)
#: Words in a torch RuntimeError's message that name a shape, size or dtype mismatch (deterministic too).
_MISMATCH = ("shape", "size", "dtype", "scalar type", "expected", "must match", "mat1 and mat2", "dimension")


def deterministic(exc: BaseException) -> bool:
    """Whether an exception of the user's code would come again on the same batch: a programming or data
    error (a TypeError, ValueError, ..., or torch's shape / dtype RuntimeError), not running out of memory,
    funcpipe's own errors or a fault that may not come again."""
    if isinstance(exc, FuncpipeError | WaitCancelled | MemoryError):
        return False
    text = str(exc).lower()
    mismatch = isinstance(exc, RuntimeError) and any(words in text for words in _MISMATCH)
    return (isinstance(exc, _DETERMINISTIC) or mismatch) and "out of memory" not in text


@contextlib.contextmanager
def user_code(worker: str, what: str, iteration: int, micro_batch: int | None = None) -> Iterator[None]:
    """Raise a programming or data error of the user's layers, loss or optimizer — a TypeError, ValueError,
    ..., or torch's shape / dtype RuntimeError — as :class:`~funcpipe.UserCodeError`, which is not retried
    (the same batch fails the same way). Anything else (funcpipe's own errors, running out of memory, a
    fault that may not come again) passes unchanged, and a retry may get past it."""
    try:
        yield
    except (FuncpipeError, WaitCancelled, MemoryError):
        raise
    except Exception as exc:
        if not deterministic(exc):
            raise
        where = f"iteration {iteration}" + (f", micro-batch {micro_batch}" if micro_batch is not None else "")
        raise UserCodeError(
            f"{worker}: {what} raised {type(exc).__name__}: {exc} ({where}); the same batch would fail the "
            "same way, so it is not retried; hint: run the model, loss_fn and optimizer on one batch in plain "
            "PyTorch to check shapes and dtypes (e.g. class-index targets for cross-entropy are int64)"
        ) from exc


def limit_allocator_retention() -> bool:
    """Make this process's C allocator give large freed blocks back to the system; ``False`` where it cannot.

    Worker processes call it when they start (a function entry's init, a Ray host).
    glibc's ``malloc`` otherwise raises its mmap threshold (up to 32 MiB) after the
    first large block is freed, so later tensors come from the heap, and what one
    micro-batch frees stays resident in one of the arenas (one per thread: compute,
    uploads, downloads) instead of being returned; peaks then grow with the arenas,
    not with what is live. A fixed threshold (:data:`MMAP_THRESHOLD_BYTES`) turns the
    growth off, and :data:`ARENA_MAX` bounds the arenas. Not glibc (macOS, musl):
    nothing is changed.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))


def reset_peak_rss() -> int | None:
    """Start measuring this process's peak resident memory afresh; its resident bytes now (``None`` where unknown).

    Collects garbage and hands the C allocator's free memory back to the system
    (glibc's ``malloc_trim``: what an earlier job freed is not resident any more),
    then resets the kernel's high-water mark (Linux: ``5`` written to
    ``/proc/self/clear_refs`` sets ``VmHWM``, and ``ru_maxrss`` with it, to the
    current ``VmRSS``). Where the mark cannot be reset, :func:`peak_rss_bytes` is the
    process's peak since it started.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has used, in bytes, since :func:`reset_peak_rss` (``None`` where unknown).

    Linux: ``VmHWM`` of ``/proc/self/status``; elsewhere ``ru_maxrss`` (the peak since
    the process started). On a function platform the worker is the process (one per
    function instance), so this is the figure to compare with the memory tier and with
    :func:`funcpipe.costmodel.stage_memory_bytes`; on Ray an actor's process also holds
    Ray's own runtime, and on threads it is the driver's.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # macOS: bytes; Linux: KiB


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; ``None`` without one (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == field:
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

