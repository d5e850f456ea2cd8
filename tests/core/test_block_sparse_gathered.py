"""Gathered block-sparse passes and pair exclusions against a dense float64 reference (values, gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from efficient_transformers.core.block_sparse import (
    NO_BLOCK, BlockLayout, GatheredPass, PairExclusion, block_sparse_attention, gathered_block_sparse_attention,
)

B, H, D = 2, 3, 5


def inputs(n_q, n_k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, n_k, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, n_k, D + 1, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def dense_passes(q, k, v, passes):
    """sum over passes and slots of the slot's allowed keys, weights counted per (pass, slot, key)."""
    n_q, n_k = q.shape[2], k.shape[2]
    weight = torch.zeros(B, H, n_q, n_k, dtype=q.dtype)
    for p in passes:
        qi = p.query_index.expand(B, H, -1)
        ki = (p.query_index if p.key_index is None else p.key_index).expand(B, H, -1)
        allowed = p.layout.dense_mask(qi.shape[-1], ki.shape[-1]).expand(B, H, qi.shape[-1], ki.shape[-1])
        km = ki >= 0
        if p.key_mask is not None:
            km = km & (p.key_mask[:, None] if p.key_mask.dim() == 2 else p.key_mask)
        allowed = allowed & km[:, :, None, :] & (qi >= 0)[..., None]
        for b in range(B):
            for h in range(H):
                for t, u in allowed[b, h].nonzero().tolist():
                    weight[b, h, qi[b, h, t], ki[b, h, u]] += 1
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    unnormalised = weight * torch.exp(s - s.detach().amax(-1, keepdim=True))  # (B, H, Nq, Nk)
    total = unnormalised.sum(-1, keepdim=True)
    has = total > 0
    p = unnormalised / torch.where(has, total, torch.ones_like(total))
    lse = torch.where(has, torch.log(torch.where(has, total, torch.ones_like(total))) + s.detach().amax(-1, keepdim=True),
                      torch.full_like(total, float("-inf")))[..., 0]
    return p @ v, lse


def check(q, k, v, passes):
    out, lse = gathered_block_sparse_attention(q, k, v, passes)
    ref, ref_lse = dense_passes(q, k, v, passes)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    g = torch.Generator().manual_seed(9)
    w_out, w_lse = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=out.dtype)
    finite = lse > float("-inf")
    grads = torch.autograd.grad((out * w_out).sum() + (lse[finite] * w_lse[finite]).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w_out).sum() + (ref_lse[finite] * w_lse[finite]).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("budget", [None, 64])
def test_permuted_passes_with_positions_and_exclusions(budget):
    n, b = 13, 3
    q, k, v = inputs(n, n)
    g = torch.Generator().manual_seed(1)
    passes = []
    for r in range(3):
        order = torch.stack([torch.randperm(n, generator=g) for _ in range(B * H)]).view(B, H, n)
        nq = -(-n // b)
        ids = torch.arange(nq)
        blocks = torch.stack([torch.where(ids > 0, ids - 1, NO_BLOCK), ids], -1)[None]  # previous and own block
        codes = torch.randint(0, 4, (B, H, n), generator=g)
        layout = BlockLayout(b, blocks, query_positions=order, key_positions=order, causal=True,
                             exclusions=(PairExclusion(codes, codes, -1, 0), PairExclusion(order, order, 0, 0)))
        key_mask = torch.rand(B, n, generator=g) > 0.2
        passes.append(GatheredPass(layout, order, key_mask=key_mask))
    if budget is None:
        check(q, k, v, passes)
    else:  # several groups and slot chunks
        out, _ = gathered_block_sparse_attention(q, k, v, passes, score_budget=budget)
        torch.testing.assert_close(out, dense_passes(q, k, v, passes)[0], atol=1e-10, rtol=1e-10)


def test_multiset_queries_empty_slots_and_separate_key_slots():
    n_q, n_k, b = 7, 9, 2
    q, k, v = inputs(n_q, n_k, seed=3)
    g = torch.Generator().manual_seed(4)
    query_index = torch.randint(-1, n_q, (1, H, 10), generator=g)  # repeats, empty slots, tokens in no slot
    key_index = torch.randint(-1, n_k, (B, 1, 8), generator=g)
    layout = BlockLayout.from_lists(b, [[0, 1], [1], [2, 3], [], [0, 3]])
    check(q, k, v, [GatheredPass(layout, query_index, key_index),
                    GatheredPass(BlockLayout(b, torch.tensor([[[0]]]).expand(1, 5, 1)), query_index, key_index)])


def test_identity_pass_equals_block_sparse_attention_and_heads_last_inputs():
    n, b = 11, 4
    fused = torch.randn(B, n, 3, H, D, dtype=torch.float64)
    q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))  # heads-last views of one buffer
    layout = BlockLayout.banded(b, n, 3, 2)
    identity = torch.arange(n)[None, None]
    out, lse = gathered_block_sparse_attention(q, k, v, [GatheredPass(layout, identity)])
    ref, ref_lse = block_sparse_attention(q, k, v, layout)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_exclusions_in_block_sparse_attention_and_dense_mask():
    n, b = 10, 3
    q, k, v = inputs(n, n, seed=5)
    codes = torch.arange(n) // 2
    layout = BlockLayout(b, torch.arange(4).expand(1, 4, 4).clone(), exclusions=(PairExclusion(codes, codes, 0, 0),))
    allowed = layout.dense_mask(n, n)
    assert torch.equal(allowed, codes[None, :] != codes[:, None])
    out, _ = block_sparse_attention(q, k, v, layout)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, atol=1e-12, rtol=1e-12)


def test_bad_index_raises():
    q, k, v = inputs(4, 4)
    layout = BlockLayout(2, torch.zeros(1, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="query_index"):
        gathered_block_sparse_attention(q, k, v, [GatheredPass(layout, torch.tensor([[[0, 1, 2, 4]]]))])
    with pytest.raises(ValueError, match="low <= high"):
        PairExclusion(torch.arange(3), torch.arange(3), 1, 0)


def test_self_keys_give_queries_without_keys_their_own_value():
    """The self rule: a query with no key in any pass outputs v[self_keys] (gradient to that v row
    only), its lse stays -inf; -1 (padding) keeps 0; queries with keys are unchanged."""
    n_q, n_k, b = 6, 8, 2
    q, k, v = inputs(n_q, n_k, seed=7)
    key_index = torch.tensor([[[0, 1, 2, 3]]])  # keys 4..7 in no slot
    query_index = torch.tensor([[[0, 1, 2, -1]]])  # queries 3..5 in no slot: they have no key
    passes = [GatheredPass(BlockLayout(b, torch.tensor([[[0], [1]]])), query_index, key_index)]
    self_keys = torch.tensor([[2, 3, 4, 5, -1, 7], [6, 7, 0, -1, 1, 2]])  # (B, Nq)
    out, lse = gathered_block_sparse_attention(q, k, v, passes, self_keys=self_keys)
    ref, ref_lse = dense_passes(q, k, v, passes)
    alone = (ref_lse == float("-inf")) & (self_keys >= 0)[:, None]  # (B, H, Nq)
    own = v.gather(2, self_keys.clamp(min=0)[:, None, :, None].expand(B, H, n_q, v.shape[-1]))
    ref = torch.where(alone[..., None], own, ref)
    assert bool(alone.any()) and bool((~alone & (ref_lse == float("-inf"))).any())  # both kinds present
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="self_keys"):
        gathered_block_sparse_attention(q, k, v, passes, self_keys=torch.full((B, n_q), n_k))
