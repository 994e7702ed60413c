"""funcpipe.profile of modules that are not an nn.Sequential: each unit of funcpipe.split is a layer.

Bytes are checked against the units' boundaries worked out by hand from the modules' code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcpipe
from funcpipe import ConfigError, costmodel, profiler
from funcpipe.profiler import ModelProfile, profile
from funcpipe.split import split

FAST: dict[str, Any] = {"micro_batch_sizes": (1, 2, 4), "rounds": 1, "warmup": 0}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SkipTuple(nn.Module):
    """Units a, b, c, e: ``a``'s output skips ``b`` and ``c``; an int mask crosses every cut to the glue
    before ``e``; a tuple out."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.e = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.a(x)
        h = torch.tanh(self.b(skip))
        h = self.c(h) * mask.unsqueeze(-1)  # int64 mask: no gradient
        return self.e(h + skip), h.sum(-1)


def skip_data(batch: int = 4) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 6, generator=g)
    mask = torch.randint(0, 2, (batch,), generator=g)
    return (x, mask), torch.randn(batch, 4, generator=g)


def skip_loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out[0], y) + out[1].mean()


def test_a_module_with_a_skip_connection_and_a_tuple_output() -> None:
    model = SkipTuple()
    inputs, y = skip_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = profile(model, inputs, y, skip_loss, **FAST)
    units = split(SkipTuple(), inputs)
    assert len(prof.layers) == len(units) == 4
    assert [lp.name for lp in prof.layers] == list(units.names) == ["a", "b", "c", "e"]
    # Per sample, worked out from forward: the mask (int64, 8 B) crosses every cut; after a: a's output
    # (8 floats); after b: a's and b's (tanh is glue of the next unit); after c: a's and c's; e's
    # outputs: 4 + 1 floats.
    assert [lp.output_bytes_per_sample for lp in prof.layers] == [8 + 32, 8 + 64, 8 + 64, 16 + 4]
    assert [lp.grad_bytes_per_sample for lp in prof.layers] == [32, 64, 64, 20]
    # The same as the boundaries split measured at the largest size.
    assert [lp.output_bytes_per_sample for lp in prof.layers[:-1]] == [units.boundary(i).nbytes / 4 for i in range(3)]
    assert prof.input_bytes_per_sample == 6 * 4 + 8
    assert prof.target_bytes_per_sample == 16
    # Saved for backward: a its input x; b a's output; c tanh's output (which tanh saves too, once);
    # e the mask (the product's other factor) and h + skip.
    assert [lp.held_bytes_per_sample for lp in prof.layers] == [24, 32, 32, 8 + 32]
    assert [lp.param_bytes for lp in prof.layers] == [(6 * 8 + 8) * 4, (8 * 8 + 8) * 4, (8 * 8 + 8) * 4,
                                                       (8 * 4 + 4) * 4]
    # Adam: two moments per parameter and a float32 step per tensor (weight and bias).
    assert [lp.optimizer_bytes for lp in prof.layers] == [2 * lp.param_bytes + 2 * 4 for lp in prof.layers]
    assert prof.tied == ()
    assert prof.machine["split"] == "torch.fx"
    for lp in prof.layers:
        assert lp.measured_sizes == (1, 2, 4)
        assert all(t > 0 for t in lp.forward_measured_s or ())
        assert all(t > 0 for t in lp.backward_measured_s or ())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    assert all(p.grad is None for p in model.parameters())


def test_a_traced_profile_plans_simulates_and_round_trips(tmp_path: Any) -> None:
    inputs, y = skip_data()
    prof = profile(SkipTuple(), inputs, y, skip_loss, **FAST)
    prof.save(tmp_path / "p.json")
    assert ModelProfile.load(tmp_path / "p.json") == prof
    plan = funcpipe.Plan.manual([2, 2], micro_batch_size=2, global_batch_size=4, memory_mb=1024)
    stages = costmodel.stage_costs(prof, funcpipe.platforms.resolve("aws_lambda"), plan)
    assert (stages[0].output_bytes, stages[0].output_grad_bytes) == (72 * 2, 64 * 2)
    assert stages[1].input_grad_bytes == 64 * 2
    assert funcpipe.simulate(plan, prof, "aws_lambda").iteration_s > 0


