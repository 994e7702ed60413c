"""The profiler: byte counts worked out by hand, timings against a direct measurement, and its errors."""

from __future__ import annotations

import gc
import json
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import funcpipe
from funcpipe import ConfigError, profiler
from funcpipe.profiler import FORMAT_VERSION, LayerProfile, ModelProfile, _chunks, _fit, _isotonic, profile

FAST: dict[str, Any] = {"rounds": 2, "warmup": 1}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def data(samples: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(samples, 64, generator=generator), torch.randn(samples, 10, generator=generator)


class Square(nn.Module):
    """``x * x``: autograd saves ``x`` twice (as both factors), one storage."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class ModeSpy(nn.Module):
    """Records ``self.training`` at every forward, in a list its deep copies share."""

    seen: ClassVar[list[bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ModeSpy.seen.append(self.training)
        return x


# -- bytes -------------------------------------------------------------------


def test_bytes_of_a_small_mlp() -> None:
    result = profile(mlp(), *data(), F.mse_loss, **FAST)
    first, relu, last = result.layers
    assert [layer.name for layer in result.layers] == ["0", "1", "2"]
    assert first.param_bytes == (64 * 256 + 256) * 4
    assert last.param_bytes == (256 * 10 + 10) * 4
    assert result.param_bytes == first.param_bytes + last.param_bytes
    assert relu.param_bytes == relu.optimizer_bytes == 0 and relu.update_s == 0.0
    assert first.output_bytes_per_sample == relu.output_bytes_per_sample == 256 * 4
    assert last.output_bytes_per_sample == 10 * 4
    assert result.input_bytes_per_sample == 64 * 4
    assert result.target_bytes_per_sample == 10 * 4
    assert result.micro_batch_sizes == (1, 2, 4)
    assert result.num_layers == 3


def test_held_bytes_are_what_autograd_saves_without_the_parameters() -> None:
    result = profile(mlp(), *data(), F.mse_loss, **FAST)
    first, relu, last = result.layers
    # addmm keeps its input (64 floats) for the weight's gradient; the weight is a parameter.
    assert first.held_bytes_per_sample == 64 * 4
    # relu keeps its output, to mask the gradient.
    assert relu.held_bytes_per_sample == 256 * 4
    # The last Linear keeps its input too, relu's output, counted once (as relu's); its input
    # needs a gradient, so addmm also saves weight.t(): a parameter's storage, not counted.
    assert last.held_bytes_per_sample == 0


def test_a_tensor_two_layers_save_is_counted_once() -> None:
    """What the layers of a stage hold adds up to the bytes its saved tensors occupy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 10))
    inputs, targets = data()
    result = profile(model, inputs, targets, F.mse_loss, **FAST)
    # Independently: the distinct storages autograd saves over the whole model, without parameters.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs[:4])
    assert sum(layer.held_bytes_per_sample for layer in result.layers) * 4 == sum(storages.values())
    assert [layer.held_bytes_per_sample for layer in result.layers] == [64 * 4, 256 * 4, 0, 128 * 4, 0]


def test_a_tensor_saved_twice_is_held_once() -> None:
    model = nn.Sequential(nn.Linear(64, 32), Square(), nn.Linear(32, 10))
    result = profile(model, *data(), F.mse_loss, **FAST)
    assert result.layers[1].held_bytes_per_sample == 32 * 4
    assert result.layers[1].param_bytes == 0


def test_the_probe_keeps_no_output_alive_through_its_own_graph() -> None:
    # A saved output packed as itself would hold its graph in a cycle that is never freed
    # (the probe then kept every layer's activations: AmoebaNet at micro-batch 64 ran out of memory).
    saved = profiler._SavedBytes(set())
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, profiler._unpack):
        y = torch.sigmoid(x)  # saves its output
    assert saved.total == 4 * 8 * 4
    alive = weakref.ref(y)
    del y
    gc.collect()
    assert alive() is None


def test_held_bytes_are_per_sample_at_the_largest_size() -> None:
    result = profile(mlp(), *data(8), F.mse_loss, micro_batch_sizes=(2, 8), **FAST)
    assert result.micro_batch_sizes == (2, 8)
    assert result.layers[0].held_bytes_per_sample == 64 * 4
    assert result.layers[1].output_bytes_per_sample == 256 * 4


