"""Vanilla Transformer attention (Vaswani et al. 2017, "Attention Is All You Need", NeurIPS; arXiv 1706.03762).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

Exact dense attention, the baseline every efficient mechanism is measured against. Cost O(N^2 d)
time; memory O(N^2) for the naive form, O(N d) with PyTorch's fused kernel (`backend="sdpa"`, the
default), which this layer uses. Decoding keeps a KV cache: each new token costs O(N d).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import AttentionLayer, KVCache, causal_allowed, dense_attention
from ..core import options as opt
from ..core.dense import BACKENDS
from ..registry import Card, register


@register(
    Card(
        name="vanilla",
        title="Transformer",
        paper="Vaswani et al., Attention Is All You Need, NeurIPS 2017 (arXiv 1706.03762)",
        year=2017,
        complexity="O(N^2)",
        classes=("Dense",),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=True,
    )
)
class VanillaAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, backend: str = "auto") -> None:
        super().__init__(dim, heads, causal)
        self.backend = opt.choice(self.card.name, "backend", backend, BACKENDS)

    def dense_mask(self, n: int) -> Tensor:
        """(N, N) bool: every pair (the causal triangle when causal)."""
        return causal_allowed(n, n) if self.causal else torch.ones(n, n, dtype=torch.bool)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: KVCache | None):
        if not self.causal:
            return dense_attention(q, k, v, key_mask=mask, backend=self.backend), None
        cache = KVCache.extend(state, k, v, mask)
        offset = cache.length - q.shape[-2]
        out = dense_attention(
            q, cache.k, cache.v, key_mask=cache.key_mask, causal=True, query_offset=offset, backend=self.backend
        )  # (B, H, n_new, d)
        return out, cache
