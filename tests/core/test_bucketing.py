"""core.bucketing: the exactly causal per-bucket chunk pattern against the rank rule, pair by pair."""

from __future__ import annotations

import pytest
import torch

from efficient_transformers.core.bucketing import causal_chunk_pattern, ranks_in_bucket


@pytest.mark.parametrize("chunk,block", [(4, None), (8, 4), (8, 2), (32, None)])
def test_pattern_pairs_are_the_rank_rule_and_query_blocks_are_ordered(chunk, block):
    g = torch.Generator().manual_seed(chunk)
    B, H, n, K = 2, 2, 70, 3
    bucket = torch.randint(0, K + 1, (B, H, n), generator=g)  # K: in no bucket
    b, blocks, query_source, key_source = causal_chunk_pattern(bucket, K, chunk, block)
    assert chunk % b == 0
    rank = ranks_in_bucket(bucket, K + 1)
    for i in range(B):
        for h in range(H):
            got = set()
            for qb in range(blocks.shape[2]):
                for kb in blocks[i, h, qb].tolist():
                    if kb < 0:
                        continue
                    for t in query_source[i, h, qb * b:(qb + 1) * b].tolist():
                        for u in key_source[i, h, kb * b:(kb + 1) * b].tolist():
                            if t >= 0 and u >= 0 and u <= t:  # the caller's causal rule
                                got.add((t, u))
            want = {(t, u) for t in range(n) for u in range(t + 1)
                    if bucket[i, h, t] < K and bucket[i, h, u] == bucket[i, h, t]
                    and rank[i, h, u] // chunk >= rank[i, h, t] // chunk - 1}
            assert got == want
            used = (blocks[i, h] >= 0).sum(-1)
            assert torch.all(used[1:] >= used[:-1])  # fewest used key slots first
    with pytest.raises(ValueError, match="allowed: a divisor of 8"):
        causal_chunk_pattern(bucket, K, 8, block=3)
