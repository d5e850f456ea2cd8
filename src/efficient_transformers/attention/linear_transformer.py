"""Linear Transformer (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", ICML; arXiv 2006.16236).

    V'_i = phi(Q_i)^T sum_j phi(K_j) V_j^T / phi(Q_i)^T sum_j phi(K_j),    phi(x) = elu(x) + 1

The similarity exp(q . k) of softmax attention is replaced by the kernel phi(q) . phi(k); computing
phi(K)^T V first (a d x d matrix) makes the cost O(N d^2) in time and O(N d) in memory.

Causal: the sums run over j <= i. Training uses the chunked form of `core.kernel_attention`
(quadratic only inside chunks of `chunk_size` tokens, the carried (d, d + 1) state between them);
decoding is the paper's RNN: the state S = sum phi(k_j) [v_j, 1]^T is all that is carried, so each
new token costs O(d^2) time and memory whatever the prefix length (card decoding="recurrent").

Option `chunk_size` (causal layers only; None = 64): inside the 64-128 range where the intra-chunk
products (N C d) stay below the inter-chunk ones (N d^2) for d = 64 heads and the per-chunk states
((N / C) d^2 numbers) stay small. A bidirectional layer has no chunks and refuses a chunk size
instead of ignoring it. phi(Q) and phi(K) are as large as Q and K, so they are computed once and
kept for the backward pass (which needs only them: d phi / dx = min(phi, 1)); training keeps
O(N d) memory. phi is exactly the paper's: no epsilon in features or normaliser (a query with no
key to attend gets zeros).
"""

from __future__ import annotations

from torch import Tensor

from ..core import AttentionLayer
from ..core import options as opt
from ..core.feature_maps import EluPlusOne
from ..core.kernel_attention import KernelState, kernel_attention
from ..registry import Card, register


DEFAULT_CHUNK_SIZE = 64


def check_chunk_size(name: str, chunk_size, causal: bool) -> int | None:
    """The causal scan's chunk length: None -> 64 when causal. A bidirectional layer has no chunks, so
    it refuses a chunk size rather than ignore it."""
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE if causal else None
    opt.optional_positive_int(name, "chunk_size", chunk_size, none_means=f"{DEFAULT_CHUNK_SIZE} when causal")
    if not causal:
        raise ValueError(
            f"{name}: chunk_size={chunk_size} was given to a bidirectional layer, which has no chunks "
            "(it shapes the causal scan only); allowed: chunk_size=None when causal=False"
        )
    return chunk_size


@register(
    Card(
        name="linear_transformer",
        title="Linear Transformer",
        paper="Katharopoulos et al., Transformers are RNNs: Fast Autoregressive Transformers with Linear "
        "Attention, ICML 2020 (arXiv 2006.16236)",
        year=2020,
        complexity="O(N)",
        classes=("KR",),
        causal=True,
        bidirectional=True,
        decoding="recurrent",
        causal_test_options={"chunk_size": 4},
    )
)
class LinearTransformerAttention(AttentionLayer):

    def __init__(self, dim: int, heads: int, causal: bool = False, *, chunk_size: int | None = None) -> None:
        super().__init__(dim, heads, causal)
        self.chunk_size = check_chunk_size(self.card.name, chunk_size, causal)
        self.feature_map = EluPlusOne(self.head_dim)
        self.segment_size = 1024  # tokens per scan segment (a multiple of chunk_size is used)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: KernelState | None):
        return kernel_attention(
            q, k, v, self.feature_map, key_mask=mask, causal=self.causal, state=state,
            chunk_size=self.chunk_size or DEFAULT_CHUNK_SIZE, segment_size=self.segment_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
