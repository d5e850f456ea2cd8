"""Mask conventions shared by every mechanism.

One convention everywhere (as `torch.nn.functional.scaled_dot_product_attention`): a bool mask is
True where attention is allowed / the token is real, False where it is masked / padding. A query with
no allowed key produces zeros, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_allowed(num_queries: int, num_keys: int, *, query_offset: int = 0, device=None) -> Tensor:
    """(Nq, Nk) bool: query i (absolute position i + query_offset) may see key j <= i + query_offset."""
    rows = torch.arange(num_queries, device=device)[:, None] + query_offset  # (Nq, 1)
    cols = torch.arange(num_keys, device=device)[None, :]  # (1, Nk)
    return cols <= rows


def combine_allowed(
    key_mask: Tensor | None,
    causal: bool,
    num_queries: int,
    num_keys: int,
    *,
    query_offset: int = 0,
    pattern: Tensor | None = None,
    device=None,
) -> Tensor | None:
    """The allowed-pairs mask (B or 1, 1 or H, Nq, Nk) from a key padding mask, causality and a fixed
    pattern, (Nq, Nk) shared by the heads or (H, Nq, Nk) per head.

    Only for dense computations (vanilla attention and the slow references). Returns None when nothing
    is masked.
    """
    allowed = None
    if pattern is not None:
        if pattern.dim() not in (2, 3):
            raise ValueError(f"a pattern must be (Nq, Nk) or (H, Nq, Nk), got shape {tuple(pattern.shape)}")
        pattern = pattern.to(device=device, dtype=torch.bool)
        allowed = pattern[None, None] if pattern.dim() == 2 else pattern[None]  # (1, 1 | H, Nq, Nk)
    if causal:
        c = causal_allowed(num_queries, num_keys, query_offset=query_offset, device=device)[None, None]
        allowed = c if allowed is None else allowed & c
    if key_mask is not None:
        km = key_mask[:, None, None, :]  # (B, 1, 1, Nk)
        allowed = km if allowed is None else allowed & km
    return allowed


def masked_softmax(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last axis restricted to `allowed`; rows with nothing allowed give zeros."""
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~row_has_key, 0.0)  # keep the softmax finite, zero the row after
    return torch.softmax(scores, dim=-1) * row_has_key


def zero_padded(x: Tensor, mask: Tensor | None, *, seq_dim: int) -> Tensor:
    """Zero the positions where `mask` (B, N) is False; `seq_dim` is x's sequence axis (x is (B, ...)).

    The axis is always given, never guessed from the sizes: (B, N, dim) inputs use seq_dim=1, per-head
    (B, H, N, d) tensors seq_dim=2 (a guess goes wrong when H or d equals N).
    """
    if mask is None:
        return x
    seq_dim = seq_dim % x.dim()
    if seq_dim == 0 or x.shape[0] != mask.shape[0] or x.shape[seq_dim] != mask.shape[1]:
        raise ValueError(f"zero_padded: mask {tuple(mask.shape)} does not match axis {seq_dim} of x {tuple(x.shape)}")
    shape = [1] * x.dim()
    shape[0], shape[seq_dim] = mask.shape
    return x * mask.reshape(shape).to(x.dtype)
