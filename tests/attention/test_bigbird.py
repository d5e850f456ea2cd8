"""Big Bird: the pattern built from the paper's definition, exactness against dense attention on it
(padding, N not a multiple of the block, every option combination), dense when random blocks cover
everything, random blocks independent of N and saved with the weights, extra global tokens, the
decoding cache, no N x N tensor, bad options."""

import pytest
import torch
from safetensors.torch import load_model, save_model

import efficient_transformers as et
from efficient_transformers.core import reference_attention

DIM, HEADS, D = 16, 2, 8
F64 = torch.float64

from per_head_inputs import padding, qkv  # noqa: E402  (tests/attention/per_head_inputs.py)


def build(causal=False, seed=0, **options):
    torch.manual_seed(seed)
    options = {"block_size": 4, "max_seq_len": 96, **options}
    return et.build_attention("bigbird", DIM, HEADS, causal, **options).double()






def paper_random_blocks(layer, h, i, nb):
    """R(h, i) from the definition: the first r entries of the seeded permutation of the M key blocks
    that are not global, not in the window, and exist (bidirectional) or lie in the past before the
    window (causal)."""
    g, w, r = layer.global_blocks, layer.window_blocks // 2, layer.num_random_blocks
    chosen = []
    for J in layer.draws.randperm(layer.max_blocks, h, i).tolist():
        if len(chosen) == r:
            break
        ok = J >= g and (J < i - w if layer.causal else (J < nb and abs(J - i) > w))
        if ok:
            chosen.append(J)
    return chosen


def paper_pattern(layer, n):
    """(H, N, N) bool, element by element from the paper's blockified definition (see the module doc)."""
    b, g, w = layer.block_size, layer.global_blocks, layer.window_blocks // 2
    nb = -(-n // b)
    pattern = torch.zeros(HEADS, n, n, dtype=torch.bool)
    for h in range(HEADS):
        random = [set(paper_random_blocks(layer, h, I, nb)) if layer.num_random_blocks else set() for I in range(nb)]
        for i in range(n):
            I = i // b
            for j in range(n):
                J = j // b
                if layer.causal:
                    ok = j <= i and (J < g or I - w <= J <= I or J in random[I])
                else:
                    ok = I < g or J < g or abs(I - J) <= w or J in random[I]
                pattern[h, i, j] = ok
    return pattern


def as_heads(mask):
    return mask.expand(HEADS, -1, -1) if mask.dim() == 2 else mask


OPTION_SETS = [
    {},
    {"window_blocks": 1, "global_blocks": 1, "num_random_blocks": 2},
    {"window_blocks": 5, "global_blocks": 0, "num_random_blocks": 1},
    {"global_blocks": 3, "num_random_blocks": 0},
    {"block_size": 3, "global_blocks": 1, "num_random_blocks": 4},
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_dense_mask_is_the_papers_pattern_element_by_element(causal, options):
    layer = build(causal, **options)
    for n in (1, 9, 37, 53):
        assert torch.equal(as_heads(layer.dense_mask(n)), paper_pattern(layer, n)), n


def test_default_pattern_has_the_papers_counts():
    """At the defaults (b = 64, 3 window blocks, 2 global, 3 random), every ordinary query block
    attends 3 + 2 + 3 = 8 blocks, the global ones attend all, and all attend the global blocks."""
    torch.manual_seed(0)
    layer = et.build_attention("bigbird", 32, 2, max_seq_len=2048)
    n, b = 1024, 64
    blocks = layer.dense_mask(n)[:, ::b, ::b]  # (H, nb, nb): one entry per block pair
    nb = n // b
    assert blocks[:, :2].all() and blocks[:, :, :2].all()
    interior = blocks[:, 3:nb - 1].sum(-1)  # rows whose window does not touch the global blocks or the end
    assert torch.equal(interior, torch.full_like(interior, 8))
    assert not torch.equal(blocks[0], blocks[1]), "random blocks are drawn per head"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_attend_equals_dense_attention_on_the_pattern_with_padding_and_gradients(causal, options):
    layer = build(causal, **options)
    for n in (6, 41):
        q, k, v = qkv(3, n)
        mask = padding(3, n)
        out, _ = layer.attend(q, k, v, mask)
        ref = reference_attention(q, k, v, pattern=layer.dense_mask(n), key_mask=mask)
        real = mask[:, None, :, None].expand_as(out)
        torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)
        w = torch.randn(out.shape, dtype=F64) * real
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
        want = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("global_blocks", [0, 2])
def test_enough_random_blocks_give_dense_attention(causal, global_blocks):
    n = 45  # 12 blocks of 4, the last one partial
    layer = build(causal, global_blocks=global_blocks, num_random_blocks=12, window_blocks=1)
    every = torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(as_heads(layer.dense_mask(n)), as_heads(every.tril() if causal else every))
    q, k, v = qkv(2, n)
    mask = padding(2, n)
    out, _ = layer.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, key_mask=mask, causal=causal)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


