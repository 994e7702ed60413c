"""Issue 16, item 3: non-finite training stops (``fit(on_nonfinite=...)``), and what cannot train is a
ConfigError before any worker is launched (an optimizer factory that makes no optimizer, no data, a
timeout that is not a finite positive number).

Every result is compared with plain single-process PyTorch on the same batches (tests.helpers.plain_training).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from funcpipe import ConfigError, NonFiniteTraining, Plan, Trainer, WorkerFailed
from funcpipe.errors import UserCodeError
from funcpipe.executors import Executor
from funcpipe.executors.thread import ThreadExecutor
from tests.helpers import SpyExecutor, assert_same_parameters, mlp7, plain_training, regression_batches

PLAN = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
#: Plain SGD, no momentum: a skipped step leaves no state behind (pickled by reference, for Ray).
SGD = functools.partial(torch.optim.SGD, lr=0.05)
NAN_ITERATION = 5
NAN_SAMPLE = 5  # of the global batch: micro-batch 2 (micro-batches of 2 samples)


def batches_with_nan(count: int, iteration: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = regression_batches(count, PLAN.global_batch_size)
    x, y = batches[iteration]
    x = x.clone()
    x[NAN_SAMPLE, 3] = float("nan")
    batches[iteration] = (x, y)
    return batches


def spy_trainer(model: nn.Sequential, storage: str, optimizer: object = SGD, plan: Plan = PLAN,
                backend: str = "thread") -> tuple[Trainer, SpyExecutor]:
    executor = SpyExecutor(ThreadExecutor() if backend == "thread" else _ray())
    trainer = Trainer(model, nn.functional.mse_loss, optimizer, plan, backend=executor,  # type: ignore[arg-type]
                      storage=storage)
    return trainer, executor


def _ray() -> Executor:
    from funcpipe.backends import Ray

    return Ray()


def assert_all_finite(model: nn.Module) -> None:
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name


# -- on_nonfinite="raise" -------------------------------------------------------------------------


def raise_on_nan_inputs(backend: str, storage: str) -> None:
    model = mlp7()
    batches = batches_with_nan(8, NAN_ITERATION)
    # The last checkpoint before iteration 5 is the one before 4 (checkpoint_every=2).
    expected = plain_training(model, nn.functional.mse_loss, SGD, batches[:4])
    trainer, executor = spy_trainer(model, storage, backend=backend)
    with pytest.raises(NonFiniteTraining) as info:
        trainer.fit(batches, progress=False, checkpoint_every=2, max_retries=3)
    message = str(info.value)
    assert message.startswith(f"stage 2 replica 0: the loss of iteration {NAN_ITERATION}, micro-batch 2, is nan")
    assert "hint: lower the learning rate, check the inputs for NaN, clip the gradients" in message
    assert 'on_nonfinite="skip"' in message
    # Not retried (the same batch fails again): one launch of every worker.
    assert len(executor.launched) == PLAN.num_workers
    cause = info.value.__cause__
    assert isinstance(cause, WorkerFailed) and cause.worker == "stage 2 replica 0"
    assert "NonFiniteTraining" in cause.remote_traceback
    assert_all_finite(trainer.model)
    assert_same_parameters(trainer.model, expected)


def test_nan_inputs_raise_naming_the_iteration_and_leave_the_last_checkpoint() -> None:
    raise_on_nan_inputs("thread", "memory://nan-inputs")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_nan_inputs_raise_naming_the_iteration_and_leave_the_last_checkpoint(tmp_path: Path) -> None:
    raise_on_nan_inputs("ray", tmp_path.as_uri())


def test_a_diverging_run_raises() -> None:
    huge = functools.partial(torch.optim.SGD, lr=1e12)
    trainer, executor = spy_trainer(mlp7(), "memory://diverging", optimizer=huge)
    diverged = r"stage \d replica \d: the (loss|gradient) of iteration \d+.*not finite"
    with pytest.raises(NonFiniteTraining, match=diverged):
        trainer.fit(regression_batches(30, 8), progress=False, max_retries=2)
    assert len(executor.launched) == PLAN.num_workers
    assert_all_finite(trainer.model)


class SqrtOf(nn.Module):
    """Adds ``sqrt(w)`` with ``w = 0``: a finite output, an infinite gradient of ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sqrt(self.w)