class Twice(nn.Module):
    """``a`` is called in both units: its parameters are tied between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.relu(self.b(self.a(x))))


def test_a_parameter_of_two_units_counts_in_both_as_a_tie() -> None:
    prof = profile(Twice(), torch.randn(4, 8), torch.randn(4, 8), F.mse_loss, **FAST)
    a = (8 * 8 + 8) * 4
    assert [(lp.name, lp.param_bytes) for lp in prof.layers] == [("a", a), ("b", 2 * a)]
    assert prof.tied == ((0, 1, a),)
    assert prof.param_bytes == 2 * a


class Specialised(nn.Module):
    """torch.fx cannot trace ``int(size)``; torch.export specialises the batch to the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        return self.b(self.a(x) + torch.arange(n, dtype=x.dtype).unsqueeze(1))


def test_a_graph_specialised_to_the_batch_is_split_again_at_each_size(monkeypatch: pytest.MonkeyPatch) -> None:
    units = split(Specialised(), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="must match"):  # the graph split at 4 does not run at 2
        units.stage(0, 1)(torch.randn(2, 8))
    # ...and at 1 it runs, broadcasting to 4 samples: the shapes tell.
    assert units.stage(0, 1)(torch.randn(1, 8)).shape == (4, 8)
    sizes: list[int] = []
    split_at = profiler._split_at
    monkeypatch.setattr(profiler, "_split_at", lambda model, inputs, b, cuts: sizes.append(b) or split_at(
        model, inputs, b, cuts))
    prof = profile(Specialised(), torch.randn(4, 8), torch.randn(4, 8), F.mse_loss, **FAST)
    assert sizes == [4, 1, 2]
    assert [lp.name for lp in prof.layers] == ["a", "b"]
    assert all(lp.forward_measured_s is not None and min(lp.forward_measured_s) > 0 for lp in prof.layers)


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.a(x))


def test_a_size_the_model_cannot_run_at_is_named() -> None:
    # Training-mode BatchNorm needs 2 samples: the graph split at 4 fails at 1, and so does splitting at 1.
    with pytest.raises(ConfigError, match=r"Normed raised ValueError: Expected more than 1 value per channel"):
        profile(Normed(), torch.randn(4, 4), torch.randn(4, 4), F.mse_loss, **FAST)
    prof = profile(Normed(), torch.randn(4, 4), torch.randn(4, 4), F.mse_loss, micro_batch_sizes=(2, 4), rounds=1,
                   warmup=0)
    assert [lp.name for lp in prof.layers] == ["a", "norm"]


# -- Hugging Face models ------------------------------------------------------------------------


def tiny_bert() -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


SEQ = 16


def bert_data(batch: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (batch,), generator=g)


def bert_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, y)


def test_a_hugging_face_bert_with_input_ids_and_attention_mask() -> None:
    model = tiny_bert()
    inputs, y = bert_data()
    prof = profile(model, inputs, y, bert_loss, **FAST)
    units = split(tiny_bert(), inputs)
    assert len(prof.layers) == len(units) == 5
    assert [lp.name for lp in prof.layers] == list(units.names) == [
        "bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler", "classifier"]
    hidden = SEQ * 32 * 4  # a sample's hidden states, float32
    # Per sample: the hidden states carry the gradient; the int64 mask and a Python int (the batch size,
    # 8 bytes a micro-batch of 4) travel forward only; after layer 0 the expanded bool mask (SEQ x SEQ).
    assert prof.layers[0].output_bytes_per_sample == SEQ * 8 + 8 / 4 + hidden
    assert prof.layers[1].output_bytes_per_sample == 8 / 4 + SEQ * SEQ + hidden
    assert [lp.grad_bytes_per_sample for lp in prof.layers[:3]] == [hidden] * 3
    assert prof.layers[3].output_bytes_per_sample == prof.layers[3].grad_bytes_per_sample == 32 * 4  # pooled
    assert prof.layers[4].output_bytes_per_sample == 2 * 4  # the logits
    for lp in prof.layers[:2]:
        assert lp.grad_bytes_per_sample is not None and lp.grad_bytes_per_sample < lp.output_bytes_per_sample
    assert prof.input_bytes_per_sample == 2 * SEQ * 8
    assert [lp.output_bytes_per_sample for lp in prof.layers[:-1]] == [units.boundary(i).nbytes / 4 for i in range(4)]
    params = {name: p.numel() * 4 for name, p in tiny_bert().named_parameters()}
    for unit, lp in zip(units, prof.layers, strict=True):
        assert lp.param_bytes == sum(params[name] for name in unit.parameters)
    assert sum(lp.param_bytes for lp in prof.layers) == sum(params.values())


