from __future__ import annotations

import copy
import ctypes
import dataclasses
import pickle
import subprocess
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from funcpipe import Plan, Trainer, WorkerFailed
from funcpipe.executors.base import ActorHandle, Resources
from funcpipe.executors.thread import ThreadActor, ThreadExecutor
from funcpipe.schedule import in_flight
from funcpipe.storage import MemoryStorage
from funcpipe.storage.authenticated import AuthenticatedStorage
from funcpipe.worker import StageWorker
from tests.helpers import SpyExecutor, mlp7, regression_batches


class FailsInIteration(nn.Module):
    """Identity until its ``after``-th forward call, then raises (per worker copy)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise ValueError(f"boom in forward call {self.calls}")
        return x


def failing_model(micro_batches: int) -> nn.Sequential:
    torch.manual_seed(0)
    # Stage 1 (one replica) sees `micro_batches` forwards per iteration: it fails in iteration 2.
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), FailsInIteration(after=micro_batches), nn.Linear(8, 3))


PLAN = Plan.manual([2, 1, 1], replicas=[2, 1, 2], micro_batch_size=2, global_batch_size=8)


def check_failure(exc: WorkerFailed) -> None:
    assert exc.worker == "stage 1 replica 0"
    # A ValueError of the user's layer: a UserCodeError, which names where it happened.
    assert exc.cause.startswith("UserCodeError: stage 1 replica 0: the stage's forward raised ValueError: boom in "
                                "forward call 5 (iteration 1, micro-batch 0)")
    assert "FailsInIteration" not in exc.cause and "in forward" in exc.remote_traceback
    assert "stage 1 replica 0 failed: UserCodeError:" in str(exc)


class RecordingRay:
    """Builds the Ray executor and remembers every actor it launched."""

    def __new__(cls) -> Any:
        from funcpipe.executors.ray import Ray

        class Recording(Ray):
            def __init__(self) -> None:
                super().__init__()
                self.launched: list[ActorHandle] = []

            def launch(self, actor_cls: type, *args: Any, name: str, resources: Resources) -> Any:
                handle = super().launch(actor_cls, *args, name=name, resources=resources)
                self.launched.append(handle)
                return handle

        return Recording()


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_stage_failure_names_the_worker_and_kills_every_actor() -> None:
    import ray
    import ray.exceptions

    executor = RecordingRay()
    trainer = Trainer(failing_model(PLAN.num_micro_batches), nn.functional.mse_loss,
                      lambda p: torch.optim.SGD(p, lr=0.1), PLAN, backend=executor, timeout_s=600)
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        trainer.fit(regression_batches(4, 8), progress=False)
    # Bounded by the failure, not by the 600 s wait timeout the peers would otherwise hit.
    assert time.monotonic() - started < 120
    check_failure(info.value)
    assert len(executor.launched) == 5
    for handle in executor.launched:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.host.stop.remote(), timeout=60)  # type: ignore[attr-defined]


def test_thread_stage_failure_leaves_no_thread_running() -> None:
    executor = ThreadExecutor()
    trainer = Trainer(failing_model(PLAN.num_micro_batches), nn.functional.mse_loss,
                      lambda p: torch.optim.SGD(p, lr=0.1), PLAN, backend=executor,
                      storage="memory://stage-failure", timeout_s=600)
    with pytest.raises(WorkerFailed) as info:
        trainer.fit(regression_batches(4, 8), progress=False)
    check_failure(info.value)
    for thread in threading.enumerate():
        if thread.name.startswith("funcpipe-"):
            thread.join(timeout=30)  # cancelled waits give up at their next poll
            assert not thread.is_alive(), thread.name


def test_worker_refuses_a_model_blob_signed_by_someone_else() -> None:
    from funcpipe import signed
    from funcpipe.storage import open_storage
    from funcpipe.worker import StageDefinition, StageWorker, WorkerConfig

    plan = Plan.manual([1], micro_batch_size=1, global_batch_size=1)
    worker_key, key = signed.new_key(), "job-x/model/s0"
    definition = StageDefinition(nn.Sequential(nn.Linear(1, 1)), lambda p: torch.optim.SGD(p, lr=1), None)
    config = WorkerConfig(job="job-x", attempt=0, storage_url="memory://foreign-blob", stage=0, replica=0,
                          plan=plan.to_dict(), timeout_s=5, signing_key=worker_key)
    # Stored under another job's key: the object's MAC fails before the blob is even looked at.
    AuthenticatedStorage(open_storage("memory://foreign-blob"), signed.new_key()).put(
        key, signed.seal(definition, worker_key, name=key))
    with pytest.raises(WorkerFailed, match="IntegrityError: object 'job-x/model/s0' failed its authentication"):
        StageWorker(config.to_payload()).run(0, 1)
    # Stored under the worker's key, but signed with another: its signature fails.
    AuthenticatedStorage(open_storage("memory://foreign-blob"), worker_key).put(
        key, signed.seal(definition, signed.new_key(), name=key))
    with pytest.raises(WorkerFailed, match="IntegrityError: object 'job-x/model/s0' has a bad signature"):
        StageWorker(config.to_payload()).run(0, 1)


def test_worker_config_repr_hides_the_signing_key() -> None:
    from funcpipe.worker import WorkerConfig

    config = WorkerConfig(job="j", attempt=0, storage_url="memory://", stage=0, replica=0,
                          plan={}, timeout_s=1, signing_key="ab" * 32)
    assert "ab" * 32 not in repr(config)


def test_fit_after_a_failed_fit_continues_from_the_last_good_state() -> None:
    from tests.helpers import assert_same_parameters, plain_training

    optimizer = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    model = failing_model(PLAN.num_micro_batches)
    batches = regression_batches(3, 8)
    reference = copy.deepcopy(model)
    reference[2].after = 10**9  # the reference must not fail
    expected = plain_training(reference, nn.functional.mse_loss, optimizer, [batches[0], batches[2]])
    trainer = Trainer(model, nn.functional.mse_loss, optimizer, PLAN, backend="thread",
                      storage="memory://after-failure", timeout_s=600)
    trainer.fit(batches[:1], progress=False)
    with pytest.raises(WorkerFailed):  # fresh workers: the second of these iterations fails
        trainer.fit(batches[1:3], progress=False)
    # A new attempt, on other data: the abort object and the messages the failed attempt left
    # for this same iteration (computed from batches[1]) must not be consumed.
    assert len(trainer.fit(batches[2:3], progress=False)) == 1
    assert_same_parameters(trainer.model, expected)


def test_a_worker_cancelled_before_it_starts_makes_no_threads() -> None:
    from funcpipe import signed
    from funcpipe.storage import open_storage
    from funcpipe.worker import StageDefinition, StageWorker, WorkerConfig

    plan = Plan.manual([1], micro_batch_size=1, global_batch_size=1)
    key, blob_key = signed.new_key(), "job-early/model/s0"
    definition = StageDefinition(nn.Sequential(nn.Linear(1, 1)), lambda p: torch.optim.SGD(p, lr=1), None)
    AuthenticatedStorage(open_storage("memory://early-cancel"), key).put(
        blob_key, signed.seal(definition, key, name=blob_key))
    config = WorkerConfig(job="job-early", attempt=0, storage_url="memory://early-cancel", stage=0, replica=0,
                          plan=plan.to_dict(), timeout_s=5, signing_key=key)
    worker = StageWorker(config.to_payload())
    before = {t.name for t in threading.enumerate()}
    worker.cancel()  # the driver gave up while the worker was still starting
    with pytest.raises(WorkerFailed, match="cancelled before it started"):
        worker.run(0, 1)
    assert {t.name for t in threading.enumerate()} - before == set()


# --------------------------------------------------------------------------- nothing read from storage is executed

#: Per storage name: (a part of the keys to swap, the bytes put in their place).
SWAPS: dict[str, tuple[str, bytes]] = {}


class SwapsOnWrite(MemoryStorage):
    """``swap://<name>``: memory storage where objects whose key contains ``SWAPS[name][0]`` are replaced,
    as they land, by ``SWAPS[name][1]``: what someone who can write to the bucket could do."""

    @classmethod
    def from_url(cls, url: str) -> SwapsOnWrite:
        storage = cls(url.split("://", 1)[1])
        storage.url = url
        return storage

    def put(self, key: str, data: bytes) -> None:
        part, payload = SWAPS[self.name]
        super().put(key, payload if part in key else data)


def pickle_that_creates(marker: Path) -> bytes:
    """A pickle whose unpickling creates ``marker``; checked on a control path next to it."""
    from tests.helpers import CreatesFile

    control = marker.with_name(marker.name + "-control")
    pickle.loads(pickle.dumps(CreatesFile(str(control))))
    assert control.exists()
    return pickle.dumps(CreatesFile(str(marker)))


def swapping_trainer(part: str, payload: bytes) -> Trainer:
    from funcpipe.storage import register

    register("swap", SwapsOnWrite, clobber=True)
    name = f"swap-{uuid.uuid4().hex}"
    SWAPS[name] = (part, payload)
    return Trainer(mlp7(), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.1), SWAP_PLAN,
                   backend="thread", storage=f"swap://{name}", timeout_s=60)


SWAP_PLAN = Plan.manual([3, 4], replicas=[2, 1], micro_batch_size=2, global_batch_size=8)


@pytest.mark.parametrize("what", ["model-blob", "input-message"])
def test_a_pickle_written_over_an_object_is_refused_and_never_run(what: str, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    part = {"model-blob": "/model/s1", "input-message": "/input.s0.r1.m1"}[what]
    trainer = swapping_trainer(part, pickle_that_creates(marker))
    key = {
        "model-blob": trainer.keys.model_blob(1),
        "input-message": trainer.keys.message(0, "input", 0, 1, 1),
    }[what]
    with pytest.raises(WorkerFailed) as info:
        trainer.fit(regression_batches(1, 8), progress=False)
    assert info.value.cause.startswith(f"IntegrityError: object {key!r} failed its authentication"), info.value.cause
    assert not marker.exists()


def test_a_pickle_written_over_a_checkpoint_is_refused_by_the_resuming_worker(tmp_path: Path) -> None:
    from funcpipe.storage import open_storage

    marker = tmp_path / "unpickled"
    trainer = swapping_trainer("nothing is swapped", b"")
    trainer.fit(regression_batches(1, 8), progress=False)
    key = trainer.keys.checkpoint(1, 1)  # what stage 1 resumes from in the next fit
    open_storage(trainer.storage_url).put(key, pickle_that_creates(marker))
    with pytest.raises(WorkerFailed) as info:
        trainer.fit(regression_batches(1, 8), progress=False)
    assert info.value.worker == "stage 1 replica 0"
    assert info.value.cause.startswith(f"CheckpointCorrupt: checkpoint {key!r} failed its check: object {key!r} "
                                       "failed its authentication"), info.value.cause
    assert not marker.exists()


def test_a_pickle_written_over_a_checkpoint_is_refused_by_the_driver_gathering_the_model(tmp_path: Path) -> None:
    from funcpipe import CheckpointCorrupt, IntegrityError

    marker = tmp_path / "unpickled"
    trainer = swapping_trainer("/checkpoint/i00000001/s0", pickle_that_creates(marker))
    with pytest.raises(IntegrityError) as info:
        trainer.fit(regression_batches(1, 8), progress=False)
    assert isinstance(info.value, CheckpointCorrupt)
    assert str(info.value).startswith("the fit's final checkpoint (before iteration 1) failed its check "
                                      f"(checkpoint {trainer.keys.checkpoint(0, 1)!r} failed its check")
    assert not marker.exists()


# --------------------------------------------------------------------------- what a worker holds, and when it downloads
#
# Issue 13: under 1F1B a replica holds at most its window of micro-batches (Plan.in_flight) and downloads each
# input only when its list says so. Both are observed from outside the worker: probe layers keep weak references
# to each micro-batch's input, output and output gradient, and a storage logs when each download begins.

#: Every download a worker began (``("get", key)``) and every backward a probe saw (``("backward", tally id)``),
#: in the order they happened; guarded by ``LOGGED``.
EVENTS: list[tuple[str, object]] = []
LOGGED = threading.Lock()


class LoggedStorage(MemoryStorage):
    """``logged://<name>``: memory storage that logs in :data:`EVENTS` when a wait for a message begins."""

    @classmethod
    def from_url(cls, url: str) -> LoggedStorage:
        storage = cls(url.split("://", 1)[1])
        storage.url = url
        return storage

    def wait(self, key: str, timeout: float, *, cancelled: Any = None) -> bytes:
        if _message_fields(key) is not None:
            with LOGGED:
                EVENTS.append(("get", key))
        return super().wait(key, timeout, cancelled=cancelled)