@pytest.mark.parametrize(
    ("factory", "state_floats"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),  # a momentum buffer per parameter
        (lambda p: torch.optim.Adam(p, lr=1e-3), 2),  # exp_avg and exp_avg_sq, plus 'step' scalars
        (None, 2),  # the default: Adam
    ],
)
def test_optimizer_state_bytes(factory: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer] | None,
                               state_floats: int) -> None:
    result = profile(mlp(), *data(), F.mse_loss, optimizer=factory, **FAST)
    first, relu, last = result.layers
    assert relu.optimizer_bytes == 0
    for layer in (first, last):
        expected = state_floats * layer.param_bytes
        # Adam's per-parameter 'step' counters are small tensors of their own.
        slack = 64 if state_floats == 2 else 0
        assert expected <= layer.optimizer_bytes <= expected + slack
        assert layer.update_s > 0


def test_frozen_parameters_are_not_counted() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    result = profile(model, *data(), F.mse_loss, **FAST)
    assert result.layers[0].param_bytes == result.layers[0].optimizer_bytes == 0
    assert result.layers[0].update_s == 0.0
    assert result.layers[2].param_bytes == (256 * 10 + 10) * 4


def test_integer_token_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 16), nn.Flatten(), nn.Linear(5 * 16, 3))
    tokens = torch.randint(0, 100, (4, 5))
    labels = torch.randint(0, 3, (4,))
    result = profile(model, tokens, labels, F.cross_entropy, **FAST)
    embedding, flatten, linear = result.layers
    assert result.input_bytes_per_sample == 5 * 8  # int64 ids
    assert result.target_bytes_per_sample == 8
    assert embedding.param_bytes == 100 * 16 * 4
    assert embedding.held_bytes_per_sample == 5 * 8  # the ids, to scatter the gradient
    assert embedding.output_bytes_per_sample == 5 * 16 * 4
    assert flatten.held_bytes_per_sample == 0
    assert linear.held_bytes_per_sample == 5 * 16 * 4
    assert embedding.backward_s(4) > 0  # the embedding's weight gets its gradient


def test_an_in_place_layer_is_profiled_without_touching_the_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Linear(32, 10))
    inputs, targets = data()
    before = inputs.clone()
    result = profile(model, inputs, targets, F.mse_loss, **FAST)
    assert torch.equal(inputs, before)
    assert result.layers[2].held_bytes_per_sample == 32 * 4
    assert result.layers[2].backward_s(4) > 0


# -- times -------------------------------------------------------------------


def _direct_seconds(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor, repeats: int = 15) -> tuple[float, float]:
    """Median forward and backward seconds of ``layer`` on ``x``, timed here with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    forward, backward = [], []
    try:
        for i in range(3 + repeats):
            started = time.perf_counter()
            y = layer(x)
            middle = time.perf_counter()
            y.backward(grad)
            if i >= 3:
                forward.append(middle - started)
                backward.append(time.perf_counter() - middle)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(forward), statistics.median(backward)


def test_times_grow_with_the_batch_and_are_seconds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.Linear(2048, 4))
    inputs, targets = torch.randn(64, 512), torch.randn(64, 4)
    # The same work timed directly, before and after (the machine's load may drift in between).
    layer, grad = nn.Linear(512, 2048), torch.randn(64, 2048)
    before = _direct_seconds(layer, inputs, grad)
    result = profile(model, inputs, targets, F.mse_loss, micro_batch_sizes=(1, 16, 64), rounds=7)
    after = _direct_seconds(layer, inputs, grad)
    big = result.layers[0]
    assert big.forward_beta_s > 0
    assert big.forward_s(64) > big.forward_s(1)
    assert big.backward_s(64) > 0
    # Seconds, and per round (not summed over rounds): the forward fit at 64 is within a factor
    # of 3 of the direct timing; the backward's, whose 4 MB weight gradient makes it noisier
    # (allocation, page faults), within a factor of 5.
    assert min(before[0], after[0]) / 3 < big.forward_s(64) < max(before[0], after[0]) * 3
    assert min(before[1], after[1]) / 5 < big.backward_s(64) < max(before[1], after[1]) * 5


class Cut(nn.Module):
    """Passes its input on without a gradient: nothing flows back through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() + 1


