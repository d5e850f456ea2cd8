"""Sinkhorn Transformer (Tay et al. 2020, "Sparse Sinkhorn Attention", ICML; arXiv 2002.11296).

Cut the sequence into n_B = ceil(N / b) blocks of b tokens. A small "sorting network" reads one
summary per block and scores, for every block i, where its sorted block should come from; Sinkhorn
balancing turns the scores into a soft permutation P (n_B x n_B), and each query block attends its
own (local) block plus its *sorted* block, a P-weighted mixture of key (and value) blocks:

    s_i      = summary of block i (bidirectional) or of the blocks before i (causal)   (d,)
    R_i      = relu(s_i W_1 + b_1) W_2[:, :n_B] + b_2[:n_B]                           (n_B,) logits
    P        = Sinkhorn((R + G) / tau)          (G: Gumbel noise, training only, off by default)
    K~_i     = sum_j P_ij K_j,   V~_i = sum_j P_ij V_j                                 (b, d) blocks
    out_q    = softmax over [K_i ; K~_i] of (q . k / sqrt(d)) applied to [V_i ; V~_i],   q in block i

one softmax over the 2b keys of the local and the sorted block. Sinkhorn runs in log space:

    X^0 = R / tau;   X <- X - logsumexp_rows(X);   X <- X - logsumexp_cols(X)   (`sinkhorn_iterations` times)
    P = exp(X)       (rows and columns sum to 1 at convergence: a doubly stochastic "soft permutation")

Cost: the sort network O(n_B d^2 + n_B^2 d) per head, Sinkhorn O(iterations n_B^2), the mixture
P @ blocks O(n_B^2 b d) = O(N n_B d), the attention O(N 2b d); memory O(b^2 + n_B^2) per head for the
scores and the sort matrix (the survey's O(B^2)), plus O(N d) for the keys. The attention runs
through `core.block_sparse` on a key table of 2 n_B b rows: the (zero-padded) keys followed by the
sorted keys, with the layout "query block i attends key blocks i and n_B + i" (so no N x N tensor,
and the backward pass recomputes the block scores).

The mixture is quadratic in N with the small constant d / b (at N = 16K, b = 64, dim 256: about 13
of the step's 46 GFLOP forward + backward, the projections 26); it is the paper's cost, not a dense
score matrix.

Memory (forward + backward, measured at dim 256, 4 heads, batch 1, N = 16K: about 1.55x SDPA's peak
bidirectional, 1.8x causal; 4.2x (bidirectional) and 4.6x (causal) from N = 8K to 32K). The key and
value tables are written by one autograd Function (`_LocalAndSorted`): the zero-padded keys, then
P @ blocks written in place into the second half, and autograd keeps only P and the table (whose
first half is the padded keys the product's backward needs), not a separate padded copy; its
backward works per (item, head) so its transients are one head's blocks. q is copied once, so that
the fused projection's (B, N, 3 dim) output is freed after the tables are built (the kernel then
keeps q, the two tables and the output: 6 N d per head); the kernel returns the tables' gradients
as they are (no heads-last copy, since the tables are its own heads-first key tables). The kernel runs with a score budget of
2^18 elements (`SCORE_BUDGET`), a quarter of its default, which shrinks its workspace. Sinkhorn
keeps no graph of its iterations: autograd would otherwise keep about three (B, H, n_B, n_B)
tensors per iteration, a term quadratic in N (about 100 MiB at N = 32K). Bidirectional, one
autograd Function (`_SinkhornBalance`) runs the iterations in place and its hand-written backward
recomputes them (2 x iterations sort-sized tensors, one head at a time when large), 2.5x faster than
checkpointed autograd (65 -> 26 ms of a 16K step); causal, each iteration and the whole loop are
checkpointed. Either recomputation runs last in the backward pass, after the large gradients are
freed.

Decisions (where this departs from, or fills in, the paper):
- Summaries are of the per-head *keys* (so `attend(q, k, v)` is a function of q, k, v, and each head
  sorts in its own key space) and are *means* over a block's real tokens, not the paper's sums: for a
  full block the two differ by the constant 1 / b (absorbed by W_1), while the mean keeps partial
  and padded blocks, and the causal cumulative summaries, on one scale. The sort network is per
  head: W_1 (H, d, d), b_1 (H, d), W_2 (H, d, M), b_2 (H, M) with M = ceil(`max_seq_len` / b), never
  sized from the N of a call: a call with n_B blocks uses the first n_B columns of W_2 (about
  d^2 + d M parameters per head; the paper's "about 2 d^2" for d = M). The logits are used raw
  (the paper's final ReLU before Sinkhorn only clips them at 0; in log space it is not needed).
- Padding: padded keys and values are zeroed before the summaries and the mixture, a block with no
  real token is neither a row nor a column of the sort (its entries are excluded from Sinkhorn), and
  a sorted key (i, t) is a real key iff some block j that P_i may use has a real token t (a
  structural rule: it depends on the mask, never on content). A query whose keys are all padding
  gets zeros.
- Causal (exact; the conformance suite checks bitwise that no output depends on a later token):
  * the summary of row i is the mean of the keys of blocks 0 .. i-1 (a cumulative sum up to the
    *previous* block): block i's own summary would include the later tokens of block i, which are
    the future of its first queries;
  * the sort is masked to strictly earlier blocks (P_ij = 0 for j >= i), so the sorted block of
    query block i mixes only blocks that lie wholly in its past (no element mask needed on them);
    block 0 has no sorted block; the local block is causal inside;
  * Sinkhorn's column normalisation over *all* rows would let later rows change earlier ones, so the
    causal column step normalises entry (i, j) by the sum of column j over rows <= i (a cumulative
    sum, in float64), and one more row step follows the iterations, so every row is a convex
    mixture of earlier blocks. Row i then depends only on blocks < i. This is our reading of the paper's
    "causal Sinkhorn balancing" with cumulative sums; the columns are balanced only cumulatively.
  Decoding recomputes (`decoding="recompute"`, `AttentionLayer._attend_recompute`): the sorted
  block of a later query block may mix any earlier block, so every past key and value stays
  attendable and the history is kept whole; each step recomputes the sequence (exactly the full
  forward). A cheaper exact incremental form exists (sorted blocks fixed once a block is complete,
  only the current block's local attention per step) but is not implemented.
- Gumbel noise (`gumbel_noise`, default False): off by default so that training equals evaluation.
  When on, and only in training, G is drawn from the layer's `SeededDraws` per query-block row i
  (`generator(i)`, (H, M) values of which the first n_B are used; shared by the batch items) and the
  draw count advances after each training call, so the layer then changes a buffer in training (the
  card says `updates_buffers_in_training`, so the reversible stack restores the count before it
  recomputes a block; without the noise, training changes nothing and equals evaluation).
- SortCut (`sortcut_blocks` = n_s, encoders only): the paper's truncation Y = softmax(Q psi(K)[:n]^T)
  psi(V)[:n]: every query attends the first n_s sorted blocks K~_0 .. K~_{n_s-1} (a budget of n_s b
  keys shared by all queries) and no local block; a call with fewer blocks uses all min(n_s, n_B).
  Cost O(N n_s b d).
- Exact limits: with one block (N <= b) P = [[1]] and the layer is dense attention (causal: dense
  causal attention); with P = identity the sorted block is the local block itself, and a softmax over
  a key set listed twice equals the one over the set, so the layer is local block attention (tested).

Options (defaults):
- `block_size` = 64 (the survey's and sinkhorn-transformer's bucket of 64; LRA's Sinkhorn uses 50);
- `sinkhorn_iterations` = 8 and `temperature` = 0.75 (sinkhorn-transformer's defaults; the paper's
  exact values are not stated in our sources): iterations >= 1, temperature > 0;
- `sortcut_blocks` = None (no SortCut) or n_s >= 1 (<= M), bidirectional only;
- `gumbel_noise` = False;
- `max_seq_len` = 4096 (models pass theirs): sizes the sort network.
Float16/bfloat16 inputs: the sort network and Sinkhorn run in float32 (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..core import AttentionLayer, SeededDraws, heads_last, zero_padded
from ..core import gemm
from ..core import options as opt
from ..core.block_sparse import BlockLayout, block_sparse_attention, global_blocks
from ..registry import Card, register

#: a finite "-inf" for excluded sort entries: keeps Sinkhorn's gradients free of NaN on empty rows
_EXCLUDED = -1e9
#: transient score elements per group of the block-sparse kernel (its default is 2^20): a quarter of
#: the default keeps the kernel's workspace (scores, gathered keys and values, their gradients) near
#: 8 MiB, which at N = 16K is the difference between 2.1x and 1.9x SDPA's peak memory, at no
#: measurable cost in time (the groups still hold 8 query blocks of 64)
SCORE_BUDGET = 2**18
#: sort matrices (B, H, nB, nB) up to this many elements are balanced in one call; larger ones one
#: head at a time, whose transients are a quarter the size (at N = 16K, 4 heads, the whole-head loop
#: left ~70 MiB of freed but resident heap). Below it the per-head loop only added Python overhead
#: (40 % of the step at N = 1K).
WHOLE_SINKHORN_ELEMENTS = 2**17


@register(
    Card(
        name="sinkhorn",
        title="Sinkhorn Transformer",
        paper="Tay et al., Sparse Sinkhorn Attention, ICML 2020 (arXiv 2002.11296)",
        year=2020,
        complexity="O(B^2)",
        classes=("LP",),
        causal=True,
        bidirectional=True,
        decoding="recompute",
        # with gumbel_noise=True a training call advances the seeded draw count (a buffer); the default
        # (no noise) leaves every buffer alone and equals eval, as tests/attention/test_sinkhorn.py checks
        updates_buffers_in_training=True,
        test_options={"block_size": 4, "max_seq_len": 160},
        notes="a later query block's sorted block may mix any earlier block: decoding recomputes on the history",
    )
)
class SinkhornAttention(AttentionLayer):

    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool = False,
        *,
        block_size: int = 64,
        sinkhorn_iterations: int = 8,
        temperature: float = 0.75,
        sortcut_blocks: int | None = None,
        gumbel_noise: bool = False,
        max_seq_len: int = 4096,
    ) -> None:
        super().__init__(dim, heads, causal, max_seq_len=max_seq_len)
        name = self.card.name
        opt.positive_int(name, "block_size", block_size, what="tokens per block")
        opt.positive_int(name, "sinkhorn_iterations", sinkhorn_iterations)
        opt.number_in_range(name, "temperature", temperature, 0.0, low_inclusive=False)
        opt.boolean(name, "gumbel_noise", gumbel_noise)
        self.max_blocks = -(-max_seq_len // block_size)  # M: the sort network's output width
        opt.optional_positive_int(name, "sortcut_blocks", sortcut_blocks, none_means="no SortCut")
        if sortcut_blocks is not None:
            if causal:
                raise ValueError(f"{name}: sortcut_blocks={sortcut_blocks} with causal=True is not supported "
                                 f"(SortCut is for encoders); allowed: sortcut_blocks=None when causal")
            if sortcut_blocks > self.max_blocks:
                raise ValueError(
                    f"{name}: sortcut_blocks={sortcut_blocks} exceeds the {self.max_blocks} blocks of max_seq_len="
                    f"{max_seq_len} with block_size={block_size}; allowed: None or an int in [1, {self.max_blocks}]"
                )
        self.block_size, self.iterations, self.temperature = block_size, sinkhorn_iterations, float(temperature)
        self.sortcut_blocks, self.gumbel_noise = sortcut_blocks, gumbel_noise
        d, m = self.head_dim, self.max_blocks
        self.sort_w1 = nn.Parameter(torch.empty(heads, d, d).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d)))
        self.sort_b1 = nn.Parameter(torch.zeros(heads, d))
        self.sort_w2 = nn.Parameter(torch.empty(heads, d, m).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d)))
        self.sort_b2 = nn.Parameter(torch.zeros(heads, m))
        self.draws = SeededDraws()

    # ------------------------------------------------------------------ the core
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state):
        if self.causal:
            return self._attend_recompute(q, k, v, mask, state, self._full)
        return self._full(q, k, v, mask), None

    def _full(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The parallel form on a whole sequence: q, k, v (B, H, N, d) -> (B, H, N, d)."""
        B, H, n, d = q.shape
        b = self.block_size
        nb = -(-n // b)
        pad = nb * b - n
        real = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask
        real_blocks = F.pad(real, (0, pad), value=False).view(B, nb, b)  # (B, nB, b)
        P, support = self.sort_matrix(_zero_padded_blocks(k, mask, b), real_blocks)  # (B, H, nB, nB), (B, 1, nB, nB)
        rows = nb if self.sortcut_blocks is None else min(self.sortcut_blocks, nb)
        P = P[:, :, :rows].to(k.dtype)  # (B, H, rows, nB): sorted block i = sum_j P_ij block j
        # sorted key (i, t) is real iff a block P_i may use has a real token t (structural, mask only)
        sorted_real = (support[:, 0, :rows].to(torch.float32) @ real_blocks.to(torch.float32)) > 0  # (B, rows, b)
        sorted_real = sorted_real.reshape(B, rows * b)
        if self.sortcut_blocks is not None:  # every query attends the first n_s sorted blocks only
            k_blocks, v_blocks = _zero_padded_blocks(k, mask, b), _zero_padded_blocks(v, mask, b)  # (B, H, nB, b, d)
            sorted_k = gemm.product_with_grad(P, k_blocks.flatten(-2)).view(B, H, rows * b, d)  # (B, H, rows b, d)
            sorted_v = gemm.product_with_grad(P, v_blocks.flatten(-2)).view(B, H, rows * b, v.shape[-1])
            layout = BlockLayout(b, global_blocks(nb, range(rows), device=q.device))
            return block_sparse_attention(q, sorted_k, sorted_v, layout, key_mask=sorted_real)[0]
        keys = _LocalAndSorted.apply(k, P, mask, b)  # (B, H, 2 nB b, d): local blocks, then sorted blocks
        values = _LocalAndSorted.apply(v, P, mask, b)  # (B, H, 2 nB b, dv)
        key_mask = torch.cat([real_blocks.view(B, nb * b), sorted_real], dim=1)  # (B, 2 nB b)
        # q is a view of the fused projection's output: a copy of q lets that (B, N, 3 dim) buffer go
        # once k and v are in the key tables (autograd keeps only what it needs: q, the tables)
        layout = self._layout(nb, q.device)
        out, _ = block_sparse_attention(q.contiguous(), keys, values, layout, key_mask=key_mask, score_budget=SCORE_BUDGET)
        return out  # (B, H, N, dv)

    def _layout(self, nb: int, device) -> BlockLayout:
        """Query block i attends key block i (its local block) and key block nB + i (its sorted block);
        causal: inside the local block pos_k <= pos_q; sorted keys (earlier blocks only) at position -1."""
        own = torch.arange(nb, device=device)
        blocks = torch.stack([own, own + nb], dim=-1)[None]  # (1, nB, 2)
        if not self.causal:
            return BlockLayout(self.block_size, blocks)
        n_keys = nb * self.block_size
        key_positions = torch.cat([torch.arange(n_keys, device=device), torch.full((n_keys,), -1, device=device)])
        return BlockLayout(self.block_size, blocks, key_positions=key_positions, causal=True)

    # ------------------------------------------------------------------ the sorting network
    def sort_matrix(self, k_blocks: Tensor, real_blocks: Tensor) -> tuple[Tensor, Tensor]:
        """The soft permutation of the key blocks.

        k_blocks: (B, H, nB, b, d) keys, padding zeroed; real_blocks: (B, nB, b) bool.
        Returns P (B, H, nB, nB) in the compute dtype (P_ij: weight of block j in sorted block i, 0 where
        excluded) and its support (B, 1, nB, nB) bool (the entries Sinkhorn may use).
        """
        B, H, nb, b, d = k_blocks.shape
        compute = torch.float64 if k_blocks.dtype == torch.float64 else torch.float32
        sums = k_blocks.to(compute).sum(dim=3)  # (B, H, nB, d)
        counts = real_blocks.sum(dim=-1).to(compute)  # (B, nB)
        has_real = counts > 0  # (B, nB)
        if self.causal:  # the summary of row i: blocks 0 .. i-1 (a cumulative sum up to the previous block)
            sums = F.pad(sums.cumsum(dim=2)[:, :, :-1], (0, 0, 1, 0))  # (B, H, nB, d), row 0: nothing
            counts = F.pad(counts.cumsum(dim=1)[:, :-1], (1, 0))  # (B, nB)
        summary = sums / counts.clamp(min=1.0)[:, None, :, None]  # (B, H, nB, d): means over real tokens
        w1, b1 = self.sort_w1.to(compute), self.sort_b1.to(compute)
        w2, b2 = self.sort_w2[..., :nb].to(compute), self.sort_b2[..., :nb].to(compute)
        hidden = torch.relu(torch.einsum("bhnd,hde->bhne", summary, w1) + b1[:, None, :])  # (B, H, nB, d)
        logits = torch.einsum("bhne,hem->bhnm", hidden, w2) + b2[:, None, :]  # (B, H, nB, nB)
        if self.gumbel_noise and self.training:
            logits = logits + self._gumbel(nb, logits.device, compute)  # (1, H, nB, nB)
            self.draws.redraw()
        support = has_real[:, :, None] & has_real[:, None, :]  # (B, nB, nB): rows and columns with real tokens
        if self.causal:
            support = support & torch.ones(nb, nb, dtype=torch.bool, device=support.device).tril(-1)  # j < i
        support = support[:, None]  # (B, 1, nB, nB)
        # checkpointed: autograd would keep ~3 (B, H, nB, nB) tensors per iteration (at N = 32K, b = 64,
        # 4 heads, 8 iterations about 100 MiB, quadratic in N); recomputed in the backward pass instead,
        # where it runs last, after the kernel's and the tables' gradients are freed
        # large sort matrices one head at a time (WHOLE_SINKHORN_ELEMENTS): the loop's transients
        # (float64 when causal) are then a quarter of the size
        scaled = logits / self.temperature  # (B, H, nB, nB)
        heads_per_call = H if scaled.numel() <= WHOLE_SINKHORN_ELEMENTS else 1
        if not self.causal:  # one Function: no autograd graph per iteration, its backward recomputes
            return _SinkhornBalance.apply(scaled, support, self.iterations, heads_per_call), support
        P = torch.cat([checkpoint(sinkhorn, scaled[:, h:h + heads_per_call], support, self.iterations,
                                  causal=self.causal, use_reentrant=False)
                       for h in range(0, H, heads_per_call)], dim=1)  # (B, H, nB, nB)
        return P, support

    def _gumbel(self, nb: int, device, dtype) -> Tensor:
        """(1, H, nB, nB) Gumbel noise: row i from the seeded generator of row i (never from N)."""
        rows = []
        for i in range(nb):
            u = torch.rand(self.heads, self.max_blocks, generator=self.draws.generator(i), dtype=torch.float64)
            rows.append(u[:, :nb])
        u = torch.stack(rows, dim=1).clamp(1e-12, 1 - 1e-12)  # (H, nB, nB)
        return (-torch.log(-torch.log(u))).to(device=device, dtype=dtype)[None]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_size={self.block_size}, sinkhorn_iterations={self.iterations}, "
                f"temperature={self.temperature}, sortcut_blocks={self.sortcut_blocks}, max_seq_len={self.max_seq_len}")


