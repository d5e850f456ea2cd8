"""Transformer blocks and the stack the language model and the classifier share.

A block is multi-head self-attention (any registered mechanism) and a position-wise two-layer
feed-forward network, each joined to the stream by a residual connection and layer normalisation:

    pre-norm (default):  x = x + Attn(LN(x));  x = x + FFN(LN(x))        (final LN after the stack)
    post-norm (original): x = LN(x + Attn(x)); x = LN(x + FFN(x))

FFN(x) = W2 dropout(act(W1 x)), hidden size ff_mult * dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import build_attention, card

NORM_KINDS = ("pre", "post")


def attention_options_for(name: str, options: dict[str, Any] | None, max_seq_len: int,
                          data_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The user's options plus what the model knows: its max_seq_len for mechanisms that need a maximum
    length, and its data shape (an image's (H, W)) for mechanisms that lay the sequence out on a grid
    (card `uses_shape`). Options the user gives win."""
    options = dict(options or {})
    the_card = card(name)
    if "max_seq_len" in the_card.options and "max_seq_len" not in options:
        options["max_seq_len"] = max_seq_len
    if data_shape is not None and the_card.uses_shape and "shape" not in options:
        options["shape"] = tuple(data_shape)
    return options


def resolve_positional(attention: str, positional: str | None) -> str:
    """None (the models' default) -> "none" for mechanisms with their own positions (card
    `own_positions`: relative encodings), "sinusoidal" for the others; an explicit kind is kept."""
    if positional is not None:
        return positional
    return "none" if card(attention).own_positions else "sinusoidal"


def check_data_shape(data_shape: Any) -> tuple[int, ...] | None:
    if data_shape is None:
        return None
    if (not isinstance(data_shape, (tuple, list)) or len(data_shape) < 1
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in data_shape)):
        raise ValueError(f"data_shape must be None or a tuple of positive ints such as (32, 32), got {data_shape!r}")
    return tuple(data_shape)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, activation: str = "gelu") -> None:
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; allowed: {list(acts)}")
        self.net = nn.Sequential(nn.Linear(dim, hidden), acts[activation](), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        attention: str = "vanilla",
        attention_options: dict[str, Any] | None = None,
        causal: bool = False,
        norm: str = "pre",
        ff_mult: int = 4,
        dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"unknown norm placement {norm!r}; allowed: {list(NORM_KINDS)}")
        self.norm_kind = norm
        self.attn = build_attention(attention, dim, heads, causal, **(attention_options or {}))
        self.ff = FeedForward(dim, ff_mult * dim, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, state: Any = None, return_state: bool = False,
                global_mask: Tensor | None = None):
        if self.norm_kind == "pre":
            a, new_state = self.attn(self.norm1(x), mask, state, global_mask=global_mask, return_state=True)
            x = x + self.drop(a)
            x = x + self.drop(self.ff(self.norm2(x)))
        else:
            a, new_state = self.attn(x, mask, state, global_mask=global_mask, return_state=True)
            x = self.norm1(x + self.drop(a))
            x = self.norm2(x + self.drop(self.ff(x)))
        return (x, new_state) if return_state else x


class TransformerStack(nn.Module):
    """`depth` blocks; the encoder both models share. Pre-norm stacks end with a final LayerNorm.

    `global_mask` (B, N) bool reaches every layer (mechanisms with global tokens only). The models
    that own a stack reset its layers' auxiliary losses at the start of their forward
    (`reset_aux_losses`), so `collect_aux_losses(model)` after a forward gives that forward's
    losses, summed over layers and calls (see `core.aux_losses`).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        *,
        attention: str = "vanilla",
        attention_options: dict[str, Any] | None = None,
        causal: bool = False,
        norm: str = "pre",
        ff_mult: int = 4,
        dropout: float = 0.0,
        max_seq_len: int = 4096,
        activation: str = "gelu",
        data_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        options = attention_options_for(attention, attention_options, max_seq_len, check_data_shape(data_shape))
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, heads, attention=attention, attention_options=options, causal=causal,
                norm=norm, ff_mult=ff_mult, dropout=dropout, activation=activation,
            )
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None, states: list | None = None, return_states: bool = False,
                global_mask: Tensor | None = None):
        new_states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, mask, None if states is None else states[i], return_state=True,
                         global_mask=global_mask)  # (B, N, dim)
            new_states.append(s)
        x = self.final_norm(x)
        return (x, new_states) if return_states else x


def check_tokens(tokens: Tensor, vocab_size: int, what: str = "tokens") -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"{what} must be a 2-D LongTensor (B, N), got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be integer token ids (torch.long), got {tokens.dtype}")
    if tokens.shape[1] < 1:
        raise ValueError(f"{what} must have at least one position, got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{what} must lie in [0, {vocab_size}), got values in [{int(tokens.min())}, {int(tokens.max())}]")
