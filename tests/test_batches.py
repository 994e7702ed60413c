"""The batches a fit trains on: how many, the checks each must pass, and the replay a retry feeds again."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from funcpipe import ConfigError
from funcpipe.batches import Batch, Replay, check_batch, model_input_dtype, training_batches


def numbered(count: int) -> list[Batch]:
    """Batches of one sample whose input is their index, so a test sees which one it got."""
    return [(torch.tensor([[float(i)]]), torch.tensor([[0.0]])) for i in range(count)]


def indices(batches: Iterator[Batch]) -> list[int]:
    return [int(x.item()) for x, _ in batches]


class TestTrainingBatches:
    def test_iterations_cycle_over_the_data(self) -> None:
        batches, total = training_batches(numbered(2), iterations=5, epochs=1)
        assert total == 5
        assert indices(itertools.islice(batches, 5)) == [0, 1, 0, 1, 0]  # and on

    def test_epochs_pass_over_the_data_that_many_times(self) -> None:
        batches, total = training_batches(numbered(3), iterations=None, epochs=2)
        assert total == 6
        assert indices(batches) == [0, 1, 2, 0, 1, 2]

    def test_a_spent_generator_yields_nothing_instead_of_cycling_for_ever(self) -> None:
        spent = iter(numbered(1))
        next(spent)
        batches, total = training_batches(spent, iterations=3, epochs=1)
        assert total == 3
        assert list(batches) == []

    def test_data_without_len_needs_iterations(self) -> None:
        with pytest.raises(ConfigError, match=r"data of type generator has no len\(\).*iterations=N"):
            training_batches((b for b in numbered(2)), iterations=None, epochs=1)


class TestCheckBatch:
    SIZE = 4

    def test_a_good_batch_is_returned_as_inputs_and_targets(self) -> None:
        x, y = torch.zeros(self.SIZE, 3), torch.ones(self.SIZE)
        inputs, targets = check_batch([x, y], self.SIZE, 0)
        assert inputs is x and targets is y

    @pytest.mark.parametrize(
        ("batch", "message"),
        [
            (torch.zeros(4, 3), r"batch 7 is a Tensor, not an \(inputs, targets\) pair"),
            ((torch.zeros(4), torch.zeros(4), torch.zeros(4)), r"batch 7 is a tuple, not an \(inputs, targets\) pair"),
            (([0.0] * 4, torch.zeros(4)), r"batch 7: inputs\[0\] is a float, not a tensor"),
            ((torch.zeros(4), torch.tensor(1.0)), r"batch 7: targets has shape \(\), but the plan's global batch is 4"),
            ((torch.zeros(3, 2), torch.zeros(4)), r"inputs has shape \(3, 2\).*DataLoader\(\.\.\., batch_size=4, "
                                                  r"drop_last=True\)"),
        ],
        ids=["not a pair", "a triple", "not a tensor", "a scalar", "wrong size"],
    )
    def test_a_bad_batch_is_named_with_its_iteration(self, batch: Any, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            check_batch(batch, self.SIZE, 7)

    def test_inputs_of_another_dtype_than_the_model_are_named_with_the_layer(self) -> None:
        batch = (torch.zeros(self.SIZE, 3, dtype=torch.float64), torch.zeros(self.SIZE))
        with pytest.raises(ConfigError, match=r"batch 2: inputs are torch.float64, but the model's layer 0 \(Linear\) "
                                              r"computes in torch.float32; hint: convert them with inputs.to"):
            check_batch(batch, self.SIZE, 2, (torch.float32, "layer 0 (Linear)"))
        check_batch(batch, self.SIZE, 2)  # no dtype to judge by: any


class Anything(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (nn.Sequential(nn.Linear(2, 2), nn.ReLU()), (torch.float32, "layer 0 (Linear)")),
        (nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Conv1d(1, 1, 1).double()), (torch.float64, "layer 2 (Conv1d)")),
        (nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 2)), None),  # integer indices
        (nn.Sequential(Anything(), nn.Linear(2, 2)), None),  # a custom module takes anything
        (nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), None),  # so does a layer without weights
        (nn.Sequential(nn.Identity()), None),
    ],
    ids=["linear", "after transparent layers", "embedding", "custom", "activation first", "no layer decides"],
)
def test_the_first_layer_that_computes_with_its_weight_decides_the_input_dtype(
    model: nn.Sequential, expected: tuple[torch.dtype, str] | None
) -> None:
    assert model_input_dtype(model) == expected


class TestReplay:
    def test_batches_are_kept_from_the_last_checkpoint_so_a_retry_gets_the_same_ones(self) -> None:
        replay = Replay(iter(numbered(6)), first=10)
        got = [replay.get(i) for i in range(10, 14)]
        replay.forget_before(12)  # a checkpoint before 12 is complete
        replay.rewind(12)
        assert [replay.get(i) for i in (12, 13)] == got[2:]
        assert indices(iter([replay.get(14), replay.get(15)])) == [4, 5]  # type: ignore[list-item]
        assert replay.get(16) is None  # the data ran out

    def test_a_forgotten_batch_cannot_be_replayed(self) -> None:
        replay = Replay(iter(numbered(3)), first=0)
        replay.get(0)
        replay.get(1)
        replay.forget_before(1)
        replay.rewind(1)
        with pytest.raises(AssertionError):
            replay.rewind(0)
