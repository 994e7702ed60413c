"""checkpoint: weights and optimizer state as safetensors, restored exactly."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterable

import pytest
import safetensors.torch
import torch
from torch import nn

from funcpipe import codec
from funcpipe.checkpoint import decode_state, encode_state
from funcpipe.errors import ForeignObject, IntegrityError

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

KEY = "job-x/checkpoint/i00000003/s1"

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.95)),
}


def make_module(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    # BatchNorm brings buffers, including an int64 one (num_batches_tracked).
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


def train_steps(module: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        y = torch.randn(8, 2, generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(module(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def step_with_gradient(module: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One optimizer step with a fixed, known gradient on every parameter."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()


def assert_identical(actual: nn.Module, expected: nn.Module) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        assert actual_state[name].dtype == value.dtype, name
        assert torch.equal(actual_state[name], value), name


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_module_and_optimizer_roundtrip(optimizer_name: str) -> None:
    factory = OPTIMIZERS[optimizer_name]
    original = make_module(seed=0)
    original_opt = factory(original.parameters())
    train_steps(original, original_opt, steps=3)

    data = encode_state(original, original_opt, key=KEY)

    restored = make_module(seed=1)  # different initial weights
    restored_opt = factory(restored.parameters())
    model_state, optim_state = decode_state(data, key=KEY)
    assert optim_state is not None
    restored.load_state_dict(model_state)
    restored_opt.load_state_dict(optim_state)
    assert_identical(restored, original)

    # The independent check: the next step depends on the optimizer state (momentum,
    # Adam moments and step count), so it matches only if that state came back exactly.
    step_with_gradient(original, original_opt, seed=5)
    step_with_gradient(restored, restored_opt, seed=5)
    assert_identical(restored, original)


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_the_optimizer_state_matters_to_the_next_step(optimizer_name: str) -> None:
    # Control for the test above: without the restored state the next step differs.
    factory = OPTIMIZERS[optimizer_name]
    original = make_module(seed=0)
    original_opt = factory(original.parameters())
    train_steps(original, original_opt, steps=3)
    model_state, _ = decode_state(encode_state(original, original_opt, key=KEY), key=KEY)
    fresh = make_module(seed=1)
    fresh.load_state_dict(model_state)
    fresh_opt = factory(fresh.parameters())

    step_with_gradient(original, original_opt, seed=5)
    step_with_gradient(fresh, fresh_opt, seed=5)
    fresh_weight, original_weight = fresh.state_dict()["0.weight"], original.state_dict()["0.weight"]
    assert not torch.equal(fresh_weight, original_weight)


def test_module_without_optimizer() -> None:
    module = make_module(seed=2)
    model_state, optim_state = decode_state(encode_state(module, key=KEY), key=KEY)
    assert optim_state is None
    restored = make_module(seed=3)
    restored.load_state_dict(model_state)
    assert_identical(restored, module)


def test_bytes_are_plain_safetensors() -> None:
    module = make_module(seed=0)
    optimizer = OPTIMIZERS["adam"](module.parameters())
    train_steps(module, optimizer, steps=1)
    data = encode_state(module, optimizer, key=KEY)

    # safetensors' own parser (which never unpickles) reads everything.
    tensors = safetensors.torch.load(data)
    for name, value in module.state_dict().items():
        assert torch.equal(tensors["model." + name], value), name
    optimizer_tensors = {name for name in tensors if not name.startswith("model.")}
    assert optimizer_tensors == {
        f"optim.{index}.{field}"
        for index in range(len(list(module.parameters())))
        for field in ("step", "exp_avg", "exp_avg_sq")
    }
    # The header holds tensor entries and string metadata only.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = header.pop("__metadata__")
    assert all(isinstance(value, str) for value in metadata.values())
    assert set(header) == set(tensors)


@pytest.mark.parametrize(
    "written_for",
    [
        "job-y/checkpoint/i00000003/s1",  # another job's
        "job-x/checkpoint/i00000002/s1",  # an earlier iteration's
        "job-x/checkpoint/i00000003/s0",  # another stage's
        None,  # bound to no key
    ],
)
def test_a_checkpoint_written_for_another_key_is_refused(written_for: str | None) -> None:
    module = make_module(seed=0)
    if written_for is None:
        data = codec.encode({"model." + name: value for name, value in module.state_dict().items()})
    else:
        data = encode_state(module, OPTIMIZERS["adam"](module.parameters()), key=written_for)
    with pytest.raises(ForeignObject) as info:
        decode_state(data, key=KEY)
    assert repr(KEY) in str(info.value)
    assert (repr(written_for) if written_for else "no key") in str(info.value)
    assert (info.value.key, info.value.written_for) == (KEY, written_for)


def test_not_safetensors_is_refused() -> None:
    with pytest.raises(IntegrityError):
        decode_state(pickle.dumps({"model.weight": [1.0]}), key=KEY)


@pytest.mark.parametrize(
    "header",
    [
        "{not json",
        json.dumps({"param_groups": []}),  # no "plain"
        json.dumps({"plain": {}}),  # no "param_groups"
        json.dumps({"param_groups": [], "plain": {"zero": {}}}),  # index is not a number
        json.dumps({"param_groups": [], "plain": [["0", {}]]}),  # plain is not an object
        json.dumps({"param_groups": {"params": [0]}, "plain": {}}),  # param_groups is not a list
        json.dumps({"param_groups": [{"lr": 0.1}], "plain": {}}),  # a group without params
        json.dumps([]),
    ],
)
def test_malformed_optimizer_header_is_refused(header: str) -> None:
    data = codec.encode({"model.w": torch.ones(2)}, {"optimizer": header, "key": KEY})
    with pytest.raises(IntegrityError, match="malformed optimizer header"):
        decode_state(data, key=KEY)


def test_malformed_optimizer_tensor_name_is_refused() -> None:
    header = json.dumps({"param_groups": [], "plain": {}})
    tensors = {"model.w": torch.ones(2), "optim.x.momentum_buffer": torch.ones(2)}
    data = codec.encode(tensors, {"optimizer": header, "key": KEY})
    with pytest.raises(IntegrityError, match="malformed optimizer header"):
        decode_state(data, key=KEY)


class _OpaqueStateOptimizer(torch.optim.Optimizer):
    """Keeps a non-JSON object in its per-parameter state."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["note"] = object()


def test_optimizer_state_that_is_not_json_is_a_clear_type_error() -> None:
    module = nn.Linear(2, 2)
    optimizer = _OpaqueStateOptimizer(module.parameters())
    optimizer.step()
    with pytest.raises(TypeError, match="_OpaqueStateOptimizer"):
        encode_state(module, optimizer, key=KEY)
