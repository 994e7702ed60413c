"""The demo job: a digits classifier trained as a 3-stage pipeline with a replicated stage."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from funcpipe.errors import ConfigError
from funcpipe.plans import Plan
from funcpipe.trainer import DEFAULT_CHECKPOINT_EVERY, History, Trainer

__all__ = ["DemoResult", "demo_plan", "digits_model", "load_digits", "run_demo"]


def load_digits(*, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package).

    Returns ``(train_x, train_y, test_x, test_y)``: a seeded 80/20 split, pixels scaled to [0, 1].
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ConfigError(
            "the demo reads scikit-learn's digits data set; hint: pip install 'funcpipe[demo]'"
        ) from exc
    digits = sk_load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def digits_model(*, seed: int = 0) -> nn.Sequential:
    """A 7-layer MLP for 64-pixel digits (about 100 k parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def demo_plan() -> Plan:
    """Three stages (layers 0–1, 2–4, 5–6); the middle one has two replicas."""
    return Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=16, global_batch_size=64)


@dataclasses.dataclass
class DemoResult:
    accuracy_before: float
    accuracy_after: float
    history: History
    plan: Plan
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "iterations": len(self.history),
            "final_loss": self.history.losses[-1] if self.history.losses else None,
            "seconds": self.seconds,
            "stages": self.history.stage_summary(),
        }


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def run_demo(
    *,
    epochs: int = 8,
    backend: str = "ray",
    storage: str | None = None,
    progress: bool = True,
    job: str | None = None,
    resume: bool = False,
    max_retries: int = 0,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> DemoResult:
    """Train the digits classifier with :func:`demo_plan` and measure test accuracy.

    With ``resume``, continue the demo job a killed run left in ``storage``
    (``funcpipe resume``); the job's manifest records how the CLI started it.
    """
    import time

    train_x, train_y, test_x, test_y = load_digits()
    model = digits_model()
    plan = demo_plan()
    before = accuracy(model, test_x, test_y)
    batch = plan.global_batch_size
    batches = [
        (train_x[i : i + batch], train_y[i : i + batch])
        for i in range(0, len(train_x) - batch + 1, batch)
    ]
    trainer = Trainer(
        model,
        nn.functional.cross_entropy,
        lambda params: torch.optim.Adam(params, lr=2e-3),
        plan,
        backend=backend,
        storage=storage,
        job=job,
    )
    trainer._job.extra = {"cli": {"command": "demo", "epochs": epochs}}  # for `funcpipe resume`
    started = time.perf_counter()
    history = trainer.fit(batches, epochs=epochs, progress=progress, resume=resume, max_retries=max_retries,
                          checkpoint_every=checkpoint_every)
    seconds = time.perf_counter() - started
    return DemoResult(before, accuracy(trainer.model, test_x, test_y), history, plan, seconds)
