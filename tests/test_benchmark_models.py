"""The paper's benchmark models (benchmarks/models): sizes against published figures, shapes, cuttability."""

from __future__ import annotations

import pytest
import torch
from benchmarks.models import MODELS, build
from benchmarks.models.amoebanet import amoebanet_d
from benchmarks.models.bert import BertConfig, bert
from benchmarks.models.resnet import resnet
from torch import nn


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet101_has_the_published_parameter_count() -> None:
    model = resnet((3, 4, 23, 3))
    assert len(model) == 35  # stem, 33 bottleneck blocks, head
    assert _params(model) == 44_549_160  # torchvision's resnet101, He et al. 2016


def test_bert_large_body_has_the_published_parameter_count() -> None:
    model = bert()
    body = _params(model[:-1])  # embeddings and 24 encoder layers
    pooler = 1024 * 1024 + 1024  # BERT's pooler, which the MLM pipeline does not use
    assert body + pooler == 335_141_888  # bert-large-uncased's BertModel
    assert len(model) == 26
    # The MLM head's decoder is the token embedding matrix; only its transform and bias are its own.
    assert model[-1].decoder.weight is model[0].tokens.weight
    head = 1024 * 1024 + 1024 + 2 * 1024 + 30522
    assert _params(model) == body + head
    assert _params(bert(tied=False)) == body + head + 30522 * 1024


def test_small_models_give_logits_of_the_right_shape() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    for model in (resnet((1, 1, 1, 1), 10), amoebanet_d(3, 16, 10, resolution=32)):
        assert model(images).shape == (2, 10)
    config = BertConfig(vocab_size=50, hidden=16, layers=2, heads=2, intermediate=32, sequence_length=8)
    ids = torch.randint(0, 50, (2, 8))
    assert bert(config)(ids).shape == (2, 8, 50)


def test_amoebanet_layers_pass_one_tensor_and_cut_anywhere() -> None:
    """Every layer boundary carries one tensor, so a pipeline may cut the model there."""
    torch.manual_seed(0)
    model = amoebanet_d(6, 16, 10, resolution=32).eval()
    assert len(model) == 6 + 6
    x = torch.randn(2, 3, 32, 32)
    whole = model(x)
    for cut in range(1, len(model)):
        hidden = model[:cut](x)
        assert isinstance(hidden, torch.Tensor) and hidden.dim() >= 2
        torch.testing.assert_close(model[cut:](hidden), whole)


def test_amoebanet_rejects_a_cell_count_it_cannot_group() -> None:
    with pytest.raises(ValueError, match="multiple of 3"):
        amoebanet_d(4, 16)


def test_every_benchmark_builds_a_batch_its_loss_accepts() -> None:
    assert set(MODELS) == {"resnet101", "amoebanet_d18", "amoebanet_d36", "bert_large"}
    model, inputs, targets, loss_fn = build("resnet101", batch=1)
    assert inputs.shape == (1, 3, 224, 224) and targets.shape == (1,)
    with torch.no_grad():
        loss = loss_fn(model(inputs), targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(KeyError, match="resnet101"):
        build("resnet50")
