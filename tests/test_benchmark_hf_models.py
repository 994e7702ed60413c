"""The Hugging Face counterparts of the benchmark models (benchmarks/models/hf.py): the hand-written models' sizes."""

from __future__ import annotations

import pytest
import torch
from benchmarks.models import HF_MODELS, MODELS, build, build_hf
from torch import nn

pytest.importorskip("transformers")


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # a tied parameter once


def test_the_names_are_new_and_each_has_a_hand_written_counterpart() -> None:
    assert set(HF_MODELS) == {"hf_bert_large", "hf_resnet101"}
    assert not set(HF_MODELS) & set(MODELS)
    assert {name[3:] for name in HF_MODELS} <= set(MODELS)
    with pytest.raises(KeyError, match="hf_resnet101"):
        build_hf("resnet101")


def test_hf_resnet101_has_the_hand_written_parameter_count_and_a_loss() -> None:
    model, inputs, targets, loss_fn = build_hf("hf_resnet101", batch=1)
    assert _params(model) == _params(build("resnet101", batch=1)[0]) == 44_549_160
    assert inputs.shape == (1, 3, 224, 224) and targets.shape == (1,)
    with torch.no_grad():
        loss = loss_fn(model(inputs), targets)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_hf_bert_large_is_bert_large_with_its_decoder_tied() -> None:
    model, inputs, targets, _ = build_hf("hf_bert_large", batch=1)
    assert _params(model) == _params(build("bert_large", batch=1)[0]) == 335_174_458
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].shape == (1, 128)
    assert targets.shape == (1, 128)
