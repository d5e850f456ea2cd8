"""Image Transformer (Parmar et al. 2018, "Image Transformer", ICML; arXiv 1802.05751): local self-attention.

The image is a sequence in raster order. Queries are grouped into **query blocks** that share one
**memory block**, so every product of the layer stays a dense matrix product:

    out_i = sum_{j in M(Q(i))} softmax_j(q_i . k_j / sqrt(d)) v_j,    j <= i when causal (raster order)

with Q(i) the query block of position i and M(Q) its memory:

- **1-D** (`shape=None`, any N): query blocks of l_q = `query_block` consecutive positions; the
  memory of block J = [J l_q, (J+1) l_q) is the block plus the l_m = `memory` positions before it,
  [J l_q - l_m, (J+1) l_q), masked causally (a query sees memory positions <= itself).
  Bidirectional: the block plus l_m positions before *and after* it, [J l_q - l_m, (J+1) l_q + l_m)
  (tensor2tensor's unmasked `local_attention_1d` with filter_width = l_m: the symmetric analogue of
  the causal memory, the same as the 2-D flange below).
- **2-D** (`shape=(H, W)`): query blocks are h_q x w_q rectangles (`query_shape`) of the image, the
  memory of the block at rows [R h_q, (R+1) h_q) and columns [C w_q, (C+1) w_q) extends it by the
  flange (h_m, w_m) = `memory_flange`: rows [R h_q - h_m, (R+1) h_q) and columns
  [C w_q - w_m, (C+1) w_q + w_m) when causal, with a query seeing the memory positions before it in
  raster order (pos_k = r_k W + c_k <= pos_q); bidirectional: the flange below too, rows
  [R h_q - h_m, (R+1) h_q + h_m). Memories are clipped at the image border.

Cost: O(N m d) time for a memory of m keys per query block (1-D: m = l_q + l_m causal, l_q + 2 l_m
bidirectional; 2-D: (h_q + h_m)(w_q + 2 w_m) causal, (h_q + 2 h_m)(w_q + 2 w_m) bidirectional), the
survey's O(N m); O(N d) memory: computed through `core.block_sparse` (online softmax over the kept
key blocks, scores recomputed in backward), no N x N tensor on any path.

**How the pattern is computed** (one layout, from which `dense_mask(N)` is derived too):

- 1-D: blocks of b = l_q tokens; query block J attends key blocks J - ceil(l_m / l_q) .. J (causal)
  or .. J + ceil(l_m / l_q) (bidirectional). When l_q divides l_m (the default 128 / 256) the memory
  is exactly those blocks: one call, causality as the primitive's element rule, and a band of blocks,
  which the primitive reads through strided views without copies. Otherwise the partial edge block is
  cut by the primitive's band rule on per-token positions: every query carries its block's start
  J l_q as its position, so the band [start - l_m, start + l_q - 1 + l_m] is exactly the memory
  (bidirectional, one call); causal then needs two calls merged by their log-sum-exp: the own block
  (causal on the true positions) and the l_m positions before it (band on the block starts).
- 2-D: the image is cut into sub-tiles of h_b x w_b = gcd(h_q, h_m) x gcd(w_q, w_m) pixels (a tile
  divides both the query block and the flange, so every memory is exactly a union of sub-tiles: no
  element rule is needed to cut the flange); tokens are permuted into sub-tile order (each sub-tile
  one contiguous block of b = h_b w_b tokens; the grid is padded to whole sub-tiles, the padding a
  masked key), and each query sub-tile attends the key sub-tiles covering its query block's memory.
  Causality uses the primitive's causal rule on the *original raster positions* passed with the
  permuted tokens, so it is exact in raster order. Defaults (16, 16) / (16, 32) give sub-tiles of
  16 x 16 = the query block, b = 256: 10 key blocks per query block causal, 15 bidirectional. Each
  layout row lists its used key blocks first and the layout keeps only as many slots as the fullest
  (border-clipped) memory, since the primitive computes every slot: a 32 x 32 image (CIFAR) has 4.
- Dense limit (2-D): when every memory covers the whole image (every earlier pixel when causal) -- a
  32 x 32 image (CIFAR, LRA's Image and Pathfinder) with the default blocks and flange -- the pattern
  is dense attention and is computed by the fused SDPA kernel instead (same pattern, same
  `dense_mask`; causal with padding keeps the block path, which needs no N x N mask).
- Leading tokens (2-D, bidirectional): with `shape` given, N must be H W plus g >= 0 leading tokens
  outside the grid (a classifier's CLS token: N = 1 + H W; see `models.classifier`). They are global:
  they attend to every key (one small dense SDPA call of g queries) and every pixel attends them (a
  second block-sparse call of the pixels over the g keys, merged with the local part by log-sum-exp
  with `merge_by_lse`). Causal 2-D takes no leading tokens (in raster-order generation a prefix
  N < H W is a partial image, so a leading count could not be told from N): N <= H W there, and the
  sequence is the raster order of the image or a prefix of it while generating. Any other N raises.

Decisions:
- Defaults. 1-D: l_q = 128, l_m = 256 (the project's brief; tensor2tensor's image_transformer_base
  has block_length 256, block_width 128). 2-D: `query_shape=(16, 16)`, `memory_flange=(16, 32)`,
  tensor2tensor's image_transformer2d_base defaults: the paper's own CIFAR-10 2-D setting could not be
  verified (`SURVEY.md`: only the t2t defaults were found; t2t's `imagetransformer2d_base_8l_8_32_big`
  "for cifar 10" uses (8, 16) / (0, 32), a variant we do not know to be the paper's).
- Causal 2-D order. The paper generates 2-D images block by block ("block raster" order; t2t's mask
  lets a query see its whole left flange and nothing of its right flange). The project's sequences
  are in image raster order (the models' data_shape convention) and causality is checked in sequence
  order, so here the memory rectangle is masked in raster order: a query sees the rows above it in
  the whole memory (left and right flanges included) and, in its own row, the columns before it.
- `query_block`/`memory` apply to 1-D only and `query_shape`/`memory_flange` to 2-D only: a value
  other than the default for the mode not in use raises instead of being ignored.
- `memory_flange` entries may be 0 (no flange on that axis); a flange that shares no large divisor
  with the query shape gives small sub-tiles (exact, but slow): prefer multiples of the query shape.

Decoding (causal): a `PositionedKVCache` of only the keys a future query's memory can reach: 1-D the
positions >= J l_q - l_m for the next query's block J (at most l_q + l_m - 1 keys), 2-D the rows
>= R h_q - h_m for the next query's block row R (at most (h_q + h_m) W keys, the flange rows),
bounded whatever N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core import AttentionLayer, PositionedKVCache, dense_attention
from ..core import options as opt
from ..core.block_sparse import (NO_BLOCK, BlockLayout, block_sparse_attention, global_blocks, merge_by_lse,
                                 window_blocks)
from ..registry import Card, register

DEFAULT_QUERY_SHAPE = (16, 16)
DEFAULT_MEMORY_FLANGE = (16, 32)
DEFAULT_QUERY_BLOCK = 128
DEFAULT_MEMORY = 256


@dataclass(frozen=True)
class _Grid:
    """The 2-D layout of one call: the pixels of `rows` image rows (all H, or those a causal prefix
    covers) permuted into sub-tile order.

    order:   (Np,) long: the raster pixel index of each permuted token, -1 for grid padding
    inverse: (n_pix,) long: the permuted slot of each pixel
    layout:  the block layout over the Np permuted tokens (raster positions when causal)
    leading: g, the tokens before the grid
    dense:   every memory covers the whole image (every earlier pixel when causal), e.g. a 32 x 32 image
             with the default 16 x 16 blocks and (16, 32) flange
    """

    order: Tensor
    inverse: Tensor
    layout: BlockLayout
    leading: int
    dense: bool  # the pattern is all pairs (all earlier pairs when causal)


@register(
    Card(
        name="image_transformer",
        title="Image Transformer",
        paper="Parmar et al., Image Transformer, ICML 2018 (arXiv 1802.05751)",
        year=2018,
        complexity="O(N m)",
        classes=("FP",),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=True,
        test_options={"query_block": 4, "memory": 6},
    )
)
class ImageTransformerAttention(AttentionLayer):
    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool = False,
        *,
        query_block: int = DEFAULT_QUERY_BLOCK,
        memory: int = DEFAULT_MEMORY,
        shape: tuple[int, int] | None = None,
        query_shape: tuple[int, int] = DEFAULT_QUERY_SHAPE,
        memory_flange: tuple[int, int] = DEFAULT_MEMORY_FLANGE,
    ) -> None:
        super().__init__(dim, heads, causal)
        name = self.card.name
        self.query_block = opt.positive_int(name, "query_block", query_block, what="l_q, the 1-D query block")
        self.memory = opt.int_in_range(name, "memory", memory, 0)
        self.query_shape = opt.positive_int_tuple(name, "query_shape", query_shape, length=2)
        self.memory_flange = _flange(name, memory_flange)
        self.shape = None if shape is None else opt.positive_int_tuple(name, "shape", shape, length=2)
        if self.shape is None:
            unused = [(o, v, d) for o, v, d in (("query_shape", self.query_shape, DEFAULT_QUERY_SHAPE),
                                                ("memory_flange", self.memory_flange, DEFAULT_MEMORY_FLANGE)) if v != d]
            mode, fix = "1-D (shape=None)", "give shape=(H, W) for 2-D local attention"
        else:
            unused = [(o, v, d) for o, v, d in (("query_block", self.query_block, DEFAULT_QUERY_BLOCK),
                                                ("memory", self.memory, DEFAULT_MEMORY)) if v != d]
            mode, fix = f"2-D (shape={self.shape})", "use query_shape / memory_flange, or shape=None for 1-D"
        if unused:
            option, value, default = unused[0]
            raise ValueError(f"{name}: {option}={value!r} has no effect in {mode} attention; allowed: the "
                             f"default {option}={default!r} ({fix})")
        if self.shape is not None:
            (hq, wq), (hm, wm) = self.query_shape, self.memory_flange
            self.tile = (math.gcd(hq, hm), math.gcd(wq, wm))  # sub-tile dividing query block and flange

    # ------------------------------------------------------------------ 1-D layouts
    def _layouts_1d(self, n: int, device=None) -> list[BlockLayout]:
        """The block layouts whose union is the 1-D memory pattern (one, or two when causal and l_q does
        not divide l_m; disjoint key sets)."""
        lq, lm = self.query_block, self.memory
        nq, reach = -(-n // lq), -(-lm // lq)  # query blocks; key blocks the memory spans before (after)
        if lm % lq == 0:
            blocks = window_blocks(nq, reach, 0 if self.causal else reach, device=device)
            return [BlockLayout(lq, blocks, causal=self.causal)]
        starts = torch.arange(n, device=device) // lq * lq  # (N,): each query's block start J l_q
        if not self.causal:
            return [BlockLayout(lq, window_blocks(nq, reach, reach, device=device), query_positions=starts,
                                band=(lm, lq - 1 + lm))]
        own = BlockLayout(lq, window_blocks(nq, 0, 0, device=device), causal=True)
        before = BlockLayout(lq, window_blocks(nq, reach, -1, device=device), query_positions=starts, band=(lm, 0))
        return [own, before]

    # ------------------------------------------------------------------ 2-D layout
    def _leading(self, n: int) -> int:
        """g = N - H W, checked: N >= H W bidirectional; causal N <= H W (g = 0, a raster prefix)."""
        H, W = self.shape
        if self.causal:
            if n > H * W:
                raise ValueError(
                    f"{self.card.name}: shape={self.shape} holds {H * W} pixels, got a sequence of N={n}; allowed: "
                    f"causal 2-D attention takes the raster order of the image or a prefix of it, N <= {H * W} "
                    "(no leading tokens when causal)")
            return 0
        if n < H * W:
            raise ValueError(
                f"{self.card.name}: shape={self.shape} needs N = {H * W} pixels plus any leading tokens (a CLS "
                f"token: N = {H * W + 1}), got N={n}; allowed: N >= {H * W}")
        return n - H * W

    def _grid(self, n: int, device=None) -> _Grid:
        H, W = self.shape
        (hq, wq), (hm, wm), (hb, wb) = self.query_shape, self.memory_flange, self.tile
        g = self._leading(n)
        pixels = n - g
        rows = H if not self.causal else -(-pixels // W)  # a causal prefix covers only its rows
        nr, nc = -(-rows // hb), -(-W // wb)  # sub-tiles down and across
        # permuted order: sub-tiles row-major, pixels raster inside each sub-tile
        r = (torch.arange(nr, device=device)[:, None, None, None] * hb
             + torch.arange(hb, device=device)[None, None, :, None])  # (nr, 1, hb, 1)
        c = (torch.arange(nc, device=device)[None, :, None, None] * wb
             + torch.arange(wb, device=device)[None, None, None, :])  # (1, nc, 1, wb)
        raster = r * W + c  # (nr, nc, hb, wb)
        real = (r < rows) & (c < W) & (raster < pixels)
        order = torch.where(real, raster, -1).reshape(-1)  # (Np,)
        inverse = torch.empty(pixels, dtype=torch.long, device=device)
        inverse[order[order >= 0]] = torch.nonzero(order >= 0).squeeze(-1)
        # key sub-tiles of each query sub-tile (i, j): its query block's memory, in sub-tile units
        i = torch.arange(nr, device=device)[:, None]  # (nr, 1)
        j = torch.arange(nc, device=device)[None, :]  # (1, nc)
        row_lo = (i * hb // hq * hq - hm) // hb  # (nr, 1): first memory row, in sub-tiles
        row_hi = i + 1 if self.causal else ((i * hb // hq + 1) * hq + hm) // hb  # exclusive
        col_lo = (j * wb // wq * wq - wm) // wb  # (1, nc)
        col_hi = ((j * wb // wq + 1) * wq + wm) // wb
        span_r = (hq + (hm if self.causal else 2 * hm)) // hb  # most memory sub-tile rows
        span_c = (wq + 2 * wm) // wb
        kr = row_lo[..., None, None] + torch.arange(span_r, device=device)[:, None]  # (nr, 1, span_r, 1)
        kc = col_lo[..., None, None] + torch.arange(span_c, device=device)[None, :]  # (1, nc, 1, span_c)
        inside = ((kr >= 0) & (kr < row_hi.clamp(max=nr)[..., None, None])
                  & (kc >= 0) & (kc < col_hi.clamp(max=nc)[..., None, None]))  # (nr, nc, span_r, span_c)
        blocks = torch.where(inside, kr * nc + kc, NO_BLOCK).reshape(1, nr * nc, span_r * span_c)
        # used slots first, then only as many slots as the fullest row: the primitive computes every slot,
        # and memories clipped at the border (all of them on a small image) would waste the empty ones
        used = (blocks >= 0).sum(-1)  # (1, nr nc)
        blocks = blocks.gather(-1, torch.sort((blocks < 0).to(torch.int8), dim=-1, stable=True).indices)
        blocks = blocks[..., : max(1, int(used.max()))]
        # every memory the whole image (every earlier pixel when causal): the pattern is dense attention
        whole = nr * nc if not self.causal else (torch.arange(nr, device=device)[:, None] + 1) * nc
        dense = bool((used.view(nr, nc) == whole).all())
        positions = None
        if self.causal:  # the original raster positions (padding clamped to a nearby pixel; masked anyway)
            positions = (r.clamp(max=H - 1) * W + c.clamp(max=W - 1)).expand(nr, nc, hb, wb).reshape(-1)
        layout = BlockLayout(hb * wb, blocks, query_positions=positions, key_positions=positions, causal=self.causal)
        return _Grid(order, inverse, layout, g, dense)

    # ------------------------------------------------------------------ the pattern
    def dense_mask(self, n: int) -> Tensor:
        """(N, N) bool, derived from the layouts the layer computes with (for tests and references)."""
        if self.shape is None:
            masks = [layout.dense_mask(n) for layout in self._layouts_1d(n)]
            return masks[0] if len(masks) == 1 else masks[0] | masks[1]
        grid = self._grid(n)
        g, order = grid.leading, grid.order
        permuted = grid.layout.dense_mask(order.numel())  # (Np, Np) in sub-tile order
        real = order >= 0
        rows = order[real] + g
        pattern = torch.zeros(n, n, dtype=torch.bool)
        pattern[rows[:, None], rows[None, :]] = permuted[real][:, real]
        pattern[:g, :] = True  # leading tokens: global (bidirectional only; causal has none)
        pattern[:, :g] = True
        return pattern

    # ------------------------------------------------------------------ the core
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: PositionedKVCache | None):
        """q, k, v (B, H, n, d) -> (out (B, H, n, d), decoding state or None)."""
        full = self._full_1d if self.shape is None else self._full_2d
        if not self.causal:
            return full(q, k, v, mask), None
        if self.shape is not None:
            self._leading((0 if state is None else state.length) + q.shape[-2])  # N <= H W
        return self._attend_cached_pattern(q, k, v, mask, state, self._allowed, self._still_needed, full=full)

    def _full_1d(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        parts = [block_sparse_attention(q, k, v, layout, mask) for layout in self._layouts_1d(q.shape[-2], q.device)]
        out, lse = parts[0]
        if len(parts) == 2:
            out, lse = merge_by_lse(out, lse, *parts[1])
        return out  # (B, H, N, d)

    def _full_2d(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        B, H, n, d = q.shape
        grid = self._grid(n, q.device)
        if grid.dense and not (self.causal and mask is not None):  # (causal + padding would need an N x N mask)
            return dense_attention(q, k, v, key_mask=mask, causal=self.causal)  # the same pattern, fused SDPA
        g, order = grid.leading, grid.order
        source = order.clamp(min=0) + g  # (Np,): padding reads pixel 0 (a masked key; its output is dropped)
        permute = lambda t: t.index_select(2, source)  # noqa: E731  (B, H, Np, d) in sub-tile order
        key_mask = (order >= 0)[None].expand(B, -1)  # (B, Np)
        if mask is not None:
            key_mask = key_mask & mask[:, source]
        queries = permute(q)
        out, lse = block_sparse_attention(queries, permute(k), permute(v), grid.layout, key_mask)  # (B, H, Np, d)
        if g:  # every pixel also attends the g leading tokens: a second call, merged by log-sum-exp
            b = min(64, max(8, g))
            every = BlockLayout(b, global_blocks(-(-order.numel() // b), range(-(-g // b)), device=q.device))
            lead_mask = None if mask is None else mask[:, :g]
            lead_out, lead_lse = block_sparse_attention(queries, k[:, :, :g], v[:, :, :g], every, lead_mask)
            out, _ = merge_by_lse(out, lse, lead_out, lead_lse)
        pixels = out.index_select(2, grid.inverse)  # (B, H, n - g, d) in raster order
        if not g:
            return pixels
        leading = dense_attention(q[:, :, :g], k, v, key_mask=mask)  # (B, H, g, d): global queries see all
        return torch.cat([leading.to(pixels.dtype), pixels], dim=2)  # (B, H, N, d)

    # ------------------------------------------------------------------ decoding rules
    def _allowed(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """The element rule (1, n, m) of the causal pattern, for decoding over the cache."""
        qp, kp = query_positions[:, None], key_positions[None, :]  # (n, 1), (1, m)
        if self.shape is None:
            start = qp // self.query_block * self.query_block
            return ((kp >= start - self.memory) & (kp <= qp))[None]
        W = self.shape[1]
        (hq, wq), (hm, wm) = self.query_shape, self.memory_flange
        top, left = qp // W // hq * hq, qp % W // wq * wq  # the query block's first row and column
        rk, ck = kp // W, kp % W
        inside = (rk >= top - hm) & (rk < top + hq) & (ck >= left - wm) & (ck < left + wq + wm)
        return (inside & (kp <= qp))[None]

    def _still_needed(self, key_positions: Tensor, next_position: int) -> Tensor:
        """(m,) bool: the cached keys a query at >= next_position can still reach."""
        if self.shape is None:
            return key_positions >= next_position // self.query_block * self.query_block - self.memory
        W, (hq, _), (hm, _) = self.shape[1], self.query_shape, self.memory_flange
        return key_positions // W >= next_position // W // hq * hq - hm

    def extra_repr(self) -> str:
        if self.shape is None:
            return f"{super().extra_repr()}, query_block={self.query_block}, memory={self.memory}"
        return (f"{super().extra_repr()}, shape={self.shape}, query_shape={self.query_shape}, "
                f"memory_flange={self.memory_flange}")


def _flange(name: str, value: Any) -> tuple[int, int]:
    """(h_m, w_m), two ints >= 0."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok:
        raise ValueError(f"{name}: memory_flange must be a tuple of 2 ints >= 0 (rows above, columns on each side), "
                         f"got {value!r}; allowed: e.g. {DEFAULT_MEMORY_FLANGE}")
    return tuple(int(v) for v in value)
