"""Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer", ICLR; arXiv 2001.04451).

Shared-QK attention with angular locality-sensitive hashing. One projection gives q and k (the
layer's `projections="shared_qk"`), keys are length-normalised, k_j = q_j / |q_j|, and

    out_i = sum_{j in P_i} exp(s_ij - z_i) v_j,      s_ij = q_i . k_j / sqrt(d),
    z_i   = log sum_{j in P_i} exp(s_ij),             P_i = union over hash rounds r of P_i^(r)

Hashing (per round r = 0 .. n_hashes - 1): a seeded random rotation R_r (d x n_buckets / 2, drawn
from the layer's `SeededDraws`, a buffer saved with the weights, never depending on N) gives
h_r(x) = argmax([x R_r ; -x R_r]) on the key direction. Tokens are ordered by (bucket, position)
and cut into chunks of c = `bucket_size`; a query attends its own chunk and the previous one,
never itself unless nothing else is allowed (then out_i = v_i: the paper's large negative
self-score, in the limit).

Causal (exactly causal, ALGORITHMS.md section 4; a departure from the paper, whose global sort lets
a future token's bucket move the chunk boundaries of past tokens): each bucket is cut into chunks
*separately* (rank of a token inside its bucket, in position order, // c), so a token's chunk-mates
are the same-bucket tokens just before it; it attends its own chunk and the previous chunk of the
same bucket, keys strictly before it (self excluded by strict causality). Padded tokens are in no
bucket (no slot: never attended, output 0). The slots come from `core.bucketing.causal_chunk_pattern`
(shared with Routing): each bucket padded to whole blocks of b, a divisor of c near half the mean
bucket size (16..64), query block beta of a bucket attending the bucket's blocks from the first block
of its previous chunk up to itself, query blocks ordered by how many key blocks they use (so the
kernel skips the slots a group does not use), with the original positions (codes 2 pos for queries,
2 pos + 1 for keys with the kernel's causal rule: pos_k < pos_q exactly). With n_buckets sized from
max_seq_len, a shorter call has small buckets, which blocks of c would pad to whole chunks (at
N = max_seq_len / 4: 1.6x slower). Decoding keeps chunk-sized blocks (`_slots`), the same key sets.

Bidirectional: the paper's global sort by (bucket, position), fixed chunks of c over the sorted
order, own + previous chunk attended regardless of bucket (as the paper; no wrap-around from the
first chunk to the last, unlike trax); padded tokens form the last bucket, key-masked, so real
tokens' chunks do not depend on padded content. The self rule is exact: a `PairExclusion` on the
token ids drops the pair (t, t), and a real query left with no key outputs its own value through the
primitive's `self_keys` (no full-size copy of the output or of dV).

Hash rounds and the duplicate correction (the paper's): out_i is one softmax over the *union* of the
rounds' key sets, each key counted once however many rounds hold it (the paper subtracts log N_ij,
N_ij = number of rounds in which i attends j, from s_ij in every round; summing the rounds by their
log-sum-exp weights then counts the pair once). Here round r instead *excludes* the pairs already
attended in an earlier round r' < r (a `PairExclusion` per earlier round on its chunk codes: j was in
i's own or previous chunk of round r' iff code_i - code_j in {0, 1}), so the rounds' pair sets are
disjoint and their merge is exactly that softmax. All rounds run through one
`gathered_block_sparse_attention` call: each round is a pass over its sorted (or per-bucket chunked)
order, read from q, k, v by index, merged per token by log-sum-exp.

Cost: O(n_hashes N c d) time (causal: each bucket padded to a multiple of b, at most
n_buckets (b - 1) empty slots more; round r also evaluates r exclusion codes per pair);
O(N d) memory: the gathered primitive keeps no sorted copy of q, k, v and no per-round output
(autograd keeps the projections, the normalised keys, the merged output and lse, and the rounds'
integer plans, O(n_hashes N)); hashing runs one round at a time ((B, H, N, n_buckets / 2) scores).
No N x N tensor.

Decoding (card "kv_cache"): the state keeps, per token, its key, value, position and per-round
(bucket, rank in bucket), and per round the count of real tokens per bucket. A future query of bucket
b in round r attends only chunks >= count_b // c - 1 of that bucket, so only tokens with rank >=
(count_b // c - 1) c in some round are kept: at most n_hashes n_buckets 2c per (item, head), whatever
N. A step slots the cached and new tokens exactly as the forward does and runs each new query as its
own query block: the same kernel, the same result.

Options (defaults: the paper's working settings):
- `bucket_size` (64): c, the chunk length;
- `n_hashes` (4): hash rounds;
- `n_buckets` (None: max_seq_len / bucket_size rounded up to even, at least 2, as the paper sizes it):
  1 (everything in one bucket) or an even int >= 2;
- `max_seq_len` (4096; models pass theirs): sizes the default n_buckets, never the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import AttentionLayer, SeededDraws, heads_last
from ..core import options as opt
from ..core.block_sparse import NO_BLOCK, BlockLayout, GatheredPass, PairExclusion, gathered_block_sparse_attention
from ..core.bucketing import causal_chunk_pattern, ranks_in_bucket
from ..registry import Card, register

_BIG = 2**40


@dataclass
class ReformerState:
    """Decoding state: the tokens some future query can still attend, in any round."""

    k: Tensor  # (B, H, m, d) normalised keys
    v: Tensor  # (B, H, m, dv)
    positions: Tensor  # (m,) long
    real: Tensor  # (B, m) bool: real (not padded) tokens
    buckets: Tensor  # (B, H, R, m) long
    ranks: Tensor  # (B, H, R, m) long: rank inside the bucket among real tokens
    counts: Tensor  # (B, H, R, n_buckets) long: real tokens per bucket so far
    length: int


def _self_keys(real: Tensor, first: int) -> Tensor:
    """(B, n) the key token of each real query for the self rule (the keys hold `first` earlier
    tokens before the queries), -1 for padding."""
    return torch.where(real, torch.arange(first, first + real.shape[-1], device=real.device), -1)


def _exclusive_rank(bucket: Tensor, real: Tensor, num_buckets: int) -> Tensor:
    """bucket (.., T) in [0, num_buckets), real (.., T) -> rank of each token among the earlier real
    tokens of its bucket (one-hot cumulative sum; T and num_buckets small in decoding only)."""
    onehot = F.one_hot(bucket, num_buckets) * real[..., None]  # (.., T, nbk)
    before = onehot.cumsum(-2) - onehot
    return before.gather(-1, bucket[..., None])[..., 0]


def _slots(bucket: Tensor, rank: Tensor, c: int, num_buckets: int):
    """The per-bucket chunked order (ALGORITHMS section 4) of tokens with (bucket, rank) (B, H, T).

    Each bucket occupies the chunks rank // c from its lowest to its highest present one, buckets one
    after another. Returns slot_of_token (B, H, T), slot_token (B, H, L), slot_used (B, H, L),
    token_chunk (B, H, T) and prev (B, H, nL) long: the previous chunk of the same bucket or NO_BLOCK."""
    B, H, T = bucket.shape
    dev = bucket.device
    chunk = rank // c
    lo = torch.full((B, H, num_buckets), _BIG, dtype=torch.long, device=dev).scatter_reduce(-1, bucket, chunk, "amin")
    hi = torch.full((B, H, num_buckets), -1, dtype=torch.long, device=dev).scatter_reduce(-1, bucket, chunk, "amax")
    width = (hi - lo + 1).clamp(min=0)  # chunks per bucket (0 if absent)
    offset = width.cumsum(-1) - width  # (B, H, nbk)
    token_chunk = offset.gather(-1, bucket) + chunk - lo.gather(-1, bucket)  # (B, H, T)
    slot_of_token = token_chunk * c + rank % c
    num_chunks = max(1, int(width.sum(-1).max()))
    L = num_chunks * c
    slot_token = torch.zeros(B, H, L, dtype=torch.long, device=dev).scatter_(
        -1, slot_of_token, torch.arange(T, device=dev).expand(B, H, T))
    slot_used = torch.zeros(B, H, L, dtype=torch.bool, device=dev).scatter_(-1, slot_of_token, True)
    chunk_bucket = torch.full((B, H, num_chunks), -1, dtype=torch.long, device=dev).scatter_(-1, token_chunk, bucket)
    same = torch.zeros_like(chunk_bucket, dtype=torch.bool)
    same[..., 1:] = (chunk_bucket[..., 1:] == chunk_bucket[..., :-1]) & (chunk_bucket[..., 1:] >= 0)
    ids = torch.arange(num_chunks, device=dev)
    prev = torch.where(same, ids - 1, torch.full_like(ids, NO_BLOCK))
    return slot_of_token, slot_token, slot_used, token_chunk, prev


@register(
    Card(
        name="reformer",
        title="Reformer",
        paper="Kitaev et al., Reformer: The Efficient Transformer, ICLR 2020 (arXiv 2001.04451)",
        year=2020,
        complexity="O(N log N)",
        classes=("LP",),
        causal=True,
        bidirectional=True,
        decoding="kv_cache",
        fixed_pattern=False,
        test_options={"bucket_size": 4, "n_hashes": 2, "n_buckets": 4, "max_seq_len": 256},
        notes=(
            "causal mode chunks each bucket separately (exactly causal, decoding equals the forward); "
            "hash rounds are merged by log-sum-exp with the paper's duplicate correction (a key held by "
            "several rounds counts once: later rounds exclude earlier rounds' pairs); decoding keeps per "
            "round and bucket the last two chunks' tokens"
        ),
    )
)
class ReformerAttention(AttentionLayer):
    def __init__(self, dim: int, heads: int, causal: bool = False, *, bucket_size: int = 64, n_hashes: int = 4,
                 n_buckets: int | None = None, max_seq_len: int = 4096) -> None:
        name = self.card.name
        opt.positive_int(name, "max_seq_len", max_seq_len)
        super().__init__(dim, heads, causal, max_seq_len=max_seq_len, projections="shared_qk")
        self.bucket_size = opt.positive_int(name, "bucket_size", bucket_size, what="tokens per chunk")
        self.n_hashes = opt.positive_int(name, "n_hashes", n_hashes, what="hash rounds")
        opt.optional_positive_int(name, "n_buckets", n_buckets, none_means="max_seq_len / bucket_size")
        if n_buckets is None:
            n_buckets = max(2, -(-max_seq_len // bucket_size))
            n_buckets += n_buckets % 2
        elif n_buckets != 1 and n_buckets % 2:
            raise ValueError(f"{name}: n_buckets must be 1 or even (buckets come in pairs +-xR), got {n_buckets}; "
                             f"allowed: 1 or an even int >= 2, e.g. {n_buckets + 1}")
        self.n_buckets = n_buckets
        self.draws = SeededDraws()
        rotations = torch.zeros(n_hashes, self.head_dim, max(1, n_buckets // 2))
        for r in range(n_hashes):  # drawn per round from the seed: never from N
            rotations[r] = torch.randn(self.head_dim, rotations.shape[-1], generator=self.draws.generator(r))
        self.register_buffer("rotations", rotations)  # (R, d, n_buckets / 2)

    # ------------------------------------------------------------------ hashing
    def hash(self, k: Tensor) -> Tensor:
        """k (B, H, T, d) -> buckets (B, H, R, T) long in [0, n_buckets): argmax([kR; -kR])."""
        B, H, T, _ = k.shape
        if self.n_buckets == 1:
            return torch.zeros(B, H, self.n_hashes, T, dtype=torch.long, device=k.device)
        rot = self.rotations.to(device=k.device, dtype=torch.float64 if k.dtype == torch.float64 else torch.float32)
        k = k.detach().to(rot.dtype)
        half = rot.shape[-1]
        buckets = torch.empty(B, H, self.n_hashes, T, dtype=torch.long, device=k.device)
        for r in range(self.n_hashes):  # one round at a time: (B, H, T, nb / 2) scores, not R of them
            x = torch.matmul(k, rot[r])  # (B, H, T, nb / 2)
            high, low = x.max(-1), x.min(-1)
            # argmax([x; -x]) without the concatenation: the first half wins ties, as argmax's first index
            buckets[:, :, r] = torch.where(high.values >= -low.values, high.indices, low.indices + half)
        return buckets

    # ------------------------------------------------------------------ attention
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: ReformerState | None):
        k = F.normalize(k, dim=-1)  # keys length-normalised (the paper's shared-QK)
        B, H, T, _ = q.shape
        real = torch.ones(B, T, dtype=torch.bool, device=q.device) if mask is None else mask
        if not self.causal:
            return self._bidirectional(q, k, v, real)[0], None
        buckets = self.hash(k)  # (B, H, R, T)
        if state is None:
            return self._causal_full(q, k, v, real, buckets)
        return self._causal_step(q, k, v, real, buckets, state)

    def _bidirectional(self, q, k, v, real):
        B, H, T, _ = q.shape
        c = self.bucket_size
        buckets = self.hash(k).masked_fill(~real[:, None, None, :], self.n_buckets)  # pads: the last bucket
        pos = torch.arange(T, device=q.device)
        ids = torch.arange(-(-T // c), device=q.device)
        blocks = torch.stack([torch.where(ids > 0, ids - 1, NO_BLOCK), ids], -1)[None]  # (1, nq, 2): previous, own
        passes, chunks = [], []  # chunks[r']: (B, H, T) the chunk of each token in round r'
        for r in range(self.n_hashes):
            order = torch.argsort(buckets[:, :, r] * T + pos, dim=-1)  # (B, H, T): (bucket, position) order
            # the self rule (token u == t) and the duplicate correction: drop the pairs of earlier rounds,
            # where key j was in query i's own or previous chunk (chunk_i - chunk_j in {0, 1})
            rules = [PairExclusion(order, order, 0, 0)]
            rules += [PairExclusion(ch.gather(-1, order), ch.gather(-1, order), -1, 0) for ch in chunks]
            key_mask = real[:, None, :].expand(B, H, T).gather(-1, order)  # (B, H, T) in sorted order
            passes.append(GatheredPass(BlockLayout(c, blocks, exclusions=tuple(rules)), order, key_mask=key_mask))
            chunks.append(torch.empty_like(order).scatter_(-1, order, pos.expand(B, H, T)) // c)
        return gathered_block_sparse_attention(q, k, v, passes, self_keys=_self_keys(real, 0))

    def _decoding_round(self, key_pos, key_real, bucket, rank, earlier_codes, query_tokens, query_pos):
        """The pass of one hash round for new queries at positions query_pos (n,), whose tokens are
        query_tokens (n,) indices into the keys (key_pos (T,), key_real (B, H, T), bucket/rank (B, H, T)),
        each query its own query block, over the per-bucket chunked order of the keys (`_slots`: after
        pruning, a bucket's ranks need not start at 0). earlier_codes: the codes of the earlier rounds
        (pairs already attended there are excluded); this round's code is appended: code = chunk + bucket,
        so that key j is in query i's own or previous chunk of the same bucket iff code_i - code_j in
        {0, 1} (buckets two codes apart). The whole-sequence form (`_causal_full`) attends the same key
        sets through `core.bucketing`."""
        c, nbk = self.bucket_size, self.n_buckets + 1
        slot_of_token, slot_token, slot_used, token_chunk, prev = _slots(bucket, rank, c, nbk)
        spos = key_pos[slot_token]  # (B, H, L)
        key_index = torch.where(slot_used, slot_token, -1)  # (B, H, L): -1 = an empty slot
        key_mask = key_real.gather(-1, slot_token)
        key_codes = [code.gather(-1, slot_token) for code in earlier_codes]  # (B, H, L) each
        n = query_tokens.shape[0]
        own = token_chunk[:, :, query_tokens]  # (B, H, n): each new query is its own query block
        blocks = torch.stack([prev.gather(-1, own), own], -1)  # (B, H, n, 2)
        qpos = (2 * query_pos).repeat_interleave(c)  # (n c,)
        query_slots = torch.full((n, c), -1, dtype=torch.long, device=bucket.device)
        query_slots[:, 0] = torch.arange(n, device=bucket.device)  # new query t in slot t c, the rest empty
        rules = tuple(PairExclusion(code[:, :, query_tokens].repeat_interleave(c, dim=-1), codes, -1, 0)
                      for code, codes in zip(earlier_codes, key_codes))
        layout = BlockLayout(c, blocks, query_positions=qpos, key_positions=2 * spos + 1, causal=True,
                             exclusions=rules)
        earlier_codes.append(token_chunk + bucket)
        return GatheredPass(layout, query_slots.view(1, 1, n * c), key_index, key_mask)

    def _causal_full(self, q, k, v, real, buckets):
        B, H, T, _ = q.shape
        nb = self.n_buckets
        pad = ~real[:, None, :].expand(B, H, T)
        pos = torch.arange(T, device=q.device)
        c = self.bucket_size
        code_stride = T // c + 3  # codes of different buckets' chunks at least 2 apart
        passes, ranks, codes = [], [], []  # codes[r'] (B, H, T): bucket and chunk of each token in round r'
        for r in range(self.n_hashes):
            bucket = buckets[:, :, r].masked_fill(pad, nb)  # padded tokens: in no bucket (no slot)
            rank = ranks_in_bucket(bucket, nb + 1)
            ranks.append(rank)
            # per-bucket chunks of c in blocks of b | c (core.bucketing), query blocks ordered by their used
            # key slots; strictly earlier keys (2 pos < 2 pos' + 1 never holds for the token itself: the self
            # rule); the pairs of earlier rounds excluded by their codes
            b, blocks, query_source, key_source = causal_chunk_pattern(bucket, nb, c)
            qt, kt = query_source.clamp(min=0), key_source.clamp(min=0)
            rules = tuple(PairExclusion(code.gather(-1, qt), code.gather(-1, kt), -1, 0) for code in codes)
            layout = BlockLayout(b, blocks, query_positions=2 * qt, key_positions=2 * kt + 1, causal=True,
                                 exclusions=rules)
            passes.append(GatheredPass(layout, query_source, key_source))
            codes.append(bucket * code_stride + rank // c)
        out, _ = gathered_block_sparse_attention(q, k, v, passes, self_keys=_self_keys(real, 0))
        counts = torch.zeros(B, H, self.n_hashes, nb + 1, dtype=torch.long, device=q.device)
        counts.scatter_add_(-1, buckets.masked_fill(pad[:, :, None], nb), (~pad)[:, :, None].long().expand_as(buckets))
        state = ReformerState(k, v, pos, real, buckets, torch.stack(ranks, 2), counts[..., :nb], T)
        return out, self._prune(state)

    def _causal_step(self, q, k, v, real, buckets, state: ReformerState):
        B, H, n, _ = q.shape
        nb, m = self.n_buckets, state.k.shape[-2]
        new_pos = torch.arange(state.length, state.length + n, device=q.device)
        new_real = real[:, None, None, :].expand(B, H, self.n_hashes, n)
        local = _exclusive_rank(buckets, new_real, nb)  # (B, H, R, n)
        new_ranks = state.counts.gather(-1, buckets) + local
        all_k, all_v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
        all_pos = torch.cat([state.positions, new_pos])
        all_real = torch.cat([state.real, real], 1)[:, None, :].expand(B, H, m + n)
        all_buckets, all_ranks = torch.cat([state.buckets, buckets], -1), torch.cat([state.ranks, new_ranks], -1)
        # a cached token takes part in round r only if a query to come can reach it in that round
        floor = ((state.counts // self.bucket_size - 1).clamp(min=0) * self.bucket_size)  # (B, H, R, nb)
        cached_live = state.ranks >= floor.gather(-1, state.buckets)  # (B, H, R, m)
        live = torch.cat([cached_live, torch.ones_like(buckets, dtype=torch.bool)], -1) & all_real[:, :, None]
        query_tokens = torch.arange(m, m + n, device=q.device)
        passes, codes = [], []
        for r in range(self.n_hashes):
            dead = ~live[:, :, r]
            bucket = all_buckets[:, :, r].masked_fill(dead, nb)  # others: the unattended bucket
            rank = torch.where(dead, dead.long().cumsum(-1) - 1, all_ranks[:, :, r])
            passes.append(self._decoding_round(all_pos, ~dead, bucket, rank, codes, query_tokens, new_pos))
        out, _ = gathered_block_sparse_attention(q, all_k, all_v, passes, self_keys=_self_keys(real, m))
        counts = state.counts + (F.one_hot(buckets, nb) * new_real[..., None]).sum(-2)
        new_state = ReformerState(all_k, all_v, all_pos, torch.cat([state.real, real], 1), all_buckets, all_ranks,
                                  counts, state.length + n)
        return out, self._prune(new_state)

    def _prune(self, state: ReformerState) -> ReformerState:
        """Keep the tokens that a future query can still attend in some round (item, head): those of
        the last two chunks of their bucket. Bounded by n_hashes * n_buckets * 2 * bucket_size per
        (item, head)."""
        floor = (state.counts // self.bucket_size - 1).clamp(min=0) * self.bucket_size  # (B, H, R, nb)
        needed = state.ranks >= floor.gather(-1, state.buckets)  # (B, H, R, m)
        keep = (needed.any(2) & state.real[:, None, :]).flatten(0, 1).any(0)  # (m,)
        if bool(keep.all()):
            return state
        idx = keep.nonzero().squeeze(-1)
        return ReformerState(state.k[:, :, idx], state.v[:, :, idx], state.positions[idx], state.real[:, idx],
                             state.buckets[..., idx], state.ranks[..., idx], state.counts, state.length)
