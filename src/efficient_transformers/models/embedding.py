"""Token embedding plus absolute positions, shared by the language model and the classifier.

ALBERT's factorised embedding (`embedding_dim` = E < dim): tokens are embedded in E dimensions and
projected to the model width, V E + E dim + dim parameters instead of V dim:

    x = (W_proj emb_E(tokens) + b) * scale + positions          emb_E: (V, E), W_proj: (dim, E)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .positions import build_positions


class Embedder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, *, positional: str = "sinusoidal", max_seq_len: int = 4096,
                 dropout: float = 0.0, embedding_dim: int | None = None) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        from .blocks import check_embedding_dim  # late: blocks imports the registry

        factorised = check_embedding_dim(embedding_dim, dim) not in (None, dim)
        self.embedding_dim = embedding_dim if factorised else dim
        self.tokens = nn.Embedding(vocab_size, self.embedding_dim)
        # with sinusoidal positions the embedding is multiplied by sqrt(dim) (Vaswani et al.); the init
        # N(0, 1 / dim) then gives token vectors of unit RMS, as large as the positions (RMS 1 / sqrt(2)).
        # With N(0, 0.02^2) they were ~4x smaller than the positions at dim 64 and the LRA quick runs sat
        # on the majority class for hundreds of steps (Retrieval: 54% -> 93% test at 400 steps; issue 15).
        sinusoidal_scale = positional == "sinusoidal" and not factorised
        nn.init.normal_(self.tokens.weight, std=dim ** -0.5 if sinusoidal_scale else 0.02)
        self.project = nn.Linear(self.embedding_dim, dim) if factorised else None  # ALBERT's E -> H
        self.positions = build_positions(positional, dim, max_seq_len)
        self.scale = math.sqrt(dim) if positional == "sinusoidal" else 1.0
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, offset: int = 0, prefix: Tensor | None = None) -> Tensor:
        """tokens (B, N) -> (B, N [+ P], dim); `prefix` (B, P, dim) is prepended before positions are added."""
        x = self.tokens(tokens)  # (B, N, E)
        if self.project is not None:
            x = self.project(x)  # (B, N, dim)
        x = x * self.scale
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + N, dim)
        if self.positions is not None:
            x = x + self.positions(x.shape[1], offset, dtype=x.dtype)[None]
        return self.drop(x)
