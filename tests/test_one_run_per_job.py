"""One live run per job, every object authenticated (issue 16): the cases that once trained silently wrong.

Each test reproduces a case that used to finish without an error and with wrong parameters; after
the fix the result equals plain PyTorch, or a named FuncpipeError is raised before anything is
trained on a wrong object. The SIGKILL and two-driver cases run in real subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from funcpipe import (
    FitInProgress,
    JobBusy,
    JobUnfinished,
    LeaseLost,
    Plan,
    StorageFailure,
    Trainer,
    UserCodeError,
    WorkerFailed,
)
from funcpipe.lease import Lease, lease_key
from funcpipe.storage import MemoryStorage, Storage, open_storage, register
from tests.helpers import assert_same_parameters, mlp7, plain_training, regression_batches, sgd_momentum
from tests.test_trainer_recovery import reference, run_driver_until_killed

PLAN = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
ROOT = Path(__file__).parent.parent


def trainer(storage: str, job: str | None = None, model: nn.Sequential | None = None, **kwargs: Any) -> Trainer:
    return Trainer(model or mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread",
                   storage=storage, job=job, **kwargs)


# -- reusing a job name after a crash --------------------------------------------------------------


def test_a_fresh_fit_on_a_crashed_jobs_name_says_so_and_clean_starts_it_over(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    run_driver_until_killed(url)  # job "killed-driver", SIGKILLed after iteration 3, its objects left behind
    other = regression_batches(4, 8, seed=7)
    fresh = trainer(url, "killed-driver")
    with pytest.raises(JobUnfinished, match=r"job 'killed-driver' .* unfinished run .*resume=True.*trainer\.clean\(\)"):
        fresh.fit(other, progress=False)
    assert_same_parameters(fresh.model, mlp7())  # nothing was trained
    fresh.clean()  # the dead run's objects, manifest and lease go
    assert open_storage(url).list("killed-driver/") == []
    fresh.fit(other, progress=False)
    assert_same_parameters(fresh.model, reference(other))


def test_resume_takes_over_the_lease_a_killed_driver_left(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    run_driver_until_killed(url)
    storage = open_storage(url)
    assert storage.list("jobs/killed-driver.lease.")  # the dead driver never released it
    resumed = trainer(url, "killed-driver")  # its process is gone: the lease is stale at once
    batches = regression_batches(8, 8)
    resumed.fit(batches, progress=False, resume=True)
    assert_same_parameters(resumed.model, reference(batches))
    assert storage.list("jobs/killed-driver.lease.") == []  # released at the end of the fit


# -- two drivers on one job at once ----------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from torch import nn
    from funcpipe import Plan, Trainer
    from tests.helpers import mlp7, regression_batches, sgd_momentum

    url, go, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    batches = regression_batches(6, 8)

    class WaitsAtBatch3:
        def __len__(self):
            return len(batches)
        def __iter__(self):
            for i, batch in enumerate(batches):
                if i == 3:  # holds the lease, mid-fit, until the test has tried its own fit
                    deadline = time.monotonic() + 300
                    while not go.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                yield batch

    plan = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, plan, backend="thread", storage=url,
                      job="shared")
    trainer.fit(WaitsAtBatch3(), progress=False)
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, out)
""")


def test_a_second_driver_on_a_job_another_is_training_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    url, go, out = (tmp_path / "store").as_uri(), tmp_path / "go", tmp_path / "holder.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(go), str(out)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        storage = open_storage(url)
        deadline = time.monotonic() + 240
        while not storage.list("jobs/shared.lease.") and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # waits for a condition (the lease appears), not for a race to be won
        assert storage.list("jobs/shared.lease."), holder.communicate()[1].decode()[-2000:]
        second = trainer(url, "shared", model=mlp7(seed=5))
        with pytest.raises(JobBusy, match=rf"job 'shared' is being trained by another fit: run r[0-9a-f]+ on "
                                          rf".* \(pid {holder.pid}\).*resume=True"):
            second.fit(regression_batches(6, 8, seed=9), progress=False)
        with pytest.raises(JobBusy):
            second.clean()  # nor may it delete a live job
        go.touch()
        _, err = holder.communicate(timeout=300)
        assert holder.returncode == 0, err.decode()[-2000:]
    finally:
        go.touch()
        if holder.poll() is None:
            holder.kill()
    trained = mlp7()
    trained.load_state_dict(load_file(str(out)))
    assert_same_parameters(trained, reference(regression_batches(6, 8)))  # the holder's run was not disturbed
    assert_same_parameters(second.model, mlp7(seed=5))
    # Once the first finished, the second trains on its own (a new run), equal to plain PyTorch.
    other = regression_batches(6, 8, seed=9)
    second.fit(other, progress=False)
    assert_same_parameters(second.model, plain_training(mlp7(seed=5), nn.functional.mse_loss, sgd_momentum, other))


