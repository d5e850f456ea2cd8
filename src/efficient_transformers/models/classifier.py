"""A Transformer encoder classifier over any registered attention mechanism (the LRA setting).

    [CLS] + tokens -> embedding + positions -> depth x block -> pool -> 2-layer ReLU MLP -> logits

pooling="cls" prepends a learned CLS embedding and reads its output (LRA's choice); pooling="mean"
averages the outputs of real tokens; pooling="pma" is the Set Transformer's pooling by multihead
attention, PMA_1 (one learned seed attends the real outputs, then MAB's rFF and LayerNorm). Padding (mask False) never influences real positions or the pool.

Global tokens: with a mechanism that takes them (card `global_tokens`, e.g. Longformer), the CLS
token is marked global (it attends to all and all attend to it), and `forward(tokens, mask,
global_mask=g)` marks more (g is (B, N) over the tokens, without the CLS).

Data shape: `data_shape=(H, W)` (an image task's grid; the sequence is its raster order) is passed as
the `shape` option to mechanisms that lay tokens out on a grid (card `uses_shape`: Axial, 2-D Image
Transformer). The CLS token lies outside the grid: such a layer sees 1 + H W positions and treats the
leading positions beyond the grid as global tokens.

Model-level techniques (any mechanism): `share`, `embedding_dim`, `reversible`, `ff_chunks` (see
`models.blocks.TransformerStack` and `models.embedding`).

Positions: `positional=None` (default) adds sinusoidal absolute positions, or none for mechanisms
that bring their own (card `own_positions`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.aux_losses import AuxLoss, collect_aux_losses, reset_aux_losses
from ..registry import card
from .set_transformer import PMA
from .blocks import TransformerStack, check_data_shape, check_tokens, resolve_positional
from .embedding import Embedder

POOLINGS = ("cls", "mean", "pma")


class TransformerEncoder(nn.Module):
    """Tokens (B, N) + mask -> pooled features (B, dim). Shared by the classifier and the retrieval towers."""

    def __init__(self, vocab_size: int, dim: int = 256, depth: int = 4, heads: int = 4, *,
                 attention: str = "vanilla", attention_options: dict[str, Any] | None = None,
                 pooling: str = "cls", max_seq_len: int = 4096, norm: str = "pre", positional: str | None = None,
                 ff_mult: int = 4, dropout: float = 0.0, data_shape: tuple[int, ...] | None = None,
                 share: str = "none", embedding_dim: int | None = None, reversible: bool = False,
                 ff_chunks: int = 1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; allowed: {list(POOLINGS)}")
        if not card(attention).bidirectional:
            raise ValueError(f"{attention}: an encoder needs a bidirectional mechanism; use causal models for it")
        self.vocab_size, self.pooling, self.max_seq_len = vocab_size, pooling, max_seq_len
        self.global_cls = pooling == "cls" and card(attention).global_tokens
        self.data_shape = check_data_shape(data_shape)
        extra = 1 if pooling == "cls" else 0
        positional = resolve_positional(attention, positional)
        self.embed = Embedder(vocab_size, dim, positional=positional, max_seq_len=max_seq_len + extra, dropout=dropout,
                              embedding_dim=embedding_dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pooling == "cls" else None
        self.pma = PMA(dim, heads, num_seeds=1) if pooling == "pma" else None  # Set Transformer's pooling
        self.stack = TransformerStack(
            dim, depth, heads, attention=attention, attention_options=attention_options, causal=False,
            norm=norm, ff_mult=ff_mult, dropout=dropout, max_seq_len=max_seq_len + extra,
            data_shape=self.data_shape, share=share, reversible=reversible, ff_chunks=ff_chunks,
        )

    def forward(self, tokens: Tensor, mask: Tensor | None = None, global_mask: Tensor | None = None) -> Tensor:
        """tokens (B, N), mask and global_mask (B, N) bool or None -> pooled features (B, dim)."""
        check_tokens(tokens, self.vocab_size)
        B, N = tokens.shape
        if N > self.max_seq_len:
            raise ValueError(f"sequence length {N} exceeds the model's max_seq_len={self.max_seq_len}")
        for label, m in (("mask", mask), ("global_mask", global_mask)):
            if m is not None and (not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != (B, N)):
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"{label} must be a bool tensor of shape {(B, N)}, got {got}")
        if self.pooling == "cls":
            x = self.embed(tokens, prefix=self.cls.expand(B, 1, -1))  # (B, 1 + N, dim)
            one = torch.ones(B, 1, dtype=torch.bool, device=tokens.device)  # the CLS position
            if mask is not None:
                mask = torch.cat([one, mask], dim=1)  # (B, 1 + N)
            if global_mask is not None or self.global_cls:
                rest = torch.zeros_like(tokens, dtype=torch.bool) if global_mask is None else global_mask
                global_mask = torch.cat([one if self.global_cls else ~one, rest], dim=1)  # (B, 1 + N)
            return self.stack(x, mask, global_mask=global_mask)[:, 0]  # (B, dim)
        h = self.stack(self.embed(tokens), mask, global_mask=global_mask)  # (B, N, dim)
        if self.pma is not None:
            return self.pma(h, mask)[:, 0]  # (B, dim): one learned seed attends the real outputs
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
                 pooling: str = "cls", max_seq_len: int = 4096, norm: str = "pre", positional: str | None = None,
                 ff_mult: int = 4, dropout: float = 0.0, mlp_dim: int | None = None,
                 data_shape: tuple[int, ...] | None = None, share: str = "none", embedding_dim: int | None = None,
                 reversible: bool = False, ff_chunks: int = 1) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(
            vocab_size, dim, depth, heads, attention=attention, attention_options=attention_options,
            pooling=pooling, max_seq_len=max_seq_len, norm=norm, positional=positional, ff_mult=ff_mult,
            dropout=dropout, data_shape=data_shape, share=share, embedding_dim=embedding_dim,
            reversible=reversible, ff_chunks=ff_chunks,
        )
        self.head = classification_head(dim, mlp_dim or dim, num_classes)

    def forward(self, tokens: Tensor, mask: Tensor | None = None, global_mask: Tensor | None = None) -> Tensor:
        """tokens (B, N) long, mask (B, N) bool -> logits (B, num_classes). After a forward,
        `aux_losses()` gives the attention layers' auxiliary losses (see `core.aux_losses`)."""
        reset_aux_losses(self)
        return self.head(self.encoder(tokens, mask, global_mask))

    def aux_losses(self) -> dict[str, AuxLoss]:
        return collect_aux_losses(self)
