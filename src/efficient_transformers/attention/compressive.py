"""Compressive Transformer (Rae et al. 2020, "Compressive Transformers for Long-Range Sequence
Modelling", ICLR; arXiv 1911.05507): Transformer-XL plus a compressed memory.

Each layer keeps, besides Transformer-XL's memory of its last `mem_len` inputs, a compressed memory
of `cmem_len` slots. States leaving the memory are compressed at rate c by f_c, c consecutive states
to one slot, and pushed into the compressed memory (the oldest slots fall out). A query attends

    [compressed memory; memory; segment]          range l (mem_len + c cmem_len) over l layers

with Transformer-XL's relative-position scores (`attention.transformer_xl`); a compressed slot counts
as one position of that concatenation (its distance to query p is p - w + (w / c - g) for group g and
raw-window start w), so with c = 1 and an identity f_c (mean or max pooling of one state) the layer is
exactly Transformer-XL with memory mem_len + cmem_len (tested).

f_c (`compression`): "max" / "mean" pooling over the c states; "conv", a 1-D convolution with
kernel = stride = c (started as mean pooling); "dilated_conv", a convolution of kernel ceil(c/2) with
dilation 2 and stride c (every second state of the group; a decision where the paper gives no
shape); "most_used" (below). Padded states never enter a slot (a slot of padding only is masked out).

"most_used" (section 3.1: memories sorted by their average attention, the most-used kept, in order;
after the DNC's usage-based freeing). Decisions where the paper is silent:

- Usage of a raw state j: the mean, over heads and over the real queries p that attended it while
  it was raw (j in [w(p), p] with same_length; with same_length=False, every query p >= j of each call
  during which j was in the memory or the segment), of its attention weight normalised over the raw window only
  (memory + segment, the compressed slots left out of the denominator). Leaving the slots out makes a
  state's usage independent of how older states were compressed, so one chunk's usage needs nothing
  but its own raw scores: the usage of the groups leaving during a chunk is complete (the last query
  attending group g raw is mem_len + (g + 1) c - 1, just before the first query attending its slot)
  when that chunk's segment x (memory + segment) scores are formed, and the slots the chunk's queries
  attend are made right after, from those scores, before the chunk's full softmax. The cost is one
  more softmax over the scores the chunk already forms, and O(n K) sums; no extra score pass, no
  N x N tensor, no per-group loop.
- Selection: each aligned group of c states keeps its most-used state (the first on ties; padded
  states never), i.e. the paper's "keep the n_s / c most used of the n_s leaving states" applied per
  group of c, the unit in which states leave the raw window in the streaming form (the paper sorts
  the whole block of states leaving at once, which would make the choice depend on how the stream
  is cut). The order is preserved trivially (one state per group, groups in order); the slot sits at
  its group's concatenation distance like every other f_c, and holds that state itself (the main
  loss reaches it, and only it, within a call; c = 1 is the identity).
- The state carries, per raw state it holds, the summed weights and the number of attending queries
  (`CompressiveMemory.usage`, `usage_queries`), so one call, segments with the memory and token by
  token decoding select the same states (tested against a float64 query-by-query reference).
- Training: most_used has no parameters, so there is nothing for the attention-reconstruction loss
  to train and none is computed or reported (as for pooling: the paper's compression losses train
  f_c's parameters, and a selector has none); the selection is not differentiable (usage is computed
  without gradient), the kept states are.

Training the compressor (section 3.2): the attention-reconstruction loss

    L_ar = || attn(h, old) - attn(h, f_c(old)) ||^2        (content-only attention, mean squared error)

for the states compressed during a call (`old`) and the call's hidden states h, with every input
and the layer's projections detached, so it trains f_c only; in the main attention f_c's parameters
are detached, so the task loss never trains f_c. The compressed memory carried between calls is
detached like the memory; within one call the task loss reaches the states compressed in that call
(as it reaches the call's raw keys), so at rate 1 even the gradients equal Transformer-XL's. It is reported as the auxiliary
loss "compressive_reconstruction" (weight `reconstruction_weight`) in training mode when f_c has
parameters (conv, dilated_conv); pooling has nothing to train, and evaluation computes no L_ar.

Groups are aligned to the stream: group g holds positions g c .. g c + c - 1, and it is compressed
once it is entirely older than the raw window. With `same_length=True` (default) the raw window of
query p starts at w(p) = c floor((p - mem_len) / c) (so it holds mem_len + 1 .. mem_len + c states)
and the cmem_len groups before it are attended: the output is the same however the stream is cut
into calls (decoding equals the full forward). With `same_length=False` (the paper's form) every query
of a call attends the whole state (compressed slots and raw memory) and the call's causal prefix.
The state (`CompressiveMemory`) holds at most mem_len + c - 1 raw states and cmem_len slots (most_used:
also two numbers per raw state): constant over a stream. Cost per segment of n tokens: n (cmem_len + mem_len + c + n) scores per head.

Contract: `forward(x, mask, state=CompressiveMemory)` as Transformer-XL's; `attend` is not offered
(f_c acts on the hidden states, so the attention is not a function of per-head q, k, v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import masked_softmax
from ..core import gemm
from ..core import options as opt
from ..core.relative_positions import relative_scores
from ..registry import Card, register
from .transformer_xl import MIN_CHUNK, TransformerXLAttention, _cat_masks

COMPRESSIONS = ("conv", "dilated_conv", "max", "mean", "most_used")


@dataclass
class CompressiveMemory:
    """One layer's state: raw inputs at positions [length - m, length) and compressed slots before them."""

    hidden: Tensor  # (B, m, dim), detached; m <= mem_len + c - 1
    key_mask: Tensor | None  # (B, m) bool or None
    compressed: Tensor  # (B, s, dim), detached; s <= cmem_len; slot i is group (length - m) / c - s + i
    compressed_mask: Tensor | None  # (B, s) bool or None
    length: int
    #: compression="most_used" only (else None): per raw state, its attention weights summed over heads and the
    #: queries that attended it so far, and the number of those queries
    usage: Tensor | None = None  # (B, m) float
    usage_queries: Tensor | None = None  # (B, m) int64

    def numel(self) -> int:
        return sum(t.numel() for t in (self.hidden, self.key_mask, self.compressed, self.compressed_mask, self.usage,
                                       self.usage_queries) if t is not None)


