"""funcpipe.split: any module into a chain of units, checked against plain PyTorch.

Each equivalence test runs the original model forward and backward in plain
PyTorch, then chains the stages of every partition into 2-4 stages as a
pipeline would (each stage's boundary inputs fed as fresh leaf tensors,
requiring grad where the boundary says so, the gradients passed back by hand),
and compares outputs and parameter gradients.
"""

from __future__ import annotations

import collections
import copy
import itertools
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import pytest
import torch
from torch import nn

from funcpipe.errors import ConfigError
from funcpipe.split import Stage, Units, mark_cut, split

pytest.importorskip("transformers")
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

RTOL = 1e-5
ATOL = 1e-6


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on one thread: intra-op threads only wait for each other on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- models

def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(config)


def bert_inputs(batch: int = 3, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_convnext(seed: int = 0) -> ConvNextForImageClassification:
    torch.manual_seed(seed)
    config = ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[2, 1],
                            drop_path_rate=0.0, num_labels=10)
    return ConvNextForImageClassification(config)


def tiny_resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic",
                          num_labels=10)
    return ResNetForImageClassification(config)


class SkipNet(nn.Module):
    """Five units; ``a``'s output skips ``b``, ``c`` and ``d`` to ``e``; an int mask, the float input reused
    in the last unit; a tuple out."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 8)
        self.e = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.a(x)
        h = self.c(self.b(skip))
        h = self.d(h) * mask.unsqueeze(-1)  # the mask is int64: it travels without a gradient
        out = self.e(h + skip) + x[:, :4]  # the float input crosses every cut, without gradient
        return out, h.sum(dim=-1)


class MarkedNet(nn.Module):
    """One module with no children of its own worth a unit: cut by mark_cut."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 5))
        self.w2 = nn.Parameter(torch.randn(5, 5))
        self.w3 = nn.Parameter(torch.randn(5, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = mark_cut(torch.tanh(x @ self.w1))
        g = mark_cut(torch.tanh(h @ self.w2))
        return (g + h) @ self.w3


class MarkedShapeNet(MarkedNet):
    """MarkedNet with a branch on a size: torch.fx refuses it, so it is split through torch.export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            x = x * 2.0
        return super().forward(x)


def skip_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(4, 6, generator=g), "mask": torch.tensor([1, 0, 1, 1])}


# --------------------------------------------------------------------------- the pipeline, by hand

def tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, tuple or ModelOutput), flattened."""
    return [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def loss_of(output: Any) -> torch.Tensor:
    return sum((t.float() ** 2).mean() for t in tensors(output) if t.is_floating_point())  # type: ignore[return-value]


def partitions(n: int) -> Iterator[list[int]]:
    """Every balance of ``n`` units into 2..4 stages."""
    for stages in range(2, min(4, n) + 1):
        for cuts in itertools.combinations(range(1, n), stages - 1):
            bounds = (0, *cuts, n)
            yield [bounds[i + 1] - bounds[i] for i in range(stages)]


def run_pipeline(units: Units, balance: list[int], inputs: Any,
                 cache: dict[tuple[int, int], nn.Module]) -> Any:
    """Forward through the stages with each boundary cut off, then backward stage by stage; the output."""
    held: list[tuple[Any, ...]] = []
    outputs: list[Any] = []
    values: tuple[Any, ...] = units.flatten_inputs(inputs)
    first = 0
    for s, size in enumerate(balance):
        last = first + size - 1
        if s > 0:
            boundary = units.boundary(first - 1)
            assert len(values) == len(boundary.values)
            fresh = []
            for value, info in zip(values, boundary.values, strict=True):
                if isinstance(value, torch.Tensor):
                    # A value the boundary says carries no gradient must not be one that needs it.
                    assert info.requires_grad == value.requires_grad, info
                    assert (info.shape, info.dtype) == (tuple(value.shape), value.dtype)
                    value = value.detach().requires_grad_(info.requires_grad)
                else:
                    assert not info.is_tensor and not info.requires_grad
                fresh.append(value)
            values = tuple(fresh)
        held.append(values)
        key = (first, last)
        if key not in cache:
            cache[key] = units.stage(first, last)
        out = cache[key](*values)
        outputs.append(out)
        if s < len(balance) - 1:
            assert isinstance(out, tuple)
            values = out
        first = last + 1
    loss_of(outputs[-1]).backward()
    for s in range(len(balance) - 2, -1, -1):
        pairs = [(o, i.grad) for o, i in zip(outputs[s], held[s + 1], strict=True)
                 if isinstance(i, torch.Tensor) and i.requires_grad and i.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outputs[-1]


def reference(model: nn.Module, call: Callable[[], Any]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Plain PyTorch: the output's tensors and every parameter's gradient, then the gradients cleared."""
    model.zero_grad(set_to_none=True)
    out = call()
    loss_of(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return [t.detach().clone() for t in tensors(out)], grads


def assert_equivalent(model: nn.Module, units: Units, inputs: Any, call: Callable[[], Any]) -> int:
    """Every partition into 2-4 stages: the same outputs and parameter gradients as plain PyTorch."""
    want_out, want_grads = reference(model, call)
    assert want_grads, "the reference computed no gradients"
    cache: dict[tuple[int, int], nn.Module] = {}
    count = 0
    for balance in partitions(len(units)):
        model.zero_grad(set_to_none=True)
        got = run_pipeline(units, balance, inputs, cache)
        assert type(got) is type(call()), balance
        for g, w in zip(tensors(got), want_out, strict=True):
            torch.testing.assert_close(g.detach(), w, rtol=RTOL, atol=ATOL, msg=f"output, balance {balance}")
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == want_grads.keys(), balance
        for name, w in want_grads.items():
            torch.testing.assert_close(grads[name], w, rtol=RTOL, atol=ATOL, msg=f"grad of {name}, balance {balance}")
        count += 1
    model.zero_grad(set_to_none=True)
    return count


# --------------------------------------------------------------------------- equivalence

def test_bert_splits_per_layer_and_every_partition_matches_plain_pytorch() -> None:
    model = tiny_bert()
    inputs = bert_inputs()
    units = split(model, inputs)
    assert units.names == ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                           "bert.encoder.layer.2", "bert.pooler", "classifier")
    assert units.tracer == "torch.export"
    assert assert_equivalent(model, units, inputs, lambda: model(**inputs)) == 5 + 10 + 10


def test_bert_masks_and_ids_cross_a_cut_without_gradient() -> None:
    model = tiny_bert()
    units = split(model, bert_inputs())
    inputs = units.inputs_boundary()
    assert inputs.names == ("input_ids", "attention_mask")
    assert all(not v.requires_grad and v.dtype == torch.int64 for v in inputs.values)
    after_embeddings = units.boundary(0)
    masks = [v for v in after_embeddings.values if v.is_tensor and not v.dtype.is_floating_point]
    assert masks and all(not v.requires_grad for v in masks)
    hidden = [v for v in after_embeddings.values if v.requires_grad]
    assert [(v.shape, v.dtype) for v in hidden] == [((3, 8, 32), torch.float32)]
    assert hidden[0].nbytes == 3 * 8 * 32 * 4
    # Between encoder layers: the hidden states with a gradient, the mask (in some form) without.
    between = units.boundary(2)
    assert sum(v.requires_grad for v in between.values) == 1
    assert any(v.is_tensor and not v.requires_grad for v in between.values)
    assert between.nbytes == sum(v.nbytes for v in between.values) >= 3 * 8 * 32 * 4


def test_convnext_splits_per_block_and_every_partition_matches_plain_pytorch() -> None:
    model = tiny_convnext()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    units = split(model, x)
    assert units.names == ("convnext.embeddings", "convnext.encoder.stages.0.layers.0",
                           "convnext.encoder.stages.0.layers.1", "convnext.encoder.stages.1.downsampling_layer",
                           "convnext.encoder.stages.1.layers.0", "convnext.layernorm", "classifier")
    for b in units.boundaries:  # a chain of blocks: one activation crosses each cut
        assert len(b.values) == 1 and b.values[0].requires_grad
    assert units.boundary(0).values[0].shape == (2, 8, 16, 16)
    assert assert_equivalent(model, units, x, lambda: model(x)) == 6 + 15 + 20


def test_resnet_splits_per_block_and_its_batch_norm_statistics_update_as_in_plain_pytorch() -> None:
    model = tiny_resnet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    twin = copy.deepcopy(model)
    units = split(model, x)
    assert units.names == ("resnet.embedder", "resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0",
                           "resnet.encoder.stages.1.layers.1", "classifier")
    untouched = twin.state_dict()
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items()), "split ran the model's BatchNorms"
    # One training forward each: the running statistics move the same way.
    twin(x)
    run_pipeline(units, [2, 1, 2], x, {})
    want = twin.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=RTOL, atol=ATOL, msg=key)
    assert int(model.state_dict()["resnet.embedder.embedder.normalization.num_batches_tracked"]) == 1
    model.eval()
    units = split(model, x)  # eval: the statistics are used, not updated, and the gradients match
    assert assert_equivalent(model, units, x, lambda: model(x)) == 4 + 6 + 4


def test_split_leaves_the_models_buffers_and_the_random_generator_as_they_were() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    state = copy.deepcopy(model.state_dict())
    x = torch.randn(6, 4)
    for whole, tracer in ((Wrapped(), "torch.fx"), (model, "sequential")):
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        assert split(whole, x).tracer == tracer
        assert torch.equal(torch.rand(3), expected), tracer
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), tracer


def test_a_skip_over_three_units_is_forwarded_and_every_partition_matches() -> None:
    model = SkipNet()
    inputs = skip_inputs()
    units = split(model, inputs)
    assert units.tracer == "torch.fx"
    assert units.names == ("a", "b", "c", "d", "e")
    assert [u.parameters for u in units][:2] == [("a.weight", "a.bias"), ("b.0.weight", "b.0.bias")]
    skip = [v.name for v in units.boundary(0).values if v.produced_by == 0]
    assert len(skip) == 1
    for k in (0, 1, 2, 3):  # a's output crosses every cut up to e
        assert skip[0] in units.boundary(k).names
    # The int mask multiplies d's output in the parent's forward: glue, so it runs in e (unit 4),
    # and the mask crosses every cut without gradient.
    for k in (0, 1, 2, 3):
        (mask,) = [v for v in units.boundary(k).values if v.name == "mask"]
        assert mask.dtype == torch.int64 and not mask.requires_grad and mask.produced_by == -1
    assert units.boundary(3).names == ("x", "mask", skip[0], "d")
    (x,) = [v for v in units.boundary(2).values if v.name == "x"]
    assert x.dtype == torch.float32 and not x.requires_grad  # a float without a gradient to carry
    assert assert_equivalent(model, units, inputs, lambda: model(**inputs)) == 4 + 6 + 4


def test_a_tuple_input_and_a_tuple_output() -> None:
    model = SkipNet()
    x, mask = skip_inputs().values()
    units = split(model, (x, mask))
    assert units.inputs_boundary().names == ("x", "mask")
    out = units.stage(0, len(units) - 1)(*units.flatten_inputs((x, mask)))
    want = model(x, mask)
    assert isinstance(out, tuple) and len(out) == 2
    for g, w in zip(out, want, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)
    assert_equivalent(model, units, (x, mask), lambda: model(x, mask))


def test_a_named_sequential_is_not_traced_and_keeps_its_names() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(collections.OrderedDict(
        enc=nn.Linear(4, 8), act=nn.ReLU(), mid=nn.Linear(8, 8), head=nn.Linear(8, 2)))
    x = torch.randn(5, 4)
    units = split(model, x)
    assert units.tracer == "sequential"
    assert units.names == ("enc", "act", "mid", "head")
    assert [b.names for b in units.boundaries] == [("enc",), ("act",), ("mid",)]
    assert [v.requires_grad for b in units.boundaries for v in b.values] == [True, True, True]
    assert units.boundary(1).values[0].nbytes == 5 * 8 * 4
    stage = units.stage(2, 3)
    assert isinstance(stage, nn.Sequential)
    assert list(stage.state_dict()) == ["mid.weight", "mid.bias", "head.weight", "head.bias"]
    assert units.state_dict_keys(stage) == {k: k for k in stage.state_dict()}
    assert assert_equivalent(model, units, x, lambda: model(x)) == 3 + 3 + 1


def test_an_unnamed_sequential_is_split_per_layer_with_index_names() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    units = split(model, torch.randn(2, 3))
    assert units.names == ("0", "1", "2")
    assert list(units.stage(1, 2).state_dict()) == ["2.weight", "2.bias"]


# --------------------------------------------------------------------------- cut points

def test_cuts_by_module_name_replace_the_default_units() -> None:
    model = tiny_bert()
    inputs = bert_inputs()
    units = split(model, inputs, cuts=["bert.encoder.layer.1", "bert.pooler"])
    assert units.names == ("bert.embeddings", "bert.encoder.layer.1", "bert.pooler")
    assert units[1].modules[0] == "bert.encoder.layer.1"
    assert "bert.encoder.layer.0" in units[0].modules and "classifier" in units[2].modules
    assert assert_equivalent(model, units, inputs, lambda: model(**inputs)) == 2 + 1


def test_mark_cut_in_forward_starts_units_and_costs_nothing_untraced() -> None:
    torch.manual_seed(0)
    model = MarkedNet()
    x = torch.randn(3, 5)
    assert mark_cut(x) is x
    units = split(model, x)
    assert len(units) == 3
    assert units.names == ("unit0", "unit1", "unit2")
    assert assert_equivalent(model, units, x, lambda: model(x)) == 2 + 1


def test_a_module_without_children_or_marks_is_one_unit() -> None:
    class Plain(MarkedNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(torch.tanh(x @ self.w1) @ self.w2) @ self.w3

    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(3, 5)
    units = split(model, x)
    assert len(units) == 1 and units.boundaries == ()
    assert units[0].parameters == ("w1", "w2", "w3")
    torch.testing.assert_close(units.stage(0, 0)(x), model(x), rtol=0, atol=0)


def test_mark_cut_works_under_torch_export_too_and_leaves_no_marker() -> None:
    torch.manual_seed(0)
    model = MarkedShapeNet()
    x = torch.randn(3, 5)
    units = split(model, x)
    assert units.tracer == "torch.export" and len(units) == 3
    whole = units.stage(0, 2)
    assert not [n for n in whole.graph.nodes if "funcpipe.cut" in str(n.target) or n.target is mark_cut]
    assert assert_equivalent(model, units, x, lambda: model(x)) == 2 + 1


class CountingNet(nn.Module):
    """Tensors made in forward (constants for torch.export) and a buffer the forward updates in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # torch.fx refuses a branch on a size
            x = x * 2.0
        h = self.a(x) * torch.tensor([1.0, 2.0, 3.0])
        self.calls.add_(1)
        return self.b(h) + torch.tensor([0.5, 0.5, 0.5])


def test_constants_made_in_forward_and_buffers_updated_in_place_under_torch_export() -> None:
    torch.manual_seed(0)
    model = CountingNet()
    x = torch.randn(2, 3)
    units = split(model, x)
    assert units.tracer == "torch.export" and units.names == ("a", "b")
    assert float(model.calls) == 0  # split's own run is undone
    assert assert_equivalent(model, units, x, lambda: model(x)) == 1
    model.calls.zero_()
    run_pipeline(units, [1, 1], x, {})
    assert float(model.calls) == 1
    assert list(units.stage(1, 1).state_dict()) == ["calls", "b.weight", "b.bias"]  # no constants: not the user's


# --------------------------------------------------------------------------- the user's own parameters

class TwiceNet(nn.Module):
    """``inner`` is called in the first unit and again after ``mid``: its parameters are shared by two units."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.relu(self.mid(self.inner(x))))


def test_a_module_called_in_two_units_shares_its_parameters_and_its_gradient_sums() -> None:
    torch.manual_seed(0)
    model = TwiceNet()
    x = torch.randn(3, 4)
    units = split(model, x)
    assert units.names == ("inner", "mid")
    assert units.shared == {"inner.weight": (0, 1), "inner.bias": (0, 1)}
    assert assert_equivalent(model, units, x, lambda: model(x)) == 1
    assert not split(SkipNet(), skip_inputs()).shared


def test_stages_hold_the_users_own_parameter_objects_under_the_users_names() -> None:
    for model, inputs in ((tiny_bert(), bert_inputs()), (SkipNet(), skip_inputs()),
                          (tiny_convnext(), torch.randn(2, 3, 32, 32))):
        units = split(model, inputs)
        mine = dict(model.named_parameters())
        model_keys = set(model.state_dict())
        seen: set[str] = set()
        for balance in ([len(units)], [1, len(units) - 1], [len(units) - 2, 1, 1]):
            for stage in units.stages(balance):
                for name, p in stage.named_parameters():
                    assert p is mine[name], name
                    seen.add(name)
                mapping = units.state_dict_keys(stage)
                assert set(mapping.values()) <= model_keys
                for key, tensor in stage.state_dict(keep_vars=True).items():
                    assert tensor is model.state_dict(keep_vars=True)[mapping[key]], key
        assert seen == set(mine)
        assert {p for u in units for p in u.parameters} == set(mine)


def test_training_the_stages_trains_the_users_model_in_place() -> None:
    model = SkipNet()
    inputs = skip_inputs()
    units = split(model, inputs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stages = units.stages([2, 3])
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.1) for s in stages]
    run_pipeline(units, [2, 3], inputs, {(0, 1): stages[0], (2, 4): stages[1]})
    for o in optimizers:
        o.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(("make", "example"), [(tiny_bert, bert_inputs), (SkipNet, skip_inputs),
                                               (tiny_convnext, lambda: torch.randn(2, 3, 32, 32))],
                         ids=["bert", "skipnet", "convnext"])
def test_a_stage_pickles_as_a_worker_receives_it_and_copies_run_the_same(
        make: Callable[[], nn.Module], example: Callable[[], Any]) -> None:
    model = make()
    inputs = example()
    units = split(model, inputs)
    values = units.flatten_inputs(inputs)
    for first, last in ((0, 1), (2, len(units) - 1)):
        stage = units.stage(first, last)
        for copied in (pickle.loads(cloudpickle.dumps(stage)), copy.deepcopy(stage)):
            assert isinstance(copied, Stage)
            assert list(copied.state_dict()) == list(stage.state_dict())
            assert not any(p is q for p, q in zip(copied.parameters(), stage.parameters(), strict=True))
            got, want = copied(*values), stage(*values)
            assert type(got) is type(want)
            for g, w in zip(tensors(got), tensors(want), strict=True):
                assert torch.equal(g, w)
        values = stage(*values)


# --------------------------------------------------------------------------- bad input

class NumpyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.from_numpy(x.detach().numpy()))


class BranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow
            return self.b(h)
        return h


def test_a_model_that_cannot_be_traced_is_a_config_error_naming_the_tracers_the_line_and_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        split(NumpyNet(), torch.randn(2, 3))
    message = str(info.value)
    assert "NumpyNet cannot be traced" in message
    assert "torch.fx.symbolic_trace" in message and "torch.export" in message
    assert "test_split.py:" in message and "numpy" in message
    assert "mark_cut" in message and "nn.Sequential" in message


def test_data_dependent_control_flow_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        split(BranchNet(), torch.randn(2, 3))
    message = str(info.value)
    assert "control flow that depends on tensor values" in message
    assert "if h.sum() > 0" in message
    assert "hint:" in message


def test_a_cut_naming_no_module_is_a_config_error_with_the_names_to_use() -> None:
    model = tiny_bert()
    with pytest.raises(ConfigError, match=r"cut 'bert.encoder.layers.1' names no module .*hint"):
        split(model, bert_inputs(), cuts=["bert.encoder.layers.1"])
    with pytest.raises(ConfigError, match="cuts must be a list"):
        split(model, bert_inputs(), cuts="bert.pooler")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3, {"x": torch.randn(2, 6), "mask": 1}])
def test_example_inputs_that_are_not_tensors_are_config_errors(bad: Any) -> None:
    with pytest.raises(ConfigError, match="hint"):
        split(SkipNet(), bad)


def test_inputs_of_another_structure_and_bad_stage_ranges_are_config_errors() -> None:
    units = split(SkipNet(), skip_inputs())
    with pytest.raises(ConfigError, match="do not match"):
        units.flatten_inputs(tuple(skip_inputs().values()))
    with pytest.raises(ConfigError, match="not a range of units"):
        units.stage(3, 1)
    with pytest.raises(ConfigError, match="does not split 5 units"):
        units.stages([2, 2])
    with pytest.raises(ConfigError, match="no boundary after unit 4"):
        units.boundary(4)
