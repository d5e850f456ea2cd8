"""Block-sparse attention: exact softmax attention over a layout of key blocks, recomputed in backward.

The shared engine of the fixed-pattern mechanisms (Sparse Transformer, Longformer, BigBird, Image
Transformer, ETC) and of the learnable-pattern ones once they have sorted or routed their tokens
(Reformer, Routing, Sinkhorn). For query i, with A(i) the keys it may attend,

    out_i = sum_{j in A(i)} exp(s_ij - lse_i) v_j,    s_ij = scale q_i . k_j,
    lse_i = log sum_{j in A(i)} exp(s_ij)             (-inf, and out_i = 0, when A(i) is empty)

**The layout** (`BlockLayout`). Queries and keys are cut into blocks of b tokens (the last block of
each padded: any Nq, Nk >= 1 works; Nq may differ from Nk, e.g. summary keys appended); query block I
attends the key blocks listed in its S slots,

    key_blocks[h, I, s]   (H or 1, nq, S) long, or (B or 1, H or 1, nq, S) for per-item layouts,

with NO_BLOCK (-1) in unused slots, so rows may hold different numbers of blocks; a block listed
twice in a row counts once. Inside the kept blocks, element-level rules decide, all from per-token
integer positions (default: the row index), so that a mechanism may pass its tokens in any order
(a transposed/strided view, a bucket-sorted order) and still mask on the *original* positions:

    j in A(i)  iff  block(j) in key_blocks[block(i)]                     the layout
                    and key j is real (j < Nk and key_mask[j])            padding
                    and (not causal or  pos_k(j) <= pos_q(i))             causality
                    and (band is None or -left <= pos_k(j) - pos_q(i) <= right)   band (inclusive)

(the half-open window pos_q - w < pos_k <= pos_q + w is band = (w - 1, w)). Positions may be given
per head or per item, (H, N) or (B, H, N), and so may the key mask, (B, H, Nk).
`BlockLayout.dense_mask(Nq, Nk)` derives the equivalent dense pattern (everything but the key mask)
for tests and references, so the pattern a mechanism documents is the one computed here.

**Cost.** O(Nq S b d) time: per query block two products of b x d by d x S b forward (4 b S b d
FLOPs), five backward (the scores recomputed, then dV, dP, dQ, dK); O(N d) memory, no N x N tensor.
Query blocks are processed in groups of G, with one batched product (B, H, G, b, d) x (B, H, G, d,
C b) per step; when one block's row of S b keys exceeds the budget, its slots are processed in chunks
of C with an online softmax (running max, running sum, running output). Transients are bounded by
max(`score_budget`, B H b^2) score elements (plus the gathered keys and values of one group),
whatever N, and live in per-call buffers reused by every group; k and v are read in place when
contiguous with N a multiple of b, else copied once (O(N d)). Key blocks are gathered for the group only
(`index_select`); for a band of blocks (slot s of block I is block I + s + c) interior groups read
them in place, through overlapping strided views of the key table, with no copy at all. Element
masks are added only on the slots where some pair of blocks is not wholly allowed (for a band, its
two edge slots). Autograd keeps q, k, v, out and lse only (plus the layout's integers on the
context, O(nq S + N)); the backward pass recomputes each group's scores from q, k and lse
(FlashAttention's idea at block granularity, in plain PyTorch) and scatters the key/value gradients
back with one `index_add_` per group. Double backward is not supported.

Precision: scores, softmax and lse run in float32 for float16/bfloat16 inputs (float64 stays
float64); `out` is returned in the input dtype, `lse` in the compute dtype. Outputs and input
gradients are stored heads-last (see `core.heads`), so the layer's head merge is a view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blocking import pad_to_multiple
from .heads import heads_last

NO_BLOCK = -1  # an unused slot of `BlockLayout.key_blocks`
NEG_INF = float("-inf")
LOG2_E, LN_2 = 1.0 / math.log(2.0), math.log(2.0)
#: positions must lie in (-POSITION_LIMIT, POSITION_LIMIT); band extents are clipped to 2 POSITION_LIMIT
POSITION_LIMIT = 2**26
_ANY_DISTANCE = 2 * POSITION_LIMIT  # more than any |pos_k - pos_q|: "no limit"
_BLOCKED = 2**30  # the code of a key nobody may attend (see `_plan`): outside every band
DEFAULT_SCORE_BUDGET = 2**20  # elements of the transient score tensor per group (4 MiB in float32)


# ----------------------------------------------------------------------------- the layout
@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block attends, and the element rules applied inside them.

    block_size:      b, tokens per block (queries and keys alike)
    key_blocks:      (H|1, nq, S) or (B|1, H|1, nq, S) long: the key blocks of query block I, NO_BLOCK
                     (-1) for an unused slot. Repeats in a row are dropped (set to -1) on construction.
                     At a call, rows past ceil(Nq / b) are ignored and block ids >= ceil(Nk / b)
                     (keys past the end) are never attended, so a layout sized for a maximum length
                     serves every shorter one.
    query_positions: (Nq,), (H|1, Nq) or (B|1, H|1, Nq) integer positions of the query rows, or None
                     for 0..Nq-1; only read by `causal` and `band`
    key_positions:   the same for the keys (None: 0..Nk-1)
    causal:          keep only pos_k <= pos_q
    band:            (left, right) >= 0: keep only pos_q - left <= pos_k <= pos_q + right; None: no limit
    """

    block_size: int
    key_blocks: Tensor
    query_positions: Tensor | None = None
    key_positions: Tensor | None = None
    causal: bool = False
    band: tuple[int, int] | None = None

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block layout: block_size must be >= 1, got {self.block_size}")
        if self.key_blocks.dim() not in (3, 4) or self.key_blocks.dtype.is_floating_point:
            raise ValueError(
                "block layout: key_blocks must be an integer tensor (H|1, nq, S) or (B|1, H|1, nq, S), "
                f"got {tuple(self.key_blocks.shape)} {self.key_blocks.dtype}"
            )
        if self.band is not None and (len(self.band) != 2 or min(self.band) < 0):
            raise ValueError(f"block layout: band must be (left, right) with both >= 0, got {self.band}")
        for name in ("query_positions", "key_positions"):
            positions = getattr(self, name)
            if positions is not None and (positions.dim() not in (1, 2, 3) or positions.dtype.is_floating_point):
                raise ValueError(f"block layout: {name} must be an integer tensor (N,), (H, N) or (B, H, N)")
        object.__setattr__(self, "key_blocks", _drop_repeats(self.key_blocks.long()))

    # -- constructors
    @classmethod
    def banded(cls, block_size: int, num_queries: int, left: int, right: int, *, causal: bool = False) -> BlockLayout:
        """The band pos_q - left <= pos_k <= pos_q + right (right = 0 when causal) on the natural order
        (Longformer's sliding window, local attention): query block I attends key blocks
        I - ceil(left / b) .. I + ceil(right / b)."""
        right = 0 if causal else right
        before, after = -(-left // block_size), -(-right // block_size)
        blocks = window_blocks(-(-num_queries // block_size), before, after)
        return cls(block_size, blocks, causal=causal, band=(left, right))

    @classmethod
    def from_lists(cls, block_size: int, rows: Sequence, **options) -> BlockLayout:
        """From explicit lists: rows[I] = the key blocks of query block I (shared by all heads), or
        rows[h][I] per head; shorter rows are padded with NO_BLOCK."""
        per_head = any(isinstance(entry, Sequence) for row in rows for entry in row)
        heads = rows if per_head else [rows]
        nq = max(len(h) for h in heads)
        width = max([len(r) for h in heads for r in h] + [1])
        blocks = torch.full((len(heads), nq, width), NO_BLOCK, dtype=torch.long)
        for h, head_rows in enumerate(heads):
            for i, row in enumerate(head_rows):
                blocks[h, i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        return cls(block_size, blocks, **options)

    # -- shape
    @property
    def num_slots(self) -> int:
        return self.key_blocks.shape[-1]

    def dense_mask(self, num_queries: int, num_keys: int | None = None) -> Tensor:
        """The allowed pairs as a dense bool tensor (key mask excluded): (Nq, Nk) when nothing differs
        across heads or items, (H, Nq, Nk) when something is per head, (B, H, Nq, Nk) when per item.
        For tests and references only: O(Nq Nk)."""
        num_keys = num_queries if num_keys is None else num_keys
        b = self.block_size
        nq, nk = -(-num_queries // b), -(-num_keys // b)
        blocks = _layout_rows(self.key_blocks, nq, nk)  # (Bl, Hl, nq, S), -1 = none
        member = torch.zeros(blocks.shape[:-1] + (nk + 1,), dtype=torch.bool, device=blocks.device)
        member.scatter_(-1, torch.where(blocks < 0, nk, blocks), True)  # (Bl, Hl, nq, nk + 1)
        allowed = member[..., :nk].repeat_interleave(b, -2).repeat_interleave(b, -1)[..., :num_queries, :num_keys]
        if self.causal or self.band is not None:
            low, high = self._distance_limits()
            qpos = _positions(self.query_positions, num_queries, blocks.device)[..., :, None]  # (Bp, Hp, Nq, 1)
            kpos = _positions(self.key_positions, num_keys, blocks.device)[..., None, :]  # (Bp, Hp, 1, Nk)
            distance = kpos - qpos
            allowed = allowed & (distance >= low) & (distance <= high)  # (B?, H?, Nq, Nk)
        if allowed.shape[0] == 1:
            allowed = allowed[0]
            if allowed.shape[0] == 1:
                allowed = allowed[0]
        return allowed

    def _distance_limits(self) -> tuple[int, int]:
        """The allowed range [low, high] of pos_k - pos_q."""
        low, high = -_ANY_DISTANCE, _ANY_DISTANCE
        if self.band is not None:
            low, high = -min(self.band[0], _ANY_DISTANCE), min(self.band[1], _ANY_DISTANCE)
        if self.causal:
            high = min(high, 0)
        return low, high


def window_blocks(num_query_blocks: int, before: int, after: int, *, device=None) -> Tensor:
    """(1, nq, before + 1 + after) long: query block I attends I - before .. I + after (NO_BLOCK below 0;
    ids past the last key block are ignored at the call)."""
    rows = torch.arange(num_query_blocks, device=device)[:, None]  # (nq, 1)
    offsets = torch.arange(-before, after + 1, device=device)[None, :]  # (1, S)
    blocks = rows + offsets
    return blocks.masked_fill(blocks < 0, NO_BLOCK)[None]


def global_blocks(num_query_blocks: int, blocks: Sequence[int] | Tensor, *, device=None) -> Tensor:
    """(1, nq, g) long: every query block attends the same key blocks (BigBird/ETC's global blocks)."""
    ids = torch.as_tensor(blocks, dtype=torch.long, device=device).reshape(1, 1, -1)
    return ids.expand(1, num_query_blocks, ids.shape[-1]).clone()


def concat_slots(*parts: Tensor) -> Tensor:
    """Slots side by side: parts (H|1, nq, S_p) (or with a leading B|1) -> (.., nq, sum S_p), heads and
    items broadcast (e.g. a shared window next to per-head random blocks)."""
    width = max(p.dim() for p in parts)
    parts = [p.reshape((1,) * (width - p.dim()) + tuple(p.shape)) for p in parts]
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(lead + p.shape[-1:]) for p in parts], dim=-1)


def _drop_repeats(blocks: Tensor) -> Tensor:
    """Set every repeated block id of a row (after its first occurrence) to NO_BLOCK."""
    same = blocks[..., :, None] == blocks[..., None, :]  # (.., S, S)
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=blocks.device).tril(-1)  # slot t < s
    repeat = (same & earlier).any(-1) & (blocks >= 0)
    return blocks.masked_fill(repeat, NO_BLOCK) if repeat.any() else blocks


def _layout_rows(key_blocks: Tensor, nq: int, nk: int) -> Tensor:
    """(Bl, Hl, nq, S): the layout's first nq rows, ids outside [0, nk) as NO_BLOCK."""
    blocks = key_blocks if key_blocks.dim() == 4 else key_blocks[None]
    if blocks.shape[-2] < nq:
        raise ValueError(f"block layout: {blocks.shape[-2]} query-block rows for {nq} query blocks")
    blocks = blocks[..., :nq, :]
    return blocks.masked_fill((blocks < 0) | (blocks >= nk), NO_BLOCK)


def _positions(positions: Tensor | None, n: int, device) -> Tensor:
    """(Bp, Hp, n) int64 positions (default 0..n-1)."""
    if positions is None:
        return torch.arange(n, device=device)[None, None]
    if positions.shape[-1] != n:
        raise ValueError(f"block layout: positions of length {positions.shape[-1]} for a sequence of {n}")
    if positions.numel() and positions.abs().max() >= POSITION_LIMIT:
        raise ValueError(f"block layout: positions must lie in (-{POSITION_LIMIT}, {POSITION_LIMIT})")
    positions = positions.to(device=device, dtype=torch.long)
    return positions.reshape((1,) * (3 - positions.dim()) + tuple(positions.shape))


# ----------------------------------------------------------------------------- the call
@dataclass
class _Plan:
    """What one call derives from the layout and the key mask: integers (and a bias), O(nq S + N).

    Per-query-block tensors are (B, H, nq, ..); the key tables are head-major (B H nk, b, .), views of
    contiguous k and v.

    key_rows:     (B, H, nq, S) long: rows of the key table (row (i H + h) nk + J for block J of item i,
                  head h); an unused slot points at the item's block 0 (masked, and its gradient is 0)
    mask_rows:    (Bm, Hm, nq, S) long: rows of `key_codes`; None when nothing is ever masked
    key_codes:    (Bk Hk (nk + 1), b): with positional rules, int32 2 pos_k - (low + high), or _BLOCKED for
                  a key nobody attends (padding, key_mask False, and block nk, the unused slots' block);
                  without, the additive mask itself (0 or -inf) in the compute dtype
    query_codes:  (Bq, Hq, nq, b, 1) int32 2 pos_q, positional rules only. Then pair (i, j) is allowed iff
                  |key_code_j - query_code_i| <= width = high - low, i.e. low <= pos_k - pos_q <= high
    groups, slot_chunks: [(start, stop)] of query blocks and of slots, processed together
    masks:        per group, per slot chunk: None, or (slots, rows): the chunk's slots where some pair
                  needs an element mask (pairs of blocks wholly inside the rules need none: most of a
                  band is never masked; None for all of them) and their `mask_rows` (Bm, Hm, G, n)
    band_offset:  c when every used slot s of query block I is key block I + s + c (a band of blocks);
                  then `shifted` groups (all their windows inside the keys) read key blocks through
                  overlapping strided views of the key table instead of gathering copies
    """

    block: int
    nq: int
    nk: int
    key_rows: Tensor
    groups: list[tuple[int, int]]
    slot_chunks: list[tuple[int, int]]
    masks: list[list[tuple[list[int] | None, Tensor] | None]]
    shifted: list[bool]
    band_offset: int = 0
    mask_rows: Tensor | None = None
    key_codes: Tensor | None = None
    query_codes: Tensor | None = None
    width: int = 0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocked_rows(x: Tensor, b: int, value, extra: int = 0) -> Tensor:
    """(.., n) -> (.., ceil(n / b) + extra, b), padded with `value`."""
    x, _ = pad_to_multiple(x, b, dim=-1, value=value)
    return torch.nn.functional.pad(x, (0, extra * b), value=value).unflatten(-1, (-1, b))


def _block_mins_maxs(values: Tensor, invalid: Tensor) -> tuple[Tensor, Tensor]:
    """Per block (.., nb, b) -> (.., nb): the min and max over valid entries (+-2^40 when none)."""
    return values.masked_fill(invalid, 2**40).amin(-1), values.masked_fill(invalid, -(2**40)).amax(-1)


def _band_offset(blocks: Tensor) -> int | None:
    """c if every used slot s of query block I is key block I + s + c, else None."""
    nq, S = blocks.shape[-2:]
    used = blocks >= 0
    diagonal = torch.arange(nq, device=blocks.device)[:, None] + torch.arange(S, device=blocks.device)  # I + s
    offsets = (blocks - diagonal)[used]
    if offsets.numel() == 0 or not bool((offsets == offsets[0]).all()):
        return None
    return int(offsets[0])


def _plan(q: Tensor, k: Tensor, layout: BlockLayout, key_mask: Tensor | None, score_budget: int) -> _Plan:
    B, H, num_queries, _ = q.shape
    num_keys = k.shape[-2]
    b, device = layout.block_size, q.device
    nq, nk = -(-num_queries // b), -(-num_keys // b)
    blocks = _layout_rows(layout.key_blocks.to(device), nq, nk)  # (Bl, Hl, nq, S), -1 = none
    if blocks.shape[0] not in (1, B) or blocks.shape[1] not in (1, H):
        raise ValueError(f"block layout: key_blocks {tuple(layout.key_blocks.shape)} for batch {B} and {H} heads")
    S = blocks.shape[-1]
    item, head = torch.arange(B, device=device).view(B, 1, 1, 1), torch.arange(H, device=device).view(1, H, 1, 1)
    key_rows = ((item * H + head) * nk + blocks.clamp(min=0)).expand(B, H, nq, S)  # (B, H, nq, S)

    chunk = max(1, min(S, score_budget // max(1, B * H * b * b)))
    group = max(1, score_budget // max(1, B * H * b * chunk * b))
    groups = [(i, min(i + group, nq)) for i in range(0, nq, group)]
    slot_chunks = [(s, min(s + chunk, S)) for s in range(0, S, chunk)]
    offset = _band_offset(blocks)
    shifted = [offset is not None and g0 + offset >= 0 and g1 - 1 + offset + S <= nk for g0, g1 in groups]
    plan = _Plan(b, nq, nk, key_rows, groups, slot_chunks, [[None] * len(slot_chunks) for _ in groups], shifted,
                 band_offset=offset or 0)

    positional = layout.causal or layout.band is not None
    masked_keys = key_mask is not None or num_keys % b != 0 or bool((blocks < 0).any())
    if not positional and not masked_keys:
        return plan
    # keys nobody attends: padding, key_mask False, and the extra block nk that unused slots point at
    blocked = torch.zeros(1, 1, num_keys, dtype=torch.bool, device=device)
    if key_mask is not None:
        km = key_mask if key_mask.dim() == 3 else key_mask[:, None, :]  # (B, 1|H, Nk)
        blocked = ~km.to(device=device, dtype=torch.bool)
    blocked = _blocked_rows(blocked, b, True, extra=1)  # (Bk, Hk, nk + 1, b)
    unused = torch.where(blocks < 0, nk, blocks)  # (Bl, Hl, nq, S)

    def per_pair(stat: Tensor) -> Tensor:
        """A per-key-block statistic (B?, H?, nk + 1) at every (query block, slot): (B?, H?, nq, S)."""
        lead = torch.broadcast_shapes(stat.shape[:2], unused.shape[:2])
        return torch.gather(stat[:, :, None, :].expand(*lead, nq, nk + 1), -1, unused.expand(*lead, nq, S))

    whole = ~per_pair(blocked.any(-1))  # (.., nq, S): the slot's block is used and all its keys are real
    low, high = layout._distance_limits()
    if positional:
        kpos = _blocked_rows(_positions(layout.key_positions, num_keys, device), b, 0, extra=1)  # (Bp, Hp, nk+1, b)
        kpos, blocked = torch.broadcast_tensors(kpos, blocked)
        qpos = _positions(layout.query_positions, num_queries, device)  # (Bq, Hq, Nq)
        qpos_blocks = _blocked_rows(qpos, b, 0)  # (Bq, Hq, nq, b)
        padding = _blocked_rows(torch.zeros_like(qpos, dtype=torch.bool), b, True)
        q_min, q_max = _block_mins_maxs(qpos_blocks, padding)  # (Bq, Hq, nq): over real query rows only
        k_min, k_max = _block_mins_maxs(kpos, blocked)  # (Bk, Hk, nk + 1)
        whole = whole & (per_pair(k_max) - q_min[..., None] <= high) & (per_pair(k_min) - q_max[..., None] >= low)
        key_codes = torch.where(blocked, _BLOCKED, 2 * kpos - (low + high)).to(torch.int32)
        plan.query_codes = (2 * qpos_blocks).to(torch.int32)[..., None]  # (Bq, Hq, nq, b, 1)
        plan.width = high - low
    else:
        bias = torch.zeros((), dtype=_compute_dtype(q.dtype), device=device)
        key_codes = bias.masked_fill(blocked, NEG_INF)  # (Bk, Hk, nk + 1, b): the additive mask itself
    Bk, Hk = key_codes.shape[:2]
    plan.key_codes = key_codes.reshape(-1, b)  # (Bk Hk (nk + 1), b)
    table_item = torch.arange(Bk, device=device).view(Bk, 1, 1, 1)
    table_head = torch.arange(Hk, device=device).view(1, Hk, 1, 1)
    plan.mask_rows = (table_item * Hk + table_head) * (nk + 1) + unused  # (Bm, Hm, nq, S)

    needs_mask = (~whole).flatten(0, 1).any(0)  # (nq, S): some pair of blocks is not wholly allowed
    for gi, (g0, g1) in enumerate(groups):
        per_slot = needs_mask[g0:g1].any(0).tolist()  # (S,)
        for ci, (s0, s1) in enumerate(slot_chunks):
            slots = [s - s0 for s in range(s0, s1) if per_slot[s]]
            if 2 * len(slots) > s1 - s0:  # most of the chunk: mask all of it in one pass
                plan.masks[gi][ci] = (None, plan.mask_rows[:, :, g0:g1, s0:s1])
            elif slots:
                plan.masks[gi][ci] = (slots, plan.mask_rows[:, :, g0:g1, [s0 + s for s in slots]])
    return plan


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    *,
    score_budget: int = DEFAULT_SCORE_BUDGET,
) -> tuple[Tensor, Tensor]:
    """Softmax attention restricted to `layout` (see the module doc) -> (out, lse).

    q: (B, H, Nq, d); k: (B, H, Nk, d); v: (B, H, Nk, dv), one floating dtype; key_mask: (B, Nk) or
    (B, H, Nk) bool, True = real key; scale defaults to 1 / sqrt(d). Returns out (B, H, Nq, dv) in the
    inputs' dtype, stored heads-last, and lse (B, H, Nq) in float32 (float64 for float64 inputs), -inf
    where a query has no allowed key (its output is 0). Both are differentiable (lse too, for
    `merge_by_lse`). `score_budget` bounds the elements of each transient score tensor (a speed /
    memory trade-off only).
    """
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"block-sparse attention: q, k, v must be (B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype or not q.dtype.is_floating_point:
        raise ValueError(
            f"block-sparse attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if key_mask is not None and (
        key_mask.dim() not in (2, 3) or key_mask.shape[0] != q.shape[0] or key_mask.shape[-1] != k.shape[-2]
        or (key_mask.dim() == 3 and key_mask.shape[1] not in (1, q.shape[1]))
    ):
        raise ValueError(f"block-sparse attention: key_mask {tuple(key_mask.shape)} for keys {tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = _plan(q, k, layout, key_mask, score_budget)
    return _BlockSparseAttention.apply(q, k, v, plan, scale)


def merge_by_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two attentions of the same queries over disjoint key sets into the one over their union:

        lse = log(exp(lse_a) + exp(lse_b)),   out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

    out_*: (..., N, dv), lse_*: (..., N). Rows empty in both give out = 0, lse = -inf (no NaN, in the
    gradient either). Plain autograd; computed in lse's dtype, out returned in out_a's dtype."""
    compute = torch.promote_types(lse_a.dtype, lse_b.dtype)
    lse_a, lse_b = lse_a.to(compute), lse_b.to(compute)
    shift = torch.maximum(lse_a, lse_b).detach()  # any constant per row; the max keeps exp() <= 1
    shift = shift.masked_fill(shift == NEG_INF, 0.0)
    weight_a, weight_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)  # (..., N)
    total = weight_a + weight_b
    has_keys = total > 0
    safe_total = torch.where(has_keys, total, torch.ones_like(total))
    lse = torch.where(has_keys, shift + torch.log(safe_total), torch.full_like(total, NEG_INF))
    share_a, share_b = (weight_a / safe_total)[..., None], (weight_b / safe_total)[..., None]  # (..., N, 1)
    out = out_a.to(compute) * share_a + out_b.to(compute) * share_b
    return out.to(out_a.dtype), lse


# ----------------------------------------------------------------------------- the kernel
class _Workspace:
    """Scratch buffers of one pass, allocated by the first (largest) group and reused by the others:
    fresh buffers page-fault, and the products and gathers write into these with out=."""

    def __init__(self, dtype: torch.dtype, device):
        self.dtype, self.device, self.buffers = dtype, device, {}

    def __call__(self, name: str, *shape: int) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buffer[:numel].view(shape)


def _copy_blocks(out: Tensor, x: Tensor, first: int, scale: float | None = None) -> Tensor:
    """Blocks first .. first + G - 1 of x (B, H, N, f) into out (B, H, G, b, f), zero past N, times scale."""
    G, b, n = out.shape[2], out.shape[3], x.shape[2]
    start = first * b
    rows = max(0, min(G * b, n - start))
    flat = out.view(out.shape[0], out.shape[1], G * b, out.shape[-1])  # (B, H, G b, f)
    flat[:, :, :rows].copy_(x[:, :, start : start + rows])
    flat[:, :, rows:].zero_()
    return out if scale is None else out.mul_(scale)


def _key_table(x: Tensor, b: int, dtype: torch.dtype) -> Tensor:
    """x (B, H, N, f) as the head-major table of its blocks (B H nk, b, f) in `dtype`: a view when x is
    contiguous, of that dtype and N a multiple of b; otherwise one zero-padded copy."""
    B, H, n, f = x.shape
    if x.dtype == dtype and x.is_contiguous() and n % b == 0:
        return x.view(-1, b, f)
    table = x.new_empty(B, H, -(-n // b) * b, f, dtype=dtype)
    table[:, :, :n].copy_(x)
    table[:, :, n:].zero_()
    return table.view(-1, b, f)


class _KeyBlocks:
    """The key blocks of one group and slot chunk, as the second operand of batched products.

    Either a gathered copy (B, H, G, C b, f) (any layout), or, for a band of blocks, per (item, head)
    an overlapping strided view (G, C b, f) of the key table: no copy; `torch.bmm` reads it in place."""

    def __init__(self, table: Tensor, plan: _Plan, group: int, chunk: int, work: _Workspace, name: str):
        (g0, g1), (s0, s1), b = plan.groups[group], plan.slot_chunks[chunk], plan.block
        B, H, G, f = plan.key_rows.shape[0], plan.key_rows.shape[1], g1 - g0, table.shape[-1]
        if plan.shifted[group]:
            first = g0 + s0 + plan.band_offset  # key block of query block g0's first slot in the chunk
            step, base = b * f, table.storage_offset()
            self.views = [
                table.as_strided((G, (s1 - s0) * b, f), (step, f, 1), base + ((i * H + h) * plan.nk + first) * step)
                for i in range(B) for h in range(H)
            ]  # view g: key blocks first + g .. first + g + C - 1 of item i, head h, as (C b, f) rows
            self.gathered = None
        else:
            rows = plan.key_rows[:, :, g0:g1, s0:s1]  # (B, H, G, C)
            self.gathered = work(name, B, H, G, (s1 - s0) * b, f)  # (B, H, G, C b, f)
            torch.index_select(table, 0, rows.reshape(-1), out=self.gathered.view(-1, b, f))
            self.views = None

    def product(self, a: Tensor, out: Tensor, *, transpose: bool) -> Tensor:
        """a (B, H, G, x, y) @ blocks (or blocks^T) -> out (B, H, G, x, z)."""
        if self.gathered is not None:
            return torch.matmul(a, self.gathered.transpose(-1, -2) if transpose else self.gathered, out=out)
        a3, out3 = a.flatten(0, 1), out.flatten(0, 1)  # (B H, G, x, y) and (B H, G, x, z)
        for i, view in enumerate(self.views):
            torch.bmm(a3[i], view.transpose(1, 2) if transpose else view, out=out3[i])
        return out


def _heads_last_blocks(like: Tensor, nb: int, b: int) -> tuple[Tensor, Tensor]:
    """An uninitialised (B, H, nb b, f) tensor stored heads-last, and its (B, H, nb, b, f) view."""
    full = heads_last(like, nb * b)  # (B, H, nb b, f), stored (B, nb b, H, f)
    return full, full.unflatten(2, (nb, b))


def _mask_(scores: Tensor, plan: _Plan, group: int, chunk: int) -> Tensor:
    """Add the element mask (0 allowed, -inf not) to the scores (B, H, G, b, C b) of one group and slot
    chunk, in place, on the slots that need it."""
    mask = plan.masks[group][chunk]
    if mask is None:
        return scores
    slots, rows = mask  # rows: (Bm, Hm, G, n) of the masked slots
    Bm, Hm, G, n = rows.shape
    b, g0 = plan.block, plan.groups[group][0]
    codes = plan.key_codes.index_select(0, rows.reshape(-1)).view(Bm, Hm, G, 1, n * b)
    if plan.query_codes is None:
        bias = codes  # (Bm, Hm, G, 1, n b): the additive mask of the keys
    else:
        distance = codes - plan.query_codes[:, :, g0 : g0 + G]  # (B?, H?, G, b, n b): 2 (pos_k - pos_q) - (low + high)
        inside = distance.abs_().le_(plan.width).to(scores.dtype)
        bias = (inside - 1).div_(inside)  # 1 -> 0, 0 -> -inf (vectorised; masked_fill is slow here)
    if slots is None:
        return scores.add_(bias)
    by_slot, bias_by_slot = scores.unflatten(-1, (-1, b)), bias.unflatten(-1, (n, b))
    for i, s in enumerate(slots):
        by_slot[..., s, :].add_(bias_by_slot[..., i, :])
    return scores


def _not_inf(x: Tensor) -> Tensor:
    """-inf (a row with no key so far) -> 0, so that 2^(s - x) stays 0 instead of NaN."""
    return x.masked_fill(x == NEG_INF, 0.0)


class _BlockSparseAttention(torch.autograd.Function):
    """(out, lse) of block-sparse attention; saves q, k, v, out, lse and recomputes scores in backward.

    Scores are kept in base 2 (the queries carry scale log2(e)) and exponentiated with exp2: exp's
    vectorised kernel slows down several times on the -inf of masked pairs, exp2's does not.
    Backward, the gradients of the base-2 scores are ln(2) times those of the natural ones: ln(2) is
    folded into the copies of dO and D, and undone on dV (dQ and dK take the base-2 queries' scale).
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        compute = _compute_dtype(q.dtype)
        B, H, num_queries, d = q.shape
        b, dv = plan.block, v.shape[-1]
        k_table, v_table = _key_table(k, b, compute), _key_table(v, b, compute)  # (B H nk, b, d|dv)
        out, out_blocks = _heads_last_blocks(v, plan.nq, b)  # (B, H, nq b, dv) heads-last, (B, H, nq, b, dv)
        lse = q.new_empty(B, H, plan.nq, b, dtype=compute)
        work = _Workspace(compute, q.device)
        for group, (g0, g1) in enumerate(plan.groups):
            G = g1 - g0
            queries = _copy_blocks(work("queries", B, H, G, b, d), q, g0, scale * LOG2_E)  # (B, H, G, b, d)
            running_max = running_sum = acc = None
            for chunk, (s0, s1) in enumerate(plan.slot_chunks):
                width = (s1 - s0) * b  # C b keys
                keys = _KeyBlocks(k_table, plan, group, chunk, work, "keys")  # (B, H, G, C b, d)
                scores = keys.product(queries, work("scores", B, H, G, b, width), transpose=True)  # (B,H,G,b,Cb)
                _mask_(scores, plan, group, chunk)  # log2-scaled scores, -inf where masked
                chunk_max = scores.amax(dim=-1, keepdim=True)  # (B, H, G, b, 1)
                new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
                weights = scores.sub_(_not_inf(new_max)).exp2_()  # (B, H, G, b, C b), unnormalised
                values = _KeyBlocks(v_table, plan, group, chunk, work, "values")  # (B, H, G, C b, dv)
                chunk_out = values.product(weights, work("chunk_out", B, H, G, b, dv), transpose=False)
                if acc is None:  # (the chunk's buffer is reused by the next chunk)
                    running_sum = weights.sum(dim=-1, keepdim=True)
                    acc = chunk_out if len(plan.slot_chunks) == 1 else chunk_out.clone()
                else:  # online softmax: rescale what came before to the new running max
                    decay = torch.exp2(running_max - _not_inf(new_max))  # (B, H, G, b, 1)
                    running_sum = running_sum.mul_(decay).add_(weights.sum(dim=-1, keepdim=True))
                    acc = acc.mul_(decay).add_(chunk_out)  # (B, H, G, b, dv)
                running_max = new_max
            has_keys = running_sum > 0
            out_blocks[:, :, g0:g1] = acc.div_(torch.where(has_keys, running_sum, torch.ones_like(running_sum)))
            lse[:, :, g0:g1] = ((_not_inf(running_max) + torch.log2(running_sum)) * LN_2)[..., 0]  # -inf: no key
        out, lse = out[:, :, :num_queries], lse.flatten(2)[..., :num_queries]  # (B, H, Nq, dv), (B, H, Nq)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, compute = ctx.plan, ctx.scale, lse.dtype
        B, H, num_queries, d = q.shape
        b, nq, nk, dv = plan.block, plan.nq, plan.nk, v.shape[-1]
        num_keys = k.shape[-2]
        lse2 = (lse * LOG2_E).masked_fill(lse == NEG_INF, float("inf"))  # p = 2^(s - lse2) = 0 there
        lse2 = _blocked_rows(lse2, b, 0.0)[..., None]  # (B, H, nq, b, 1)
        if grad_lse is not None:  # d lse_i / d s_ij = p_ij: grad_lse joins the row term, D - grad_lse
            grad_lse = _blocked_rows(grad_lse.to(compute) * LN_2, b, 0.0)[..., None]  # (B, H, nq, b, 1)
        k_table, v_table = _key_table(k, b, compute), _key_table(v, b, compute)  # (B H nk, b, d|dv)
        grad_k_table = k_table.new_zeros(B * H * nk, b, d)
        grad_v_table = v_table.new_zeros(B * H * nk, b, dv)  # ln(2) dV, undone at the end
        grad_q, grad_q_blocks = _heads_last_blocks(q, nq, b)  # (B, H, nq b, d) heads-last, (B, H, nq, b, d)
        work = _Workspace(compute, q.device)
        for group, (g0, g1) in enumerate(plan.groups):
            G = g1 - g0
            queries = _copy_blocks(work("queries", B, H, G, b, d), q, g0, scale * LOG2_E)  # (B, H, G, b, d)
            grad_o = _copy_blocks(work("grad_out", B, H, G, b, dv), grad_out, g0, LN_2)  # (B, H, G, b, dv)
            outs = _copy_blocks(work("out", B, H, G, b, dv), out, g0)  # (B, H, G, b, dv)
            row_term = torch.mul(grad_o, outs, out=outs).sum(-1, keepdim=True)  # (B, H, G, b, 1): ln(2) D
            if grad_lse is not None:
                row_term.sub_(grad_lse[:, :, g0:g1])
            grad_queries = work("grad_queries", B, H, G, b, d)
            for chunk, (s0, s1) in enumerate(plan.slot_chunks):
                width = (s1 - s0) * b  # C b keys
                keys = _KeyBlocks(k_table, plan, group, chunk, work, "keys")  # (B, H, G, C b, d)
                values = _KeyBlocks(v_table, plan, group, chunk, work, "values")  # (B, H, G, C b, dv)
                scores = keys.product(queries, work("scores", B, H, G, b, width), transpose=True)  # (B,H,G,b,Cb)
                probs = _mask_(scores, plan, group, chunk).sub_(lse2[:, :, g0:g1]).exp2_()  # p_ij
                grad_values = torch.matmul(probs.transpose(-1, -2), grad_o, out=work("grad_values", B, H, G, width, dv))
                grad_scores = values.product(grad_o, work("grad_scores", B, H, G, b, width), transpose=True)  # ln2 dp
                grad_scores.sub_(row_term).mul_(probs)  # ln(2) ds = p (ln(2) dp - ln(2) D)
                if chunk == 0:
                    keys.product(grad_scores, grad_queries, transpose=False)  # (B, H, G, b, d), scaled below
                else:
                    grad_queries.add_(keys.product(grad_scores, work("chunk_grad_q", B, H, G, b, d), transpose=False))
                grad_keys = work("grad_keys", B, H, G, width, d)
                torch.matmul(grad_scores.transpose(-1, -2), queries, out=grad_keys)  # (B, H, G, C b, d)
                rows = plan.key_rows[:, :, g0:g1, s0:s1].reshape(-1)  # (B H G C,)
                grad_k_table.index_add_(0, rows, grad_keys.view(-1, b, d))
                grad_v_table.index_add_(0, rows, grad_values.view(-1, b, dv))
            grad_q_blocks[:, :, g0:g1] = grad_queries.mul_(scale * LOG2_E)
        del work
        grad_k = heads_last(k, nk * b).copy_(grad_k_table.view(B, H, nk * b, d))  # (B, H, nk b, d), heads-last
        del grad_k_table  # before the next N-sized buffer: one fewer at the peak
        grad_v = torch.mul(grad_v_table.view(B, H, nk * b, dv), LOG2_E, out=heads_last(v, nk * b))
        return grad_q[:, :, :num_queries], grad_k[:, :, :num_keys], grad_v[:, :, :num_keys], None, None
