"""Profiler: per-layer time, memory and activation size of a model.

An ``nn.Sequential`` is measured layer by layer; any other ``nn.Module`` is split
into units (:func:`funcpipe.split.split`) and each unit is measured as a layer.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import datetime
import itertools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn
from tqdm.auto import tqdm

from funcpipe import protocol
from funcpipe.errors import ConfigError
from funcpipe.jsonfile import read_json
from funcpipe.probe import cpu_name

if TYPE_CHECKING:
    from funcpipe.report import Report

__all__ = ["LayerProfile", "ModelProfile", "default_optimizer", "profile"]

log = logging.getLogger(__name__)

#: The clock the layers are timed with: the calling thread's CPU time. With one
#: torch thread, a CPU layer's forward, backward and optimizer step all run on
#: the calling thread, so this is their compute time, and time the thread spends
#: waiting for a core another process holds is not counted (wall time is, and
#: swings with the machine's load).
_clock = time.thread_time

#: Models with more layers than this show a progress bar unless ``progress=False``.
PROGRESS_MIN_LAYERS = 20

M = TypeVar("M", bound=nn.Module)

OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
#: ``loss_fn(output, target)``: the output is what the model returns (a tensor, a tuple, a ``ModelOutput``...).
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

#: Version of the JSON layout written by :meth:`ModelProfile.save`. Format 1 (no
#: per-size times: the layers' times are the linear fit) is still read.
FORMAT_VERSION = 2

#: Formats :meth:`ModelProfile.load` reads.
READABLE_FORMATS = (1, 2)

#: What one timed round may hold, in bytes of activations and outputs (as the
#: probe measures them): a round runs the layers in chunks of at most this much,
#: each chunk's forwards then its backwards, so large micro-batches of large
#: models fit in memory. A model within it runs as one chunk, as a stage would.
ROUND_HELD_BYTES = 4 * 2**30

#: The largest micro-batch size :func:`profile` measures unless told otherwise
#: (capped by the samples it is given): the benchmarks' global batch.
DEFAULT_MAX_MICRO_BATCH = 64


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """What one layer costs, measured on the profiling machine with one torch thread.

    Times are seconds for a micro-batch of ``b`` samples. A profile measured
    by :func:`profile` keeps the time measured at every size it measured
    (``measured_sizes``, ``forward_measured_s``, ``backward_measured_s``) and
    predicts between them piecewise linearly; below the smallest and above the
    largest size it goes on with the slope of the first / last segment.
    Without them (a layer built by hand, or read from a format 1 file) the
    times are the linear fit ``alpha + beta * b``, which is also kept for
    reporting.

    Attributes:
        name: the layer's name in the ``nn.Sequential`` (``"0"``, ``"encoder"``).
        forward_alpha_s, forward_beta_s: forward time, least-squares fit
            ``alpha + beta * b`` to the measured times.
        backward_alpha_s, backward_beta_s: backward time fit (the last layer's
            includes the loss's forward and backward).
        param_bytes: bytes of the layer's trainable parameters.
        optimizer_bytes: bytes of optimizer state the layer's parameters need.
        update_s: seconds of one optimizer step over the layer's parameters.
        output_bytes_per_sample: bytes of the layer's output per sample (what a
            stage ending at this layer sends to the next stage: of a traced unit,
            every value crossing the cut after it).
        held_bytes_per_sample: bytes the layer keeps for backward per sample
            (tensors saved by autograd), held while a micro-batch waits for its
            backward pass.
        measured_sizes: the micro-batch sizes the times were measured at,
            ascending, at least two; ``None``: use the linear fit.
        forward_measured_s, backward_measured_s: the seconds at those sizes,
            non-decreasing (the profiler makes the medians so by isotonic
            regression: one more sample never costs less time).
        grad_bytes_per_sample: bytes per sample of the gradient a stage ending at
            this layer receives back (the crossing values that carry a gradient:
            token ids, masks and sizes travel forward only); ``None``: the whole
            output's (:attr:`gradient_bytes_per_sample`). At most
            ``output_bytes_per_sample``.
    """

    name: str
    forward_alpha_s: float
    forward_beta_s: float
    backward_alpha_s: float
    backward_beta_s: float
    param_bytes: int
    optimizer_bytes: int
    update_s: float
    output_bytes_per_sample: float
    held_bytes_per_sample: float
    measured_sizes: tuple[int, ...] | None = None
    forward_measured_s: tuple[float, ...] | None = None
    backward_measured_s: tuple[float, ...] | None = None
    grad_bytes_per_sample: float | None = None
    #: The layer's class (``"Linear"``; of a traced unit, the module it is named after); ``""``: not recorded.
    kind: str = ""

    def __post_init__(self) -> None:
        grad = self.grad_bytes_per_sample
        if grad is not None and (isinstance(grad, bool) or not isinstance(grad, int | float)
                                 or not 0 <= grad <= self.output_bytes_per_sample):
            raise ConfigError(
                f"layer {self.name!r}: grad_bytes_per_sample must be between 0 and output_bytes_per_sample "
                f"({self.output_bytes_per_sample!r}), got {grad!r}; hint: the gradient crossing back is that of "
                "the output's values that carry one, never more than the output; None: the whole output's"
            )
        given = [v is not None for v in (self.measured_sizes, self.forward_measured_s, self.backward_measured_s)]
        if not any(given):
            return
        if not all(given):
            raise ConfigError(
                f"layer {self.name!r}: measured_sizes, forward_measured_s and backward_measured_s go together, "
                "got only some of them; hint: give all three, or none for the linear fit"
            )
        assert self.measured_sizes is not None and self.forward_measured_s is not None
        assert self.backward_measured_s is not None
        sizes = _as_tuple(self.name, "measured_sizes", self.measured_sizes)
        if (len(sizes) < 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes)
                or any(a >= b for a, b in itertools.pairwise(sizes))):
            raise ConfigError(
                f"layer {self.name!r}: measured_sizes must be at least two ascending positive integers, "
                f"got {self.measured_sizes!r}; hint: measured_sizes=(1, 2, 4)"
            )
        object.__setattr__(self, "measured_sizes", sizes)
        for field in ("forward_measured_s", "backward_measured_s"):
            seconds = _as_tuple(self.name, field, getattr(self, field))
            if (len(seconds) != len(sizes)
                    or any(isinstance(t, bool) or not isinstance(t, int | float) or not t >= 0 for t in seconds)
                    or any(a > b for a, b in itertools.pairwise(seconds))):
                raise ConfigError(
                    f"layer {self.name!r}: {field} must be {len(sizes)} non-negative, non-decreasing seconds "
                    f"(one per measured size {sizes}), got {getattr(self, field)!r}; hint: a time that drops "
                    "as the micro-batch grows is noise: re-measure, or give the non-decreasing fit"
                )
            object.__setattr__(self, field, tuple(float(t) for t in seconds))

    @property
    def gradient_bytes_per_sample(self) -> float:
        """Bytes per sample of the gradient crossing back over a cut after this layer."""
        return self.output_bytes_per_sample if self.grad_bytes_per_sample is None else self.grad_bytes_per_sample

    def forward_s(self, batch: int) -> float:
        """Forward seconds for a micro-batch of ``batch`` samples (never negative)."""
        if self.measured_sizes is None or self.forward_measured_s is None:
            return max(0.0, self.forward_alpha_s + self.forward_beta_s * batch)
        return _interpolate(self.measured_sizes, self.forward_measured_s, batch)

    def backward_s(self, batch: int) -> float:
        """Backward seconds for a micro-batch of ``batch`` samples (never negative)."""
        if self.measured_sizes is None or self.backward_measured_s is None:
            return max(0.0, self.backward_alpha_s + self.backward_beta_s * batch)
        return _interpolate(self.measured_sizes, self.backward_measured_s, batch)


def _as_tuple(layer: str, field: str, value: object) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"layer {layer!r}: {field} must be a sequence, got {type(value).__name__}")
    return tuple(value)


def _interpolate(sizes: tuple[int, ...], seconds: tuple[float, ...], batch: float) -> float:
    """Piecewise-linear through ``(sizes, seconds)``; the end segments' slopes outside; never negative."""
    i = bisect.bisect_left(sizes, batch)
    i = min(max(i, 1), len(sizes) - 1)  # the segment [i - 1, i]; the first / last one outside
    b0, b1 = sizes[i - 1], sizes[i]
    t0, t1 = seconds[i - 1], seconds[i]
    return max(0.0, t0 + (t1 - t0) * (batch - b0) / (b1 - b0))


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """A model's per-layer profile; reusable across plans and platforms.

    Attributes:
        layers: one entry per layer of the ``nn.Sequential`` (per unit of any other
            module, :func:`funcpipe.split.split`), in order.
        input_bytes_per_sample: bytes of one sample of the model's input (every
            input tensor's: what the driver uploads for stage 0).
        target_bytes_per_sample: bytes of one sample's target (for the last stage).
        micro_batch_sizes: the sizes the times were measured at.
        machine: where it was measured: ``{"cpu": ..., "torch": ..., "threads": 1, ...}``.
        tied: ``(i, j, nbytes)`` for each pair of layers ``i < j`` that share trainable
            parameters of ``nbytes`` bytes (a tied decoder and embedding,
            :func:`tied_parameters`); both layers' ``param_bytes`` count them. A stage
            holding both holds them once; stages holding one each hold a copy each and
            add their gradients every iteration (:mod:`funcpipe.costmodel`).
    """

    layers: tuple[LayerProfile, ...]
    input_bytes_per_sample: float
    target_bytes_per_sample: float
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4)
    machine: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    tied: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("a model profile needs at least one layer; the model was empty")
        ties = tuple((int(i), int(j), int(n)) for i, j, n in self.tied)
        for i, j, n in ties:
            if not 0 <= i < j < len(self.layers) or n <= 0 or n > min(self.layers[i].param_bytes,
                                                                      self.layers[j].param_bytes):
                raise ConfigError(
                    f"tied parameters ({i}, {j}, {n}) do not fit the profile's {len(self.layers)} layers; hint: "
                    "(first layer, later layer, bytes shared), bytes at most either layer's param_bytes"
                )
        object.__setattr__(self, "tied", ties)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def param_bytes(self) -> int:
        """Bytes of the model's distinct trainable parameters (a tied one once)."""
        return sum(layer.param_bytes for layer in self.layers) - sum(n for _, _, n in self.tied)

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-able data; a layer's ``grad_bytes_per_sample`` only where it is set
        (so a profile without one reads as before, in any version that reads this format)."""
        data = {"format": FORMAT_VERSION, **dataclasses.asdict(self)}
        for layer in data["layers"]:
            if layer["grad_bytes_per_sample"] is None:
                del layer["grad_bytes_per_sample"]
            if not layer["kind"]:
                del layer["kind"]
        return data

    def table(self, micro_batch_size: int | None = None) -> Report:
        """Per layer: its index, name, type, forward and backward ms (at ``micro_batch_size``, default the
        largest measured), parameters, and the bytes per sample it sends on and keeps for backward."""
        from funcpipe.report import profile_report

        return profile_report(self, micro_batch_size)

    def __str__(self) -> str:
        return str(self.table())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        """The inverse of :meth:`to_dict`; also reads format 1 (times as linear fits only).

        Raises:
            ConfigError: the data is not a profile of this format.
        """
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(
                f"not a funcpipe model profile of format {' or '.join(map(str, READABLE_FORMATS))} "
                f"(found format {found!r}); hint: re-measure it with funcpipe.profile(...) or `funcpipe profile`"
            )
        try:
            layers = tuple(LayerProfile(**layer) for layer in data["layers"])
            return cls(
                layers=layers,
                input_bytes_per_sample=float(data["input_bytes_per_sample"]),
                target_bytes_per_sample=float(data["target_bytes_per_sample"]),
                micro_batch_sizes=tuple(int(b) for b in data["micro_batch_sizes"]),
                machine=dict(data.get("machine", {})),
                tied=tuple(tuple(t) for t in data.get("tied", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"model profile is malformed ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelProfile:
        """Read a profile written by :meth:`save`.

        Raises:
            ConfigError: the file is missing, not JSON, or not a profile.
        """
        return cls.from_dict(read_json(path, "profile"))


def default_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer :func:`profile` assumes when given none: ``torch.optim.Adam(params, lr=1e-3)``."""
    return torch.optim.Adam(params, lr=1e-3)