@pytest.mark.parametrize("budget", [0, 2**40])  # a chunk per layer; one chunk
def test_a_layer_no_gradient_reaches_has_no_backward_time(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    monkeypatch.setattr(profiler, "ROUND_HELD_BYTES", budget)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), Cut(), nn.Linear(32, 10))
    result = profile(model, *data(8), F.mse_loss, rounds=1, warmup=0)
    first, cut, last = result.layers
    assert first.backward_measured_s == (0.0,) * 4 and cut.backward_measured_s == (0.0,) * 4
    assert first.backward_s(64) == 0.0
    assert last.backward_measured_s is not None


def test_fit_recovers_a_line_and_never_goes_negative() -> None:
    alpha, beta = _fit((1, 2, 4), (1e-3 + 2e-4, 1e-3 + 4e-4, 1e-3 + 8e-4))
    assert alpha == pytest.approx(1e-3) and beta == pytest.approx(2e-4)
    # Falling times (noise on a tiny layer): the best line with no slope is the mean.
    alpha, beta = _fit((1, 2, 4), (3e-6, 2e-6, 1e-6))
    assert alpha == pytest.approx(2e-6) and beta == 0.0
    # A negative intercept: the best line through zero, sum(b*t) / sum(b*b).
    alpha, beta = _fit((1, 2, 4), (0.0, 1.0, 3.0))
    assert alpha == 0.0 and beta == pytest.approx(14 / 21)


# -- the sizes measured, and the times between them --------------------------


def layer(sizes: tuple[int, ...] | None = None, forward: tuple[float, ...] | None = None,
          backward: tuple[float, ...] | None = None, **fit: float) -> LayerProfile:
    """A hand-made layer: a linear fit ``fit`` (default 1 ms + 0.1 ms/sample), and measured times if given."""
    coefficients = {"forward_alpha_s": 1e-3, "forward_beta_s": 1e-4, "backward_alpha_s": 2e-3,
                    "backward_beta_s": 2e-4, **fit}
    return LayerProfile(name="x", **coefficients, param_bytes=0, optimizer_bytes=0, update_s=0.0,
                        output_bytes_per_sample=0.0, held_bytes_per_sample=0.0, measured_sizes=sizes,
                        forward_measured_s=forward, backward_measured_s=backward)


@pytest.mark.parametrize(
    ("samples", "options", "sizes"),
    [
        (4, {}, (1, 2, 4)),
        (2, {}, (1, 2)),
        (48, {}, (1, 2, 4, 8, 16, 32, 48)),
        (100, {}, (1, 2, 4, 8, 16, 32, 64)),
        (100, {"max_micro_batch": 8}, (1, 2, 4, 8)),
        (100, {"max_micro_batch": 12}, (1, 2, 4, 8, 12)),
        (100, {"max_micro_batch": 128}, (1, 2, 4, 8, 16, 32, 64, 100)),
        (100, {"micro_batch_sizes": [3, 1, 3]}, (1, 3)),
    ],
)
def test_default_sizes_are_powers_of_two_capped_by_the_samples(
    samples: int, options: dict[str, Any], sizes: tuple[int, ...]
) -> None:
    result = profile(mlp(), *data(samples), F.mse_loss, rounds=1, warmup=0, **options)
    assert result.micro_batch_sizes == sizes
    assert all(lp.measured_sizes == sizes for lp in result.layers)


def test_a_profile_predicts_its_measured_times_and_never_less_for_more_samples() -> None:
    result = profile(mlp(), *data(64), F.mse_loss, rounds=1, warmup=0)
    for lp in result.layers:
        assert lp.measured_sizes is not None and lp.forward_measured_s is not None
        assert lp.backward_measured_s is not None
        for b, f, g in zip(lp.measured_sizes, lp.forward_measured_s, lp.backward_measured_s, strict=True):
            assert lp.forward_s(b) == f and lp.backward_s(b) == g
        forward = [lp.forward_s(b) for b in range(1, 129)]
        backward = [lp.backward_s(b) for b in range(1, 129)]
        assert forward == sorted(forward) and backward == sorted(backward)
        assert min(forward) >= 0


