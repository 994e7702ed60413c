"""Independent references and small models the tests share."""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from funcpipe.executors.base import Actor, ActorHandle, Executor, Resources

Batch = tuple[torch.Tensor, torch.Tensor]
OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]


def mlp7(seed: int = 0, width: int = 16) -> nn.Sequential:
    """Seven layers, so balance [7] and [2, 3, 2] both cut it."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width),
        nn.Tanh(), nn.Linear(width, 3),
    )


def regression_batches(count: int, batch: int, seed: int = 1) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 8, generator=generator), torch.randn(batch, 3, generator=generator))
        for _ in range(count)
    ]


def plain_training(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: OptimizerFactory,
    batches: Sequence[Batch],
    *,
    losses: list[float] | None = None,
) -> nn.Module:
    """The reference: single-process PyTorch, loss = mean over the global batch (appended to ``losses``)."""
    model = copy.deepcopy(model)
    opt = optimizer(model.parameters())
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    return model


def assert_same_parameters(actual: nn.Module, expected: nn.Module) -> None:
    expected_state = expected.state_dict()
    actual_state = actual.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        torch.testing.assert_close(actual_state[name], value, rtol=1e-4, atol=1e-6, msg=name)


def sgd_momentum(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer factory workers in other processes load by reference from this light module."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class SpyExecutor(Executor):
    """Another executor that records every actor it launches (to check that nothing was, or what)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.name = inner.name
        self.call_budget_s = inner.call_budget_s
        self.start_timeout_s = inner.start_timeout_s
        self.launched: list[ActorHandle] = []

    def launch(self, actor_cls: type[Actor], *args: Any, name: str, resources: Resources) -> ActorHandle:
        handle = self.inner.launch(actor_cls, *args, name=name, resources=resources)
        self.launched.append(handle)
        return handle

    def fit_resources(self, requested: Sequence[Resources]) -> list[Resources]:
        return self.inner.fit_resources(requested)

    def check_storage(self, url: str) -> None:
        self.inner.check_storage(url)

    def shutdown(self) -> None:
        self.inner.shutdown()


def funcpipe_threads() -> list[threading.Thread]:
    """The threads of this process that funcpipe started (they are all named ``funcpipe...``)."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("funcpipe")]


def assert_no_funcpipe_thread_left(within_s: float) -> None:
    """Every funcpipe thread of this process ends within ``within_s`` seconds (all of them together)."""
    deadline = time.monotonic() + within_s
    for thread in funcpipe_threads():
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    left = funcpipe_threads()
    frames = sys._current_frames()
    # Where each one is, so that a thread left behind says what it waits for.
    assert not left, "\n".join(f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}" for t in left
                                if t.ident in frames) or [t.name for t in left]


class CreatesFile:
    """Unpickling this calls ``os.makedirs(path)``: proof that the bytes were unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (self.path,))


def assert_fit_fails_not_started(trainer: Any, start_timeout_s: float, invocations: Callable[[], int]) -> None:
    """``trainer.fit`` on functions that accept calls but never run them: ``WorkerNotStarted`` after the
    start timeout (not long after), every worker invoked once, and no funcpipe thread left."""
    import pytest

    from funcpipe import WorkerNotStarted

    started = time.monotonic()
    with pytest.raises(WorkerNotStarted, match=r"stage \d replica \d failed: the function never reported"):
        trainer.fit(regression_batches(2, 8), progress=False)
    assert start_timeout_s <= time.monotonic() - started < start_timeout_s + 30
    assert invocations() == trainer.plan.num_workers
    assert_no_funcpipe_thread_left(within_s=10)  # the watcher stops once no call is left


# -- a module of our own for tracing (issue 17) ------------------------------------------------------

SKIP_ITERATIONS = 3
SKIP_BATCH = 8


class SkipNet(nn.Module):
    """Four units; ``a`` (unit 0) is used again by unit 3, so it crosses three cuts; two inputs, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.l0 = nn.Linear(6, 8)
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)
        self.l3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.tanh(self.l0(x))
        b = torch.tanh(self.l1(a))
        c = torch.tanh(self.l2(b)) * scale
        return self.l3(c + a), a.sum(-1)


def skip_net(iterations: int = SKIP_ITERATIONS) -> tuple[nn.Module, list[Any], Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [((torch.randn(SKIP_BATCH, 6, generator=g), torch.rand(SKIP_BATCH, 1, generator=g)),
                torch.randint(0, 3, (SKIP_BATCH,), generator=g)) for _ in range(iterations)]

    def loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out[0], y) + 0.1 * out[1].pow(2).mean()

    return SkipNet(), batches, loss
