"""Trainer.fit(max_retries=..., checkpoint_every=..., resume=...): faults survived, nothing lost.

Every recovered run is compared with plain single-process PyTorch on the same
batches (tests.helpers.plain_training), an independent computation.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from funcpipe import ConfigError, Plan, Trainer, WorkerFailed
from funcpipe.errors import StorageError
from funcpipe.manifest import JobManifest, manifest_key
from funcpipe.storage import MemoryStorage, register
from tests.helpers import assert_same_parameters, mlp7, plain_training, regression_batches, sgd_momentum

PLAN = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
#: PLAN for mlp7 with one more layer at the end (a fault), in the last stage.
PLAN8 = Plan.manual([2, 3, 3], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
MICRO_BATCHES = 4  # per iteration, all through the last stage's one replica
ITERATIONS = 6


class FailsOnce(nn.Module):
    """Identity, except that the first worker reaching its ``after``-th forward call fails — once per
    marker file, whichever process it runs in — by raising or by killing its own process."""

    def __init__(self, marker: Path, after: int, *, kill: bool = False) -> None:
        super().__init__()
        self.marker = str(marker)
        self.after = after
        self.kill = kill
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return x
            os.close(fd)
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected fault")
        return x


def model_with(fault: nn.Module) -> nn.Sequential:
    """mlp7 with ``fault`` appended: in the last stage of PLAN8.

    When the last stage begins iteration ``p``, replica 0 of every stage has
    begun it (micro-batch 0 passes through each), so each has written its
    checkpoint before ``p`` if one is due: a fault there rolls back to ``p``
    deterministically.
    """
    return nn.Sequential(*mlp7(), fault)


def reference(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    return plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, batches)


def assert_same_as_reference(model: nn.Sequential, expected: nn.Module) -> None:
    without_fault = nn.Sequential(*(layer for layer in model if not isinstance(layer, FailsOnce)))
    assert_same_parameters(without_fault, expected)


def rollbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rolling back" in r.getMessage()]


@pytest.mark.parametrize("backend", ["thread", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_stage_that_raises_once_is_retried_from_the_last_checkpoint(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    batches = regression_batches(ITERATIONS, 8)
    fault = FailsOnce(tmp_path / "raised", after=3 * MICRO_BATCHES)  # in iteration 3
    trainer = Trainer(model_with(fault), nn.functional.mse_loss, sgd_momentum, PLAN8, backend=backend,
                      storage=None if backend == "ray" else "memory://raises-once")
    with caplog.at_level(logging.WARNING, logger="funcpipe.trainer"):
        history = trainer.fit(batches, progress=False, max_retries=1, checkpoint_every=2)
    assert (tmp_path / "raised").exists()  # the fault did happen
    assert rollbacks(caplog) == [
        "attempt 1 of 2 failed (stage 2 replica 0 failed: RuntimeError: injected fault); "
        "rolling back to iteration 2 and running again"
    ]
    assert len(history) == ITERATIONS
    assert_same_as_reference(trainer.model, reference(batches))


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_a_ray_worker_process_killed_mid_iteration_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batches = regression_batches(ITERATIONS, 8)
    fault = FailsOnce(tmp_path / "killed", after=4 * MICRO_BATCHES + 1, kill=True)  # in iteration 4
    trainer = Trainer(model_with(fault), nn.functional.mse_loss, sgd_momentum, PLAN8)
    with caplog.at_level(logging.WARNING, logger="funcpipe.trainer"):
        history = trainer.fit(batches, progress=False, max_retries=2, checkpoint_every=2)
    assert (tmp_path / "killed").exists()
    (message,) = rollbacks(caplog)
    assert "rolling back to iteration 4" in message
    assert len(history) == ITERATIONS
    assert_same_as_reference(trainer.model, reference(batches))


class FailingStorage(MemoryStorage):
    """Memory storage whose first ``fail`` PUTs of iteration 3's objects raise, as a store's 503 would."""

    failures: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> FailingStorage:
        name = url.removeprefix("failing://")
        storage = cls(name)
        storage.url = url
        return storage

    def put(self, key: str, data: bytes) -> None:
        if "/i00000003/" in key:
            with self.lock:
                left = self.failures.get(self.name, 0)
                if left:
                    self.failures[self.name] = left - 1
            if left:
                raise StorageError(f"injected: PUT of {key} failed: HTTP 503 SlowDown")
        super().put(key, data)


def test_a_storage_failing_its_first_requests_is_survived() -> None:
    register("failing", FailingStorage, clobber=True)
    FailingStorage.failures["first-two"] = 2
    batches = regression_batches(ITERATIONS, 8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread",
                      storage="failing://first-two")
    history = trainer.fit(batches, progress=False, max_retries=2, checkpoint_every=2)
    assert FailingStorage.failures["first-two"] == 0  # both faults were injected
    assert len(history) == ITERATIONS
    assert_same_parameters(trainer.model, reference(batches))


def test_after_max_retries_the_error_lists_every_attempt() -> None:
    class AlwaysFails(nn.Module):
        """Fails whenever it trains (the driver's check before launch runs it without gradients)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                raise RuntimeError("always")
            return x

    model = nn.Sequential(*mlp7(), AlwaysFails())
    trainer = Trainer(model, nn.functional.mse_loss, sgd_momentum, PLAN8, backend="thread",
                      storage="memory://always-fails")
    with pytest.raises(WorkerFailed) as info:
        trainer.fit(regression_batches(2, 8), progress=False, max_retries=2)
    assert len(info.value.attempts) == 3
    assert "3 attempts failed (max_retries=2)" in str(info.value)
    for n in (1, 2, 3):
        assert f"attempt {n}: stage 2 replica 0 failed: RuntimeError: always" in str(info.value)
    assert info.value.cause.count("RuntimeError: always") == 3


def test_a_fault_of_the_users_code_is_not_retried() -> None:
    from funcpipe.executors.thread import ThreadExecutor

    class Counting(ThreadExecutor):
        launched = 0

        def launch(self, *args: Any, **kwargs: Any) -> Any:
            Counting.launched += 1
            return super().launch(*args, **kwargs)

    def non_scalar(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Only when it trains: the driver's check before launch calls it without gradients.
        loss = (output - target) ** 2
        return loss if torch.is_grad_enabled() else loss.mean()

    trainer = Trainer(mlp7(), non_scalar, sgd_momentum, PLAN, backend=Counting(), storage="memory://user-fault")
    with pytest.raises(WorkerFailed, match="ConfigError: loss_fn returned") as info:
        trainer.fit(regression_batches(2, 8), progress=False, max_retries=3)
    assert info.value.attempts == []
    assert Counting.launched == 4  # the four workers of one attempt, no second attempt


def test_a_failed_fit_leaves_the_model_at_the_last_complete_checkpoint(tmp_path: Path) -> None:
    batches = regression_batches(ITERATIONS, 8)
    fault = FailsOnce(tmp_path / "raised", after=4 * MICRO_BATCHES)  # in iteration 4
    trainer = Trainer(model_with(fault), nn.functional.mse_loss, sgd_momentum, PLAN8, backend="thread",
                      storage="memory://keeps-work")
    with pytest.raises(WorkerFailed):
        trainer.fit(batches, progress=False, checkpoint_every=2)  # no retry: fails in iteration 4
    assert_same_as_reference(trainer.model, reference(batches[:4]))
    # The next fit continues from there.
    history = trainer.fit(batches[4:], progress=False)
    assert len(history) == 2
    assert_same_as_reference(trainer.model, reference(batches))


def test_checkpoints_are_kept_only_for_the_two_latest_complete_points() -> None:
    storage = MemoryStorage("checkpoint-count")
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread",
                      storage="memory://checkpoint-count", job="counted")
    trainer.fit(regression_batches(5, 8), progress=False, checkpoint_every=2)
    run = trainer.keys.run
    assert sorted(k for k in storage.list("counted/") if "/checkpoint/" in k) == [
        f"counted/{run}/a0/checkpoint/i{i:08d}/s{s}" for i in (4, 5) for s in range(3)
    ]
    manifest = JobManifest.decode(storage.get(manifest_key("counted")), manifest_key("counted"))
    assert (manifest.restore_iteration, manifest.finished, manifest.fit_total) == (5, True, 5)


# -- the driver itself dies ------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    from funcpipe import Plan, Trainer
    from tests.helpers import mlp7, regression_batches, sgd_momentum

    batches = regression_batches(8, 8)

    class DiesAtBatch6:
        def __len__(self):
            return len(batches)
        def __iter__(self):
            for i, batch in enumerate(batches):
                if i == 6:  # the driver asks for batch 6 once it has seen iteration 3 finish
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch

    plan = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, plan, backend="thread",
                      storage=sys.argv[1], job="killed-driver")
    trainer.fit(DiesAtBatch6(), progress=False, checkpoint_every=2)