@register(
    Card(
        name="compressive",
        title="Compressive Transformer",
        paper="Rae et al., Compressive Transformers for Long-Range Sequence Modelling, ICLR 2020 (arXiv 1911.05507)",
        year=2020,
        complexity="O(N^2)",
        classes=("RC",),
        causal=True,
        bidirectional=False,
        decoding="recurrent",
        own_positions=True,
        test_options={"mem_len": 4, "cmem_len": 3, "compression_rate": 2},
        notes=(
            "Transformer-XL with a compressed memory: the state is each layer's last mem_len (+ up to c - 1) inputs "
            "and cmem_len compressed slots (constant size); forward(x, mask, state=CompressiveMemory) -> (y, "
            "CompressiveMemory); no attend() (f_c acts on hidden states). The attention-reconstruction loss trains "
            "f_c (aux loss 'compressive_reconstruction'). compression='most_used' keeps each group's most-attended "
            "state (usage: mean raw-window attention weight, carried in the memory; no reconstruction loss). "
            "same_length as Transformer-XL."
        ),
    )
)
class CompressiveAttention(TransformerXLAttention):
    has_attend = False

    def __init__(self, dim: int, heads: int, causal: bool = True, *, mem_len: int = 512, cmem_len: int = 512,
                 compression_rate: int = 2, compression: str = "conv", reconstruction_weight: float = 1.0,
                 same_length: bool = True) -> None:
        super().__init__(dim, heads, causal, mem_len=mem_len, same_length=same_length)
        name = self.card.name
        self.cmem_len = opt.int_in_range(name, "cmem_len", cmem_len, 0)
        if not isinstance(compression_rate, int) or isinstance(compression_rate, bool) or compression_rate < 1:
            raise ValueError(f"{name}: compression_rate must be an int >= 1 (states per compressed slot), got "
                             f"{compression_rate!r}; allowed: an int >= 1")
        self.rate = compression_rate
        self.compression = opt.choice(name, "compression", compression, COMPRESSIONS)
        self.reconstruction_weight = opt.number_in_range(name, "reconstruction_weight", reconstruction_weight, 0.0)
        taps = {"conv": self.rate, "dilated_conv": math.ceil(self.rate / 2)}.get(compression)
        if taps is None:
            self.compress_weight = self.compress_bias = None
        else:  # (dim_out, dim_in, taps), started as the mean of the taps
            eye = torch.eye(dim)[:, :, None].expand(dim, dim, taps) / taps
            self.compress_weight = nn.Parameter(eye + 0.01 * torch.randn(dim, dim, taps) / math.sqrt(dim * taps))
            self.compress_bias = nn.Parameter(torch.zeros(dim))

    # ------------------------------------------------------------------ f_c
    def compress(self, groups: Tensor, group_mask: Tensor | None, *,
                 detach_parameters: bool = False) -> tuple[Tensor, Tensor | None]:
        """f_c: groups (B, G, c, dim), group_mask (B, G, c) or None -> slots (B, G, dim), slot mask (B, G) or None."""
        if self.compression == "most_used":
            raise ValueError(f"{self.card.name}: compression='most_used' selects by the attention the states received; "
                             f"use select_most_used(groups, group_mask, usage); allowed here: {COMPRESSIONS[:-1]}")
        real = None if group_mask is None else group_mask[..., None].to(groups.dtype)  # (B, G, c, 1)
        if self.compression == "max":
            filled = groups if group_mask is None else groups.masked_fill(~group_mask[..., None], float("-inf"))
            slots = filled.max(dim=2).values  # (B, G, dim)
        elif self.compression == "mean":
            count = groups.shape[2] if real is None else real.sum(2).clamp(min=1)
            slots = (groups if real is None else groups * real).sum(2) / count  # (B, G, dim)
        else:
            zeroed = groups if real is None else groups * real
            taps = zeroed if self.compression == "conv" else zeroed[:, :, 0::2]  # dilation 2: every second state
            w, bias = self.compress_weight, self.compress_bias
            if detach_parameters:
                w, bias = w.detach(), bias.detach()
            slots = torch.einsum("bgti,oit->bgo", taps, w.to(groups.dtype)) + bias.to(groups.dtype)  # (B, G, dim)
        if group_mask is None:
            return slots, None
        slot_mask = group_mask.any(dim=2)  # (B, G)
        return slots.masked_fill(~slot_mask[..., None], 0.0), slot_mask

    def _window_start(self, positions: Tensor) -> Tensor:
        """w(p): the first raw position query p attends (same_length), a multiple of c."""
        return (torch.div(positions - self.mem_len, self.rate, rounding_mode="floor") * self.rate).clamp(min=0)

    # ------------------------------------------------------------------ the layer
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state, hidden: Tensor | None = None):
        B, n, c = q.shape[0], q.shape[-2], self.rate
        device = q.device
        self.check_memory(state, B, device)
        start = 0 if state is None else state.length  # stream position of the first query
        m = 0 if state is None else state.hidden.shape[1]
        w_prev = start - m  # raw positions held: [w_prev, start)
        end = start + n
        w_next = int(self._window_start(torch.tensor(end)))
        ctx_hidden = hidden.detach() if m == 0 else torch.cat([state.hidden.to(hidden.dtype), hidden.detach()], dim=1)
        ctx_mask = _cat_masks(None if state is None else state.key_mask, mask, m, n, B, device)  # (B, m + n)
        mem_k, mem_v = (None, None) if m == 0 else self.project_memory(state.hidden.to(hidden.dtype))
        keys = k if m == 0 else torch.cat([mem_k, k], dim=-2)  # (B, H, m + n, d)
        values = v if m == 0 else torch.cat([mem_v, v], dim=-2)
        # the groups leaving the raw window during this call: positions [w_prev, w_next)
        n_new = (w_next - w_prev) // c
        groups = ctx_hidden[:, :n_new * c].reshape(B, n_new, c, self.dim)  # (B, G_new, c, dim)
        group_mask = None if ctx_mask is None else ctx_mask[:, :n_new * c].reshape(B, n_new, c)
        # the main network's slots: f_c with its parameters detached (the main loss never trains f_c), of the
        # live states (within the call, the main loss reaches the states, as it reaches the call's raw keys)
        live = hidden if m == 0 else torch.cat([state.hidden.to(hidden.dtype), hidden], dim=1)  # (B, m + n, dim)
        live_groups = live[:, :n_new * c].reshape(B, n_new, c, self.dim)  # (B, G_new, c, dim)
        usage = None
        if self.compression == "most_used":  # slots made as their groups' usage completes, inside the chunk loop
            dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
            usage = _Usage(state, m, n, B, self.heads, device, dtype)
            make = lambda a, b: self.select_most_used(  # noqa: E731
                live_groups[:, a:b], None if group_mask is None else group_mask[:, a:b], usage.average(a * c, b * c, c))
        else:
            made = self.compress(live_groups, group_mask, detach_parameters=True)  # (B, G_new, dim), (B, G_new)
            make = lambda a, b: (made[0][:, a:b], None if made[1] is None else made[1][:, a:b])  # noqa: E731
        # L_ar's slots: f_c of the detached states with its parameters (trained by L_ar only)
        new_slots = self.compress(groups, group_mask)[0] if n_new and self._trains_compressor() else None
        new_slot_mask = None if group_mask is None else group_mask.any(dim=2)  # (B, G_new)
        bank = _SlotBank(self, None if state is None else state.compressed.to(hidden.dtype),
                         None if state is None else state.compressed_mask, make, n_new, B, device, hidden.dtype)
        if usage is None:
            bank.make_up_to(n_new)
        first_group = w_prev // c - bank.s_old  # group id of the bank's slot 0

        chunk = max(self.mem_len, MIN_CHUNK) if self.same_length else n
        span = (m + n if not self.same_length else chunk + self.mem_len + c) + self.cmem_len + c + 1
        r = self.position_keys(span, device)  # (H, span, d): distances 0 .. span-1
        outs, sse, count = [], q.new_zeros((), dtype=torch.float32), 0
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            positions = torch.arange(start + s, start + e, device=device)  # (n_c,)
            w = self._window_start(positions) if self.same_length else torch.full_like(positions, w_prev)
            outs.append(self._chunk(q[..., s:e, :], positions, w, keys, values, ctx_mask, w_prev, bank, first_group, r,
                                    usage, None if mask is None else mask[:, s:e]))
            if new_slots is not None:
                leave_lo = int(w[0]) if self.same_length else w_prev
                leave_hi = int(self._window_start(torch.tensor(start + e))) if self.same_length else w_next
                g_lo, g_hi = (leave_lo - w_prev) // c, (leave_hi - w_prev) // c  # new groups leaving in this chunk
                if g_hi > g_lo:
                    part_sse, part_count = self._reconstruction(
                        hidden[:, s:e].detach(), None if mask is None else mask[:, s:e], groups[:, g_lo:g_hi],
                        None if group_mask is None else group_mask[:, g_lo:g_hi], new_slots[:, g_lo:g_hi],
                        None if new_slot_mask is None else new_slot_mask[:, g_lo:g_hi])
                    sse, count = sse + part_sse, count + part_count
        if count:
            self.report_aux_loss("compressive_reconstruction", sse / count, self.reconstruction_weight)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)  # (B, H, n, d)
        bank.make_up_to(n_new)  # groups leaving after the call's last query (their usage is complete by then)
        slots, slot_mask = bank.slots, bank.mask
        keep = w_next - w_prev
        raw_mask = None if ctx_mask is None else ctx_mask[:, keep:]
        kept = max(0, slots.shape[1] - self.cmem_len)
        kept_mask = None if slot_mask is None else slot_mask[:, kept:]
        usage_sum, usage_queries = (None, None) if usage is None else usage.kept(keep)
        new_state = CompressiveMemory(ctx_hidden[:, keep:], _none_if_all(raw_mask), slots[:, kept:].detach(),
                                      _none_if_all(kept_mask), end, usage_sum, usage_queries)
        return out, new_state

    def _chunk(self, q: Tensor, positions: Tensor, w: Tensor, keys: Tensor, values: Tensor, ctx_mask: Tensor | None,
               w_prev: int, bank: "_SlotBank", first_group: int, r: Tensor, usage: "_Usage | None" = None,
               query_mask: Tensor | None = None) -> Tensor:
        """Queries at `positions` (n,), raw window starts `w` (n,) -> outputs (B, H, n, d)."""
        n, c, device = q.shape[-2], self.rate, q.device
        lo, hi = int(w.min()) - w_prev, int(positions[-1]) + 1 - w_prev  # the raw keys of the chunk (context index)
        K = hi - lo
        raw_scores = relative_scores(q, keys[..., lo:hi, :], r[:, :K].flip(1), self.content_bias, self.position_bias)
        key_pos = torch.arange(lo, hi, device=device) + w_prev  # (K,)
        allowed = (key_pos[None, :] >= w[:, None]) & (key_pos[None, :] <= positions[:, None])  # (n, K)
        allowed = allowed[None, None] if ctx_mask is None else allowed[None, None] & ctx_mask[:, None, None, lo:hi]
        if usage is not None:  # most_used: this chunk's share of the raw states' usage, before its slots are made
            usage.add(raw_scores, allowed, query_mask, lo)
        parts_scores, parts_allowed, parts_values = [raw_scores], [allowed], [values[..., lo:hi, :]]
        group_of_w = torch.div(w, c, rounding_mode="floor")  # (n,): the first group inside the raw window
        g_lo = max(first_group, int(group_of_w.min()) - self.cmem_len)
        g_hi = int(group_of_w.max())
        if g_hi > g_lo:
            bank.make_up_to(g_hi - first_group - bank.s_old)  # the new slots this chunk attends
        if bank.slots.shape[1] and g_hi > g_lo:
            i_lo, i_hi = g_lo - first_group, g_hi - first_group  # slot indices
            kc, vc = bank.keys[..., i_lo:i_hi, :], bank.values[..., i_lo:i_hi, :]  # (B, H, G, d)
            g = torch.arange(g_lo, g_hi, device=device)  # (G,)
            distance = (positions - w)[:, None] + group_of_w[:, None] - g[None, :]  # (n, G): concatenation index
            ok = (g[None, :] < group_of_w[:, None]) & (g[None, :] >= group_of_w[:, None] - self.cmem_len)
            dtype = raw_scores.dtype
            qf = q.to(dtype)
            content = gemm.product_with_grad(qf + self.content_bias.to(dtype)[None, :, None, :],
                                             kc.to(dtype).transpose(-1, -2))  # (B, H, n, G)
            by_distance = gemm.product_with_grad(qf + self.position_bias.to(dtype)[None, :, None, :],
                                                 r.to(dtype).transpose(-1, -2)[None])  # (B, H, n, span)
            index = distance.clamp(0, r.shape[1] - 1)[None, None].expand(*content.shape)
            position = torch.gather(by_distance, -1, index)  # (B, H, n, G)
            parts_scores.insert(0, (content + position) / math.sqrt(q.shape[-1]))
            slot_mask = bank.mask
            ok = ok[None, None] if slot_mask is None else ok[None, None] & slot_mask[:, None, None, i_lo:i_hi]
            parts_allowed.insert(0, ok)
            parts_values.insert(0, vc)
        scores = torch.cat(parts_scores, dim=-1)  # (B, H, n, G + K)
        allowed = torch.cat([a.expand(scores.shape[0], 1, n, a.shape[-1]) for a in parts_allowed], dim=-1)
        weights = masked_softmax(scores, allowed)
        vals = torch.cat(parts_values, dim=-2).to(weights.dtype)  # (B, H, G + K, d)
        return gemm.product_with_grad(weights, vals).to(q.dtype)  # (B, H, n, d)

    # ------------------------------------------------------------------ most-used
    def select_most_used(self, groups: Tensor, group_mask: Tensor | None, usage: Tensor) -> tuple[Tensor, Tensor | None]:
        """most_used f_c: groups (B, G, c, dim), group_mask (B, G, c) or None, usage (B, G, c) -> the most-used
        state of each group (B, G, dim) (the first on ties; padded states never chosen), slot mask (B, G) or None."""
        if group_mask is not None:
            usage = usage.masked_fill(~group_mask, float("-inf"))
        chosen = usage.argmax(dim=2)  # (B, G)
        index = chosen[:, :, None, None].expand(*groups.shape[:2], 1, groups.shape[3])  # (B, G, 1, dim)
        slots = torch.gather(groups, 2, index).squeeze(2)  # (B, G, dim)
        if group_mask is None:
            return slots, None
        slot_mask = group_mask.any(dim=2)  # (B, G)
        return slots.masked_fill(~slot_mask[..., None], 0.0), slot_mask

    # ------------------------------------------------------------------ the attention-reconstruction loss
    def _trains_compressor(self) -> bool:
        return (self.compress_weight is not None and self.training and self.compress_weight.requires_grad
                and isinstance(self.to_qkv, nn.Linear))

    def _reconstruction(self, h: Tensor, h_mask: Tensor | None, groups: Tensor, group_mask: Tensor | None,
                        slots: Tensor, slot_mask: Tensor | None) -> tuple[Tensor, int]:
        """Sum of squared differences between content attention of h (B, n, dim) over the old states
        (B, G, c, dim) and over their compressed slots (B, G, dim), with detached projections."""
        B, G, c, dim = groups.shape
        W, b = self.to_qkv.weight.detach(), None if self.to_qkv.bias is None else self.to_qkv.bias.detach()
        split = lambda t: t.view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        bias = (lambda i: None) if b is None else (lambda i: b[i * dim:(i + 1) * dim])  # noqa: E731
        proj = lambda x, i: split(F.linear(x, W[i * dim:(i + 1) * dim], bias(i)))  # noqa: E731
        qh = proj(h, 0)  # (B, H, n, d)
        old = groups.reshape(B, G * c, dim).detach()
        old_mask = None if group_mask is None else group_mask.reshape(B, G * c)

        def attn(states: Tensor, states_mask: Tensor | None) -> Tensor:
            k, v = proj(states, 1), proj(states, 2)  # (B, H, S, d)
            scores = (qh @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)  # (B, H, n, S)
            allowed = None if states_mask is None else states_mask[:, None, None, :]
            return masked_softmax(scores, allowed) @ v.float()  # (B, H, n, d)

        diff = attn(old, old_mask) - attn(slots, slot_mask)  # gradient reaches f_c through `slots` only
        if h_mask is not None:
            diff = diff * h_mask[:, None, :, None]
        rows = h.shape[1] * B if h_mask is None else int(h_mask.sum())
        return diff.square().sum(), rows * self.heads * self.head_dim

    # ------------------------------------------------------------------ validation
    def check_memory(self, state, batch: int, device) -> None:
        if not self._is_state(state, CompressiveMemory, "the memory", "from a previous call with return_state=True"):
            return
        name = self.card.name
        h, s = state.hidden, state.compressed
        self._check_hidden(h, batch, self.mem_len + self.rate - 1, "mem_len + compression_rate - 1")
        self._check_hidden(s, batch, self.cmem_len, "cmem_len", what="the compressed memory", rows="s")
        if (state.length - h.shape[1]) % self.rate or state.length < h.shape[1]:
            raise ValueError(f"{name}: the memory's raw window must start at a multiple of compression_rate="
                             f"{self.rate}, got length {state.length} with {h.shape[1]} raw states")
        self._check_memory_mask(state.key_mask, batch, h.shape[1])
        self._check_memory_mask(state.compressed_mask, batch, s.shape[1])
        stats = (state.usage, state.usage_queries)
        if self.compression != "most_used":
            if any(t is not None for t in stats):
                raise ValueError(f"{name}: the memory holds usage statistics (from compression='most_used'), this "
                                 f"layer has compression={self.compression!r}; allowed: usage=None, usage_queries=None")
            return
        expected = (batch, h.shape[1])
        if not all(isinstance(t, Tensor) and tuple(t.shape) == expected for t in stats) or stats[1].is_floating_point():
            got = [tuple(t.shape) if isinstance(t, Tensor) else t for t in stats]
            raise ValueError(f"{name}: compression='most_used' needs the memory's usage statistics: usage (float) and "
                             f"usage_queries (int) of shape (B, m) = {expected}, got {got}")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, cmem_len={self.cmem_len}, compression_rate={self.rate}, "
                f"compression={self.compression!r}")