def profile(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    *,
    micro_batch_sizes: Sequence[int] | None = None,
    max_micro_batch: int | None = None,
    optimizer: OptimizerFactory | None = None,
    rounds: int = 5,
    warmup: int = 2,
    progress: bool | None = None,
    cuts: Sequence[str] | None = None,
) -> ModelProfile:
    """Measure what every layer of ``model`` costs, for the planner and the simulator.

    Each layer is timed in isolation with one torch thread: the layers run one
    by one, each on the previous layer's output detached (so its backward
    stops at its own input), and backward runs layer by layer from the loss.
    Times are the thread's CPU time (``time.thread_time``), not wall time: with
    one torch thread all the work runs on the calling thread, and other
    processes sharing the cores then do not inflate the times. Per layer and
    micro-batch size, the median of ``rounds`` timed rounds (after ``warmup``
    untimed ones) is kept, made non-decreasing in the size (isotonic
    regression), and stored: :meth:`LayerProfile.forward_s` interpolates
    between the sizes. ``alpha + beta * b`` is also fitted to them by least
    squares with ``alpha, beta >= 0``, for reporting. The last layer's
    backward time includes the loss's forward and backward.

    By default the sizes are the powers of two up to ``max_micro_batch``
    (default :data:`DEFAULT_MAX_MICRO_BATCH`, capped by the samples given), and
    that cap itself: with 64 samples, 1, 2, 4, 8, 16, 32 and 64. A round at
    size ``b`` costs about ``b`` samples' forward and backward, so a profile
    costs about ``(warmup + rounds) * sum(sizes)`` samples' worth.

    The model is not changed: it is measured on a deep copy, in train mode,
    and the global torch RNG and thread count are restored afterwards.

    A model that is not an ``nn.Sequential`` is split into units
    (:func:`funcpipe.split.split`, with ``cuts``) and every unit is a layer of
    the profile, named after it: each unit runs on the values crossing the cut
    before it, detached (floating-point ones that carry a gradient across the
    cut requiring grad), and its output is every value crossing the cut after
    it (``output_bytes_per_sample``), of which those carrying a gradient give
    ``grad_bytes_per_sample``. A parameter several units use counts in each, as
    a tie (:attr:`ModelProfile.tied`). A graph ``torch.export`` made is
    specialised to the sizes it was split at except the batch: the model is
    split at the largest micro-batch size, and again at a size it does not run
    at.

    Args:
        model: the module to profile: an ``nn.Sequential`` (every layer returns one
            tensor) or any ``nn.Module`` :func:`funcpipe.split.split` can split.
        inputs: model inputs, at least ``max(micro_batch_sizes)`` samples along dim 0
            (floating point, or integer such as token ids); without
            ``micro_batch_sizes``, their number caps the sizes measured. For a
            module other than an ``nn.Sequential`` also a tuple (``model(*inputs)``)
            or a dict (``model(**inputs)``, e.g. ``input_ids`` and
            ``attention_mask``) of tensors, all with the samples along dim 0.
        targets: the matching targets, as many samples.
        loss_fn: ``loss_fn(output, target)`` returning the mean loss as a scalar tensor;
            ``output`` is what the model returns (e.g. a Hugging Face ``ModelOutput``:
            ``lambda out, y: F.cross_entropy(out.logits, y)``).
        micro_batch_sizes: the micro-batch sizes to measure; at least two distinct
            positive sizes. Default: see above. Predictions beyond the largest
            size are extrapolated, so measure up to the largest micro-batch a
            plan may use.
        max_micro_batch: the largest micro-batch size the default sizes reach
            (e.g. the global batch); only without ``micro_batch_sizes``.
        optimizer: a factory ``parameters -> torch.optim.Optimizer``, like the one
            :class:`~funcpipe.Trainer` takes; it sizes the optimizer state and times
            one update. Default: :func:`default_optimizer`, i.e.
            ``lambda p: torch.optim.Adam(p, lr=1e-3)``.
        rounds: timed rounds per micro-batch size (and optimizer steps per layer).
        warmup: untimed rounds before them.
        progress: show a progress bar; ``None`` shows one only for models of
            more than :data:`PROGRESS_MIN_LAYERS` layers.
        cuts: where a traced model's units start (:func:`funcpipe.split.split`);
            ``None``: one unit per block.

    Returns:
        The model's profile; save it with :meth:`ModelProfile.save`.

    Raises:
        ConfigError: an argument is invalid (inputs of different batch sizes, a
            model that cannot be split...), or a layer, the loss or the optimizer
            failed while profiling (the message names the layer and its input shape).
    """
    sequential = _is_sequential(model) and cuts is None
    sizes = _check_arguments(model, inputs, targets, loss_fn, micro_batch_sizes, max_micro_batch, optimizer, rounds,
                             warmup, progress, sequential=sequential)
    factory = optimizer if optimizer is not None else default_optimizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            if not sequential:
                return _profile_units(model, inputs, targets, loss_fn, factory, sizes, rounds, warmup, progress,
                                      cuts)
            assert isinstance(model, nn.Sequential) and isinstance(inputs, torch.Tensor)
            show = progress if progress is not None else len(model) > PROGRESS_MIN_LAYERS
            layers = _measure(model, inputs, targets, loss_fn, factory, sizes, rounds, warmup, show)
    finally:
        torch.set_num_threads(threads)
        log.debug("profiled %s in %.2f s", type(model).__name__, time.perf_counter() - started)
    return ModelProfile(
        layers=layers,
        input_bytes_per_sample=_bytes(inputs) / inputs.shape[0],
        target_bytes_per_sample=_bytes(targets) / targets.shape[0],
        micro_batch_sizes=sizes,
        machine=_machine(rounds, warmup),
        tied=tied_parameters(model),
    )