def test_times_are_piecewise_linear_between_sizes_and_go_on_with_the_end_slopes() -> None:
    lp = layer((2, 4, 8), (1.0, 1.0, 3.0), (2.0, 4.0, 4.0))
    # Worked by hand: between 4 and 8 the forward climbs 0.5 per sample, below 4 it is flat.
    assert [lp.forward_s(b) for b in (2, 3, 4, 5, 6, 8)] == [1.0, 1.0, 1.0, 1.5, 2.0, 3.0]
    assert lp.forward_s(16) == 3.0 + 8 * 0.5 and lp.forward_s(64) == 3.0 + 56 * 0.5
    assert lp.forward_s(1) == 1.0  # below the smallest size: the first segment's slope, 0
    assert lp.backward_s(3) == 3.0 and lp.backward_s(1) == 1.0  # the first segment's slope, 1 per sample
    assert lp.backward_s(64) == 4.0  # the last segment is flat
    steep = layer((4, 8), (0.5, 4.5), (0.0, 1.0))
    assert steep.forward_s(1) == 0.0  # 0.5 - 3 * 1.0 < 0: never negative
    # Without measured times: the linear fit.
    linear = layer()
    assert linear.forward_s(10) == pytest.approx(1e-3 + 10 * 1e-4)
    assert linear.backward_s(10) == pytest.approx(2e-3 + 10 * 2e-4)


def test_chunks_hold_at_most_the_budget_and_cover_every_layer() -> None:
    assert _chunks([1.0, 2.0, 3.0], 10.0) == [range(0, 3)]
    assert _chunks([1.0, 2.0, 3.0, 4.0], 5.0) == [range(0, 2), range(2, 3), range(3, 4)]  # 1+2, 3, 4
    assert _chunks([6.0, 1.0, 7.0], 5.0) == [range(0, 1), range(1, 2), range(2, 3)]  # a layer alone may exceed it
    assert _chunks([0.0, 0.0], 0.0) == [range(0, 2)]
    assert _chunks([1.0], 0.0) == [range(0, 1)]


def test_a_round_in_chunks_measures_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiler, "ROUND_HELD_BYTES", 0)  # each layer its own chunk, on a random gradient
    result = profile(mlp(), *data(), F.mse_loss, rounds=1, warmup=0)
    assert all(lp.backward_measured_s is not None and lp.backward_measured_s[-1] > 0 for lp in result.layers)


def test_isotonic_regression_pools_what_falls() -> None:
    assert _isotonic([1.0, 2.0, 3.0]) == (1.0, 2.0, 3.0)
    assert _isotonic([3.0, 1.0, 2.0]) == (2.0, 2.0, 2.0)  # (3 + 1) / 2 = 2, then 2 <= 2
    assert _isotonic([1.0, 3.0, 2.0, 4.0]) == (1.0, 2.5, 2.5, 4.0)
    assert _isotonic([4.0, 3.0, 2.0, 1.0]) == (2.5, 2.5, 2.5, 2.5)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"sizes": (1, 2)}, "go together"),
        ({"sizes": (1, 2), "forward": (1.0, 2.0)}, "go together"),
        ({"sizes": (2, 1), "forward": (1.0, 2.0), "backward": (1.0, 2.0)}, r"ascending.*got \(2, 1\); hint"),
        ({"sizes": (4,), "forward": (1.0,), "backward": (1.0,)}, r"at least two.*got \(4,\)"),
        ({"sizes": (0, 2), "forward": (1.0, 2.0), "backward": (1.0, 2.0)}, r"positive.*got \(0, 2\)"),
        ({"sizes": (1, 2), "forward": (1.0, 2.0, 3.0), "backward": (1.0, 2.0)},
         r"forward_measured_s must be 2 .*got \(1.0, 2.0, 3.0\)"),
        ({"sizes": (1, 2), "forward": (1.0, 2.0), "backward": (2.0, 1.0)},
         r"backward_measured_s must be .*non-decreasing.*got \(2.0, 1.0\); hint"),
        ({"sizes": (1, 2), "forward": (-1.0, 2.0), "backward": (1.0, 2.0)}, r"non-negative.*got \(-1.0, 2.0\)"),
        ({"sizes": (1, 2), "forward": (float("nan"), 2.0), "backward": (1.0, 2.0)}, "non-negative"),
        ({"sizes": 4, "forward": (1.0, 2.0), "backward": (1.0, 2.0)}, "measured_sizes must be a sequence"),
    ],
)
def test_bad_measured_times_are_named(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        layer(**fields)


# -- the user's model and process are left alone -----------------------------


def test_the_model_threads_and_rng_are_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), ModeSpy(), nn.Dropout(0.5), nn.Linear(32, 10))
    model.eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    ModeSpy.seen.clear()
    profile(model, *data(), F.mse_loss, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), **FAST)
    assert ModeSpy.seen and all(ModeSpy.seen)  # profiled in train mode
    assert not model.training and not any(m.training for m in model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_threads_are_restored_after_an_error() -> None:
    threads = torch.get_num_threads()
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(128, 10))
    with pytest.raises(ConfigError):
        profile(model, *data(), F.mse_loss, **FAST)
    assert torch.get_num_threads() == threads