def _none_if_all(mask: Tensor | None) -> Tensor | None:
    return None if mask is None or bool(mask.all()) else mask


class _SlotBank:
    """The compressed slots one call attends: the state's, then those of the groups leaving during the call,
    made (and projected to keys and values) up to the group a chunk of queries needs: all at once for the
    pooling and convolution f_c, chunk by chunk for most_used (a group's slot once its usage is complete)."""

    def __init__(self, layer: CompressiveAttention, slots: Tensor | None, mask: Tensor | None, make, n_new: int,
                 batch: int, device, dtype) -> None:
        self.layer, self.make, self.n_new, self.batch, self.device = layer, make, n_new, batch, device
        self.s_old = 0 if slots is None else slots.shape[1]
        self.slots = torch.zeros(batch, 0, layer.dim, device=device, dtype=dtype) if slots is None else slots  # (B, s, dim)
        self.mask = mask  # (B, s) or None
        self.keys, self.values = layer.project_memory(slots) if self.s_old else (None, None)  # (B, H, s, d)
        self.made = 0  # new groups made so far

    def make_up_to(self, count: int) -> None:
        """Make the new groups' slots [made, count) (at most the groups leaving during the call)."""
        count = min(count, self.n_new)
        if count <= self.made:
            return
        new, new_mask = self.make(self.made, count)  # (B, G, dim), (B, G) or None
        k, v = self.layer.project_memory(new)  # (B, H, G, d)
        self.mask = _cat_masks(self.mask, new_mask, self.slots.shape[1], new.shape[1], self.batch, self.device)
        self.slots = torch.cat([self.slots, new], dim=1)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        self.made = count


