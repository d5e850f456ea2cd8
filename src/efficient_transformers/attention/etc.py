"""ETC (Ainslie et al. 2020, "ETC: Encoding Long and Structured Inputs in Transformers", EMNLP;
arXiv 2004.08483): global-local attention over a separate global input.

The input is two sequences: n_g global tokens and N long tokens, each long token belonging to at
most one global token (a(i), -1 for none). Attention is cut into four pieces, two softmaxes:

    global query s:  softmax over  g2g: { global t }        s_st = q_s . k_t / sqrt(d) + b_gg[h, clip(t - s)]
                                   g2l: { long j }          s_sj = q_s . k_j / sqrt(d) + b_gl[h, a(j) == s]
    long query i:    softmax over  l2g: { global t }        s_it = q_i . k_t / sqrt(d) + b_lg[h, a(i) == t]
                                   l2l: { j : |i - j| <= r } s_ij = q_i . k_j / sqrt(d) + b_ll[h, clip(j - i)]

clip(delta) = clamp(delta, -k, k): Shaw et al.'s relative position labels clipped at k, here as
one learned scalar per head and label (2k + 1 labels for l2l, 2k + 1 for g2g), and the structural
labels "own global token" / "another one" for l2g and for g2l (2 + 2 per head). Masked pairs (padding,
outside the radius) are left out exactly (the paper's -10000 logits, without the approximation).

Cost, with n_g = N / L global tokens (one per segment of L long tokens): O(N (2r + 1) d) for l2l,
O(N n_g d) for l2g and g2l, O(n_g^2 d) for g2g: the survey's O(n_g^2 + N n_g), quadratic in N with
a small constant (1 / L). Memory O(N d + n_g d), no N x N and no N x n_g tensor: l2l is a band of
blocks (blocks of `block_size`, ceil(r / b) key blocks on each side, element masks at the band's
ends), and every piece runs through `core.block_sparse` (online softmax, scores recomputed in the
backward pass); the relative biases are the core's `relative_bias` (for the band, one (b, S b) tile
of labels shared by every query block); the two pieces of each softmax are merged by their
log-sum-exp (`merge_by_lse`).

Within the layer contract (x (B, N, dim) -> (B, N, dim)) — the decision this library takes, the
paper being silent on single-sequence use:

- the long input is x; the **global input is built by the layer**: global token s is the mean of
  the (real) long tokens of segment s (positions s L .. s L + L - 1, L = `segment_len`, default 128);
  a segment with no real token has no global token (it is masked as a key). The global tokens have
  their own projections (`to_global_qkv`, the paper's separate weights for the global input;
  initialised as copies of the long ones); the output projection is shared;
- the layer returns the long tokens' outputs, l2g + l2l. The global tokens' own outputs (g2g + g2l)
  would become the next layer's global input in the paper's two-stream model; a one-stream model has
  nowhere to put them, so `forward` does not compute them (each layer pools its own global input
  afresh from the long stream, which carries what earlier layers' l2g read). The full two-stream
  layer, all four pieces, is `forward_global_local(x_global, x_long, ...)`, which returns both
  streams and takes **structured input**: `long_to_global` (B, N) long, a(i) in [-1, n_g), which
  long tokens belong to which global token (sentences, paragraphs), and `global_mask` (B, n_g) bool,
  the real global tokens. Its per-head core is `attend_global_local(...)`;
- `attend(q, k, v, mask)` (the contract's per-head core) pools the given k and v per segment as the
  global keys and values (the long projections applied to the pooled input) and returns the long
  rows;
- the layer takes no per-call `global_mask` (its global tokens are not positions of x: the card has
  no `global_tokens`), has no decoding form and refuses causal=True: global tokens summarise whole
  segments and are read by every long token, so every output sees the future. ETC is an encoder
  (the survey's Table 1: not decodable).

Options: `radius` r (default 84, the paper's base model; r >= N gives every long token every long
key), `relative_clip` k (default 12, the base model's), `segment_len` L (default 128 long tokens per
global token), `block_size` b (default 64: blocks of the computation, not of the pattern; outputs are
the same for every b), `hard_l2g` / `hard_g2l` (default False: the paper's optional hard masks, a
long token attends only its own global token / a global token only its own long tokens, besides
the other pieces). The relative biases start at zero (plain attention), as learned parameters.
The models add no absolute position embedding (card `own_positions`): ETC's positions are relative.
Because of its learned biases the layer exposes no `dense_mask`; the tests compare it with the
four pieces written out densely instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import AttentionLayer, project_heads
from ..core import options as opt
from ..core.block_sparse import BlockLayout, block_sparse_attention, global_blocks, merge_by_lse, window_blocks
from ..registry import Card, register

#: elements of the kernel's transient score tensors (2 MiB in float32; the kernel's default is 2^20). Groups
#: of six query blocks instead of three: with the block products on oneDNN (core.gemm), whose calls cost
#: more than MKL's, 2^19 measured 0.84-0.87x the step time of 2^18 at N = 16K (dim 256, 4 heads, train,
#: one thread, paired), 0.90 at 8K and 0.91 at 4K, with the same probed peak memory within its noise
_SCORE_BUDGET = 2**19


@register(
    Card(
        name="etc",
        title="ETC",
        paper="Ainslie et al., ETC: Encoding Long and Structured Inputs in Transformers, EMNLP 2020 (arXiv 2004.08483)",
        year=2020,
        complexity="O(N_g^2 + N N_g)",
        classes=("FP", "M"),
        causal=False,
        bidirectional=True,
        decoding="none",
        own_positions=True,
        test_options={"radius": 3, "relative_clip": 2, "segment_len": 4, "block_size": 4},
        notes=(
            "encoder only: global tokens summarise whole segments (g2l) and every long token reads them (l2g), "
            "so every output depends on the future"
        ),
    )
)
class ETCAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, radius: int = 84, relative_clip: int = 12,
                 segment_len: int = 128, block_size: int = 64, hard_l2g: bool = False, hard_g2l: bool = False) -> None:
        name = self.card.name
        if causal:
            raise ValueError(f"{name}: causal=True is not supported (ETC is an encoder: {self.card.notes}); "
                             "allowed: causal=False")
        super().__init__(dim, heads, causal)
        self.radius = opt.int_in_range(name, "radius", radius, 0)
        self.relative_clip = opt.int_in_range(name, "relative_clip", relative_clip, 0)
        self.segment_len = opt.positive_int(name, "segment_len", segment_len, what="long tokens per global token")
        self.block_size = opt.positive_int(name, "block_size", block_size, what="tokens per block")
        self.hard_l2g = opt.boolean(name, "hard_l2g", hard_l2g)
        self.hard_g2l = opt.boolean(name, "hard_g2l", hard_g2l)
        labels = 2 * relative_clip + 1
        self.local_bias = nn.Parameter(torch.zeros(heads, labels))  # l2l: b_ll[h, clip(j - i) + k]
        self.global_bias = nn.Parameter(torch.zeros(heads, labels))  # g2g: b_gg[h, clip(t - s) + k]
        self.cross_bias = nn.Parameter(torch.zeros(heads, 4))  # [l2g own, l2g other, g2l own, g2l other]
        self.to_global_qkv = nn.Linear(dim, 3 * dim)
        with torch.no_grad():
            self.to_global_qkv.load_state_dict(self.to_qkv.state_dict())

    # ------------------------------------------------------------------ the global input
    def num_global(self, n: int) -> int:
        """n_g for a sequence of n long tokens: one global token per segment of `segment_len`."""
        return -(-n // self.segment_len)

    def segment_pool(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The mean of each segment's real tokens: x (B, H, N, f) -> (pooled (B, H, n_g, f), valid
        (B, n_g) bool: the segment has a real token). In float32 for reduced precision."""
        B, _, n, _ = x.shape
        L, n_g = self.segment_len, self.num_global(n)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = torch.ones(B, n, dtype=compute, device=x.device) if mask is None else mask.to(compute)
        weight = nn.functional.pad(weight, (0, n_g * L - n)).view(B, 1, n_g, L, 1)
        padded = nn.functional.pad(x.to(compute), (0, 0, 0, n_g * L - n)).unflatten(2, (n_g, L))  # (B, H, n_g, L, f)
        counts = weight.sum(3)  # (B, 1, n_g, 1)
        pooled = (padded * weight).sum(3) / counts.clamp(min=1)  # (B, H, n_g, f)
        return pooled.to(x.dtype), counts[:, 0, :, 0] > 0

    def default_assignment(self, n: int, device=None) -> Tensor:
        """(N,) long: a(i) = i // segment_len, the global token of each long token by default."""
        return torch.arange(n, device=device) // self.segment_len

    # ------------------------------------------------------------------ the layer
    def project(self, x: Tensor, mask: Tensor | None, **extra):
        """The long q, k, v and the global tokens' keys and values (B, H, n_g, d), from the pooled
        segments through the global projections (the global queries are not needed: see the module doc)."""
        q, k, v, extra = super().project(x, mask, **extra)
        pooled, valid = self.segment_pool(x[:, None], mask)  # (B, 1, n_g, dim), (B, n_g)
        pooled = pooled[:, 0]
        w_kv, b_kv = self.to_global_qkv.weight[self.dim:], self.to_global_qkv.bias[self.dim:]
        k_global, v_global = project_heads(pooled, w_kv, b_kv, self.heads)  # (B, H, n_g, d) each
        return q, k, v, {**extra, "global_kv": (k_global, v_global, valid)}

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state, *,
                global_kv: tuple[Tensor, Tensor, Tensor] | None = None):
        if global_kv is None:  # attend(q, k, v): the long projections of the pooled input
            k_global, valid = self.segment_pool(k, mask)  # (B, H, n_g, d), (B, n_g)
            v_global, _ = self.segment_pool(v, mask)
        else:
            k_global, v_global, valid = global_kv
        assignment = self.default_assignment(q.shape[-2], q.device)
        return self._long_rows(q, k, v, k_global, v_global, mask, valid, assignment), None

    def forward_global_local(self, x_global: Tensor, x_long: Tensor, mask: Tensor | None = None,
                             global_mask: Tensor | None = None, long_to_global: Tensor | None = None
                             ) -> tuple[Tensor, Tensor]:
        """The two-stream ETC layer, all four pieces: x_global (B, n_g, dim), x_long (B, N, dim) ->
        (y_global (B, n_g, dim), y_long (B, N, dim)). mask: (B, N) bool real long tokens; global_mask:
        (B, n_g) bool real global tokens; long_to_global: (B, N) or (N,) long in [-1, n_g), the global
        token of each long token (-1: none); None: segments of `segment_len` (then n_g must be
        ceil(N / segment_len))."""
        name = self.card.name
        mask, _ = self.check_input(x_long, mask)
        if not isinstance(x_global, Tensor) or x_global.dim() != 3 or x_global.shape[0] != x_long.shape[0] \
                or x_global.shape[-1] != self.dim or x_global.shape[1] < 1:
            raise ValueError(f"{name}: x_global must be (B, n_g, dim) = ({x_long.shape[0]}, n_g >= 1, {self.dim}), "
                             f"got {tuple(x_global.shape) if isinstance(x_global, Tensor) else type(x_global).__name__}")
        if x_global.dtype != x_long.dtype:
            raise ValueError(f"{name}: x_global and x_long must share one dtype, got {x_global.dtype} and {x_long.dtype}")
        q_l, k_l, v_l, _ = super().project(x_long, mask)  # (B, H, N, d)
        q_g, k_g, v_g = project_heads(x_global, self.to_global_qkv.weight, self.to_global_qkv.bias, self.heads)
        out_g, out_l = self.attend_global_local(q_g, k_g, v_g, q_l, k_l, v_l, mask=mask, global_mask=global_mask,
                                                long_to_global=long_to_global)
        return self.output(out_g), self.output(out_l)

    # ------------------------------------------------------------------ the core
    def attend_global_local(self, q_g: Tensor, k_g: Tensor, v_g: Tensor, q_l: Tensor, k_l: Tensor, v_l: Tensor, *,
                            mask: Tensor | None = None, global_mask: Tensor | None = None,
                            long_to_global: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The four pieces on per-head tensors: global (B, H, n_g, d), long (B, H, N, d) ->
        (out_global (B, H, n_g, d), out_long (B, H, N, d)); masks and assignment as in
        `forward_global_local`. Rows with no key to attend give zeros."""
        name = self.card.name
        B, H, n, _ = q_l.shape
        n_g = q_g.shape[-2]
        if q_g.shape[:2] != (B, H) or k_g.shape != q_g.shape or v_g.shape[:-1] != q_g.shape[:-1]:
            raise ValueError(f"{name}: global q, k, v must be (B, H, n_g, d) = ({B}, {H}, n_g, d), got "
                             f"{tuple(q_g.shape)}, {tuple(k_g.shape)}, {tuple(v_g.shape)}")
        mask = self._check_mask(mask, B, n, q_l.device)
        if global_mask is not None:
            if not isinstance(global_mask, Tensor) or global_mask.dtype != torch.bool \
                    or tuple(global_mask.shape) != (B, n_g):
                raise ValueError(f"{name}: global_mask must be a bool tensor (B, n_g) = ({B}, {n_g}), got "
                                 f"{_describe(global_mask)}")
            global_mask = global_mask.to(q_l.device)
        assignment = self._check_assignment(long_to_global, B, n, n_g, q_l.device)
        out_l = self._long_rows(q_l, k_l, v_l, k_g, v_g, mask, global_mask, assignment)
        out_g = self._global_rows(q_g, k_g, v_g, k_l, v_l, mask, global_mask, assignment)
        return out_g, out_l

    def _check_assignment(self, long_to_global: Tensor | None, batch: int, n: int, n_g: int, device) -> Tensor:
        name = self.card.name
        if long_to_global is None:
            expected = self.num_global(n)
            if n_g != expected:
                raise ValueError(f"{name}: without long_to_global, the global input must have one token per segment "
                                 f"of segment_len={self.segment_len} long tokens: n_g = {expected} for N = {n}, got "
                                 f"n_g = {n_g}; allowed: n_g = {expected}, or a long_to_global assignment")
            return self.default_assignment(n, device)
        if not isinstance(long_to_global, Tensor) or long_to_global.dtype.is_floating_point \
                or long_to_global.dtype == torch.bool or tuple(long_to_global.shape) not in ((n,), (batch, n)):
            raise ValueError(f"{name}: long_to_global must be an integer tensor (N,) = ({n},) or (B, N) = ({batch}, {n}), "
                             f"got {_describe(long_to_global)}")
        if long_to_global.numel() and (int(long_to_global.min()) < -1 or int(long_to_global.max()) >= n_g):
            raise ValueError(f"{name}: long_to_global values must lie in [-1, {n_g - 1}] (a global token index, or -1 "
                             f"for none), got values in [{int(long_to_global.min())}, {int(long_to_global.max())}]")
        return long_to_global.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------ the pieces
    def _positions(self, assignment: Tensor) -> Tensor:
        """(N,) or (B, N) -> the layout's position tensor, (N,) or (B, 1, N)."""
        return assignment if assignment.dim() == 1 else assignment[:, None, :]

    def _cross_table(self, piece: int) -> Tensor:
        """(H, 3) bias table over clamp(pos_k - pos_q, -1, 1) + 1 for l2g (piece 0) or g2l (1): the
        positions are global indices and assignments, so the label is 1 for the own global token and
        0 or 2 for another."""
        own, other = self.cross_bias[:, 2 * piece], self.cross_bias[:, 2 * piece + 1]
        return torch.stack([other, own, other], dim=1)

    def _long_rows(self, q: Tensor, k: Tensor, v: Tensor, k_g: Tensor, v_g: Tensor, mask: Tensor | None,
                   global_mask: Tensor | None, assignment: Tensor) -> Tensor:
        """l2l + l2g: long queries (B, H, N, d) -> (B, H, N, d)."""
        b, n, n_g = self.block_size, q.shape[-2], k_g.shape[-2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the kernel reads blocks of contiguous k, v as views
        k_g, v_g = k_g.to(q.dtype).contiguous(), v_g.to(q.dtype).contiguous()
        reach = min(-(-self.radius // b), -(-n // b) - 1)  # key blocks on each side (no more than exist)
        local = BlockLayout(b, window_blocks(-(-n // b), reach, reach, device=q.device), band=(self.radius, self.radius))
        out, lse = block_sparse_attention(q, k, v, local, mask, score_budget=_SCORE_BUDGET,
                                          relative_bias=self.local_bias)  # (B, H, N, d), (B, H, N)
        to_global = BlockLayout(b, global_blocks(-(-n // b), range(-(-n_g // b)), device=q.device),
                                query_positions=self._positions(assignment),
                                band=(0, 0) if self.hard_l2g else None)  # hard: only t == a(i)
        out_g, lse_g = block_sparse_attention(q, k_g, v_g, to_global, global_mask, score_budget=_SCORE_BUDGET,
                                              relative_bias=self._cross_table(0))
        return merge_by_lse(out, lse, out_g, lse_g)[0]

    def _global_rows(self, q_g: Tensor, k_g: Tensor, v_g: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     global_mask: Tensor | None, assignment: Tensor) -> Tensor:
        """g2g + g2l: global queries (B, H, n_g, d) -> (B, H, n_g, d)."""
        b, n, n_g = self.block_size, k.shape[-2], q_g.shape[-2]
        q_g, k_g, v_g, k, v = (t.contiguous() for t in (q_g, k_g, v_g, k, v))
        rows = -(-n_g // b)
        among = BlockLayout(b, global_blocks(rows, range(rows), device=q_g.device))
        out, lse = block_sparse_attention(q_g, k_g, v_g, among, global_mask, score_budget=_SCORE_BUDGET,
                                          relative_bias=self.global_bias)
        to_long = BlockLayout(b, global_blocks(rows, range(-(-n // b)), device=q_g.device),
                              key_positions=self._positions(assignment),
                              band=(0, 0) if self.hard_g2l else None)  # hard: only a(j) == s
        out_l, lse_l = block_sparse_attention(q_g, k, v, to_long, mask, score_budget=_SCORE_BUDGET,
                                              relative_bias=self._cross_table(1))
        return merge_by_lse(out, lse, out_l, lse_l)[0]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, radius={self.radius}, relative_clip={self.relative_clip}, "
                f"segment_len={self.segment_len}, block_size={self.block_size}, hard_l2g={self.hard_l2g}, "
                f"hard_g2l={self.hard_g2l}")


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"