# -- the lease itself, on an injected clock ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def lease(storage: Storage, run: str, clock: Clock) -> Lease:
    return Lease(storage, "j", run, ttl_s=60.0, clock=clock)


def test_a_live_lease_refuses_a_stale_one_is_taken_over_and_its_holder_learns_it_lost() -> None:
    storage, clock = MemoryStorage(f"lease-{uuid.uuid4().hex}"), Clock()
    first, second = lease(storage, "r1", clock), lease(storage, "r2", clock)
    first.acquire()
    first._stop.set()  # no renewal thread in this test: the clock does not move on its own
    try:
        clock.now += 59  # not yet stale
        with pytest.raises(JobBusy, match=r"run r1 on .* last renewed 59 s ago"):
            second.acquire()
        first.renew()
        clock.now += 61  # 61 s without a renewal: stale
        second.acquire()
        second._stop.set()
        assert storage.list("jobs/j.lease.") == [lease_key("j", 0), lease_key("j", 1)]
        first.renew()  # the old holder's next renewal sees the newer generation
        with pytest.raises(LeaseLost, match=r"job 'j' was taken over by run r2"):
            first.check()
        first.release()  # a newer generation holds the job: the chain stays for its holder to delete
        assert storage.list("jobs/j.lease.") == [lease_key("j", 0), lease_key("j", 1)]
    finally:
        second.release()
    assert storage.list("jobs/j.lease.") == []


def test_of_drivers_racing_for_a_lease_exactly_one_gets_it() -> None:
    storage, clock = MemoryStorage(f"lease-{uuid.uuid4().hex}"), Clock()
    leases = [lease(storage, f"r{n}", clock) for n in range(6)]
    barrier, won, refused = threading.Barrier(6), [], []

    def take(held: Lease) -> None:
        barrier.wait()
        try:
            held.acquire()
            won.append(held)
        except JobBusy:
            refused.append(held)

    threads = [threading.Thread(target=take, args=(held,)) for held in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(refused)) == (1, 5)
    won[0].release()


# -- two fits on one Trainer ------------------------------------------------------------------------


#: Set by the first loss a blocking fit computes; the fit goes on once RELEASE is set. (Module-level: the
#: stage definitions, pickled, refer to them by name, so the thread backend's workers share them.)
ENTERED, RELEASE = threading.Event(), threading.Event()


def blocking_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ENTERED.set()
    RELEASE.wait(300)
    return nn.functional.mse_loss(output, target)


def test_a_second_concurrent_fit_on_one_trainer_is_refused() -> None:
    entered, release = ENTERED, RELEASE
    entered.clear()
    release.clear()
    busy = Trainer(mlp7(), blocking_loss, sgd_momentum, PLAN, backend="thread",
                   storage=f"memory://fit-lock-{uuid.uuid4().hex}")
    batches = regression_batches(3, 8)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(busy.fit(batches, progress=False)))
    first.start()
    try:
        assert entered.wait(300)
        with pytest.raises(FitInProgress, match="already running a fit"):
            busy.fit(batches, progress=False)
    finally:
        release.set()
        first.join(300)
    assert len(results) == 1 and len(results[0]) == 3
    assert_same_parameters(busy.model, reference(batches))  # only the first fit trained


class ByUrl(MemoryStorage):
    """A memory storage a test registers under its own scheme (``<scheme>://<name>``), as a plugin is."""

    @classmethod
    def from_url(cls, url: str) -> MemoryStorage:
        storage = cls(url.split("://", 1)[1])
        storage.url = url
        return storage


# -- altered bytes in storage -----------------------------------------------------------------------

