"""Block-sparse core: a group's slot chunks skip the slots no query block of the group uses.

Skipping is exact (an unused slot only adds -inf scores), so the results must equal the float64
dense reference, and the plan must really leave those slots out (otherwise the test could not fail
on a plan that still computes them)."""

import torch

from efficient_transformers.core.block_sparse import NO_BLOCK, BlockLayout, _plan, block_sparse_attention
from test_block_sparse import assert_matches_reference, qkv  # the float64 dense reference of the core tests


def _layout_with_unused_slots(nq: int, per_head: bool) -> torch.Tensor:
    """(1, H?, nq, 3) key blocks: slot 0 (the previous block) used only by the first third of the query
    blocks, slot 1 (own block) by all, slot 2 (block 0) by every other block of the last third."""
    ids = torch.arange(nq)
    first = torch.where((ids > 0) & (ids < nq // 3), ids - 1, NO_BLOCK)
    last = torch.where((ids >= 2 * nq // 3) & (ids % 2 == 0), torch.zeros_like(ids), NO_BLOCK)
    blocks = torch.stack([first, ids, last], -1)[None, None]  # (1, 1, nq, 3)
    if per_head:  # head 1: its slot 0 used by one more block, so the groups' unions differ from head 0's
        other = blocks.clone()
        other[0, 0, nq // 3, 0] = nq // 3 - 1
        blocks = torch.cat([blocks, other], 1)  # (1, 2, nq, 3)
    return blocks


def test_plan_skips_slots_unused_by_a_whole_group_and_keeps_one_chunk_per_group():
    b, n = 4, 48
    layout = BlockLayout(b, _layout_with_unused_slots(n // b, per_head=False))
    q, k, v = qkv(1, 2, n, n, 8, seed=3)
    # one block pair per group and slot chunk: groups of one query block, chunks of one slot
    plan = _plan(q, k, layout, None, score_budget=2 * b * b)
    blocks = layout.key_blocks[0, 0]
    assert len(plan.groups) == n // b
    for (g0, g1), chunks in zip(plan.groups, plan.slot_chunks):
        used = [s for s in range(3) if bool((blocks[g0:g1, s] >= 0).any())]
        assert [s0 for s0, _ in chunks] == used and all(s1 == s0 + 1 for s0, s1 in chunks)
    # a chunk of all three slots is trimmed to its first and last used slot
    wide = _plan(q, k, layout, None, score_budget=2 * 3 * b * b)
    assert wide.slot_chunks[-1] == [(1, 2)] and wide.slot_chunks[0] == [(1, 2)] and wide.slot_chunks[2] == [(0, 2)]


def test_a_group_whose_slots_are_all_unused_keeps_a_chunk_and_gives_zeros():
    b, n = 4, 16
    blocks = torch.full((1, 1, n // b, 2), NO_BLOCK)
    blocks[0, 0, 0, 1] = 0  # only query block 0 attends anything
    layout = BlockLayout(b, blocks)
    q, k, v = qkv(1, 1, n, n, 4, seed=4)
    plan = _plan(q, k, layout, None, score_budget=b * b)
    assert all(len(chunks) == 1 for chunks in plan.slot_chunks)
    out, lse = assert_matches_reference(q, k, v, layout, score_budget=b * b)
    assert torch.equal(out[..., b:, :], torch.zeros_like(out[..., b:, :]))
    assert bool((lse[..., b:] == float("-inf")).all())


def test_skipped_slots_match_the_dense_reference_in_values_and_gradients():
    b, n = 4, 60
    for per_head in (False, True):
        layout = BlockLayout(b, _layout_with_unused_slots(n // b, per_head))
        q, k, v = qkv(2, 2, n, n, 8, seed=5)
        key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(6)) > 0.25
        for budget in (b * b, 2 * b * b, 3 * 3 * b * b, 2**20):  # groups and chunks of several sizes
            assert_matches_reference(q, k, v, layout, key_mask, score_budget=budget)
        causal = BlockLayout(b, layout.key_blocks, causal=True)
        assert_matches_reference(q, k, v, causal, key_mask, score_budget=2 * b * b)


def test_skipping_groups_agree_with_one_group_that_computes_every_slot():
    """One group of all query blocks uses every slot (nothing is skipped); groups of one block skip
    slots. Both must give the same values (to rounding: the online softmax sees other chunks)."""
    b, n = 4, 48
    blocks = _layout_with_unused_slots(n // b, per_head=False)
    q, k, v = qkv(1, 2, n, n, 8, seed=7)
    out, lse = block_sparse_attention(q, k, v, BlockLayout(b, blocks), score_budget=2**20)
    small, small_lse = block_sparse_attention(q, k, v, BlockLayout(b, blocks), score_budget=3 * b * b)
    torch.testing.assert_close(small, out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(small_lse, lse, atol=1e-12, rtol=1e-12)