def test_machine_says_where_it_was_measured() -> None:
    result = profile(mlp(), *data(), F.mse_loss, rounds=3, warmup=0)
    machine = result.machine
    assert machine["threads"] == 1 and machine["rounds"] == 3 and machine["warmup"] == 0
    assert machine["torch"] == torch.__version__
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    assert machine["measured_at"].endswith("+00:00")
    assert machine["python"].count(".") == 2


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    profile(mlp(), *data(), F.mse_loss, progress=True, **FAST)
    assert "profiling" in capsys.readouterr().err
    profile(mlp(), *data(), F.mse_loss, **FAST)  # 3 layers: quick, no bar
    assert capsys.readouterr().err == ""
    many = nn.Sequential(*[nn.Identity() for _ in range(21)], nn.Linear(64, 10))
    profile(many, *data(), F.mse_loss, rounds=1, warmup=0)
    assert "profiling" in capsys.readouterr().err
    profile(many, *data(), F.mse_loss, rounds=1, warmup=0, progress=False)
    assert capsys.readouterr().err == ""


def test_profile_is_exported() -> None:
    assert funcpipe.profile is profile


# -- save and load -----------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    result = profile(mlp(), *data(), F.mse_loss, **FAST)
    path = tmp_path / "profile.json"
    result.save(path)
    loaded = ModelProfile.load(path)
    assert loaded == result
    assert loaded.machine == result.machine
    assert all(isinstance(layer, LayerProfile) for layer in loaded.layers)


def test_a_format_1_file_still_loads_as_linear_fits(tmp_path: Path) -> None:
    fields = {"name": "0", "forward_alpha_s": 0.001, "forward_beta_s": 0.0005, "backward_alpha_s": 0.002,
              "backward_beta_s": 0.001, "param_bytes": 400, "optimizer_bytes": 800, "update_s": 1e-5,
              "output_bytes_per_sample": 40.0, "held_bytes_per_sample": 80.0}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": 1, "layers": [fields], "input_bytes_per_sample": 256.0,
                                "target_bytes_per_sample": 40.0, "micro_batch_sizes": [1, 2, 4],
                                "machine": {"cpu": "old"}}))
    loaded = ModelProfile.load(path)
    only = loaded.layers[0]
    assert only.measured_sizes is None and only.param_bytes == 400
    assert only.forward_s(64) == pytest.approx(0.001 + 64 * 0.0005)
    assert only.backward_s(16) == pytest.approx(0.002 + 16 * 0.001)
    assert loaded.micro_batch_sizes == (1, 2, 4) and loaded.machine == {"cpu": "old"}
    assert loaded.to_dict()["format"] == FORMAT_VERSION == 2  # saved again in the new format