#: Per storage name: (a part of the keys to alter, how), for the first object whose key has it.
ALTER: dict[str, tuple[str, str]] = {}


class AltersOnce(ByUrl):
    """``alter://<name>``: memory storage that alters the first object whose key contains ``ALTER[name][0]``
    as it lands, keeping its header intact: what someone who can write to the bucket could do."""

    def put(self, key: str, data: bytes) -> None:
        part, how = ALTER.get(self.name, ("", ""))
        if part and part in key:
            del ALTER[self.name]
            if how == "forge-loss":  # a metrics report with another loss, as valid JSON
                body = json.loads(data[:-32])
                body["loss"] = 123.0
                data = json.dumps(body).encode() + data[-32:]
            else:  # one byte of the tensor data flipped; header and length unchanged
                altered = bytearray(data)
                altered[-40] ^= 0x55
                data = bytes(altered)
        super().put(key, data)


@pytest.mark.parametrize(("part", "how"), [("/act.s1.", "flip"), ("/target.", "flip"), ("/input.", "flip"),
                                           ("/grad.s0.", "flip"), ("/metrics.", "forge-loss")])
def test_an_object_altered_in_storage_is_refused_and_the_iteration_retried(part: str, how: str) -> None:
    register("alter", AltersOnce, clobber=True)
    name = f"alter-{uuid.uuid4().hex}"
    ALTER[name] = (part, how)
    batches = regression_batches(4, 8)
    losses: list[float] = []
    expected = plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, batches, losses=losses)
    job = trainer(f"alter://{name}")
    history = job.fit(batches, progress=False, max_retries=1, checkpoint_every=1)
    assert name not in ALTER  # it was altered
    assert job.keys.attempt == 1  # the attempt that read it failed, and the iteration was run again
    assert_same_parameters(job.model, expected)
    assert history.losses == pytest.approx(losses, rel=1e-5)  # no forged loss in the history


def test_without_a_retry_the_altered_object_is_named() -> None:
    register("alter", AltersOnce, clobber=True)
    name = f"alter-{uuid.uuid4().hex}"
    ALTER[name] = ("/act.s1.", "flip")
    job = trainer(f"alter://{name}")
    with pytest.raises(WorkerFailed, match=r"IntegrityError: object '[^']*/act\.s1\.[^']*' failed its authentication"):
        job.fit(regression_batches(2, 8), progress=False)


def test_a_corrupt_checkpoint_a_retry_restores_falls_back_to_the_one_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in iteration 5 rolls back to the checkpoint before 4, which was altered in storage: the
    resuming worker refuses it (CheckpointCorrupt) and the job falls back to the one before 2, kept."""
    from tests.test_trainer_recovery import MICRO_BATCHES, PLAN8, FailsOnce, assert_same_as_reference, model_with

    register("alter", AltersOnce, clobber=True)
    name = f"alter-{uuid.uuid4().hex}"
    ALTER[name] = ("/checkpoint/i00000004/s1", "flip")  # stage 1's checkpoint before iteration 4
    batches = regression_batches(6, 8)
    fault = FailsOnce(tmp_path / "raised", after=5 * MICRO_BATCHES)  # in iteration 5
    job = Trainer(model_with(fault), nn.functional.mse_loss, sgd_momentum, PLAN8, backend="thread",
                  storage=f"alter://{name}")
    with caplog.at_level("WARNING", logger="funcpipe"):
        history = job.fit(batches, progress=False, checkpoint_every=2, max_retries=2)
    assert (tmp_path / "raised").exists() and name not in ALTER
    messages = [r.getMessage() for r in caplog.records]
    assert any("CheckpointCorrupt: checkpoint" in m and "i00000004/s1" in m and "iteration 2" in m
               for m in messages), messages
    assert len(history) == 6
    assert_same_as_reference(job.model, reference(batches))


# -- errors named, and retried or not -----------------------------------------------------------------


class FlakyPlugin(ByUrl):
    """``flaky://<name>``: a plugin whose library raises a raw OSError on its first put of an activation."""

    failed: ClassVar[set[str]] = set()

    def put(self, key: str, data: bytes) -> None:
        if "/act." in key and self.name not in FlakyPlugin.failed:
            FlakyPlugin.failed.add(self.name)
            raise OSError(104, "Connection reset by peer")
        super().put(key, data)