def _zero_padded_blocks(x: Tensor, mask: Tensor | None, b: int) -> Tensor:
    """x (B, H, N, f) -> (B, H, nB, b, f): padding zeroed, N padded with zeros to nB b."""
    B, H, n, f = x.shape
    nb = -(-n // b)
    x = zero_padded(x, mask, seq_dim=2)
    return (F.pad(x, (0, 0, 0, nb * b - n)) if nb * b > n else x).unflatten(2, (nb, b))  # a view when it can


class _LocalAndSorted(torch.autograd.Function):
    """The key (or value) table of the layer: x (B, H, N, f) zero-padded to nB b rows (padding zeroed),
    followed by its sorted blocks P @ blocks, as one contiguous (B, H, 2 nB b, f) tensor.

    Plain autograd would keep a zero-padded copy of x for the product's backward beside the table; this
    Function writes both halves into one buffer and saves only P and the table (its first half is
    the padded x), so the layer keeps 2 nB b f numbers per head instead of 3 nB b f."""

    @staticmethod
    def forward(ctx, x: Tensor, P: Tensor, mask: Tensor | None, b: int) -> Tensor:
        B, H, n, f = x.shape
        nb = P.shape[-1]
        table = x.new_empty(B, H, 2 * nb * b, f)
        local = table[:, :, : nb * b]
        local[:, :, :n].copy_(x)
        local[:, :, n:].zero_()
        if mask is not None:
            local[:, :, :n].masked_fill_(~mask[:, None, :, None], 0.0)
        sorted_half = table[:, :, nb * b:].view(B, H, nb, b * f)  # (B, H, nB, b f), a view of the table
        gemm.batched_matmul(P, local.view(B, H, nb, b * f), sorted_half)  # sorted block i = sum_j P_ij block j
        ctx.save_for_backward(P, table)
        ctx.mask, ctx.n, ctx.b = mask, n, b
        return table

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_table: Tensor):
        P, table = ctx.saved_tensors
        B, H, _, f = table.shape
        nb, b, n = P.shape[-1], ctx.b, ctx.n
        local_blocks = table[:, :, : nb * b].view(B, H, nb, b * f)  # (B, H, nB, b f)
        grad_P = P.new_empty(P.shape)  # (B, H, nB, nB)
        grad_x = heads_last(table, n)  # (B, H, N, f) stored heads-last: the fused projection reads it in place
        for i in range(B):  # per item and head: transients of one head's blocks, not of the whole table
            for h in range(H):
                grad_sorted = grad_table[i, h, nb * b:].reshape(nb, b * f)  # (nB, b f)
                gemm.matmul(grad_sorted, local_blocks[i, h].t(), out=grad_P[i, h])
                grad_local = gemm.matmul(P[i, h].t(), grad_sorted).view(nb * b, f)  # (nB b, f)
                torch.add(grad_local[:n], grad_table[i, h, :n], out=grad_x[i, h])
        if ctx.mask is not None:
            grad_x.masked_fill_(~ctx.mask[:, None, :, None], 0.0)
        return grad_x, grad_P, None, None


