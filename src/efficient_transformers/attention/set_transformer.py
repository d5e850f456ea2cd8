"""Set Transformer (Lee et al. 2019, "Set Transformer: A Framework for Attention-based Permutation-Invariant
Neural Networks", ICML; arXiv 1810.00825): the attention of the Induced Set Attention Block (ISAB).

m learned inducing points I (m x dim) first summarise the sequence, then every token reads the summary:

    H   = Att(I, X) = concat_h softmax(I W^Q_1h (X W^K_1h)^T / sqrt(d)) X W^V_1h  W^O_1     (m x dim)
    out = Att(X, H) = concat_h softmax(X W^Q_2h (H W^K_2h)^T / sqrt(d)) H W^V_2h  W^O_2     (N x dim)

This is the attention of ISAB_m(X) = MAB(X, MAB(I, X)) with the two MABs' multi-head attentions and
their projections; the MABs' residuals, layer norms and row-wise feed-forwards are left out, because
inside `TransformerBlock` the block's own norms and feed-forward play that part. The paper's full
building blocks (MAB, SAB, ISAB, PMA) and the `SetTransformer` model are in
`efficient_transformers.models.set_transformer`.

Cost O(N m d) time and O(N m) memory (the survey's O(kN), with k = m here): two dense attentions of
size m x N and N x m, each through the project's `dense_attention` (PyTorch's fused SDPA). No N x N
tensor is formed anywhere, masks included (the key mask is (B, 1, 1, N)).

Attention is not a function of (q, k, v) alone: the queries of the first step are the learned
inducing points and the keys and values of the second step are the summary H, so the layer has no
`attend` (`has_attend = False`; `attend` raises a ValueError saying so). The template's hooks are
used as follows: the base class is built with `projections="none"` and `project` applies the layer's
own fused projection of x, one (3 dim, dim) product giving X's keys and values for the first step
and X's queries for the second, as (q, k, v) = (Q_2, K_1, V_1); `_attend` runs the inducing-point
side (I W^Q_1, W^O_1, H W^K_2, H W^V_2) and both attentions; `output` is the template's head merge
and W^O_2.

Not causal: every inducing point attends the whole set, so each output depends on every token
(`causal=True` is refused). Permutation-equivariant: permuting the tokens permutes the outputs.

Padding: padded tokens are masked out of Att(I, X) (the key mask), so they never feed the summary
and real outputs do not depend on padded content; the second step attends the m summary rows, which
are all real. An item with no real token gets H = b^O_1 (an empty softmax row gives zeros): finite.

Options:
- `num_inducing` (default 32): m, the number of inducing points. The paper uses m = 16 or 32 in its
  experiments (SURVEY.md: "typically 16-32"); cost grows linearly with it.

Initialisation: I ~ Xavier-uniform on (m, dim), as the authors' code initialises its inducing
points; the projections are PyTorch Linear layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import AttentionLayer, dense_attention, merge_heads, project_heads, split_heads
from ..core import options as opt
from ..registry import Card, register


def linear_heads(linear: nn.Module, x: Tensor, heads: int) -> tuple[Tensor, ...]:
    """x (B, N, dim) through a fused (S dim, dim) projection -> S per-head tensors (B, H, N, d).
    A plain Linear goes through the fused head projection; a wrapped one (et.quantize's int8 Linear,
    LoRA) is called, then split."""
    if isinstance(linear, nn.Linear):
        return project_heads(x, linear.weight, linear.bias, heads)
    y = linear(x)  # (B, N, S dim)
    slots = y.shape[-1] // x.shape[-1]
    return split_heads(y, slots * heads).chunk(slots, dim=1)  # S x (B, H, N, d)


@register(
    Card(
        name="set_transformer",
        title="Set Transformer",
        paper="Lee et al., Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks, "
              "ICML 2019 (arXiv 1810.00825)",
        year=2019,
        complexity="O(kN)",
        classes=("M",),
        causal=False,
        bidirectional=True,
        decoding="none",
        test_options={"num_inducing": 4},
        notes="every inducing point attends the whole set, so each output depends on every token, future ones included",
    )
)
class SetTransformerAttention(AttentionLayer):
    has_attend = False

    def __init__(self, dim: int, heads: int, causal: bool = False, *, num_inducing: int = 32) -> None:
        name = self.card.name
        if causal:
            raise ValueError(f"{name}: causal=True is not supported ({self.card.notes}); allowed: causal=False")
        super().__init__(dim, heads, causal, projections="none")
        self.num_inducing = opt.positive_int(name, "num_inducing", num_inducing, what="m, the inducing points")
        self.inducing = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_inducing, dim)))  # I: (m, dim)
        self.to_x = nn.Linear(dim, 3 * dim)  # x -> [Q_2 | K_1 | V_1]
        self.to_inducing_q = nn.Linear(dim, dim)  # I -> Q_1
        self.to_summary = nn.Linear(dim, dim)  # W^O_1: heads of Att(I, X) -> H
        self.to_summary_kv = nn.Linear(dim, 2 * dim)  # H -> [K_2 | V_2]

    # ------------------------------------------------------------------ the layer
    def project(self, x: Tensor, mask: Tensor | None, **extra):
        """x (B, N, dim) -> (Q_2, K_1, V_1), each (B, H, N, d): X's queries for Att(X, H), X's keys and
        values for Att(I, X), from one fused product."""
        q2, k1, v1 = linear_heads(self.to_x, x, self.heads)  # 3 x (B, H, N, d)
        return q2, k1, v1, extra

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: None):
        """q = Q_2, k = K_1, v = V_1 (B, H, N, d) -> Att(X, Att(I, X)) per head (B, H, N, d)."""
        summary = self._summarise(k, v, mask)  # H: (B, m, dim)
        k2, v2 = linear_heads(self.to_summary_kv, summary, self.heads)  # 2 x (B, H, m, d)
        return dense_attention(q, k2, v2), None  # (B, H, N, d): all m summary rows are real

    def _summarise(self, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """H = Att(I, X) from X's keys and values (B, H, N, d) -> (B, m, dim); padded keys masked out."""
        inducing = self.inducing.to(k.dtype)[None]  # (1, m, dim)
        (q1,) = linear_heads(self.to_inducing_q, inducing, self.heads)  # (1, H, m, d)
        h = dense_attention(q1.expand(k.shape[0], -1, -1, -1), k, v, key_mask=mask)  # (B, H, m, d)
        return self.to_summary(merge_heads(h))  # (B, m, dim)

    def summary(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """H = Att(I, X): the inducing points' summary of x (B, N, dim) -> (B, m, dim)."""
        mask, _ = self.check_input(x, mask)
        _, k, v, _ = self.project(x, mask)
        return self._summarise(k, v, mask)

    def attend(self, q, k, v, mask=None, state=None, *, global_mask=None):
        raise ValueError(
            f"{self.card.name}: attention is not a function of (q, k, v) (its first step's queries are the learned "
            "inducing points and its second step's keys and values are their summary of x); use the layer's forward(x)"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_inducing={self.num_inducing}"