class _Usage:
    """most_used: for each raw state of a call's context [memory; segment] (B, m + n), the sum over heads and
    over the real queries that attended it of its attention weight within the raw window (`total`), and the
    number of those queries (`queries`); the memory's part comes from the state (earlier calls)."""

    def __init__(self, state: CompressiveMemory | None, m: int, n: int, batch: int, heads: int, device, dtype) -> None:
        self.heads = heads
        total = torch.zeros(batch, n, device=device, dtype=dtype)
        queries = torch.zeros(batch, n, device=device, dtype=torch.int64)
        self.total = total if m == 0 else torch.cat([state.usage.to(device, dtype), total], dim=1)  # (B, m + n)
        self.queries = queries if m == 0 else torch.cat([state.usage_queries.to(device), queries], dim=1)

    @torch.no_grad()
    def add(self, raw_scores: Tensor, allowed: Tensor, query_mask: Tensor | None, lo: int) -> None:
        """One chunk: raw_scores (B, H, n, K) over the context keys [lo, lo + K), allowed (B | 1, 1, n, K)."""
        weights = masked_softmax(raw_scores.detach(), allowed)  # (B, H, n, K): normalised over the raw window
        attended = allowed  # (B | 1, 1, n, K)
        if query_mask is not None:  # padded queries use no state
            weights = weights * query_mask[:, None, :, None].to(weights.dtype)
            attended = attended & query_mask[:, None, :, None]
        K = weights.shape[-1]
        self.total[:, lo:lo + K] += weights.sum(dim=(1, 2)).to(self.total.dtype)  # (B, K)
        self.queries[:, lo:lo + K] += attended.sum(dim=(1, 2))  # (B | 1, K)

    def average(self, lo: int, hi: int, c: int) -> Tensor:
        """Mean attention weight (over heads and attending queries) of context states [lo, hi) -> (B, G, c)."""
        mean = self.total[:, lo:hi] / (self.queries[:, lo:hi] * self.heads).clamp(min=1).to(self.total.dtype)
        return mean.view(mean.shape[0], -1, c)

    def kept(self, keep: int) -> tuple[Tensor, Tensor]:
        """The statistics of the raw states staying in the memory (context index >= keep)."""
        return self.total[:, keep:], self.queries[:, keep:]
