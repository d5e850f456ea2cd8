"""Axial Transformer (Ho et al. 2019, "Axial Attention in Multidimensional Transformers"; arXiv 1912.12180).

The sequence is laid out on an n-D grid (d_0, ..., d_{k-1}) in raster order (the last axis fastest),
and each head attends along ONE axis: the keys that share every coordinate of the query but the one
on its axis,

    out_i = sum_{j in A_h(i)} softmax_j(q_i . k_j / sqrt(d)) v_j,
    A_h(i) = { j : coord_b(j) = coord_b(i) for every axis b != a(h) }      (and j <= i when causal)

one softmax per head over a fixed pattern (so `dense_mask(N)` is per head, (H, N, N)). Ho et al.
apply the axes as separate, alternating layers (row attention, then column attention); here, as the
project's issue asks, one layer splits its heads between the axes, so one layer already mixes both
axes through W_O and the per-axis layers are its special case. For 2-D,
"row heads" (axis 1, the width) attend the positions of their row, "column heads" (axis 0) those of
their column. Cost: a query attends d_a keys, so O(N (sum_a d_a) d / k) per layer: O(N sqrt N) for a
square 2-D grid (N^(1 + 1/k) for k equal axes); O(N d) memory.

**Heads.** Head h attends along axis a(h) = k - 1 - (h mod k) (round robin, the last axis first): in
2-D the even heads are row heads and the odd heads column heads (half each for an even head count;
with 3 heads, 2 row heads and 1 column head). `heads` must be >= k (ValueError otherwise).

**Layout (`shape`).**
- `shape=(d_0, ..., d_{k-1})` (k >= 2; the models pass an image task's data shape): bidirectional,
  N = prod(shape) + g with g >= 0 leading tokens outside the grid (a classifier's CLS token): they are
  global (attend to every key, and every grid position attends them, one softmax with its axis keys),
  see `models.classifier`. Causal: N <= prod(shape), the raster order of the grid or a prefix of it
  while generating (no leading tokens: a prefix could not tell them apart). Other N raise a ValueError
  naming shape and N.
- `shape=None` (any N): a 2-D layout of width W and H = ceil(N / W) rows, the last row possibly
  partial (its missing cells are padding no one attends). Bidirectional: the nearest square,
  W = ceil(sqrt(N)), so the layout is a function of N alone (N = 130: W = 12, H = 11; N = 4096: 64 x 64;
  N = 16384: 128 x 128). Causal: W = ceil(sqrt(max_seq_len)) (the models pass their `max_seq_len`;
  default 4096: W = 64), fixed whatever N, because a decoder only knows a prefix: a prefix of N
  tokens is rows 0 .. ceil(N / W) - 1 of that one grid, so the pattern of position i never depends on
  how many tokens follow it, and token-by-token decoding equals the full forward.

**Receptive field.** Bidirectional: two stacked layers reach every position (on any grid, the
padded partial last row included): key (r', c') reaches query (r, c) through (r', c) (a row head,
then a column head) or through (r, c') (column head, then row head); with k axes, k layers. Causal:
a row head moves information rightwards within a row, a column head downwards within a column, so a
stack of two or more layers lets (r, c) see exactly the earlier positions (r', c') with r' <= r and
c' <= c (through (r', c)), and no depth reaches the positions of earlier rows to its right, c' > c
(tested; with k axes, k layers reach the coordinate-wise earlier positions and no more). Ho et al.'s decoder closes that
gap with a *shifted* outer decoder: unmasked row attention plus masked column attention over the
previous rows, whose output is shifted down one row (so row r receives a summary of all rows < r,
all columns) and added to the inner decoder's input, which is shifted right one pixel and uses masked
row attention. This layer implements only the masked row/column attention layer (the building block
of that architecture): no unmasked-row outer stack, no down/right shift, no channel encoder.

**Computation** (through `core.block_sparse`, no N x N tensor). Per axis a, the tokens are put in an
order where the lines along a are contiguous: the raster order itself for the last axis, the
transposed (column-major for 2-D) order for the others, each line of length L = d_a padded to m b with
m = ceil(L / `max_block`) blocks of b = ceil(L / m) tokens (padding slots are masked keys whose
outputs are dropped). Query block I attends the m blocks of its line (bidirectional) or the blocks of
its line up to itself (causal), with the primitive's causal rule on the ORIGINAL raster positions
passed along with the permuted tokens, so causality is exact in raster order. The row axis needs no
permutation when its m blocks tile the row exactly (m b = W: always when W <= `max_block`, e.g.
N <= 128^2 with the defaults, one block per row: a block-diagonal layout the primitive reads in place);
the other axes (and a row cut with padding) gather their heads' q, k, v once (O(N d)). Leading global
tokens: every grid position also attends them in a second block-sparse call, merged with its axis part by
log-sum-exp (`merge_by_lse`); their own rows are one small dense SDPA call of g queries over all keys.

Options:
- `shape=None`: the grid, see above.
- `max_seq_len=4096` (the models pass theirs): the longest sequence, checked in every mode; with
  `shape=None` and causal it fixes the row width W = ceil(sqrt(max_seq_len)).
- `max_block=128`: the largest block of the primitive; a line longer than this is cut into m blocks.
  Speed and memory only: the pattern, and so `dense_mask` and the outputs, do not depend on it.
  128 keeps a 128 x 128 grid (N = 16K) at one block per line.

Decoding (causal): a `PositionedKVCache`. A row head at t attends the earlier positions of its row,
a column head every earlier position of its column: together that is the whole prefix, minus the keys
whose lines no future position reaches (they drop out only in the last row: in 2-D, once row
H - 1 has passed column c, column c's keys go). So the state is O(N), not bounded: for 2-D the
current row's earlier positions plus up to N / W keys per column, i.e. the whole prefix until the last
row starts (tested exactly against the keys the definition can still reach). The pattern allows no
smaller cache; decoding is no cheaper than a dense KV cache in memory, and each step attends O(N)
cached keys (densely, with the pattern's element rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import AttentionLayer, PositionedKVCache, dense_attention
from ..core import options as opt
from ..core.block_sparse import NO_BLOCK, BlockLayout, block_sparse_attention, global_blocks, merge_by_lse
from ..registry import Card, register

DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_BLOCK = 128


@dataclass(frozen=True)
class _Axis:
    """The attention along one axis for one call.

    heads:   slice of the heads attending along this axis (h = start, start + k, ...)
    order:   (P,) long, the pixel index (raster, within the grid) of each permuted slot, -1 for padding;
             None when the permuted order is the raster order itself (row axis, b divides W)
    inverse: (n_pix,) long, the permuted slot of each pixel (None with order None)
    layout:  the block layout over the P permuted slots
    """

    heads: slice
    order: Tensor | None
    inverse: Tensor | None
    layout: BlockLayout


@dataclass(frozen=True)
class _Plan:
    dims: tuple[int, ...]  # the grid of this call (a causal prefix covers only its leading-axis rows)
    leading: int  # g, global tokens before the grid
    pixels: int  # N - g, the grid positions present (the rest of the grid is padding)
    axes: list[_Axis]


@register(
    Card(
        name="axial",
        title="Axial Transformer",
        paper="Ho et al., Axial Attention in Multidimensional Transformers, 2019 (arXiv 1912.12180)",
        year=2019,
        complexity="O(N sqrt N)",
        classes=("FP",),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=True,
        test_options={"max_block": 4},
        causal_test_options={"max_seq_len": 144},
        notes="causal decoding keeps every key its row and column heads can still reach: the whole prefix "
              "(O(N)), minus lines no future position reaches",
    )
)
class AxialAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, shape: tuple[int, ...] | None = None,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_block: int = DEFAULT_MAX_BLOCK) -> None:
        name = self.card.name
        opt.positive_int(name, "max_seq_len", max_seq_len)
        super().__init__(dim, heads, causal, max_seq_len=max_seq_len)
        self.shape = None if shape is None else opt.positive_int_tuple(name, "shape", shape, min_length=2)
        self.max_block = opt.positive_int(name, "max_block", max_block, what="the largest block of a line")
        self.num_axes = 2 if self.shape is None else len(self.shape)
        if heads < self.num_axes:
            raise ValueError(f"{name}: heads={heads} is fewer than the {self.num_axes} axes of shape={self.shape}; "
                             f"allowed: heads >= {self.num_axes} (every axis needs at least one head)")
        # causal, shape None: one row width for every prefix (see the module doc)
        self.causal_width = math.isqrt(max_seq_len - 1) + 1 if max_seq_len > 1 else 1  # ceil(sqrt(max_seq_len))

    # ------------------------------------------------------------------ the grid
    def axis_of_head(self, h: int) -> int:
        """The axis head h attends along: k - 1 - (h mod k) (head 0 the rows, head 1 the columns in 2-D)."""
        return self.num_axes - 1 - h % self.num_axes

    def grid(self, n: int) -> tuple[tuple[int, ...], int]:
        """(grid dims of a sequence of N tokens, g leading tokens), N checked against `shape`."""
        name = self.card.name
        if self.shape is None:
            width = self.causal_width if self.causal else math.isqrt(n - 1) + 1  # ceil(sqrt(N))
            return (-(-n // width), width), 0
        cells = math.prod(self.shape)
        if self.causal:
            if n > cells:
                raise ValueError(
                    f"{name}: shape={self.shape} holds {cells} positions, got N={n}; allowed: causal axial "
                    f"attention takes the raster order of the grid or a prefix of it, N <= {cells} (no leading "
                    "tokens when causal)")
            inner = math.prod(self.shape[1:])
            return (-(-n // inner),) + self.shape[1:], 0
        if n < cells:
            raise ValueError(
                f"{name}: shape={self.shape} needs N = {cells} grid positions plus g >= 0 leading global tokens "
                f"(a CLS token: N = {cells + 1}), got N={n}; allowed: N >= {cells}")
        return self.shape, n - cells

    def _plan(self, n: int, device=None) -> _Plan:
        dims, g = self.grid(n)
        pixels, k = n - g, len(dims)
        cells = math.prod(dims)
        raster = torch.arange(cells, device=device).view(dims)
        axes = []
        for a in reversed(range(k)):  # the order of the heads: axis k - 1 first
            length = dims[a]
            m = -(-length // self.max_block)
            b = -(-length // m)
            first = k - 1 - a  # the first head of this axis
            heads = slice(first, self.heads, k)
            lines = raster.movedim(a, -1).reshape(-1, length)  # (cells / L, L): the lines along a, raster inside
            padded = torch.nn.functional.pad(lines, (0, m * b - length), value=-1)  # (lines, m b)
            nq = padded.numel() // b
            block = torch.arange(nq, device=device)[:, None]  # (nq, 1)
            line_start = block // m * m
            if self.causal:  # the blocks of the line up to this one (slot m - 1 is the block itself)
                blocks = block - (m - 1) + torch.arange(m, device=device)  # (nq, m)
                blocks = blocks.masked_fill(blocks < line_start, NO_BLOCK)
            else:  # every block of the line
                blocks = line_start + torch.arange(m, device=device)
            if a == k - 1 and m * b == length:  # the raster order itself: no permutation, no copy
                layout = BlockLayout(b, blocks[None], causal=self.causal)
                axes.append(_Axis(heads, None, None, layout))
                continue
            # positions for the causal rule: the original raster positions (padding: the line's last cell)
            last = lines[:, -1:].expand(-1, m * b - length)
            positions = torch.cat([lines, last], dim=1).reshape(-1) if self.causal else None
            order = padded.reshape(-1)
            order = order.masked_fill(order >= pixels, -1)  # (P,): cells past the sequence are padding
            real = order >= 0
            inverse = torch.empty(pixels, dtype=torch.long, device=device)
            inverse[order[real]] = torch.nonzero(real).squeeze(-1)
            layout = BlockLayout(b, blocks[None], query_positions=positions, key_positions=positions,
                                 causal=self.causal)
            axes.append(_Axis(heads, order, inverse, layout))
        return _Plan(dims, g, pixels, axes)

    # ------------------------------------------------------------------ the pattern
    def dense_mask(self, n: int) -> Tensor:
        """(H, N, N) bool, derived from the layouts the layer computes with (for tests and references)."""
        plan = self._plan(n)
        g = plan.leading
        pattern = torch.zeros(self.heads, n, n, dtype=torch.bool)
        for axis in plan.axes:
            if axis.order is None:
                per_axis = axis.layout.dense_mask(plan.pixels)  # (n_pix, n_pix) in raster order
            else:
                permuted = axis.layout.dense_mask(axis.order.numel())  # (P, P) in the permuted order
                real = axis.order >= 0
                per_axis = torch.zeros(plan.pixels, plan.pixels, dtype=torch.bool)
                rows = axis.order[real]
                per_axis[rows[:, None], rows[None, :]] = permuted[real][:, real]
            pattern[axis.heads, g:, g:] = per_axis
        pattern[:, :g, :] = True  # leading tokens: global (bidirectional with a shape only)
        pattern[:, :, :g] = True
        return pattern

    # ------------------------------------------------------------------ the core
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: PositionedKVCache | None):
        """q, k, v (B, H, n, d) -> (out (B, H, n, d), decoding state or None)."""
        if not self.causal:
            return self._full(q, k, v, mask), None
        self.grid((0 if state is None else state.length) + q.shape[-2])  # N checked against shape
        return self._attend_cached_pattern(q, k, v, mask, state, self._allowed, self._still_needed, full=self._full)

    def _full(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        B, H, n, d = q.shape
        plan = self._plan(n, q.device)
        g, pixels = plan.leading, plan.pixels
        out = v.new_empty(B, n, H, v.shape[-1]).transpose(1, 2)  # (B, H, N, d), stored heads-last
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # the primitive's lse dtype
        lse = q.new_empty(B, H, pixels, dtype=lse_dtype) if g else None  # (B, H, n_pix), with leading tokens only
        grid_mask = None if mask is None else mask[:, g:]  # (B, n_pix)
        for axis in plan.axes:
            qa, ka, va = (t[:, axis.heads, g:] for t in (q, k, v))  # (B, h_a, n_pix, d)
            if axis.order is None:
                out_a, lse_a = block_sparse_attention(qa, ka, va, axis.layout, grid_mask)  # (B, h_a, n_pix, d)
            else:
                source = axis.order.clamp(min=0)  # (P,): padding reads pixel 0 (a masked key; its output is dropped)
                key_mask = (axis.order >= 0)[None].expand(B, -1)  # (B, P)
                if grid_mask is not None:
                    key_mask = key_mask & grid_mask[:, source]
                qp, kp, vp = (t.index_select(2, source) for t in (qa, ka, va))  # (B, h_a, P, d), lines contiguous
                out_p, lse_p = block_sparse_attention(qp, kp, vp, axis.layout, key_mask)  # (B, h_a, P, d)
                out_a, lse_a = out_p.index_select(2, axis.inverse), lse_p.index_select(2, axis.inverse)  # raster
            out[:, axis.heads, g:] = out_a
            if g:
                lse[:, axis.heads] = lse_a
        if not g:
            return out
        # leading global tokens: every grid position also attends them (merged by log-sum-exp) ...
        b = min(64, max(8, g))
        every = BlockLayout(b, global_blocks(-(-pixels // b), range(-(-g // b)), device=q.device))
        lead_mask = None if mask is None else mask[:, :g]
        lead_out, lead_lse = block_sparse_attention(q[:, :, g:], k[:, :, :g], v[:, :, :g], every, lead_mask)
        grid_out, _ = merge_by_lse(out[:, :, g:], lse, lead_out, lead_lse)  # (B, H, n_pix, d)
        # ... and they attend every key
        leading = dense_attention(q[:, :, :g], k, v, key_mask=mask)  # (B, H, g, d)
        return torch.cat([leading.to(grid_out.dtype), grid_out], dim=2)  # (B, H, N, d)

    # ------------------------------------------------------------------ decoding rules
    def _decoding_grid(self) -> tuple[tuple[int, ...], int]:
        """(the whole grid a causal sequence lies on, the number of positions it may reach)."""
        if self.shape is None:
            w = self.causal_width
            return (-(-self.max_seq_len // w), w), self.max_seq_len
        return self.shape, min(math.prod(self.shape), self.max_seq_len)

    def _coords(self, positions: Tensor, dims: tuple[int, ...]) -> list[Tensor]:
        coords, rest = [], positions
        for size in reversed(dims):
            coords.append(rest % size)
            rest = rest // size
        return coords[::-1]  # coords[a]: the coordinate on axis a

    def _allowed(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """The element rule (H, n, m) of the causal pattern, for decoding over the cache."""
        dims, _ = self._decoding_grid()
        cq, ck = self._coords(query_positions, dims), self._coords(key_positions, dims)
        earlier = key_positions[None, :] <= query_positions[:, None]  # (n, m)
        per_axis = []
        for a in range(len(dims)):
            same = earlier.clone()
            for other in range(len(dims)):
                if other != a:
                    same &= cq[other][:, None] == ck[other][None, :]
            per_axis.append(same)
        return torch.stack([per_axis[self.axis_of_head(h)] for h in range(self.heads)])  # (H, n, m)

    def _still_needed(self, key_positions: Tensor, next_position: int) -> Tensor:
        """(m,) bool: the cached keys a position >= next_position (on the grid) can still attend: the last
        position of one of the key's lines (along an axis that has heads: all of them) is >= next_position."""
        dims, limit = self._decoding_grid()
        coords = self._coords(key_positions, dims)
        needed = torch.zeros_like(key_positions, dtype=torch.bool)
        for a in range(len(dims)):
            stride = math.prod(dims[a + 1:])
            last = key_positions + (dims[a] - 1 - coords[a]) * stride  # the line's last cell
            over = (last - limit).clamp(min=-1) + 1  # how far past the last reachable position
            last = last - (-(-over // stride)) * stride  # the line's last cell < limit
            needed |= last >= next_position
        return needed

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shape={self.shape}, max_seq_len={self.max_seq_len}, max_block={self.max_block}"
