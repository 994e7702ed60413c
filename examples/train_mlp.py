"""Train a small regression MLP as a two-stage pipeline on local Ray; compare with plain PyTorch."""

from __future__ import annotations

import copy

import torch
from torch import nn

import funcpipe


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    reference = copy.deepcopy(model)
    batches = [(torch.randn(32, 32), torch.randn(32, 1)) for _ in range(20)]

    plan = funcpipe.Plan.manual([2, 3], replicas=[2, 1], micro_batch_size=8, global_batch_size=32)
    trainer = funcpipe.Trainer(model, nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.05), plan)
    history = trainer.fit(batches, epochs=3)
    print(history)

    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(3):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(reference(x), y).backward()
            opt.step()
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    print(f"largest difference from plain PyTorch: {gap:.2e}")


if __name__ == "__main__":
    main()
