"""Trainer.fit(stored_data_set, epochs=..., shuffle=..., seed=...): the workers read their micro-batches.

Every run is compared with plain single-process PyTorch fed the same samples
in the order computed here from the documented rule (tests.test_data), an
independent computation.
"""

from __future__ import annotations

import os
import re
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

from funcpipe import ConfigError, Plan, Trainer, data
from funcpipe.executors import get_executor
from funcpipe.storage import MemoryStorage, register
from funcpipe.storage.counting import counter
from tests.helpers import SpyExecutor, assert_same_parameters, mlp7, plain_training, sgd_momentum, skip_net
from tests.test_data import documented_order
from tests.test_trainer_recovery import FailsOnce

PLAN = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
SAMPLES = 30  # 3 full batches an epoch; 6 samples left out of each, a different 6 each epoch


def regression_samples() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(SAMPLES, 8, generator=g), torch.randn(SAMPLES, 3, generator=g)


def ordered_batches(x: Any, y: torch.Tensor, epochs: int, seed: int, batch: int = 8) -> list[Any]:
    out = []
    for epoch in range(epochs):
        order = documented_order(len(y), epoch, seed)
        for j in range(len(y) // batch):
            idx = order[j * batch:(j + 1) * batch]
            inputs = tuple(v[idx] for v in x) if isinstance(x, tuple) else x[idx]
            out.append((inputs, y[idx]))
    return out


def driver_writes(count: dict[str, Any]) -> list[str]:
    return count["keys"]  # type: ignore[no-any-return]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_on_ray_with_replicas_it_trains_as_plain_pytorch_and_the_driver_writes_no_data(tmp_path: Path) -> None:
    x, y = regression_samples()
    base = (tmp_path / "store").as_uri()
    stored = data.upload((x, y), base, global_batch_size=8, shard_bytes=200)
    # The driver's own requests (the workers, in Ray's processes, count into theirs).
    driver = counter("stored-driver")
    puts: list[str] = []
    stop = driver.listen(lambda request: puts.append(request.key) if request.op == "PUT" else None)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="ray",
                      storage=f"counted+{base}?counter=stored-driver")
    try:
        history = trainer.fit(stored, epochs=2, seed=11, progress=False)
    finally:
        stop()
    assert len(history) == 6 and history.iterations_per_epoch == 3
    expected = plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, ordered_batches(x, y, 2, 11))
    assert_same_parameters(trainer.model, expected)
    assert puts and not [key for key in puts if "/input" in key or "/target" in key or key.endswith("/go")]


def test_a_traced_model_with_two_inputs_reads_each_in_its_port() -> None:
    model, _, loss = skip_net()
    g = torch.Generator().manual_seed(4)
    x, scale = torch.randn(24, 6, generator=g), torch.rand(24, 1, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    stored = data.upload(((x, scale), y), "memory://stored-skip", global_batch_size=8)
    plan = Plan.manual([1, 2, 1], micro_batch_size=4, global_batch_size=8)
    def opt(p: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(p, lr=0.1)

    reference = plain_training_star(model, loss, opt, ordered_batches((x, scale), y, 2, 0))
    trainer = Trainer(model, loss, opt, plan, backend="thread", storage="memory://stored-skip")
    trainer.fit(stored, epochs=2, progress=False)
    assert_same_parameters(trainer.model, reference)


def plain_training_star(model: nn.Module, loss: Any, optimizer: Any, batches: list[Any]) -> nn.Module:
    import copy

    model = copy.deepcopy(model)
    opt = optimizer(model.parameters())
    for inputs, y in batches:
        opt.zero_grad()
        loss(model(*inputs), y).backward()
        opt.step()
    return model


def test_a_run_with_a_time_budget_is_gated_per_iteration_and_ends_at_each_boundary() -> None:
    x, y = regression_samples()
    stored = data.upload((x, y), "memory://stored-gated", global_batch_size=8)
    executor = SpyExecutor(get_executor("thread"))
    executor.call_budget_s = 1e-9  # every run stops after its one iteration (each run makes one)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend=executor,
                      storage="memory://stored-gated")
    history = trainer.fit(stored, epochs=2, shuffle=False, progress=False)
    assert len(history) == 6
    assert len(executor.launched) == 6 * 4  # six runs of four workers: the go objects let one iteration in each
    expected = plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum,
                              [(x[j * 8:(j + 1) * 8], y[j * 8:(j + 1) * 8]) for _ in range(2) for j in range(3)])
    assert_same_parameters(trainer.model, expected)
    assert not [k for k in trainer.storage.list(trainer.keys.job + "/") if k.endswith("/go")]


