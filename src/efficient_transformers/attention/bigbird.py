"""Big Bird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", NeurIPS; arXiv 2007.14062).

Each query attends a sliding window, a few global tokens and a few random keys; the paper's
"blockified" form (its section 2 and appendix D) does all three at the granularity of blocks of b
tokens. With nb = ceil(N / b) blocks, query block I attends the key blocks

    window:  I - w' .. I + w'                        w' = (window_blocks - 1) / 2
    global:  0 .. g - 1                               (ITC: the first g existing blocks made global)
    random:  r blocks R(h, I), drawn per head h and query block I (see below)

and the global query blocks 0 .. g - 1 attend every key block (global tokens attend to all and are
attended by all). Inside the kept blocks every pair is allowed (j <= i added when causal):

    out_i = sum_{j in A(i)} softmax_j(q_i . k_j / sqrt(d)) v_j

Cost O(N (w + g + r) b d) time for the ordinary rows plus O(g b N d) for the global rows, O(N d)
memory: both parts run through `core.block_sparse` (only kept blocks are computed; the backward
pass recomputes scores), the g global query blocks as a second call whose layout row lists every
key block. No N x N tensor: the layouts are (H, nb, w + g + r) and (1, g, nb).

Random blocks (the paper draws r blocks per query block, per head in its implementation
`bigbird_block_rand_mask_with_head`; so does this layer). They come from the layer's `SeededDraws`
and never from the N of a call: for head h and query block I, P(h, I) = `draws.randperm(M, h, I)`
is a fixed permutation of the key blocks 0 .. M - 1, M = ceil(max_seq_len / b), and R(h, I) is the
first r entries of P(h, I) that are allowed at the call:

    bidirectional:  g <= J < nb  and  J not in the window (|J - I| > w');  rows I >= g only
    causal:         g <= J < I - w'  (the past before the window, whatever N)

so the blocks a query block draws are the same at every length where they exist (causal: at every
length), in every decoding step, and they are saved with the weights (`draws.seed`, `draws.draws`,
safetensors). A row with fewer than r allowed blocks takes all of them (hence r >= nb gives dense
attention, tested). The tables are recomputed from the seed when needed and cached per length.

Causal (not in the paper or any public implementation; the survey marks Big Bird as not decodable):
query block I attends the window I - w' .. I (its own block causally), the global blocks 0 .. g - 1
(j <= i) and random blocks of the past before the window; the global query blocks attend their
whole past, which the window and global blocks already cover. Decoding keeps a `PositionedKVCache`
of the keys some later query can still attend: the global blocks, the last w' + 1 blocks, and every
past block that a later query block (up to max_seq_len) draws at random, known in advance from the
seeded permutations. That last set is NOT bounded by the window: any later query block may draw any
block of its past, so the cache holds min(all past blocks, g + w' + 1 + H r (M - I)) blocks at query
block I, which for N well below max_seq_len is nearly the whole prefix (a full KV cache); it
shrinks towards the end of max_seq_len (defaults, 4 heads, max_seq_len 4096: all 32 past blocks kept
at block 32, 47 of 48 at block 48, 38 of 60 at block 60). Each decoding step attends the cache densely under the
pattern's element rule (O(cache) per token).

Extra global tokens (ETC-style, `num_extra_global_tokens` = g_e > 0): g_e learned tokens (dim-wide
parameters) are prepended inside the layer, projected by the layer's own key and value projections;
every query attends them (they come before position 0, so causally too) and they would attend all,
but their outputs are dropped, so within one layer only their keys and values act: they are computed
as such (an exact shortcut, not an approximation of the stated rule), merged with the sequence part
by log-sum-exp. Unlike BigBird-ETC, they do not carry a state from layer to layer (each layer has its
own). `dense_mask(N)` describes the sequence keys only; the extra keys are allowed for every query.

Options (defaults: the paper's ITC-base setting, its Table 8, which LRA's Big Bird also uses):
- `block_size` (default 64): b, tokens per block; the pattern's unit (window, global and random
  blocks are whole blocks), so changing it changes the pattern, unlike Longformer's block size;
- `window_blocks` (default 3, odd): the own block and (window_blocks - 1) / 2 blocks on each side
  (causal: before only), i.e. w = 3 b;
- `global_blocks` (default 2): g, the first g blocks (2 b tokens) are global (ITC); 0 allowed
  (window + random only); with `pooling="cls"` the CLS token sits in block 0, so it is global;
- `num_random_blocks` (default 3): r random key blocks per query block and head; 0 allowed;
- `num_extra_global_tokens` (default 0): g_e learned global tokens prepended inside the layer
  (ETC-style, see above);
- `max_seq_len` (default 4096; the models pass theirs): the longest sequence; sizes the random
  permutations (M = ceil(max_seq_len / b) key blocks), never the call.

Decisions:
- the global query rows are a separate block-sparse call (layout (1, g, nb): every key block) whose
  outputs are concatenated (heads-last) before the ordinary rows' outputs: a row of nb slots in the
  main layout would widen every row to nb slots;
- q, k, v are made contiguous (B, H, N, d) once per call, so the kernel reads the key and value
  blocks in place instead of copying the projection's strided views in each of its four passes;
- the random-block tables and layouts are derived from the seed buffers and cached per length
  (building them costs O(H nb M) for one Python-level permutation per row and head, ~35 ms at 16K);
- causal decoding uses the shared `_attend_cached_pattern` (with extra tokens, the same steps with the
  extra keys prepended to the cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AttentionLayer, PositionedKVCache, SeededDraws, dense_attention
from ..core import block_sparse as bs
from ..core import options as opt
from ..core.block_sparse import NO_BLOCK, BlockLayout, block_sparse_attention, concat_slots, merge_by_lse
from ..registry import Card, register

_CACHED_TABLES = 8  # derived tables kept per layer (random blocks and layouts of recent lengths)
#: elements of the kernel's transient score tensors (1 MiB in float32; the kernel's default is 2^20): measured
#: at dim 256, 4 heads, N = 16K: the same step time, 202 MiB peak instead of 238
_SCORE_BUDGET = 2**18


@register(
    Card(
        name="bigbird",
        title="Big Bird",
        paper="Zaheer et al., Big Bird: Transformers for Longer Sequences, NeurIPS 2020 (arXiv 2007.14062)",
        year=2020,
        complexity="O(N)",
        classes=("FP", "M"),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=True,
        test_options={"block_size": 4, "max_seq_len": 256},
        notes=(
            "causal mode is this library's extension (the survey marks Big Bird as not decodable): window "
            "and random blocks from the past only; the decoding cache keeps the global blocks, the last "
            "window and every past block a later query block draws at random, which is not bounded by "
            "the window (up to the whole prefix when N is well below max_seq_len)"
        ),
    )
)
class BigBirdAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, block_size: int = 64, window_blocks: int = 3,
                 global_blocks: int = 2, num_random_blocks: int = 3, num_extra_global_tokens: int = 0,
                 max_seq_len: int = 4096) -> None:
        name = self.card.name
        opt.positive_int(name, "max_seq_len", max_seq_len)
        super().__init__(dim, heads, causal, max_seq_len=max_seq_len)
        self.block_size = opt.positive_int(name, "block_size", block_size, what="tokens per block")
        opt.positive_int(name, "window_blocks", window_blocks)
        if window_blocks % 2 == 0:
            raise ValueError(f"{name}: window_blocks must be odd (the own block and as many on each side), got "
                             f"{window_blocks}; allowed: an odd int >= 1, e.g. {window_blocks + 1}")
        self.window_blocks, self.half_window = window_blocks, window_blocks // 2
        self.global_blocks = opt.int_in_range(name, "global_blocks", global_blocks, 0)
        self.num_random_blocks = opt.int_in_range(name, "num_random_blocks", num_random_blocks, 0)
        self.num_extra_global_tokens = opt.int_in_range(name, "num_extra_global_tokens", num_extra_global_tokens, 0)
        self.max_blocks = -(-max_seq_len // block_size)  # M: the key blocks the permutations range over
        self.draws = SeededDraws()
        self.extra_tokens = (nn.Parameter(torch.randn(num_extra_global_tokens, dim))
                             if num_extra_global_tokens else None)  # (g_e, dim), prepended inside the layer
        self._tables: dict[tuple, Tensor] = {}  # derived from draws' buffers: not state, recomputed on load

    # ------------------------------------------------------------------ random blocks
    def _random_table(self, num_blocks: int | None) -> Tensor:
        """(H, rows, r) long (CPU), NO_BLOCK in unused slots: R(h, I), the random key blocks of query
        block I for head h. Causal (num_blocks None): rows 0 .. M - 1, independent of N. Bidirectional:
        rows 0 .. nb - 1 at a length of nb blocks (rows below g, the global rows, stay empty)."""
        key = (int(self.draws.seed), int(self.draws.draws), num_blocks)
        table = self._tables.get(key)
        if table is not None:
            return table
        H, M, r, g, w = self.heads, self.max_blocks, self.num_random_blocks, self.global_blocks, self.half_window
        rows = M if num_blocks is None else num_blocks
        table = torch.full((H, rows, r), NO_BLOCK, dtype=torch.long)
        first = g + w + 1 if num_blocks is None else g  # causal rows before it have no past outside window/global
        for h in range(H if r else 0):
            for i in range(first, rows):
                perm = self.draws.randperm(M, h, i)  # (M,): fixed for (seed, draw, head, query block)
                if num_blocks is None:
                    ok = (perm >= g) & (perm < i - w)  # the past before the window
                else:
                    ok = (perm >= g) & (perm < num_blocks) & ((perm - i).abs() > w)
                chosen = perm[ok][:r]
                table[h, i, : chosen.numel()] = chosen
        self._remember(key, table)
        return table

    def _remember(self, key: tuple, value) -> None:
        """Cache a derived table (random blocks, layouts), keyed by the draws' buffers: a loaded or
        redrawn layer never reuses another draw's tables. A few recent lengths are kept."""
        while len(self._tables) >= _CACHED_TABLES:
            self._tables.pop(next(iter(self._tables)))
        self._tables[key] = value

    def _last_draw(self) -> Tensor:
        """(M,) long: for key block J, the last query block (any head) that draws it at random when
        causal, -1 if none; a cached key is still needed while that query block is to come."""
        key = (int(self.draws.seed), int(self.draws.draws), "last")
        last = self._tables.get(key)
        if last is None:
            table = self._random_table(None)  # (H, M, r)
            rows = torch.arange(table.shape[1])[None, :, None].expand_as(table)
            used = table >= 0
            last = torch.full((self.max_blocks,), -1, dtype=torch.long)
            last.scatter_reduce_(0, table[used], rows[used], reduce="amax")
            self._remember(key, last)
        return last

    # ------------------------------------------------------------------ layouts
    def _layouts(self, n: int, device=None) -> tuple[BlockLayout | None, BlockLayout | None, int]:
        """(main, global rows, gq) for a sequence of n: `main` covers the query rows gq .. n - 1 (all
        rows when causal, gq = 0), `global rows` the rows 0 .. gq - 1 (every key block; None when
        causal or g = 0). Block ids are absolute key blocks; the main layout's row 0 is query block
        gq / b. Cached per number of blocks (and draw, device)."""
        nb = -(-n // self.block_size)
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (int(self.draws.seed), int(self.draws.draws), "layouts", nb, str(device))
        if key not in self._tables:
            self._remember(key, self._build_layouts(nb, device))
        main, rows, gq = self._tables[key]
        return main, rows, min(gq, n)

    def _build_layouts(self, nb: int, device) -> tuple[BlockLayout | None, BlockLayout | None, int]:
        b, w, r = self.block_size, self.half_window, self.num_random_blocks
        g = min(self.global_blocks, nb)
        if self.causal:
            parts = [bs.window_blocks(nb, w, 0, device=device)]  # (1, nb, w + 1)
            if g:
                parts.append(bs.global_blocks(nb, range(g), device=device))  # (1, nb, g)
            if r:
                parts.append(self._random_table(None)[:, :nb].to(device))  # (H, nb, r)
            return BlockLayout(b, concat_slots(*parts), causal=True), None, 0
        rows = BlockLayout(b, bs.global_blocks(g, range(nb), device=device)) if g else None  # (1, g, nb)
        if nb == g:
            return None, rows, nb * b
        parts = [bs.window_blocks(nb, w, w, device=device)[:, g:]]  # (1, nb - g, 2 w + 1)
        if g:
            parts.append(bs.global_blocks(nb - g, range(g), device=device))  # (1, nb - g, g); window repeats drop
        if r:
            parts.append(self._random_table(nb)[:, g:].to(device))  # (H, nb - g, r)
        return BlockLayout(b, concat_slots(*parts)), rows, g * b

    def dense_mask(self, n: int) -> Tensor:
        """(N, N) bool, or (H, N, N) with random blocks (drawn per head): the pattern over the sequence's
        keys, from the layouts the layer computes with (extra global tokens, if any, are allowed
        for every query on top of it)."""
        if n > self.max_seq_len:
            raise ValueError(f"{self.card.name}: N={n} exceeds max_seq_len={self.max_seq_len}; "
                             f"allowed: N <= {self.max_seq_len}")
        main, rows, gq = self._layouts(n)
        if rows is None:
            return main.dense_mask(n)
        heads = 1 if main is None else main.key_blocks.shape[0]
        mask = torch.zeros(heads, n, n, dtype=torch.bool)
        mask[:, : min(gq, n)] = rows.dense_mask(min(gq, n), n)
        if main is not None:
            mask[:, gq:] = main.dense_mask(n - gq, n)
        return mask[0] if heads == 1 else mask

    # ------------------------------------------------------------------ attention
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: PositionedKVCache | None):
        if not self.causal:
            return self._full(q, k, v, mask), None
        if self.extra_tokens is None:
            return self._attend_cached_pattern(q, k, v, mask, state, self._allowed, self._still_needed, full=self._full)
        cache = PositionedKVCache.extend(state, k, v, mask)
        if state is None:
            out = self._full(q, k, v, mask)
        else:  # the new queries over the extra keys and the cache (which holds only what is reachable)
            n, B = q.shape[-2], q.shape[0]
            positions = torch.arange(cache.length - n, cache.length, device=q.device)
            pattern = self._allowed(positions, cache.positions.to(q.device))  # (H | 1, n, m)
            k_e, v_e = self._extra_keys(q)  # (B, H, g_e, d)
            g_e = k_e.shape[-2]
            pattern = torch.cat([pattern.new_ones(pattern.shape[0], n, g_e), pattern], dim=-1)  # (H|1, n, g_e + m)
            key_mask = cache.key_mask
            if key_mask is not None:
                key_mask = torch.cat([key_mask.new_ones(B, g_e), key_mask], dim=1)  # (B, g_e + m)
            out = dense_attention(q, torch.cat([k_e, cache.k], -2), torch.cat([v_e, cache.v], -2),
                                  key_mask=key_mask, allowed=pattern[None])  # (B, H, n, d)
        return out, cache.keep(self._still_needed(cache.positions, cache.length))

    def _full(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The parallel form on a whole sequence: q, k, v (B, H, N, d) -> (B, H, N, d)."""
        n = q.shape[-2]
        main, rows, gq = self._layouts(n, q.device)
        # the kernel reads keys and values as a table of blocks: contiguous (B, H, N, d) is a view, while
        # the fused projection's views would be copied in every call, forward and backward; copying q
        # too frees the projection's buffer (measured at N = 16K: 238 MiB peak instead of 303, faster)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        parts = []
        if rows is not None:  # the global query blocks: every key
            parts.append(block_sparse_attention(q[:, :, :gq], k, v, rows, mask,
                                              score_budget=_SCORE_BUDGET))  # (B, H, gq, d), (B, H, gq)
        if main is not None:
            parts.append(block_sparse_attention(q if gq == 0 else q[:, :, gq:], k, v, main, mask,
                                              score_budget=_SCORE_BUDGET))
        if len(parts) == 1:
            out, lse = parts[0]
        else:  # concatenated heads-last, so the layer's head merge stays a view
            out = torch.cat([o.transpose(1, 2) for o, _ in parts], dim=1).transpose(1, 2)  # (B, H, N, d)
            lse = torch.cat([lse for _, lse in parts], dim=-1) if self.extra_tokens is not None else None
        if self.extra_tokens is None:
            return out
        k_e, v_e = self._extra_keys(q)  # (B, H, g_e, d)
        b = self.block_size
        every = BlockLayout(b, bs.global_blocks(-(-n // b), range(-(-k_e.shape[-2] // b)), device=q.device))
        out_e, lse_e = block_sparse_attention(q, k_e, v_e, every)  # every query -> the extra keys
        return merge_by_lse(out, lse, out_e, lse_e)[0]

    def _extra_keys(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """The extra global tokens' keys and values (B, H, g_e, d), by the layer's own projections."""
        dim, H = self.dim, self.heads
        kv = F.linear(self.extra_tokens, self.to_qkv.weight[dim:], self.to_qkv.bias[dim:])  # (g_e, 2 dim)
        kv = kv.to(q.dtype).view(-1, 2, H, self.head_dim).permute(1, 2, 0, 3)  # (2, H, g_e, d)
        B = q.shape[0]
        return kv[0].expand(B, -1, -1, -1), kv[1].expand(B, -1, -1, -1)

    # ------------------------------------------------------------------ decoding rules
    def _allowed(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """The causal pattern's element rule (H | 1, n, m) on absolute positions (decoding)."""
        b, w = self.block_size, self.half_window
        qb, kb = query_positions // b, key_positions // b  # (n,), (m,)
        blocks = (kb[None, :] >= qb[:, None] - w) | (kb[None, :] < self.global_blocks)  # (n, m): window, global
        if self.num_random_blocks:
            table = self._random_table(None).to(query_positions.device)[:, qb]  # (H, n, r)
            blocks = blocks | (table[..., None] == kb[None, None, None, :]).any(-2)  # (H, n, m)
        return blocks & (key_positions[None, :] <= query_positions[:, None])

    def _still_needed(self, key_positions: Tensor, next_position: int) -> Tensor:
        """(m,) bool: the cached keys a query at >= next_position may attend: global blocks, the last
        window, and blocks a query block still to come draws at random."""
        kb, current = key_positions // self.block_size, next_position // self.block_size
        keep = (kb < self.global_blocks) | (kb >= current - self.half_window)
        if self.num_random_blocks:
            keep = keep | (self._last_draw().to(kb.device)[kb] >= current)
        return keep

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"global_blocks={self.global_blocks}, num_random_blocks={self.num_random_blocks}, "
                f"num_extra_global_tokens={self.num_extra_global_tokens}, max_seq_len={self.max_seq_len}")