def test_random_blocks_do_not_depend_on_n():
    """Bidirectional: a query block's random blocks at a shorter length are the same wherever the ones
    drawn at the longer length exist in both; causal: the layout rows are equal at every length."""
    layer = build(max_seq_len=400, num_random_blocks=3)
    short, long = layer._random_table(30), layer._random_table(100)  # (H, nb, r)
    same = 0
    for h in range(HEADS):
        for i in range(layer.global_blocks, 30):
            if (long[h, i] < 30).all():
                assert torch.equal(short[h, i], long[h, i])
                same += 1
    assert same > 0
    causal = build(True, max_seq_len=400)
    rows_short = causal._layouts(37)[0].key_blocks  # (H, nb, S)
    rows_long = causal._layouts(397)[0].key_blocks
    assert torch.equal(rows_short, rows_long[:, : rows_short.shape[1]])
    # and the pattern of the first tokens does not change when the sequence grows
    assert torch.equal(causal.dense_mask(37), causal.dense_mask(120)[:, :37, :37])


def test_random_blocks_are_reproducible_from_the_seed_and_saved_with_safetensors(tmp_path):
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    assert torch.equal(a.dense_mask(60), b.dense_mask(60))
    assert not torch.equal(a.dense_mask(60), c.dense_mask(60))
    assert not torch.equal(c.dense_mask(60), c.dense_mask(60)[[1, 0]]), "heads draw different blocks"
    c.dense_mask(60)  # c's tables are cached: loading must not reuse them
    save_model(a, str(tmp_path / "bigbird.safetensors"))
    load_model(c, str(tmp_path / "bigbird.safetensors"))
    assert torch.equal(a.dense_mask(60), c.dense_mask(60))
    x = torch.randn(2, 60, DIM, dtype=F64)
    assert torch.equal(a(x), c(x))
    a.draws.redraw()  # an explicit redraw gives new blocks
    assert not torch.equal(a.dense_mask(60), c.dense_mask(60))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [6, 29])  # 6: only global query blocks (bidirectional)
def test_extra_global_tokens_are_keys_every_query_attends(causal, n):
    layer = build(causal, num_extra_global_tokens=3)
    q, k, v = qkv(3, n)
    mask = padding(3, n)
    out, _ = layer.attend(q, k, v, mask)
    # the naive form: prepend the g_e tokens' keys and values (the layer's own projections)
    dim = DIM
    kv = layer.extra_tokens @ layer.to_qkv.weight[dim:].T + layer.to_qkv.bias[dim:]  # (g_e, 2 dim)
    k_e, v_e = (t.reshape(3, HEADS, D).transpose(0, 1)[None].expand(3, -1, -1, -1) for t in kv.chunk(2, -1))
    pattern = torch.cat([torch.ones(HEADS, n, 3, dtype=torch.bool), as_heads(layer.dense_mask(n))], -1)
    key_mask = torch.cat([torch.ones(3, 3, dtype=torch.bool), mask], 1)
    ref = reference_attention(q, torch.cat([k_e, k], 2), torch.cat([v_e, v], 2), pattern=pattern, key_mask=key_mask)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)
    w = torch.randn(out.shape, dtype=F64) * real
    got = torch.autograd.grad((out * w).sum(), (q, k, layer.extra_tokens))
    want = torch.autograd.grad((ref * w).sum(), (q, k, layer.extra_tokens))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)
    # an all-padded item still attends the extra tokens: finite, non-zero
    empty = mask.clone()
    empty[1] = False
    out, _ = layer.attend(q, k, v, empty)
    assert torch.isfinite(out).all() and out[1].abs().sum() > 0


