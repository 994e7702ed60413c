"""AmoebaNet-D (Real et al. 2019), the image model GPipe trains, one cell per layer.

The cell genotype is AmoebaNet-D's (as in TensorFlow's TPU reference model):
each cell preprocesses its two inputs (the outputs of the two cells before it)
to ``c`` channels, builds five nodes, each the sum of two operations on
earlier states, and concatenates some states (normal cells: states 0, 3, 4, 6
→ 4c channels; reduction cells, which halve the resolution: 4, 5, 6 → 3c).

Layout of ``amoebanet_d(L, D)`` here, at 224x224: a strided 3x3 stem (D/8
channels, 112x112), two reduction cells (c = D/4, D/2; 56 then 28), then three
groups of L/3 normal cells (c = D, 2D, 4D at 28, 14 and 7) with a reduction
cell before the second and the third group, then the classifier: L + 6 layers.

A cell needs the outputs of the two cells before it, but a pipeline stage
passes one tensor on, so every layer outputs both, flattened per sample and
concatenated (``_pack``); the next layer splits them back by their known
shapes. That is also what a pipeline has to transfer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Cell", "amoebanet_d"]

Shape = tuple[int, int, int]  # channels, height, width

#: (input state, operation) pairs: node k sums operations 2k and 2k+1.
NORMAL = (
    (1, "conv_1x1"), (1, "max_pool_3x3"), (1, "none"), (0, "conv_1x7_7x1"), (0, "conv_1x1"),
    (0, "conv_1x7_7x1"), (2, "max_pool_3x3"), (2, "none"), (1, "avg_pool_3x3"), (5, "conv_1x1"),
)
NORMAL_CONCAT = (0, 3, 4, 6)
REDUCTION = (
    (0, "max_pool_2x2"), (0, "max_pool_3x3"), (2, "none"), (1, "conv_3x3"), (2, "conv_1x7_7x1"),
    (2, "max_pool_3x3"), (3, "none"), (1, "max_pool_2x2"), (2, "avg_pool_3x3"), (3, "conv_1x1"),
)
REDUCTION_CONCAT = (4, 5, 6)


def _relu_conv_bn(c_in: int, c_out: int, kernel: int | tuple[int, int] = 1,
                  stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0) -> list[nn.Module]:
    return [nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out)]


def _operation(name: str, c: int, stride: int) -> nn.Module:
    if name == "none":
        if stride != 1:
            raise ValueError("the identity operation cannot reduce")
        return nn.Identity()
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "max_pool_2x2":
        return nn.MaxPool2d(2, stride=stride)
    if name == "conv_1x1":
        return nn.Sequential(*_relu_conv_bn(c, c, 1, stride))
    if name == "conv_3x3":  # bottlenecked to c/4, as in the reference model
        q = c // 4
        return nn.Sequential(*_relu_conv_bn(c, q), *_relu_conv_bn(q, q, 3, stride, 1), *_relu_conv_bn(q, c))
    if name == "conv_1x7_7x1":
        q = c // 4
        return nn.Sequential(*_relu_conv_bn(c, q), *_relu_conv_bn(q, q, (1, 7), (1, stride), (0, 3)),
                             *_relu_conv_bn(q, q, (7, 1), (stride, 1), (3, 0)), *_relu_conv_bn(q, c))
    raise ValueError(f"unknown operation {name!r}")


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset strided 1x1 convolutions (for a previous-previous input)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.left = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.right = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = nn.functional.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.left(x), self.right(shifted)], dim=1))


class Cell(nn.Module):
    """One AmoebaNet-D cell on ``(s0, s1)`` = the outputs of the two cells before it."""

    def __init__(self, c_pp: int, c_p: int, c: int, *, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.pre0: nn.Module = (FactorizedReduce(c_pp, c) if reduction_prev
                                else nn.Sequential(*_relu_conv_bn(c_pp, c)))
        self.pre1 = nn.Sequential(*_relu_conv_bn(c_p, c))
        genotype = REDUCTION if reduction else NORMAL
        self.inputs = [i for i, _ in genotype]
        self.ops = nn.ModuleList(
            _operation(name, c, 2 if reduction and i < 2 else 1) for i, name in genotype
        )
        self.concat = REDUCTION_CONCAT if reduction else NORMAL_CONCAT
        self.out_channels = c * len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for k in range(0, len(self.ops), 2):
            states.append(self.ops[k](states[self.inputs[k]]) + self.ops[k + 1](states[self.inputs[k + 1]]))
        return torch.cat([states[i] for i in self.concat], dim=1)


def _pack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.flatten(1), b.flatten(1)], dim=1)


def _unpack(x: torch.Tensor, a: Shape, b: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    split = a[0] * a[1] * a[2]
    return x[:, :split].reshape(-1, *a), x[:, split:].reshape(-1, *b)


class CellLayer(nn.Module):
    """A cell as a pipeline layer: packed ``(s0, s1)`` in (or one tensor, used as both), packed ``(s1, out)`` out."""

    def __init__(self, cell: Cell, s0: Shape, s1: Shape | None) -> None:
        super().__init__()
        self.cell = cell
        self.s0, self.s1 = s0, s1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.s1 is None:
            s0 = s1 = x
        else:
            s0, s1 = _unpack(x, self.s0, self.s1)
        return _pack(s1, self.cell(s0, s1))


class Head(nn.Module):
    """ReLU, global average pooling and the classifier, on the last cell's output."""

    def __init__(self, s0: Shape, s1: Shape, classes: int) -> None:
        super().__init__()
        self.s0, self.s1 = s0, s1
        self.classifier = nn.Linear(s1[0], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = _unpack(x, self.s0, self.s1)
        return self.classifier(torch.relu(last).mean(dim=(2, 3)))


def amoebanet_d(normal_cells: int, filters: int, classes: int = 1000, resolution: int = 224) -> nn.Sequential:
    """AmoebaNet-D with ``normal_cells`` normal cells (a multiple of 3) and ``filters`` filters."""
    if normal_cells % 3 or normal_cells < 3:
        raise ValueError(f"normal_cells must be a positive multiple of 3, got {normal_cells}")
    if filters % 8:
        raise ValueError(f"filters must be a multiple of 8, got {filters}")
    size = resolution // 2
    stem_c = filters // 8
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, stem_c, 3, stride=2, padding=1, bias=False),
                                             nn.BatchNorm2d(stem_c))]
    prev_prev: Shape = (stem_c, size, size)
    prev: Shape | None = None  # the stem gives one tensor
    reduction_prev = False

    def add(c: int, reduction: bool) -> None:
        nonlocal prev_prev, prev, reduction_prev
        s1 = prev if prev is not None else prev_prev
        cell = Cell(prev_prev[0], s1[0], c, reduction=reduction, reduction_prev=reduction_prev)
        layers.append(CellLayer(cell, prev_prev, prev))
        out_size = s1[1] // 2 if reduction else s1[1]
        prev_prev, prev = s1, (cell.out_channels, out_size, out_size)
        reduction_prev = reduction

    add(filters // 4, True)
    add(filters // 2, True)
    per_group = normal_cells // 3
    for group in range(3):
        c = filters * 2**group
        if group:
            add(c, True)
        for _ in range(per_group):
            add(c, False)
    assert prev is not None
    layers.append(Head(prev_prev, prev, classes))
    return nn.Sequential(*layers)

