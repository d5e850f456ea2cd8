"""Transformer-XL (Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a Fixed-Length
Context", ACL; arXiv 1901.02860): segment-level recurrence with relative positional attention.

Recurrence. Each layer keeps a memory of its inputs at the last `mem_len` positions of the stream,
with the gradient stopped, and the next segment's keys and values are computed over the memory and
the segment together:

    h~ = [SG(memory); h]        q = h W_q,   k = h~ W_kE,   v = h~ W_v        (queries: the segment only)

so information flows from segment to segment through the layers (context grows by `mem_len` per
layer) while backpropagation stays inside the segment (truncated BPTT).

Relative positions (section 3.3). Score of query i for key j at distance i - j (`core.relative_positions`):

    A_ij = (q_i + u)^T k_j + (q_i + v)^T W_kR R_{i-j}   (/ sqrt(d))

with R the sinusoid of the distance, u and v learned per-head biases, computed with the shift trick
over the attended span only. Models add no absolute position embedding (card `own_positions`).

Which keys a query attends (`same_length`, a decision the paper leaves to the evaluation code):

- `same_length=True` (default): query at stream position p attends positions p - mem_len .. p, a
  window of mem_len + 1 keys over the stream, whatever the segment. The output is then the same
  however the stream is cut into calls: one call over a whole sequence, segment after segment with
  the memory, and token-by-token decoding all agree exactly (the conformance suite's decoding and
  generation checks hold for prompts longer than mem_len). A long call is computed in chunks of
  max(mem_len, 64) queries, each attending the mem_len keys before it and itself: O(N mem_len d).
- `same_length=False`: the paper's training form. Every query of a call attends the whole memory and
  the call's causal prefix (span mem_len + 1 .. mem_len + n), so the result depends on the
  segmentation, and one call without memory is full causal attention over the call (O(n^2) in the
  call's length n: feed long streams segment by segment). With mem_len=0 every segment is modelled
  on its own (the no-memory baseline).

Cost per segment of n tokens with memory m: n (m + n) scores per head (the position term has the
same size), O(n (m + n) d) time; the state is m hidden states per layer, constant over a stream.

The contract of this layer (card notes):

- `forward(x, mask, state, return_state=True) -> (y, XLMemory)`: `state` is the layer's memory
  (`XLMemory`: its inputs at the last <= mem_len positions, detached, their padding mask, and the
  stream length so far); the layer projects keys and values from [memory; x] with its current weights
  (so W_k, W_v get gradients through the memory, as in the paper). When autograd does not need those
  gradients (evaluation, generation) and the weights have not changed since, the memory's cached
  keys and values are reused instead of re-projected.
- `attend(q, k, v, mask, state) -> (out, KVCache)`: the same attention on per-head tensors, with the
  layer's relative-position parameters (W_kR, u, v); its `state` is a `core.KVCache` of the last
  mem_len keys and values (a per-head memory; no hidden states exist at this level).
- A memory of the wrong type or shape is a ValueError naming the mechanism, the value and what is
  allowed. Padding: padded positions are never attended, also once they are in the memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AttentionLayer, KVCache, masked_softmax, project_heads, split_heads
from ..core import gemm
from ..core import options as opt
from ..core.layer import PROJECTIONS
from ..core.dense import BACKENDS
from ..core.relative_positions import relative_scores, relative_shift, sinusoid_of_distances, span_allowed
from ..registry import Card, register

#: queries per chunk when a same-length call is longer than this (and than mem_len)
MIN_CHUNK = 64


@dataclass
class XLMemory:
    """One layer's recurrent memory: its inputs at the last m <= mem_len positions of the stream."""

    hidden: Tensor  # (B, m, dim), detached
    key_mask: Tensor | None  # (B, m) bool, True = real; None when nothing is padded
    length: int  # tokens of the stream consumed so far
    keys: Tensor | None = None  # (B, H, m, d): k, v of `hidden`, reusable while the weights are unchanged
    values: Tensor | None = None
    weights_version: tuple | None = None  # the projection's parameters' versions when keys were made

    def numel(self) -> int:
        """Numbers held (the bounded-state measurement)."""
        return sum(t.numel() for t in (self.hidden, self.key_mask, self.keys, self.values) if t is not None)