def test_a_hugging_face_convnext_on_32x32_images() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16],
                                         depths=[2, 1], drop_path_rate=0.0, num_labels=10)
    model = transformers.ConvNextForImageClassification(config)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    prof = profile(model, x, y, bert_loss, **FAST)
    units = split(model, x)
    assert len(prof.layers) == len(units) == 7
    assert [lp.name for lp in prof.layers] == list(units.names)
    # 16x16 maps of 8 channels after the patch embedding (patch 2) and the first stage's blocks, 8x8 of
    # 16 after the downsampling and the second stage's block, 16 pooled features, 10 logits: all floats.
    assert [lp.output_bytes_per_sample for lp in prof.layers] == [8 * 16 * 16 * 4] * 3 + [16 * 8 * 8 * 4] * 2 + [
        16 * 4, 10 * 4]
    assert [lp.grad_bytes_per_sample for lp in prof.layers] == [lp.output_bytes_per_sample for lp in prof.layers]
    assert prof.input_bytes_per_sample == 3 * 32 * 32 * 4
    assert sum(lp.param_bytes for lp in prof.layers) == sum(p.numel() * 4 for p in model.parameters())


# -- bad input ----------------------------------------------------------------------------------


def test_inputs_of_different_batch_sizes_are_named() -> None:
    (x, mask), y = skip_data()
    with pytest.raises(ConfigError, match=r"different batch sizes.*inputs\[0\] 4, inputs\[1\] 3; hint"):
        profile(SkipTuple(), (x, mask[:3]), y, skip_loss, **FAST)
    inputs, y = bert_data()
    inputs["attention_mask"] = inputs["attention_mask"][:2]
    with pytest.raises(ConfigError, match=r"inputs\['input_ids'\] 4, inputs\['attention_mask'\] 2"):
        profile(nn.Linear(2, 2), inputs, y, bert_loss, **FAST)


def test_a_loss_that_cannot_take_the_output_is_named() -> None:
    inputs, y = bert_data()
    with pytest.raises(ConfigError, match=r"loss_fn failed on the output of BertForSequenceClassification "
                                          r"\(SequenceClassifierOutput\(.*logits.*\(4, 2\).*\).*"
                                          r"hint: loss_fn receives"):
        profile(tiny_bert(), inputs, y, F.cross_entropy, **FAST)  # a ModelOutput, not the logits


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return h if h.sum() > 0 else -h


@pytest.mark.parametrize(("inputs", "match"), [
    ("x", r"inputs must be a tensor, or a tuple or dict of tensors, got str"),
    ((), r"got tuple \(empty\)"),
    ((torch.randn(4, 4), 3), r"inputs\[1\] is a int, not a tensor"),
    ((torch.randn(4, 4), torch.tensor(1.0)), r"inputs\[1\] is 0-dimensional"),
])
def test_inputs_that_are_not_tensors_with_samples_are_named(inputs: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        profile(nn.Linear(4, 4), inputs, torch.randn(4, 4), F.mse_loss, **FAST)


def test_a_model_that_cannot_be_split_is_named() -> None:
    with pytest.raises(ConfigError, match=r"Branchy has control flow that depends on tensor values.*hint"):
        profile(Branchy(), torch.randn(4, 4), torch.randn(4, 4), F.mse_loss, **FAST)


def test_a_sequential_with_cuts_is_refused() -> None:
    with pytest.raises(ConfigError, match="cuts are for traced models"):
        profile(nn.Sequential(nn.Linear(4, 4)), torch.randn(4, 4), torch.randn(4, 4), F.mse_loss, cuts=["0"],
                **FAST)
