"""Routing Transformer (Roy, Saffar, Vaswani, Grangier 2020, "Efficient Content-Based Sparse Attention
with Routing Transformers", TACL; arXiv 2003.05997).

Online k-means routing. The queries and keys of the routing heads are normalised (LayerNorm without
scale or bias, as the paper: x^ = LN(x), |x^| ~ sqrt(d)) and scored against k centroids mu_1..mu_k
(a buffer, per head):

    score(x, c) = x^ . mu_c - |mu_c|^2 / 2 = (|x^|^2 - |x^ - mu_c|^2) / 2     (nearest = k-means)

and each query attends only the keys routed to its cluster, with the ordinary softmax of the layer
(on the raw q, k: the normalisation serves the clustering):

    out_i = sum_{j in A(i)} softmax_j(q_i . k_j / sqrt(d)) v_j.

Cost: O(N k d) to score, O(N w d) to attend with clusters of w = N / k tokens: k = sqrt(N) gives the
paper's O(N^1.5 d). Memory O(N d + N k): no N x N tensor; the attention runs through
`core.block_sparse.gathered_block_sparse_attention` on the cluster order given by index tensors (no
gathered copy of q, k, v is kept; outputs come back in token order, merged by log-sum-exp). The
normalisation and the scores carry no gradient; the commitment loss is a small autograd Function
that keeps only the assignment and recomputes LN(x) in its backward pass.

**Bidirectional (the paper's balanced clusters).** Each centroid takes its top w = ceil(N / k)
queries and, separately, its top w keys by score (padding scores -inf: a padded token is never
chosen over a real one, and padded keys are masked). Query cluster c is block c of a gathered order
of k w queries, attending key block c of the gathered keys (a block-sparse call with blocks of w and
one slot per block, one pass of the gathered primitive). Clusters overlap: a query chosen by several
centroids attends the union, as a multiset, of their key sets; its per-cluster outputs are merged
exactly by their log-sum-exp,

    out_i = sum_c exp(lse_ic - LSE_i) out_ic,    LSE_i = log sum_c exp(lse_ic),

i.e. softmax attention with weight m_ij exp(s_ij), m_ij = the number of clusters that hold query i
and key j (1 for almost every pair). A real query chosen by no centroid (balancing leaves some out)
joins its nearest centroid's cluster: these queries are sorted by (nearest cluster, position), each
cluster's share padded to whole blocks of b (a divisor of w near 64: about a third of the queries
are left out, spread over all k clusters, so blocks of w would nearly double the pass), and a second
pass lets each block attend its cluster's w keys (w / b key blocks). The centroid scores are formed
as (k, N) so that each centroid's top-w is a contiguous top-k. The tests build m_ij from a naive top-k per centroid and compare with dense
attention weighted by it.

**Causal (exactly causal, ALGORITHMS.md section 4).** Top-w balancing looks at the whole sequence,
so it is not causal: each token goes to its nearest centroid. Q and K are shared in the routing
heads (k := q, the paper's choice for its decoders: a token's query and key are then in the same
cluster, so every query has at least itself to attend; the k projection of routing heads is unused
when causal). Tokens are ordered by (cluster, position) and each cluster is cut *separately* into
chunks of c = `window` tokens; a chunk attends itself and the previous chunk of the same cluster,
positions after the query masked. Computation (`core.bucketing.causal_chunk_pattern`, shared with
Reformer): each cluster is padded to whole blocks of b tokens, b a divisor of c near half the mean
cluster size N / k (16..64; outputs do not depend on b), and query block beta of a cluster attends
that cluster's blocks from the first block of the previous chunk up to itself (at most 2 c / b
slots, and no more than the largest cluster's block count; causal on the original positions), so
padding costs about k b / 2 slots instead of k c / 2. So query i attends the tokens
j <= i of its cluster whose rank r_j (number of earlier same-cluster tokens) satisfies
floor(r_j / c) >= floor(r_i / c) - 1: between min(c, r_i + 1) and 2c - 1 keys, a set that depends
on tokens up to i only. Departure from the paper (and every public implementation): they sort the
whole sequence and cut fixed chunks, so that a future token's cluster moves the chunk boundaries of
past tokens (a causality leak, and decoding differs from training). Padded tokens join no cluster
(they neither take a rank nor are attended).

**Local heads.** The first `local_heads` heads attend a band on the natural order, as the paper's
mix of local and routing heads: the `window` keys pos_q - window < pos_k <= pos_q when causal, the
keys |pos_q - pos_k| <= window / 2 when not (block-sparse, blocks of min(64, window)).

**Centroids** (`centroids`, (H_routing, k, d) buffer, initialised N(0, 1) from the global RNG so
`torch.manual_seed` reproduces a layer; saved with the weights, with `next_centroids`). Not trained by
gradient: a training step (training mode, autograd enabled, no decoding state) first applies the move
computed by the previous training step (`centroids <- next_centroids`), routes with the result, and
computes its own move from the real (padding excluded) normalised vectors assigned to each centroid,

    next_mu_c = decay mu_c + (1 - decay) mean{ x^ : nearest(x^) = c }      (mu_c when none)

over the queries and keys (the queries alone when causal: q = k), all items of the batch (the
paper's online k-means; lambda = decay). The one-step delay makes a no-grad inspection of a
training step (train mode under `torch.no_grad()`) route exactly as the step did, and keeps every
call causal (a batch never routes with centroids its own future tokens moved). Eval and no-grad
calls never change a buffer. (Centroids set by hand should be written to both buffers.) Keep the
buffers in float32: in a bf16 copy (`layer.to(torch.bfloat16)`) a 0.001 EMA step is below bf16's
resolution; bf16 autocast keeps them float32. Known limit: a forward run without autograd in training mode (the
reversible stack's `autograd.Function` forward) does not move the centroids.

**Commitment loss**, reported as
`report_aux_loss("routing_commitment", value, commitment_weight)`, is

    value = mean over those x^ of |x^ - sg(mu_nearest(x^))|^2

(pulls q and k towards their centroids; sg = stop gradient).

Options (defaults):
- `num_clusters` k (None: round(sqrt(max_seq_len)), the paper's k ~ sqrt(n); its enwik8 model
  uses n = 8192, k = 32 with windows 256). The number of centroids is fixed by options, not by N.
- `max_seq_len` (4096; models pass theirs): the longest sequence, and the default k.
- `window` (256, the paper's): the local heads' band and the causal chunk c.
- `local_heads` (None: heads // 2, "half the heads are local" as the paper): 0..heads.
- `ema_decay` (0.999, the paper's lambda): in [0, 1]; 1 freezes the centroids.
- `commitment_weight` (1e-4, routing-transformer's commitment factor; the paper states no number
  in the text summarised in SURVEY.md): the auxiliary loss's weight, >= 0.

Decoding (causal): a state with the local heads' last `window` keys (a `PositionedKVCache`) and, per
item, routing head and cluster, a ring of the last 2c keys and values with their ranks: a future
query of cluster c has rank >= the current count n_c, so it can reach only ranks >= (floor(n_c / c)
- 1) c, at most 2c - 1 keys per cluster. The state is bounded by k 2c per routing head whatever N
(tested). After a whole-sequence call the state holds that call's routing-head q, v and clusters
instead, and the first decoding step builds the rings from them (so a training forward, whose state
is discarded, never pays for k 2c-slot rings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import AttentionLayer, PositionedKVCache, dense_attention, head_groups, heads_last
from ..core import options as opt
from ..core.block_sparse import NO_BLOCK, BlockLayout, GatheredPass, block_sparse_attention, gathered_block_sparse_attention
from ..core.bucketing import bucket_slots, causal_chunk_pattern, ranks_in_bucket
from ..registry import Card, register

NEG_INF = float("-inf")


@dataclass
class RoutingState:
    """Decoding state: the local heads' cache and the routing heads' per-cluster rings of 2c keys."""

    local: PositionedKVCache | None
    ring_k: Tensor | None  # (B, Hr, K, 2c, d)
    ring_v: Tensor | None  # (B, Hr, K, 2c, d)
    ring_rank: Tensor | None  # (B, Hr, K, 2c) long: rank of the key in each slot, -1 = empty
    counts: Tensor | None  # (B, Hr, K) long: tokens routed to each cluster so far
    length: int
    #: after a whole-sequence call, (q, v, bucket) of the routing heads: the rings are built from them
    #: at the first decoding step (a training forward, which discards its state, never builds them)
    prefix: tuple[Tensor, Tensor, Tensor] | None = None


@register(
    Card(
        name="routing",
        title="Routing Transformer",
        paper="Roy et al., Efficient Content-Based Sparse Attention with Routing Transformers, TACL 2021 (arXiv 2003.05997)",
        year=2020,
        complexity="O(N sqrt N)",
        classes=("LP",),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=False,
        updates_buffers_in_training=True,
        # ema_decay=1 (frozen centroids) in the suite: it compares repeated training-mode calls bit for
        # bit, which centroids that move every training step cannot satisfy (one flipped assignment
        # changes outputs); the EMA itself is tested in tests/attention/test_routing.py and runs at
        # the defaults in test_defaults_work.
        test_options={"num_clusters": 3, "window": 4, "ema_decay": 1.0},
    )
)
class RoutingAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, num_clusters: int | None = None,
                 max_seq_len: int = 4096, window: int = 256, local_heads: int | None = None,
                 ema_decay: float = 0.999, commitment_weight: float = 1e-4) -> None:
        name = self.card.name
        opt.positive_int(name, "max_seq_len", max_seq_len)
        super().__init__(dim, heads, causal, max_seq_len=max_seq_len)
        opt.optional_positive_int(name, "num_clusters", num_clusters, none_means="round(sqrt(max_seq_len))")
        self.window = opt.positive_int(name, "window", window)
        if local_heads is None:
            self.local_count = heads // 2
        else:
            self.local_count = opt.int_in_range(name, "local_heads", local_heads, 0, heads)
        self.num_clusters_option, self.local_heads_option = num_clusters, local_heads
        self.num_clusters = num_clusters if num_clusters is not None else max(1, round(math.sqrt(max_seq_len)))
        self.ema_decay = opt.number_in_range(name, "ema_decay", ema_decay, 0.0, 1.0)
        self.commitment_weight = opt.number_in_range(name, "commitment_weight", commitment_weight, 0.0)
        self.routing_count = heads - self.local_count
        self.local_block = min(64, window)
        centroids = torch.randn(self.routing_count, self.num_clusters, self.head_dim)
        self.register_buffer("centroids", centroids)  # (Hr, K, d): what routing uses
        self.register_buffer("next_centroids", centroids.clone())  # the EMA step of the latest training forward

    # ------------------------------------------------------------------ routing
    @torch.no_grad()
    def _normalise(self, x: Tensor) -> Tensor:
        """LayerNorm without scale or bias over the head dimension, in float32 (float64 stays); no
        gradient (the commitment loss recomputes it in its backward pass)."""
        return _layer_norm(x)

    @torch.no_grad()
    def _scores(self, xn: Tensor) -> Tensor:
        """xn (B, Hr, N, d) normalised -> (B, Hr, N, K): x^ . mu - |mu|^2 / 2 (no gradient)."""
        mu = self.centroids.to(xn.dtype)  # (Hr, K, d)
        return torch.matmul(xn, mu.transpose(-1, -2)[None]).sub_(0.5 * mu.square().sum(-1)[None, :, None, :])

    @torch.no_grad()
    def _scores_by_centroid(self, xn: Tensor) -> Tensor:
        """The same scores as (B, Hr, K, N), the layout in which each centroid's top-w over the tokens is a
        contiguous top-k (on a transposed view it costs twice as much)."""
        mu = self.centroids.to(xn.dtype)  # (Hr, K, d)
        return torch.matmul(mu[None], xn.transpose(-1, -2)).sub_(0.5 * mu.square().sum(-1)[None, :, :, None])

    def _commit_and_update(self, vectors: list[tuple[Tensor, Tensor, Tensor]], update: bool) -> None:
        """vectors: [(x, x^ (B, Hr, N, d), nearest (B, Hr, N) long, real (B, N) bool)]. Reports the commitment
        loss; with `update`, stores the EMA move of the centroids towards the real vectors assigned to
        them in `next_centroids` (applied by the next training step)."""
        K = self.num_clusters
        total = None
        count = 0
        sums = torch.zeros(self.routing_count, K, self.head_dim, dtype=vectors[0][1].dtype, device=vectors[0][1].device)
        counts = torch.zeros(self.routing_count, K, dtype=sums.dtype, device=sums.device)
        for x, xn, nearest, real in vectors:
            Hr, d = xn.shape[1], xn.shape[-1]
            weight = real[:, None, :].expand(-1, Hr, -1).to(xn.dtype)  # (B, Hr, N)
            mu = self.centroids.to(xn.dtype, copy=True)  # a copy: a later call of a shared layer moves the buffer
            part = _Commitment.apply(x, mu, nearest, weight)  # sum of squared distances
            total = part if total is None else total + part
            count += int(real.sum()) * Hr
            if update:
                with torch.no_grad():
                    index = (torch.arange(Hr, device=xn.device)[None, :, None] * K + nearest).reshape(-1)  # (B Hr N,)
                    sums.view(-1, d).index_add_(0, index, (xn * weight[..., None]).reshape(-1, d))
                    counts.view(-1).index_add_(0, index, weight.reshape(-1))
        value = total / max(count, 1)
        self.report_aux_loss("routing_commitment", value, self.commitment_weight)
        if update:
            with torch.no_grad():
                seen = (counts > 0) & (self.ema_decay < 1.0)  # (Hr, K)
                means = sums / counts.clamp(min=1)[..., None]
                moved = self.ema_decay * self.centroids + (1.0 - self.ema_decay) * means.to(self.centroids.dtype)
                self.next_centroids.copy_(torch.where(seen[..., None], moved, self.centroids))

    # ------------------------------------------------------------------ the core
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: RoutingState | None):
        B, H, n, d = q.shape
        Lh = self.local_count
        local_out, local_state = None, None
        if 0 < Lh < H:  # one gradient buffer per tensor for both head groups (plain slices would make three)
            (ql, qr), (kl, kr), (vl, vr) = head_groups(q, Lh), head_groups(k, Lh), head_groups(v, Lh)
        else:
            (ql, qr), (kl, kr), (vl, vr) = (q[:, :Lh], q[:, Lh:]), (k[:, :Lh], k[:, Lh:]), (v[:, :Lh], v[:, Lh:])
        if Lh:
            local_out, local_state = self._local(ql, kl, vl, mask, None if state is None else state.local)
        if self.routing_count == 0:
            out = local_out
            new_state = RoutingState(local_state, None, None, None, None, n + (0 if state is None else state.length))
            return out, (new_state if self.causal else None)
        real = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask
        update = self.training and state is None and torch.is_grad_enabled()  # a training step
        if update:
            with torch.no_grad():
                self.centroids.copy_(self.next_centroids)  # the previous training step's EMA move
        if self.causal:
            routed, ring = self._causal_routing(qr, vr, real, state, update)
        else:
            routed, ring = self._balanced_routing(qr, kr, vr, real, update), None
        if local_out is None:
            out = routed
        else:
            out = heads_last(q)  # (B, H, N, d) stored heads-last: the head merge is a view
            out[:, :Lh] = local_out
            out[:, Lh:] = routed
        if not self.causal:
            return out, None
        length = n + (0 if state is None else state.length)
        return out, RoutingState(local_state, *ring[:4], length, prefix=ring[4])

    # -- local heads
    def _local_layout(self, n: int) -> BlockLayout:
        w = self.window
        if self.causal:
            return BlockLayout.banded(self.local_block, n, w - 1, 0, causal=True)
        return BlockLayout.banded(self.local_block, n, w // 2, w // 2)

    def _local(self, q, k, v, mask, state):
        if not self.causal:
            return block_sparse_attention(q, k, v, self._local_layout(q.shape[-2]), mask)[0], None
        w = self.window
        return self._attend_cached_pattern(
            q, k, v, mask, state,
            lambda qp, kp: ((qp[:, None] - kp[None, :] >= 0) & (qp[:, None] - kp[None, :] < w))[None],
            lambda kp, nxt: kp > nxt - w,
            full=lambda q_, k_, v_, m_: block_sparse_attention(q_, k_, v_, self._local_layout(q_.shape[-2]), m_)[0],
        )

    # -- bidirectional: balanced clusters
    def _balanced_routing(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor, update: bool) -> Tensor:
        B, Hr, n, d = q.shape
        K = self.num_clusters
        w = -(-n // K)  # cluster size
        qn, kn = self._normalise(q), self._normalise(k)  # (B, Hr, N, d), no gradient
        pad = ~real[:, None, None, :]  # (B, 1, 1, N)
        q_scores = self._scores_by_centroid(qn).masked_fill_(pad, NEG_INF)  # (B, Hr, K, N)
        k_scores = self._scores_by_centroid(kn).masked_fill_(pad, NEG_INF)
        nearest_q = q_scores.max(-2).indices  # (B, Hr, N) (max's indices: faster than argmax)
        self._commit_and_update([(q, qn, nearest_q, real), (k, kn, k_scores.max(-2).indices, real)], update)
        del qn, kn
        q_index = q_scores.topk(w, dim=-1).indices.flatten(2)  # (B, Hr, K w): cluster c = block c
        k_index = k_scores.topk(w, dim=-1).indices.flatten(2)  # (B, Hr, K w)
        del q_scores, k_scores
        key_mask = real[:, None, :].expand(B, Hr, n).gather(2, k_index)  # (B, Hr, K w)
        layout = BlockLayout(w, torch.arange(K, device=q.device)[None, :, None])  # cluster c -> key block c
        passes = [GatheredPass(layout, q_index, k_index, key_mask)]  # query slot block c: cluster c's queries
        # real queries chosen by no centroid join their nearest one
        members = torch.zeros(B, Hr, n, device=q.device).scatter_add_(2, q_index, torch.ones_like(q_index, dtype=torch.float))
        left_out = (members == 0) & real[:, None, :]  # (B, Hr, N)
        if bool(left_out.any()):
            # in blocks of b | w queries (each cluster's share padded to whole blocks of b, not of w: about
            # a third of the queries are left out, spread over all K clusters), each attending the w / b key
            # blocks of its cluster
            b = _divisor_near(w, 64)
            m = w // b
            bucket = torch.where(left_out, nearest_q, K)  # (B, Hr, N): K = not in the second pass
            slot_of, source, block_bucket = bucket_slots(bucket, K, b)
            blocks = block_bucket[..., None] * m + torch.arange(m, device=q.device)  # (B, Hr, nb, m)
            blocks = torch.where(block_bucket[..., None] < K, blocks, NO_BLOCK)
            passes.append(GatheredPass(BlockLayout(b, blocks), source, k_index, key_mask))
        # each (pass, slot) of a query adds its cluster's keys to the query's softmax: the merge by lse
        return gathered_block_sparse_attention(q, k, v, passes)[0]

    # -- causal: nearest centroid, per-cluster chunks
    def _causal_routing(self, q: Tensor, v: Tensor, real: Tensor, state: RoutingState | None, update: bool):
        B, Hr, n, d = q.shape
        K, c = self.num_clusters, self.window
        qn = self._normalise(q)  # (B, Hr, N, d): shared QK, the keys are the queries
        nearest = self._scores(qn).max(-1).indices  # (B, Hr, N)
        self._commit_and_update([(q, qn, nearest, real)], update)
        bucket = torch.where(real[:, None, :], nearest, K)  # padding: in no cluster
        if state is not None:
            return self._decode(q, v, bucket, state)
        b, blocks, query_source, key_source = causal_chunk_pattern(bucket, K, c)  # blocks of b | c; (B, Hr, L) each
        layout = BlockLayout(b, blocks, query_positions=query_source.clamp(min=0),  # the slots' original positions
                             key_positions=key_source.clamp(min=0), causal=True)
        # one pass over the slots (q is also the key); a padded token has no slot: output 0
        out, _ = gathered_block_sparse_attention(q, q, v, [GatheredPass(layout, query_source, key_source)])  # (B, Hr, N, d)
        return out, (None, None, None, None, (q.detach(), v.detach(), bucket))

    def _ring_from_sequence(self, q, v, bucket):
        """The decoding rings after a whole sequence: per cluster, the keys of rank >= (floor(n_c/c) - 1) c."""
        B, Hr, n, d = q.shape
        K, c = self.num_clusters, self.window
        counts = torch.zeros(B, Hr, K + 1, dtype=torch.long, device=q.device).scatter_add_(
            2, bucket, torch.ones_like(bucket))[..., :K]  # (B, Hr, K)
        rank = ranks_in_bucket(bucket, K + 1)  # (B, Hr, N)
        clusters = bucket.clamp(max=K - 1)
        lowest = ((counts // c - 1) * c).gather(2, clusters)  # (B, Hr, N)
        keep = (bucket < K) & (rank >= lowest)
        dump = K * 2 * c
        flat = torch.where(keep, clusters * 2 * c + rank % (2 * c), dump)  # (B, Hr, N)
        ring_k = q.new_zeros(B, Hr, dump + 1, d).scatter_(2, flat[..., None].expand(-1, -1, -1, d), q.detach())
        ring_v = v.new_zeros(B, Hr, dump + 1, d).scatter_(2, flat[..., None].expand(-1, -1, -1, d), v.detach())
        ring_rank = torch.full((B, Hr, dump + 1), -1, dtype=torch.long, device=q.device).scatter_(2, flat, rank)
        shape = (B, Hr, K, 2 * c)
        return (ring_k[:, :, :dump].reshape(*shape, d), ring_v[:, :, :dump].reshape(*shape, d),
                ring_rank[:, :, :dump].reshape(shape), counts)

    def _decode(self, q: Tensor, v: Tensor, bucket: Tensor, state: RoutingState):
        """New tokens one at a time against the rings (each writes itself first: it attends itself)."""
        B, Hr, n, d = q.shape
        K, c = self.num_clusters, self.window
        if state.ring_k is None:  # the first step after a whole-sequence call: build the rings now
            ring_k, ring_v, ring_rank, counts = self._ring_from_sequence(*state.prefix)
        else:
            ring_k, ring_v = state.ring_k.clone(), state.ring_v.clone()
            ring_rank, counts = state.ring_rank.clone(), state.counts.clone()
        outs = []
        heads = torch.arange(Hr, device=q.device)[None, :]
        items = torch.arange(B, device=q.device)[:, None]
        for t in range(n):
            cluster = bucket[:, :, t]  # (B, Hr)
            is_real = cluster < K
            cl = cluster.clamp(max=K - 1)
            r = counts[items, heads, cl]  # (B, Hr)
            slot = r % (2 * c)
            qt, vt = q[:, :, t], v[:, :, t]  # (B, Hr, d)
            # write the token into its cluster's ring (padded tokens write nothing)
            ii, hh, cc, ss = items.expand(B, Hr)[is_real], heads.expand(B, Hr)[is_real], cl[is_real], slot[is_real]
            ring_k[ii, hh, cc, ss] = qt.detach()[is_real].to(ring_k.dtype)
            ring_v[ii, hh, cc, ss] = vt.detach()[is_real].to(ring_v.dtype)
            ring_rank[ii, hh, cc, ss] = r[is_real]
            counts[ii, hh, cc] += 1
            keys = ring_k[items, heads, cl]  # (B, Hr, 2c, d)
            values = ring_v[items, heads, cl]
            ranks = ring_rank[items, heads, cl]  # (B, Hr, 2c)
            lowest = (r // c - 1) * c
            allowed = (ranks >= 0) & (ranks >= lowest[..., None]) & (ranks <= r[..., None]) & is_real[..., None]
            o = dense_attention(qt[:, :, None], keys.to(qt.dtype), values.to(vt.dtype),
                                allowed=allowed[:, :, None, :])  # (B, Hr, 1, d)
            outs.append(o)
        return torch.cat(outs, dim=2), (ring_k, ring_v, ring_rank, counts, None)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_clusters={self.num_clusters}, window={self.window}, "
                f"local_heads={self.local_count}, ema_decay={self.ema_decay}")


# ----------------------------------------------------------------------------- helpers
def _divisor_near(w: int, target: int) -> int:
    """The largest divisor of w within [16, target], else w (a block size that cuts w into whole blocks)."""
    return max((b for b in range(16, min(w, target) + 1) if w % b == 0), default=w)


def _layer_norm(x: Tensor) -> Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.layer_norm(x.to(compute), (x.shape[-1],))


class _Commitment(torch.autograd.Function):
    """sum over (item, head, token) of weight |LN(x) - mu_nearest|^2, keeping only x (an input the layer
    keeps anyway), the assignment and the weights for the backward pass, which recomputes LN(x)."""

    @staticmethod
    def forward(ctx, x, centroids, nearest, weight):
        Hr = x.shape[1]
        with torch.no_grad():
            chosen = centroids[torch.arange(Hr, device=x.device)[None, :, None], nearest]  # (B, Hr, N, d)
            value = ((_layer_norm(x) - chosen).square_().sum(-1) * weight).sum()
        ctx.save_for_backward(x, centroids, nearest, weight)
        return value

    @staticmethod
    def backward(ctx, grad):
        x, centroids, nearest, weight = ctx.saved_tensors
        Hr = x.shape[1]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            xn = _layer_norm(leaf)
            chosen = centroids[torch.arange(Hr, device=x.device)[None, :, None], nearest]
            residual = (xn.detach() - chosen).mul_(2 * weight[..., None]).mul_(grad)  # d value / d x^
            (grad_x,) = torch.autograd.grad(xn, leaf, residual)
        return grad_x, None, None, None