def _message_fields(key: str) -> tuple[int, str, int, int, int] | None:
    """``(iteration, kind, stage, replica, micro-batch)`` of a message key, else ``None``."""
    *_, iteration, name = key.split("/")
    kind, *rest = name.split(".")
    if kind not in ("input", "act", "target", "grad") or not iteration.startswith("i"):
        return None
    stage, replica, micro_batch = (int(part[1:]) for part in rest)
    return int(iteration[1:]), kind, stage, replica, micro_batch


class Tally:
    """What one worker's probes saw, shared by its stage's :class:`Head` and :class:`Tail` (each worker
    unpickles its own copy of both, and so of this).

    Per micro-batch in the order the worker ran them: weak references to its input, output and output
    gradient. When a backward begins every earlier one has ended, so each event checks that nothing of
    those micro-batches is still alive.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, weakref.ref[torch.Tensor]]] = []
        self.backwards = 0  # backwards begun
        self.most_alive_inputs = 0
        self.violations: list[str] = []

    def check(self, event: str) -> None:
        for number, record in enumerate(self.records[: self.backwards]):
            alive = sorted(kind for kind, ref in record.items() if ref() is not None)
            if alive:
                self.violations.append(f"at {event}: {', '.join(alive)} of micro-batch #{number} alive")

    def forward(self, x: torch.Tensor) -> None:
        self.check(f"forward #{len(self.records)}")
        self.records.append({"input": weakref.ref(x)})
        alive = sum(1 for record in self.records if record["input"]() is not None)
        self.most_alive_inputs = max(self.most_alive_inputs, alive)

    def output(self, y: torch.Tensor) -> None:
        self.records[-1]["output"] = weakref.ref(y)
        if y.requires_grad:
            y.register_hook(self.gradient)

    def gradient(self, grad: torch.Tensor) -> None:
        number = self.backwards
        self.check(f"backward #{number}")
        self.records[number]["grad"] = weakref.ref(grad)
        self.backwards += 1
        with LOGGED:
            EVENTS.append(("backward", id(self)))


class Head(nn.Module):
    """A stage's first layer: identity that shows its :class:`Tally` each input."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tally.forward(x)
        return x


