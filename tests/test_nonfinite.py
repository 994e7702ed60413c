"""Training that does nothing or diverges (issue 16): stopped with a named error, or skipped as asked.

Also the misuse that used to train nothing without a word: an optimizer factory that returns no
optimizer, empty data, a timeout that is not a positive finite number — each a ConfigError before
any worker is launched.
"""

from __future__ import annotations

import copy
import math
import uuid

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from funcpipe import ConfigError, NonFiniteTraining, Plan, Trainer
from funcpipe.executors.thread import ThreadExecutor
from tests.helpers import SpyExecutor, assert_same_parameters, mlp7, plain_training, regression_batches

PLAN = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)


def sgd(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05)  # type: ignore[arg-type]


def trainer(optimizer: object = sgd, **kwargs: object) -> Trainer:
    return Trainer(mlp7(), nn.functional.mse_loss, optimizer, PLAN, backend=kwargs.pop("backend", "thread"),  # type: ignore[arg-type]
                   storage=f"memory://nonfinite-{uuid.uuid4().hex}", **kwargs)  # type: ignore[arg-type]


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def with_nan_at(batches: Batches, iteration: int) -> Batches:
    poisoned = copy.deepcopy(batches)
    poisoned[iteration][0][3, 2] = float("nan")  # one input of one sample
    return poisoned


def test_a_nan_input_stops_training_naming_where_and_leaves_the_last_good_weights() -> None:
    batches = with_nan_at(regression_batches(5, 8), 3)
    job = trainer()
    with pytest.raises(NonFiniteTraining, match=r"stage 2 replica \d: the loss of iteration 3, micro-batch 1") as info:
        job.fit(batches, progress=False, checkpoint_every=1, max_retries=3)
    assert "not retried" in str(info.value)
    assert all(torch.isfinite(p).all() for p in job.model.parameters())
    # Every stage checkpointed before iteration 3, and no step of iteration 3 was taken.
    assert_same_parameters(job.model, plain_training(mlp7(), nn.functional.mse_loss, sgd, batches[:3]))


def test_a_diverging_run_stops_at_its_first_non_finite_gradient_or_loss() -> None:
    def huge_lr(params: object) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1e18)  # type: ignore[arg-type]

    job = trainer(huge_lr)
    with pytest.raises(NonFiniteTraining, match=r"not finite|NaN|inf"):
        job.fit(regression_batches(6, 8), progress=False)
    assert all(torch.isfinite(p).all() for p in job.model.parameters())


def test_skip_skips_the_step_of_the_non_finite_iteration() -> None:
    batches = with_nan_at(regression_batches(4, 8), 1)
    job = trainer()
    history = job.fit(batches, progress=False, on_nonfinite="skip")
    assert math.isnan(history.losses[1]) and all(math.isfinite(x) for i, x in enumerate(history.losses) if i != 1)
    # Plain SGD (no state) that skips batch 1 entirely.
    assert_same_parameters(job.model, plain_training(mlp7(), nn.functional.mse_loss, sgd, batches[:1] + batches[2:]))


def test_ignore_trains_on_and_reports_the_nan() -> None:
    job = trainer()
    history = job.fit(with_nan_at(regression_batches(3, 8), 1), progress=False, on_nonfinite="ignore")
    assert len(history) == 3 and math.isnan(history.losses[1])


def test_an_unknown_policy_is_named() -> None:
    with pytest.raises(ConfigError, match="on_nonfinite must be one of 'raise', 'skip', 'ignore', got 'warn'"):
        trainer().fit(regression_batches(1, 8), progress=False, on_nonfinite="warn")


# -- misuse named before launch ----------------------------------------------------------------------


def spy_trainer(**kwargs: object) -> tuple[Trainer, SpyExecutor]:
    spy = SpyExecutor(ThreadExecutor())
    return trainer(backend=spy, **kwargs), spy


@pytest.mark.parametrize("factory", [lambda p: None, lambda p: [torch.optim.SGD(p, lr=0.1)]],
                         ids=["returns-None", "returns-a-list"])
def test_an_optimizer_factory_that_returns_no_optimizer_is_named(factory: object) -> None:
    with pytest.raises(ConfigError, match=r"(?s)the optimizer factory returned .* not a torch\.optim\.Optimizer"):
        trainer(factory)


def test_an_optimizer_factory_that_raises_is_named() -> None:
    def broken(params: object) -> torch.optim.Optimizer:
        raise TypeError("lr missing")

    with pytest.raises(ConfigError, match="lr missing"):
        trainer(broken)


@pytest.mark.parametrize("data", [[], DataLoader(TensorDataset(torch.randn(3, 8), torch.randn(3, 3)),
                                                 batch_size=8, drop_last=True)], ids=["empty-list", "drop_last"])
def test_empty_data_is_named_before_any_worker_is_launched(data: object) -> None:
    job, spy = spy_trainer()
    with pytest.raises(ConfigError, match="yields no batch"):
        job.fit(data, progress=False)  # type: ignore[arg-type]
    assert spy.launched == []


@pytest.mark.parametrize("timeout_s", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_timeout_that_is_not_a_positive_finite_number_is_named(timeout_s: float) -> None:
    with pytest.raises(ConfigError, match=r"timeout_s must be > 0 and finite"):
        trainer(timeout_s=timeout_s)