def test_extra_global_tokens_decode_like_the_full_forward(decode_in_steps):
    layer = build(True, num_extra_global_tokens=2)
    x = torch.randn(2, 27, DIM, dtype=F64)
    stepped, _ = decode_in_steps(layer, x, 5)
    torch.testing.assert_close(stepped, layer(x), atol=1e-10, rtol=1e-10)


def reachable_later(layer, length, horizon):
    """Brute force: the keys j < length some query p in [length, horizon) may attend."""
    pattern = as_heads(layer.dense_mask(horizon))  # (H, T, T)
    return set(torch.nonzero(pattern[:, length:, :length].any(0).any(0)).flatten().tolist())


def test_the_decoding_cache_keeps_exactly_what_later_queries_can_attend(decode_in_steps):
    """The cache holds the keys some later query (up to max_seq_len) may attend, no more, no fewer;
    it is not bounded by the window (random blocks may come from anywhere in the past), but within
    the stated bound g b + (w' + 1) b + H r b (M - I) and it shrinks towards max_seq_len."""
    T = 64
    layer = build(True, max_seq_len=T)
    x = torch.randn(1, T, DIM, dtype=F64)
    sizes = {}

    def check(state):
        kept = set(state.positions.tolist())
        if state.length < T:  # (at the end nothing is reachable; the global blocks and the last window stay)
            assert kept == reachable_later(layer, state.length, T), state.length
        I = state.length // 4
        bound = 4 * (layer.global_blocks + 2 + HEADS * layer.num_random_blocks * (T // 4 - I))
        assert len(kept) <= bound
        sizes[state.length] = len(kept)

    decode_in_steps(layer, x, 3, on_step=check)
    assert sizes[T] <= 4 * (layer.global_blocks + 2) and max(sizes.values()) > sizes[T]


def test_without_random_blocks_the_decoding_cache_is_bounded_by_window_and_global(decode_in_steps):
    layer = build(True, num_random_blocks=0, max_seq_len=120)
    x = torch.randn(1, 120, DIM, dtype=F64)
    sizes = []
    full = layer(x)
    stepped, _ = decode_in_steps(layer, x, 1, on_step=lambda s: sizes.append(s.k.shape[-2]))
    torch.testing.assert_close(stepped, full, atol=1e-10, rtol=1e-10)
    assert max(sizes) <= 4 * (2 + 2)  # g + the own and previous block, whatever N




@pytest.mark.parametrize("causal", [False, True])
def test_no_tensor_grows_with_n_squared(causal, largest_tensor):
    n = 4096  # the kernel's transient scores are capped at 2^20 elements, below n^2 / 8
    torch.manual_seed(0)
    layer = et.build_attention("bigbird", 8, 1, causal, block_size=32, max_seq_len=n)
    x = torch.randn(1, n, 8, requires_grad=True)
    layer._layouts(n)  # the cached random tables (H, nb, r) are built outside the mode
    with largest_tensor() as mode:
        layer(x).sum().backward()
    assert mode.largest < n * n / 8, mode.largest


@pytest.mark.parametrize("option,value,words", [
    ("block_size", 0, "block_size"),
    ("window_blocks", 2, "odd"),
    ("window_blocks", 0, "window_blocks"),
    ("global_blocks", -1, "global_blocks"),
    ("num_random_blocks", 1.5, "num_random_blocks"),
    ("num_random_blocks", True, "num_random_blocks"),
    ("num_extra_global_tokens", -2, "num_extra_global_tokens"),
    ("max_seq_len", None, "max_seq_len"),
])
def test_bad_options_raise_value_errors(option, value, words):
    with pytest.raises(ValueError, match=f"bigbird: .*{words}.*{value!r}|bigbird: .*{value!r}.*{words}"):
        et.build_attention("bigbird", DIM, HEADS, **{option: value})
    with pytest.raises(ValueError, match="bigbird: N=100 exceeds max_seq_len=96"):
        build().dense_mask(100)