def sinkhorn(logits: Tensor, support: Tensor, iterations: int, *, causal: bool = False) -> Tensor:
    """Sinkhorn balancing in log space -> P = exp(X), 0 outside `support`.

    logits (..., n, n); support broadcastable bool. Each iteration normalises the rows, then the
    columns; bidirectional, rows and columns sum to 1 at convergence (on a support where that is
    possible). Causal: the column step normalises entry (i, j) by column j over rows <= i only
    (cumulative), and a final row step follows, so row i depends on rows <= i only and sums to 1 (a
    convex mixture of earlier blocks), or to 0 when empty.
    """
    excluded = ~support
    x = logits.masked_fill(excluded, _EXCLUDED)  # (..., n, n)
    if causal:
        x = x.double()  # the cumulative column step below exponentiates log-probabilities down to -700
    for _ in range(iterations):  # each iteration checkpointed: autograd keeps one (..., n, n) tensor per iteration
        if torch.is_grad_enabled() and x.requires_grad:
            x = checkpoint(_sinkhorn_step, x, support, causal, use_reentrant=False)
        else:
            x = _sinkhorn_step(x, support, causal)
    if causal:
        x = (x - torch.logsumexp(x, dim=-1, keepdim=True)).masked_fill(excluded, _EXCLUDED)
    return torch.exp(x).masked_fill(excluded, 0.0).to(logits.dtype)


