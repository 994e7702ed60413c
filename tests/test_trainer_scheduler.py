"""Trainer(scheduler=...): every stage steps its learning-rate scheduler once per iteration, as a plain loop does.

The reference is an independent plain PyTorch loop over the whole model with
one optimizer and one scheduler of the same factory, stepped after every
optimizer step. The schedule is one that changes the learning rate every
iteration (OneCycleLR), so a scheduler not stepped, stepped twice, or started
over after a checkpoint gives other parameters.
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
from funcpipe.executors.thread import ThreadExecutor
from tests.helpers import SpyExecutor, assert_same_parameters, mlp7, regression_batches

ITERATIONS = 6


def sgd(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def one_cycle(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=2 * ITERATIONS)


def plain(model: nn.Module, batches: list[Any]) -> nn.Module:
    model = copy.deepcopy(model)
    opt = sgd(model.parameters())
    scheduler = one_cycle(opt)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        scheduler.step()
    return model


@pytest.mark.usefixtures("ray_cluster")
def test_a_one_cycle_schedule_on_ray_with_replicas_equals_plain_pytorch() -> None:
    batches = regression_batches(ITERATIONS, 8)
    model = mlp7()
    expected = plain(model, batches)
    plan = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(model, nn.functional.mse_loss, sgd, plan, backend="ray", scheduler=one_cycle)
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, expected)


def test_a_second_fit_continues_the_schedule_from_the_checkpoint() -> None:
    batches = regression_batches(2 * ITERATIONS, 8)
    model = mlp7()
    expected = plain(model, batches)
    plan = Plan.manual([3, 4], micro_batch_size=4, global_batch_size=8)
    trainer = Trainer(model, nn.functional.mse_loss, sgd, plan, backend="thread", scheduler=one_cycle)
    trainer.fit(batches[:ITERATIONS], progress=False, checkpoint_every=4)
    trainer.fit(batches[ITERATIONS:], progress=False, checkpoint_every=4)
    assert_same_parameters(trainer.model, expected)
    # Without the scheduler's state in the checkpoint the second fit would start the cycle over:
    restarted = plain(plain(model, batches[:ITERATIONS]), batches[ITERATIONS:])
    assert not all(torch.allclose(p, q) for p, q in zip(trainer.model.parameters(), restarted.parameters(),
                                                          strict=True))


@pytest.mark.parametrize(("scheduler", "message"), [
    (lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt), r"ReduceLROnPlateau steps on a metric"),
    (lambda opt: opt, r"returned a SGD, not a torch.optim.lr_scheduler.LRScheduler, for the optimizer of stage 0"),
    (lambda opt: 1 / 0, r"the scheduler factory raised ZeroDivisionError"),
    ("cosine", r"scheduler must be callable \(optimizer -> LRScheduler\), got str"),
], ids=["plateau", "not a scheduler", "raises", "not callable"])
def test_a_bad_scheduler_is_refused_before_anything_is_launched(scheduler: Any, message: str) -> None:
    executor = SpyExecutor(ThreadExecutor())
    with pytest.raises(Exception, match=message) as info:
        Trainer(mlp7(), nn.functional.mse_loss, sgd, Plan.manual([3, 4], micro_batch_size=4, global_batch_size=8),
                backend=executor, scheduler=scheduler)
    assert isinstance(info.value, ConfigError) or type(info.value).__name__ == "UserCodeError"
    assert executor.launched == []
