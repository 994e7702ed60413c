"""The global batches a fit trains on: how many, what each must be (size, dtype), kept for a retry."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from funcpipe.errors import ConfigError

__all__ = [
    "Batch", "InputDtype", "Replay", "check_batch", "check_loader", "micro_batches", "model_input_dtype",
    "training_batches",
]

#: A global batch: ``(inputs, targets)``, each with the plan's ``global_batch_size`` samples; the inputs
#: a tensor, or a tuple or dict of tensors (what the model is called with).
Batch = tuple[Any, torch.Tensor]

#: The dtype a model's inputs must have, and the layer that decides it (:func:`model_input_dtype`).
InputDtype = tuple[torch.dtype, str]


def training_batches(data: Iterable[Batch], iterations: int | None, epochs: int) -> tuple[Iterator[Batch], int]:
    """The batches to train on and how many: ``iterations`` steps cycling ``data``, or epochs.

    Raises:
        ConfigError: ``iterations`` is not given and ``data`` has no ``len()``.
    """
    if iterations is not None:
        def cycle() -> Iterator[Batch]:
            while True:
                empty = True
                for batch in data:
                    empty = False
                    yield batch
                if empty:  # a spent generator: stop, and let the caller say so
                    return
        return cycle(), iterations
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"data of type {type(data).__name__} has no len(), so the number of iterations is "
            "unknown; hint: pass a list or a DataLoader, or fit(..., iterations=N)"
        ) from None
    return itertools.chain.from_iterable(data for _ in range(epochs)), per_epoch * epochs


def check_loader(data: object, size: int) -> None:
    """Refuse a ``DataLoader`` whose last batch would be short (before anything is launched).

    Raises:
        ConfigError: ``data`` is a ``DataLoader`` without ``drop_last`` over a sized data set whose
            length its batch size does not divide.
    """
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader) or data.batch_size is None or data.drop_last:
        return
    try:
        samples = len(data.dataset)  # type: ignore[arg-type]
    except TypeError:  # an iterable data set: its end is found when it comes
        return
    if samples % data.batch_size:
        raise ConfigError(
            f"the DataLoader's data set holds {samples} samples, which batches of {data.batch_size} do not divide: "
            f"its last batch would hold {samples % data.batch_size}, and every global batch holds the plan's "
            f"{size}; hint: DataLoader(..., batch_size={size}, drop_last=True)"
        )


#: Layers that pass their input's dtype through and hold no parameters: the layer after them decides.
_DTYPE_TRANSPARENT: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
#: Layers that compute with their weight and accept only inputs of the weight's (floating) dtype.
_DTYPE_BOUND: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.LayerNorm, nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
)


def model_input_dtype(model: nn.Sequential) -> InputDtype | None:
    """The dtype the model's inputs must have and the layer that decides it; ``None``: undecidable.

    An ``nn.Embedding`` first takes integer indices, a custom module anything:
    only layers whose arithmetic needs inputs of their weight's dtype are judged.
    """
    for index, layer in enumerate(model):
        if isinstance(layer, _DTYPE_TRANSPARENT):
            continue
        weight = next(layer.parameters(), None) if isinstance(layer, _DTYPE_BOUND) else None
        if weight is None or not weight.is_floating_point():
            return None
        return weight.dtype, f"layer {index} ({type(layer).__name__})"
    return None


def check_batch(batch: Any, size: int, iteration: int, input_dtype: InputDtype | None = None) -> Batch:
    """``batch`` as ``(inputs, targets)``, checked to be the global batch of ``iteration``.

    Raises:
        ConfigError: ``batch`` is not a pair of tensors of ``size`` samples, or
            its inputs are not of ``input_dtype`` (when given).
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ConfigError(
            f"batch {iteration} is a {type(batch).__name__}, not an (inputs, targets) pair"
        )
    inputs, targets = batch
    leaves = [("inputs", inputs)] if isinstance(inputs, torch.Tensor) else _leaves(inputs, iteration)
    for name, tensor in (*leaves, ("targets", targets)):
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"batch {iteration}: {name} is a {type(tensor).__name__}, not a tensor")
        if tensor.dim() == 0 or tensor.shape[0] != size:
            shape = tuple(tensor.shape)
            raise ConfigError(
                f"batch {iteration}: {name} has shape {shape}, but the plan's global batch is "
                f"{size} samples; hint: DataLoader(..., batch_size={size}, drop_last=True)"
            )
    if input_dtype is not None and isinstance(inputs, torch.Tensor) and inputs.dtype != input_dtype[0]:
        dtype, layer = input_dtype
        raise ConfigError(
            f"batch {iteration}: inputs are {inputs.dtype}, but the model's {layer} computes in {dtype}; "
            f"hint: convert them with inputs.to({dtype}), e.g. in the Dataset or a DataLoader collate_fn"
        )
    return inputs, targets


def _leaves(inputs: Any, iteration: int) -> list[tuple[str, Any]]:
    """The tensors of inputs given as a tuple or dict (a model called with several), by where they are."""
    if not isinstance(inputs, (tuple, list, dict)) or not inputs:
        raise ConfigError(
            f"batch {iteration}: inputs are a {type(inputs).__name__}, not a tensor, a tuple or a dict of tensors; "
            "hint: yield (inputs, targets) with inputs as the model takes them (a dict for model(**inputs))"
        )
    flat, _ = pytree.tree_flatten_with_path(inputs)
    return [(f"inputs{pytree.keystr(path)}", leaf) for path, leaf in flat]


def micro_batches(inputs: Any, size: int) -> list[Any]:
    """``inputs`` (a tensor, or a tuple / dict of them) cut along dim 0 into micro-batches of ``size``."""
    leaves, spec = pytree.tree_flatten(inputs)
    pieces = [torch.split(leaf, size) for leaf in leaves]
    return [pytree.tree_unflatten(list(parts), spec) for parts in zip(*pieces, strict=True)]


class Replay:
    """The batches of a fit by iteration, kept from the last checkpoint on so a retry feeds them again."""

    def __init__(self, batches: Iterator[Batch], first: int) -> None:
        self._source = batches
        self._kept: dict[int, Batch] = {}
        self._next = first  # the iteration the next batch from the source is for

    def get(self, iteration: int) -> Batch | None:
        """The batch of ``iteration``, or ``None`` when the data ran out."""
        if iteration in self._kept:
            return self._kept[iteration]
        assert iteration == self._next, (iteration, self._next)
        batch = next(self._source, None)
        if batch is not None:
            self._kept[iteration] = batch
            self._next += 1
        return batch

    def rewind(self, iteration: int) -> None:
        """Feed again from ``iteration``: it must be kept, or the next one the source yields."""
        assert iteration in self._kept or iteration == self._next, (iteration, sorted(self._kept))

    def forget_before(self, iteration: int) -> None:
        """Drop the batches before ``iteration``: no retry goes back further (a checkpoint is complete)."""
        for old in [i for i in self._kept if i < iteration]:
            del self._kept[old]