def test_measured_times_survive_save_and_load(tmp_path: Path) -> None:
    result = ModelProfile(layers=(layer((1, 4), (1.0, 2.0), (3.0, 5.0)),), input_bytes_per_sample=1.0,
                          target_bytes_per_sample=1.0, micro_batch_sizes=(1, 4))
    path = tmp_path / "p.json"
    result.save(path)
    assert json.loads(path.read_text())["layers"][0]["forward_measured_s"] == [1.0, 2.0]
    loaded = ModelProfile.load(path)
    assert loaded == result
    assert loaded.layers[0].measured_sizes == (1, 4)  # a tuple again
    assert loaded.layers[0].backward_s(2) == pytest.approx(3.0 + 2.0 / 3)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (json.dumps({"layers": []}), "not a funcpipe model profile"),
        (json.dumps([1, 2]), "not a funcpipe model profile"),
        (json.dumps({"format": 1, "layers": [{"name": "0"}]}), "malformed"),
        (json.dumps({"format": 3, "layers": []}), r"format 1 or 2 \(found format 3\)"),
        ("{not json", "not JSON"),
    ],
)
def test_load_rejects_what_is_not_a_profile(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        ModelProfile.load(path)


def test_load_of_a_missing_file_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no profile at"):
        ModelProfile.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="cannot read profile"):
        ModelProfile.load(tmp_path)


# -- errors ------------------------------------------------------------------


def _bad_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target, reduction="none")


def _raising_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    raise ValueError("boom")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: profile([nn.Linear(64, 10)], *data(), F.mse_loss),  # type: ignore[arg-type]
         r"got list.*wrap your layers in nn.Sequential"),
        # Any other module is split into units (tests/test_profiler_traced.py); its inputs are tensors.
        (lambda: profile(nn.Linear(64, 10), "x", data()[1], F.mse_loss), r"got str; hint"),
        (lambda: profile(nn.Sequential(), *data(), F.mse_loss), "empty"),
        (lambda: profile(mlp(), *data(3), F.mse_loss, micro_batch_sizes=(1, 2, 4)),
         r"inputs hold 3 samples.*largest micro-batch size is 4"),
        (lambda: profile(mlp(), data()[0], torch.randn(2, 10), F.mse_loss, micro_batch_sizes=(1, 4)),
         r"targets hold 2 samples"),
        (lambda: profile(mlp(), *data(1), F.mse_loss), r"at least 2 samples.*got 1; hint"),
        (lambda: profile(mlp(), *data(), F.mse_loss, micro_batch_sizes=(1, 2.5)),  # type: ignore[arg-type]
         r"got 2.5 in \(1, 2.5\); hint"),
        (lambda: profile(mlp(), *data(), F.mse_loss, micro_batch_sizes=(True, 2)), r"got True in"),
        (lambda: profile(mlp(), *data(), F.mse_loss, micro_batch_sizes="124"), "sequence of positive integers"),  # type: ignore[arg-type]
        (lambda: profile(mlp(), *data(), F.mse_loss, max_micro_batch=1), r"max_micro_batch .* got 1; hint"),
        (lambda: profile(mlp(), *data(), F.mse_loss, max_micro_batch="8"), r"got '8'"),  # type: ignore[arg-type]
        (lambda: profile(mlp(), *data(), F.mse_loss, micro_batch_sizes=(1, 2), max_micro_batch=2), "not both"),
        (lambda: profile(mlp(), *data(), _bad_loss, **FAST), r"loss_fn returned \(4, 10\).*mean"),
        (lambda: profile(mlp(), *data(), _raising_loss, **FAST), r"loss_fn failed.*ValueError: boom"),
        (lambda: profile(mlp(), *data(), F.mse_loss, micro_batch_sizes=(4,)), "at least 2 distinct"),
        (lambda: profile(mlp(), *data(), F.mse_loss, micro_batch_sizes=(2, 2)), "at least 2 distinct"),
        (lambda: profile(mlp(), *data(), F.mse_loss, micro_batch_sizes=(0, 2)), "positive integers"),
        (lambda: profile(mlp(), *data(), F.mse_loss, rounds=0), "rounds must be"),
        (lambda: profile(mlp(), *data(), F.mse_loss,
                         optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1)),  # type: ignore[arg-type]
         "factory, not an optimizer instance"),
        (lambda: profile(mlp(), data()[0].tolist(), data()[1], F.mse_loss),  # type: ignore[arg-type]
         "inputs must be a torch.Tensor"),
        (lambda: profile(nn.Sequential(Pair(), nn.Linear(64, 10)), *data(), F.mse_loss, **FAST),
         r"layer 0 \('0', Pair\) returned tuple"),
        (lambda: profile(mlp(), *data(), F.mse_loss, optimizer=lambda p: None, **FAST),  # type: ignore[arg-type,return-value]
         "not a torch.optim.Optimizer"),
    ],
)
def test_bad_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


