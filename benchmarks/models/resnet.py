"""ResNet with bottleneck blocks (He et al. 2016), one block per ``nn.Sequential`` layer.

ResNet-101 is ``resnet((3, 4, 23, 3))``: a stem, 33 bottleneck blocks and a
classifier head, 35 layers. No in-place activations: a stage's first layer
must not modify its input (funcpipe needs the input's gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

EXPANSION = 4
WIDTHS = (64, 128, 256, 512)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, plus the shortcut (projected when the shape changes)."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * EXPANSION
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(blocks: Sequence[int], classes: int = 1000) -> nn.Sequential:
    """A bottleneck ResNet with ``blocks[i]`` blocks in group ``i`` (ResNet-101: ``(3, 4, 23, 3)``)."""
    layers: list[nn.Module] = [nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    )]
    channels = 64
    for group, (count, width) in enumerate(zip(blocks, WIDTHS, strict=True)):
        for i in range(count):
            stride = 2 if group > 0 and i == 0 else 1
            layers.append(Bottleneck(channels, width, stride))
            channels = width * EXPANSION
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)))
    return nn.Sequential(*layers)
