"""Trainer(clip_grad_norm=...): the gradients are clipped by their norm over the whole model, across stages.

The reference is an independent plain PyTorch loop calling
``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` before each
step. The limit is chosen below the model's gradient norm on these batches
(the reference asserts it), so a stage clipping by its own norm only, a
replica that did not sum first, or no clipping at all, gives other
parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from funcpipe import Plan, Trainer
from funcpipe.errors import ConfigError
from tests.helpers import assert_same_parameters, mlp7, regression_batches

MAX_NORM = 0.3


def sgd(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def plain(model: nn.Module, batches: list[Any], max_norm: float) -> tuple[nn.Module, list[float]]:
    model = copy.deepcopy(model)
    opt = sgd(model.parameters())
    norms = []
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
    return model, norms


@pytest.mark.usefixtures("ray_cluster")
def test_clipping_by_the_global_norm_on_ray_with_replicas_equals_plain_pytorch() -> None:
    batches = regression_batches(5, 8)
    model = mlp7()
    expected, norms = plain(model, batches, MAX_NORM)
    assert all(n > MAX_NORM for n in norms)  # every step is clipped
    # Each stage's own norm is below the global one: clipping stage by stage would scale less.
    plan = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(model, nn.functional.mse_loss, sgd, plan, backend="ray", clip_grad_norm=MAX_NORM)
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, expected)


def test_a_stage_without_parameters_takes_part_and_a_limit_above_the_norm_changes_nothing() -> None:
    batches = regression_batches(4, 8)
    model = mlp7()
    expected, _ = plain(model, batches, 1e9)
    plan = Plan.manual([2, 1, 4], micro_batch_size=4, global_batch_size=8)  # stage 1 is one Tanh
    trainer = Trainer(model, nn.functional.mse_loss, sgd, plan, backend="thread", clip_grad_norm=1e9)
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, expected)
    clipped, _ = plain(mlp7(), batches, MAX_NORM)  # from the initial weights (model is trained now)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd, plan, backend="thread", clip_grad_norm=MAX_NORM)
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, clipped)
    assert not [key for key in trainer.storage.list("") if "norm.s" in key]  # deleted with their iterations


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_a_bad_limit_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"clip_grad_norm must be a positive finite number, got"):
        Trainer(mlp7(), nn.functional.mse_loss, sgd, Plan.manual([7], micro_batch_size=4, global_batch_size=8),
                backend="thread", clip_grad_norm=value)
