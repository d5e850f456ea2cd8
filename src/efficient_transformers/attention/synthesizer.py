"""Synthesizer (Tay et al. 2020, "Synthesizer: Rethinking Self-Attention in Transformer Models", ICML 2021;
arXiv 2005.00743).

The attention weights are synthesized instead of computed from query-key dot products:

    Y_h = softmax(S_h) G_h(X),   G(X) = X W_V (the value projection), per head h, with S one of

    dense              S_i = W_2 relu(W_1 x_i + b_1) + b_2          (each token predicts its row, d -> l)
    random             S = R                                        (l x l, trainable or fixed)
    factorized_dense   S_ij = A(x_i)[j mod a] * B(x_i)[j div a]     (two such MLPs, d -> a and d -> b, a b >= l)
    factorized_random  S = R_1 R_2^T                                (R_1, R_2 in R^{l x r})
    mixtures           S = sum_c alpha_c S_c with learned alpha, components joined by "+", e.g.
                       variant="random+vanilla" mixes R with Q K^T / sqrt(d) (the dot-product term)

l = `max_seq_len`: a sequence of N <= l tokens uses the first N rows and columns. Cost O(N^2 d) time
and O(N^2) memory (the N x N weights are what the model is), plus the N l d of the dense MLP.

Attention here is not a function of (q, k, v) alone (it needs x, or the absolute positions), so the
layer has no `attend` (`has_attend = False`): its `project` hook passes x to `_attend` beside the value
projection (and q, k when a dot-product term is mixed in).
Causal by masking: row i keeps keys j <= i (dense rows depend on x_i only; random rows on position i
only), so decoding carries a KV cache of the values (and of the keys when a dot-product term is
mixed in; otherwise the cache's keys have width 0): O(N) per new token.

Padding: padded keys are masked out of every row; a row with no key gives zeros. The mixing
weights alpha start at 1/C for C components (the paper's sum-to-one constraint holds at
initialisation; they are then free parameters). Random matrices start N(0, 1) (R_1 R_2^T: each entry
N(0, 1) in distribution scale), the MLPs with PyTorch's Linear initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core import AttentionLayer, KVCache, combine_allowed, masked_softmax
from ..core import options as opt
from ..registry import Card, register

COMPONENTS = ("dense", "random", "factorized_dense", "factorized_random", "vanilla")
SYNTHETIC = COMPONENTS[:-1]


def parse_variant(variant) -> tuple[str, ...]:
    """'random+vanilla' -> ('random', 'vanilla'); ValueError naming what is allowed."""
    allowed = f"one of {list(SYNTHETIC)} or several components of {list(COMPONENTS)} joined by '+'"
    if not isinstance(variant, str) or not variant:
        raise ValueError(f"synthesizer: variant must be a non-empty string, got {variant!r}; allowed: {allowed}")
    parts = tuple(variant.split("+"))
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown:
        raise ValueError(f"synthesizer: unknown variant component(s) {unknown} in {variant!r}; allowed: {allowed}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"synthesizer: variant {variant!r} repeats a component; allowed: {allowed}")
    if not any(p in SYNTHETIC for p in parts):
        raise ValueError(f"synthesizer: variant {variant!r} has no synthetic component; allowed: {allowed}")
    return parts


def _mlp(dim: int, out: int) -> nn.Sequential:
    """The paper's F: W_2 relu(W_1 x + b_1) + b_2."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