class Tail(nn.Module):
    """A stage's last layer: identity that shows its :class:`Tally` each output and output gradient."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.tally.output(y)
        return y


@dataclasses.dataclass(frozen=True)
class Probed:
    """A run of the probed model: its plan, each worker with its tally, and the events logged."""

    plan: Plan
    workers: list[tuple[StageWorker, Tally]]
    events: list[tuple[str, object]]


@pytest.fixture(scope="module", params=["gpipe", "1f1b"])
def probed(request: pytest.FixtureRequest) -> Probed:
    """Train a probed model two iterations on threads, under the schedule of the parameter.

    Replicas [2, 1, 3], 11 micro-batches: the 1F1B windows are 3, 4 and 1 for 6 or 5, 11, and 4 or 3
    micro-batches per replica, so every replica has a steady state, and none a count its replicas divide.
    """
    from funcpipe.storage import register

    schedule = request.param
    replicas, stages = [2, 1, 3], 3
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for s in range(stages):
        tally = Tally()
        layers += [Head(tally), nn.Linear(8 if s == 0 else 16, 3 if s == stages - 1 else 16), nn.Tanh(), Tail(tally)]
    plan = Plan.manual([4] * stages, replicas=replicas, micro_batch_size=2, global_batch_size=22, schedule=schedule)
    register("logged", LoggedStorage, clobber=True)
    with LOGGED:
        EVENTS.clear()
    executor = SpyExecutor(ThreadExecutor())
    trainer = Trainer(nn.Sequential(*layers), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.1), plan,
                      backend=executor, storage=f"logged://probed-{schedule}", timeout_s=120)
    assert len(trainer.fit(regression_batches(2, plan.global_batch_size), progress=False)) == 2
    workers = [handle.instance for handle in executor.launched if isinstance(handle, ThreadActor)]
    with LOGGED:
        events = list(EVENTS)
    return Probed(plan, [(w, w.layers[0].tally) for w in workers if isinstance(w, StageWorker)], events)


def test_a_worker_keeps_nothing_of_a_micro_batch_past_its_backward(probed: Probed) -> None:
    plan, schedule = probed.plan, probed.plan.schedule
    assert len(probed.workers) == plan.num_workers
    for worker, tally in probed.workers:
        stage, replica = worker.config.stage, worker.config.replica
        n = len(plan.micro_batches(stage, replica))
        assert tally.backwards == 2 * n
        assert tally.violations == [], (stage, replica)
        # The window is reached, never exceeded: GPipe holds a stage's every micro-batch (but the last
        # stage's one at a time); 1F1B its in_flight window, whatever the micro-batch count.
        expected = 1 if stage == plan.num_stages - 1 else n if schedule == "gpipe" else min(n, plan.in_flight(stage))
        assert tally.most_alive_inputs == expected, (stage, replica)


def downloads(probed: Probed, worker: StageWorker, tally: Tally) -> list[tuple[str, int, int]]:
    """Every download ``worker`` began: ``(key, i, b)``, the key being of its ``i``-th own micro-batch of the
    iteration, begun when ``b`` of the iteration's backwards had begun on the worker."""
    stage, replica = worker.config.stage, worker.config.replica
    mine = probed.plan.micro_batches(stage, replica)
    out, backwards = [], 0
    for event, what in probed.events:
        if event == "backward":
            backwards += what == id(tally)
            continue
        assert isinstance(what, str)
        fields = _message_fields(what)
        assert fields is not None
        iteration, _, to_stage, to_replica, m = fields
        if (to_stage, to_replica) == (stage, replica):
            out.append((what, mine.index(m), backwards - iteration * len(mine)))
    return out


