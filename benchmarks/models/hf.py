"""The paper's BERT-Large and ResNet-101 as Hugging Face ``transformers`` builds them (random init, no download).

Counterparts of the hand-written ``nn.Sequential`` models of this package, for
comparing what splitting a real model (:func:`funcpipe.split.split`) gives with
the layers written by hand:

* ``hf_bert_large`` — ``BertForMaskedLM`` at BERT-Large's sizes (24 layers,
  hidden 1024, 16 heads, intermediate 4096), sequence length 128, dropout 0 as
  ``bert_large``; its decoder is tied to the token embeddings (as ``bert_large``'s);
  it takes ``input_ids`` and ``attention_mask`` (all ones) and is trained with
  cross entropy over every position of ``out.logits``.
* ``hf_resnet101`` — ``ResNetForImageClassification`` with ResNet-101's stages
  (3, 4, 23, 3 bottlenecks), 1000 classes, 224x224 images.

``transformers`` is in the ``dev`` extra only: it is imported when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["HF_MODELS", "HFWorkload", "hf_bert_large", "hf_resnet101"]

#: ``(model, inputs, targets, loss_fn)``: inputs a tensor or a dict of them, the loss taking the model's output.
HFWorkload = tuple[nn.Module, Any, torch.Tensor, Callable[[Any, torch.Tensor], torch.Tensor]]

SEQUENCE_LENGTH = 128
VOCAB_SIZE = 30522
IMAGE_CLASSES = 1000


def _bert_large() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config)


def _resnet101() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(depths=[3, 4, 23, 3], layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048],
                          embedding_size=64, num_labels=IMAGE_CLASSES)
    return ResNetForImageClassification(config)


def masked_lm_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy over every position of a ``MaskedLMOutput``'s logits."""
    logits = out.logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def classification_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.logits, targets)


def _tokens(model: nn.Module, batch: int, seed: int) -> HFWorkload:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, SEQUENCE_LENGTH)
    ids = torch.randint(0, VOCAB_SIZE, shape, generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(shape, dtype=torch.long)}
    return model, inputs, torch.randint(0, VOCAB_SIZE, shape, generator=gen), masked_lm_loss


def _images(model: nn.Module, batch: int, seed: int) -> HFWorkload:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, 224, 224, generator=gen)
    return model, inputs, torch.randint(0, IMAGE_CLASSES, (batch,), generator=gen), classification_loss


#: name -> (builder of the model, builder of a batch); each hand-written counterpart is ``name[3:]``.
HF_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, int, int], HFWorkload]]] = {
    "hf_bert_large": (_bert_large, _tokens),
    "hf_resnet101": (_resnet101, _images),
}


def build_hf(name: str, batch: int = 4, seed: int = 0) -> HFWorkload:
    """``(model, inputs, targets, loss_fn)`` of Hugging Face benchmark model ``name`` for ``batch`` samples."""
    if name not in HF_MODELS:
        raise KeyError(f"unknown Hugging Face benchmark model {name!r}; choose one of {sorted(HF_MODELS)}")
    make_model, make_batch = HF_MODELS[name]
    torch.manual_seed(seed)
    return make_batch(make_model(), batch, seed)


def hf_bert_large() -> HFWorkload:
    return build_hf("hf_bert_large")


def hf_resnet101() -> HFWorkload:
    return build_hf("hf_resnet101")
