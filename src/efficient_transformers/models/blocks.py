"""Transformer blocks and the stack the language model and the classifier share.

A block is multi-head self-attention (any registered mechanism) and a position-wise two-layer
feed-forward network, each joined to the stream by a residual connection and layer normalisation:

    pre-norm (default):  x = x + Attn(LN(x));  x = x + FFN(LN(x))        (final LN after the stack)
    post-norm (original): x = LN(x + Attn(x)); x = LN(x + FFN(x))

FFN(x) = W2 dropout(act(W1 x)), hidden size ff_mult * dim.

The stack adds the model-level techniques of the survey's section 4.3 and Reformer, which combine with
every mechanism: cross-layer weight sharing (`share`), reversible residual layers (`reversible`) and
the chunked feed-forward (`ff_chunks`); see `TransformerStack`. Adapters and LoRA are in `adapters`.
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
    """FFN(x) = W2 dropout(act(W1 x)); with `chunks` = n > 1, applied to n slices of the sequence in turn
    (Reformer's chunked feed-forward: the same numbers, a hidden activation 1/n the size at a time)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, activation: str = "gelu", chunks: int = 1) -> None:
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; allowed: {list(acts)}")
        self.chunks = check_ff_chunks(chunks)
        self.net = nn.Sequential(nn.Linear(dim, hidden), acts[activation](), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.chunks == 1 or x.shape[1] == 1:
            return self.net(x)
        return torch.cat([self.net(part) for part in x.chunk(self.chunks, dim=1)], dim=1)  # (B, N, dim)


class TransformerBlock(nn.Module):
    """One layer: the attention sublayer f and the feed-forward sublayer g around the residual stream.

    f(x) = drop(A(Attn(LN1(x))))  and  g(x) = drop(A(FFN(LN2(x))))  (pre-norm), where A is a
    bottleneck adapter when one was added (`models.adapters`), else the identity; then
    x = x + f(x); x = x + g(x). The reversible stack calls `attention_branch` and `ff_branch` itself.
    `attn` / `ff` given: those modules are used (shared with other blocks) instead of new ones."""

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
        ff_chunks: int = 1,
        attn: nn.Module | None = None,
        ff: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"unknown norm placement {norm!r}; allowed: {list(NORM_KINDS)}")
        self.norm_kind = norm
        self.attn = attn if attn is not None else build_attention(attention, dim, heads, causal, **(attention_options or {}))
        self.ff = ff if ff is not None else FeedForward(dim, ff_mult * dim, dropout, activation, ff_chunks)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.adapter_attn: nn.Module | None = None  # Houlsby adapters (models.adapters.add_adapters)
        self.adapter_ff: nn.Module | None = None

    def attention_branch(self, x: Tensor, mask: Tensor | None = None, state: Any = None,
                         global_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """f(x) (pre-norm) and the layer's new decoding state."""
        a, new_state = self.attn(self.norm1(x) if self.norm_kind == "pre" else x, mask, state,
                                 global_mask=global_mask, return_state=True)
        if self.adapter_attn is not None:
            a = self.adapter_attn(a)
        return self.drop(a), new_state

    def ff_branch(self, x: Tensor) -> Tensor:
        """g(x) (pre-norm)."""
        h = self.ff(self.norm2(x) if self.norm_kind == "pre" else x)
        if self.adapter_ff is not None:
            h = self.adapter_ff(h)
        return self.drop(h)

    def forward(self, x: Tensor, mask: Tensor | None = None, state: Any = None, return_state: bool = False,
                global_mask: Tensor | None = None):
        a, new_state = self.attention_branch(x, mask, state, global_mask)
        if self.norm_kind == "pre":
            x = x + a
            x = x + self.ff_branch(x)
        else:
            x = self.norm1(x + a)
            x = self.norm2(x + self.ff_branch(x))
        return (x, new_state) if return_state else x


class TransformerStack(nn.Module):
    """`depth` blocks; the encoder both models share. Pre-norm stacks end with a final LayerNorm.

    `global_mask` (B, N) bool reaches every layer (mechanisms with global tokens only). The models
    that own a stack reset its layers' auxiliary losses at the start of their forward
    (`reset_aux_losses`), so `collect_aux_losses(model)` after a forward gives that forward's
    losses, summed over layers and calls (see `core.aux_losses`).

    Cross-layer weight sharing (`share`, Universal Transformer / ALBERT):
        "none"       every depth has its own block (default);
        "all"        one block (attention, feed-forward, both layer norms) applied at every depth;
        "attention"  one attention layer for all depths; feed-forward and layer norms per depth;
        "ffn"        one feed-forward for all depths; attention and layer norms per depth.
    `blocks[i]` is the module run at depth i (the same object where shared), so the state_dict names
    every depth and `parameters()` counts a shared weight once; checkpoints store it once. Decoding
    states stay per depth: a shared layer carries one state per depth at which it runs.

    Reversible residual layers (`reversible=True`, Reformer; pre-norm only): the stream is split in two
    halves X1 = X2 = x, each block computes
        Y1 = X1 + f(X2),    Y2 = X2 + g(Y1)
    and the stack returns LN((Y1 + Y2) / 2). In training, `models.reversible` runs the blocks inside one
    autograd Function that keeps only the last (Y1, Y2) and recomputes each block's inputs backwards
    (X2 = Y2 - g(Y1), X1 = Y1 - f(X2)), so activation memory does not grow with depth. Decoding (a
    state given or asked for) and no-grad calls run the same equations block by block.

    `ff_chunks` = n: the feed-forward runs on n slices of the sequence (Reformer's chunking).
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
        share: str = "none",
        reversible: bool = False,
        ff_chunks: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        check_share(share)
        check_reversible(reversible, norm)
        check_ff_chunks(ff_chunks)
        options = attention_options_for(attention, attention_options, max_seq_len, check_data_shape(data_shape))
        self.share, self.reversible = share, reversible
        make = lambda **shared: TransformerBlock(  # noqa: E731
            dim, heads, attention=attention, attention_options=options, causal=causal, norm=norm,
            ff_mult=ff_mult, dropout=dropout, activation=activation, ff_chunks=ff_chunks, **shared)
        first = make()
        blocks = [first]
        for _ in range(depth - 1):
            if share == "all":
                blocks.append(first)
            else:
                blocks.append(make(attn=first.attn if share == "attention" else None,
                                   ff=first.ff if share == "ffn" else None))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()
        #: reversible training recomputes activations in backward (False: plain autograd, for tests)
        self.recompute = True

    def forward(self, x: Tensor, mask: Tensor | None = None, states: list | None = None, return_states: bool = False,
                global_mask: Tensor | None = None):
        if self.reversible:
            x, new_states = self._reversible(x, mask, states, return_states, global_mask)
        else:
            new_states = []
            for i, block in enumerate(self.blocks):
                x, s = block(x, mask, None if states is None else states[i], return_state=True,
                             global_mask=global_mask)  # (B, N, dim)
                new_states.append(s)
        x = self.final_norm(x)
        return (x, new_states) if return_states else x

    def _reversible(self, x: Tensor, mask, states, return_states: bool, global_mask):
        from .reversible import needs_recompute, reversible_blocks  # late: reversible imports this module

        if self.recompute and states is None and not return_states and needs_recompute(self.blocks, x):
            y1, y2 = reversible_blocks(list(self.blocks), x, mask, global_mask)
            return (y1 + y2) / 2, []
        x1 = x2 = x
        new_states = []
        for i, block in enumerate(self.blocks):
            f, s = block.attention_branch(x2, mask, None if states is None else states[i], global_mask)
            x1 = x1 + f  # Y1 = X1 + f(X2)
            x2 = x2 + block.ff_branch(x1)  # Y2 = X2 + g(Y1)
            new_states.append(s)
        return (x1 + x2) / 2, new_states


SHARE_MODES = ("none", "all", "attention", "ffn")


def check_share(share: Any) -> str:
    if share not in SHARE_MODES:
        raise ValueError(f"unknown weight sharing share={share!r}; allowed: {list(SHARE_MODES)}")
    return share


def check_reversible(reversible: Any, norm: str = "pre") -> bool:
    if not isinstance(reversible, bool):
        raise ValueError(f"reversible must be a bool, got {reversible!r}")
    if reversible and norm != "pre":
        raise ValueError(f"reversible=True needs norm='pre' (a reversible layer adds its sublayers to the stream, "
                         f"post-norm normalises the stream itself), got norm={norm!r}; allowed: norm='pre'")
    return reversible


def check_ff_chunks(ff_chunks: Any) -> int:
    if not isinstance(ff_chunks, int) or isinstance(ff_chunks, bool) or ff_chunks < 1:
        raise ValueError(f"ff_chunks must be an int >= 1 (1 = no chunking), got {ff_chunks!r}")
    return ff_chunks


def check_embedding_dim(embedding_dim: Any, dim: int) -> int | None:
    """None (no factorisation) or an int in [1, dim] (ALBERT's E <= H)."""
    if embedding_dim is None:
        return None
    if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or not 1 <= embedding_dim <= dim:
        raise ValueError(f"embedding_dim must be None or an int in [1, dim={dim}] (ALBERT's factorised embedding "
                         f"E <= H), got {embedding_dim!r}")
    return embedding_dim


def check_tokens(tokens: Tensor, vocab_size: int, what: str = "tokens") -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"{what} must be a 2-D LongTensor (B, N), got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be integer token ids (torch.long), got {tokens.dtype}")
    if tokens.shape[1] < 1:
        raise ValueError(f"{what} must have at least one position, got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{what} must lie in [0, {vocab_size}), got values in [{int(tokens.min())}, {int(tokens.max())}]")
