"""Sparse Transformer: the paper's patterns pair by pair against `dense_mask`, exactness against the
dense reference on that mask (outputs and gradients, padding, N not a multiple of any block), the
settings where it becomes dense attention, decoding against the full forward with bounded reads,
no N x N tensor, and bad options."""

import itertools
import math

import pytest
import torch

import efficient_transformers as et
import efficient_transformers.attention.sparse_transformer as st
from efficient_transformers.core import reference_attention

F64 = torch.float64
NAME = "sparse_transformer"


def build(heads=2, causal=False, d=4, **options):
    torch.manual_seed(0)
    return et.build_attention(NAME, d * heads, heads, causal, **options).double()


def options_of(pattern, combine, stride, summary=None, distinct=False):
    kw = dict(pattern=pattern, combine=combine, stride=stride)
    if pattern == "fixed":
        kw.update(summary=summary, distinct_summaries=distinct)
    return kw


def paper_pattern(pattern, combine, causal, n, heads, l, c=None, distinct=False):
    """(H, N, N) from the paper's definitions, one pair at a time (not from the layer's code).

    strided: A1(i) = the previous l positions (i - l < j <= i), A2(i) = {j : (i - j) mod l = 0};
    fixed:   A1(i) = {j : floor(j / l) = floor(i / l)}, A2(i) = {j : j mod l in {l - c, ..., l - 1}}
             (distinct: the s-th summary head uses {l - c (t + 1), ..., l - c t - 1}, t = s mod floor(l / c));
    causal: j <= i; bidirectional: the same relations in both directions (|i - j| < l for strided A1).
    split: heads 0 .. ceil(H / 2) - 1 attend A1, the others A2; union: every head A1 or A2."""
    first_heads = -(-heads // 2) if combine == "split" else heads

    def a1(i, j):
        if pattern == "strided":
            return abs(i - j) < l
        return j // l == i // l

    def a2(i, j, s):
        if pattern == "strided":
            return (i - j) % l == 0
        t = s % (l // c) if distinct else 0
        return l - c * (t + 1) <= j % l <= l - c * t - 1

    out = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                if causal and j > i:
                    continue
                if combine == "union":
                    out[h, i, j] = a1(i, j) or a2(i, j, h)
                elif h < first_heads:
                    out[h, i, j] = a1(i, j)
                else:
                    out[h, i, j] = a2(i, j, h - first_heads)
    return out


def as_heads(mask, heads):
    return mask if mask.dim() == 3 else mask[None].expand(heads, -1, -1)


def padding_mask(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1, n // 2:] = False  # a right-padded item
    return mask


PATTERNS, COMBINES = ("strided", "fixed"), ("split", "union")
# (pattern, combine, causal, distinct) and sizes (n, heads, l, c): N not a multiple of l, N < l, l = 1, c = l
COMBOS = [(p, m, c, dist) for p, m, c, dist in itertools.product(PATTERNS, COMBINES, (False, True), (False, True))
          if not (p == "strided" and dist)]
COMBO_IDS = [f"{p}-{m}-{'causal' if c else 'bidir'}{'-distinct' if d else ''}" for p, m, c, d in COMBOS]
SIZES = [(37, 2, 4, 2), (23, 3, 5, 1), (41, 4, 8, 3), (6, 2, 16, 4), (19, 4, 1, 1), (29, 4, 6, 6)]


@pytest.mark.parametrize("pattern,combine,causal,distinct", COMBOS, ids=COMBO_IDS)
def test_dense_mask_is_the_papers_pattern(pattern, combine, causal, distinct):
    for n, heads, l, c in SIZES:
        layer = build(heads, causal, **options_of(pattern, combine, l, c, distinct))
        expected = paper_pattern(pattern, combine, causal, n, heads, l, c, distinct)
        mask = layer.dense_mask(n)
        assert mask.dtype == torch.bool and mask.shape in ((n, n), (heads, n, n))
        assert torch.equal(as_heads(mask, heads), expected), (n, heads, l, c)
        per_head = combine == "split" or (distinct and l // c > 1 and heads > 1)
        assert mask.dim() == (3 if per_head else 2), "(N, N) when every head attends the same pattern"


def test_the_papers_own_strided_formula_and_lras_fixed_patterns():
    """The paper's A1 = {max(0, i - l), ..., i} is one key longer than "the previous l"; its extra key
    i - l is on the stride, so the union (one head, causal) is the same set. LRA's Fixed1Pattern(l) |
    Fixed2Pattern(l, c) & causal is the fixed union."""
    n, l, c = 45, 6, 2
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    paper = ((j >= (i - l).clamp(min=0)) & (j <= i)) | ((j <= i) & ((i - j) % l == 0))
    assert torch.equal(build(1, True, combine="union", stride=l).dense_mask(n), paper)
    lra = ((i // l == j // l) | (j % l >= l - c)) & (j <= i)
    assert torch.equal(build(1, True, pattern="fixed", combine="union", stride=l, summary=c).dense_mask(n), lra)


@pytest.mark.parametrize("pattern,combine,causal,distinct", COMBOS, ids=COMBO_IDS)
def test_attend_equals_dense_attention_on_the_pattern_with_gradients(pattern, combine, causal, distinct):
    for n, heads, l, c in SIZES[:4]:
        layer = build(heads, causal, **options_of(pattern, combine, l, c, distinct))
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(3, heads, n, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
        mask = padding_mask(3, n, seed=n)
        out, _ = layer.attend(q, k, v, mask)
        ref = reference_attention(q, k, v, pattern=paper_pattern(pattern, combine, causal, n, heads, l, c, distinct),
                                  key_mask=mask)
        real = mask[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)
        w = torch.randn(out.shape, generator=g, dtype=F64) * real  # gradients through real rows only
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
        expected = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for name, a, e in zip("qkv", got, expected):
            torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11, msg=f"grad {name}, n={n}")


def formula_pattern(pattern, combine, causal, n, heads, l, c):
    """The paper's formulas (shared summary cells) vectorised, for lengths too long for the pair loop."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    a1 = (i - j).abs() < l if pattern == "strided" else i // l == j // l
    a2 = (i - j) % l == 0 if pattern == "strided" else (j % l >= l - c).expand(n, n)
    if causal:
        a1, a2 = a1 & (j <= i), a2 & (j <= i)
    if combine == "union":
        return (a1 | a2)[None].expand(heads, -1, -1)
    first = -(-heads // 2)
    return torch.stack([a1] * first + [a2] * (heads - first))


def test_formula_pattern_is_the_pair_by_pair_one():
    for pattern, combine, causal in itertools.product(("strided", "fixed"), ("split", "union"), (False, True)):
        assert torch.equal(formula_pattern(pattern, combine, causal, 30, 3, 7, 3),
                           paper_pattern(pattern, combine, causal, 30, 3, 7, 3))


def test_default_options_at_a_length_that_fills_several_blocks():
    """Default l = 128, c = 32 at N = 700 (several band, column, own-block and summary blocks, a ragged
    end) against the reference, bidirectional and causal, both patterns, split and union."""
    n = 700
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=F64) for _ in range(3))
    mask = padding_mask(2, n, seed=4)
    for pattern, combine, causal in itertools.product(("strided", "fixed"), ("split", "union"), (False, True)):
        layer = build(4, causal, d=8, pattern=pattern, combine=combine)
        expected = formula_pattern(pattern, combine, causal, n, 4, 128, 32)
        assert torch.equal(as_heads(layer.dense_mask(n), 4), expected)
        out, _ = layer.attend(q, k, v, mask)
        ref = reference_attention(q, k, v, pattern=expected, key_mask=mask)
        real = mask[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_small_internal_blocks_several_per_column_and_not_aligned_with_the_l_blocks(causal, monkeypatch):
    """The layouts' block sizes are free choices: columns cut into several blocks (COLUMN_BLOCK = 2),
    own-block layout blocks that straddle l-blocks (3 vs l = 5), band and summary blocks of 3 and 4."""
    for constant, value in (("COLUMN_BLOCK", 2), ("OWN_BLOCK", 3), ("LOCAL_BLOCK", 3), ("SUMMARY_BLOCK", 4)):
        monkeypatch.setattr(st, constant, value)
    n, heads, l, c = 38, 4, 5, 2
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, heads, n, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    mask = padding_mask(2, n, seed=12)
    for pattern, combine in itertools.product(("strided", "fixed"), ("split", "union")):
        layer = build(heads, causal, **options_of(pattern, combine, l, c, pattern == "fixed"))
        expected = paper_pattern(pattern, combine, causal, n, heads, l, c, pattern == "fixed")
        assert torch.equal(as_heads(layer.dense_mask(n), heads), expected)
        out, _ = layer.attend(q, k, v, mask)
        ref = reference_attention(q, k, v, pattern=expected, key_mask=mask)
        real = mask[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)
        w = torch.randn(out.shape, generator=g, dtype=F64) * real
        got, expected = torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_settings_where_the_pattern_is_dense_attention(causal):
    """union with l >= N (the local factor holds everything), strided union with l = 1 (every key is on
    the stride), fixed union with l >= N (one block) or c = l (every cell is a summary cell)."""
    n = 21
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g, dtype=F64) for _ in range(3))
    mask = padding_mask(2, n, seed=6)
    dense = reference_attention(q, k, v, key_mask=mask, causal=causal)
    real = mask[:, None, :, None].expand_as(dense)
    for options in (dict(stride=n), dict(stride=1), dict(pattern="fixed", stride=32, summary=4),
                    dict(pattern="fixed", stride=5, summary=5)):
        layer = build(2, causal, combine="union", **options)
        out, _ = layer.attend(q, k, v, mask)
        torch.testing.assert_close(out[real], dense[real], atol=1e-12, rtol=1e-12, msg=str(options))


def run_decoding(layer, x, mask, prefill, on_step=None):
    y, state = layer(x[:, :prefill], mask[:, :prefill], return_state=True)
    outs = [y]
    for t in range(prefill, x.shape[1]):
        y, state = layer(x[:, t:t + 1], mask[:, t:t + 1], state=state, return_state=True)
        outs.append(y)
        if on_step is not None:
            on_step(t + 1, state)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("pattern,combine,distinct", [(p, m, d) for p, m, c, d in COMBOS if c],
                         ids=[i.replace("-causal", "") for (p, m, c, d), i in zip(COMBOS, COMBO_IDS) if c])
def test_decoding_equals_the_full_forward_with_padding(pattern, combine, distinct):
    layer = build(4, True, **options_of(pattern, combine, 5, 2, distinct))
    n = 33
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(7), dtype=F64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 3], mask[1, 17:20] = False, False
    full = layer(x, mask)
    stepped, _ = run_decoding(layer, x, mask, 6)
    torch.testing.assert_close(stepped[mask], full[mask], atol=1e-12, rtol=1e-12)
    _, state = layer(x[:, :4], mask[:, :4], return_state=True)  # a multi-token step after a prefill
    y, _ = layer(x[:, 4:27], mask[:, 4:27], state=state, return_state=True)
    torch.testing.assert_close(y[mask[:, 4:27]], full[:, 4:27][mask[:, 4:27]], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("combine", ["split", "union"])
def test_fixed_decoding_keeps_only_the_own_block_and_the_summary_cells(combine):
    l, c, n = 8, 2, 150
    layer = build(2, True, pattern="fixed", combine=combine, stride=l, summary=c)
    x = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(8), dtype=F64)
    sizes = {}

    def on_step(length, state):
        positions = state.positions.tolist()
        own = [p for p in range(length) if p // l == length // l]
        summary = [p for p in range(length) if p % l >= l - c]
        assert positions == sorted(set(own) | set(summary)), length
        sizes[length] = len(positions)

    run_decoding(layer, x, torch.ones(1, n, dtype=torch.bool), 1, on_step)
    assert all(size <= l + c * math.ceil(length / l) for length, size in sizes.items())
    assert max(sizes.values()) <= l + c * math.ceil(n / l)


def test_strided_decoding_reads_only_the_last_l_keys_and_the_stride(monkeypatch):
    """Every key stays reachable (key j is on the stride of the queries j + l, j + 2 l, ...), so the
    strided cache is all N keys; a step reads l + ceil(N / l) of them at most."""
    for t0, n in itertools.product([0, 1, 5, 16, 17, 1000, 4095], [1, 3]):
        keys = st._strided_step_keys(t0, n, 16, None).tolist()
        expected = [j for j in range(t0 + n) if any(0 <= i - j < 16 or (i - j) % 16 == 0 for i in range(t0, t0 + n))]
        assert sorted(keys) == expected and len(set(keys)) == len(keys)
        if n == 1:
            assert len(keys) <= 16 + math.ceil(t0 / 16)
    read = []
    plain = st.dense_attention
    monkeypatch.setattr(st, "dense_attention", lambda q, k, v, **kw: read.append(k.shape[-2]) or plain(q, k, v, **kw))
    l, n = 8, 300
    layer = build(2, True, stride=l)
    x = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    _, state = run_decoding(layer, x, torch.ones(1, n, dtype=torch.bool), 2)
    assert state.k.shape[-2] == n
    assert len(read) == n - 2 and all(m <= l + math.ceil(t / l) for t, m in zip(range(2, n), read))
    assert read[-1] == l + (n - 1 - l) // l + 1




@pytest.mark.parametrize("pattern,combine,causal", list(itertools.product(PATTERNS, COMBINES, (False, True))))
def test_no_tensor_grows_with_n_squared(pattern, combine, causal, largest_tensor):
    n = 4096
    options = dict(summary=4) if pattern == "fixed" else {}
    layer = et.build_attention(NAME, 16, 2, causal, pattern=pattern, combine=combine, stride=64, **options)
    x = torch.randn(1, n, 16, requires_grad=True)
    with largest_tensor() as mode:
        layer(x).sum().backward()
    assert mode.largest <= n * n // 8, f"a tensor of {mode.largest} elements for N = {n}"


@pytest.mark.parametrize("options,words", [
    (dict(pattern="dilated"), ["pattern", "'dilated'", "strided"]),
    (dict(combine="interleave"), ["combine", "'interleave'", "union"]),
    (dict(stride=0), ["stride", "0", ">= 1"]),
    (dict(stride=True), ["stride", "True"]),
    (dict(pattern="fixed", summary=0), ["summary", "0", ">= 1"]),
    (dict(pattern="fixed", stride=16, summary=17), ["summary=17", "stride=16", "c <= stride"]),
    (dict(summary=8), ["summary=8", "pattern='fixed'"]),
    (dict(distinct_summaries=True), ["distinct_summaries", "pattern='fixed'"]),
    (dict(pattern="fixed", distinct_summaries=1), ["distinct_summaries", "bool"]),
])
def test_bad_options_raise_value_errors_naming_the_value_and_what_is_allowed(options, words):
    with pytest.raises(ValueError) as info:
        et.build_attention(NAME, 16, 2, False, **options)
    message = str(info.value)
    assert message.startswith(f"{NAME}:") and "allowed" in message
    for word in words:
        assert word in message, message


def test_split_needs_two_heads_and_an_odd_count_gives_factor_1_the_extra_head():
    message = r"sparse_transformer: combine='split'.*heads=1.*allowed: heads >= 2, or combine='union'"
    with pytest.raises(ValueError, match=message):
        et.build_attention(NAME, 16, 1)
    et.build_attention(NAME, 16, 1, combine="union")
    mask = build(3, stride=4).dense_mask(9)
    assert torch.equal(mask[0], mask[1]) and not torch.equal(mask[1], mask[2])
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    assert torch.equal(mask[1], (i - j).abs() < 4) and torch.equal(mask[2], (i - j) % 4 == 0)


def test_card():
    card = et.card(NAME)
    assert card.options == {"pattern": "strided", "combine": "split", "stride": 128, "summary": 32,
                            "distinct_summaries": False}
    assert card.complexity == "O(N sqrt N)" and card.classes == ("FP",) and card.causal and card.bidirectional
    assert card.fixed_pattern and card.decoding == "kv_cache" and "1904.10509" in card.paper