def _is_sequential(model: object) -> bool:
    """A plain ``nn.Sequential`` (its own forward): profiled layer by layer, without tracing."""
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


def tied_parameters(model: nn.Sequential) -> tuple[tuple[int, int, int], ...]:
    """``(i, j, nbytes)`` for each pair of layers ``i < j`` of ``model`` sharing trainable parameters
    (the same ``nn.Parameter`` object in both), ``nbytes`` the bytes they share."""
    return _ties([model[i] for i in range(len(model))])


def _ties(layers: Sequence[nn.Module]) -> tuple[tuple[int, int, int], ...]:
    """:func:`tied_parameters` of any modules in order (a traced model's units)."""
    holders: dict[int, list[int]] = {}
    sizes: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in protocol.trainable(layer.parameters()):
            if i not in holders.setdefault(id(p), []):
                holders[id(p)].append(i)
                sizes[id(p)] = p.numel() * p.element_size()
    shared: dict[tuple[int, int], int] = {}
    for key, users in holders.items():
        for a, b in itertools.combinations(users, 2):
            shared[(a, b)] = shared.get((a, b), 0) + sizes[key]
    return tuple((a, b, n) for (a, b), n in sorted(shared.items()))


# -- checks ------------------------------------------------------------------


def _check_arguments(
    model: object,
    inputs: object,
    targets: object,
    loss_fn: object,
    micro_batch_sizes: object,
    max_micro_batch: object,
    optimizer: object,
    rounds: object,
    warmup: object,
    progress: object,
    *,
    sequential: bool = True,
) -> tuple[int, ...]:
    """Reject what cannot be profiled; return the distinct micro-batch sizes, ascending."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; hint: "
            "wrap your layers in nn.Sequential(...), or pass your own nn.Module (it is split into units)"
        )
    if isinstance(model, nn.Sequential) and len(model) == 0:
        raise ConfigError("model is an empty nn.Sequential; hint: profile a model with at least one layer")
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "optimizer must be a factory, not an optimizer instance; hint: "
            "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    if optimizer is not None and not callable(optimizer):
        raise ConfigError(f"optimizer must be callable (parameters -> Optimizer), got {type(optimizer).__name__}")
    for name, value, least in (("rounds", rounds, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress must be True, False or None, got {progress!r}")
    checked = (("inputs", inputs), ("targets", targets)) if sequential else (("targets", targets),)
    for name, tensor in checked:
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0:
            raise ConfigError(f"{name} must have a sample dimension (dim 0), got a 0-dimensional tensor")
    assert isinstance(targets, torch.Tensor)
    batch = _batch_size(inputs)
    samples = min(batch, targets.shape[0])
    if max_micro_batch is not None and (
        isinstance(max_micro_batch, bool) or not isinstance(max_micro_batch, int) or max_micro_batch < 2
    ):
        raise ConfigError(
            f"max_micro_batch must be an integer >= 2, got {max_micro_batch!r}; hint: the largest "
            "micro-batch size a plan may use, e.g. the global batch size"
        )
    if micro_batch_sizes is None:
        return _default_sizes(samples, max_micro_batch)
    if max_micro_batch is not None:
        raise ConfigError(
            f"give micro_batch_sizes or max_micro_batch, not both (got {micro_batch_sizes!r} and "
            f"{max_micro_batch!r}); hint: max_micro_batch only caps the default sizes"
        )
    if isinstance(micro_batch_sizes, str | bytes) or not isinstance(micro_batch_sizes, Sequence):
        raise ConfigError(f"micro_batch_sizes must be a sequence of positive integers, got {micro_batch_sizes!r}")
    for b in micro_batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(
                f"micro_batch_sizes must be positive integers, got {b!r} in {micro_batch_sizes!r}; "
                "hint: micro_batch_sizes=(1, 2, 4, 8), or leave it out for powers of two up to the samples given"
            )
    sizes = tuple(sorted(set(micro_batch_sizes)))
    if len(sizes) < 2:
        raise ConfigError(
            f"micro_batch_sizes needs at least 2 distinct sizes to interpolate the times, got "
            f"{tuple(micro_batch_sizes)}; hint: micro_batch_sizes=(1, 2, 4)"
        )
    for name, held in (("inputs", batch), ("targets", targets.shape[0])):
        if held < sizes[-1]:
            raise ConfigError(
                f"{name} hold {held} samples, but the largest micro-batch size is {sizes[-1]}; "
                f"hint: pass at least {sizes[-1]} samples, or smaller micro_batch_sizes"
            )
    return sizes


def _batch_size(inputs: object) -> int:
    """The samples ``inputs`` hold (dim 0 of every tensor: a tensor, or a tuple or dict of them).

    Raises:
        ConfigError: they are not tensors, or their first dimensions differ.
    """
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ConfigError("inputs must have a sample dimension (dim 0), got a 0-dimensional tensor")
        return int(inputs.shape[0])
    if not isinstance(inputs, tuple | list | dict) or not inputs:
        raise ConfigError(
            f"inputs must be a tensor, or a tuple or dict of tensors, got {type(inputs).__name__}"
            f"{' (empty)' if isinstance(inputs, tuple | list | dict) else ''}; hint: profile(model, x, ...), "
            "profile(model, (x, mask), ...) or profile(model, {'input_ids': ids, 'attention_mask': mask}, ...)"
        )
    leaves, _ = pytree.tree_flatten_with_path(inputs)
    batches: dict[str, int] = {}
    for path, leaf in leaves:
        where = f"inputs{pytree.keystr(path)}"
        if not isinstance(leaf, torch.Tensor):
            raise ConfigError(
                f"{where} is a {type(leaf).__name__}, not a tensor; hint: every input is a tensor with the samples "
                "along dim 0 (bind other arguments with functools.partial or as module attributes)"
            )
        if leaf.dim() == 0:
            raise ConfigError(f"{where} is 0-dimensional; hint: every input has the samples along dim 0")
        batches[where] = int(leaf.shape[0])
    if len(set(batches.values())) > 1:
        found = ", ".join(f"{where} {b}" for where, b in batches.items())
        raise ConfigError(
            f"inputs have different batch sizes (dim 0): {found}; hint: every input tensor holds the same samples "
            "along dim 0"
        )
    return next(iter(batches.values()))


def _default_sizes(samples: int, max_micro_batch: int | None = None) -> tuple[int, ...]:
    """The sizes :func:`profile` measures by default: powers of two up to the cap, and the cap.

    The cap is ``max_micro_batch`` (default :data:`DEFAULT_MAX_MICRO_BATCH`),
    at most ``samples``: ``_default_sizes(48)`` is
    ``(1, 2, 4, 8, 16, 32, 48)``.

    Raises:
        ConfigError: fewer than two samples (two sizes are needed).
    """
    cap = min(samples, max_micro_batch if max_micro_batch is not None else DEFAULT_MAX_MICRO_BATCH)
    if cap < 2:
        raise ConfigError(
            f"profiling needs at least 2 samples to measure two micro-batch sizes, got {samples}; "
            "hint: pass inputs and targets of at least 2 samples (as many as the largest micro-batch a plan may use)"
        )
    sizes = [1 << k for k in range(cap.bit_length()) if 1 << k <= cap]
    return tuple(sizes) if sizes[-1] == cap else (*sizes, cap)


# -- measurement -------------------------------------------------------------


def _measure(
    model: nn.Sequential,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    factory: OptimizerFactory,
    sizes: tuple[int, ...],
    rounds: int,
    warmup: int,
    show: bool,
) -> tuple[LayerProfile, ...]:
    copied = _training_copy(model)
    runner = _Runner(copied, loss_fn)
    count = len(runner.layers)
    largest = sizes[-1]
    output_bytes, held_bytes = runner.probe(inputs[:largest].clone(), targets[:largest].clone())

    forward: list[list[float]] = [[] for _ in range(count)]  # per layer, a median per size
    backward: list[list[float]] = [[] for _ in range(count)]
    total = warmup + rounds
    # The bar counts samples run forward and backward: a round at size b costs about b.
    with tqdm(total=total * sum(sizes), disable=not show, unit="sample", desc="profiling") as bar:
        for b in sizes:
            x, y = inputs[:b].clone(), targets[:b].clone()
            chunks = _chunks([(output_bytes[i] + held_bytes[i]) * b / largest for i in range(count)],
                             ROUND_HELD_BYTES)
            timed_f: list[list[float]] = [[] for _ in range(count)]
            timed_b: list[list[float]] = [[] for _ in range(count)]
            for r in range(total):
                # A fresh copy each round: a first layer that works in place must not see its own output.
                seconds_f, seconds_b = runner.run(x.clone(), y, chunks)
                if r >= warmup:
                    for i in range(count):
                        timed_f[i].append(seconds_f[i])
                        timed_b[i].append(seconds_b[i])
                bar.update(b)
            for i in range(count):
                forward[i].append(statistics.median(timed_f[i]))
                backward[i].append(statistics.median(timed_b[i]))
            log.debug("micro-batch size %d: forward %.6f s, backward %.6f s (all layers)",
                      b, sum(f[-1] for f in forward), sum(w[-1] for w in backward))

    return tuple(
        _layer_profile(name, _measure_update(i, name, layer, factory, rounds, warmup), sizes, forward[i],
                       backward[i], output_bytes[i] / largest, held_bytes[i] / largest, kind=type(layer).__name__)
        for i, (name, layer) in enumerate(zip(runner.names, runner.layers, strict=True))
    )


def _layer_profile(name: str, update: tuple[int, int, float], sizes: tuple[int, ...], forward: list[float],
                   backward: list[float], output_bytes: float, held_bytes: float,
                   grad_bytes: float | None = None, kind: str = "") -> LayerProfile:
    """A layer's profile from its medians per size (fitted, and made non-decreasing) and its bytes per sample."""
    param_bytes, optimizer_bytes, update_s = update
    forward_alpha, forward_beta = _fit(sizes, forward)
    backward_alpha, backward_beta = _fit(sizes, backward)
    return LayerProfile(
        name=name,
        forward_alpha_s=forward_alpha,
        forward_beta_s=forward_beta,
        backward_alpha_s=backward_alpha,
        backward_beta_s=backward_beta,
        param_bytes=param_bytes,
        optimizer_bytes=optimizer_bytes,
        update_s=update_s,
        output_bytes_per_sample=output_bytes,
        held_bytes_per_sample=held_bytes,
        measured_sizes=sizes,
        forward_measured_s=_isotonic(forward),
        backward_measured_s=_isotonic(backward),
        kind=kind,
        grad_bytes_per_sample=grad_bytes,
    )