@pytest.mark.parametrize(("layer", "stage", "summed"), [(1, 0, ""), (3, 1, ", summed over the stage's 2 replicas,")],
                         ids=["one-replica", "two-replicas"])
def test_a_gradient_that_is_not_finite_raises_naming_the_parameter(layer: int, stage: int, summed: str) -> None:
    model = mlp7()
    model[layer] = SqrtOf()  # in place of a Tanh
    initial = copy.deepcopy(model)
    trainer, executor = spy_trainer(model, f"memory://inf-gradient-{stage}")
    with pytest.raises(NonFiniteTraining) as info:
        trainer.fit(regression_batches(3, 8), progress=False, max_retries=1)
    # The micro-batches' (and replicas') infinite gradients of w may differ in sign: their sum may be NaN.
    # Every replica of the stage sees the same sum: whichever raises first is named.
    assert re.match(
        rf"stage {stage} replica \d: the gradient of iteration 0{summed} is not finite \((infinite|NaN) in "
        rf"parameter '{layer}\.w'\); hint:", str(info.value)
    )
    assert len(executor.launched) == PLAN.num_workers
    assert_same_parameters(trainer.model, initial)  # no checkpoint was complete: the initial weights


# -- on_nonfinite="skip" and "ignore" -------------------------------------------------------------


def test_skip_equals_plain_pytorch_that_skips_the_nan_batch(caplog: pytest.LogCaptureFixture) -> None:
    model = mlp7()
    batches = batches_with_nan(6, 2)
    expected_losses: list[float] = []
    expected = plain_training(model, nn.functional.mse_loss, SGD, batches[:2] + batches[3:], losses=expected_losses)
    trainer, _ = spy_trainer(model, "memory://skip")
    with caplog.at_level(logging.WARNING, logger="funcpipe.worker"):
        history = trainer.fit(batches, progress=False, on_nonfinite="skip")
    assert_same_parameters(trainer.model, expected)
    assert math.isnan(history.losses[2])
    torch.testing.assert_close(history.losses[:2] + history.losses[3:], expected_losses, rtol=1e-4, atol=1e-6)
    skipped = [r.getMessage() for r in caplog.records if "skipping the stage's optimizer step" in r.getMessage()]
    # A NaN loss makes every upstream gradient NaN: every worker skips, once, iteration 2.
    assert sorted(m.split(":")[0] for m in skipped) == [
        "stage 0 replica 0", "stage 1 replica 0", "stage 1 replica 1", "stage 2 replica 0"]
    assert all("iteration 2" in m for m in skipped)


def test_ignore_returns_normally_with_nan_losses() -> None:
    trainer, _ = spy_trainer(mlp7(), "memory://ignore")
    history = trainer.fit(batches_with_nan(4, 1), progress=False, on_nonfinite="ignore")
    assert len(history) == 4
    assert math.isfinite(history.losses[0]) and all(math.isnan(loss) for loss in history.losses[1:])


def test_an_unknown_policy_is_refused_before_launch() -> None:
    trainer, executor = spy_trainer(mlp7(), "memory://bad-policy")
    with pytest.raises(ConfigError, match=r"on_nonfinite must be one of 'raise', 'skip', 'ignore', got 'warn'"):
        trainer.fit(regression_batches(1, 8), progress=False, on_nonfinite="warn")
    assert executor.launched == []


# -- ConfigError before launch ------------------------------------------------------------------