""")


def run_driver_until_killed(storage_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", DRIVER, storage_url], env=env, capture_output=True,
                          timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def test_a_driver_killed_mid_training_is_resumed_from_storage(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    run_driver_until_killed(url)
    batches = regression_batches(8, 8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage=url)
    history = trainer.fit(batches, progress=False, resume=True)  # finds the job by its manifest
    assert trainer.keys.job == "killed-driver"
    assert len(history) == 6  # resumed from the checkpoint before iteration 2, not from scratch
    assert_same_parameters(trainer.model, reference(batches))
    # Resuming the finished job trains nothing and loads its final weights.
    again = Trainer(mlp7(seed=5), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage=url,
                    job="killed-driver")
    assert len(again.fit(batches, progress=False, resume=True)) == 0
    assert_same_parameters(again.model, reference(batches))


def test_resume_refuses_another_plan_or_another_length(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    run_driver_until_killed(url)
    other = Plan.manual([2, 3, 2], replicas=[1, 1, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, other, backend="thread", storage=url)
    with pytest.raises(ConfigError, match="resume with the same model and plan"):
        trainer.fit(regression_batches(8, 8), progress=False, resume=True)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage=url)
    with pytest.raises(ConfigError, match="interrupted in a fit of 8 iterations, but this fit asks for 9"):
        trainer.fit(regression_batches(9, 8), progress=False, resume=True)


def test_resume_with_nothing_to_resume_names_the_storage(tmp_path: Path) -> None:
    url = (tmp_path / "empty").as_uri()
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage=url)
    with pytest.raises(ConfigError, match=r"no unfinished job to resume in .*this storage holds no funcpipe job"):
        trainer.fit(regression_batches(2, 8), progress=False, resume=True)


@pytest.mark.parametrize("name", ["", "jobs", "a/b", "-lead", "x" * 65, "sp ace"])
def test_a_job_name_that_is_not_a_key_prefix_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="is not usable as a storage prefix"):
        Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage="memory://n", job=name)


@pytest.mark.parametrize(("option", "value"), [("max_retries", -1), ("checkpoint_every", -2), ("max_retries", 1.5)])
def test_bad_recovery_options_are_named(option: str, value: Any) -> None:
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage="memory://o")
    with pytest.raises(ConfigError, match=f"{option} must be an integer >= "):
        trainer.fit(regression_batches(1, 8), progress=False, **{option: value})



def test_clean_deletes_what_the_job_keeps_and_a_later_fit_says_so() -> None:
    storage = MemoryStorage("cleaned")
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread",
                      storage="memory://cleaned", job="cleaned")
    batches = regression_batches(2, 8)
    trainer.fit(batches[:1], progress=False)
    trainer.clean(checkpoints=False)  # only the model blobs and the manifest go: fit can continue
    assert [k for k in storage.list("") if "/checkpoint/" not in k] == []
    trainer.fit(batches[1:], progress=False)
    assert_same_parameters(trainer.model, reference(batches))
    trainer.clean()
    assert storage.list("") == []
    with pytest.raises(ConfigError, match=r"job 'cleaned' was cleaned .* after 2 iterations"):
        trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, reference(batches))  # the trained weights stay with the model
