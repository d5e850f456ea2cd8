"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"; arXiv 2006.04768).

Keys and values are projected along the length axis, from N to k rows, before dense attention:

    head_i = softmax(Q W_i^Q (E_i K W_i^K)^T / sqrt(d)) F_i V W_i^V,    E_i, F_i in R^{k x N}

Cost O(N k d) time and O(N k) memory (O(N d) here: the k-key attention runs through PyTorch's fused
SDPA kernel, or, where the library's float32 products run on oneDNN, through the block-sparse
engine with every key tile in every row: `core.block_sparse.dense_over_compressed_keys`, measured
0.82x the step time at N = 16K and 0.94x at 4K on the AMD EPYC, train, one thread, paired). The
projections are parameters of shape (k, max_seq_len); a sequence of N <= `max_seq_len` tokens uses
their first N columns. Not causal: E K mixes all positions, so every
output depends on future tokens (`causal=True` is refused).

Order of evaluation: when E and F are shared by the heads (sharing "headwise" or "kv"), the layer
computes E (X W^K + b^K) as (E X) W^K + (E 1) b^K, the same numbers in the cheaper order: the N x dim
keys and values are never formed, which saves 2 N dim^2 multiply-adds for each of them (at dim =
k = 256, a quarter of the layer's matrix products, forward and backward). Per-head projections
(sharing "none") keep the equation's order, which is then the cheaper one. `attend(q, k, v)` takes
keys and values already projected, as every mechanism's core does.

Padding: padded keys and values are zeroed before the projection, so they add nothing to E K and
F V, and outputs at real positions do not depend on padded content. A projected slot that only
padded positions feed (every slot of an all-padded item; with E = F = I, exactly the padded
positions) is excluded from the softmax, so a query whose keys are all padded gets zeros and the
identity projection is exactly dense attention under the key mask.

Options:
- `k` (default 256, the paper's setting for n = 512 ... 4096, where k stays fixed as n grows);
- `sharing`, the paper's parameter-sharing schemes:
    "none"      one E_i, F_i per head;
    "headwise"  one E and one F per layer, shared by the heads (default: the paper reports no loss
                from sharing and it keeps the parameters at 2 k max_seq_len per layer);
    "kv"        one E per layer for keys and values (E = F) and all heads (as in LRA's Linformer);
  layerwise sharing (one E for all layers) spans layers, which `build_attention` cannot express;
  build every layer with sharing="kv" and tie them with `share_layerwise(layers)`, which makes all
  of them use the first layer's projection (one parameter, saved once by safetensors);
- `max_seq_len` (default 4096; the models pass theirs): the longest sequence, the projections' width.

Initialisation: uniform with bound sqrt(3 / (max_seq_len + k)) (Xavier with gain 1/sqrt(2)), so E K
has the scale of one key whatever max_seq_len is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..core import AttentionLayer, split_heads, zero_padded
from ..core import gemm
from ..core import options as opt
from ..core.block_sparse import dense_over_compressed_keys
from ..registry import Card, register

SHARING = ("none", "headwise", "kv")


@register(
    Card(
        name="linformer",
        title="Linformer",
        paper="Wang et al., Linformer: Self-Attention with Linear Complexity, 2020 (arXiv 2006.04768)",
        year=2020,
        complexity="O(N)",
        classes=("LR",),
        causal=False,
        bidirectional=True,
        decoding="none",
        test_options={"k": 8, "max_seq_len": 160},
        notes="the length projection E K mixes every position, so each output would depend on future tokens",
    )
)
class LinformerAttention(AttentionLayer):

    def __init__(
        self, dim: int, heads: int, causal: bool = False, *, k: int = 256, sharing: str = "headwise", max_seq_len: int = 4096
    ) -> None:
        name = self.card.name
        if causal:
            raise ValueError(f"{name}: causal=True is not supported ({self.card.notes}); allowed: causal=False")
        super().__init__(dim, heads, causal, max_seq_len=max_seq_len)
        opt.positive_int(name, "k", k, what="the projected length")
        opt.choice(name, "sharing", sharing, SHARING, hint="layerwise: build with sharing='kv' and call share_layerwise(layers)")
        self.k, self.sharing = k, sharing
        copies = heads if sharing == "none" else 1
        self.proj_k = nn.Parameter(self._init_projection(copies, k, max_seq_len))  # (1 | H, k, max_seq_len)
        self.proj_v = None if sharing == "kv" else nn.Parameter(self._init_projection(copies, k, max_seq_len))

    @staticmethod
    def _init_projection(copies: int, k: int, max_seq_len: int) -> Tensor:
        bound = math.sqrt(3.0 / (max_seq_len + k))
        return torch.empty(copies, k, max_seq_len).uniform_(-bound, bound)

    def project(self, x: Tensor, mask: Tensor | None, **extra):
        """x (B, N, dim) -> q (B, H, N, d) and, with E shared by the heads, the compressed keys and
        values (B, H, k, d) directly: E K = E (X W^K + b^K) = (E X) W^K + (E 1) b^K (see the module
        doc); `_attend` is then told they are compressed. Per-head E: the default projection."""
        if self.proj_k.shape[0] > 1:  # per-head projections: E_i (X W_i^K) is the cheaper order
            return super().project(x, mask, **extra)
        B, n, _ = x.shape
        w_q, w_k, w_v = self.to_qkv.weight.chunk(3)  # (dim, dim) each
        b_q, b_k, b_v = self.to_qkv.bias.chunk(3)  # (dim,) each
        q = gemm.linear(x, w_q, b_q).view(B, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        x_real = zero_padded(x, mask, seq_dim=1)[:, None]  # (B, 1, N, dim): padding adds nothing below
        real = x.new_ones(B, n) if mask is None else mask.to(x.dtype)  # (B, N)
        proj_k, proj_v = self._projections(n, x.dtype)  # (1, k, N) each
        compressed_k = _project(proj_k, x_real).squeeze(1)  # (B, k, dim): E X
        real_k = real @ proj_k.squeeze(0).T  # (B, k): E 1, over the real tokens
        if self.proj_v is None:  # E = F: one compression for keys and values
            compressed_v, real_v = compressed_k, real_k
        else:
            compressed_v, real_v = _project(proj_v, x_real).squeeze(1), real @ proj_v.squeeze(0).T
        k_short = split_heads(gemm.linear(compressed_k, w_k) + real_k[..., None] * b_k, self.heads)  # (B, H, k, d)
        v_short = split_heads(gemm.linear(compressed_v, w_v) + real_v[..., None] * b_v, self.heads)
        return q, k_short, v_short, {**extra, "compressed": True}

    def _projections(self, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        proj_k = _first_columns(self.proj_k, n).to(dtype)  # (1 | H, k, N)
        proj_v = proj_k if self.proj_v is None else _first_columns(self.proj_v, n).to(dtype)
        return proj_k, proj_v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: None, *, compressed: bool = False):
        """q (B, H, N, d); k, v (B, H, N, d), or (B, H, k, d) already compressed by `project`."""
        proj_k, proj_v = self._projections(q.shape[-2], q.dtype)  # (1 | H, k, N) each
        if compressed:
            k_short, v_short = k, v
        else:
            k, v = zero_padded(k, mask, seq_dim=2), zero_padded(v, mask, seq_dim=2)  # padding adds nothing below
            k_short, v_short = _project(proj_k, k), _project(proj_v, v)  # (B, H, k, d)
        return self._attend_compressed(q, k_short, v_short, mask, proj_k, proj_v), None

    def _attend_compressed(self, q: Tensor, k_short: Tensor, v_short: Tensor, mask: Tensor | None,
                           proj_k: Tensor, proj_v: Tensor) -> Tensor:
        """Dense attention of q (B, H, N, d) over the k projected slots (B, H, k, d) -> (B, H, N, d)."""
        if mask is None:  # SDPA, or the block-sparse engine where the products run on oneDNN
            return dense_over_compressed_keys(q, k_short, v_short)
        # a projected slot built from padding alone carries nothing: exclude it (with E = F = I this is
        # exactly the key mask; with dense projections only all-padded items lose their slots)
        real = mask.T.to(proj_k.dtype)  # (N, B)
        filled = ((proj_k.abs() @ real) > 0) | ((proj_v.abs() @ real) > 0)  # (1 | H, k, B)
        slot_mask = filled.permute(2, 0, 1)  # (B, 1 | H, k)
        return dense_over_compressed_keys(q, k_short, v_short, slot_mask[:, 0] if slot_mask.shape[1] == 1 else slot_mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, sharing={self.sharing}, max_seq_len={self.max_seq_len}"


def _first_columns(projection: Tensor, n: int) -> Tensor:
    """The projection's first n columns; the whole parameter when n is its width, so that the
    backward pass does not zero-fill and copy a (k, max_seq_len) gradient for a no-op slice."""
    return projection if n == projection.shape[-1] else projection[..., :n]


def _project(projection: Tensor, x: Tensor) -> Tensor:
    """(1 | H, k, N) @ (B, H, N, d) -> (B, H, k, d). A projection shared by the heads is one matrix
    product over all (batch, head) columns, without copying the projection per head."""
    if projection.shape[0] > 1:
        return gemm.product_with_grad(projection, x)  # (B, H, k, d)
    B, H, n, d = x.shape
    columns = x.permute(2, 0, 1, 3).reshape(n, B * H * d)  # (N, B*H*d), a view when B = 1
    shared = projection.squeeze(0)  # (k, N); a view whose gradient is a view too (indexing [0] would zero-fill)
    return gemm.product_with_grad(shared, columns).view(-1, B, H, d).permute(1, 2, 0, 3)  # (B, H, k, d)


def share_layerwise(layers: Iterable[LinformerAttention]) -> None:
    """Layerwise sharing: every layer uses the first layer's projection E (for keys and values).

    All layers must be Linformer layers built with sharing="kv" and the same k and max_seq_len.
    E.g. `share_layerwise(block.attn for block in model.stack.blocks)`.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("linformer: share_layerwise needs at least one layer")
    first = layers[0]
    for layer in layers:
        if not isinstance(layer, LinformerAttention):
            raise ValueError(f"linformer: share_layerwise got a {type(layer).__name__}; allowed: Linformer layers")
        if layer.sharing != "kv" or layer.k != first.k or layer.max_seq_len != first.max_seq_len:
            raise ValueError(
                "linformer: share_layerwise needs layers built with sharing='kv' and equal k and max_seq_len, got "
                f"sharing={layer.sharing!r}, k={layer.k}, max_seq_len={layer.max_seq_len} "
                f"(first layer: k={first.k}, max_seq_len={first.max_seq_len})"
            )
    for layer in layers[1:]:
        layer.proj_k = first.proj_k