def forgot_to_return(params: object) -> None:
    torch.optim.SGD(params, lr=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", [lambda params: None, forgot_to_return], ids=["none", "forgot-to-return"])
def test_an_optimizer_factory_that_returns_no_optimizer(factory: object) -> None:
    executor = SpyExecutor(ThreadExecutor())
    with pytest.raises(ConfigError, match=(
        r"the optimizer factory returned None \(a NoneType\), not a torch.optim.Optimizer, for the parameters of "
        r"stage 0; .*hint: optimizer=lambda params: torch.optim.SGD\(params, lr=0.1\)"
    )):
        Trainer(mlp7(), nn.functional.mse_loss, factory, PLAN, backend=executor)  # type: ignore[arg-type]
    assert executor.launched == []


def test_an_optimizer_factory_that_raises() -> None:
    executor = SpyExecutor(ThreadExecutor())
    with pytest.raises(UserCodeError, match=(
        r"the optimizer factory raised ValueError: Invalid learning rate: -1 when called on the parameters of "
        r"stage 0 \(layers \[0, 1\]\); hint: optimizer=lambda params"
    )) as info:
        Trainer(mlp7(), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=-1), PLAN, backend=executor)
    assert isinstance(info.value, ConfigError) and isinstance(info.value.__cause__, ValueError)
    assert executor.launched == []


def test_a_stage_without_parameters_does_not_call_the_factory() -> None:
    # Stage 1 is a Tanh alone: SGD would refuse its empty parameter list, and its worker makes no optimizer.
    plan = Plan.manual([1, 1, 5], micro_batch_size=2, global_batch_size=8)
    model = mlp7()
    batches = regression_batches(2, 8)
    expected = plain_training(model, nn.functional.mse_loss, SGD, batches)
    trainer = Trainer(model, nn.functional.mse_loss, SGD, plan, backend="thread", storage="memory://no-params")
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, expected)


def test_the_factory_check_leaves_the_model_as_it_was() -> None:
    model = mlp7()
    before = copy.deepcopy(model)
    Trainer(model, nn.functional.mse_loss, SGD, PLAN, backend="thread", storage="memory://factory-check")
    assert_same_parameters(model, before)


def test_no_data_is_refused_before_launch() -> None:
    trainer, executor = spy_trainer(mlp7(), "memory://empty-list")
    with pytest.raises(ConfigError, match=(
        r"data is a list of length 0: it yields no batch, so there is nothing to train; the plan's global batch "
        r"is 8 samples; hint: pass at least one batch"
    )):
        trainer.fit([], progress=False)
    assert executor.launched == []


def test_an_empty_drop_last_data_loader_is_refused_before_launch() -> None:
    trainer, executor = spy_trainer(mlp7(), "memory://empty-loader")
    loader = DataLoader(TensorDataset(torch.randn(3, 8), torch.randn(3, 3)), batch_size=8, drop_last=True)
    with pytest.raises(ConfigError, match=(
        r"data is a DataLoader of length 0 \(its dataset holds 3 samples, in batches of 8, drop_last=True\): "
        r"it yields no batch.*global batch is 8 samples; hint: .*DataLoader\(dataset, batch_size=8, drop_last=True\)"
    )):
        trainer.fit(loader, progress=False, epochs=2)
    assert executor.launched == []


def test_resuming_a_finished_job_with_no_data_returns_normally(tmp_path: Path) -> None:
    model = mlp7()
    batches = regression_batches(2, 8)
    expected = plain_training(model, nn.functional.mse_loss, SGD, batches)
    first = Trainer(model, nn.functional.mse_loss, SGD, PLAN, backend="thread", storage=tmp_path.as_uri(), job="done")
    first.fit(batches, progress=False)
    executor = SpyExecutor(ThreadExecutor())
    again = Trainer(mlp7(seed=3), nn.functional.mse_loss, SGD, PLAN, backend=executor, storage=tmp_path.as_uri(),
                    job="done")
    assert len(again.fit([], progress=False, resume=True)) == 0
    assert executor.launched == []
    assert_same_parameters(again.model, expected)


@pytest.mark.parametrize("timeout_s", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_a_timeout_that_is_not_finite_and_positive_is_refused(timeout_s: float) -> None:
    executor = SpyExecutor(ThreadExecutor())
    with pytest.raises(ConfigError, match=rf"timeout_s must be > 0 and finite.*\(got {timeout_s}, 1\); hint: "):
        Trainer(mlp7(), nn.functional.mse_loss, SGD, PLAN, backend=executor, storage="memory://bad-timeout",
                timeout_s=timeout_s)
    assert executor.launched == []
