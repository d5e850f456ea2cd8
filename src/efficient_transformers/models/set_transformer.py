"""Set Transformer (Lee et al. 2019, "Set Transformer: A Framework for Attention-based Permutation-Invariant
Neural Networks", ICML; arXiv 1810.00825): the paper's building blocks and its model for sets of vectors.

    MAB(X, Y)  = LN(H + rFF(H)),  H = LN(X + MHA(X, Y, Y))      multihead attention block
    SAB(X)     = MAB(X, X)                                       O(n^2)
    ISAB_m(X)  = MAB(X, MAB(I_m, X))                             m learned inducing points, O(n m)
    PMA_k(Z)   = MAB(S_k, rFF(Z))                                k learned seeds, pooling by attention

    SetTransformer(X) = Decoder(Encoder(X)),  Encoder = depth x ISAB_m (or SAB),
                        Decoder(Z) = rFF(SAB(PMA_k(Z)))          -> (B, k, out_features)

MHA(X, Y, Y) is multi-head attention with queries X W^Q, keys Y W^K, values Y W^V and output
projection W^O, computed by the project's `dense_attention` (PyTorch's fused SDPA). rFF is a
row-wise feed-forward layer; the paper leaves its form open ("any row-wise feedforward layer"), and
here it is W_2 relu(W_1 x + b_1) + b_2 with hidden width ff_mult * dim (ff_mult = 1 by default). The
decoder's last rFF is a Linear(dim, out_features), as in the authors' code. `layer_norm=False` drops
both LayerNorms of every MAB (the authors' code makes them optional; their toy tasks run without).

Sets and padding: a batch holds sets of different sizes as a (B, N) bool `mask` (True = element). A
padded element is never a key (it is masked out of every MHA whose keys are set elements: SAB, the
inducing points' MAB(I, X), PMA), so outputs at real elements and the pooled output do not depend
on padded content. Outputs at padded positions are finite but unspecified.

Symmetry (the paper's test): SAB and ISAB are permutation-equivariant, PMA (hence the model) is
permutation-invariant.

The registered attention `set_transformer` (attention/set_transformer.py) is ISAB's attention alone,
Att(X, Att(I, X)), for use inside the library's standard Transformer blocks (whose norms and
feed-forward replace the MABs'); this file is the paper's architecture as it stands.

Initialisation: inducing points and seeds Xavier-uniform, as the authors' code does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core import dense_attention, merge_heads, split_heads
from ..core import options as opt

NAME = "set_transformer"
ENCODERS = ("isab", "sab")


def _check_dims(dim: Any, heads: Any) -> None:
    opt.positive_int(NAME, "dim", dim)
    opt.positive_int(NAME, "heads", heads)
    if dim % heads:
        divisors = [h for h in range(1, dim + 1) if dim % h == 0 and h <= 64]
        raise ValueError(f"{NAME}: heads={heads} does not divide dim={dim}; allowed heads: {divisors}")


def _check_mask(mask: Tensor | None, batch: int, n: int, device) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, n):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{NAME}: mask must be a bool tensor of shape (B, N) = ({batch}, {n}) (True = element), got {got}")
    return mask.to(device)


class MultiheadAttention(nn.Module):
    """MHA(X, Y, Y) = concat_h softmax(X W^Q_h (Y W^K_h)^T / sqrt(d)) Y W^V_h  W^O; padded keys masked out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        _check_dims(dim, heads)
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x (B | 1, n, dim) queries, y (B, N, dim) keys/values, key_mask (B, N) -> (B, n, dim)."""
        B = y.shape[0]
        q = split_heads(self.to_q(x), self.heads).expand(B, -1, -1, -1)  # (B, H, n, d)
        k, v = split_heads(self.to_kv(y), 2 * self.heads).chunk(2, dim=1)  # 2 x (B, H, N, d)
        return self.to_out(merge_heads(dense_attention(q, k, v, key_mask=key_mask)))  # (B, n, dim)


class RowFF(nn.Module):
    """rFF(x) = W_2 relu(W_1 x + b_1) + b_2, applied to every row (element) alone."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out or dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MAB(nn.Module):
    """MAB(X, Y) = LN(H + rFF(H)), H = LN(X + MHA(X, Y, Y))."""

    def __init__(self, dim: int, heads: int, *, ff_mult: int = 1, layer_norm: bool = True) -> None:
        super().__init__()
        opt.positive_int(NAME, "ff_mult", ff_mult)
        opt.boolean(NAME, "layer_norm", layer_norm)
        self.attn = MultiheadAttention(dim, heads)
        self.rff = RowFF(dim, ff_mult * dim)
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if layer_norm else nn.Identity()

    def forward(self, x: Tensor, y: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x (B | 1, n, dim), y (B, N, dim), key_mask (B, N) over y -> (B, n, dim)."""
        h = self.norm1(x + self.attn(x, y, key_mask))  # (B, n, dim)
        return self.norm2(h + self.rff(h))


class SAB(nn.Module):
    """SAB(X) = MAB(X, X): self-attention over the set, O(n^2)."""

    def __init__(self, dim: int, heads: int, **mab: Any) -> None:
        super().__init__()
        self.mab = MAB(dim, heads, **mab)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.mab(x, x, mask)  # (B, N, dim)


class ISAB(nn.Module):
    """ISAB_m(X) = MAB(X, H), H = MAB(I, X): m learned inducing points I, O(n m)."""

    def __init__(self, dim: int, heads: int, num_inducing: int = 32, **mab: Any) -> None:
        super().__init__()
        opt.positive_int(NAME, "num_inducing", num_inducing, what="m, the inducing points")
        self.inducing = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, num_inducing, dim)))  # I: (1, m, dim)
        self.summarise = MAB(dim, heads, **mab)  # MAB(I, X)
        self.broadcast = MAB(dim, heads, **mab)  # MAB(X, H)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.summarise(self.inducing.to(x.dtype), x, mask)  # (B, m, dim): padded elements masked out
        return self.broadcast(x, h)  # (B, N, dim)


class PMA(nn.Module):
    """PMA_k(Z) = MAB(S, rFF(Z)): k learned seeds S pool the set into k vectors."""

    def __init__(self, dim: int, heads: int, num_seeds: int = 1, *, ff_mult: int = 1, layer_norm: bool = True) -> None:
        super().__init__()
        opt.positive_int(NAME, "num_seeds", num_seeds, what="k, the PMA seeds")
        opt.positive_int(NAME, "ff_mult", ff_mult)
        self.seeds = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, num_seeds, dim)))  # S: (1, k, dim)
        self.rff = RowFF(dim, ff_mult * dim)
        self.mab = MAB(dim, heads, ff_mult=ff_mult, layer_norm=layer_norm)

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """z (B, N, dim), mask (B, N) -> (B, k, dim)."""
        return self.mab(self.seeds.to(z.dtype), self.rff(z), mask)


class SetTransformer(nn.Module):
    """Sets of continuous vectors (B, N, in_features) + mask -> (B, num_seeds, out_features).

    Encoder: Linear(in_features, dim), then `depth` ISAB_m blocks (encoder="isab", m = num_inducing)
    or SAB blocks (encoder="sab"). Decoder: PMA_k (k = num_seeds) -> SAB -> Linear(dim, out_features).
    """

    def __init__(self, in_features: int, out_features: int, *, dim: int = 128, heads: int = 4, depth: int = 2,
                 encoder: str = "isab", num_inducing: int = 32, num_seeds: int = 1, ff_mult: int = 1,
                 layer_norm: bool = True) -> None:
        super().__init__()
        opt.positive_int(NAME, "in_features", in_features)
        opt.positive_int(NAME, "out_features", out_features)
        _check_dims(dim, heads)
        opt.positive_int(NAME, "depth", depth)
        opt.choice(NAME, "encoder", encoder, ENCODERS)
        opt.positive_int(NAME, "num_inducing", num_inducing, what="m, the inducing points")
        opt.positive_int(NAME, "num_seeds", num_seeds, what="k, the PMA seeds")
        opt.positive_int(NAME, "ff_mult", ff_mult)
        opt.boolean(NAME, "layer_norm", layer_norm)
        self.in_features, self.out_features, self.encoder_kind = in_features, out_features, encoder
        mab = {"ff_mult": ff_mult, "layer_norm": layer_norm}
        self.embed = nn.Linear(in_features, dim)
        self.encoder = nn.ModuleList(
            ISAB(dim, heads, num_inducing, **mab) if encoder == "isab" else SAB(dim, heads, **mab) for _ in range(depth)
        )
        self.pool = PMA(dim, heads, num_seeds, **mab)
        self.decoder_sab = SAB(dim, heads, **mab)
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, in_features) float, mask (B, N) bool or None -> (B, num_seeds, out_features)."""
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{NAME}: x must be a floating tensor (B, N, in_features={self.in_features}), got {got}")
        if x.shape[-1] != self.in_features or x.shape[1] < 1:
            raise ValueError(f"{NAME}: x must be (B, N >= 1, in_features={self.in_features}), got {tuple(x.shape)}")
        mask = _check_mask(mask, x.shape[0], x.shape[1], x.device)
        h = self.embed(x)  # (B, N, dim)
        for block in self.encoder:
            h = block(h, mask)  # (B, N, dim)
        pooled = self.pool(h, mask)  # (B, k, dim)
        return self.head(self.decoder_sab(pooled))  # (B, k, out_features)
