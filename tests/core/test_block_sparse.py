"""Block-sparse attention core: random layouts against dense softmax attention on `layout.dense_mask`,
outputs, log-sum-exps and gradients in float64; merging by lse; reduced precision; what is kept."""

import math

import pytest
import torch

from efficient_transformers.core import reference_attention
from efficient_transformers.core.block_sparse import (
    NO_BLOCK,
    BlockLayout,
    block_sparse_attention,
    concat_slots,
    global_blocks,
    merge_by_lse,
    window_blocks,
)

F64 = torch.float64


def dense_reference(q, k, v, allowed, scale=None):
    """Softmax over the allowed keys, written out: allowed broadcasts to (B, H, Nq, Nk).
    Returns (out, lse) with out = 0 and lse = -inf on rows with no allowed key."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)  # (B, H, Nq, Nk)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Nq)
    weights = torch.exp(scores - lse.masked_fill(lse == -math.inf, 0.0)[..., None])
    return weights @ v, lse


def allowed_pairs(layout, num_queries, num_keys, key_mask):
    """layout.dense_mask combined with the key mask, as (B|1, H|1, Nq, Nk)."""
    allowed = layout.dense_mask(num_queries, num_keys)
    allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    if key_mask is not None:
        km = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, :, None, :]
        allowed = allowed & km
    return allowed


def qkv(batch, heads, nq, nk, d, *, dv=None, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, d, generator=g, dtype=dtype)
    k = torch.randn(batch, heads, nk, d, generator=g, dtype=dtype)
    v = torch.randn(batch, heads, nk, dv or d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def outputs_and_grads(out, lse, inputs, seed=5):
    """out, lse and the gradients of <out, g> + <lse, h> (h on rows with keys) w.r.t. inputs."""
    g = torch.Generator().manual_seed(seed)
    upstream_out = torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)  # the same draws in any dtype
    upstream_lse = torch.randn(lse.shape, generator=g, dtype=F64).to(lse.dtype)
    finite_lse = lse.masked_fill(lse == -math.inf, 0.0)
    loss = (out * upstream_out).sum() + (finite_lse * upstream_lse).sum()
    return [out, lse, *torch.autograd.grad(loss, inputs)]


def assert_matches_reference(q, k, v, layout, key_mask=None, scale=None, **options):
    out, lse = block_sparse_attention(q, k, v, layout, key_mask, scale, **options)
    ref_out, ref_lse = dense_reference(q, k, v, allowed_pairs(layout, q.shape[-2], k.shape[-2], key_mask), scale)
    assert out.dtype == q.dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert torch.equal(lse == -math.inf, ref_lse == -math.inf), "rows without keys differ"
    got, expected = outputs_and_grads(out, lse, (q, k, v)), outputs_and_grads(ref_out, ref_lse, (q, k, v))
    for name, a, e in zip(("out", "lse", "grad q", "grad k", "grad v"), got, expected):
        assert torch.isfinite(a).all() or name == "lse", name
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=name)
    return out, lse


# ----------------------------------------------------------------------------- random layouts
def random_case(seed):
    """A random problem: shapes, layout (shared, per head or per item; unused, repeated and
    out-of-range slots), causality, band, permuted or repeated positions, key mask, budget."""
    g = torch.Generator().manual_seed(seed)

    def draw(low, high):  # inclusive
        return int(torch.randint(low, high + 1, (), generator=g))

    B, H, b = draw(1, 2), draw(1, 3), draw(1, 6)
    nq_tokens = draw(1, 40)
    nk_tokens = nq_tokens if draw(0, 2) else draw(1, 40)
    nq, nk, S = -(-nq_tokens // b), -(-nk_tokens // b), draw(1, 6)
    lead = [(1, 1), (1, H), (B, H), (B, 1)][draw(0, 3)]
    if draw(0, 3) == 0:  # a band of blocks (the strided-view path when groups are interior)
        offsets = torch.arange(S) - draw(0, S - 1)
        blocks = (torch.arange(nq)[:, None] + offsets).expand(*lead, nq, S).clone()
        blocks[torch.rand(blocks.shape, generator=g) < 0.15] = NO_BLOCK
    else:
        blocks = torch.randint(-1, nk + 2, (*lead, nq, S), generator=g)  # -1 and ids >= nk: unused
    if lead[0] == 1 and draw(0, 1):
        blocks = blocks[0]  # the 3-D form (H|1, nq, S)
    causal, band = bool(draw(0, 1)), None
    if draw(0, 1):
        band = (draw(0, 12), draw(0, 12))

    def positions(n):
        kind = draw(0, 3)
        if kind == 0 or not (causal or band):
            return None
        shape = [(n,), (H, n), (B, H, n)][draw(0, 2)]
        if kind == 1:  # a permutation of 0..n-1 (per head / item)
            return torch.argsort(torch.rand(shape, generator=g), dim=-1)
        return torch.randint(-5, 30, shape, generator=g)  # arbitrary, with repeats and negatives

    layout = BlockLayout(b, blocks, positions(nq_tokens), positions(nk_tokens), causal=causal, band=band)
    key_mask = None
    if draw(0, 2):
        shape = (B, nk_tokens) if draw(0, 1) else (B, H, nk_tokens)
        key_mask = torch.rand(shape, generator=g) > 0.3
        key_mask[0, ..., :] = key_mask[0, ..., :] & bool(draw(0, 3))  # sometimes no real key at all
    budget = [1, 7, 60, 10**6][draw(0, 3)]  # 1: one slot per chunk (online softmax), one block per group
    d = draw(1, 5)
    dv = d if draw(0, 1) else draw(1, 5)
    return (B, H, nq_tokens, nk_tokens, d, dv), layout, key_mask, budget


@pytest.mark.parametrize("seed", range(60))
def test_random_layouts_match_dense_reference(seed):
    (B, H, nq, nk, d, dv), layout, key_mask, budget = random_case(seed)
    q, k, v = qkv(B, H, nq, nk, d, dv=dv, seed=seed)
    scale = None if seed % 3 else 0.37
    assert_matches_reference(q, k, v, layout, key_mask, scale, score_budget=budget)


def test_random_cases_cover_every_feature():
    cases = [random_case(seed) for seed in range(60)]
    layouts = [layout for _, layout, _, _ in cases]
    assert any(layout.causal for layout in layouts) and any(not layout.causal for layout in layouts)
    assert any(layout.band is not None for layout in layouts)
    assert any(layout.key_blocks.dim() == 4 and layout.key_blocks.shape[0] > 1 for layout in layouts)
    assert any(layout.key_blocks.dim() == 3 and layout.key_blocks.shape[0] > 1 for layout in layouts)
    assert any(layout.query_positions is not None and layout.query_positions.dim() == 3 for layout in layouts)
    assert any((layout.key_blocks == NO_BLOCK).any() for layout in layouts)
    assert any(shape[2] != shape[3] for shape, *_ in cases)
    assert any(shape[2] % layout.block_size for (shape, layout, _, _) in cases)
    assert any(mask is not None and mask.dim() == 3 for _, _, mask, _ in cases)
    assert any(budget == 1 for *_, budget in cases)


# ----------------------------------------------------------------------------- named patterns
def test_band_layout_is_the_token_band_and_matches_the_project_reference():
    n, b = 37, 5
    layout = BlockLayout.banded(b, n, left=7, right=4)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(layout.dense_mask(n), (j - i >= -7) & (j - i <= 4))
    causal = BlockLayout.banded(b, n, left=7, right=99, causal=True)
    assert causal.band == (7, 0) and causal.num_slots == 3
    assert torch.equal(causal.dense_mask(n), (j <= i) & (j >= i - 7))
    q, k, v = qkv(2, 2, n, n, 4, seed=1)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(0)) > 0.2
    out, _ = assert_matches_reference(q, k, v, causal, key_mask)
    expected = reference_attention(q, k, v, pattern=causal.dense_mask(n), key_mask=key_mask)
    torch.testing.assert_close(out, expected)


def test_strided_band_views_agree_with_gathered_blocks():
    """A band of blocks reads keys through overlapping strided views on interior groups; the same
    layout with its slots in another order is gathered. Both are the same attention."""
    n, b = 64, 4
    band = BlockLayout.banded(b, n, left=9, right=6)
    shuffled = BlockLayout(b, band.key_blocks.flip(-1), band=band.band)
    q, k, v = qkv(1, 2, n, n, 3, seed=2)
    from efficient_transformers.core.block_sparse import _plan

    assert any(_plan(q, k, band, None, 64).shifted) and not any(_plan(q, k, shuffled, None, 64).shifted)
    a = outputs_and_grads(*block_sparse_attention(q, k, v, band, score_budget=64), (q, k, v))
    e = outputs_and_grads(*block_sparse_attention(q, k, v, shuffled, score_budget=64), (q, k, v))
    for x, y in zip(a, e):
        torch.testing.assert_close(x, y)
    assert_matches_reference(q, k, v, band, score_budget=64)


def test_permuted_tokens_keep_causality_and_band_on_their_original_positions():
    """Sparse Transformer's strided view: tokens in column-major order of an (r, c) grid; the layout
    is a window in the permuted order, causality and band are on the original positions."""
    r, c, b = 6, 7, 3
    n = r * c
    order = torch.arange(n).view(r, c).t().reshape(-1)  # permuted row p holds original token order[p]
    layout = BlockLayout(b, window_blocks(-(-n // b), 2, 2), query_positions=order, key_positions=order,
                         causal=True, band=(2 * c, 0))
    mask = layout.dense_mask(n)
    i, j = order[:, None], order[None, :]
    assert not (mask & (j > i)).any() and not (mask & (i - j > 2 * c)).any()
    assert (mask & (j < i)).any()
    q, k, v = qkv(1, 2, n, n, 4, seed=3)
    out, _ = assert_matches_reference(q, k, v, layout)
    # the same attention in the original order: un-permute and compare with the original-order mask
    inverse = torch.argsort(order)
    original_mask = mask[inverse][:, inverse]
    expected, _ = dense_reference(q[:, :, inverse], k[:, :, inverse], v[:, :, inverse], original_mask)
    torch.testing.assert_close(out[:, :, inverse], expected)


def test_global_blocks_and_extra_summary_keys():
    """Queries and keys of different lengths: a window over the sequence's own blocks plus summary
    keys appended after it (ETC / BigBird style), shared by all query blocks."""
    n, extra, b = 22, 5, 4
    nq, nk = -(-n // b), -(-(n + extra) // b)
    blocks = concat_slots(window_blocks(nq, 1, 0), global_blocks(nq, [0, nk - 2, nk - 1]))
    layout = BlockLayout(b, blocks)
    assert layout.key_blocks.shape == (1, nq, 5)
    assert (layout.key_blocks[0, 0] == NO_BLOCK).sum() == 2  # block -1 and the repeated block 0
    q, k, v = qkv(2, 3, n, n + extra, 4, seed=4)
    key_mask = torch.ones(2, n + extra, dtype=torch.bool)
    key_mask[1, -extra:] = False
    assert_matches_reference(q, k, v, layout, key_mask)


def test_per_item_layouts_and_positions():
    """(B, H, nq, S) layouts (Sinkhorn's sorted blocks) and (B, H, N) positions (Reformer's sort)."""
    B, H, n, b = 2, 2, 18, 3
    nq = n // b
    g = torch.Generator().manual_seed(6)
    sorted_blocks = torch.stack([torch.randperm(nq, generator=g) for _ in range(B * H)]).view(B, H, nq, 1)
    blocks = torch.cat([torch.arange(nq).view(1, 1, nq, 1).expand(B, H, nq, 1), sorted_blocks], dim=-1)
    positions = torch.stack([torch.randperm(n, generator=g) for _ in range(B * H)]).view(B, H, n)
    layout = BlockLayout(b, blocks, positions, positions, causal=True)
    assert layout.dense_mask(n).shape == (B, H, n, n)
    key_mask = torch.rand(B, H, n, generator=g) > 0.2
    q, k, v = qkv(B, H, n, n, 4, seed=7)
    assert_matches_reference(q, k, v, layout, key_mask)


def test_rows_without_keys_give_zeros_and_minus_inf_and_zero_gradients():
    n, b = 12, 4
    layout = BlockLayout.from_lists(b, [[0], [], [2, 0]], causal=True)  # block 1 attends nothing
    key_mask = torch.ones(1, n, dtype=torch.bool)
    key_mask[0, 0] = False  # query 0 sees only key 0 (causal): padding
    q, k, v = qkv(1, 1, n, n, 3, seed=8)
    out, lse = block_sparse_attention(q, k, v, layout, key_mask)
    empty = torch.zeros(n, dtype=torch.bool)
    empty[0], empty[4:8] = True, True
    assert torch.equal(lse[0, 0] == -math.inf, empty)
    assert torch.equal(out[0, 0, empty], torch.zeros(int(empty.sum()), 3, dtype=F64))
    grads = torch.autograd.grad(out.sum() + lse.masked_fill(lse == -math.inf, 0).sum(), (q, k, v))
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert torch.equal(grads[0][0, 0, empty], torch.zeros(int(empty.sum()), 3, dtype=F64))
    assert torch.equal(grads[2][0, 0, 0], torch.zeros(3, dtype=F64)), "a padded key gets no gradient"


def test_a_layout_sized_for_a_longer_sequence_serves_a_shorter_one():
    layout = BlockLayout.banded(4, 64, left=5, right=5)
    q, k, v = qkv(1, 2, 23, 23, 3, seed=9)
    assert_matches_reference(q, k, v, layout)
    assert layout.dense_mask(23).shape == (23, 23)


# ----------------------------------------------------------------------------- merging partial results
def test_merge_by_lse_equals_one_softmax_over_the_union():
    B, H, n = 2, 2, 15
    q, k, v = qkv(B, H, n, n, 4, seed=10)
    g = torch.Generator().manual_seed(11)
    union = torch.rand(B, H, n, n, generator=g) > 0.4
    union[0, 0, 3] = False  # a row empty in both parts
    part_a = union & (torch.rand(B, H, n, n, generator=g) > 0.5)
    part_b = union & ~part_a
    part_a[1, 1, 4] = union[1, 1, 4]  # a row whose keys are all in one part
    part_b[1, 1, 4] = False
    out_a, lse_a = dense_reference(q, k, v, part_a)
    out_b, lse_b = dense_reference(q, k, v, part_b)
    out, lse = merge_by_lse(out_a, lse_a, out_b, lse_b)
    expected_out, expected_lse = dense_reference(q, k, v, part_a | part_b)
    got, expected = outputs_and_grads(out, lse, (q, k, v)), outputs_and_grads(expected_out, expected_lse, (q, k, v))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    assert torch.equal(out[0, 0, 3], torch.zeros(4, dtype=F64)) and lse[0, 0, 3] == -math.inf


def test_merge_of_a_window_and_global_keys_through_the_block_sparse_core():
    """Longformer's split: the band through the block-sparse core, global keys densely, merged."""
    n, b = 30, 4
    q, k, v = qkv(1, 2, n, n, 4, seed=12)
    band = BlockLayout.banded(b, n, left=3, right=3)
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[[0, 17]] = True
    out_a, lse_a = block_sparse_attention(q, k, v, band, key_mask=~is_global[None].expand(1, n))
    out_b, lse_b = dense_reference(q, k, v, is_global[None, None, None, :])
    out, lse = merge_by_lse(out_a, lse_a, out_b, lse_b)
    expected_out, expected_lse = dense_reference(q, k, v, band.dense_mask(n) | is_global[None, :])
    for a, e in zip(outputs_and_grads(out, lse, (q, k, v)), outputs_and_grads(expected_out, expected_lse, (q, k, v))):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------- precision and layout
