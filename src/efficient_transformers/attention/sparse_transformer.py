"""Sparse Transformer (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"; arXiv 1904.10509).

Factorized self-attention: each output attends a fixed subset A(i) of the keys, the union (or, across
heads, the split) of two factors chosen so that every earlier position reaches i in two steps,

    out_i = softmax_{j in A(i)}(q_i . k_j / sqrt(d)) v_j

**Strided pattern** (`pattern="strided"`, the default; the paper's images and audio), stride l:

    factor 1 (local):   0 <= i - j < l          the previous l positions, i itself included
    factor 2 (strided): i - j >= 0 and (i - j) mod l == 0      every l-th position

The paper writes factor 1 as {max(0, i - l), ..., i} (l + 1 positions); its extra key i - l lies on the
stride, so the union is the same, and with split heads the strided heads have it. Bidirectional
(the same patterns made symmetric): factor 1 |i - j| < l, factor 2 (i - j) mod l == 0 in both
directions (j = i + l, i + 2 l, ... too).

**Fixed pattern** (`pattern="fixed"`, the paper's text setting), blocks of l, c summary cells:

    factor 1 (own block):  floor(j / l) == floor(i / l) and j <= i
    factor 2 (summary):    j mod l in {l - c, ..., l - 1} and j <= i   the last c cells of every block

(as LRA's `Fixed1Pattern(l)` and `Fixed2Pattern(l, c)` ANDed with the causal mask: the summary cells of
the own block count too, up to i). Bidirectional: factor 1 the own block in both directions, factor 2
every block's summary cells, earlier and later. `distinct_summaries=True` is the paper's advice that
different heads use different length-c sub-blocks: summary head s (counted among the heads that
attend factor 2) uses the cells j mod l in [l - c (t + 1), l - c t) with t = s mod floor(l / c), so the
first such head uses the last c cells, the next the c cells before them, and so on (with 2 heads
split, there is one summary head and nothing changes).

**Combining the factors** (`combine`): "split" (default) gives factor 1 to the first ceil(H / 2) heads
and factor 2 to the others ("separate heads"; `dense_mask(N)` is then (H, N, N)); an odd H gives factor
1 the extra head, and H = 1 is refused (one head cannot be split). "union" lets every head attend
both factors ("merged head", one pattern, `dense_mask(N)` is (N, N)). Interleaving the factors across
layers is a model choice: build alternate layers with combine="split" or mix patterns per layer.

**Computation**, all through `core.block_sparse` (no N x N tensor anywhere, layouts are (H|1, N/b, S)):
- strided factor 1: a band layout (l - 1 keys before, and after when bidirectional) in blocks of
  `LOCAL_BLOCK` = 64 (a band of 2 l - 1 = 255 keys is covered by 5 blocks: 80 % of the products are
  kept ones);
- strided factor 2: attention along the columns of the sequence laid out as a (N / l, l) grid: the
  sequence is viewed transposed (columns of ceil(N / l) rows made contiguous, one copy of q, k, v),
  each column is a block-diagonal group of key blocks, and the original positions are passed to the
  layout so causality is exact in the transposed order; outputs are transposed back;
- fixed factor 1: a layout of blocks of min(l, 128) over the own l-block; when blocks do not align
  with l-blocks, the positions p + l floor(p / l) (a gap of l between l-blocks) with a band of l - 1
  keep exactly the own block;
- fixed factor 2: the summary keys are gathered once into a short sequence of c ceil(N / l) keys (one
  copy), which every query block attends (all of it, bidirectional; causal: the key blocks that start
  at or before the query block's last position, with the positions of the gathered keys for the
  element rule, and the queries cut into 4 stripes, each with as many key-block slots as it needs,
  since the primitive computes every slot of a layout); per head when `distinct_summaries`;
- "union": the two factors' (out, lse) are merged by `merge_by_lse`, on disjoint key sets. Fixed: a
  key mask leaves the summary cells out of factor 1 (factor 2 holds them). Strided, causal: the
  column factor takes the key positions + l, so its causal rule keeps only the strictly earlier rows
  and the key j = i is factor 1's alone. Strided, bidirectional: j = i lies inside both factors and
  inside every band or key mask that could cut it out, so it is counted twice and then removed: with
  w = exp(s_ii - lse) the duplicate's share, out = (out_merged - w v_i) / (1 - w). Both factors hold a
  real key i, so w <= 1/2 and the division is well conditioned (no cancellation).

Cost: strided, O(N (l + N / l) d) = O(N sqrt(N) d) at l ~ sqrt(N); fixed, O(N (l + c N / l) d). Memory
O(N d) for forward + backward (the primitive recomputes its scores in backward) plus the copies of
the transposed view / the gathered summary keys, O(N d).

**Decoding** (causal): a KV cache. Fixed: `PositionedKVCache` keeps the own block of the next query
and the summary cells, at most l + c ceil(N / l) keys (the keys no later query can reach are
dropped), and each new token attends them. Strided: every key stays reachable (key j lies on the
stride of the later queries j + l, j + 2 l, ...), so the cache is all N keys, as vanilla's; but a
step reads only the keys its queries attend, the last l and the ceil(N / l) on its stride, so a
token costs O((l + N / l) d) instead of O(N d).

Options (defaults):
- `pattern="strided"`: "strided" or "fixed";
- `combine="split"`: "split" (factors on separate heads) or "union" (every head, both factors);
- `stride=128`: l; the paper picks l ~ sqrt(N) (128 at N = 16K); LRA's fixed patterns use 128;
- `summary=32`: c <= l, fixed pattern only (LRA uses 32; the paper found c in {8, 16, 32} with l in
  {128, 256} to work and c = 1 to hurt); with pattern="strided" it must stay at its default;
- `distinct_summaries=False`: fixed pattern only; per-head summary sub-blocks (see above).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import AttentionLayer, KVCache, dense_attention, heads_last
from ..core import options as opt
from ..core.block_sparse import NO_BLOCK, BlockLayout, block_sparse_attention, global_blocks, merge_by_lse
from ..registry import Card, register

PATTERNS = ("strided", "fixed")
COMBINES = ("split", "union")
DEFAULT_SUMMARY = 32

LOCAL_BLOCK = 64  # strided factor 1: layout block of the band
COLUMN_BLOCK = 256  # strided factor 2: at most this many rows of a column per layout block
OWN_BLOCK = 128  # fixed factor 1: at most this many tokens per layout block
SUMMARY_BLOCK = 128  # fixed factor 2: layout block of the queries and of the gathered summary keys
SUMMARY_STRIPES = 4  # fixed factor 2, causal: query stripes with their own number of slots


@register(
    Card(
        name="sparse_transformer",
        title="Sparse Transformer",
        paper="Child et al., Generating Long Sequences with Sparse Transformers, 2019 (arXiv 1904.10509)",
        year=2019,
        complexity="O(N sqrt N)",
        classes=("FP",),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=True,
        test_options={"stride": 4},
        notes="strided decoding keeps every key (each lies on the stride of later queries) but reads "
              "only the l + N/l it attends; fixed decoding keeps the own block and the summary cells",
    )
)
class SparseTransformerAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, pattern: str = "strided",
                 combine: str = "split", stride: int = 128, summary: int = DEFAULT_SUMMARY,
                 distinct_summaries: bool = False) -> None:
        super().__init__(dim, heads, causal)
        name = self.card.name
        opt.choice(name, "pattern", pattern, PATTERNS)
        opt.choice(name, "combine", combine, COMBINES)
        opt.positive_int(name, "stride", stride, what="l, the block / stride length")
        opt.positive_int(name, "summary", summary, what="c, the summary cells per block")
        opt.boolean(name, "distinct_summaries", distinct_summaries)
        if pattern == "fixed" and summary > stride:
            raise ValueError(f"{name}: summary={summary} exceeds stride={stride}; allowed: summary c <= stride l "
                             f"(the summary cells are the last c of each block of l)")
        if pattern == "strided" and summary != DEFAULT_SUMMARY:
            raise ValueError(f"{name}: summary={summary} applies to pattern='fixed' only (the strided pattern has "
                             f"no summary cells); allowed: pattern='fixed', or summary={DEFAULT_SUMMARY} (the default)")
        if pattern == "strided" and distinct_summaries:
            raise ValueError(f"{name}: distinct_summaries=True applies to pattern='fixed' only; allowed: "
                             f"pattern='fixed', or distinct_summaries=False")
        if combine == "split" and heads < 2:
            raise ValueError(f"{name}: combine='split' puts the two factors on separate heads and needs heads >= 2, "
                             f"got heads={heads}; allowed: heads >= 2, or combine='union'")
        self.pattern, self.combine, self.stride, self.distinct_summaries = pattern, combine, stride, distinct_summaries
        self.summary = summary
        # heads [0, first) attend factor 1, heads [first, H) factor 2 (split); every head both (union)
        self.first = -(-heads // 2) if combine == "split" else heads
        factor2_heads = heads - self.first if combine == "split" else heads
        step = max(1, stride // summary)  # sub-blocks of c cells per block
        subs = [s % step if distinct_summaries else 0 for s in range(factor2_heads)]
        #: per factor-2 head, the first cell (j mod l) of its summary sub-block
        self.summary_offsets = tuple(stride - summary * (t + 1) for t in subs)

    # ------------------------------------------------------------------ the pattern, element by element
    def _factor_rules(self, query_positions: Tensor, key_positions: Tensor) -> tuple[Tensor, Tensor]:
        """(1, n, m) factor 1 and (1 | H2, n, m) factor 2 of query/key positions (causality included)."""
        qp, kp = query_positions[:, None], key_positions[None, :]  # (n, 1), (1, m)
        l, diff = self.stride, qp - kp  # (n, m): i - j
        past = diff >= 0 if self.causal else torch.ones_like(diff, dtype=torch.bool)
        if self.pattern == "strided":
            first = past & (diff.abs() < l)
            second = past & (torch.remainder(diff, l) == 0)
            return first[None], second[None]
        first = past & (qp // l == kp // l)
        offsets = torch.tensor(self.summary_offsets, device=kp.device)[:, None, None]  # (H2, 1, 1)
        cell = torch.remainder(kp, l)[None] - offsets  # (H2, 1, m)
        second = past[None] & (cell >= 0) & (cell < self.summary)
        if len(set(self.summary_offsets)) == 1:
            second = second[:1]
        return first[None], second

    def allowed(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(H | 1, n, m) bool: the element form of the pattern (decoding over a cache)."""
        first, second = self._factor_rules(query_positions, key_positions)
        if self.combine == "union":
            return first | second
        h2 = self.heads - self.first
        return torch.cat([first.expand(self.first, -1, -1), second.expand(h2, -1, -1)])

    def _still_needed(self, key_positions: Tensor, next_position: int) -> Tensor:
        """Fixed pattern: the cached keys a query at >= next_position may attend: its own block and
        the summary cells of the heads that attend them."""
        l = self.stride
        own = key_positions // l == next_position // l
        cell = torch.remainder(key_positions, l)
        summary = torch.zeros_like(own)
        for offset in set(self.summary_offsets):
            summary |= (cell >= offset) & (cell < offset + self.summary)
        return own | summary

    # ------------------------------------------------------------------ layouts (the computed pattern)
    def _local_layout(self, n: int) -> BlockLayout:
        left = self.stride - 1
        return BlockLayout.banded(min(LOCAL_BLOCK, n), n, left, left, causal=self.causal)

    def _columns(self, n: int, device=None) -> "_Columns":
        # causal union: the key j = i is left to factor 1 by a strict rule (keys one row up, see _Columns)
        strict = self.causal and self.combine == "union"
        return _Columns(n, self.stride, self.causal, device, strict=strict)

    def _own_block_layout(self, n: int, device=None) -> BlockLayout:
        """Fixed factor 1: query block I attends the key blocks of the l-blocks its rows lie in; the
        element rule is a band of l - 1 on the positions p + l floor(p / l)."""
        l = self.stride
        b = min(l, OWN_BLOCK, n)
        rows = torch.arange(-(-n // b), device=device)  # query blocks I
        first_key = (rows * b // l) * l  # first token of the l-block of the block's first row
        last_key = torch.clamp(((torch.clamp((rows + 1) * b, max=n) - 1) // l + 1) * l, max=n) - 1
        lo, hi = first_key // b, last_key // b  # (nq,) key blocks lo .. hi
        if self.causal:
            hi = torch.minimum(hi, rows)
        width = int((hi - lo).max()) + 1
        blocks = lo[:, None] + torch.arange(width, device=device)  # (nq, S)
        blocks = blocks.masked_fill(blocks > hi[:, None], NO_BLOCK)[None]  # (1, nq, S)
        p = torch.arange(n, device=device)
        spread = p + (p // l) * l  # l-blocks l apart: |spread_j - spread_i| <= l - 1 iff same block
        return BlockLayout(b, blocks, query_positions=spread, key_positions=spread,
                           band=(l - 1, 0 if self.causal else l - 1))

    def _summary_positions(self, n: int, offsets: tuple[int, ...], device=None) -> Tensor:
        """(H2 | 1, M) long: the positions of the summary cells of each factor-2 head, block by block
        (M = c ceil(n / l); positions >= n are padding)."""
        l, c = self.stride, self.summary
        unique = offsets[:1] if len(set(offsets)) == 1 else offsets
        start = torch.tensor(unique, device=device)[:, None, None]  # (H2 | 1, 1, 1)
        blocks = torch.arange(-(-n // l), device=device)[None, :, None] * l  # (1, nb, 1)
        return (blocks + start + torch.arange(c, device=device)).flatten(1)  # (H2 | 1, nb c)

    def _summary_layouts(self, n: int, positions: Tensor) -> list[tuple[int, int, BlockLayout]]:
        """Fixed factor 2 as [(first row, end row, layout)]: queries in natural order (blocks of b)
        attend the gathered summary keys (blocks of b). Bidirectional: one layout, every key block.
        Causal: a query block attends the key blocks whose first key is <= its last row, and the rows
        are cut into up to `SUMMARY_STRIPES` stripes, each with as many slots as its last block needs
        (the primitive computes every slot of a layout, so one triangular layout would cost the
        whole rectangle; stripes cost (T + 1) / 2T of it)."""
        b = min(SUMMARY_BLOCK, max(n, self.summary))
        m, device = positions.shape[-1], positions.device
        nq, nk = -(-n // b), -(-m // b)
        if not self.causal:
            return [(0, n, BlockLayout(b, global_blocks(nq, range(nk), device=device)))]
        stripes = min(SUMMARY_STRIPES, nq)
        bounds = [round(s * nq / stripes) for s in range(stripes + 1)]  # query blocks per stripe
        first_key = positions[:, ::b]  # (H2 | 1, nk): increasing
        layouts = []
        for b0, b1 in zip(bounds[:-1], bounds[1:]):
            r0, r1 = b0 * b, min(b1 * b, n)
            last_row = torch.clamp(r0 + (torch.arange(b1 - b0, device=device) + 1) * b, max=r1) - 1  # (nq_s,)
            count = (first_key[:, None, :] <= last_row[None, :, None]).sum(-1)  # (H2 | 1, nq_s)
            slots = torch.arange(max(1, int(count.max())), device=device)
            blocks = torch.where(slots < count[..., None], slots, NO_BLOCK)  # (H2 | 1, nq_s, S_s)
            rows = torch.arange(r0, r1, device=device)
            layouts.append((r0, r1, BlockLayout(b, blocks, query_positions=rows, key_positions=positions, causal=True)))
        return layouts

    # ------------------------------------------------------------------ dense_mask (from the layouts)
    def dense_mask(self, n: int) -> Tensor:
        """(H, N, N) bool for combine="split" (heads attend different factors), (N, N) for "union"
        (per head (H, N, N) with distinct_summaries): derived from the layouts the layer computes with."""
        if self.pattern == "strided":
            first = self._local_layout(n).dense_mask(n)  # (N, N)
            second = self._columns(n).dense_mask()[None]  # (1, N, N)
        else:
            first = self._own_block_layout(n).dense_mask(n)
            positions = self._summary_positions(n, self.summary_offsets)  # (H2 | 1, M)
            m = positions.shape[-1]
            blocked = torch.cat([layout.dense_mask(r1 - r0, m).expand(positions.shape[0], r1 - r0, m)
                                 for r0, r1, layout in self._summary_layouts(n, positions)], dim=1)  # (H2|1, N, M)
            second = torch.zeros(positions.shape[0], n, n + self.stride * 2, dtype=torch.bool)
            index = positions[:, None, :].expand(-1, n, -1)
            second.scatter_(2, index, blocked)
            second = second[..., :n]  # (H2 | 1, N, N); keys past N were padding
        if self.combine == "union":
            union = first[None] | second
            return union[0] if union.shape[0] == 1 else union
        h2 = self.heads - self.first
        return torch.cat([first[None].expand(self.first, -1, -1), second.expand(h2, -1, -1)])

    # ------------------------------------------------------------------ the core
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state):
        if not self.causal:
            return self._full(q, k, v, mask), None
        if self.pattern == "fixed":
            return self._attend_cached_pattern(q, k, v, mask, state, self.allowed, self._still_needed, full=self._full)
        cache = KVCache.extend(state, k, v, mask)  # strided: every key stays reachable
        if state is None:
            return self._full(q, k, v, mask), cache
        return self._decode_strided(q, cache), cache

    def _full(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The parallel form on a whole sequence: (B, H, N, d) -> (B, H, N, d), stored heads-last."""
        if self.pattern == "strided":
            factor1, factor2 = self._strided_local, self._strided_columns
        else:
            factor1, factor2 = self._fixed_own_block, self._fixed_summary
        if self.combine == "union":
            own_mask = mask
            if self.pattern == "fixed":  # factor 1 leaves the summary cells to factor 2: disjoint factors
                own_mask = self._without_summary_cells(mask, q.shape[0], q.shape[-2], q.device)
            out_a, lse_a = factor1(q, k, v, own_mask)
            out_b, lse_b = factor2(q, k, v, mask)
            out, lse = merge_by_lse(out_a, lse_a, out_b, lse_b)
            if self.pattern == "strided" and not self.causal:
                out = _remove_diagonal(out, lse, q, k, v, mask)
            return out
        h1 = self.first
        (q1, q2), (k1, k2), (v1, v2) = (_SplitHeads.apply(t, h1) for t in (q, k, v))
        out = heads_last(q)  # (B, H, N, d), stored (B, N, H, d)
        out[:, :h1] = factor1(q1, k1, v1, mask)[0]
        out[:, h1:] = factor2(q2, k2, v2, mask)[0]
        return out

    # -- strided
    def _strided_local(self, q, k, v, mask):
        return block_sparse_attention(q, k, v, self._local_layout(q.shape[-2]), mask)

    def _strided_columns(self, q, k, v, mask):
        """(out, lse) of the strided factor, in natural order."""
        columns = self._columns(q.shape[-2], q.device)
        key_mask = columns.key_mask(mask, q.shape[0])
        out, lse = block_sparse_attention(columns.to_view(q), columns.to_view(k), columns.to_view(v),
                                          columns.layout, key_mask)  # (B, H, L Rp, d), (B, H, L Rp)
        return columns.from_view(out), columns.from_view(lse[..., None])[..., 0]

    def _decode_strided(self, q: Tensor, cache: KVCache) -> Tensor:
        """New queries at positions t0 .. t0 + n - 1 attend only the cached keys their pattern reaches:
        the last l before each, and those on their strides (about l + N / l keys, gathered)."""
        n = q.shape[-2]
        t0 = cache.length - n
        keys = _strided_step_keys(t0, n, self.stride, q.device)  # (m,) positions = cache rows
        k, v = cache.k.index_select(2, keys), cache.v.index_select(2, keys)  # (B, H, m, d)
        key_mask = None if cache.key_mask is None else cache.key_mask[:, keys]
        queries = torch.arange(t0, t0 + n, device=q.device)
        return dense_attention(q, k, v, key_mask=key_mask, allowed=self.allowed(queries, keys)[None])

    # -- fixed
    def _fixed_own_block(self, q, k, v, mask):
        return block_sparse_attention(q, k, v, self._own_block_layout(q.shape[-2], q.device), mask)

    def _fixed_summary(self, q, k, v, mask):
        """(out, lse) of the summary factor for the factor-2 heads q, k, v (B, H2, N, d): gather the
        summary keys (B, H2, M, d) once, attend them."""
        B, H, n, d = q.shape
        positions = self._summary_positions(n, self.summary_offsets, q.device)  # (H2 | 1, M)
        summary_k, summary_v = _gather_cells(k, positions), _gather_cells(v, positions)  # (B, H, M, d)
        real = positions < n  # (H | 1, M)
        key_mask = real[None].expand(B, -1, -1)
        if mask is not None:
            key_mask = key_mask & mask[:, positions.clamp(max=n - 1)]  # (B, H | 1, M)
        key_mask = key_mask[:, 0] if key_mask.shape[1] == 1 else key_mask
        layouts = self._summary_layouts(n, positions)
        if len(layouts) == 1:
            return block_sparse_attention(q, summary_k, summary_v, layouts[0][2], key_mask)
        stripes = q.split([r1 - r0 for r0, r1, _ in layouts], dim=2)  # views; backward: one cat
        parts = [block_sparse_attention(stripe, summary_k, summary_v, layout, key_mask)
                 for stripe, (_, _, layout) in zip(stripes, layouts)]
        return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)

    def _without_summary_cells(self, mask: Tensor | None, batch: int, n: int, device) -> Tensor:
        """(B, N) or (B, H, N) key mask of factor 1 in union: the mask without the summary cells."""
        l = self.stride
        cell = torch.remainder(torch.arange(n, device=device), l)
        offsets = self.summary_offsets
        offsets = torch.tensor(offsets[:1] if len(set(offsets)) == 1 else offsets, device=device)[:, None]  # (H | 1, 1)
        plain = ~((cell >= offsets) & (cell < offsets + self.summary))  # (H | 1, N)
        keep = plain[None].expand(batch, -1, -1)
        if mask is not None:
            keep = keep & mask[:, None, :]
        return keep[:, 0] if keep.shape[1] == 1 else keep

    def extra_repr(self) -> str:
        extra = ""
        if self.pattern == "fixed":
            extra = f", summary={self.summary}, distinct_summaries={self.distinct_summaries}"
        return f"{super().extra_repr()}, pattern={self.pattern}, combine={self.combine}, stride={self.stride}{extra}"


class _SplitHeads(torch.autograd.Function):
    """x (B, H, N, d) -> x[:, :h], x[:, h:] (the heads of factor 1 and of factor 2).

    The same views as slicing, but the backward pass writes both gradients into one buffer stored
    heads-last (the layout the projection's backward reads in place), instead of autograd's slice
    backward: a zero-filled full-size gradient per slice, then their sum."""

    @staticmethod
    def forward(ctx, x: Tensor, h: int):
        ctx.h, ctx.shape = h, x.shape
        return x[:, :h], x[:, h:]

    @staticmethod
    def backward(ctx, grad_first: Tensor | None, grad_second: Tensor | None):
        B, H, n, d = ctx.shape
        grad = (grad_first if grad_first is not None else grad_second).new_empty(B, n, H, d).transpose(1, 2)
        for part, g in ((slice(0, ctx.h), grad_first), (slice(ctx.h, H), grad_second)):
            if g is None:
                grad[:, part].zero_()
            else:
                grad[:, part].copy_(g)
        return grad, None


# ----------------------------------------------------------------------------- the strided view
class _Columns:
    """The sequence laid out as a grid of ceil(N / l) rows of l and read column by column.

    View row c Rp + r (column c < L = min(N, l), row r < Rp) holds position r l + c; each column's
    Rp rows are `blocks` key blocks of `block` rows (Rp = blocks * block >= ceil(N / l); positions >= N
    are padding). The layout: a query block attends the key blocks of its own column (those up to its
    own when causal, with the original positions for the causal rule). `strict` (causal): the keys
    carry their position + l, so pos_k + l <= pos_q keeps the strictly earlier rows only (in a column,
    positions differ by multiples of l): the key j = i is left out."""

    def __init__(self, n: int, stride: int, causal: bool, device=None, *, strict: bool = False):
        rows = -(-n // stride)
        self.n, self.stride, self.columns = n, stride, min(n, stride)
        self.blocks = -(-rows // COLUMN_BLOCK)
        self.block = -(-rows // self.blocks)
        self.rows = self.blocks * self.block
        L, R, nb = self.columns, self.rows, self.blocks
        self.positions = (torch.arange(R, device=device)[None, :] * stride
                          + torch.arange(L, device=device)[:, None]).flatten()  # (L R,)
        own = torch.arange(L, device=device)[:, None, None] * nb  # (L, 1, 1): the column's first block
        slot = torch.arange(nb, device=device)
        blocks = (own + slot[None, None, :]).expand(L, nb, nb)  # (L, nb (query block in column), nb (slot))
        if causal:
            blocks = blocks.masked_fill(slot[None, None, :] > slot[None, :, None], NO_BLOCK)
        positions = self.positions if causal else None
        self.layout = BlockLayout(self.block, blocks.reshape(1, L * nb, nb), query_positions=positions,
                                  key_positions=positions + stride if strict else positions, causal=causal)

    def to_view(self, x: Tensor) -> Tensor:
        """(B, H, N, f) -> (B, H, L Rp, f), column-major (one copy)."""
        B, H, n, f = x.shape
        if self.rows * self.stride != n:
            x = F.pad(x, (0, 0, 0, self.rows * self.stride - n))  # (B, H, Rp l, f)
        grid = x.view(B, H, self.rows, self.stride, f)[:, :, :, : self.columns]  # (B, H, Rp, L, f)
        return grid.transpose(2, 3).reshape(B, H, self.columns * self.rows, f)

    def from_view(self, y: Tensor) -> Tensor:
        """(B, H, L Rp, f) -> (B, H, N, f) in natural order (when L < l, Rp = 1: row c is position c)."""
        B, H, _, f = y.shape
        grid = y.view(B, H, self.columns, self.rows, f).transpose(2, 3)  # (B, H, Rp, L, f)
        return grid.reshape(B, H, self.rows * self.columns, f)[:, :, : self.n]

    def key_mask(self, mask: Tensor | None, batch: int) -> Tensor | None:
        """(B, L Rp) bool: real keys of the view (padding past N, and the given mask)."""
        real = self.positions < self.n  # (L Rp,)
        if mask is None:
            return None if bool(real.all()) else real[None].expand(batch, -1)
        return real[None] & mask[:, self.positions.clamp(max=self.n - 1)]

    def dense_mask(self) -> Tensor:
        """(N, N) bool in natural order: the view layout's pattern, rows and columns put back."""
        view = self.layout.dense_mask(self.positions.numel())  # (L Rp, L Rp)
        real = self.positions < self.n
        pos = self.positions[real]
        out = torch.zeros(self.n, self.n, dtype=torch.bool)
        out[pos[:, None], pos[None, :]] = view[real][:, real]
        return out


def _strided_step_keys(t0: int, n: int, stride: int, device=None) -> Tensor:
    """(m,) positions of the keys that queries t0 .. t0 + n - 1 attend in the strided pattern (either
    factor): the local run max(0, t0 - l + 1) .. t0 + n - 1 and, before it, the positions on the
    queries' strides (one residue class per query, all of them when n >= l). m <= n + l - 1 + min(n, l)
    ceil(t0 / l): for one token, l + ceil(N / l)."""
    start = max(0, t0 - stride + 1)
    local = torch.arange(start, t0 + n, device=device)
    if start == 0:
        return local
    if n >= stride:
        return torch.arange(0, t0 + n, device=device)
    residues = torch.remainder(torch.arange(t0, t0 + n, device=device), stride)  # (n,) distinct
    rows = torch.arange(-(-start // stride), device=device) * stride  # (ceil(start / l),)
    earlier = (residues[:, None] + rows[None, :]).flatten()
    return torch.cat([earlier[earlier < start], local])


def _gather_cells(x: Tensor, positions: Tensor) -> Tensor:
    """x (B, H, N, f) at positions (H | 1, M) (>= N: zeros) -> (B, H, M, f)."""
    B, H, n, f = x.shape
    m = positions.shape[-1]
    top = int(positions.max()) + 1
    padded = F.pad(x, (0, 0, 0, max(0, top - n)))  # (B, H, >= top, f)
    if positions.shape[0] == 1:
        return padded.index_select(2, positions[0])  # (B, H, M, f)
    index = positions[None, :, :, None].expand(B, H, m, f)
    return torch.gather(padded, 2, index)


def _remove_diagonal(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Union of the strided factors: the key j = i was counted in both; take one copy out.

    With w = exp(s_ii - lse) its share of the merged softmax, the union's output is
    (out - w v_i) / (1 - w); w <= 1/2 where key i is real (both factors hold it), 0 where it is padding."""
    compute = lse.dtype
    scale = q.shape[-1] ** -0.5
    diagonal = (q.to(compute) * k.to(compute)).sum(-1) * scale  # (B, H, N): s_ii
    real = torch.isfinite(lse) if mask is None else mask[:, None, :] & torch.isfinite(lse)
    share = torch.where(real, torch.exp(diagonal - torch.where(real, lse, torch.zeros_like(lse))),
                        torch.zeros_like(lse))  # (B, H, N), <= 1/2
    fixed = (out.to(compute) - share[..., None] * v.to(compute)) / (1 - share)[..., None]
    return fixed.to(out.dtype)