def test_a_1f1b_worker_downloads_each_input_only_when_its_window_has_room(probed: Probed) -> None:
    plan = probed.plan
    for worker, tally in probed.workers:
        stage, replica = worker.config.stage, worker.config.replica
        n = len(plan.micro_batches(stage, replica))
        k = min(n, in_flight(stage, plan.replicas, plan.num_micro_batches, "1f1b"))  # the 1F1B window
        assert n > k + 1, "the window must be smaller than the iteration, or there is nothing to bound"
        began = downloads(probed, worker, tally)
        assert len(began) == 2 * 2 * n  # two iterations of inputs, and of targets or output gradients
        if plan.schedule == "1f1b":
            # Own input i (and its target) is posted after backward i - k - 1, output gradient i after
            # backward i - 1: at most k + 1 inputs and one output gradient are ever fetched or held.
            early = [(key, i, b) for key, i, b in began if b < (i if "/grad." in key else i - k)]
            assert early == [], (stage, replica)
        elif stage < plan.num_stages - 1:
            # GPipe prefetches the whole iteration: every input is requested before the first backward.
            assert [b for key, _, b in began if "/grad." not in key] == [0] * n * 2, (stage, replica)


# A fresh process whose second thread (as a worker's compute thread: its own malloc arena)
# frees 16 MiB (raising glibc's dynamic mmap threshold above 8 MiB), then allocates 8 MiB
# tensors with small ones between them and frees the large ones. Prints the MiB resident
# at the peak and after the frees, over the start.
_RETENTION = """
import sys, threading, torch
from funcpipe.worker import limit_allocator_retention, _proc_status_bytes
if sys.argv[1] == "limit":
    assert limit_allocator_retention()
rss = lambda: _proc_status_bytes("VmRSS") / 2**20
out = []
def work():
    t = torch.ones(4 * 2**20); del t
    before = rss()
    large, small = [], []
    for _ in range(24):
        large.append(torch.ones(2 * 2**20))  # 8 MiB, its pages touched
        small.append(torch.ones(1024))
    peak = rss()
    del large
    out.append((peak - before, rss() - before))
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(*out[0])
"""