def test_bfloat16_is_finite_and_close_to_float32():
    n, b = 50, 8
    layout = BlockLayout.banded(b, n, left=10, right=10)
    q, k, v = qkv(2, 2, n, n, 16, seed=13, dtype=torch.float32)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.2
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out, lse = block_sparse_attention(*low, layout, key_mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out32, lse32 = block_sparse_attention(*[t.detach().float().requires_grad_() for t in low], layout, key_mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), out32, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, lse32, atol=1e-3, rtol=1e-3)
    grads = torch.autograd.grad(out.float().square().sum(), low)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_float64_stays_float64_and_outputs_are_stored_heads_last():
    q, k, v = qkv(2, 3, 20, 20, 4, seed=14)
    out, lse = block_sparse_attention(q, k, v, BlockLayout.banded(4, 20, 4, 4))
    assert out.dtype == F64 and lse.dtype == F64
    assert out.transpose(1, 2).is_contiguous(), "(B, N, H, d) memory: the head merge is a view"
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert grads[0].transpose(1, 2).is_contiguous(), "dQ heads-last"
    # dK, dV in their inputs' layout: heads-first contiguous keys are the kernel's key table itself, whose
    # gradient is returned as it is (no N-sized copy); heads-last keys (projection views) get heads-last
    assert all(grad.is_contiguous() for grad in grads[1:])
    last = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out_last, _ = block_sparse_attention(*last, BlockLayout.banded(4, 20, 4, 4))
    grads_last = torch.autograd.grad(out_last.sum(), last)
    assert all(grad.transpose(1, 2).is_contiguous() for grad in grads_last)
    for got, expected in zip(grads_last, grads):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- memory structure


