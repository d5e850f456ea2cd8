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

(the half-open window pos_q - w < pos_k <= pos_q + w is band = (w - 1, w)). An optional learned
`relative_bias` table (H|1, 2c + 1) adds table[h, clamp(pos_k - pos_q, -c, c) + c] to every score
(ETC's clipped relative position labels), from the same positions: for a band of blocks on the
natural order the labels are one (b, S b) tile shared by every query block, for blocks whose tokens
share one position (segment ids) one label per block row or column, otherwise one per pair. Positions may be given
per head or per item, (H, N) or (B, H, N), and so may the key mask, (B, H, Nk).
`BlockLayout.dense_mask(Nq, Nk)` derives the equivalent dense pattern (everything but the key mask)
for tests and references, so the pattern a mechanism documents is the one computed here.

**Cost.** O(Nq S b d) time: per query block two products of b x d by d x S b forward (4 b S b d
FLOPs), five backward (the scores recomputed, then dV, dP, dQ, dK); O(N d) memory, no N x N tensor.
Query blocks are processed in groups of G, with one batched product (B, H, G, b, d) x (B, H, G, d,
C b) per step; when one block's row of S b keys exceeds the budget, its slots are processed in chunks
of C with an online softmax (running max, running sum, running output). Transients are bounded by
max(`score_budget`, B H b^2) score elements, and the gathered keys and values of one group about as
many (a group's size counts b x max(b, d) per query block and slot), whatever N, and live in per-call buffers reused by every group; k and v are read in place when
contiguous with N a multiple of b, else copied once (O(N d)). Key blocks are gathered for the group only
(`index_select`); for a band of blocks (slot s of block I is block I + s + c) interior groups read
them in place, through overlapping strided views of the key table, with no copy at all. Element
masks are added only on the slots where some pair of blocks is not wholly allowed (for a band, its
two edge slots). Autograd keeps q, k, v, out and lse only (plus the layout's integers on the
context, O(nq S + N)); the backward pass recomputes each group's scores from q, k and lse
(FlashAttention's idea at block granularity, in plain PyTorch) and scatters the key/value gradients
back with one `index_add_` per group. Double backward is not supported.

**Gathered passes** (`gathered_block_sparse_attention`, for the learnable patterns): the same kernel
on a *permuted* order given by index tensors (slot -> token), several passes merged per token by
log-sum-exp in one autograd Function. Each group's query rows and key blocks are read by token with
`index_select` from q, k, v's storage and the gradients added back by token with `index_add_`, so no
gathered copy of q, k, v and no per-pass output is kept; the backward pass recomputes each pass with
the merged lse and D. `PairExclusion` rules (pairs dropped on extra integer codes) make the passes'
key sets disjoint where a key must count once (Reformer's rounds) or drop single pairs (its self rule).

Precision: scores, softmax and lse run in float32 for float16/bfloat16 inputs (float64 stays
float64); `out` is returned in the input dtype, `lse` in the compute dtype. Outputs and input
gradients are stored heads-last (see `core.heads`), so the layer's head merge is a view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import gemm
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
class PairExclusion:
    """An element rule on extra integer codes: pair (i, j) is *not* attended when

        low <= key_codes[j] - query_codes[i] <= high

    query_codes / key_codes: (Nq,) / (Nk,), per head (H|1, N) or per item (B|1, H|1, N) integers in
    (-POSITION_LIMIT, POSITION_LIMIT). Several exclusions remove the union of their pairs. Used where
    a key set is the union of overlapping sets that must count each key once (Reformer's hash rounds:
    round r drops the pairs already attended in rounds r' < r) or minus single pairs (its self rule)."""

    query_codes: Tensor
    key_codes: Tensor
    low: int
    high: int

    def __post_init__(self):
        if self.low > self.high:
            raise ValueError(f"block layout: exclusion needs low <= high, got ({self.low}, {self.high})")
        for name in ("query_codes", "key_codes"):
            codes = getattr(self, name)
            if codes.dim() not in (1, 2, 3) or codes.dtype.is_floating_point:
                raise ValueError(f"block layout: exclusion {name} must be an integer tensor (N,), (H, N) or (B, H, N)")


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
    exclusions:      `PairExclusion`s: pairs removed on top of the rules above (on their own codes)
    """

    block_size: int
    key_blocks: Tensor
    query_positions: Tensor | None = None
    key_positions: Tensor | None = None
    causal: bool = False
    band: tuple[int, int] | None = None
    exclusions: tuple[PairExclusion, ...] = ()

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
        object.__setattr__(self, "exclusions", tuple(self.exclusions))
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
    def every_key(cls, block_size: int, num_queries: int, num_keys: int, *, device=None) -> BlockLayout:
        """Dense attention as a layout: every query block attends every key block. For many queries over
        a few hundred keys or more (compressed or projected keys) where the library's products run on
        oneDNN and SDPA's kernel does not (`core.gemm`; see `dense_over_compressed_keys`)."""
        return cls(block_size, global_blocks(-(-num_queries // block_size), range(-(-num_keys // block_size)),
                                             device=device))

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
        for rule in self.exclusions:
            qcode = _positions(rule.query_codes, num_queries, blocks.device)[..., :, None]  # (Bc, Hc, Nq, 1)
            kcode = _positions(rule.key_codes, num_keys, blocks.device)[..., None, :]  # (Bc, Hc, 1, Nk)
            difference = kcode - qcode
            allowed = allowed & ~((difference >= rule.low) & (difference <= rule.high))
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
    groups, slot_chunks: [(start, stop)] of query blocks, and per group [(start, stop)] of slots, processed
                  together; a group's chunks skip the slots where no query block of the group (in any
                  item or head) has a key block (a causal or per-head layout's empty slots: no product)
    masks:        per group, per slot chunk: None, or (slots, rows): the chunk's slots where some pair
                  needs an element mask (pairs of blocks wholly inside the rules need none: most of a
                  band is never masked; None for all of them) and their `mask_rows` (Bm, Hm, G, n)
    band_offset:  c when every used slot s of query block I is key block I + s + c (a band of blocks);
                  then `shifted` groups (all their windows inside the keys) read key blocks through
                  overlapping strided views of the key table instead of gathering copies
    exclusions:   per `PairExclusion`: (key codes (Be He (nk + 1), b) int32 2 kc - (low + high), query codes
                  (Be, He, nq, b, 1) int32 2 qc, width high - low, rows (Be, He, nq, S) into the key codes);
                  a pair is excluded iff |key code - query code| <= width
    query_tokens: gathered calls only: (B, H, nq b) long, the token read for each query slot (0 for an
                  empty slot, whose output is dropped)
    key_tokens:   gathered calls only: (B, H, nq, S, b) long, the token read for each key of each slot
                  (0 for an empty key slot, which is masked)
    """

    block: int
    nq: int
    nk: int
    key_rows: Tensor
    groups: list[tuple[int, int]]
    slot_chunks: list[list[tuple[int, int]]]
    masks: list[list[tuple[list[int] | None, Tensor] | None]]
    shifted: list[bool]
    band_offset: int = 0
    mask_rows: Tensor | None = None
    key_codes: Tensor | None = None
    query_codes: Tensor | None = None
    width: int = 0
    exclusions: list = field(default_factory=list)
    query_tokens: Tensor | None = None
    key_tokens: Tensor | None = None
    bias: _BiasPlan | None = None


@dataclass
class _BiasPlan:
    """Where the relative-position bias of one call comes from: the label of pair (i, j) is
    clamp(pos_k(j) - pos_q(i), -clip, clip) + clip, an index into the bias table's last dimension.

    tile:       (b, S b) long: the labels of every query block against its S slots, when they are the
                same for every query block (natural positions and a band of blocks: slot s of block I is
                block I + s + c, so pos_k - pos_q = (s + c) b + j' - i'); then the bias is one (H, b, S b)
                tile added to every group, and its gradient one reduction over the groups. Else None:
    key_positions: ((Bp Hp (nk + 1)), b) long, the keys' positions by block (block nk: the unused slots'),
    rows:       (Br, Hr, nq, S) long, the rows of `key_positions` of each slot,
    query_positions: (Bq, Hq, nq, b, 1) long, and the labels are formed per group and slot chunk.
    """

    clip: int
    tile: Tensor | None = None
    key_positions: Tensor | None = None
    rows: Tensor | None = None
    query_positions: Tensor | None = None


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


def _plan_bias(layout: BlockLayout, blocks: Tensor, num_queries: int, num_keys: int, clip: int,
               band_offset: int | None) -> _BiasPlan:
    """The integers of the relative-position bias (see `_BiasPlan`); blocks: (Bl, Hl, nq, S)."""
    b, device = layout.block_size, blocks.device
    nq, S = blocks.shape[-2:]
    nk = -(-num_keys // b)
    if layout.query_positions is None and layout.key_positions is None and band_offset is not None:
        within = torch.arange(b, device=device)
        offsets = (torch.arange(S, device=device) + band_offset) * b  # (S,): pos of slot s's first key - pos of row 0
        distance = offsets[None, :, None] + within[None, None, :] - within[:, None, None]  # (b, S, b)
        return _BiasPlan(clip, tile=distance.clamp_(-clip, clip).add_(clip).reshape(b, S * b))
    kpos = _edge_blocked(_positions(layout.key_positions, num_keys, device), b, extra=1)  # (Bp, Hp, nk + 1, b)
    Bp, Hp = kpos.shape[:2]
    table_item = torch.arange(Bp, device=device).view(Bp, 1, 1, 1)
    table_head = torch.arange(Hp, device=device).view(1, Hp, 1, 1)
    rows = (table_item * Hp + table_head) * (nk + 1) + torch.where(blocks < 0, nk, blocks)  # (Br, Hr, nq, S)
    qpos = _edge_blocked(_positions(layout.query_positions, num_queries, device), b)  # (Bq, Hq, nq, b)
    # a block whose tokens share one position (a segment id, a sentence id) needs one label, not b
    if bool((kpos == kpos[..., :1]).all()):
        kpos = kpos[..., :1]  # (Bp, Hp, nk + 1, 1)
    if bool((qpos == qpos[..., :1]).all()):
        qpos = qpos[..., :1]  # (Bq, Hq, nq, 1)
    return _BiasPlan(clip, key_positions=kpos.reshape(-1, kpos.shape[-1]), rows=rows,
                     query_positions=qpos[..., None, None])


def _edge_blocked(positions: Tensor, b: int, extra: int = 0) -> Tensor:
    """(.., n) -> (.., ceil(n / b) + extra, b), padded with the last position (padded rows and keys are
    masked or dropped; repeating the edge keeps a block of equal positions equal)."""
    n = positions.shape[-1]
    pad = -(-n // b) * b - n + extra * b
    edge = positions[..., -1:].expand(*positions.shape[:-1], pad)
    return torch.cat([positions, edge], dim=-1).unflatten(-1, (-1, b))


def _plan(q: Tensor, k: Tensor, layout: BlockLayout, key_mask: Tensor | None, score_budget: int,
          bias_clip: int | None = None, *, query_index: Tensor | None = None,
          key_index: Tensor | None = None) -> _Plan:
    """The plan of one call; a gathered call passes query_index (B, H, Lq) and key_index (B, H, Lk)
    (the token read for each slot, >= 0), and the layout then counts slots, not tokens."""
    B, H, num_queries, _ = q.shape
    num_keys = k.shape[-2]
    gathered = key_index is not None
    if gathered:
        num_queries, num_keys = query_index.shape[-1], key_index.shape[-1]
    b, device = layout.block_size, q.device
    nq, nk = -(-num_queries // b), -(-num_keys // b)
    blocks = _layout_rows(layout.key_blocks.to(device), nq, nk)  # (Bl, Hl, nq, S), -1 = none
    if blocks.shape[0] not in (1, B) or blocks.shape[1] not in (1, H):
        raise ValueError(f"block layout: key_blocks {tuple(layout.key_blocks.shape)} for batch {B} and {H} heads")
    S = blocks.shape[-1]
    item, head = torch.arange(B, device=device).view(B, 1, 1, 1), torch.arange(H, device=device).view(1, H, 1, 1)
    key_rows = ((item * H + head) * nk + blocks.clamp(min=0)).expand(B, H, nq, S)  # (B, H, nq, S)

    chunk = max(1, min(S, score_budget // max(1, B * H * b * b)))
    # per query block of a group: b x (chunk b) scores and chunk b gathered key rows of d; with blocks
    # smaller than d the gathered rows dominate the workspace (b = 16, d = 64: 4x the scores)
    group = max(1, score_budget // max(1, B * H * b * chunk * max(b, q.shape[-1])))
    groups = [(i, min(i + group, nq)) for i in range(0, nq, group)]
    offset = None if gathered else _band_offset(blocks)
    shifted = [offset is not None and g0 + offset >= 0 and g1 - 1 + offset + S <= nk for g0, g1 in groups]
    slot_chunks = _used_slot_chunks(blocks, groups, S, chunk)
    plan = _Plan(b, nq, nk, key_rows, groups, slot_chunks, [[None] * len(c) for c in slot_chunks], shifted,
                 band_offset=offset or 0)
    if gathered:
        plan.query_tokens = F.pad(query_index, (0, nq * b - num_queries)).expand(B, H, nq * b)  # (B, H, nq b)
        key_token_blocks = F.pad(key_index, (0, nk * b - num_keys)).expand(B, H, nk * b).unflatten(-1, (nk, b))
        flat_blocks = blocks.clamp(min=0).expand(B, H, nq, S).reshape(B, H, nq * S, 1).expand(B, H, nq * S, b)
        plan.key_tokens = key_token_blocks.gather(2, flat_blocks).view(B, H, nq, S, b)  # (B, H, nq, S, b)
    if bias_clip is not None:
        plan.bias = _plan_bias(layout, blocks, num_queries, num_keys, bias_clip, offset)

    positional = layout.causal or layout.band is not None
    masked_keys = key_mask is not None or num_keys % b != 0 or bool((blocks < 0).any())
    if not positional and not masked_keys and not layout.exclusions:
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

    needs_mask = ~whole  # (.., nq, S): some pair of blocks is not wholly allowed
    for rule in layout.exclusions:
        codes = _blocked_rows(_positions(rule.key_codes, num_keys, device), b, 0, extra=1)  # (Be, He, nk + 1, b)
        codes, rule_blocked = torch.broadcast_tensors(codes, blocked)
        qcode = _positions(rule.query_codes, num_queries, device)  # (Bc, Hc, Nq)
        qcode_blocks = _blocked_rows(qcode, b, 0)  # (Bc, Hc, nq, b)
        q_low, q_high = _block_mins_maxs(qcode_blocks, _blocked_rows(torch.zeros_like(qcode, dtype=torch.bool), b, True))
        k_low, k_high = _block_mins_maxs(codes, rule_blocked)  # (Be, He, nk + 1)
        may_exclude = (per_pair(k_high) - q_low[..., None] >= rule.low) & (per_pair(k_low) - q_high[..., None] <= rule.high)
        needs_mask = needs_mask | may_exclude
        Be, He = codes.shape[:2]
        rows = ((torch.arange(Be, device=device).view(Be, 1, 1, 1) * He + torch.arange(He, device=device).view(1, He, 1, 1))
                * (nk + 1) + unused)  # (Be, He, nq, S)
        plan.exclusions.append(((2 * codes - (rule.low + rule.high)).to(torch.int32).reshape(-1, b),
                                (2 * qcode_blocks).to(torch.int32)[..., None], rule.high - rule.low, rows))
    needs_mask = needs_mask.reshape(-1, *needs_mask.shape[-2:]).any(0)  # (nq, S)
    for gi, (g0, g1) in enumerate(groups):
        per_slot = needs_mask[g0:g1].any(0).tolist()  # (S,)
        for ci, (s0, s1) in enumerate(slot_chunks[gi]):
            slots = [s - s0 for s in range(s0, s1) if per_slot[s]]
            if 2 * len(slots) > s1 - s0:  # most of the chunk: mask all of it in one pass
                chosen, index = None, slice(s0, s1)
            elif slots:
                chosen, index = slots, [s0 + s for s in slots]
            else:
                continue
            plan.masks[gi][ci] = (chosen, plan.mask_rows[:, :, g0:g1, index],
                                  [rows[:, :, g0:g1, index] for *_, rows in plan.exclusions])
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
    relative_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention restricted to `layout` (see the module doc) -> (out, lse).

    q: (B, H, Nq, d); k: (B, H, Nk, d); v: (B, H, Nk, dv), one floating dtype; key_mask: (B, Nk) or
    (B, H, Nk) bool, True = real key; scale defaults to 1 / sqrt(d). Returns out (B, H, Nq, dv) in the
    inputs' dtype, stored heads-last, and lse (B, H, Nq) in float32 (float64 for float64 inputs), -inf
    where a query has no allowed key (its output is 0). Both are differentiable (lse too, for
    `merge_by_lse`). `score_budget` bounds the elements of each transient score tensor (a speed /
    memory trade-off only).

    relative_bias: None, or a (H|1, 2c + 1) floating table of learned biases (Shaw et al.'s clipped
    relative positions as scalars, as in ETC and T5): the score of every allowed pair becomes
    s_ij = scale q_i . k_j + relative_bias[h, clamp(pos_k(j) - pos_q(i), -c, c) + c], with the
    layout's positions (for every layout, not only causal or banded ones). Differentiable: its
    gradient is the sum of the score gradients of the pairs of each label.
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
    bias_clip = None
    if relative_bias is not None:
        if (not isinstance(relative_bias, Tensor) or relative_bias.dim() != 2 or not relative_bias.dtype.is_floating_point
                or relative_bias.shape[0] not in (1, q.shape[1]) or relative_bias.shape[1] % 2 == 0):
            raise ValueError(
                f"block-sparse attention: relative_bias must be a floating tensor (H|1, 2c + 1) with H = {q.shape[1]}, "
                f"got {_describe_tensor(relative_bias)}"
            )
        bias_clip = relative_bias.shape[1] // 2
    plan = _plan(q, k, layout, key_mask, score_budget, bias_clip)
    return _BlockSparseAttention.apply(q, k, v, relative_bias, plan, scale)


def dense_over_compressed_keys(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, *,
                               block_size: int = 256) -> Tensor:
    """softmax(q k^T / sqrt(d)) v of q (B, H, Nq, d) over every key of k, v (B, H, Nk, d|dv), keys masked by
    key_mask (B, Nk) or (B, H, Nk) -> (B, H, Nq, dv); rows without a key give zeros.

    For the mechanisms that attend over a shortened key set (Memory Compressed's N/k slots, Linformer's
    k projections). PyTorch's fused SDPA runs it, except where the library's float32 products run on
    oneDNN (`core.gemm.prefers_onednn`: AVX-512 CPUs not made by Intel). SDPA's kernel keeps its
    products on MKL's AVX2 path there, so the block-sparse engine runs it instead, with `every_key`
    tiles of `block_size`. A per-head key mask, which SDPA takes only as an (Nq, Nk) pattern, also
    goes to the block-sparse engine."""
    from .dense import dense_attention

    per_head_mask = key_mask is not None and key_mask.dim() == 3
    if not per_head_mask and not gemm.prefers_onednn(q.dtype, q.device):
        return dense_attention(q, k, v, key_mask=key_mask)
    layout = BlockLayout.every_key(block_size, q.shape[-2], k.shape[-2], device=q.device)
    return block_sparse_attention(q, k, v, layout, key_mask)[0]


def _describe_tensor(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


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


def _is_view_table(table: Tensor, x: Tensor) -> bool:
    """Whether `table` (from `_key_table(x, ...)`) is a view of x's own storage (no copy was made)."""
    return table.data_ptr() == x.data_ptr() and x.is_contiguous()


def _used_slot_chunks(blocks: Tensor, groups: list[tuple[int, int]], S: int, chunk: int) -> list[list[tuple[int, int]]]:
    """Per group, its slot chunks (at most `chunk` slots each) trimmed to the slots that some query block
    of the group, in any item or head, uses (blocks (Bl, Hl, nq, S), -1 = none). An unused slot only
    adds -inf scores (exactly nothing to the softmax and zero gradients), so skipping it changes no
    result; a group with no used slot at all keeps its first chunk (its rows get no key, lse -inf)."""
    used = (blocks >= 0).flatten(0, 1).any(0)  # (nq, S)
    per_group = torch.stack([used[g0:g1].any(0) for g0, g1 in groups]).tolist() if groups else []  # (groups, S)
    everything = [(s, min(s + chunk, S)) for s in range(0, S, chunk)]
    result = []
    for flags in per_group:
        chunks = []
        for s0, s1 in everything:
            kept = [s for s in range(s0, s1) if flags[s]]
            if kept:  # trimmed to its first and last used slot (a chunk is one contiguous product)
                chunks.append((kept[0], kept[-1] + 1))
        result.append(chunks or everything[:1])
    return result


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

    def __init__(self, table: Tensor | _Rows, plan: _Plan, group: int, chunk: int, work: _Workspace, name: str):
        (g0, g1), (s0, s1), b = plan.groups[group], plan.slot_chunks[group][chunk], plan.block
        B, H, G, f = plan.key_rows.shape[0], plan.key_rows.shape[1], g1 - g0, table.shape[-1]
        self.views, self.width = None, f
        if isinstance(table, _Rows):  # a gathered call: read the keys of each slot by token
            self.gathered = table.gather(plan.key_tokens[:, :, g0:g1, s0:s1], work(name, B, H, G, (s1 - s0) * b, f))
        elif plan.shifted[group]:
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
            return gemm.batched_matmul(a, self.gathered.transpose(-1, -2) if transpose else self.gathered, out)
        a3, out3 = a.flatten(0, 1), out.flatten(0, 1)  # (B H, G, x, y) and (B H, G, x, z)
        for i, view in enumerate(self.views):
            gemm.batched_matmul(a3[i], view.transpose(1, 2) if transpose else view, out3[i])
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
    slots, rows, exclusion_rows = mask  # rows: (Bm, Hm, G, n) of the masked slots
    Bm, Hm, G, n = rows.shape
    b, g0 = plan.block, plan.groups[group][0]
    codes = plan.key_codes.index_select(0, rows.reshape(-1)).view(Bm, Hm, G, 1, n * b)
    if plan.query_codes is None and not exclusion_rows:
        bias = codes  # (Bm, Hm, G, 1, n b): the additive mask of the keys
    else:
        if plan.query_codes is None:
            inside = (codes == 0).to(scores.dtype)  # (Bm, Hm, G, 1, n b): the additive mask as 1 / 0
        else:
            distance = codes - plan.query_codes[:, :, g0 : g0 + G]  # (B?, H?, G, b, n b): 2 (pos_k - pos_q) - (low + high)
            inside = distance.abs_().le_(plan.width).to(scores.dtype)
        for (key_codes, query_codes, width, _), ex_rows in zip(plan.exclusions, exclusion_rows):
            Be, He = ex_rows.shape[:2]
            ex_codes = key_codes.index_select(0, ex_rows.reshape(-1)).view(Be, He, G, 1, n * b)
            outside = (ex_codes - query_codes[:, :, g0 : g0 + G]).abs_().gt_(width)  # (B?, H?, G, b, n b) int 1: kept
            if inside.shape == torch.broadcast_shapes(inside.shape, outside.shape):
                inside.mul_(outside)  # in place, no float copy of `outside` (a pass fewer per exclusion)
            else:
                inside = inside * outside
        bias = (inside - 1).div_(inside)  # 1 -> 0, 0 -> -inf (vectorised; masked_fill is slow here)
    if slots is None:
        return scores.add_(bias)
    by_slot, bias_by_slot = scores.unflatten(-1, (-1, b)), bias.unflatten(-1, (n, b))
    for i, s in enumerate(slots):
        by_slot[..., s, :].add_(bias_by_slot[..., i, :])
    return scores


def _bias_labels(plan: _Plan, group: int, chunk: int, heads: int) -> Tensor:
    """(Bx, Hx, G, bq, C, bk) long: the relative-position labels of one group and slot chunk (general
    path), bq = 1 (bk = 1) when every query (key) block's tokens share one position; with a per-head
    table (heads > 1), offset by h (2c + 1), so that they index the flattened table."""
    (g0, g1), (s0, s1), bias = plan.groups[group], plan.slot_chunks[group][chunk], plan.bias
    rows = bias.rows[:, :, g0:g1, s0:s1]  # (Br, Hr, G, C)
    Br, Hr, G, C = rows.shape
    keys = bias.key_positions.index_select(0, rows.reshape(-1)).view(Br, Hr, G, 1, C, -1)
    distance = keys - bias.query_positions[:, :, g0:g1]  # (Bx, Hx, G, bq, C, bk)
    labels = distance.clamp_(-bias.clip, bias.clip).add_(bias.clip)
    if heads > 1:
        labels = labels + (torch.arange(heads, device=labels.device) * (2 * bias.clip + 1)).view(1, heads, 1, 1, 1, 1)
    return labels


def _add_bias_(scores: Tensor, plan: _Plan, table: Tensor, group: int, chunk: int) -> Tensor:
    """scores (B, H, G, b, C b) += the bias of each pair, table (Ht, 2c + 1) already in log2 units."""
    s0, s1 = plan.slot_chunks[group][chunk]
    b, Ht = plan.block, table.shape[0]
    if plan.bias.tile is not None:
        tile = plan.bias.tile[:, s0 * b : s1 * b]  # (b, C b)
        return scores.add_(table[:, tile][None, :, None])  # (1, Ht, 1, b, C b)
    labels = _bias_labels(plan, group, chunk, Ht)  # (Bx, Hx|Ht, G, bq, C, bk)
    scores.unflatten(-1, (s1 - s0, b)).add_(table.reshape(-1)[labels])  # (B, H, G, b, C, b) view, in place
    return scores


def _accumulate_bias_grad_(grad_table: Tensor, grad_scores: Tensor, plan: _Plan, group: int, chunk: int) -> None:
    """Add the score gradients (B, H, G, b, C b) of one group and chunk to the per-label gradient:
    grad_table (Ht, 2c + 1), or for a tile, (H, b, S b) per tile entry (labelled at the end)."""
    s0, s1 = plan.slot_chunks[group][chunk]
    b = plan.block
    if plan.bias.tile is not None:
        grad_table[:, :, s0 * b : s1 * b] += grad_scores.sum(dim=(0, 2))  # (H, b, C b)
        return
    labels = _bias_labels(plan, group, chunk, grad_table.shape[0])  # (Bx, Hx, G, bq, C, bk)
    grads = grad_scores.unflatten(-1, (s1 - s0, b))  # (B, H, G, b, C, b)
    shared = [dim for dim in (3, 5) if labels.shape[dim] == 1]  # a label shared by a block's rows / keys
    if shared:
        grads = grads.sum(dim=shared, keepdim=True)
    grad_table.view(-1).index_add_(0, labels.expand(grads.shape).reshape(-1), grads.reshape(-1))


def _not_inf(x: Tensor) -> Tensor:
    """-inf (a row with no key so far) -> 0, so that 2^(s - x) stays 0 instead of NaN."""
    return x.masked_fill(x == NEG_INF, 0.0)


def _group_forward(queries: Tensor, k_table, v_table, plan: _Plan, group: int, work: _Workspace,
                   bias_table: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One group of query blocks, queries (B, H, G, b, d) already scaled by scale log2(e), against its
    slot chunks with an online softmax -> (out (B, H, G, b, dv) in a workspace buffer, lse (B, H, G, b))."""
    B, H, G, b, _ = queries.shape
    running_max = running_sum = acc = None
    for chunk, (s0, s1) in enumerate(plan.slot_chunks[group]):
        width = (s1 - s0) * b  # C b keys
        keys = _KeyBlocks(k_table, plan, group, chunk, work, "keys")  # (B, H, G, C b, d)
        scores = keys.product(queries, work("scores", B, H, G, b, width), transpose=True)  # (B,H,G,b,Cb)
        _mask_(scores, plan, group, chunk)  # log2-scaled scores, -inf where masked
        if bias_table is not None:
            _add_bias_(scores, plan, bias_table, group, chunk)
        chunk_max = scores.amax(dim=-1, keepdim=True)  # (B, H, G, b, 1)
        new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
        weights = scores.sub_(_not_inf(new_max)).exp2_()  # (B, H, G, b, C b), unnormalised
        values = _KeyBlocks(v_table, plan, group, chunk, work, "values")  # (B, H, G, C b, dv)
        chunk_out = values.product(weights, work("chunk_out", B, H, G, b, values.width), transpose=False)
        if acc is None:  # (the chunk's buffer is reused by the next chunk)
            running_sum = weights.sum(dim=-1, keepdim=True)
            acc = chunk_out if len(plan.slot_chunks[group]) == 1 else chunk_out.clone()
        else:  # online softmax: rescale what came before to the new running max
            decay = torch.exp2(running_max - _not_inf(new_max))  # (B, H, G, b, 1)
            running_sum = running_sum.mul_(decay).add_(weights.sum(dim=-1, keepdim=True))
            acc = acc.mul_(decay).add_(chunk_out)  # (B, H, G, b, dv)
        running_max = new_max
    has_keys = running_sum > 0
    out = acc.div_(torch.where(has_keys, running_sum, torch.ones_like(running_sum)))
    return out, ((_not_inf(running_max) + torch.log2(running_sum)) * LN_2)[..., 0]  # lse -inf: no key


def _group_backward(queries: Tensor, grad_o: Tensor, row_term: Tensor, lse2: Tensor, k_table, v_table, plan: _Plan,
                    group: int, work: _Workspace, grad_k_sink, grad_v_sink, bias_table: Tensor | None = None,
                    grad_bias: Tensor | None = None) -> Tensor:
    """The backward pass of one group: queries (B, H, G, b, d) scaled as forward, grad_o (B, H, G, b, dv)
    times ln(2), row_term (B, H, G, b, 1) ln(2) (D - grad_lse), lse2 (B, H, G, b, 1) lse log2(e) (+inf for
    rows with no key). Adds ln(2) dK and ln(2) dV into the sinks (see `_add_key_grads_`); returns
    ln(2) dQ / (scale log2(e)) (B, H, G, b, d), in a workspace buffer."""
    B, H, G, b, d = queries.shape
    grad_queries = work("grad_queries", B, H, G, b, d)
    for chunk, (s0, s1) in enumerate(plan.slot_chunks[group]):
        width = (s1 - s0) * b  # C b keys
        keys = _KeyBlocks(k_table, plan, group, chunk, work, "keys")  # (B, H, G, C b, d)
        values = _KeyBlocks(v_table, plan, group, chunk, work, "values")  # (B, H, G, C b, dv)
        scores = keys.product(queries, work("scores", B, H, G, b, width), transpose=True)  # (B,H,G,b,Cb)
        _mask_(scores, plan, group, chunk)
        if bias_table is not None:
            _add_bias_(scores, plan, bias_table, group, chunk)
        probs = scores.sub_(lse2).exp2_()  # p_ij
        grad_values = gemm.batched_matmul(probs.transpose(-1, -2), grad_o, work("grad_values", B, H, G, width, grad_o.shape[-1]))
        grad_scores = values.product(grad_o, work("grad_scores", B, H, G, b, width), transpose=True)  # ln2 dp
        grad_scores.sub_(row_term).mul_(probs)  # ln(2) ds = p (ln(2) dp - ln(2) D)
        if grad_bias is not None:
            _accumulate_bias_grad_(grad_bias, grad_scores, plan, group, chunk)
        if chunk == 0:
            keys.product(grad_scores, grad_queries, transpose=False)  # (B, H, G, b, d), scaled by the caller
        else:
            grad_queries.add_(keys.product(grad_scores, work("chunk_grad_q", B, H, G, b, d), transpose=False))
        grad_keys = work("grad_keys", B, H, G, width, d)
        gemm.batched_matmul(grad_scores.transpose(-1, -2), queries, grad_keys)  # (B, H, G, C b, d)
        _add_key_grads_(grad_k_sink, plan, group, chunk, grad_keys)
        _add_key_grads_(grad_v_sink, plan, group, chunk, grad_values)
    return grad_queries


def _add_key_grads_(sink, plan: _Plan, group: int, chunk: int, grads: Tensor) -> None:
    """grads (B, H, G, C b, f) of one group's key slots into `sink`: the gradient of the key table
    (B H nk, b, f), by block, or for a gathered call a `_Rows` of the tokens' gradient, by token."""
    (g0, g1), (s0, s1) = plan.groups[group], plan.slot_chunks[group][chunk]
    if isinstance(sink, _Rows):
        sink.add_(plan.key_tokens[:, :, g0:g1, s0:s1], grads)
    else:
        sink.index_add_(0, plan.key_rows[:, :, g0:g1, s0:s1].reshape(-1), grads.view(-1, plan.block, grads.shape[-1]))


class _BlockSparseAttention(torch.autograd.Function):
    """(out, lse) of block-sparse attention; saves q, k, v, out, lse and recomputes scores in backward.

    Scores are kept in base 2 (the queries carry scale log2(e)) and exponentiated with exp2: exp's
    vectorised kernel slows down several times on the -inf of masked pairs, exp2's does not.
    Backward, the gradients of the base-2 scores are ln(2) times those of the natural ones: ln(2) is
    folded into the copies of dO and D, and undone on dV (dQ and dK take the base-2 queries' scale).
    """

    @staticmethod
    def forward(ctx, q, k, v, relative_bias, plan: _Plan, scale: float):
        compute = _compute_dtype(q.dtype)
        B, H, num_queries, d = q.shape
        b, dv = plan.block, v.shape[-1]
        bias_table = None if relative_bias is None else relative_bias.detach().to(compute) * LOG2_E  # (Ht, L)
        k_table, v_table = _key_table(k, b, compute), _key_table(v, b, compute)  # (B H nk, b, d|dv)
        out, out_blocks = _heads_last_blocks(v, plan.nq, b)  # (B, H, nq b, dv) heads-last, (B, H, nq, b, dv)
        lse = q.new_empty(B, H, plan.nq, b, dtype=compute)
        work = _Workspace(compute, q.device)
        for group, (g0, g1) in enumerate(plan.groups):
            G = g1 - g0
            queries = _copy_blocks(work("queries", B, H, G, b, d), q, g0, scale * LOG2_E)  # (B, H, G, b, d)
            out_blocks[:, :, g0:g1], lse[:, :, g0:g1] = _group_forward(queries, k_table, v_table, plan, group, work,
                                                                       bias_table)
        out, lse = out[:, :, :num_queries], lse.flatten(2)[..., :num_queries]  # (B, H, Nq, dv), (B, H, Nq)
        ctx.save_for_backward(q, k, v, out, lse, relative_bias)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, relative_bias = ctx.saved_tensors
        plan, scale, compute = ctx.plan, ctx.scale, lse.dtype
        B, H, num_queries, d = q.shape
        b, nq, nk, dv = plan.block, plan.nq, plan.nk, v.shape[-1]
        bias_table = grad_bias = None
        if relative_bias is not None:
            bias_table = relative_bias.to(compute) * LOG2_E  # (Ht, L)
            tile = plan.bias.tile
            grad_bias = (bias_table.new_zeros(H, b, tile.shape[-1]) if tile is not None
                         else bias_table.new_zeros(bias_table.shape))  # (H, b, S b) per tile entry, or (Ht, L)
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
            grad_queries = _group_backward(queries, grad_o, row_term, lse2[:, :, g0:g1], k_table, v_table, plan, group,
                                           work, grad_k_table, grad_v_table, bias_table, grad_bias)
            grad_q_blocks[:, :, g0:g1] = grad_queries.mul_(scale * LOG2_E)
        del work
        # a gradient in its input's layout: heads-last (the fused projection's backward reads it in place)
        # unless the key table was a view of k (k heads-first and contiguous, as a caller's own key
        # table is): then the table's gradient is returned as it is, with no N-sized copy at the peak
        if _is_view_table(k_table, k):
            grad_k = grad_k_table.view(B, H, nk * b, d)  # (B, H, nk b, d), heads-first like k
        else:
            grad_k = heads_last(k, nk * b).copy_(grad_k_table.view(B, H, nk * b, d))  # (B, H, nk b, d), heads-last
        del grad_k_table  # before the next N-sized buffer: one fewer at the peak
        if _is_view_table(v_table, v):
            grad_v = grad_v_table.view(B, H, nk * b, dv).mul_(LOG2_E)  # heads-first like v, in place
        else:
            grad_v = torch.mul(grad_v_table.view(B, H, nk * b, dv), LOG2_E, out=heads_last(v, nk * b))
        if grad_bias is not None:  # grad_scores are ln(2) ds: the natural scores' gradient is LOG2_E times them
            if plan.bias.tile is not None:  # per tile entry -> per label, summed over the heads for a shared table
                per_label = grad_bias.new_zeros(H, relative_bias.shape[1])
                per_label.index_add_(1, plan.bias.tile.reshape(-1), grad_bias.view(H, -1))
                grad_bias = per_label.sum(0, keepdim=True) if relative_bias.shape[0] == 1 else per_label
            grad_bias = (grad_bias * LOG2_E).to(relative_bias.dtype)
        return (grad_q[:, :, :num_queries], grad_k[:, :, :num_keys], grad_v[:, :, :num_keys], grad_bias, None, None)


# ----------------------------------------------------------------------------- gathered passes
class _Rows:
    """A (B, H, N, f) tensor read and written by token: its rows as one (R, f) matrix, a view of its
    storage when the strides allow it (heads-first, heads-last, a slice of a fused projection's
    output), else of one contiguous copy; token t of (item i, head h) is row base[i, h] + t step."""

    def __init__(self, x: Tensor, dtype: torch.dtype | None = None):
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
        f = x.shape[-1]
        if x.stride(-1) != 1 or any(size > 1 and stride % f for size, stride in zip(x.shape[:3], x.stride()[:3])):
            x = x.contiguous()
        B, H, N, _ = x.shape
        sB, sH, sN = (stride // f if size > 1 else 0 for size, stride in zip(x.shape[:3], x.stride()[:3]))
        count = (B - 1) * sB + (H - 1) * sH + (N - 1) * sN + 1
        self.tensor, self.shape, self.step = x, x.shape, sN
        self.rows = x.as_strided((count, f), (f, 1), x.storage_offset())  # (R, f)
        items, heads = torch.arange(B, device=x.device), torch.arange(H, device=x.device)
        self.base = items[:, None] * sB + heads[None, :] * sH  # (B, H)

    def ids(self, tokens: Tensor) -> Tensor:
        """tokens (B, H, ...) -> their row numbers."""
        return (tokens * self.step).add_(self.base.view(*self.base.shape, *(1,) * (tokens.dim() - 2)))

    def gather(self, tokens: Tensor, out: Tensor) -> Tensor:
        """The rows of tokens (B, H, ...) into out (B, H, ..., f) (of matching size)."""
        torch.index_select(self.rows, 0, self.ids(tokens).reshape(-1), out=out.view(-1, self.shape[-1]))
        return out

    def add_(self, tokens: Tensor, values: Tensor) -> None:
        """rows[tokens] += values (B, H, ..., f); repeated tokens accumulate."""
        self.rows.index_add_(0, self.ids(tokens).reshape(-1), values.reshape(-1, self.shape[-1]))


@dataclass(frozen=True, eq=False)
class GatheredPass:
    """One pass of `gathered_block_sparse_attention`: `layout` applied to a gathered order of slots.

    query_index: (B|1, H|1, Lq) long: the query token of each query slot, -1 for an empty slot
    key_index:   (B|1, H|1, Lk) long: the key token of each key slot, -1 for an empty slot (None: the
                 same slots as the queries)
    key_mask:    None, or (B, Lk) / (B, H, Lk) bool over the key slots, True = attendable (an empty
                 slot is never attended)
    The layout (key blocks, positions, band, exclusions) counts slots: Lq query and Lk key rows."""

    layout: BlockLayout
    query_index: Tensor
    key_index: Tensor | None = None
    key_mask: Tensor | None = None


def gathered_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    passes: Sequence[GatheredPass],
    scale: float | None = None,
    *,
    score_budget: int = DEFAULT_SCORE_BUDGET,
    self_keys: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention over gathered orders of the tokens, merged per query token -> (out, lse).

    For the mechanisms that sort or route their tokens (Reformer's hash buckets, Routing's clusters):
    pass p reads query slot t from token query_index_p[t] and key slot u from token key_index_p[u] and
    applies its layout to the slots; every slot of a query token, in every pass, adds its keys to
    that token's softmax,

        out_i = sum_p sum_{t: query_index_p[t] = i} sum_{u in A_p(t)} exp(s_iu - lse_i) v_{key_index_p[u]},
        lse_i = log of the same sum of exp(s)          (-inf and out_i = 0 for a token in no slot)

    i.e. attention whose weights count a key once per (pass, slot) pair that holds it: the caller
    makes the pairs disjoint (`PairExclusion`) where a key must count once. q: (B, H, Nq, d) and
    k, v: (B, H, Nk, d|dv) in the tokens' order; out (B, H, Nq, dv), stored heads-last, and lse
    (B, H, Nq) as `block_sparse_attention`'s.

    Memory: no gathered copy of q, k or v is kept, nor any per-pass output. The kernel reads each
    group's rows by token (`index_select` on the tensors' storage), and autograd keeps q, k, v, out and
    lse only (plus the integer plans): the backward pass recomputes each pass's scores with the
    *merged* lse and D_i = dO_i . out_i (the merged softmax's own gradient, whatever the passes), and
    adds dQ, dK, dV by token (`index_add_`). Cost: the passes' block-sparse products, plus O(N dv)
    per pass to merge.

    `self_keys` (B, Nq) long, optional: the self rule of shared-QK attention (Reformer: a query may
    attend itself only when nothing else is allowed). A query i with no key in any pass and
    self_keys[b, i] = j >= 0 outputs v_j (the gradient goes to v_j only; its lse stays -inf, the
    limit of the paper's large negative self-score, so a merge by lse gives it no weight); -1 keeps
    the output 0 (padding). Done inside the primitive so that the fix-up costs no full-size copies of
    the output or of dV (only the few rows it touches).
    """
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"gathered block-sparse attention: q, k, v must be (B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"gathered block-sparse attention: q, k, v must share one floating dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not passes:
        raise ValueError("gathered block-sparse attention: at least one pass is needed")
    B, H, num_queries, _ = q.shape
    num_keys = k.shape[-2]
    plans = []
    for p in passes:
        query_index = p.query_index
        key_index = query_index if p.key_index is None else p.key_index
        for name, index, count in (("query_index", query_index, num_queries), ("key_index", key_index, num_keys)):
            if (index.dim() != 3 or index.dtype.is_floating_point or index.shape[0] not in (1, B)
                    or index.shape[1] not in (1, H)):
                raise ValueError(f"gathered block-sparse attention: {name} must be an integer (B|1, H|1, L) tensor, "
                                 f"got {tuple(index.shape)} {index.dtype}")
            if index.numel() and (int(index.max()) >= count or int(index.min()) < -1):
                raise ValueError(f"gathered block-sparse attention: {name} must lie in [-1, {count}), got "
                                 f"[{int(index.min())}, {int(index.max())}]")
        query_index = query_index.to(q.device).long().expand(B, H, -1)
        key_index = key_index.to(q.device).long().expand(B, H, -1)
        key_mask = key_index >= 0  # (B, H, Lk)
        if p.key_mask is not None:
            mask = p.key_mask.to(device=q.device, dtype=torch.bool)
            if mask.dim() not in (2, 3) or mask.shape[0] != B or mask.shape[-1] != key_index.shape[-1]:
                raise ValueError(f"gathered block-sparse attention: key_mask {tuple(mask.shape)} for "
                                 f"{key_index.shape[-1]} key slots")
            key_mask = key_mask & (mask[:, None] if mask.dim() == 2 else mask)
        plan = _plan(q, k, p.layout, key_mask, score_budget, query_index=query_index.clamp(min=0),
                     key_index=key_index.clamp(min=0))
        plans.append((plan, query_index))
    if self_keys is not None:
        self_keys = self_keys.to(q.device)
        if (self_keys.dim() != 2 or self_keys.dtype.is_floating_point or self_keys.shape != (B, num_queries)
                or (self_keys.numel() and (int(self_keys.max()) >= num_keys or int(self_keys.min()) < -1))):
            raise ValueError(f"gathered block-sparse attention: self_keys must be an integer (B, Nq) = ({B}, "
                             f"{num_queries}) tensor of key tokens in [-1, {num_keys}), got {tuple(self_keys.shape)} "
                             f"{self_keys.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _GatheredAttention.apply(q, k, v, plans, scale, self_keys)


class _GatheredAttention(torch.autograd.Function):
    """(out, lse) of `gathered_block_sparse_attention`; saves q, k, v, out, lse only."""

    @staticmethod
    def forward(ctx, q, k, v, plans, scale: float, self_keys: Tensor | None):
        compute = _compute_dtype(q.dtype)
        B, H, n, d = q.shape
        dv = v.shape[-1]
        sources = _Rows(q, compute), _Rows(k, compute), _Rows(v, compute)
        running_max = q.new_full((B, H, n + 1), NEG_INF, dtype=compute)  # token n: the empty slots' dump
        total = q.new_zeros(B, H, n + 1, dtype=compute)
        acc = q.new_zeros(B, H, n + 1, dv, dtype=compute)
        acc_rows = acc.view(-1, dv)  # (B H (n + 1), dv): slots add their rows by index (3x a scatter over dv)
        row_base = (torch.arange(B * H, device=q.device) * (n + 1)).view(B, H, 1)
        for number, (plan, query_index) in enumerate(plans):
            out_slots, lse_slots = _gathered_pass_forward(*sources, plan, scale)  # (B, H, nq b, dv), (B, H, nq b)
            L = query_index.shape[-1]
            tokens = torch.where(query_index >= 0, query_index, n)  # (B, H, L)
            lse_slots = lse_slots[..., :L].masked_fill(tokens == n, NEG_INF)
            new_max = running_max.scatter_reduce(2, tokens, lse_slots, "amax")  # (B, H, n + 1)
            if number:  # (before the first pass acc and total are 0)
                decay = torch.where(running_max == NEG_INF, 0.0, torch.exp(running_max - _not_inf(new_max)))
                acc.mul_(decay[..., None])
                total.mul_(decay)
            weight = torch.exp(lse_slots - _not_inf(new_max).gather(2, tokens))  # (B, H, L): 0 for an empty row
            acc_rows.index_add_(0, (tokens + row_base).reshape(-1), out_slots[:, :, :L].mul_(weight[..., None]).reshape(-1, dv))
            total.scatter_add_(2, tokens, weight)
            running_max = new_max
            del out_slots
        has_keys = total > 0
        safe_total = torch.where(has_keys, total, torch.ones_like(total))
        out = heads_last(v, n).copy_(acc[:, :, :n].div_(safe_total[:, :, :n, None]))  # (B, H, n, dv) heads-last
        lse = torch.where(has_keys, _not_inf(running_max) + torch.log(safe_total), NEG_INF)[:, :, :n]  # (B, H, n)
        alone = None
        if self_keys is not None:  # the self rule: a query with no key outputs its own value
            items, heads, tokens = ((~has_keys[:, :, :n]) & (self_keys >= 0)[:, None]).nonzero(as_tuple=True)
            alone = (items, heads, tokens, self_keys[items, tokens])  # (A,) each: few rows
            out[items, heads, tokens] = v[items, heads, alone[3]].to(out.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.scale, ctx.alone = plans, scale, alone
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        compute, scale = lse.dtype, ctx.scale
        B, H, n, d = q.shape
        dv = v.shape[-1]
        sources = _Rows(q, compute), _Rows(k, compute), _Rows(v, compute)
        grad_o = _Rows(grad_out, compute)
        row_term = (grad_out.to(compute) * out.to(compute)).sum(-1)  # (B, H, n): D
        if grad_lse is not None:
            row_term = row_term - grad_lse.to(compute)
        row_term = F.pad(row_term * LN_2, (0, 1))  # (B, H, n + 1): ln(2) (D - grad_lse); n: empty slots
        lse2 = F.pad((lse * LOG2_E).masked_fill(lse == NEG_INF, float("inf")), (0, 1), value=float("inf"))
        grads = [torch.zeros(B, x.shape[2], H, x.shape[-1], dtype=compute, device=q.device).transpose(1, 2)
                 for x in (q, k, v)]  # heads-last, (B, H, N, f)
        sinks = [_Rows(g) for g in grads]
        for plan, query_index in ctx.plans:
            _gathered_pass_backward(*sources, grad_o, row_term, lse2, sinks, plan, query_index, scale)
        grad_q, grad_k, grad_v = grads
        grad_v.mul_(LOG2_E)  # the sinks hold ln(2) dV
        if ctx.alone is not None:  # the self rule's rows: out_i = v_j
            items, heads, tokens, keys = ctx.alone
            grad_v.index_put_((items, heads, keys), grad_out[items, heads, tokens].to(compute), accumulate=True)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def _gathered_pass_forward(q_rows: _Rows, k_rows: _Rows, v_rows: _Rows, plan: _Plan, scale: float):
    """One pass in slot order -> (out (B, H, nq b, dv), lse (B, H, nq b)) in the compute dtype."""
    B, H = plan.key_rows.shape[:2]
    b, d, dv = plan.block, q_rows.shape[-1], v_rows.shape[-1]
    work = _Workspace(q_rows.rows.dtype, q_rows.rows.device)
    out = q_rows.rows.new_empty(B, H, plan.nq, b, dv)
    lse = q_rows.rows.new_empty(B, H, plan.nq, b)
    for group, (g0, g1) in enumerate(plan.groups):
        queries = q_rows.gather(plan.query_tokens[:, :, g0 * b : g1 * b], work("queries", B, H, g1 - g0, b, d))
        out[:, :, g0:g1], lse[:, :, g0:g1] = _group_forward(queries.mul_(scale * LOG2_E), k_rows, v_rows, plan,
                                                            group, work)
    return out.flatten(2, 3), lse.flatten(2)


def _gathered_pass_backward(q_rows: _Rows, k_rows: _Rows, v_rows: _Rows, grad_o: _Rows, row_term: Tensor,
                            lse2: Tensor, sinks: list[_Rows], plan: _Plan, query_index: Tensor, scale: float) -> None:
    """One pass's share of dQ, ln(2) dK, ln(2) dV, added into the sinks by token. row_term and lse2
    (B, H, n + 1) are per token (index n: empty slots, lse2 +inf so that their p is 0)."""
    B, H = plan.key_rows.shape[:2]
    b, d, dv, n = plan.block, q_rows.shape[-1], v_rows.shape[-1], row_term.shape[-1] - 1
    work = _Workspace(q_rows.rows.dtype, q_rows.rows.device)
    tokens = F.pad(torch.where(query_index >= 0, query_index, n), (0, plan.nq * b - query_index.shape[-1]), value=n)
    row_term_slots = row_term.gather(2, tokens).view(B, H, plan.nq, b, 1)  # (B, H, nq, b, 1)
    lse2_slots = lse2.gather(2, tokens).view(B, H, plan.nq, b, 1)
    grad_q_sink, grad_k_sink, grad_v_sink = sinks
    for group, (g0, g1) in enumerate(plan.groups):
        G, rows = g1 - g0, plan.query_tokens[:, :, g0 * b : g1 * b]
        queries = q_rows.gather(rows, work("queries", B, H, G, b, d)).mul_(scale * LOG2_E)  # (B, H, G, b, d)
        grad_out = grad_o.gather(rows, work("grad_out", B, H, G, b, dv)).mul_(LN_2)  # (B, H, G, b, dv)
        grad_queries = _group_backward(queries, grad_out, row_term_slots[:, :, g0:g1], lse2_slots[:, :, g0:g1],
                                       k_rows, v_rows, plan, group, work, grad_k_sink, grad_v_sink)
        grad_q_sink.add_(rows, grad_queries.mul_(scale * LOG2_E))
