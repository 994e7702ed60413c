"""Layers that hang until a test releases them, importable by name in worker processes (Ray, fake functions).

A hang is released by creating a file, so a test can end it from its own
process whatever process the layer runs in; the layer creates
``<release>.entered`` when it starts to hang, so a test can tell that the
error it got comes from the hang.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

#: How often a hanging layer looks for its release file, seconds.
POLL_S = 0.01


def hang(release: str) -> None:
    """Block until the file ``release`` exists; mark ``<release>.entered`` first."""
    with open(release + ".entered", "w"):
        pass
    while not os.path.exists(release):
        time.sleep(POLL_S)


class Hang(nn.Module):
    """Identity for its first ``after`` calls; then hangs in ``phase`` (``"forward"`` or ``"backward"``).

    Every copy counts its own calls: each worker unpickles one.
    """

    def __init__(self, release: str, *, after: int = 0, phase: str = "forward") -> None:
        super().__init__()
        if phase not in ("forward", "backward"):
            raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")
        self.release = release
        self.after = after
        self.phase = phase
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.after:
            return x
        if self.phase == "forward":
            hang(self.release)
            return x
        out: torch.Tensor = _HangInBackward.apply(x, self.release)
        return out


class _HangInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, release: str) -> torch.Tensor:
        ctx.release = release
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        hang(ctx.release)
        return grad, None


class HangOnLoad(nn.Module):
    """Identity whose unpickling (a worker loading its stage) hangs: the worker never gets to an iteration."""

    def __init__(self, release: str) -> None:
        super().__init__()
        self.release = release

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        hang(state["release"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
