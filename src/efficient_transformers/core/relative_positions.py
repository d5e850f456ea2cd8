"""Transformer-XL's relative positional attention scores (Dai et al. 2019, arXiv 1901.02860, section 3.3).

For query i and key j at relative distance delta = i - j >= 0 the score is

    A_ij = (q_i + u)^T k_j  +  (q_i + v)^T r_{i-j},        r_delta = W_R R_delta  (per head)

with R_delta the sinusoid of the distance (no learned position table), u and v learned per-head
biases (the paper's "global content" and "global position" terms). The position term is computed
for every query against the distances of its own row with one (n, K) product followed by the
*shift trick*: with the keys laid out so that the last n of the K keys are the n queries' own
positions (memory first, then the segment), the product of the queries with the distances
K-1, K-2, ..., 0 has, in row i, the distance of key j at column j + n - 1 - i; shifting row i left by
n - 1 - i (pad one column, reshape, drop a row) aligns it. Nothing larger than the (n, K) score matrix
of the attended span is ever formed, and no position table beyond that span (K rows).

Used by `attention.transformer_xl` and `attention.compressive`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gemm


def sinusoid_of_distances(distances: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """distances (K,) -> (K, dim): [sin(delta w_0), ..., sin(delta w_{dim/2-1}), cos(delta w_0), ...],
    w_i = 10000^(-2i/dim) (the paper's sinusoid, sines then cosines)."""
    half = dim // 2
    inv_freq = torch.exp(torch.arange(half, device=distances.device, dtype=torch.float64) * (-2 * math.log(10000.0) / dim))
    angles = distances.to(torch.float64)[:, None] * inv_freq[None, :]  # (K, dim/2)
    table = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (K, 2 (dim/2))
    if table.shape[-1] < dim:  # odd dim: one zero column
        table = F.pad(table, (0, dim - table.shape[-1]))
    return table.to(dtype)


def relative_shift(x: Tensor) -> Tensor:
    """x (..., n, K) with column c of row i for distance K-1-c -> (..., n, K) whose (i, j) entry is
    x[i, j + n - 1 - i], the score of query i (the (K-n+i)-th key position) for key j at distance
    K - n + i - j. Entries with j > K - n + i (future keys) hold unrelated numbers: mask them."""
    *lead, n, K = x.shape
    padded = F.pad(x, (1, 0))  # (..., n, K + 1): one zero column on the left
    shifted = padded.reshape(*lead, K + 1, n)[..., 1:, :]  # drop the first row of the reinterpreted view
    return shifted.reshape(*lead, n, K)


def relative_scores(q: Tensor, k: Tensor, r: Tensor, content_bias: Tensor, position_bias: Tensor) -> Tensor:
    """The scores A (B, H, n, K) / sqrt(d), before masking.

    q: (B, H, n, d), the queries at the last n of the K key positions; k: (B, H, K, d);
    r: (H, K, d), the projected sinusoids of the distances K-1, K-2, ..., 0 (row c: distance K-1-c);
    content_bias u and position_bias v: (H, d). Computed in float32 for reduced-precision inputs."""
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, r = q.to(dtype), k.to(dtype), r.to(dtype)
    u, v = content_bias.to(dtype)[None, :, None, :], position_bias.to(dtype)[None, :, None, :]  # (1, H, 1, d)
    content = gemm.product_with_grad(q + u, k.transpose(-1, -2))  # (B, H, n, K): terms (a) + (c)
    position = relative_shift(gemm.product_with_grad(q + v, r.transpose(-1, -2).unsqueeze(0)))  # (B, H, n, K): terms (b) + (d)
    return (content + position) / math.sqrt(q.shape[-1])


def span_allowed(n: int, K: int, key_mask: Tensor | None, max_distance: int | None, device) -> Tensor:
    """(B | 1, 1, n, K) bool: query i (key position K - n + i) may attend key j when 0 <= i' - j
    (causal) and, when `max_distance` is given, i' - j <= max_distance; and key j is real."""
    distance = (torch.arange(n, device=device)[:, None] + (K - n)) - torch.arange(K, device=device)[None, :]  # (n, K)
    allowed = distance >= 0
    if max_distance is not None:
        allowed = allowed & (distance <= max_distance)
    allowed = allowed[None, None]  # (1, 1, n, K)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].to(device)
    return allowed