@register(
    Card(
        name="synthesizer",
        title="Synthesizer",
        paper="Tay et al., Synthesizer: Rethinking Self-Attention in Transformer Models, ICML 2021 (arXiv 2005.00743)",
        year=2020,
        complexity="O(N^2)",
        classes=("LR", "LP"),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        test_options={"max_seq_len": 160},
    )
)
class SynthesizerAttention(AttentionLayer):
    has_attend = False

    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool = False,
        *,
        variant: str = "dense",
        max_seq_len: int = 4096,
        trainable_random: bool = True,
        rank: int = 32,
    ) -> None:
        components = parse_variant(variant)
        # with a dot-product term q, k, v are projected; otherwise only the value projection G
        super().__init__(dim, heads, causal, max_seq_len=max_seq_len,
                         projections="qkv" if "vanilla" in components else "v")
        name = self.card.name
        self.components = components
        opt.boolean(name, "trainable_random", trainable_random)
        opt.positive_int(name, "rank", rank, what="of the factorized random matrix")
        self.variant, self.trainable_random, self.rank = variant, trainable_random, rank
        H, length = heads, max_seq_len
        if "dense" in self.components:
            self.dense = _mlp(dim, H * length)
        if "factorized_dense" in self.components:
            self.factor_a = math.ceil(math.sqrt(length))
            self.factor_b = math.ceil(length / self.factor_a)
            self.dense_a, self.dense_b = _mlp(dim, H * self.factor_a), _mlp(dim, H * self.factor_b)
        if "random" in self.components:
            self._random_tensor("random_matrix", torch.randn(H, length, length))  # (H, l, l)
        if "factorized_random" in self.components:
            scale = rank**-0.25
            self._random_tensor("random_left", torch.randn(H, length, rank) * scale)  # (H, l, r)
            self._random_tensor("random_right", torch.randn(H, length, rank) * scale)  # (H, l, r)
        if len(self.components) > 1:
            self.mix = nn.Parameter(torch.full((len(self.components),), 1.0 / len(self.components)))

    def _random_tensor(self, attr: str, value: Tensor) -> None:
        if self.trainable_random:
            setattr(self, attr, nn.Parameter(value))
        else:
            self.register_buffer(attr, value)  # fixed random: saved with the weights, never trained

    # ------------------------------------------------------------------ the layer
    def project(self, x: Tensor, mask: Tensor | None, **extra):
        """The default projections (q, k, v, or v alone), and x itself: the synthesized weights need it."""
        q, k, v, extra = super().project(x, mask, **extra)
        if k is None:
            k = v[..., :0]  # (B, H, N, 0): the cache keeps no keys
        return q, k, v, {**extra, "x": x}

    def _attend(self, q: Tensor | None, k: Tensor, v: Tensor, mask: Tensor | None, state: KVCache | None, *, x: Tensor):
        """softmax(S) V for the new tokens x (B, N, dim); causal layers continue from / return a KV cache."""
        n = x.shape[1]
        new_state = KVCache.extend(state, k, v, mask) if self.causal else None
        keys, values, key_mask = (k, v, mask) if new_state is None else (new_state.k, new_state.v, new_state.key_mask)
        offset = keys.shape[-2] - n  # absolute position of the first query
        logits = self.synthesized_logits(x, q, keys, offset)  # (B | 1, H, N, N_keys), float32 or float64
        allowed = combine_allowed(key_mask, self.causal, n, keys.shape[-2], query_offset=offset, device=x.device)
        weights = masked_softmax(logits, allowed)  # (B | 1, H, N, N_keys)
        out = (weights @ values.to(weights.dtype)).to(x.dtype)  # (B, H, N, d)
        return out, new_state

    def synthesized_logits(self, x: Tensor, q: Tensor | None, keys: Tensor, offset: int) -> Tensor:
        """S for queries at positions offset .. offset + N - 1 over keys 0 .. N_keys - 1, in float32
        (float64 for float64 inputs)."""
        B, n, _ = x.shape
        total, H = keys.shape[-2], self.heads
        rows = slice(offset, offset + n)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32

        def per_head(t: Tensor) -> Tensor:  # (B, N, H * w) -> (B, H, N, w)
            return t.view(B, n, H, -1).transpose(1, 2).to(compute)

        parts = []
        for component in self.components:
            if component == "dense":
                parts.append(per_head(self.dense(x))[..., :total])  # (B, H, N, N_keys)
            elif component == "factorized_dense":
                columns = torch.arange(total, device=x.device)
                a, b = per_head(self.dense_a(x)), per_head(self.dense_b(x))  # (B, H, N, a), (B, H, N, b)
                parts.append(a[..., columns % self.factor_a] * b[..., columns // self.factor_a])  # (B, H, N, N_keys)
            elif component == "random":
                parts.append(self.random_matrix[None, :, rows, :total].to(compute))  # (1, H, N, N_keys)
            elif component == "factorized_random":
                left, right = self.random_left[:, rows].to(compute), self.random_right[:, :total].to(compute)
                parts.append((left @ right.transpose(-1, -2))[None])  # (1, H, N, N_keys)
            else:  # vanilla: the dot-product term
                parts.append((q.to(compute) @ keys.to(compute).transpose(-1, -2)) / math.sqrt(self.head_dim))  # (B, H, N, N_keys)
        if len(parts) == 1:
            return parts[0]
        mix = self.mix.to(compute)
        return sum(mix[i] * part for i, part in enumerate(parts))

    def attend(self, q, k, v, mask=None, state=None):
        raise ValueError(
            f"{self.card.name}: attention is not a function of (q, k, v) (the weights are synthesized from x "
            "and positions); use the layer's forward(x)"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, max_seq_len={self.max_seq_len}"
