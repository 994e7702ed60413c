"""fit(eval_data=..., eval_every=...): the weights of every eval_every-th checkpoint, evaluated on the driver.

The reference trains the same model in plain PyTorch and evaluates a copy in
eval() mode after the same iterations, with the same metric averaged over the
samples of batches of unequal size.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from funcpipe import Plan, Trainer
from funcpipe.errors import ConfigError, UserCodeError
from funcpipe.executors.thread import ThreadExecutor
from tests.helpers import SpyExecutor, mlp7, regression_batches

PLAN = Plan.manual([3, 4], replicas=[2, 1], micro_batch_size=2, global_batch_size=8)


def sgd(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def within(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A metric other than the loss: the mean absolute error."""
    return (out - y).abs().mean()


def reference(model: nn.Module, batches: list[Any], eval_data: list[Any], at: set[int]) -> list[tuple[int, float]]:
    model = copy.deepcopy(model)
    opt = sgd(model.parameters())
    out = []
    for i, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if i in at:
            with torch.no_grad():
                values = [(float(within(model.eval()(ex), ey)), len(ey)) for ex, ey in eval_data]
            model.train()
            out.append((i, sum(v * n for v, n in values) / sum(n for _, n in values)))
    return out


def test_every_second_iteration_and_the_end_are_evaluated_like_plain_pytorch() -> None:
    batches = regression_batches(5, 8)
    g = torch.Generator().manual_seed(7)
    eval_data = [(torch.randn(n, 8, generator=g), torch.randn(n, 3, generator=g)) for n in (6, 3)]
    model = mlp7()
    expected = reference(model, batches, eval_data, {2, 4, 5})
    trainer = Trainer(model, nn.functional.mse_loss, sgd, PLAN, backend="thread")
    history = trainer.fit(batches, progress=False, checkpoint_every=2, eval_data=eval_data, eval_every=2,
                          eval_metric=within)
    assert [i for i, _ in history.evals] == [2, 4, 5]
    for (_, got), (_, want) in zip(history.evals, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert len({value for _, value in history.evals}) > 1  # the weights changed between evaluations
    assert history.to_dict()["evals"] == [list(e) for e in history.evals]


def test_without_eval_every_only_the_end_is_evaluated_with_the_loss() -> None:
    batches = regression_batches(3, 8)
    eval_data = [batches[0]]
    model = mlp7()
    trained = copy.deepcopy(model)
    opt = sgd(trained.parameters())
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(trained(x), y).backward()
        opt.step()
    with torch.no_grad():
        want = float(nn.functional.mse_loss(trained(batches[0][0]), batches[0][1]))
    history = Trainer(model, nn.functional.mse_loss, sgd, PLAN, backend="thread").fit(
        batches, progress=False, eval_data=eval_data)
    assert history.evals == [(3, pytest.approx(want, rel=1e-5))]


@pytest.mark.parametrize(("options", "message"), [
    ({"eval_every": 2}, r"eval_every and eval_metric need eval_data"),
    ({"eval_data": torch.zeros(3)}, r"eval_data must be an iterable of \(inputs, targets\) batches, got Tensor"),
    ({"eval_data": [], "eval_every": 3, "checkpoint_every": 2},
     r"eval_every=3 is not a multiple of checkpoint_every=2.*checkpoint_every=3, eval_every=3"),
    ({"eval_data": [], "eval_every": 0}, r"eval_every must be an integer >= 1, got 0"),
    ({"eval_data": [], "eval_metric": "accuracy"}, r"eval_metric must be callable"),
], ids=["no data", "a tensor", "not a multiple", "zero", "not callable"])
def test_bad_eval_options_are_refused_before_anything_is_launched(options: dict[str, Any], message: str) -> None:
    executor = SpyExecutor(ThreadExecutor())
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd, PLAN, backend=executor)
    with pytest.raises(ConfigError, match=message):
        trainer.fit(regression_batches(2, 8), progress=False, **options)
    assert executor.launched == []


def test_a_metric_that_fails_names_the_batch_and_the_iteration() -> None:
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd, PLAN, backend="thread")
    with pytest.raises(UserCodeError, match=r"evaluating after iteration 2: eval batch 0 raised ZeroDivisionError"):
        trainer.fit(regression_batches(2, 8), progress=False, eval_data=regression_batches(1, 4),
                    eval_metric=lambda out, y: 1 / 0)


def test_a_retried_run_keeps_the_evaluations_before_its_restore_point_and_makes_the_rest_again(
        tmp_path: Any) -> None:
    from tests.test_trainer_recovery import MICRO_BATCHES, PLAN8, FailsOnce, model_with

    batches = regression_batches(6, 8)
    eval_data = [regression_batches(1, 5, seed=9)[0]]
    expected = reference(mlp7(), batches, eval_data, {2, 4, 6})
    fault = FailsOnce(tmp_path / "raised", after=3 * MICRO_BATCHES)  # in iteration 3: back to the checkpoint at 2
    trainer = Trainer(model_with(fault), nn.functional.mse_loss, sgd, PLAN8, backend="thread")
    history = trainer.fit(batches, progress=False, max_retries=1, checkpoint_every=2, eval_data=eval_data,
                          eval_every=2, eval_metric=within)
    assert (tmp_path / "raised").exists()
    assert [i for i, _ in history.evals] == [2, 4, 6]
    for (_, got), (_, want) in zip(history.evals, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
