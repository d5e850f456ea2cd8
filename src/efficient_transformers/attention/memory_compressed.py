"""Memory-compressed attention (Liu et al. 2018, "Generating Wikipedia by Summarizing Long Sequences",
ICLR; arXiv 1801.10198), with the paper's local-attention layer as `mode="local"`.

**Compressed** (`mode="compressed"`, default). Keys and values are shortened along the length by a
strided 1-D convolution, kernel = stride = k (`compression`), and every query attends the N_c =
ceil(N / k) compressed slots:

    K_c[s] = sum_{t < k} K[s k + t] W^K_t + b^K,    V_c[s] = sum_{t < k} V[s k + t] W^V_t + b^V
    out_i  = sum_{s in C(i)} softmax_s(q_i . K_c[s] / sqrt(d)) V_c[s]

Bidirectional: C(i) = every slot. Causal (the paper's decoder "T-DMCA"), exactly causal: slot s
covers positions s k .. s k + k - 1 and query i attends it only when the whole window lies at or
before it,

    C(i) = {s : s k + k - 1 <= i},

plus its own *uncompressed recent keys*, the positions after the last complete window,

    R(i) = {j : k floor((i + 1) / k) <= j <= i}     (|R(i)| = (i + 1) mod k <= k - 1),

one softmax over the union (the two parts are computed separately and merged by their log-sum-exp,
`merge_by_lse`). So a query sees each earlier position exactly once: compressed inside a complete
window, raw in its own incomplete one; at the last position of a window the window has just
completed and is seen as its slot only. (The alternative "j in the query's window, j <= i" would
count a completed window twice; with R(i) as above k = 1 is exactly causal dense attention.) The
public implementation is not exactly causal in this sense (the project's issue 12); this one is, and
the tests check the rule element by element against the definition.

**Local** (`mode="local"`): the paper's other layer type, attention inside non-overlapping blocks of
b = `block_size` tokens, causal inside the block when causal: j in A(i) iff floor(j / b) = floor(i /
b) (and j <= i). A block-diagonal `BlockLayout`; `dense_mask(N)` is derived from it.

**Alternating layers** (the paper's 5-layer L-M-L-M-L decoder): `TransformerLM` takes one
`attention_options` for every layer today, so a model of mixed layers is built by replacing the
attention of the local layers after construction:

    lm = et.TransformerLM(..., depth=5, attention="memory_compressed")        # M everywhere
    for i in (0, 2, 4):
        lm.stack.blocks[i].attn = et.build_attention("memory_compressed", dim, heads, True, mode="local")

(`models/` is not changed here; a per-layer list of attention options, e.g. `attention_options=
[{"mode": "local"}, {}, ...]`, would make this a constructor argument.)

**Cost.** Compressed: O(N N_c d) = O(N^2 d / k) time (the survey's O(N_c^2)); the conv O(N d^2).
Memory O(N d), no N x N_c score tensor or mask on any path: bidirectional, the dense attention of N
queries over N_c slots runs in PyTorch's fused SDPA kernel (O(N d) memory in backward), or in
`core.block_sparse` with every slot block in every query block's row, which needs no (N, N_c) mask.
The block-sparse path runs when some slot is masked (padding). It also runs where the library's
float32 products run on oneDNN (`core.gemm.prefers_onednn`: AVX-512 CPUs not made by Intel), because
SDPA's kernel keeps its products on MKL's AVX2 path there. On the AMD EPYC that path measured 0.66×
SDPA's step time at N = 16K and 0.74× at 4K (dim 256, 4 heads, train, one thread, paired). Its peak
memory was 203 MiB against 171 at 16K (65 against 47 at 4K), 1.37× the vanilla layer's instead of
1.16×. Causal, the slot part
runs in `core.block_sparse` (online softmax over key blocks, scores recomputed in backward) and the
recent part is O(N k). Local: O(N b d) time, O(N d) memory (block-sparse).

**How the causal pattern is computed** (shared primitives only: `block_sparse_attention`, `merge_by_lse`,
`masked_softmax`):
- slots: compressed keys carry the position s k + k - 1 of their window's last token and the
  primitive's causal rule (pos_k <= pos_q) is then exactly C(i). The primitive computes every slot
  of a layout row, so a single call would spend half its work on the empty upper triangle; the
  queries are cut into `_SEGMENTS` (8) runs of query tiles, each called with the key blocks its last
  tile needs (tiles of `_TILE` = 256 queries and 256 slots; measured fastest of 64 / 128 / 256):
  about 1/2 + 1/16 of the rectangle is computed;
- recent keys: R(i) lies inside i's own conv window, so this part is a dense attention inside each
  window of k tokens (the conv's windows, views of the padded keys) under the fixed (k, k) rule
  "key offset <= query offset < k - 1", with the project's `masked_softmax`: O(N k) scores, plain
  autograd (measured cheaper in memory than a block-diagonal primitive call, whose N-sized key tables
  and gradient buffers cost about 30 MiB more at N = 16K for at most k - 1 keys per query); its
  log-sum-exp makes the merge exact. Skipped when k = 1;
- keys and values are zeroed and padded once to a multiple of k * 256 (one contiguous copy), so the
  conv's windows, the slot tables and the recent windows are all views of it and the primitive copies
  no key table; the extra slots lie after every query (never attended).

**Padding.** Keys and values are zeroed at padded positions before the convolution
(`core.masks.zero_padded`), so padded *content* never reaches a slot; a slot whose window has no
real token is masked (never attended; every slot of an all-padded item, so its queries get zeros).
A partly padded window is a real slot whose conv sees zeros at its padded positions (the slot's
value depends on where the padding is, never on what it holds); with k = 1 this is exactly dense
attention under the key mask. The last window of a sequence whose N is not a multiple of k is
zero-padded the same way (bidirectional it is a slot; causal no query can see it before it
completes, and decoding completes it with the real tokens).

**Convolution parameters** (compressed mode only): per head, separate for keys and values,
`compress_k` and `compress_v` of shape (H, k d, d) (the conv's (d, d, k) kernel of each head,
flattened as a matrix on the window's k d numbers; kernel = stride makes the conv exactly this
product on non-overlapping windows) and biases (H, d). Per head, as lucidrains' grouped conv
(groups = heads), so the compression mixes no heads and `attend(q, k, v)` stays a per-head core.
Initialised as mean pooling (W_t = I / k, bias 0): the slots start as window averages (k = 1: the
identity, so a fresh k = 1 layer is dense attention) and training moves them from there.

Options (defaults):
- `mode="compressed"`: "compressed" | "local", the layer type (paper: both, alternating);
- `compression=3`: k, kernel = stride of the convolution (paper: 3); compressed mode only;
- `block_size=256`: b, the local blocks (paper: 256); local mode only.
An option of the mode not in use must stay at its default (else ValueError: nothing is ignored).

Decoding (causal): compressed mode keeps `CompressedKVState` = the compressed slots so far (one per
complete window, N_c = floor(length / k), the mechanism's memory: O(N / k)) plus the raw, zeroed keys
and values of the current incomplete window (at most k - 1: what R(i) reads and what the next slot is
convolved from). A step appends the new tokens to the raw window, compresses every window that
completes and attends [slots; raw] densely under the rule above (at most `_DECODE_CHUNK` queries at a
time, so a long chunk never builds a large mask). Local mode keeps a `PositionedKVCache` of the
current block (at most b - 1 keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import AttentionLayer, PositionedKVCache, dense_attention, masked_softmax, pad_to_multiple, zero_padded
from ..core import options as opt
from ..core.block_sparse import (DEFAULT_SCORE_BUDGET, NO_BLOCK, BlockLayout, block_sparse_attention,
                                 dense_over_compressed_keys, merge_by_lse, window_blocks)
from ..registry import Card, register

MODES = ("compressed", "local")
DEFAULT_COMPRESSION = 3
DEFAULT_BLOCK_SIZE = 256
_TILE = 256  # query / slot tile of the causal slot attention
_SEGMENTS = 8  # query runs of the causal slot attention (the triangle's waste is 1 / (2 _SEGMENTS))
_SCORE_BUDGET = DEFAULT_SCORE_BUDGET  # the primitive's transient score elements per step
_DECODE_CHUNK = 64  # queries per dense step when a state is given


@dataclass
class CompressedKVState:
    """Decoding state of causal compressed attention.

    slot_k, slot_v: (B, H, S, d) the compressed slots of the S = length // k complete windows
    slot_mask:      (B, S) bool, the window has a real token
    recent_k/_v:    (B, H, r, d) raw keys/values of the incomplete window, zero where padded (r = length % k)
    recent_mask:    (B, r) bool
    length:         tokens consumed so far
    """

    slot_k: Tensor
    slot_v: Tensor
    slot_mask: Tensor
    recent_k: Tensor
    recent_v: Tensor
    recent_mask: Tensor
    length: int


@register(
    Card(
        name="memory_compressed",
        title="Memory Compressed Transformer",
        paper="Liu et al., Generating Wikipedia by Summarizing Long Sequences, ICLR 2018 (arXiv 1801.10198)",
        year=2018,
        complexity="O(N_c^2)",
        classes=("FP", "M"),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=False,  # compressed mode attends convolved slots, not a subset of the keys
    )
)
class MemoryCompressedAttention(AttentionLayer):
    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool = False,
        *,
        mode: str = "compressed",
        compression: int = DEFAULT_COMPRESSION,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        super().__init__(dim, heads, causal)
        name = self.card.name
        self.mode = opt.choice(name, "mode", mode, MODES)
        self.compression = opt.positive_int(name, "compression", compression,
                                            what="kernel = stride of the key/value convolution")
        self.block_size = opt.positive_int(name, "block_size", block_size, what="the local blocks")
        unused = ("block_size", block_size, DEFAULT_BLOCK_SIZE) if mode == "compressed" else \
            ("compression", compression, DEFAULT_COMPRESSION)
        if unused[1] != unused[2]:
            raise ValueError(f"{name}: {unused[0]}={unused[1]!r} has no effect with mode={mode!r}; allowed: the "
                             f"default {unused[0]}={unused[2]!r} (or the mode that uses it)")
        self._tile = _TILE
        if mode == "compressed":
            c, d = compression, self.head_dim
            pool = torch.eye(d).repeat(c, 1) / c  # (c d, d): the mean of the window
            self.compress_k = nn.Parameter(pool.expand(heads, c * d, d).clone())  # (H, c d, d)
            self.compress_v = nn.Parameter(pool.expand(heads, c * d, d).clone())
            self.compress_k_bias = nn.Parameter(torch.zeros(heads, d))  # (H, d)
            self.compress_v_bias = nn.Parameter(torch.zeros(heads, d))

    def extra_repr(self) -> str:
        size = f"compression={self.compression}" if self.mode == "compressed" else f"block_size={self.block_size}"
        return f"{super().extra_repr()}, mode={self.mode}, {size}"

    # ------------------------------------------------------------------ the pattern (local mode)
    def _local_layout(self, n: int, device=None) -> BlockLayout:
        b = self.block_size
        return BlockLayout(b, window_blocks(-(-n // b), 0, 0, device=device), causal=self.causal)

    def dense_mask(self, n: int) -> Tensor:
        """(N, N) bool, local mode: the block-diagonal pattern (causal inside a block when causal)."""
        if self.mode != "local":
            raise ValueError(
                f"{self.card.name}: dense_mask is defined for mode='local' only, got mode={self.mode!r}; compressed "
                "attention attends convolved slots, not a subset of the original keys; allowed: mode='local'")
        opt.positive_int(self.card.name, "N", n)
        return self._local_layout(n).dense_mask(n)

    def _local_allowed(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """The local rule (1, n, m) on absolute positions, for decoding over the cache."""
        b = self.block_size
        qp, kp = query_positions[:, None], key_positions[None, :]  # (n, 1), (1, m)
        return ((qp // b == kp // b) & (kp <= qp))[None]

    # ------------------------------------------------------------------ the core
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state, **extra):
        if self.mode == "local":
            if not self.causal:
                return block_sparse_attention(q, k, v, self._local_layout(q.shape[-2], q.device), mask)[0], None
            if state is not None and not isinstance(state, PositionedKVCache):
                raise ValueError(f"{self.card.name}: state must be the PositionedKVCache this local layer returned, "
                                 f"got {type(state).__name__}; allowed: a PositionedKVCache or None")
            b = self.block_size
            return self._attend_cached_pattern(
                q, k, v, mask, state, self._local_allowed,
                lambda positions, next_position: positions // b == next_position // b,
                full=lambda q_, k_, v_, m_: block_sparse_attention(q_, k_, v_, self._local_layout(q_.shape[-2], q_.device), m_)[0],
            )
        if not self.causal:
            slot_k, slot_v, slot_mask = self._compress(k, v, mask)  # (B, H, N_c, d) x 2, (B, N_c) | None
            if slot_mask is None:  # SDPA, or the block-sparse engine where the products run on oneDNN
                return dense_over_compressed_keys(q, slot_k, slot_v, block_size=self._tile), None
            # with padding, SDPA would need an (N, N_c) mask: every query block attends every slot
            # block through the block-sparse primitive instead (online softmax, scores recomputed)
            layout = BlockLayout.every_key(self._tile, q.shape[-2], slot_k.shape[-2], device=q.device)
            return block_sparse_attention(q, slot_k, slot_v, layout, slot_mask)[0], None
        if state is not None:
            return self._decode(q, k, v, mask, state)
        return self._causal(q, k, v, mask)

    # ------------------------------------------------------------------ compression
    def _compress(self, k: Tensor, v: Tensor, mask: Tensor | None):
        """Zero padded positions, pad N to a multiple of k, convolve -> slot keys, values (B, H, ceil(N/k), d)
        and the slot mask (B, ceil(N/k)) (a window with a real token), None when mask is None."""
        c = self.compression
        k, v = zero_padded(k, mask, seq_dim=2), zero_padded(v, mask, seq_dim=2)
        slot_k = self._convolve(pad_to_multiple(k, c, dim=2)[0], self.compress_k, self.compress_k_bias)
        slot_v = self._convolve(pad_to_multiple(v, c, dim=2)[0], self.compress_v, self.compress_v_bias)
        slot_mask = None
        if mask is not None:
            slot_mask = pad_to_multiple(mask, c, dim=1, value=False)[0].unflatten(1, (-1, c)).any(-1)  # (B, N_c)
        return slot_k, slot_v, slot_mask

    def _convolve(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """x (B, H, n, d), n a multiple of k -> (B, H, n / k, d): the strided conv as one batched product."""
        B, H, n, d = x.shape
        windows = x.reshape(B, H, n // self.compression, self.compression * d)  # (B, H, n/k, k d)
        return torch.matmul(windows, weight.to(x.dtype)) + bias.to(x.dtype)[:, None, :]  # (B, H, n/k, d)

    # ------------------------------------------------------------------ causal, parallel form
    def _causal(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None):
        """Causal compressed attention over a whole sequence -> (out, state after it).

        Keys and values are zeroed at padding and padded once to a multiple of k * tile (one contiguous
        copy), so the conv's windows and the primitive's key tables (slots and recent keys) are views of
        it: the primitive then copies no key table, forward or backward. The extra slots and keys lie
        after every query and are never attended (causal rule)."""
        n, c = q.shape[-2], self.compression
        unit = c * self._tile
        k0 = pad_to_multiple(zero_padded(k, mask, seq_dim=2), unit, dim=2)[0].contiguous()  # (B, H, Np, d)
        v0 = pad_to_multiple(zero_padded(v, mask, seq_dim=2), unit, dim=2)[0].contiguous()
        key_mask = None if mask is None else pad_to_multiple(mask, unit, dim=1, value=False)[0]  # (B, Np)
        slot_k = self._convolve(k0, self.compress_k, self.compress_k_bias)  # (B, H, Np / k, d)
        slot_v = self._convolve(v0, self.compress_v, self.compress_v_bias)
        slot_mask = None if key_mask is None else key_mask.unflatten(1, (-1, c)).any(-1)  # (B, Np / k)
        out, lse = self._slot_part(q, slot_k, slot_v, slot_mask)
        if c > 1:
            out, lse = merge_by_lse(out, lse, *self._recent_part(q, k0, v0, key_mask))
        return out, self._state_after(k, v, mask, slot_k, slot_v, slot_mask)

    def _slot_part(self, q: Tensor, slot_k: Tensor, slot_v: Tensor, slot_mask: Tensor | None):
        """Query i over the slots s with s k + k - 1 <= i -> (out, lse), in `_SEGMENTS` query runs."""
        n, c, b, device = q.shape[-2], self.compression, self._tile, q.device
        nq = -(-n // b)
        runs = min(_SEGMENTS, nq)
        bounds = [round(i * nq / runs) for i in range(runs + 1)]
        key_positions = torch.arange(slot_k.shape[-2], device=device) * c + (c - 1)  # last token of the window
        sizes = [min(e * b, n) - a * b for a, e in zip(bounds[:-1], bounds[1:])]
        outs, lses = [], []
        for (a, e), q_run in zip(zip(bounds[:-1], bounds[1:]), torch.split(q, sizes, dim=2)):
            last_query = torch.clamp(torch.arange(a, e, device=device) * b + (b - 1), max=n - 1)  # per tile
            reach = torch.div(last_query - (c - 1), b * c, rounding_mode="floor")  # (tiles,) last key block, -1: none
            width = max(1, int(reach.max()) + 1)
            blocks = torch.arange(width, device=device)[None, :]  # (1, S)
            blocks = torch.where(blocks <= reach[:, None], blocks, NO_BLOCK)  # (tiles, S)
            query_positions = torch.arange(a * b, a * b + q_run.shape[-2], device=device)
            layout = BlockLayout(b, blocks[None], query_positions=query_positions, key_positions=key_positions,
                                 causal=True)
            out, lse = block_sparse_attention(q_run, slot_k, slot_v, layout, slot_mask, score_budget=_SCORE_BUDGET)
            outs.append(out)
            lses.append(lse)
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)  # (B, H, N, d), (B, H, N)

    def _recent_part(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None):
        """Query i over its raw recent keys R(i) -> (out, lse). R(i) lies inside i's conv window, so this is
        a dense attention inside each window of k tokens (the conv's own windows: views of the padded keys)
        under the fixed (k, k) rule "key t <= query t < k - 1" and the window's key mask, in plain autograd
        with the project's `masked_softmax`: O(N k) scores. k, v: (B, H, Np, d), zeroed, padded and
        contiguous; mask (B, Np) or None."""
        n, c, d = q.shape[-2], self.compression, q.shape[-1]
        windows = k.shape[-2] // c  # every window of the padded keys: (B, H, W) then flattens as a view
        qw = torch.nn.functional.pad(q, (0, 0, 0, windows * c - n)).unflatten(2, (windows, c))  # (B, H, W, k, d)
        kw, vw = k.unflatten(2, (windows, c)), v.unflatten(2, (windows, c))  # (B, H, W, k, d), views
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = torch.matmul(qw, kw.transpose(-1, -2)).to(compute) / math.sqrt(d)  # (B, H, W, k, k)
        offsets = torch.arange(c, device=q.device)
        allowed = (offsets[None, :] <= offsets[:, None]) & (offsets[:, None] < c - 1)  # (k, k): R(i) in the window
        if mask is not None:
            allowed = allowed & mask.view(-1, 1, windows, 1, c)  # (B, 1, W, k, k)
        probs = masked_softmax(scores, allowed)  # (B, H, W, k, k), empty rows 0
        out = torch.matmul(probs.to(vw.dtype), vw).flatten(2, 3)[:, :, :n]  # (B, H, N, d)
        has_key = allowed.any(-1)  # (.., W, k)
        safe = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key[..., None], 0.0)
        lse = torch.where(has_key, torch.logsumexp(safe, -1), float("-inf")).flatten(2)[:, :, :n]  # (B, H, N)
        return out, lse

    def _state_after(self, k, v, mask, slot_k, slot_v, slot_mask) -> CompressedKVState:
        """The decoding state after a whole sequence: its complete windows' slots, its incomplete window raw."""
        B, _, n, _ = k.shape
        c = self.compression
        full = n // c
        if mask is None:
            mask = torch.ones(B, n, dtype=torch.bool, device=k.device)
        if slot_mask is None:
            slot_mask = torch.ones(B, slot_k.shape[-2], dtype=torch.bool, device=k.device)
        recent = slice(full * c, n)
        return CompressedKVState(
            slot_k[:, :, :full], slot_v[:, :, :full], slot_mask[:, :full],
            zero_padded(k[:, :, recent], mask[:, recent], seq_dim=2),
            zero_padded(v[:, :, recent], mask[:, recent], seq_dim=2), mask[:, recent], n,
        )

    # ------------------------------------------------------------------ causal, decoding
    def _decode(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: CompressedKVState):
        if not isinstance(state, CompressedKVState):
            raise ValueError(f"{self.card.name}: state must be the CompressedKVState this layer returned, got "
                             f"{type(state).__name__}; allowed: a CompressedKVState or None")
        if mask is None:
            mask = torch.ones(q.shape[0], q.shape[-2], dtype=torch.bool, device=q.device)
        outs = []
        for start in range(0, q.shape[-2], _DECODE_CHUNK):
            part = slice(start, start + _DECODE_CHUNK)
            out, state = self._step(q[:, :, part], k[:, :, part], v[:, :, part], mask[:, part], state)
            outs.append(out)
        return torch.cat(outs, dim=2), state

    def _step(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, state: CompressedKVState):
        """n new tokens at positions L .. L + n - 1 -> their outputs and the state after them."""
        B, H, n, d = q.shape
        c, length = self.compression, state.length
        raw_k = torch.cat([state.recent_k, zero_padded(k, mask, seq_dim=2)], dim=2)  # (B, H, r + n, d)
        raw_v = torch.cat([state.recent_v, zero_padded(v, mask, seq_dim=2)], dim=2)
        raw_mask = torch.cat([state.recent_mask, mask], dim=1)  # (B, r + n)
        raw_start = length - state.recent_k.shape[-2]  # a multiple of k
        done = raw_k.shape[-2] // c * c  # raw tokens whose windows complete now
        slot_k = torch.cat([state.slot_k, self._convolve(raw_k[:, :, :done], self.compress_k, self.compress_k_bias)], 2)
        slot_v = torch.cat([state.slot_v, self._convolve(raw_v[:, :, :done], self.compress_v, self.compress_v_bias)], 2)
        slot_mask = torch.cat([state.slot_mask, raw_mask[:, :done].unflatten(1, (-1, c)).any(-1)], dim=1)
        device = q.device
        qp = torch.arange(length, length + n, device=device)[:, None]  # (n, 1)
        slot_pos = torch.arange(slot_k.shape[-2], device=device)[None, :] * c + (c - 1)  # (1, S)
        raw_pos = torch.arange(raw_start, raw_start + raw_k.shape[-2], device=device)[None, :]  # (1, r + n)
        allowed = torch.cat([slot_pos <= qp, (raw_pos <= qp) & (raw_pos >= (qp + 1) // c * c)], dim=1)  # (n, S + r + n)
        out = dense_attention(q, torch.cat([slot_k, raw_k], 2), torch.cat([slot_v, raw_v], 2),
                              key_mask=torch.cat([slot_mask, raw_mask], 1), allowed=allowed[None, None])
        new_state = CompressedKVState(slot_k, slot_v, slot_mask, raw_k[:, :, done:], raw_v[:, :, done:],
                                      raw_mask[:, done:], length + n)
        return out, new_state
