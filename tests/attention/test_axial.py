"""Axial Transformer: the paper's row/column pattern, element by element; exactness against the dense
reference (float64, padding, gradients); the dense limit; the causal raster property; the receptive
field of stacked layers; leading global tokens; decoding and its state; bad input."""

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.axial import AxialAttention
from efficient_transformers.core import dense_attention

NAME = "axial"


def build(causal, dim=16, heads=2, **options):
    torch.manual_seed(0)
    return et.build_attention(NAME, dim, heads, causal, **options).double()


def qkv(layer, batch, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layer.heads, n, layer.head_dim, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(3)]


def holes(batch, n, seed=2):
    mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, 0] = True
    if batch > 1:
        mask[1, n - n // 3:] = False  # right padding
    return mask


# ----------------------------------------------------------------------------- the paper's pattern
def paper_pattern(dims, heads, causal, n=None, leading=0):
    """Straight from the definition: head h attends along axis a = k - 1 - (h mod k); query i and key j
    (grid positions, raster order) share every coordinate but the one on axis a; j <= i when causal.
    The first `leading` tokens are global. dims: the full grid; n: the sequence (a raster prefix)."""
    k = len(dims)
    n = leading + math.prod(dims) if n is None else n
    strides = [math.prod(dims[a + 1:]) for a in range(k)]

    def coords(p):
        return [p // strides[a] % dims[a] for a in range(k)]

    pattern = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        axis = k - 1 - h % k
        for i in range(n):
            for j in range(n):
                if i < leading or j < leading:
                    pattern[h, i, j] = True
                    continue
                ci, cj = coords(i - leading), coords(j - leading)
                same = all(ci[b] == cj[b] for b in range(k) if b != axis)
                pattern[h, i, j] = same and (not causal or j <= i)
    return pattern


def square_dims(n):
    w = math.ceil(math.sqrt(n))
    return (math.ceil(n / w), w)


def test_the_layout_for_shape_none_is_the_nearest_square_bidirectional_and_fixed_by_max_seq_len_causal():
    bidir = build(False)
    for n, dims in ((1, (1, 1)), (2, (1, 2)), (7, (3, 3)), (130, (11, 12)), (4096, (64, 64)), (16384, (128, 128)),
                    (16385, (128, 129))):
        assert bidir.grid(n) == (dims, 0) and dims == square_dims(n)
    causal = build(True)  # max_seq_len 4096: W = 64 whatever N
    for n in (1, 7, 64, 65, 4096):
        assert causal.grid(n) == ((math.ceil(n / 64), 64), 0)
    assert build(True, max_seq_len=1000).grid(50) == ((2, 32), 0)  # ceil(sqrt(1000)) = 32


@pytest.mark.parametrize("max_block", [128, 2])
def test_dense_mask_is_the_papers_row_and_column_pattern_without_shape(max_block):
    for heads in (2, 3, 4):
        bidir = build(False, dim=12 * heads, heads=heads, max_block=max_block)
        for n in (1, 5, 9, 14, 37):
            assert torch.equal(bidir.dense_mask(n), paper_pattern(square_dims(n), heads, False, n=n)), (heads, n)
        causal = build(True, dim=12 * heads, heads=heads, max_block=max_block, max_seq_len=40)  # W = 7
        for n in (1, 6, 7, 8, 22, 40):
            assert torch.equal(causal.dense_mask(n), paper_pattern((6, 7), heads, True, n=n)), (heads, n)


@pytest.mark.parametrize("shape,heads", [((3, 5), 2), ((4, 4), 4), ((5, 3), 3), ((1, 6), 2), ((2, 3, 4), 3),
                                         ((2, 2, 3), 4)])
@pytest.mark.parametrize("max_block", [128, 2])
def test_dense_mask_is_the_papers_pattern_on_a_shape_with_global_leading_tokens(shape, heads, max_block):
    bidir = build(False, dim=4 * heads, heads=heads, shape=shape, max_block=max_block)
    cells = math.prod(shape)
    for g in (0, 1, 3):
        assert torch.equal(bidir.dense_mask(g + cells), paper_pattern(shape, heads, False, leading=g)), g
    causal = build(True, dim=4 * heads, heads=heads, shape=shape, max_block=max_block)
    for n in sorted({1, min(shape[-1] + 1, cells), cells - 1, cells} - {0}):  # raster prefixes while generating
        assert torch.equal(causal.dense_mask(n), paper_pattern(shape, heads, True, n=n)), n


def test_heads_alternate_rows_and_columns_round_robin():
    layer = build(False, dim=24, heads=6, shape=(2, 3, 4))
    assert [layer.axis_of_head(h) for h in range(6)] == [2, 1, 0, 2, 1, 0]
    layer = build(False, dim=12, heads=3)
    assert [layer.axis_of_head(h) for h in range(3)] == [1, 0, 1]  # rows, columns, rows


# ----------------------------------------------------------------------------- exactness
def assert_attend_matches_reference(check, layer, n, batch=3, seed=1):
    check(layer, *qkv(layer, batch, n, seed), holes(batch, n, seed))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_block", [128, 4, 3])
def test_attend_equals_dense_attention_on_the_pattern_without_shape(causal, max_block, attend_matches_dense_pattern):
    layer = build(causal, dim=12, heads=3, max_block=max_block, **({"max_seq_len": 60} if causal else {}))
    for n in (1, 10, 23, 60):  # grids with a partial last row, lines cut into blocks with padding
        assert_attend_matches_reference(attend_matches_dense_pattern, layer, n, seed=n)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,heads,max_block", [((3, 5), 2, 128), ((5, 7), 4, 3), ((2, 3, 4), 3, 128),
                                                   ((3, 2, 5), 3, 2)])
