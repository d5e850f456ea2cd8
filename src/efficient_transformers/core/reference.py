"""The slow, obviously correct reference: dense softmax attention with an explicit allowed-pairs mask.

Everything in float64 by default, the N x N score matrix built explicitly. Tests compare every
mechanism against this (or against a mechanism-specific naive form built on it). Never used on a
fast path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks import combine_allowed, masked_softmax


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = False,
    query_offset: int = 0,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """softmax(q k^T * scale) v restricted to `pattern` ((Nq, Nk) or per head (H, Nq, Nk)), `key_mask` (B, Nk) and causality.

    q: (B, H, Nq, d), k: (B, H, Nk, d), v: (B, H, Nk, dv). Rows with no allowed key give zeros.
    Returns (B, H, Nq, dv) in `dtype`.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale  # (B, H, Nq, Nk)
    allowed = combine_allowed(
        key_mask, causal, q.shape[-2], k.shape[-2], query_offset=query_offset, pattern=pattern, device=q.device
    )
    weights = masked_softmax(scores, allowed)  # (B, H, Nq, Nk)
    return torch.einsum("bhij,bhjd->bhid", weights, v)  # (B, H, Nq, dv)
