"""Longformer (Beltagy, Peters, Cohan 2020, "Longformer: The Long-Document Transformer"; arXiv 2004.05150).

Sliding-window attention, dilated per head, plus symmetric global attention on task tokens:

    window (head h, dilation d_h):  A(i) = { j : |i - j| = t d_h, t = 0 .. w/2 }        (j <= i when causal)
    global (positions G, per call):  every query also attends the keys j in G;
                                     a query i in G attends every key, with its own projections
                                     Q_g, K_g, V_g:  out_i = softmax(q_g,i K_g^T / sqrt(d)) V_g

Cost O(N w d) for the window and O(N g d) for g global tokens, memory O(N d): the window runs
through `core.block_sparse` (blocks of `block_size` tokens, a band of ceil(w / 2b) key blocks on
each side, element masks at the band's ends, the backward pass recomputing scores); the g global
keys are a second block-sparse call over the gathered keys, merged with the window part by their
log-sum-exp; the global queries attend all N keys in a third call (g x N). No N x N tensor.

Options:
- `window` w (default 512, the paper's pretrained models): the total span, w/2 positions on each
  side (w/2 + 1 keys in all when causal: the query and the w/2 before it). Even, >= 2.
- `dilation` (default 1): one int for every head, or a tuple of one per head (the paper dilates 2
  heads of its upper char-LM layers): head h attends every d_h-th position, so its receptive field
  is w d_h. Computed exactly on a strided view: the sequence is split into its d residue classes
  (i mod d), each padded to whole blocks and given positions far apart from the others, and the
  band runs inside each class.
- `block_size` b (default 64): blocks of the computation, not part of the pattern (outputs are the
  same for every b, tested). b = 64 wastes about 12 % of the band's products at w = 512.

Global tokens: `global_mask` (B, N) bool per call (`TransformerClassifier(pooling="cls")` marks its
CLS token). They attend to all and are attended by all, symmetrically; the layer's global
projections `to_global_qkv` (initialised as copies of the local ones, as in the paper) give the
global queries' Q_g, K_g, V_g; the local projections give every query's view of the global keys.
A global key inside a query's window counts once. `attend(q, k, v, global_mask=g)` uses the same q,
k, v for both parts. Global tokens are an encoder feature: a causal layer refuses a global_mask
(the paper's causal use is its character LM, with windows only).

Causal: the window looks back only (j <= i); decoding keeps the last w/2 max(d) keys, whatever N.
`dense_mask(N)` is the window pattern ((H, N, N) when the heads' dilations differ), derived from
the layouts the layer computes with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import AttentionLayer, PositionedKVCache, project_heads
from ..core import options as opt
from ..core.block_sparse import BlockLayout, block_sparse_attention, global_blocks, merge_by_lse, window_blocks
from ..core.blocking import round_up
from ..registry import Card, register


@register(
    Card(
        name="longformer",
        title="Longformer",
        paper="Beltagy et al., Longformer: The Long-Document Transformer, 2020 (arXiv 2004.05150)",
        year=2020,
        complexity="O(N)",
        classes=("FP", "M"),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=True,
        global_tokens=True,
        test_options={"window": 6, "block_size": 4},
    )
)
class LongformerAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, window: int = 512,
                 dilation: int | tuple[int, ...] = 1, block_size: int = 64) -> None:
        super().__init__(dim, heads, causal)
        name = self.card.name
        opt.int_in_range(name, "window", window, 2)
        if window % 2:
            raise ValueError(f"{name}: window must be even (w/2 positions on each side), got {window}; "
                             f"allowed: an even int >= 2, e.g. {window + 1}")
        if isinstance(dilation, (tuple, list)):
            if len(dilation) != heads:
                raise ValueError(f"{name}: dilation has {len(dilation)} entries for {heads} heads; allowed: one "
                                 f"positive int, or a tuple of {heads} (one per head)")
            dilations = opt.positive_int_tuple(name, "dilation", dilation, length=heads)
        else:
            dilations = (opt.positive_int(name, "dilation", dilation),) * heads
        self.window, self.half = window, window // 2
        self.dilation, self.dilations = dilation, dilations
        self.block_size = opt.positive_int(name, "block_size", block_size)
        self.to_global_qkv = nn.Linear(dim, 3 * dim)
        with torch.no_grad():
            self.to_global_qkv.load_state_dict(self.to_qkv.state_dict())
        # heads grouped by dilation: one strided view (and one block-sparse call) per distinct dilation
        self.head_groups = [(d, [h for h in range(heads) if dilations[h] == d]) for d in sorted(set(dilations))]

    # ------------------------------------------------------------------ layouts
    def _strided(self, n: int, d: int) -> tuple[Tensor, Tensor, int]:
        """The strided view of a sequence of n for dilation d: residue class r = i mod d holds positions
        r, r + d, ..., padded to `length` (whole blocks). Returns (order (d length,) long: the source
        position of each slot, or n for padding; positions (d length,): class index far apart per
        class, so that no band crosses classes; length)."""
        length = round_up(-(-n // d), self.block_size)
        steps = torch.arange(length)  # (L,)
        source = torch.arange(d)[:, None] + d * steps[None, :]  # (d, L): position r + t d
        order = torch.where(source < n, source, n).reshape(-1)  # (d L,)
        separation = length + self.half + 1  # classes further apart than any band
        positions = (torch.arange(d)[:, None] * separation + steps[None, :]).reshape(-1)
        return order, positions, length

    def _window_layout(self, n: int, d: int) -> BlockLayout:
        """The band of w/2 steps on each side (before only when causal) of dilation d's strided view."""
        b = self.block_size
        if d == 1:
            return BlockLayout.banded(b, n, self.half, self.half, causal=self.causal)
        _, positions, length = self._strided(n, d)
        before = -(-self.half // b)
        blocks = window_blocks(d * length // b, before, 0 if self.causal else before)
        return BlockLayout(b, blocks, query_positions=positions, key_positions=positions, causal=self.causal,
                           band=(self.half, 0 if self.causal else self.half))

    def dense_mask(self, n: int) -> Tensor:
        """(N, N) bool, or (H, N, N) when the heads' dilations differ: the window pattern, mapped back
        from each dilation's strided view."""
        per_dilation = {}
        for d, _ in self.head_groups:
            layout = self._window_layout(n, d)
            if d == 1:
                per_dilation[d] = layout.dense_mask(n)
                continue
            order, _, length = self._strided(n, d)
            strided = layout.dense_mask(d * length)  # (d L, d L) in the strided order
            real = order < n
            pattern = torch.zeros(n, n, dtype=torch.bool)
            rows = order[real]
            pattern[rows[:, None], rows[None, :]] = strided[real][:, real]
            per_dilation[d] = pattern
        if len(per_dilation) == 1:
            return next(iter(per_dilation.values()))
        return torch.stack([per_dilation[d] for d in self.dilations])  # (H, N, N)

    # ------------------------------------------------------------------ the layer
    def project(self, x: Tensor, mask: Tensor | None, **extra):
        """The local q, k, v and, with global tokens, the global projections: Q_g of the global tokens
        only (gathered), K_g and V_g of every token."""
        q, k, v, extra = super().project(x, mask, **extra)
        global_mask = extra.get("global_mask")
        if global_mask is not None and bool(global_mask.any()):
            index, _ = _global_index(global_mask)  # (B, g)
            w_q, w_kv = self.to_global_qkv.weight.split((self.dim, 2 * self.dim))
            b_q, b_kv = self.to_global_qkv.bias.split((self.dim, 2 * self.dim))
            x_global = x.gather(1, index[..., None].expand(-1, -1, self.dim))  # (B, g, dim)
            (q_global,) = project_heads(x_global, w_q, b_q, self.heads)  # (B, H, g, d)
            k_global, v_global = project_heads(x, w_kv, b_kv, self.heads)  # (B, H, N, d) each
            extra = {**extra, "global_qkv": (q_global, k_global, v_global)}
        return q, k, v, extra

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: PositionedKVCache | None, *,
                global_mask: Tensor | None = None, global_qkv: tuple[Tensor, Tensor, Tensor] | None = None):
        if global_mask is not None and self.causal:
            raise ValueError(f"{self.card.name}: global tokens are an encoder feature (the paper's causal model, "
                             "its character LM, uses windows only); allowed: global_mask=None when causal=True")
        if self.causal:
            reach = self.half * max(self.dilations)
            return self._attend_cached_pattern(
                q, k, v, mask, state, self._allowed,
                lambda positions, next_position: positions >= next_position - reach,
                full=lambda q_, k_, v_, m_: self._window(q_, k_, v_, m_)[0],
            )
        if global_mask is None or not bool(global_mask.any()):
            return self._window(q, k, v, mask)[0], None
        return self._with_global(q, k, v, mask, global_mask, global_qkv), None

    def _allowed(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """The window's element rule (H | 1, n, m), for decoding over the cache."""
        distance = query_positions[:, None] - key_positions[None, :]  # (n, m)
        if not self.causal:
            distance = distance.abs()
        dilation = torch.tensor(self.dilations if len(self.head_groups) > 1 else self.dilations[:1])[:, None, None]
        return (distance >= 0) & (distance % dilation == 0) & (distance <= self.half * dilation)

    def _window(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The sliding-window part -> (out (B, H, N, d), lse (B, H, N))."""
        B, H, n, _ = q.shape
        if len(self.head_groups) == 1 and self.head_groups[0][0] == 1:
            return block_sparse_attention(q, k, v, self._window_layout(n, 1), key_mask)
        outs, lses = [None] * H, [None] * H
        for d, heads in self.head_groups:
            sub = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads
            qs, ks, vs = q[:, sub], k[:, sub], v[:, sub]  # (B, H_d, N, d)
            if d == 1:
                out, lse = block_sparse_attention(qs, ks, vs, self._window_layout(n, 1), key_mask)
            else:
                out, lse = self._dilated(qs, ks, vs, key_mask, d)
            for i, h in enumerate(heads):
                outs[h], lses[h] = out[:, i], lse[:, i]
        return torch.stack(outs, dim=1), torch.stack(lses, dim=1)

    def _dilated(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, d: int) -> tuple[Tensor, Tensor]:
        """One dilation's heads on its strided view -> (out, lse) in the natural order."""
        B, H, n, dh = q.shape
        order, _, length = self._strided(n, d)
        order = order.to(q.device)
        real = order < n  # (d L,)
        source = order.clamp(max=n - 1)
        gather = lambda t: t.index_select(2, source)  # noqa: E731  (B, H, d L, dh)
        strided_mask = real[None, :].expand(B, -1) if key_mask is None else key_mask[:, source] & real[None, :]
        out, lse = block_sparse_attention(gather(q), gather(k), gather(v), self._window_layout(n, d), strided_mask)
        inverse = torch.empty(n, dtype=torch.long, device=q.device)
        inverse[order[real]] = torch.nonzero(real).squeeze(-1)  # natural position -> strided slot
        return out.index_select(2, inverse), lse.index_select(2, inverse)

    def _with_global(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, global_mask: Tensor,
                     global_qkv: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        B, H, n, dh = q.shape
        b = self.block_size
        index, valid = _global_index(global_mask)  # (B, g) each
        g = index.shape[1]
        local_keys = ~global_mask if mask is None else mask & ~global_mask  # a global key counts once
        out, lse = self._window(q, k, v, local_keys)  # (B, H, N, d), (B, H, N)
        take = lambda t: t.gather(2, index[:, None, :, None].expand(B, H, g, t.shape[-1]))  # noqa: E731  (B, H, g, .)
        every_block = lambda nq, nk: BlockLayout(b, global_blocks(-(-nq // b), range(-(-nk // b))))  # noqa: E731
        out_g, lse_g = block_sparse_attention(q, take(k), take(v), every_block(n, g), valid)  # every query -> G
        out, _ = merge_by_lse(out, lse, out_g, lse_g)
        if global_qkv is None:
            q_global, k_global, v_global = take(q), k, v
        else:
            q_global, k_global, v_global = global_qkv
        rows, _ = block_sparse_attention(q_global, k_global, v_global, every_block(g, n), mask)  # G -> every key
        placed = torch.zeros_like(out).scatter(2, index[:, None, :, None].expand(B, H, g, dh), rows.to(out.dtype))
        return torch.where(global_mask[:, None, :, None], placed, out)  # (B, H, N, d)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, dilation={self.dilation}, block_size={self.block_size}"


def _global_index(global_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) bool -> (index (B, g), valid (B, g)): the global positions of each item first (g = the
    largest count in the batch), then filler positions marked invalid."""
    g = max(1, int(global_mask.sum(1).max()))
    index = torch.argsort((~global_mask).to(torch.int8), dim=1, stable=True)[:, :g]  # globals first
    return index, global_mask.gather(1, index)
