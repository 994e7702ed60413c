"""BERT (Devlin et al. 2019) as a pipeline: embeddings, one encoder layer per layer, the MLM head.

Sequence length 128: BERT's pre-training runs 90% of its steps at 128 tokens
(the paper, §A.2), and at 512 one micro-batch of 4 would make the attention's
activations, not the weights, the memory a function has to hold. Dropout is 0
so that a run is deterministic (funcpipe checks equivalence with PyTorch); it
changes neither the parameters nor the time much. The MLM decoder is tied to
the token embeddings, as in standard BERT-Large (Devlin et al. 2019; 335 M
parameters with the MLM head's transform and bias): a profile records the tie
(``ModelProfile.tied``), so a function holding the whole model holds the matrix
once, and a pipeline whose first and last stages hold one copy each adds the two
copies' gradients every iteration (:mod:`funcpipe.costmodel`). ``bert(config,
tied=False)`` gives the untied variant (31 M parameters more).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["BERT_LARGE", "BertConfig", "bert"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate: int = 4096
    sequence_length: int = 128
    max_positions: int = 512
    type_vocab_size: int = 2


BERT_LARGE = BertConfig()


class Embeddings(nn.Module):
    """Token + position + segment embeddings, then LayerNorm (every token in segment 0)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden)
        self.positions = nn.Embedding(config.max_positions, config.hidden)
        self.segments = nn.Embedding(config.type_vocab_size, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=1e-12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions) + self.segments.weight[0]
        return self.norm(x)


class MaskedLMHead(nn.Module):
    """Dense + GELU + LayerNorm, then the decoder to vocabulary logits at every position."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.GELU(),
                                       nn.LayerNorm(config.hidden, eps=1e-12))
        self.decoder = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


def bert(config: BertConfig = BERT_LARGE, *, tied: bool = True) -> nn.Sequential:
    """Embeddings, ``config.layers`` post-norm encoder layers (GELU) and the MLM head, whose
    decoder shares the token embedding matrix unless ``tied=False``."""
    encoder = [
        nn.TransformerEncoderLayer(config.hidden, config.heads, config.intermediate, dropout=0.0,
                                   activation="gelu", batch_first=True, layer_norm_eps=1e-12)
        for _ in range(config.layers)
    ]
    embeddings, head = Embeddings(config), MaskedLMHead(config)
    if tied:
        head.decoder.weight = embeddings.tokens.weight
    return nn.Sequential(embeddings, *encoder, head)