class _SinkhornBalance(torch.autograd.Function):
    """`sinkhorn(logits, support, iterations)` (bidirectional) with a hand-written backward pass.

    Forward: the iterations in place, without a graph, saving only the logits. Backward: the
    iterations are recomputed keeping each half-step's output y (rows, then columns), then undone in
    reverse: a half-step y = (x - logsumexp(x)).masked_fill(excluded, c) along a dimension has the
    gradient dx = dz - exp(y) sum(dz) along it, dz = dy masked to the support (exp(y) is the softmax
    there, 0 off it). Same values as the checkpointed autograd form, about twice as fast; the
    recomputation's 2 x iterations tensors run `heads_per_call` heads at a time."""

    @staticmethod
    def forward(ctx, logits: Tensor, support: Tensor, iterations: int, heads_per_call: int) -> Tensor:
        excluded = None if bool(support.all()) else ~support  # (no padding: nothing to mask)
        x = _masked(logits.clone(), excluded, _EXCLUDED)  # (B, H, n, n)
        for _ in range(iterations):
            for dim in (-1, -2):
                _masked(x.sub_(torch.logsumexp(x, dim=dim, keepdim=True)), excluded, _EXCLUDED)
        ctx.save_for_backward(logits)
        ctx.excluded, ctx.iterations, ctx.heads_per_call = excluded, iterations, heads_per_call
        return _masked(x.exp_(), excluded, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_P: Tensor):
        (logits,) = ctx.saved_tensors
        excluded = ctx.excluded
        grad_logits = torch.empty_like(logits)
        H, step = logits.shape[1], ctx.heads_per_call
        for h in range(0, H, step):
            x = _masked(logits[:, h:h + step].clone(), excluded, _EXCLUDED)
            outputs = []  # each half-step's output, (B, step, n, n)
            for _ in range(ctx.iterations):
                for dim in (-1, -2):
                    x = _masked(x - torch.logsumexp(x, dim=dim, keepdim=True), excluded, _EXCLUDED)
                    outputs.append(x)
            P = _masked(outputs[-1].exp(), excluded, 0.0)
            grad = grad_P[:, h:h + step].to(P.dtype) * P  # d/dy of P = exp(y) on the support
            for index in range(len(outputs) - 1, -1, -1):
                dim = -1 if index % 2 == 0 else -2
                grad = _masked(grad, excluded, 0.0)  # dz
                softmax = _masked(outputs[index].exp_(), excluded, 0.0)  # (the output is not needed again)
                grad = grad.sub_(softmax.mul_(grad.sum(dim=dim, keepdim=True)))
                outputs[index] = None
            grad_logits[:, h:h + step] = _masked(grad, excluded, 0.0)
        return grad_logits, None, None, None


