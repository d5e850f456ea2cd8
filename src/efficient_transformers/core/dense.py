"""Exact dense attention, the fast way: PyTorch's fused `scaled_dot_product_attention`.

Two backends that must agree (tested): "sdpa" (the fused kernel; O(N d) memory for the backward
pass when no explicit mask is needed) and "math" (the portable plain-PyTorch path: explicit scores,
masked softmax, float32 softmax for reduced precision inputs). "auto" picks "sdpa".

Masks are only materialised when they are needed (padding, or causal decoding with a query offset);
plain causal attention uses the kernel's own `is_causal` flag.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import combine_allowed, masked_softmax

BACKENDS = ("auto", "sdpa", "math")


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    query_offset: int = 0,
    backend: str = "auto",
    allowed: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with optional key padding, causality and an explicit pattern.

    q: (B, H, Nq, d); k, v: (B, H, Nk, d). Query i sits at absolute position i + query_offset (for
    decoding with a cache, query_offset = Nk - Nq). `allowed` (B|1, H|1, Nq, Nk) bool restricts the
    pairs further (pattern mechanisms decoding over a small cache; never an N x N mask on a fast
    path). Rows with no allowed key give zeros.
    """
    if backend not in BACKENDS:
        raise ValueError(f"dense attention: unknown backend {backend!r}; allowed: {list(BACKENDS)}")
    nq, nk = q.shape[-2], k.shape[-2]
    if allowed is not None:
        base = combine_allowed(key_mask, causal, nq, nk, query_offset=query_offset, device=q.device)
        allowed = allowed.to(q.device) if base is None else base & allowed.to(q.device)
        if backend == "math":
            return _math(q, k, v, allowed)
        row_has_key = allowed.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~row_has_key)
        return out * row_has_key.to(out.dtype)
    if causal and key_mask is None and query_offset == 0 and nq == nk:
        if backend == "math":
            return _math(q, k, v, combine_allowed(None, True, nq, nk, device=q.device))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if causal and nq == 1 and query_offset == nk - 1:
        causal = False  # one new query at the end of the cache sees every cached key
    allowed = combine_allowed(key_mask, causal, nq, nk, query_offset=query_offset, device=q.device)
    if backend == "math":
        return _math(q, k, v, allowed)
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v)
    row_has_key = allowed.any(dim=-1, keepdim=True)  # (B|1, 1, Nq, 1)
    safe = allowed | ~row_has_key  # an empty row attends everything, then is zeroed: never NaN
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)  # (B, H, Nq, d)
    return out * row_has_key.to(out.dtype)


def _math(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B,H,Nq,Nk)
    weights = masked_softmax(scores, allowed)
    return (weights @ v.to(compute_dtype)).to(q.dtype)  # (B, H, Nq, d)