class _Runner:
    """Runs the layers of a (copied) ``nn.Sequential`` one by one, each cut off from the previous."""

    def __init__(self, model: nn.Sequential, loss_fn: LossFn) -> None:
        self.names = list(model._modules)  # not named_children(): it skips a module used twice
        self.layers = [model[i] for i in range(len(model))]
        self.loss_fn = loss_fn
        # Layers that modify their input in place get a clone of it (a leaf that
        # requires grad cannot be modified in place); set the first time one fails.
        self.clone_input = [False] * len(self.layers)

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], list[int]]:
        """Per layer: bytes of its output and bytes autograd saves for its backward, at this batch.

        A tensor two layers save is counted once: the input of a layer that the layer
        before it saved too (``relu``'s output, which the next ``Linear`` saves as its
        input) is that layer's, so a stage's layers add up to what the stage holds.
        """
        output_bytes, held_bytes = [], []
        before: set[int] = set()  # storages the previous layer saved
        for i, layer in enumerate(self.layers):
            exclude = {_storage_key(t)[0] for t in [*layer.parameters(), *layer.buffers()]}
            shared = _storage_key(x)[0]
            if shared in before:
                exclude.add(shared)
            saved = _SavedBytes(exclude)
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
                _, x, _ = self.forward(i, x, on_retry=saved.clear)
            output_bytes.append(_bytes(x))
            held_bytes.append(saved.total)
            before = set(saved.by_storage)
        self.loss(x, y)  # check it returns a scalar before the timed rounds
        return output_bytes, held_bytes

    def run(
        self, x: torch.Tensor, y: torch.Tensor, chunks: Sequence[range]
    ) -> tuple[list[float], list[float]]:
        """One round: forward and backward seconds of every layer.

        The layers run chunk by chunk: a chunk's forwards, holding their
        activations as a stage does, then its backwards in reverse, from a
        random gradient of the chunk's output's shape (what a backward costs
        does not depend on the gradient's values; the last chunk's comes from
        the loss). With one chunk this is the model's own forward and backward;
        smaller chunks bound what a round holds. A layer whose successor sends
        no gradient back to its input gets no backward time, as in training.
        """
        count = len(self.layers)
        forward = [0.0] * count
        backward = [0.0] * count
        for chunk in chunks:
            leaves: list[torch.Tensor] = []
            outputs: list[torch.Tensor | None] = []
            for i in chunk:
                leaf, x, forward[i] = self.forward(i, x)
                leaves.append(leaf)
                outputs.append(x)
            last = chunk[-1]
            if last == count - 1:
                started = _clock()
                loss = self.loss(x, y)
                if loss.requires_grad:
                    self._backward(last, loss, None, "the loss's")
                backward[last] = _clock() - started
            elif x.requires_grad:
                noise = torch.randn_like(x)
                started = _clock()
                self._backward(last, x, noise, "its")
                backward[last] = _clock() - started
            outputs[-1] = None
            for k in range(len(chunk) - 2, -1, -1):
                grad = leaves[k + 1].grad
                output = outputs[k]
                outputs[k] = None  # free activations as the backward goes
                if grad is None or output is None or not output.requires_grad:
                    continue  # nothing flows back into this layer
                started = _clock()
                self._backward(chunk[k], output, grad, "its")
                backward[chunk[k]] = _clock() - started
            if chunk[0] > 0 and leaves[0].grad is None:
                backward[chunk[0] - 1] = 0.0  # nothing flows back into the previous chunk's last layer
            x = x.detach()
        return forward, backward

    def forward(
        self, i: int, x: torch.Tensor, on_retry: Callable[[], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Run layer ``i`` on ``x`` cut off from its graph: (the leaf input, the output, seconds)."""
        leaf = x.detach()
        if i > 0 and leaf.is_floating_point():
            leaf.requires_grad_(True)  # a stage's input carries gradients; the model's input does not
        layer_input = leaf.clone() if self.clone_input[i] and leaf.requires_grad else leaf
        layer = self.layers[i]
        started = _clock()
        try:
            output = layer(layer_input)
        except Exception as exc:
            in_place = isinstance(exc, RuntimeError) and "in-place operation" in str(exc) and "leaf" in str(exc)
            if in_place and not self.clone_input[i]:
                self.clone_input[i] = True
                if on_retry is not None:
                    on_retry()
                return self.forward(i, x, on_retry)
            raise ConfigError(
                f"layer {i} ({self.names[i]!r}, {type(layer).__name__}) failed on an input of shape "
                f"{tuple(leaf.shape)} ({leaf.dtype}): {type(exc).__name__}: {exc}"
            ) from exc
        seconds = _clock() - started
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"layer {i} ({self.names[i]!r}, {type(layer).__name__}) returned {type(output).__name__}, "
                "not a tensor; hint: every layer of the nn.Sequential must return one tensor "
                "(what a stage boundary sends on)"
            )
        return leaf, output, seconds

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        try:
            loss = self.loss_fn(output, target)
        except Exception as exc:
            raise ConfigError(
                f"loss_fn failed on the output of shape {tuple(output.shape)} of the last layer and targets "
                f"of shape {tuple(target.shape)}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(
                f"loss_fn returned {shape}, not a scalar tensor; hint: reduce it with a mean over the micro-batch"
            )
        return loss

    def _backward(self, i: int, output: torch.Tensor, grad: torch.Tensor | None, what: str) -> None:
        try:
            torch.autograd.backward(output, grad)
        except Exception as exc:
            raise ConfigError(
                f"backward of layer {i} ({self.names[i]!r}, {type(self.layers[i]).__name__}) failed on "
                f"{what} gradient of shape {tuple(output.shape)}: {type(exc).__name__}: {exc}"
            ) from exc


# -- any nn.Module: its units as layers ----------------------------------------


class _UnitFailed(Exception):
    """A unit raised, or returned values of other shapes than split measured, while profiling (at a
    size its graph may not have been split at)."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(index, cause)
        self.index = index
        self.cause = cause


def _take(inputs: Any, b: int) -> Any:
    """The first ``b`` samples of every input tensor, copied."""
    return pytree.tree_map(lambda t: t[:b].clone(), inputs)


def _value_bytes(value: Any) -> int:
    """Bytes of one value crossing a cut, as :class:`funcpipe.split.Value` counts them (a Python int: 8)."""
    return _bytes(value) if isinstance(value, torch.Tensor) else 8


def _carries_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point()


def _training_copy(model: M) -> M:
    """A deep copy of ``model`` in train mode, without gradients (the profile must not change the model)."""
    try:
        copied = copy.deepcopy(model)
    except Exception as exc:
        raise ConfigError(
            f"cannot copy the model to profile it ({type(exc).__name__}: {exc}); "
            "hint: the model must support copy.deepcopy"
        ) from exc
    copied.train()
    for parameter in copied.parameters():
        parameter.grad = None  # a copy of the user's gradients would be accumulated into
    return copied


def _split_at(model: nn.Module, inputs: Any, b: int, cuts: Sequence[str] | None) -> Any:
    from funcpipe.split import split

    return split(model, _take(inputs, b), cuts=cuts)


def _profile_units(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    factory: OptimizerFactory,
    sizes: tuple[int, ...],
    rounds: int,
    warmup: int,
    progress: bool | None,
    cuts: Sequence[str] | None,
) -> ModelProfile:
    """:func:`profile` of a module split into units, each unit a layer."""
    copied = _training_copy(model)
    largest = sizes[-1]
    units = _split_at(copied, inputs, largest, cuts)
    runner = _UnitRunner(units, loss_fn, largest)
    count = len(runner.stages)
    output_bytes, grad_bytes, held_bytes = runner.probe(
        units.flatten_inputs(_take(inputs, largest)), targets[:largest].clone())
    runners = {largest: runner}

    forward: list[list[float]] = [[] for _ in range(count)]
    backward: list[list[float]] = [[] for _ in range(count)]
    total = warmup + rounds
    show = progress if progress is not None else count > PROGRESS_MIN_LAYERS
    with tqdm(total=total * sum(sizes), disable=not show, unit="sample", desc="profiling") as bar:
        for b in sizes:
            y = targets[:b].clone()
            chunks = _chunks([(output_bytes[i] + held_bytes[i]) * b / largest for i in range(count)],
                             ROUND_HELD_BYTES)
            timed_f: list[list[float]] = [[] for _ in range(count)]
            timed_b: list[list[float]] = [[] for _ in range(count)]
            for r in range(total):
                at_b = runners.get(b, runner)
                try:
                    seconds_f, seconds_b = at_b.run(at_b.units.flatten_inputs(_take(inputs, b)), y, chunks)
                except _UnitFailed as failed:
                    if b in runners:  # split at this very size: the unit cannot run it
                        raise _unit_error(at_b, failed, b) from failed.cause
                    # The graph was specialised to the size it was split at: split again at this one.
                    at_b = _UnitRunner(_split_at(copied, inputs, b, cuts), loss_fn, b)
                    if at_b.names != runner.names:
                        raise ConfigError(
                            f"split at a micro-batch of {b} samples gives units {at_b.names}, at {largest} "
                            f"{runner.names}; hint: a model whose units depend on the batch size cannot be "
                            "profiled across sizes; mark cut points (cuts=[...]) that do not"
                        ) from failed.cause
                    runners[b] = at_b
                    try:
                        seconds_f, seconds_b = at_b.run(at_b.units.flatten_inputs(_take(inputs, b)), y, chunks)
                    except _UnitFailed as again:
                        raise _unit_error(at_b, again, b) from again.cause
                if r >= warmup:
                    for i in range(count):
                        timed_f[i].append(seconds_f[i])
                        timed_b[i].append(seconds_b[i])
                bar.update(b)
            for i in range(count):
                forward[i].append(statistics.median(timed_f[i]))
                backward[i].append(statistics.median(timed_b[i]))

    layers = [
        _layer_profile(name, _measure_update(i, name, stage, factory, rounds, warmup), sizes, forward[i],
                       backward[i], output_bytes[i] / largest, held_bytes[i] / largest, grad_bytes[i] / largest,
                       kind=_unit_kind(model, name))
        for i, (name, stage) in enumerate(zip(runner.names, runner.stages, strict=True))
    ]
    flat = pytree.tree_leaves(inputs)
    machine = _machine(rounds, warmup)
    machine["split"] = units.tracer
    return ModelProfile(
        layers=tuple(layers),
        input_bytes_per_sample=sum(_bytes(t) for t in flat) / flat[0].shape[0],
        target_bytes_per_sample=_bytes(targets) / targets.shape[0],
        micro_batch_sizes=sizes,
        machine=machine,
        tied=_ties(runner.stages),
    )


def _unit_kind(model: nn.Module, name: str) -> str:
    """The class of the module a traced unit is named after (``"BertLayer"``), or ``""``."""
    try:
        return type(model.get_submodule(name)).__name__
    except (AttributeError, ValueError):
        return ""


def describe_value(values: Any) -> str:
    """What a unit or the model returned, briefly: ``SequenceClassifierOutput(logits (4, 2))``."""
    if isinstance(values, torch.Tensor):
        return f"a tensor of shape {tuple(values.shape)} ({values.dtype})"
    leaves, _ = pytree.tree_flatten_with_path(values)
    parts = [f"{pytree.keystr(path)} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
             for path, v in leaves[:6]]
    more = ", ..." if len(leaves) > 6 else ""
    return f"{type(values).__name__}({', '.join(parts)}{more})"


def _unit_error(runner: _UnitRunner, failed: _UnitFailed, b: int) -> ConfigError:
    i, exc = failed.index, failed.cause
    return ConfigError(
        f"unit {i} ({runner.names[i]!r}) of {type(runner.units.model).__name__} failed on a micro-batch of {b} "
        f"samples, split at that size too: {type(exc).__name__}: {exc}; hint: profile micro-batch sizes the model "
        "runs at (micro_batch_sizes=...), or mark cut points (cuts=[...]) around the code that fails"
    )


class _UnitRunner:
    """Runs the units of a split (copied) model one by one, each cut off from the previous.

    Unit ``i`` takes the values crossing the cut before it (for unit 0 the flattened
    inputs), each detached, the floating-point ones whose gradient crosses back
    requiring grad, and returns the values crossing the cut after it (the last
    unit: the model's output).
    """

    def __init__(self, units: Any, loss_fn: LossFn, batch: int) -> None:
        self.units = units
        self.names = list(units.names)
        self.stages = [units.stage(i, i) for i in range(len(units))]
        self.loss_fn = loss_fn
        # The size the units were split at, the shapes split measured there (the last unit's: the probe's),
        # and the size being run: a graph specialised to its size may run at another one and broadcast.
        self.batch = batch
        self.shapes: list[list[tuple[int, ...] | None]] = [
            [v.shape if v.is_tensor else None for v in units.boundary(i).values] for i in range(len(units) - 1)]
        self.shapes.append([])
        self.running = batch
        # Per unit, which of its inputs carry a gradient back (the model's inputs do not).
        self.grads_in = [(False,) * len(units.boundary(-1).values)] + [
            tuple(v.requires_grad for v in units.boundary(i).values) for i in range(len(units) - 1)]
        self.clone_input = [False] * len(self.stages)

    def probe(self, xs: tuple[Any, ...], y: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
        """Per unit: bytes of every value it sends on, of those carrying a gradient back, and what autograd
        saves for its backward (as :meth:`_Runner.probe`: an input the unit before saved is that unit's)."""
        output_bytes, grad_bytes, held_bytes = [], [], []
        before: set[int] = set()
        last = len(self.stages) - 1
        self.running = y.shape[0]
        for i, stage in enumerate(self.stages):
            exclude = {_storage_key(t)[0] for t in [*stage.parameters(), *stage.buffers()]}
            exclude |= {key for key in (_storage_key(t)[0] for t in xs if isinstance(t, torch.Tensor))
                        if key in before}
            saved = _SavedBytes(exclude)
            try:
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
                    _, out, _ = self.forward(i, xs, on_retry=saved.clear)
            except _UnitFailed as failed:
                raise self._error(failed, xs) from failed.cause
            flat = list(out) if i < last else pytree.tree_leaves(out)
            if i == last and self.running == self.batch:
                self.shapes[last] = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in flat]
            output_bytes.append(sum(_value_bytes(v) for v in flat))
            grad_bytes.append(sum(_bytes(v) for v in flat if _carries_grad(v)))
            held_bytes.append(saved.total)
            before = set(saved.by_storage)
            xs = out
        self.loss(xs, y)
        return output_bytes, grad_bytes, held_bytes

    def _error(self, failed: _UnitFailed, xs: tuple[Any, ...]) -> ConfigError:
        i, exc = failed.index, failed.cause
        return ConfigError(
            f"unit {i} ({self.names[i]!r}) of {type(self.units.model).__name__} failed on its inputs "
            f"{describe_value(tuple(xs))}: {type(exc).__name__}: {exc}"
        )

    def run(self, xs: tuple[Any, ...], y: torch.Tensor, chunks: Sequence[range]) -> tuple[list[float], list[float]]:
        """One round: forward and backward seconds of every unit (as :meth:`_Runner.run`)."""
        count = len(self.stages)
        forward = [0.0] * count
        backward = [0.0] * count
        self.running = y.shape[0]
        for chunk in chunks:
            leaves: list[tuple[Any, ...]] = []
            outputs: list[Any] = []
            for i in chunk:
                leaf, xs, forward[i] = self.forward(i, xs)
                leaves.append(leaf)
                outputs.append(xs)
            last = chunk[-1]
            if last == count - 1:
                started = _clock()
                loss = self.loss(xs, y)
                if loss.requires_grad:
                    self._backward(last, [loss], [None])
                backward[last] = _clock() - started
            else:
                sent = [t for t in xs if _carries_grad(t)]
                if sent:
                    noise = [torch.randn_like(t) for t in sent]
                    started = _clock()
                    self._backward(last, sent, noise)
                    backward[last] = _clock() - started
            outputs[-1] = None
            for k in range(len(chunk) - 2, -1, -1):
                out = outputs[k]
                outputs[k] = None
                pairs = [(o, leaf.grad) for o, leaf in zip(out, leaves[k + 1], strict=True)
                         if isinstance(leaf, torch.Tensor) and leaf.grad is not None and _carries_grad(o)]
                if not pairs:
                    continue  # nothing flows back into this unit
                started = _clock()
                self._backward(chunk[k], [o for o, _ in pairs], [g for _, g in pairs])
                backward[chunk[k]] = _clock() - started
            if chunk[0] > 0 and not any(isinstance(t, torch.Tensor) and t.grad is not None for t in leaves[0]):
                backward[chunk[0] - 1] = 0.0  # nothing flows back into the previous chunk's last unit
            if last < count - 1:
                xs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in xs)
        return forward, backward

    def forward(
        self, i: int, xs: tuple[Any, ...], on_retry: Callable[[], None] | None = None
    ) -> tuple[tuple[Any, ...], Any, float]:
        """Run unit ``i`` on ``xs`` cut off from their graph: (the leaf inputs, its output, seconds).

        Raises:
            _UnitFailed: the unit raised.
        """
        leaves = tuple(self._leaf(x, grad) for x, grad in zip(xs, self.grads_in[i], strict=True))
        args = tuple(t.clone() if self.clone_input[i] and isinstance(t, torch.Tensor) and t.requires_grad else t
                     for t in leaves)
        started = _clock()
        try:
            output = self.stages[i](*args)
        except Exception as exc:
            in_place = isinstance(exc, RuntimeError) and "in-place operation" in str(exc) and "leaf" in str(exc)
            if in_place and not self.clone_input[i]:
                self.clone_input[i] = True
                if on_retry is not None:
                    on_retry()
                return self.forward(i, xs, on_retry)
            raise _UnitFailed(i, exc) from exc
        seconds = _clock() - started
        if self.running != self.batch:
            self._check_shapes(i, output)
        return leaves, output, seconds

    def _check_shapes(self, i: int, output: Any) -> None:
        """Raise :class:`_UnitFailed` if unit ``i`` returned other shapes at this size than at its split's:
        a dim 0 of the split's size is the batch; every other size is the same."""
        expected = self.shapes[i]
        flat = list(output) if i < len(self.stages) - 1 else pytree.tree_leaves(output)
        if not expected or len(expected) != len(flat):
            return  # the last unit before the probe ran at the split's size: nothing to compare
        for k, (shape, value) in enumerate(zip(expected, flat, strict=True)):
            if shape is None or not isinstance(value, torch.Tensor):
                continue
            want = (self.running, *shape[1:]) if shape and shape[0] == self.batch else shape
            if tuple(value.shape) != want:
                raise _UnitFailed(i, RuntimeError(
                    f"value {k} has shape {tuple(value.shape)} at {self.running} samples, expected {want} (split "
                    f"at {self.batch} samples gave {shape}): the graph is specialised to the size it was split at"))

    @staticmethod
    def _leaf(x: Any, grad: bool) -> Any:
        if not isinstance(x, torch.Tensor):
            return x  # a Python int (a symbolic size)
        leaf = x.detach()
        if grad and leaf.is_floating_point():
            leaf.requires_grad_(True)
        return leaf

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        try:
            loss = self.loss_fn(output, target)
        except Exception as exc:
            raise ConfigError(
                f"loss_fn failed on the output of {type(self.units.model).__name__} ({describe_value(output)}) and "
                f"targets of shape {tuple(target.shape)}: {type(exc).__name__}: {exc}; hint: loss_fn receives what "
                "the model returns, e.g. lambda out, y: F.cross_entropy(out.logits, y) for a Hugging Face model"
            ) from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(
                f"loss_fn returned {shape}, not a scalar tensor; hint: reduce it with a mean over the micro-batch"
            )
        return loss

    def _backward(self, i: int, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        try:
            torch.autograd.backward(list(outputs), list(grads))
        except Exception as exc:
            raise ConfigError(
                f"backward of unit {i} ({self.names[i]!r}) failed: {type(exc).__name__}: {exc}"
            ) from exc


class _SavedBytes:
    """A pack hook that sums the bytes autograd saves, once per storage, without some storages."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.by_storage: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key, capacity = _storage_key(tensor)
        if key not in self.exclude and tensor.numel() > 0:
            nbytes = _bytes(tensor)
            if capacity is not None:
                nbytes = min(nbytes, capacity)  # an expanded view claims more than its storage
            # Views of one storage (x and x.t()) are held once: keep the largest.
            self.by_storage[key] = max(self.by_storage.get(key, 0), nbytes)
        # Not the tensor itself: an output autograd saves would then hold its own graph in a cycle
        # that is never freed, and the probe would keep every layer's activations.
        return tensor.detach()

    def clear(self) -> None:
        self.by_storage.clear()

    @property
    def total(self) -> int:
        return sum(self.by_storage.values())


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[int, int | None]:
    """(an identity of the tensor's storage, the storage's bytes if known)."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, mkldnn...: no plain storage
        return id(tensor), None


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _measure_update(
    i: int, name: str, layer: nn.Module, factory: OptimizerFactory, rounds: int, warmup: int
) -> tuple[int, int, float]:
    """(trainable parameter bytes, optimizer state bytes, median seconds of a step) of one layer."""
    params = protocol.trainable(layer.parameters())  # what a worker syncs and updates
    param_bytes = protocol.gradient_bytes(params)
    if not params:
        return 0, 0, 0.0
    what = f"layer {i} ({name!r}, {type(layer).__name__})"
    try:
        optimizer = factory(iter(params))
    except Exception as exc:
        raise ConfigError(
            f"the optimizer factory failed on the parameters of {what}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"the optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer; "
            "hint: optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    seconds = []
    for r in range(warmup + rounds):
        started = _clock()
        try:
            optimizer.step()
        except Exception as exc:
            raise ConfigError(
                f"{type(optimizer).__name__}.step() failed on the parameters of {what}: {type(exc).__name__}: {exc}"
            ) from exc
        if r >= warmup:
            seconds.append(_clock() - started)
    state_bytes = sum(
        _bytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    return param_bytes, state_bytes, statistics.median(seconds)


def _chunks(held: Sequence[float], budget: float) -> list[range]:
    """Consecutive layers, greedily, each run holding at most ``budget`` bytes (a layer alone may hold more)."""
    chunks: list[range] = []
    start, total = 0, 0.0
    for i, nbytes in enumerate(held):
        if i > start and total + nbytes > budget:
            chunks.append(range(start, i))
            start, total = i, 0.0
        total += nbytes
    chunks.append(range(start, len(held)))
    return chunks


def _isotonic(seconds: Sequence[float]) -> tuple[float, ...]:
    """The non-decreasing sequence nearest ``seconds`` in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for t in seconds:
        blocks.append([float(t), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return tuple(mean for mean, n in blocks for _ in range(int(n)))


def _fit(sizes: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """``(alpha, beta)`` minimizing the squared error of ``alpha + beta * b``, both >= 0.

    Times are never negative, and neither is the cost of one more sample: a
    negative coefficient (noise, on a layer that costs microseconds) would
    make the fit go below zero when extrapolated. The constrained optimum is the
    free one when it is feasible, else the best fit with one coefficient at zero.
    """
    b = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    design = np.column_stack([np.ones_like(b), b])
    (alpha, beta), *_ = np.linalg.lstsq(design, t, rcond=None)
    if alpha >= 0 and beta >= 0:
        return float(alpha), float(beta)
    candidates = [(float(t.mean()), 0.0), (0.0, float(b @ t / (b @ b)))]
    return min(candidates, key=lambda ab: float(np.sum((ab[0] + ab[1] * b - t) ** 2)))


def _machine(rounds: int, warmup: int) -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "clock": "thread_time",
        "rounds": rounds,
        "warmup": warmup,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