def _masked(x: Tensor, excluded: Tensor | None, value: float) -> Tensor:
    """x with the excluded entries set to value, in place (x itself when nothing is excluded)."""
    return x if excluded is None else x.masked_fill_(excluded, value)


def _sinkhorn_step(x: Tensor, support: Tensor, causal: bool) -> Tensor:
    """One iteration: the rows, then the columns (causal: cumulatively, over rows <= i)."""
    excluded = ~support
    x = (x - torch.logsumexp(x, dim=-1, keepdim=True)).masked_fill(excluded, _EXCLUDED)
    if causal:
        return (x - _log_cumulative_column_sums(x, support)).masked_fill(excluded, _EXCLUDED)
    return (x - torch.logsumexp(x, dim=-2, keepdim=True)).masked_fill(excluded, _EXCLUDED)


def _log_cumulative_column_sums(x: Tensor, support: Tensor) -> Tensor:
    """log sum_{i' <= i} exp(x[i', j]) for float64 x whose supported entries are <= 0 (log-probabilities
    after a row step, and after a cumulative column step): exp cannot overflow, and clamping at -700
    keeps the sums above 0 (a difference only for probabilities below e^-700). About 3x faster than
    `torch.logcumsumexp`, forward and backward; a prefix sum, so row i reads rows <= i only."""
    sums = torch.cumsum(torch.exp(x.clamp(min=-700.0)) * support, dim=-2)  # (..., n, n)
    return torch.log(torch.where(support, sums, torch.ones_like(sums)))  # 1 where excluded: no log(0)
