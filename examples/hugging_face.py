"""Train Hugging Face models as they are: a ConvNext on images, a BERT on padded token sequences.

    pip install transformers   # no torchvision needed; the models are built from configs (no download)
    python examples/hugging_face.py [--backend ray|thread]

Each model is profiled (one unit per embeddings / block / head, found by
tracing), planned by ``funcpipe.plan`` for AWS Lambda (the cheapest plan:
for models this small, one function), and trained on local Ray with that
plan. The configs are small so that this runs in half a minute on a laptop;
the same code trains the full-size models (``ConvNextConfig()``,
``BertConfig()``), for which the plan cuts between the same units.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import funcpipe

BATCH = 16


def vision(backend: str = "ray", iterations: int = 4) -> funcpipe.History:
    """A ConvNext (LayerNorm, so micro-batching changes nothing) on 32x32 images, 10 classes."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(
        num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], drop_path_rate=0.0,
        num_labels=10))
    images, labels = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))

    def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.logits, y)  # the model's own output: an ImageClassifierOutput

    return _train(model, images, labels, loss_fn, backend, iterations)


def text(backend: str = "ray", iterations: int = 4) -> funcpipe.History:
    """A BERT for sequence classification on padded sequences: ``input_ids`` and ``attention_mask`` in a dict."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2))
    lengths = torch.randint(8, 33, (BATCH, 1))
    inputs = {"input_ids": torch.randint(0, 1000, (BATCH, 32)),
              "attention_mask": (torch.arange(32) < lengths).long()}  # what a tokenizer's padding gives
    labels = torch.randint(0, 2, (BATCH,))

    def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.logits, y)

    return _train(model, inputs, labels, loss_fn, backend, iterations)


def _train(model: nn.Module, inputs: Any, labels: torch.Tensor, loss_fn: Any, backend: str,
           iterations: int) -> funcpipe.History:
    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-3)

    profile = funcpipe.profile(model, inputs, labels, loss_fn, micro_batch_sizes=(1, 2, 4), optimizer=optimizer,
                               rounds=2, warmup=1)
    print(f"{type(model).__name__}: {len(profile.layers)} units: {', '.join(lp.name for lp in profile.layers)}")
    plan = funcpipe.plan(profile, "aws_lambda", global_batch_size=BATCH, objective="cost", time_limit_s=10,
                         progress=False)  # stage cuts between units, memory, replicas, micro-batches
    print(plan)
    trainer = funcpipe.Trainer(model, loss_fn, optimizer, plan, backend=backend)
    history = trainer.fit([(inputs, labels)] * iterations, progress=False)
    print(history)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="ray", help="ray (default) or thread")
    args = parser.parse_args()
    vision(args.backend)
    text(args.backend)


if __name__ == "__main__":
    main()