class GateWatch(MemoryStorage):
    """Memory storage that holds the driver's put of each go object (after the first iteration's) until
    stage 0 has looked for it or has sent an activation of that iteration, and records which came first."""

    cond: ClassVar[threading.Condition] = threading.Condition()
    looked: ClassVar[set[int]] = set()
    sent: ClassVar[set[int]] = set()
    first_seen: ClassVar[dict[int, str]] = {}

    @classmethod
    def from_url(cls, url: str) -> GateWatch:
        storage = cls(url.removeprefix("gatewatch://"))
        storage.url = url
        return storage

    @staticmethod
    def _iteration(key: str) -> int:
        return int(re.search(r"/i(\d{8})/", key).group(1))  # type: ignore[union-attr]

    def _note(self, events: set[int], i: int, what: str) -> None:
        with self.cond:
            events.add(i)
            self.first_seen.setdefault(i, what)
            self.cond.notify_all()

    def get_if_exists(self, key: str) -> bytes | None:
        if key.endswith("/go"):
            self._note(self.looked, self._iteration(key), "looked for go")
        return super().get_if_exists(key)

    def put(self, key: str, data: bytes) -> None:
        if "/act." in key:
            self._note(self.sent, self._iteration(key), "sent an activation")
        elif key.endswith("/go") and self._iteration(key) > 0:
            i = self._iteration(key)
            with self.cond:  # a bound only so that a broken gate fails instead of hanging
                self.cond.wait_for(lambda: i in self.looked or i in self.sent, timeout=120)
        super().put(key, data)


def test_stage_0_begins_an_iteration_of_a_gated_run_only_after_its_go_object() -> None:
    register("gatewatch", GateWatch, clobber=True)
    x, y = regression_samples()
    stored = data.upload((x, y), "gatewatch://gate", global_batch_size=8)
    executor = SpyExecutor(get_executor("thread"))
    executor.call_budget_s = 1e9  # a budget that never ends a run: the driver gates each iteration
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend=executor,
                      storage="gatewatch://gate")
    trainer.fit(stored, epochs=2, progress=False)
    assert len(executor.launched) == 4  # one run
    assert GateWatch.first_seen == {i: "looked for go" for i in range(6)}


def test_a_failed_worker_is_retried_on_the_same_samples(tmp_path: Path) -> None:
    x, y = regression_samples()
    stored = data.upload((x, y), "memory://stored-retry", global_batch_size=8)
    plan = Plan.manual([2, 3, 3], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    fault = FailsOnce(tmp_path / "raised", after=4 * 4)  # in iteration 4 (4 micro-batches per iteration)
    trainer = Trainer(nn.Sequential(*mlp7(), fault), nn.functional.mse_loss, sgd_momentum, plan, backend="thread",
                      storage="memory://stored-retry")
    trainer.fit(stored, epochs=2, seed=2, progress=False, max_retries=1, checkpoint_every=2)
    assert (tmp_path / "raised").exists()
    expected = plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, ordered_batches(x, y, 2, 2))
    assert_same_parameters(nn.Sequential(*list(trainer.model)[:7]), expected)


def test_a_second_fit_starts_its_data_at_its_own_first_epoch() -> None:
    x, y = regression_samples()
    stored = data.upload((x, y), "memory://stored-twice", global_batch_size=8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread",
                      storage="memory://stored-twice")
    trainer.fit(stored, iterations=2, seed=1, progress=False)
    trainer.fit(stored, epochs=1, seed=2, progress=False)
    batches = ordered_batches(x, y, 1, 1)[:2] + ordered_batches(x, y, 1, 2)
    assert_same_parameters(trainer.model, plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, batches))


def spy_trainer(plan: Plan = PLAN, model: nn.Module | None = None) -> tuple[Trainer, SpyExecutor]:
    executor = SpyExecutor(get_executor("thread"))
    return Trainer(model or mlp7(), nn.functional.mse_loss, sgd_momentum, plan, backend=executor,
                   storage="memory://stored-refused"), executor


