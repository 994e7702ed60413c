"""Issue 17: any nn.Module trains as a pipeline, equal to plain PyTorch.

Real models nobody here wrote (Hugging Face ConvNext and BERT built from
configs, no download) and a module of our own with a skip connection spanning
three stages, a tuple input and a tuple output. Each is trained by funcpipe on
Ray (2-4 stages, replicas, SGD with momentum and AdamW) and, independently, by
a plain PyTorch loop on a deep copy over the same global batches; the
parameters must agree within rtol 1e-4 after several iterations, and must
have moved (a model that is not trained at all would agree too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from funcpipe import Plan, Trainer
from tests.helpers import skip_net

pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, ConvNextConfig, ConvNextForImageClassification

RTOL = 1e-4
ATOL = 1e-6
ITERATIONS = 3
BATCH = 8


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- models and their data

def convnext() -> tuple[nn.Module, list[Any], Callable[[Any, torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[2, 1],
                            drop_path_rate=0.0, num_labels=10)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
               for _ in range(ITERATIONS)]
    return ConvNextForImageClassification(config), batches, lambda out, y: nn.functional.cross_entropy(out.logits, y)


def bert() -> tuple[nn.Module, list[Any], Callable[[Any, torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(ITERATIONS):
        ids = torch.randint(0, 99, (BATCH, 12), generator=g)
        mask = (torch.arange(12) < torch.randint(4, 13, (BATCH, 1), generator=g)).long()  # padded sequences
        batches.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (BATCH,), generator=g)))
    return BertForSequenceClassification(config), batches, lambda out, y: nn.functional.cross_entropy(out.logits, y)


def sgd(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adamw(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    # A key bias of attention has a gradient of exactly zero (softmax ignores a shift); what it gets is rounding
    # noise, which Adam's normalisation turns into steps of up to lr * noise / eps: a few 1e-6 at lr 1e-2 apart
    # between any two summation orders (micro-batches or not). At lr 1e-3 that noise is within ATOL.
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def plain(model: nn.Module, batches: list[Any], loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
          optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]) -> nn.Module:
    """The same training in plain PyTorch: one step per global batch, on the whole batch."""
    model.train()
    opt = optimizer(model.parameters())
    for inputs, targets in batches:
        opt.zero_grad()
        loss_fn(call(model, inputs), targets).backward()
        opt.step()
    return model


def assert_trained_like_plain(model: nn.Module, expected: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    moved = 0
    for (name, p), (_, q) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        moved += not torch.equal(p.detach(), initial[name])
    assert moved >= len(initial) // 2, f"only {moved} of {len(initial)} parameters changed: nothing was trained"


MODELS = {"convnext": convnext, "bert": bert, "skip_net": skip_net}


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize(("name", "balance", "replicas", "optimizer"), [
    pytest.param("convnext", [3, 4], [2, 1], sgd, id="convnext-2x-sgd"),
    pytest.param("convnext", [2, 2, 2, 1], None, adamw, id="convnext-4-adamw", marks=pytest.mark.slow),
    pytest.param("bert", [3, 3], [1, 2], adamw, id="bert-2x-adamw", marks=pytest.mark.slow),
    pytest.param("bert", [2, 1, 2, 1], None, sgd, id="bert-4-sgd", marks=pytest.mark.slow),
    pytest.param("skip_net", [1, 1, 1, 1], [1, 2, 1, 1], sgd, id="skip-4x-sgd", marks=pytest.mark.slow),
    pytest.param("skip_net", [2, 2], None, adamw, id="skip-2-adamw"),
])  # the slow ones: 27-32 s each at load 6; one model of each kind stays in the quick run
def test_a_model_nobody_here_wrote_trains_on_ray_like_plain_pytorch(
        name: str, balance: list[int], replicas: list[int] | None,
        optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]) -> None:
    model, batches, loss_fn = MODELS[name]()
    expected = plain(copy.deepcopy(model), batches, loss_fn, optimizer)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = Plan.manual(balance, micro_batch_size=2, global_batch_size=BATCH, replicas=replicas)
    trainer = Trainer(model, loss_fn, optimizer, plan, backend="ray")
    history = trainer.fit(batches, progress=False)
    assert len(history) == ITERATIONS
    assert trainer.model is model  # trained in place
    assert_trained_like_plain(model, expected, initial)