def test_a_failing_layer_is_named_with_its_input_shape() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(128, 10))
    with pytest.raises(ConfigError, match=r"layer 2 \('2', Linear\).*shape \(4, 256\).*RuntimeError") as info:
        profile(model, *data(), F.mse_loss, **FAST)
    assert isinstance(info.value.__cause__, RuntimeError)


class _Decoder(nn.Module):
    """Logits from hidden states by a weight it is given (BERT's tied decoder)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def tied_model() -> nn.Sequential:
    embedding = nn.Embedding(50, 8)
    return nn.Sequential(embedding, nn.Linear(8, 8), _Decoder(embedding.weight))


def test_tied_parameters_are_found_and_counted_once(tmp_path: Path) -> None:
    model = tied_model()
    assert profiler.tied_parameters(model) == ((0, 2, 50 * 8 * 4),)
    assert profiler.tied_parameters(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == ()
    ids = torch.randint(0, 50, (4, 3))
    prof = profile(model, ids, torch.randint(0, 50, (4, 3)),
                   lambda out, y: F.cross_entropy(out.reshape(-1, 50), y.reshape(-1)), rounds=1, warmup=0)
    assert prof.tied == ((0, 2, 1600),)
    distinct = sum(p.numel() * 4 for p in model.parameters())  # parameters() lists a shared one once
    assert prof.param_bytes == distinct
    assert sum(lp.param_bytes for lp in prof.layers) == distinct + 1600
    path = tmp_path / "p.json"
    prof.save(path)
    assert ModelProfile.load(path).tied == prof.tied


def test_a_tie_that_does_not_fit_the_layers_is_refused() -> None:
    base = LayerProfile(name="x", forward_alpha_s=0.0, forward_beta_s=0.1, backward_alpha_s=0.0, backward_beta_s=0.1,
                        param_bytes=100, optimizer_bytes=0, update_s=0.0, output_bytes_per_sample=4.0,
                        held_bytes_per_sample=4.0)
    with pytest.raises(ConfigError, match="tied parameters"):
        ModelProfile((base, base), 4.0, 4.0, tied=((1, 0, 50),))
    with pytest.raises(ConfigError, match="tied parameters"):
        ModelProfile((base, base), 4.0, 4.0, tied=((0, 1, 500),))


def test_a_profile_prints_as_a_table_of_its_layers_with_their_types(tmp_path: Any) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    profile = funcpipe.profile(model, torch.randn(4, 8), torch.randint(0, 3, (4,)), nn.functional.cross_entropy,
                               micro_batch_sizes=(1, 2), rounds=1, warmup=0, progress=False)
    text = str(profile)
    rows = [line.split() for line in text.splitlines()[2:5]]
    assert [row[:3] for row in rows] == [["0", "0", "Linear"], ["1", "1", "ReLU"], ["2", "2", "Linear"]]
    assert float(rows[0][5]) == pytest.approx((8 * 16 + 16) * 4 / 2**20, abs=1e-3)  # params MB
    assert "<table" in profile._repr_html_() and "ReLU" in profile._repr_html_()
    path = tmp_path / "p.json"
    profile.save(path)
    assert [layer.kind for layer in ModelProfile.load(path).layers] == ["Linear", "ReLU", "Linear"]
    older = profile.to_dict()
    for layer in older["layers"]:
        del layer["kind"]
    assert str(ModelProfile.from_dict(older)).splitlines()[2].split()[2] == "?"  # a profile of before: no type
