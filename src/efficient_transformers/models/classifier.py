"""A Transformer encoder classifier over any registered attention mechanism (the LRA setting).

    [CLS] + tokens -> embedding + positions -> depth x block -> pool -> 2-layer ReLU MLP -> logits

pooling="cls" prepends a learned CLS embedding and reads its output (LRA's choice); pooling="mean"
averages the outputs of real tokens. Padding (mask False) never influences real positions or the pool.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import card
from .blocks import TransformerStack, check_tokens
from .embedding import Embedder

POOLINGS = ("cls", "mean")


class TransformerEncoder(nn.Module):
    """Tokens (B, N) + mask -> pooled features (B, dim). Shared by the classifier and the retrieval towers."""

    def __init__(self, vocab_size: int, dim: int = 256, depth: int = 4, heads: int = 4, *,
                 attention: str = "vanilla", attention_options: dict[str, Any] | None = None,
                 pooling: str = "cls", max_seq_len: int = 4096, norm: str = "pre", positional: str = "sinusoidal",
                 ff_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; allowed: {list(POOLINGS)}")
        if not card(attention).bidirectional:
            raise ValueError(f"{attention}: an encoder needs a bidirectional mechanism; use causal models for it")
        self.vocab_size, self.pooling, self.max_seq_len = vocab_size, pooling, max_seq_len
        extra = 1 if pooling == "cls" else 0
        self.embed = Embedder(vocab_size, dim, positional=positional, max_seq_len=max_seq_len + extra, dropout=dropout)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pooling == "cls" else None
        self.stack = TransformerStack(
            dim, depth, heads, attention=attention, attention_options=attention_options, causal=False,
            norm=norm, ff_mult=ff_mult, dropout=dropout, max_seq_len=max_seq_len + extra,
        )

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        check_tokens(tokens, self.vocab_size)
        B, N = tokens.shape
        if N > self.max_seq_len:
            raise ValueError(f"sequence length {N} exceeds the model's max_seq_len={self.max_seq_len}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B, N)):
            raise ValueError(f"mask must be a bool tensor of shape {(B, N)}, got {mask.dtype} {tuple(mask.shape)}")
        if self.pooling == "cls":
            x = self.embed(tokens, prefix=self.cls.expand(B, 1, -1))  # (B, 1 + N, dim)
            if mask is not None:
                mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
            return self.stack(x, mask)[:, 0]  # (B, dim)
        h = self.stack(self.embed(tokens), mask)  # (B, N, dim)
        if mask is None:
            return h.mean(dim=1)
        w = mask.to(h.dtype)[..., None]  # (B, N, 1)
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, dim)


def classification_head(in_features: int, mlp_dim: int, num_classes: int) -> nn.Sequential:
    """The LRA classifier head: Linear -> ReLU -> Linear (in_features -> mlp_dim -> num_classes)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return nn.Sequential(nn.Linear(in_features, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, num_classes))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, dim: int = 256, depth: int = 4, heads: int = 4, *,
                 attention: str = "vanilla", attention_options: dict[str, Any] | None = None,
                 pooling: str = "cls", max_seq_len: int = 4096, norm: str = "pre", positional: str = "sinusoidal",
                 ff_mult: int = 4, dropout: float = 0.0, mlp_dim: int | None = None) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(
            vocab_size, dim, depth, heads, attention=attention, attention_options=attention_options,
            pooling=pooling, max_seq_len=max_seq_len, norm=norm, positional=positional, ff_mult=ff_mult,
            dropout=dropout,
        )
        self.head = classification_head(dim, mlp_dim or dim, num_classes)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """tokens (B, N) long, mask (B, N) bool -> logits (B, num_classes)."""
        return self.head(self.encoder(tokens, mask))