def test_attend_equals_dense_attention_on_the_pattern_with_a_shape(causal, shape, heads, max_block, attend_matches_dense_pattern):
    layer = build(causal, dim=4 * heads, heads=heads, shape=shape, max_block=max_block)
    cells = math.prod(shape)
    for n in ((cells, cells + 1, cells + 4) if not causal else (cells, cells - shape[-1] - 1, 2)):
        assert_attend_matches_reference(attend_matches_dense_pattern, layer, n, seed=n)


@pytest.mark.parametrize("causal", [False, True])
def test_a_single_row_is_dense_attention_for_row_heads_and_the_identity_for_column_heads(causal):
    n = 11
    layer = build(causal, shape=(1, n))
    q, k, v = qkv(layer, 2, n)
    mask = holes(2, n)
    out, _ = layer.attend(q, k, v, mask)
    dense = dense_attention(q, k, v, key_mask=mask, causal=causal, backend="math")
    real = mask[:, :, None]
    torch.testing.assert_close(out[:, 0] * real, dense[:, 0] * real, atol=1e-12, rtol=1e-12)  # row head
    torch.testing.assert_close(out[:, 1] * real, v[:, 1] * real, atol=1e-12, rtol=1e-12)  # column of one: itself


def test_max_block_changes_speed_only():
    x = torch.randn(2, 50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for causal in (False, True):
        ys = [build(causal, max_block=b)(x) for b in (128, 5, 2)]
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- causality, receptive field
def dependence(stack, n, dim):
    """(N, N) bool: output i of the stack changes when input j changes (batch item j + 1 perturbs input j
    only; items are independent, so one forward pass measures every j). Unreached keys contribute exact
    zeros, but the BLAS may round identical batch items differently (MKL on an AMD EPYC: 1 ulp), so an
    output depends on j when it moves by more than 1e-9; a reached input moves it by at least 1e-2 here."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, n, dim, dtype=torch.float64, generator=g).repeat(n + 1, 1, 1)  # (N + 1, N, dim)
    x[torch.arange(1, n + 1), torch.arange(n)] += 3 * torch.randn(n, dim, dtype=torch.float64, generator=g)
    with torch.no_grad():
        y = stack(x)  # (N + 1, N, dim)
    return ((y[1:] - y[:1]).abs() > 1e-9).any(-1).T  # (N outputs, N inputs)


def stacked(layers):
    def run(x):
        for layer in layers:
            x = x + layer(x)
        return x
    return run


@pytest.mark.parametrize("options,n", [({"shape": (4, 5)}, 20), ({"shape": (2, 3, 3)}, 18), ({}, 19)])
def test_causal_output_at_r_c_does_not_depend_on_inputs_after_it_in_raster_order(options, n):
    heads = 3 if len(options.get("shape", (0, 0))) == 3 else 2
    layer = build(True, dim=6 * heads, heads=heads, max_seq_len=25, **options)  # shape None: W = 5
    depends = dependence(layer, n, 6 * heads)
    assert not torch.triu(depends, diagonal=1).any()  # (r, c) ignores everything after it
    x = torch.randn(2, n, 6 * heads, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in range(0, n, 3):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(2, n - t - 1, 6 * heads, dtype=torch.float64) * 10
        assert torch.equal(layer(x)[:, : t + 1], layer(x2)[:, : t + 1]), t


@pytest.mark.parametrize("options,n", [({"shape": (3, 4)}, 12), ({"shape": (3, 4)}, 13), ({}, 11), ({}, 13)])
def test_one_layer_reaches_its_row_and_column_and_two_stacked_layers_reach_every_position(options, n):
    layers = [build(False, **options) for _ in range(2)]
    one = dependence(layers[0], n, 16)
    assert torch.equal(one, layers[0].dense_mask(n).any(0))  # one layer: the union of its heads' patterns
    assert not one.all()
    assert dependence(stacked(layers), n, 16).all()  # two layers: everything (padded last row, CLS included)


def test_three_axes_need_three_layers():
    layers = [build(False, dim=18, heads=3, shape=(2, 2, 3)) for _ in range(3)]
    assert not dependence(stacked(layers[:2]), 12, 18).all()
    assert dependence(stacked(layers), 12, 18).all()


def test_causal_stacks_reach_only_the_upper_left_quadrant_unlike_the_shifted_decoder():
    """Information moves right along rows and down along columns only: at any depth, (r, c) sees exactly
    (r', c') with r' <= r and c' <= c (Ho et al.'s shifted outer decoder, not implemented, adds the rest)."""
    H, W = 3, 4
    layers = [build(True, shape=(H, W)) for _ in range(4)]
    expected = torch.zeros(H * W, H * W, dtype=torch.bool)
    for i in range(H * W):
        for j in range(H * W):
            expected[i, j] = j // W <= i // W and j % W <= i % W
    for depth in (2, 4):
        assert torch.equal(dependence(stacked(layers[:depth]), H * W, 16), expected), depth


# ----------------------------------------------------------------------------- models and leading tokens
def test_the_classifier_passes_its_image_shape_and_its_cls_token_is_global():
    torch.manual_seed(0)
    clf = et.TransformerClassifier(vocab_size=10, num_classes=3, dim=16, depth=1, heads=2, attention=NAME,
                                   data_shape=(4, 4), pooling="cls")
    layer = next(m for m in clf.modules() if isinstance(m, AxialAttention))
    assert layer.shape == (4, 4)
    tokens = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = clf(tokens)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 10  # one layer: only the global CLS sees every pixel
    assert not torch.allclose(clf(changed), logits)
    with pytest.raises(ValueError, match=r"axial: shape=\(4, 4\) needs N = 16 .*got N=15"):
        clf(tokens[:, :14])


def test_generation_on_a_shape_equals_repeated_full_forwards(greedy_by_full_forwards):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=11, dim=16, depth=2, heads=2, attention=NAME, max_seq_len=64,
                          data_shape=(4, 5)).double()
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(lm.generate(prompt, max_new_tokens=15, top_k=1), greedy_by_full_forwards(lm, prompt, 15))


# ----------------------------------------------------------------------------- decoding
def reachable(dims, limit, t):
    """Keys 0 .. t - 1 that a position in [t, limit) can attend along some axis, from the definition."""
    k = len(dims)
    strides = [math.prod(dims[a + 1:]) for a in range(k)]
    keep = 0
    for p in range(t):
        cp = [p // strides[a] % dims[a] for a in range(k)]
        keep += any(all(cp[b] == (x // strides[b] % dims[b]) for b in range(k) if b != a)
                    for x in range(t, limit) for a in range(k))
    return keep


@pytest.mark.parametrize("options,dims,limit", [
    ({"shape": (5, 4)}, (5, 4), 20),
    ({"shape": (2, 3, 3), "heads": 3, "dim": 18}, (2, 3, 3), 18),
    ({"max_seq_len": 30}, (5, 6), 30),  # shape None: W = ceil(sqrt(30)) = 6
])
def test_decoding_equals_the_full_forward_and_keeps_exactly_the_reachable_keys(options, dims, limit, decode_in_steps):
    layer = build(True, **options)
    n = limit
    x = torch.randn(2, n, layer.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sizes = []
    stepped, state = decode_in_steps(layer, x, 3, on_step=lambda s: sizes.append((s.length, s.k.shape[-2])))
    torch.testing.assert_close(stepped, layer(x), atol=1e-10, rtol=1e-10)
    for length, size in sizes:
        assert size == reachable(dims, limit, length), length
    # until the last row starts every earlier key is still reachable: the state is the whole prefix, O(N)
    last_row = math.prod(dims[1:]) * (dims[0] - 1)
    assert all(size == length for length, size in sizes if length <= last_row)
    assert state.length == n and sizes[-1][1] == 0  # the end of the grid: nothing left to reach


def test_the_decoding_state_is_the_whole_prefix_until_the_last_row():
    layer = build(True, max_seq_len=100)  # W = 10, rows 0 .. 9
    x = torch.randn(1, 95, 16, dtype=torch.float64)
    _, state = layer(x[:, :90], return_state=True)  # the last row starts at 90: all 90 keys still reachable
    assert state.k.shape[-2] == 90
    _, state = layer(x[:, 90:95], state=state, return_state=True)
    # row heads still need 90..94, column heads the columns 5..9 (positions 95..99 are to come in them)
    assert state.k.shape[-2] == 5 + 9 * 5
    assert sorted(state.positions.tolist()) == sorted(
        [p for p in range(95) if p >= 90 or p % 10 >= 5])


def test_decoding_past_the_shape_is_refused(decode_in_steps):
    layer = build(True, shape=(2, 3))
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    _, state = decode_in_steps(layer, x, 2)
    with pytest.raises(ValueError, match=r"axial: shape=\(2, 3\) holds 6 positions, got N=7"):
        layer(x[:, :1], state=state)


# ----------------------------------------------------------------------------- sparse, not simulated
def test_layouts_are_one_block_per_line_at_16k():
    layer = et.build_attention(NAME, 256, 4)
    plan = layer._plan(16384)
    assert plan.dims == (128, 128)
    rows, cols = plan.axes  # axis 1 (rows) first
    assert rows.order is None and rows.layout.key_blocks.shape == (1, 128, 1)  # raster order, no copy
    assert cols.order.shape == (16384,) and cols.layout.key_blocks.shape == (1, 128, 1)


# ----------------------------------------------------------------------------- bad input
def test_bad_options_and_lengths_raise_value_errors_naming_the_mechanism():
    def raises(words, heads=2, causal=False, **options):
        with pytest.raises(ValueError) as info:
            et.build_attention(NAME, 24, heads, causal, **options)
        for word in (NAME, *words):
            assert word in str(info.value), str(info.value)

    raises(["shape", "(0, 4)"], shape=(0, 4))
    raises(["shape", "(32,)"], shape=(32,))
    raises(["shape", "'ab'"], shape="ab")
    raises(["shape", "(4.0, 4)"], shape=(4.0, 4))
    raises(["max_block", "0"], max_block=0)
    raises(["max_seq_len", "0"], max_seq_len=0)
    raises(["heads=1", "2 axes", "heads >= 2"], heads=1)
    raises(["heads=2", "3 axes", "shape=(2, 2, 2)", "heads >= 3"], shape=(2, 2, 2))
    q = torch.randn(1, 2, 15, 8)
    with pytest.raises(ValueError, match=r"axial: shape=\(4, 4\) needs N = 16 .* got N=15"):
        et.build_attention(NAME, 16, 2, shape=(4, 4)).attend(q, q, q)
    q = torch.randn(1, 2, 17, 8)
    with pytest.raises(ValueError, match=r"axial: shape=\(4, 4\) holds 16 positions, got N=17"):
        et.build_attention(NAME, 16, 2, True, shape=(4, 4)).attend(q, q, q)
    with pytest.raises(ValueError, match=r"axial: sequence length 17 exceeds max_seq_len=16"):
        et.build_attention(NAME, 16, 2, True, max_seq_len=16).attend(q, q, q)
