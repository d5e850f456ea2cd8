"""Exactly causal bucketing (ALGORITHMS.md section 4), shared by the mechanisms that route tokens to
buckets and attend within them (Reformer's hash buckets, Routing's clusters).

Tokens are ordered by (bucket, position); each bucket is cut *separately* into chunks of c tokens by
rank (the number of earlier tokens of the same bucket), and a token attends the earlier tokens of its
own and the previous chunk of its bucket. The keys a query sees then depend on tokens up to it only:
cutting fixed chunks of the globally sorted order instead would let a future token's bucket move the
chunk boundaries of past tokens.

Computation (`causal_chunk_pattern`): each bucket is padded to whole blocks of b tokens, b a divisor
of c (the pattern does not depend on b), and query block beta of a bucket attends the bucket's blocks
from the first block of the previous chunk up to itself: at most 2 c / b key slots, so padding costs
about (number of buckets) b / 2 slots instead of (number of buckets) c / 2 with blocks of c. A
caller applies the causal rule on the original positions of the slots (`source`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .block_sparse import NO_BLOCK


def ranks_in_bucket(bucket: Tensor, num_buckets: int) -> Tensor:
    """(B, H, N) bucket ids in [0, num_buckets) -> the rank of each token among the earlier tokens of
    its bucket."""
    n = bucket.shape[-1]
    order = torch.argsort(bucket * n + torch.arange(n, device=bucket.device), dim=-1)  # by (bucket, position)
    counts = torch.zeros(*bucket.shape[:-1], num_buckets, dtype=torch.long, device=bucket.device)
    counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    start = counts.cumsum(-1) - counts  # (B, H, nbuckets): first sorted index of each bucket
    sorted_bucket = bucket.gather(-1, order)
    rank_sorted = torch.arange(n, device=bucket.device) - start.gather(-1, sorted_bucket)
    return torch.empty_like(bucket).scatter_(-1, order, rank_sorted)


def bucket_slots(bucket: Tensor, num_buckets: int, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order tokens by (bucket, position), each bucket padded to whole blocks of `block` slots.

    bucket: (B, H, N) long in [0, num_buckets]; bucket == num_buckets means "in no bucket".
    Returns slot_of (B, H, N) (the token's slot; >= L for tokens in no bucket), source (B, H, L) (the
    token in each slot, -1 for an empty one) and block_bucket (B, H, nb) (the bucket of each block of
    slots, num_buckets past an item's last one), L = nb block = the most slots any (item, head) needs.
    """
    B, H, n = bucket.shape
    counts = torch.zeros(B, H, num_buckets + 1, dtype=torch.long, device=bucket.device)
    counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    blocks = -(-counts // block)  # (B, H, nbuckets + 1): the no-bucket group last
    ends = blocks.cumsum(-1)  # (B, H, nbuckets + 1), in blocks
    nb = max(1, int(ends[..., num_buckets - 1].max()))
    rank = ranks_in_bucket(bucket, num_buckets + 1)
    slot_of = (ends - blocks).gather(-1, bucket) * block + rank  # (B, H, N)
    L = nb * block
    slot_of = torch.where(bucket < num_buckets, slot_of, L)
    source = torch.full((B, H, L + 1), -1, dtype=torch.long, device=bucket.device)
    source.scatter_(-1, slot_of, torch.arange(n, device=bucket.device).expand(B, H, n).contiguous())
    source = source[..., :L]
    block_bucket = torch.searchsorted(ends[..., :num_buckets].contiguous(),
                                      torch.arange(nb, device=bucket.device).expand(B, H, nb).contiguous(), right=True)
    return slot_of, source, block_bucket


def chunk_block_size(c: int, n: int, num_buckets: int) -> int:
    """The block size of the causal bucket attention: a divisor of the chunk c near half the mean bucket
    size n / num_buckets, within [16, 64] when c allows: small enough that padding every bucket to whole
    blocks wastes little, large enough that the block-sparse primitive's gathered keys (S b d per block
    of b queries) stay near the scores' size."""
    target = max(16, min(64, n // (2 * num_buckets)))
    return max(b for b in range(1, min(c, target) + 1) if c % b == 0)


def first_blocks(bucket: Tensor, num_buckets: int, block: int) -> tuple[Tensor, Tensor]:
    """(B, H, nbuckets) each: the first block of each bucket in `bucket_slots`'s order, and its number
    of blocks."""
    counts = torch.zeros(*bucket.shape[:-1], num_buckets + 1, dtype=torch.long, device=bucket.device)
    counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    blocks = -(-counts[..., :num_buckets] // block)
    return blocks.cumsum(-1) - blocks, blocks


def causal_chunk_pattern(bucket: Tensor, num_buckets: int, chunk: int, block: int | None = None
                         ) -> tuple[int, Tensor, Tensor, Tensor]:
    """The per-bucket chunked pattern of tokens with buckets (B, H, N) in [0, num_buckets] (num_buckets:
    in no bucket: no slot, never attended).

    `block`: b, a divisor of chunk (None: `chunk_block_size`). Small blocks pad less but run the
    block products at a lower rate (CPU batched products of 16-row blocks reach a fraction of the rate
    of 64-row ones); the ordering of the query blocks below is what makes small blocks pay (without
    it, Reformer's causal 16K step was 1.8 -> 2.3 s slower with b = 32 than with b = c = 64; with it,
    1.8 -> 1.7 s, and 4K 0.8 -> 0.5 s, Routing's 4K 0.35 -> 0.2 s).

    Returns (b, blocks, query_source, key_source): the block size, the key blocks of each query block
    (B, H, nb, S), S <= 2 chunk / b, NO_BLOCK for none, and the token of each query and key slot (B, H,
    nb b), -1 for an empty slot. The key slots are the bucket order; the query slots are the same
    blocks reordered by how many key blocks they attend (fewest first, stable), so that the block
    kernel's groups of consecutive query blocks hold blocks with the same used slots and skip the
    slots none of them uses (a bucket's first chunk attends at most m + 1 of the 2 m slots). With the
    causal rule on the slots' positions (the caller's), query slot t attends the earlier tokens of
    its bucket whose rank r_j satisfies floor(r_j / c) >= floor(r_t / c) - 1.
    """
    n = bucket.shape[-1]
    b = chunk_block_size(chunk, n, num_buckets) if block is None else block
    if chunk % b:
        raise ValueError(f"causal bucket pattern: block {b} must divide the chunk {chunk}; allowed: a divisor "
                         f"of {chunk} or None")
    m = chunk // b  # blocks per chunk
    _, source, block_bucket = bucket_slots(bucket, num_buckets, b)
    nb = block_bucket.shape[-1]
    ids = torch.arange(nb, device=bucket.device)  # (nb,)
    first, sizes = first_blocks(bucket, num_buckets, b)  # (B, H, K) each
    first = first.gather(-1, block_bucket.clamp(max=num_buckets - 1))  # (B, H, nb): the block's bucket's first block
    beta = ids - first  # the block's rank-block inside its bucket
    lowest = ((beta // m - 1) * m).clamp(min=0)  # the first rank-block of the previous chunk
    width = max(1, min(2 * m, int(sizes.max())))  # slots: no block attends more than its bucket holds
    ranks = lowest[..., None] + torch.arange(width, device=bucket.device)  # (B, H, nb, S): rank-blocks attended
    valid = (ranks <= beta[..., None]) & (block_bucket[..., None] < num_buckets)
    blocks = torch.where(valid, first[..., None] + ranks, NO_BLOCK)  # (B, H, nb, S)
    B, H = blocks.shape[:2]
    order = torch.sort(valid.sum(-1), dim=-1, stable=True).indices  # (B, H, nb): new query block -> old
    blocks = blocks.gather(2, order[..., None].expand_as(blocks))
    query_source = source.view(B, H, nb, b).gather(2, order[..., None].expand(B, H, nb, b)).view(B, H, nb * b)
    return b, blocks, query_source, source