def _cat_masks(a: Tensor | None, b: Tensor | None, na: int, nb: int, batch: int, device) -> Tensor | None:
    if a is None and b is None:
        return None
    a = torch.ones(batch, na, dtype=torch.bool, device=device) if a is None else a.to(device)
    b = torch.ones(batch, nb, dtype=torch.bool, device=device) if b is None else b.to(device)
    return torch.cat([a, b], dim=1)  # (B, na + nb)


@register(
    Card(
        name="transformer_xl",
        title="Transformer-XL",
        paper="Dai et al., Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context, ACL 2019 (arXiv 1901.02860)",
        year=2019,
        complexity="O(N^2)",
        classes=("RC",),
        causal=True,
        bidirectional=False,
        decoding="recurrent",
        own_positions=True,
        test_options={"mem_len": 4},
        notes=(
            "segment-level recurrence: the state is each layer's memory of its last mem_len inputs (constant "
            "size). forward(x, mask, state=XLMemory) -> (y, XLMemory) re-projects keys and values of the memory "
            "with the current weights (cached k, v reused when no gradient is needed); attend(q, k, v, mask, "
            "state=KVCache of the last mem_len keys/values) uses the layer's W_kR, u, v. same_length=True (default): "
            "every query attends the mem_len positions before it, so segmentation never changes the output; "
            "same_length=False: the paper's training form (whole memory + the call's causal prefix). "
            "TransformerLM(tokens, memory=..., return_state=True) -> (logits, memory)."
        ),
    )
)
class TransformerXLAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = True, *, mem_len: int = 512, same_length: bool = True,
                 backend: str = "auto") -> None:
        super().__init__(dim, heads, causal)
        name = self.card.name
        #: "auto" / "math": explicit scores and a masked softmax; "sdpa": the content term and the softmax in
        #: PyTorch's fused kernel with the position term as an additive bias (10-25% faster on CPU, tested equal to
        #: rounding; not the default because PyTorch picks another kernel when that bias needs a gradient, so
        #: training and inference would differ in the last bits)
        self.backend = opt.choice(name, "backend", backend, BACKENDS)
        if not causal:
            raise ValueError(f"{name}: causal=False is not supported; allowed: causal=True")
        self.mem_len = opt.int_in_range(name, "mem_len", mem_len, 0)
        self.same_length = opt.boolean(name, "same_length", same_length)
        self.to_r = nn.Linear(dim, dim, bias=False)  # W_kR: sinusoid of the distance -> per-head position keys
        self.content_bias = nn.Parameter(torch.zeros(heads, self.head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(heads, self.head_dim))  # v
        self._r_cache: tuple | None = None

    # ------------------------------------------------------------------ the layer
    def project(self, x: Tensor, mask: Tensor | None, **extra):
        q, k, v, extra = super().project(x, mask, **extra)
        return q, k, v, {**extra, "hidden": x}  # the inputs, for the memory

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state, hidden: Tensor | None = None):
        batch, n = q.shape[0], q.shape[-2]
        if hidden is None:  # attend(): a per-head KV memory
            self._check_kv_memory(state, batch, q.device)
            mem_k = None if state is None else state.k
            mem_v = None if state is None else state.v
            mem_mask = None if state is None else state.key_mask
            m = 0 if state is None else state.k.shape[-2]
            keys = k if m == 0 else torch.cat([mem_k.to(k.dtype), k], dim=-2)  # (B, H, m + n, d)
            values = v if m == 0 else torch.cat([mem_v.to(v.dtype), v], dim=-2)
            key_mask = _cat_masks(mem_mask, mask, m, n, batch, q.device)
            out = self.relative_attention(q, keys, values, key_mask, m)
            keep = min(self.mem_len, m + n)
            new = KVCache(keys[..., m + n - keep:, :].detach(), values[..., m + n - keep:, :].detach(),
                          None if key_mask is None else key_mask[:, m + n - keep:], (0 if state is None else state.length) + n)
            return out, new
        self.check_memory(state, batch, hidden.device)
        m = 0 if state is None else state.hidden.shape[1]
        mem_k, mem_v = self._memory_keys(state)
        keys = k if m == 0 else torch.cat([mem_k.to(k.dtype), k], dim=-2)  # (B, H, m + n, d)
        values = v if m == 0 else torch.cat([mem_v.to(v.dtype), v], dim=-2)
        key_mask = _cat_masks(None if state is None else state.key_mask, mask, m, n, batch, q.device)
        out = self.relative_attention(q, keys, values, key_mask, m)
        return out, self._next_memory(state, hidden, keys, values, key_mask)

    # ------------------------------------------------------------------ the core
    def relative_attention(self, q: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None, m: int) -> Tensor:
        """q (B, H, n, d) at the last n of the m + n key positions; keys, values (B, H, m + n, d) -> (B, H, n, d).

        same_length: chunks of queries, each attending at most mem_len earlier keys and itself; else one
        chunk attending everything before it (the whole memory and the causal prefix)."""
        n, total = q.shape[-2], keys.shape[-2]
        if not self.same_length:
            return self._span(q, keys, values, key_mask, None, self.position_keys(total, q.device))
        chunk = max(self.mem_len, MIN_CHUNK)
        r = self.position_keys(min(total, chunk + self.mem_len), q.device)  # (H, span, d): the longest chunk's span
        outs = []
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            lo = max(0, m + start - self.mem_len)  # the first key any query of the chunk may attend
            part_mask = None if key_mask is None else key_mask[:, lo:m + end]
            outs.append(self._span(q[..., start:end, :], keys[..., lo:m + end, :], values[..., lo:m + end, :],
                                   part_mask, self.mem_len, r))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)  # (B, H, n, d)

    def _span(self, q: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None, max_distance: int | None,
              r: Tensor) -> Tensor:
        """Queries at the last n of K contiguous key positions -> outputs (B, H, n, d); n K scores per head.
        r (H, >= K, d): the position keys of the distances 0, 1, ..."""
        n, K = q.shape[-2], keys.shape[-2]
        r = r[:, :K].flip(1)  # (H, K, d): distances K-1 .. 0
        allowed = self._span_pattern(n, K, max_distance, q.device)  # (1, 1, n, K): causal and within the span
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :].to(q.device)  # (B, 1, n, K)
        if self.backend != "sdpa":
            scores = relative_scores(q, keys, r, self.content_bias, self.position_bias)  # (B, H, n, K)
            return gemm.product_with_grad(masked_softmax(scores, allowed), values.to(scores.dtype)).to(q.dtype)  # (B, H, n, d)
        # the same numbers through the fused kernel: the position term enters as an additive bias
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qf = q.to(dtype)
        position = relative_shift(gemm.product_with_grad(qf + self.position_bias.to(dtype)[None, :, None, :],
                                                         r.to(dtype).transpose(-1, -2)[None]))
        row_has_key = allowed.any(dim=-1, keepdim=True)  # (B | 1, 1, n, 1)
        bias = (position / math.sqrt(q.shape[-1])).masked_fill(~(allowed | ~row_has_key), float("-inf"))  # (B, H, n, K)
        out = F.scaled_dot_product_attention(qf + self.content_bias.to(dtype)[None, :, None, :], keys.to(dtype),
                                             values.to(dtype), attn_mask=bias)  # (B, H, n, d)
        return (out * row_has_key.to(dtype)).to(q.dtype)

    def _span_pattern(self, n: int, K: int, max_distance: int | None, device) -> Tensor:
        """span_allowed without padding, kept for the last few shapes (every segment of a stream has the same)."""
        key = (n, K, max_distance, str(device))
        cache = self.__dict__.setdefault("_pattern_cache", {})
        if key not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = span_allowed(n, K, None, max_distance, device)
        return cache[key]

    def position_keys(self, span: int, device) -> Tensor:
        """W_kR R_delta for delta = 0 .. span-1, split per head: (H, span, d). Reused while W_kR is
        unchanged and no gradient is needed (decoding), recomputed otherwise."""
        weight = getattr(self.to_r, "weight", None)  # None for a wrapped projection (et.quantize's int8 Linear)
        if isinstance(weight, Tensor):
            key, dtype, fresh = (span, device, weight.dtype, weight._version, id(weight)), weight.dtype, _needs_grad(weight)
        else:
            key, dtype, fresh = (span, device, id(self.to_r)), torch.float32, False
        if self._r_cache is not None and self._r_cache[0] == key and not fresh:
            return self._r_cache[1]
        table = sinusoid_of_distances(torch.arange(span, device=device), self.dim, dtype)  # (span, dim)
        r = self.to_r(table).view(span, self.heads, self.head_dim).transpose(0, 1)  # (H, span, d)
        self._r_cache = None if fresh else (key, r)
        return r

    # ------------------------------------------------------------------ the memory
    def _weights_version(self) -> tuple:
        params = [p for p in (getattr(self.to_qkv, "weight", None), getattr(self.to_qkv, "bias", None)) if p is not None]
        return tuple((id(p), p._version) for p in params) if isinstance(self.to_qkv, nn.Linear) else (id(self.to_qkv), None)

    def _memory_keys(self, state: XLMemory | None) -> tuple[Tensor | None, Tensor | None]:
        """k, v (B, H, m, d) of the memory: cached when autograd needs no gradient of the projection and its
        weights are unchanged, otherwise projected again from the hidden states (the paper's recurrence)."""
        if state is None or state.hidden.shape[1] == 0:
            return None, None
        reusable = (state.keys is not None and isinstance(self.to_qkv, nn.Linear) and not _needs_grad(self.to_qkv.weight)
                    and state.weights_version == self._weights_version())
        if reusable:
            return state.keys, state.values
        return self.project_memory(state.hidden)

    def project_memory(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Memory hidden states (B, m, dim) -> k, v (B, H, m, d) with the layer's projection."""
        if isinstance(self.to_qkv, nn.Linear):
            bias = None if self.to_qkv.bias is None else self.to_qkv.bias[self.dim:]
            k, v = project_heads(hidden, self.to_qkv.weight[self.dim:], bias, self.heads)  # only the k, v slots
            return k, v
        slots = split_heads(self.to_qkv(hidden), PROJECTIONS["qkv"] * self.heads).chunk(3, dim=1)  # wrapped projection
        return slots[1], slots[2]

    def _next_memory(self, state: XLMemory | None, hidden: Tensor, keys: Tensor, values: Tensor,
                     key_mask: Tensor | None) -> XLMemory:
        """The memory after this call: the last mem_len of [memory; inputs], detached."""
        old = None if state is None else state.hidden
        everything = hidden.detach() if old is None or old.shape[1] == 0 else torch.cat([old.to(hidden.dtype), hidden.detach()], dim=1)
        total = everything.shape[1]
        keep = min(self.mem_len, total)
        start = total - keep
        mask = None if key_mask is None else key_mask[:, start:]
        if mask is not None and bool(mask.all()):
            mask = None
        length = (0 if state is None else state.length) + hidden.shape[1]
        return XLMemory(everything[:, start:], mask, length, keys[..., start:, :].detach(), values[..., start:, :].detach(),
                        self._weights_version())

    def empty_memory(self, batch: int, device=None, dtype=torch.float32) -> XLMemory:
        """The memory at the start of a stream (nothing consumed)."""
        return XLMemory(torch.zeros(batch, 0, self.dim, device=device, dtype=dtype), None, 0)

    # ------------------------------------------------------------------ validation
    def check_memory(self, state, batch: int, device) -> None:
        """A forward-path memory must be an XLMemory with hidden (B, m <= mem_len, dim) and key_mask (B, m)."""
        if not self._is_state(state, XLMemory, "the memory", "from a previous call with return_state=True"):
            return
        h = state.hidden
        self._check_hidden(h, batch, self.mem_len, "mem_len")
        self._check_memory_mask(state.key_mask, batch, h.shape[1])

    def _is_state(self, state, kind: type, what: str, origin: str) -> bool:
        """False for None (no memory); True for a `kind`; a ValueError naming what is allowed otherwise."""
        if state is None:
            return False
        if not isinstance(state, kind):
            article = "an" if kind.__name__[0] in "AEIOX" else "a"  # an XLMemory, a KVCache
            raise ValueError(f"{self.card.name}: {what} must be {article} {kind.__name__} ({origin}) or None, got "
                             f"{type(state).__name__}")
        return True

    def _check_hidden(self, h, batch: int, longest: int, longest_is: str, what: str = "memory hidden states",
                      rows: str = "m") -> None:
        """Memory states: (B, rows, dim) with rows <= `longest` (named `longest_is` in the message)."""
        if not isinstance(h, Tensor) or h.dim() != 3 or h.shape[0] != batch or h.shape[2] != self.dim or h.shape[1] > longest:
            raise ValueError(f"{self.card.name}: {what} must have shape (B, {rows}, dim) = ({batch}, {rows} <= "
                             f"{longest_is} = {longest}, {self.dim}), got {tuple(h.shape) if isinstance(h, Tensor) else h!r}")

    def _check_kv_memory(self, state, batch: int, device) -> None:
        if not self._is_state(state, KVCache, "attend()'s memory", "the last mem_len keys and values, from a previous attend"):
            return
        name = self.card.name
        m = state.k.shape[-2]
        expected = (batch, self.heads, m, self.head_dim)
        if state.k.dim() != 4 or tuple(state.k.shape) != expected or tuple(state.v.shape) != expected or m > self.mem_len:
            raise ValueError(f"{name}: attend()'s memory keys and values must have shape (B, H, m, d) = ({batch}, "
                             f"{self.heads}, m <= mem_len={self.mem_len}, {self.head_dim}), got {tuple(state.k.shape)} "
                             f"and {tuple(state.v.shape)}")
        self._check_memory_mask(state.key_mask, batch, m)

    def _check_memory_mask(self, key_mask, batch: int, m: int) -> None:
        if key_mask is not None and (not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool
                                     or tuple(key_mask.shape) != (batch, m)):
            got = tuple(key_mask.shape) if isinstance(key_mask, Tensor) else key_mask
            raise ValueError(f"{self.card.name}: the memory's key_mask must be a bool tensor of shape (B, m) = "
                             f"({batch}, {m}) or None, got {got!r}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mem_len={self.mem_len}, same_length={self.same_length}"


def _needs_grad(weight: Tensor) -> bool:
    return torch.is_grad_enabled() and weight.requires_grad


def set_mem_len(module: nn.Module, mem_len: int) -> nn.Module:
    """Set the memory length of every Transformer-XL (and Compressive) layer under `module`, e.g. to
    evaluate with a longer memory than in training (the weights do not depend on it). Returns `module`."""
    layers = [m for m in module.modules() if isinstance(m, TransformerXLAttention)]
    for layer in layers:
        layer.mem_len = opt.int_in_range(layer.card.name, "mem_len", mem_len, 0)
    return module
