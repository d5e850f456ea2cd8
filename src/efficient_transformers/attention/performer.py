"""Performer (Choromanski et al. 2020, "Rethinking Attention with Performers", ICLR 2021; arXiv 2009.14794).

FAVOR+ approximates softmax attention with positive random features:

    exp(q . k / sqrt(d)) = E_omega[phi(q) . phi(k)],
    phi(x) = exp(-|x'|^2 / 2) / sqrt(m) [exp(omega_1 . x'), ..., exp(omega_m . x')],  x' = x d^(-1/4)

    Att(Q, K, V) ~ D^-1 phi(Q) (phi(K)^T V),    D = diag(phi(Q) (phi(K)^T 1))

with omega_i ~ N(0, I_d), orthogonal in blocks of d (orthogonal random features). Cost O(N m d) time,
O(N m + m d) memory; causal attention uses the same prefix sums in the chunked form of
`core.kernel_attention`, and decoding carries only the (m, d + 1) state: O(m d) per token.

Options (the paper's):
- `features`: "positive" (FAVOR+), "hyperbolic" (phi++ = [exp(omega x'), exp(-omega x')], 2m features
  for m draws, lower variance), or "relu" (generalized attention with f = ReLU: phi = relu(omega x'),
  a different kernel, not an estimate of softmax);
- `nb_features` m (random directions): default 256, the value of the paper's experiments and of the
  LRA configuration, close to the theory's m = Theta(d log d) (= 266 for d = 64). Time grows
  linearly with m (every product is N x m x d); a smaller m, e.g. one orthogonal block m = d, is
  several times cheaper at the price of a larger approximation error (~ 1 / sqrt(m));
- `orthogonal`: orthogonal random features (default, lower variance) or i.i.d. Gaussian;
- `redraw_interval`: None (default) keeps the features fixed; an int r redraws them every r forward
  calls in training mode (the paper found periodic redrawing necessary on long runs). The features,
  their seed and the draw count are buffers, so a saved layer reloads with the same features and the
  same module gives the same output in train and eval while redrawing is off.
- `chunk_size`: tokens per chunk of the causal scan, causal layers only (None = 64, in the 64-128
  range where the intra-chunk products N C m stay below the feature products N d m); a
  bidirectional layer refuses it rather than ignore it.
- `saved_features`: which N x m feature tensors the native kernels keep for the backward pass
  instead of recomputing them (positive features only): None (default) = "keys" for "positive"
  (the keys' features, N m numbers per head: a 16K train step 3-8 % faster), "none" (recompute
  both: the least memory), "all" (queries and keys: 7-12 % faster, but over 2x SDPA's memory at
  16K); "hyperbolic" and "relu" run the portable path, which always recomputes, and refuse anything
  but None and "none". Where the native kernels do not run (not a CPU, `EFT_NATIVE=0`, no compiler)
  positive features take the portable path too and recompute whatever this says: a fallback with
  the same results and less memory, not an error. Measured figures: README, "Performer's saved
  features".

Numerics: features and normalisers run in float32 (float64 for float64 inputs) with exact, causal
stabilisers (see `core.kernel_attention`): no overflow for any input magnitude, no NaN in bf16/fp16.
As in the reference implementation, every feature gets a small epsilon (1e-6 of the row's largest
FAVOR+ feature; 1e-3 for ReLU), which keeps normalisers away from 0 and gradients finite.
Memory: the backward pass recomputes the features one segment at a time (activation checkpointing),
except those `saved_features` keeps: with "none", m = 256 features cost no more memory than the N x d
inputs; the default "keys" adds the keys' N x m features (measured peak at 16K tokens, dim 256,
4 heads: 1.48x SDPA's bidirectional, 1.70-1.72x causal; "none": 1.05x and 1.27-1.29x).

Speed: FAVOR+ ("positive") on CPU runs native kernels, compiled on first use
(`efficient_transformers.native`; about 10 s once, then cached): the same computation with each row's
elementwise work fused, about 30 % faster at 16K tokens (bidirectional and causal) than the portable
Python form, which "hyperbolic" and "relu" run. The causal kernel also keeps the within-chunk scores
for the backward pass (N C numbers per head).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import AttentionLayer
from ..core import options as opt
from ..core.feature_maps import PositiveRandomFeatures, ReluRandomFeatures
from ..core.kernel_attention import SAVED_FEATURES, KernelState, kernel_attention
from ..registry import Card, register
from .linear_transformer import DEFAULT_CHUNK_SIZE, check_chunk_size

FEATURES = ("positive", "hyperbolic", "relu")


@register(
    Card(
        name="performer",
        title="Performer",
        paper="Choromanski et al., Rethinking Attention with Performers, ICLR 2021 (arXiv 2009.14794)",
        year=2020,
        complexity="O(N)",
        classes=("KR",),
        causal=True,
        bidirectional=True,
        decoding="recurrent",
        updates_buffers_in_training=True,  # with redraw_interval set, training redraws the features
        test_options={"nb_features": 16},
        causal_test_options={"chunk_size": 4},
    )
)
class PerformerAttention(AttentionLayer):

    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool = False,
        *,
        nb_features: int = 256,
        features: str = "positive",
        orthogonal: bool = True,
        redraw_interval: int | None = None,
        chunk_size: int | None = None,
        saved_features: str | None = None,
    ) -> None:
        super().__init__(dim, heads, causal)
        name = self.card.name
        opt.positive_int(name, "nb_features", nb_features)
        opt.choice(name, "features", features, FEATURES)
        opt.boolean(name, "orthogonal", orthogonal)
        opt.optional_positive_int(name, "redraw_interval", redraw_interval, none_means="no redraw")
        self.chunk_size = check_chunk_size(name, chunk_size, causal)
        self.features, self.redraw_interval = features, redraw_interval
        opt.choice(name, "saved_features", saved_features, (None, *SAVED_FEATURES))
        if features != "positive" and saved_features not in (None, "none"):
            raise ValueError(f"{name}: saved_features={saved_features!r} needs features='positive' (the native "
                             f"kernels); {features!r} features run the portable path, which recomputes them: "
                             "allowed: None or 'none'")
        self.saved_features = saved_features or ("keys" if features == "positive" else "none")
        if features == "relu":
            self.feature_map = ReluRandomFeatures(self.head_dim, nb_features, orthogonal=orthogonal)
        else:
            self.feature_map = PositiveRandomFeatures(
                self.head_dim, nb_features, orthogonal=orthogonal, hyperbolic=features == "hyperbolic"
            )
        self.register_buffer("calls_since_redraw", torch.tensor(0, dtype=torch.int64))
        self.segment_size = 1024  # tokens per recomputed segment in the backward pass

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: KernelState | None):
        if self.redraw_interval is not None and self.training and state is None:
            if int(self.calls_since_redraw) >= self.redraw_interval:
                self.feature_map.redraw()
                self.calls_since_redraw.zero_()
            self.calls_since_redraw += 1
        return kernel_attention(
            q, k, v, self.feature_map, key_mask=mask, causal=self.causal, state=state,
            chunk_size=self.chunk_size or DEFAULT_CHUNK_SIZE, segment_size=self.segment_size,
            saved_features=self.saved_features,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, features={self.features}, nb_features={self.feature_map.nb_features}, "
            f"orthogonal={self.feature_map.orthogonal}, redraw_interval={self.redraw_interval}, "
            f"saved_features={self.saved_features}"
        )