def _retained_mib(mode: str) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", _RETENTION, mode], check=True, capture_output=True, text=True)
    grown, kept = (float(v) for v in done.stdout.split())
    return grown, kept


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS (Linux)")
def test_limit_allocator_retention_returns_freed_tensors_to_the_system() -> None:
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("not glibc")
    grown, kept = _retained_mib("limit")
    assert grown >= 150, grown  # 24 x 8 MiB were resident
    assert kept < 24, f"{kept:.0f} of {grown:.0f} MiB freed stayed resident"
    # Without it, glibc keeps them in the thread's heap: what the call changes.
    grown, kept = _retained_mib("default")
    assert grown >= 150 and kept > 100, (grown, kept)


def test_each_call_of_a_worker_reports_its_own_requests_and_seconds() -> None:
    # A Ray actor or a warm function instance runs several calls of one worker: each call's report holds
    # the requests of that call alone, as an outer counter of the worker's storage saw them.
    from funcpipe import signed
    from funcpipe.collectives import put_tensor
    from funcpipe.protocol import JobKeys
    from funcpipe.storage import counting, open_storage
    from funcpipe.worker import StageDefinition, StageWorker, WorkerConfig

    plan = Plan.manual([1], micro_batch_size=1, global_batch_size=1)
    key, keys = signed.new_key(), JobKeys("job-twice")
    store = AuthenticatedStorage(open_storage("memory://twice"), key)
    definition = StageDefinition(nn.Sequential(nn.Linear(1, 1)), lambda p: torch.optim.SGD(p, lr=0.1),
                                 nn.functional.mse_loss)
    store.put(keys.model_blob(0), signed.seal(definition, key, name=keys.model_blob(0)))
    for i in range(2):
        put_tensor(store, keys.message_for(plan, i, "input", 0, 0), torch.ones(1, 1))
        put_tensor(store, keys.message_for(plan, i, "target", 0, 0), torch.zeros(1, 1))
    config = WorkerConfig(job="job-twice", attempt=0, storage_url="counted+memory://twice?counter=worker-twice",
                          stage=0, replica=0, plan=plan.to_dict(), timeout_s=5, signing_key=key)
    worker = StageWorker(config.to_payload())
    outer = counting.counter("worker-twice")
    reports = []
    for i in range(2):
        outer.reset()
        started = time.perf_counter()
        reports.append(worker.run(i, 1))
        wall = time.perf_counter() - started
        assert reports[-1]["requests"] == outer.counts()
        assert reports[-1]["iterations"][0]["total_s"] <= reports[-1]["call_s"] <= wall
    first, second = (r["requests"] for r in reports)
    assert first["GET"] == second["GET"] + 1  # the model blob, read by the first call only
    assert first["PUT"] == second["PUT"] == 2  # the metrics and the checkpoint
    worker.cancel()
