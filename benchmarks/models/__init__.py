"""The paper's benchmark models, as ``nn.Sequential`` at the granularity a planner cuts.

One residual block, cell or transformer layer per layer, written here and
initialised at random (no downloads):

* ``resnet101`` — ResNet-101 (He et al. 2016), 224x224 input, 35 layers.
* ``amoebanet_d18`` / ``amoebanet_d36`` — AmoebaNet-D with 18 / 36 normal
  cells and 256 filters (Real et al. 2019, as GPipe trains it), 224x224 input.
* ``bert_large`` — BERT-Large (Devlin et al. 2019): 24 layers, hidden 1024,
  16 heads, sequence length 128, with a masked-language-model head.

Each ``<name>()`` returns ``(model, inputs, targets, loss_fn)`` for a batch of
4 samples — the ``module:function`` form ``funcpipe profile`` and the
benchmarks take. ``build(name, batch)`` gives any batch size.

Their Hugging Face ``transformers`` counterparts (:mod:`benchmarks.models.hf`,
built from configs, random init), under names of their own so that the names
above keep their meaning: ``hf_bert_large`` (``BertForMaskedLM``) and
``hf_resnet101`` (``ResNetForImageClassification``), ``build_hf(name, batch)``;
``benchmarks/compare_profiles.py`` profiles each beside its hand-written model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from benchmarks.models.amoebanet import amoebanet_d
from benchmarks.models.bert import BERT_LARGE, bert
from benchmarks.models.hf import HF_MODELS, HFWorkload, build_hf, hf_bert_large, hf_resnet101
from benchmarks.models.resnet import resnet
from torch import nn

__all__ = ["HF_MODELS", "MODELS", "HFWorkload", "Workload", "amoebanet_d18", "amoebanet_d36", "bert_large", "build",
           "build_hf", "hf_bert_large", "hf_resnet101", "resnet101"]

Workload = tuple[nn.Sequential, torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

IMAGE_CLASSES = 1000


def _images(model: nn.Sequential, batch: int, seed: int) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, 224, 224, generator=gen)
    targets = torch.randint(0, IMAGE_CLASSES, (batch,), generator=gen)
    return model, inputs, targets, nn.functional.cross_entropy


def _masked_lm(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy over every position (the MLM head predicts each token)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _tokens(model: nn.Sequential, batch: int, seed: int) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, BERT_LARGE.sequence_length)
    inputs = torch.randint(0, BERT_LARGE.vocab_size, shape, generator=gen)
    targets = torch.randint(0, BERT_LARGE.vocab_size, shape, generator=gen)
    return model, inputs, targets, _masked_lm


#: name -> (builder of the model, builder of a batch)
MODELS: dict[str, tuple[Callable[[], nn.Sequential], Callable[[nn.Sequential, int, int], Workload]]] = {
    "resnet101": (lambda: resnet((3, 4, 23, 3), IMAGE_CLASSES), _images),
    "amoebanet_d18": (lambda: amoebanet_d(18, 256, IMAGE_CLASSES), _images),
    "amoebanet_d36": (lambda: amoebanet_d(36, 256, IMAGE_CLASSES), _images),
    "bert_large": (lambda: bert(BERT_LARGE), _tokens),
}


def build(name: str, batch: int = 4, seed: int = 0) -> Workload:
    """``(model, inputs, targets, loss_fn)`` of benchmark model ``name`` for ``batch`` samples."""
    if name not in MODELS:
        raise KeyError(f"unknown benchmark model {name!r}; choose one of {sorted(MODELS)}")
    make_model, make_batch = MODELS[name]
    torch.manual_seed(seed)
    return make_batch(make_model(), batch, seed)


def resnet101() -> Workload:
    return build("resnet101")


def amoebanet_d18() -> Workload:
    return build("amoebanet_d18")


def amoebanet_d36() -> Workload:
    return build("amoebanet_d36")


def bert_large() -> Workload:
    return build("bert_large")