def test_a_data_set_of_another_global_batch_is_refused_before_launch() -> None:
    x, y = regression_samples()
    stored = data.upload((x, y), "memory://stored-refused", global_batch_size=10)
    trainer, executor = spy_trainer()
    with pytest.raises(ConfigError, match=r"global batch of 10, the plan's is 8.*global_batch_size=8"):
        trainer.fit(stored, progress=False)
    assert executor.launched == []


def test_inputs_of_another_dtype_than_the_model_are_refused_before_launch() -> None:
    x, y = regression_samples()
    stored = data.upload((x.double(), y), "memory://stored-refused", global_batch_size=8)
    trainer, executor = spy_trainer()
    with pytest.raises(ConfigError, match=r"torch\.float64.*float32"):
        trainer.fit(stored, progress=False)
    assert executor.launched == []


def test_a_data_set_larger_than_half_the_function_memory_is_refused() -> None:
    x = torch.zeros(1024, 1024)  # 4 MB of inputs
    stored = data.upload((x, torch.zeros(1024, 3)), "memory://stored-refused", global_batch_size=8)
    plan = Plan.manual([1], micro_batch_size=8, global_batch_size=8, memory_mb=[6])
    trainer, executor = spy_trainer(plan, nn.Sequential(nn.Linear(1024, 3)))
    with pytest.raises(ConfigError, match=r"inputs are 4.0 MB, more than half of stage 0's function memory \(6 MB"):
        trainer.fit(stored, progress=False)
    assert executor.launched == []


@pytest.mark.parametrize(("kwargs", "match"), [({"shuffle": True}, "order a stored data set"),
                                               ({"seed": 1}, "order a stored data set")])
def test_order_options_for_fed_data_are_refused(kwargs: dict[str, Any], match: str) -> None:
    trainer, executor = spy_trainer()
    x, y = regression_samples()
    with pytest.raises(ConfigError, match=match):
        trainer.fit([(x[:8], y[:8])], progress=False, **kwargs)
    assert executor.launched == []


@pytest.mark.parametrize(("kwargs", "match"), [({"shuffle": 1}, "shuffle must be True or False"),
                                               ({"seed": "a"}, "seed must be an int")])
def test_bad_order_options_are_named(kwargs: dict[str, Any], match: str) -> None:
    x, y = regression_samples()
    stored = data.upload((x, y), "memory://stored-refused", global_batch_size=8)
    trainer, _ = spy_trainer()
    with pytest.raises(ConfigError, match=match):
        trainer.fit(stored, progress=False, **kwargs)


KILLED_DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from torch import nn
    from funcpipe import Plan, Trainer, data
    from tests.helpers import mlp7, sgd_momentum
    from tests.test_trainer_recovery import FailsOnce

    url, marker = sys.argv[1], Path(sys.argv[2])
    plan = Plan.manual([2, 3, 3], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    # The thread backend runs the workers in this process: the fault kills the driver with them.
    model = nn.Sequential(*mlp7(), FailsOnce(marker, after=4 * 4, kill=True))  # in iteration 4
    trainer = Trainer(model, nn.functional.mse_loss, sgd_momentum, plan, backend="thread", storage=url,
                      job="killed-stored")
    trainer.fit(data.open_stored(url, "samples"), epochs=2, seed=3, progress=False, checkpoint_every=2)
""")


def test_a_driver_killed_mid_fit_is_resumed_on_the_same_samples(tmp_path: Path) -> None:
    x, y = regression_samples()
    url = (tmp_path / "store").as_uri()
    stored = data.upload((x, y), url, global_batch_size=8, name="samples")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLED_DRIVER, url, str(tmp_path / "killed")], env=env,
                          capture_output=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    plan = Plan.manual([2, 3, 3], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    model = nn.Sequential(*mlp7(), FailsOnce(tmp_path / "killed", after=0))  # its marker is there: no fault
    trainer = Trainer(model, nn.functional.mse_loss, sgd_momentum, plan, backend="thread", storage=url,
                      job="killed-stored")
    history = trainer.fit(stored, epochs=2, seed=3, progress=False, checkpoint_every=2, resume=True)
    assert len(history) == 4  # from the checkpoint before iteration 2, the last the driver saw complete
    expected = plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, ordered_batches(x, y, 2, 3))
    assert_same_parameters(nn.Sequential(*list(trainer.model)[:7]), expected)