def test_backward_keeps_only_q_k_v_out_and_lse_and_no_tensor_grows_with_n_squared(largest_tensor):
    B, H, n, d, b = 1, 2, 4096, 8, 32
    q, k, v = qkv(B, H, n, n, d, seed=15, dtype=torch.float32)
    layout = BlockLayout.banded(b, n, left=48, right=48)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with largest_tensor() as forward_mode:
            out, lse = block_sparse_attention(q, k, v, layout, score_budget=2**16)
    saved_bytes = sum(t.numel() * t.element_size() for t in packed)
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, out, lse))
    assert len(packed) == 5 and saved_bytes <= io_bytes, "autograd keeps q, k, v, out, lse only"
    plan = out.grad_fn.plan  # the layout's integers, kept on the context
    plan_bytes = sum(t.untyped_storage().nbytes() for t in vars(plan).values() if isinstance(t, torch.Tensor))
    assert plan_bytes <= 8 * 4 * n * H, "the layout's indices are O(N)"
    with largest_tensor() as backward_mode:
        torch.autograd.grad((out.sum(), lse.sum()), (q, k, v))
    largest = max(forward_mode.largest, backward_mode.largest)
    assert largest <= max(2**16 * d // b, B * H * n * d) * 2, f"a {largest}-element tensor for N = {n}"
    assert largest < n * n / 64


# ----------------------------------------------------------------------------- the layout's own rules
def test_layout_helpers_and_repeats():
    assert window_blocks(3, 1, 1).tolist() == [[[-1, 0, 1], [0, 1, 2], [1, 2, 3]]]
    assert global_blocks(2, [0, 5]).tolist() == [[[0, 5], [0, 5]]]
    per_head = concat_slots(window_blocks(2, 0, 0), torch.tensor([[[1], [0]], [[0], [1]]]))
    assert per_head.tolist() == [[[0, 1], [1, 0]], [[0, 0], [1, 1]]]
    layout = BlockLayout(2, per_head)
    assert layout.key_blocks.tolist() == [[[0, 1], [1, 0]], [[0, -1], [1, -1]]], "repeats dropped on construction"
    lists = BlockLayout.from_lists(2, [[[0], [1, 0]], [[1], []]])
    assert lists.key_blocks.tolist() == [[[0, -1], [1, 0]], [[1, -1], [-1, -1]]]
    assert lists.dense_mask(4).shape == (2, 4, 4)
    assert BlockLayout.from_lists(2, [[0], [0, 1]]).key_blocks.shape == (1, 2, 2)


def test_bad_layouts_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout(0, window_blocks(2, 1, 1))
    with pytest.raises(ValueError, match="key_blocks"):
        BlockLayout(2, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="band"):
        BlockLayout(2, window_blocks(2, 1, 1), band=(-1, 2))
    q, k, v = qkv(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="query-block rows"):
        block_sparse_attention(q, k, v, BlockLayout(2, window_blocks(3, 1, 1)))
    with pytest.raises(ValueError, match="heads"):
        block_sparse_attention(q, k, v, BlockLayout(2, window_blocks(4, 1, 1).expand(3, 4, 3)))
    with pytest.raises(ValueError, match="positions"):
        block_sparse_attention(q, k, v, BlockLayout(2, window_blocks(4, 1, 1), torch.arange(7), causal=True))
    with pytest.raises(ValueError, match="positions must lie"):
        block_sparse_attention(q, k, v, BlockLayout(2, window_blocks(4, 1, 1), torch.arange(8) * 2**25, causal=True))
    with pytest.raises(ValueError, match="key_mask"):
        block_sparse_attention(q, k, v, BlockLayout(2, window_blocks(4, 1, 1)), torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k.float(), v, BlockLayout(2, window_blocks(4, 1, 1)))


# ----------------------------------------------------------------------------- relative-position biases
@pytest.mark.parametrize("case", ["band", "shifted_band", "positions", "block_constant", "shared_table"])
def test_relative_bias_equals_dense_attention_with_the_clipped_label_biases(case):
    """s_ij + table[h, clamp(pos_k - pos_q, -c, c) + c] against the dense reference: the band's shared
    tile, per-item positions (labels per pair), positions constant within blocks (one label per block
    row / column), a table shared by the heads; outputs, lse and the gradients of q, k, v and the table."""
    B, H, n, d, b, c = 2, 3, 29, 5, 4, 3
    nk = 23 if case == "block_constant" else n
    q, k, v = qkv(B, H, n, nk, d, seed=21)
    g = torch.Generator().manual_seed(22)
    table = torch.randn(1 if case == "shared_table" else H, 2 * c + 1, generator=g, dtype=F64).requires_grad_()
    key_mask = torch.rand(B, nk, generator=g) > 0.2
    if case in ("band", "shared_table"):
        layout = BlockLayout.banded(b, n, 6, 5)
    elif case == "shifted_band":  # queries attend keys two blocks ahead: a band of blocks with offset 2
        layout = BlockLayout(b, window_blocks(-(-n // b), 0, 1) + 2)
    elif case == "positions":
        qp, kp = torch.randint(-9, 9, (B, 1, n), generator=g), torch.randint(-9, 9, (B, 1, nk), generator=g)
        layout = BlockLayout(b, global_blocks(-(-n // b), [0, 2, 5, 7]), query_positions=qp, key_positions=kp,
                             band=(5, 4))
    else:  # segment ids, constant over each query block and each key block
        qp = (torch.arange(n) // (2 * b))[None, None]
        kp = (torch.arange(nk) // b)[None, None]
        layout = BlockLayout(b, global_blocks(-(-n // b), range(-(-nk // b))), query_positions=qp, key_positions=kp)
    qpos = torch.arange(n) if layout.query_positions is None else layout.query_positions
    kpos = torch.arange(nk) if layout.key_positions is None else layout.key_positions
    labels = (kpos[..., None, :] - qpos[..., :, None]).clamp(-c, c) + c  # (B?, 1?, Nq, Nk)
    labels = labels.reshape((1,) * (4 - labels.dim()) + tuple(labels.shape)).expand(B, H, n, nk)
    heads = torch.arange(H).view(1, H, 1, 1) if table.shape[0] > 1 else torch.zeros(1, 1, 1, 1, dtype=torch.long)
    bias = table[heads.expand(B, H, n, nk), labels]  # (B, H, Nq, Nk)
    allowed = allowed_pairs(layout, n, nk, key_mask)
    scale = 1 / math.sqrt(d)
    scores = (q @ k.transpose(-1, -2) * scale + bias).masked_fill(~allowed, -math.inf)
    ref_lse = torch.logsumexp(scores, dim=-1)
    ref_out = torch.exp(scores - ref_lse.masked_fill(ref_lse == -math.inf, 0.0)[..., None]) @ v
    out, lse = block_sparse_attention(q, k, v, layout, key_mask, relative_bias=table)
    inputs = [q, k, v, table]
    for got, expected in zip(outputs_and_grads(out, lse, inputs), outputs_and_grads(ref_out, ref_lse, inputs)):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_relative_bias_paths_and_bad_tables():
    """The band's labels are one tile, block-constant positions one label per block; bad tables are refused."""
    from efficient_transformers.core.block_sparse import _plan

    q, k, v = qkv(1, 2, 16, 16, 4, seed=23)
    band = _plan(q, k, BlockLayout.banded(4, 16, 3, 3), None, 2**20, bias_clip=2).bias
    assert band.tile is not None and band.tile.shape == (4, 3 * 4)
    segments = (torch.arange(16) // 8)[None, None]
    constant = _plan(q, k, BlockLayout(4, global_blocks(4, range(4)), query_positions=segments), None, 2**20,
                     bias_clip=1).bias
    assert constant.tile is None and constant.query_positions.shape[-3:] == (1, 1, 1)
    for bad in (torch.zeros(2, 4, dtype=F64), torch.zeros(3, 5, dtype=F64), torch.zeros(2, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match="relative_bias must be a floating tensor"):
            block_sparse_attention(q, k, v, BlockLayout.banded(4, 16, 3, 3), relative_bias=bad)


# ----------------------------------------------------------------------------- float32 on either backend
@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_float32_products_on_either_backend_match_the_float64_reference(backend, monkeypatch):
    """The engine's batched products run on `core.gemm.batched_matmul`: oneDNN where it is preferred and
    the native kernels are built (strided band views, gathered blocks, transposed operands), PyTorch's
    otherwise. Random layouts in float32, against the dense float64 reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from efficient_transformers import native
    from efficient_transformers.core import gemm

    class OpNames(TorchDispatchMode):
        names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("EFT_MATMUL", backend)
    seen = OpNames()
    for seed in range(24):
        (B, H, nq, nk, d, dv), layout, key_mask, budget = random_case(seed)
        q, k, v = qkv(B, H, nq, nk, d, dv=dv, seed=seed)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        with seen:
            got = outputs_and_grads(*block_sparse_attention(q32, k32, v32, layout, key_mask, score_budget=budget),
                                    (q32, k32, v32))
        expected = outputs_and_grads(*dense_reference(q, k, v, allowed_pairs(layout, nq, nk, key_mask)), (q, k, v))
        for name, a, e in zip(("out", "lse", "grad q", "grad k", "grad v"), got, expected):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4, msg=f"seed {seed}: {name}")
    on_onednn = "efficient_transformers.onednn_matmul_out.default" in seen.names
    assert on_onednn == (backend == "onednn" and gemm.onednn_usable(torch.float32) and native.available())