def test_a_raw_exception_of_a_storage_plugin_is_a_storage_failure_and_retried() -> None:
    register("flaky", FlakyPlugin, clobber=True)
    name = f"flaky-{uuid.uuid4().hex}"
    batches = regression_batches(3, 8)
    job = trainer(f"flaky://{name}")
    job.fit(batches, progress=False, max_retries=2)
    assert name in FlakyPlugin.failed and job.keys.attempt == 1
    assert_same_parameters(job.model, reference(batches))
    with pytest.raises(StorageFailure, match=r"put of 'x/act\.s1': ConnectionResetError: \[Errno 104\]") as info:
        FlakyPlugin.failed.discard(name)
        open_storage(f"flaky://{name}").put("x/act.s1", b"")
    assert isinstance(info.value.__cause__, OSError)


def test_a_wrong_target_dtype_is_a_user_error_and_not_retried() -> None:
    calls = {"n": 0}

    def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        # Class indices must be int64; wrong only when it trains (the driver's check before launch runs
        # without gradients), so the workers meet it.
        return nn.functional.cross_entropy(output, target.to(torch.int32) if torch.is_grad_enabled() else target)

    job = Trainer(mlp7(), cross_entropy, sgd_momentum, PLAN, backend="thread",
                  storage=f"memory://user-error-{uuid.uuid4().hex}")
    batches = [(x, torch.zeros(8, dtype=torch.int64)) for x, _ in regression_batches(2, 8)]
    with pytest.raises(WorkerFailed, match=r"UserCodeError: stage 2 replica 0: loss_fn raised RuntimeError") as info:
        job.fit(batches, progress=False, max_retries=3)
    assert info.value.attempts == [] and job.keys.attempt == 1  # one attempt: not retried
    assert "iteration 0, micro-batch 0" in info.value.cause
    assert issubclass(UserCodeError, ValueError)


def test_a_stage_that_returns_a_tuple_is_a_config_error_not_retried() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    model = nn.Sequential(nn.Linear(8, 8), Pair(), nn.Identity(), nn.Linear(8, 3))
    plan = Plan.manual([2, 2], micro_batch_size=2, global_batch_size=8)
    from funcpipe import ConfigError
    from funcpipe.executors.thread import ThreadExecutor
    from tests.helpers import SpyExecutor

    executor = SpyExecutor(ThreadExecutor())
    job = Trainer(model, nn.functional.mse_loss, sgd_momentum, plan, backend=executor,
                  storage=f"memory://tuple-{uuid.uuid4().hex}")
    with pytest.raises(ConfigError, match=r"stage 0's layers returned tuple\(\[0\] \(2, 8\), \[1\] \(2, 8\)\) on "
                                          r"the first micro-batch, but one tensor crosses each cut"):
        job.fit(regression_batches(1, 8), progress=False, max_retries=2)
    assert executor.launched == []  # named before launch, so never retried


# -- every wait of the driver bounded -------------------------------------------------------------------

#: Set to release the puts a BlocksPuts storage holds.
UNBLOCK = threading.Event()


class BlocksPuts(ByUrl):
    """``blocks://<name>``: a store whose puts of the stage definitions hang until UNBLOCK is set."""

    def put(self, key: str, data: bytes) -> None:
        if "/model/" in key:
            UNBLOCK.wait(600)
        super().put(key, data)


def test_the_drivers_own_upload_is_bounded_by_the_timeout() -> None:
    from funcpipe import StorageTimeout
    from funcpipe.executors.thread import ThreadExecutor
    from tests.helpers import SpyExecutor

    register("blocks", BlocksPuts, clobber=True)
    UNBLOCK.clear()
    spy = SpyExecutor(ThreadExecutor())
    job = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend=spy,
                  storage=f"blocks://{uuid.uuid4().hex}", timeout_s=1.0)
    try:
        with pytest.raises(StorageTimeout, match=r"put of '[^']*/model/s0' of [\d,]+ bytes did not finish within 1 s"):
            job.fit(regression_batches(2, 8), progress=False)
    finally:
        UNBLOCK.set()
    assert spy.launched == []
