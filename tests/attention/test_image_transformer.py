"""Image Transformer: the paper's 1-D and 2-D memory blocks, element by element; exactness against the
dense reference (float64, padding, gradients); the dense limit; leading global tokens; bounded decoding."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.image_transformer import ImageTransformerAttention
from efficient_transformers.core import reference_attention

DIM, HEADS, D = 16, 2, 8

from per_head_inputs import qkv  # noqa: E402  (tests/attention/per_head_inputs.py)
NAME = "image_transformer"


def build(causal, **options):
    torch.manual_seed(0)
    return et.build_attention(NAME, DIM, HEADS, causal, **options).double()




def holes(batch, n, seed=2):
    mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, 0] = True
    if batch > 1:
        mask[1, n - n // 3:] = False  # right padding
    return mask


# ----------------------------------------------------------------------------- the paper's patterns
def paper_1d(n, lq, lm, causal):
    """Query i in block J = i // l_q attends [J l_q - l_m, i] (causal) or [J l_q - l_m, (J+1) l_q + l_m)."""
    pattern = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        start = i // lq * lq
        for j in range(n):
            pattern[i, j] = start - lm <= j and (j <= i if causal else j < start + lq + lm)
    return pattern


def paper_2d(H, W, g, query_shape, flange, causal, n=None):
    """Leading tokens global; pixel (r, c) in query block (R, C) attends rows [R h_q - h_m, (R+1) h_q (+ h_m
    when bidirectional)) x columns [C w_q - w_m, (C+1) w_q + w_m), and only raster-earlier pixels when causal."""
    (hq, wq), (hm, wm) = query_shape, flange
    n = g + H * W if n is None else n
    pattern = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < g or j < g:
                pattern[i, j] = True
                continue
            (rq, cq), (rk, ck) = divmod(i - g, W), divmod(j - g, W)
            top, left = rq // hq * hq, cq // wq * wq
            rows = top - hm <= rk < top + hq + (0 if causal else hm)
            cols = left - wm <= ck < left + wq + wm
            pattern[i, j] = rows and cols and (not causal or j <= i)
    return pattern


CASES_1D = [(4, 8), (4, 6), (3, 7), (5, 2), (4, 0), (1, 3)]  # (l_q, l_m): multiples, not, no memory
CASES_2D = [  # (H, W), query_shape, memory_flange
    ((5, 7), (2, 2), (2, 4)),  # flange a multiple of the query block, image not a multiple
    ((6, 9), (2, 3), (1, 3)),  # sub-tiles of 1 x 3
    ((4, 6), (2, 2), (0, 2)),  # no rows above (t2t's CIFAR set has h_m = 0)
    ((3, 5), (4, 4), (4, 8)),  # query block larger than the image
    ((7, 6), (3, 2), (3, 1)),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lm", CASES_1D)
def test_1d_dense_mask_is_the_papers_memory_block(causal, lq, lm):
    layer = build(causal, query_block=lq, memory=lm)
    for n in (1, 7, 13, 30):
        assert torch.equal(layer.dense_mask(n), paper_1d(n, lq, lm, causal)), n


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,query_shape,flange", CASES_2D)
def test_2d_dense_mask_is_the_papers_flange_with_global_leading_tokens(causal, shape, query_shape, flange):
    layer = build(causal, shape=shape, query_shape=query_shape, memory_flange=flange)
    H, W = shape
    for g in (0,) if causal else (0, 1, 3):
        assert torch.equal(layer.dense_mask(g + H * W), paper_2d(H, W, g, query_shape, flange, causal)), g
    if causal:  # a raster prefix while generating
        for n in (1, W + 2, H * W - 1):
            assert torch.equal(layer.dense_mask(n), paper_2d(H, W, 0, query_shape, flange, True, n=n)), n


def assert_attend_matches_reference(check, layer, n, batch=3, seed=1):
    check(layer, *qkv(batch, n, seed), holes(batch, n, seed))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lm", CASES_1D)
def test_1d_attend_equals_dense_attention_on_the_pattern_with_padding_and_gradients(causal, lq, lm, attend_matches_dense_pattern):
    layer = build(causal, query_block=lq, memory=lm)
    for n in (1, 11, 29):
        assert_attend_matches_reference(attend_matches_dense_pattern, layer, n, seed=n)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,query_shape,flange", CASES_2D)
def test_2d_attend_equals_dense_attention_on_the_pattern_with_padding_and_gradients(causal, shape, query_shape, flange, attend_matches_dense_pattern):
    layer = build(causal, shape=shape, query_shape=query_shape, memory_flange=flange)
    H, W = shape
    for g in (0,) if causal else (0, 2):
        assert_attend_matches_reference(attend_matches_dense_pattern, layer, g + H * W, seed=g)
    if causal:
        assert_attend_matches_reference(attend_matches_dense_pattern, layer, W + 3)


def test_the_defaults_are_the_papers_blocks_and_t2ts_2d_setting():
    layer = et.build_attention(NAME, DIM, HEADS)
    assert (layer.query_block, layer.memory, layer.shape) == (128, 256, None)
    assert (layer.query_shape, layer.memory_flange) == ((16, 16), (16, 32))
    # defaults: 1-D in blocks of l_q with a band of key blocks; 2-D in sub-tiles of the whole query block
    (layout,) = layer._layouts_1d(1000)
    assert layout.block_size == 128 and layout.key_blocks.shape == (1, 8, 5) and layout.band is None
    # 2-D: sub-tiles of the whole 16 x 16 query block; (1 + 1) x (2 + 1 + 2) memory sub-tiles causal, but only
    # as many slots as the fullest memory clipped by the border (on a 64 x 64 image 4 columns of sub-tiles)
    for causal, side, slots in ((True, 64, 2 * 4), (False, 128, 3 * 5), (False, 32, 2 * 2)):
        grid = et.build_attention(NAME, DIM, HEADS, causal, shape=(side, side))._grid(1 + side * side - causal)
        assert grid.layout.block_size == 256 and grid.layout.key_blocks.shape == (1, (side // 16) ** 2, slots)


# ----------------------------------------------------------------------------- dense limits
@pytest.mark.parametrize("causal", [False, True])
def test_a_memory_covering_the_sequence_is_dense_attention(causal):
    n = 23
    q, k, v = qkv(2, n)
    mask = holes(2, n)
    dense = reference_attention(q, k, v, key_mask=mask, causal=causal)
    real = mask[:, None, :, None].expand_as(dense)
    one_d = build(causal, query_block=5, memory=n)
    torch.testing.assert_close(one_d.attend(q, k, v, mask)[0][real], dense[real], atol=1e-12, rtol=1e-12)
    two_d = build(causal, shape=(4, 5), query_shape=(2, 3), memory_flange=(4, 6))
    narrower = build(causal, shape=(4, 5), query_shape=(2, 3), memory_flange=(1, 1))
    assert two_d._grid(20).dense and not narrower._grid(20).dense  # the fused dense path only when it is exact
    every = torch.ones(20, 20, dtype=torch.bool)
    assert torch.equal(two_d.dense_mask(20), every.tril() if causal else every)
    q2, k2, v2 = (t[:, :, 3:] for t in (q, k, v))  # 20 pixels
    dense2 = reference_attention(q2, k2, v2, key_mask=mask[:, 3:], causal=causal)
    real2 = mask[:, None, 3:, None].expand_as(dense2)
    torch.testing.assert_close(two_d.attend(q2, k2, v2, mask[:, 3:])[0][real2], dense2[real2], atol=1e-12, rtol=1e-12)
    if not causal:  # and with 3 leading tokens, the whole sequence is dense
        torch.testing.assert_close(two_d.attend(q, k, v, mask)[0][real], dense[real], atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- models and leading tokens
def test_the_classifier_passes_its_image_shape_and_its_cls_token_is_global():
    torch.manual_seed(0)
    clf = et.TransformerClassifier(vocab_size=10, num_classes=3, dim=DIM, depth=1, heads=HEADS, attention=NAME,
                                   attention_options={"query_shape": (2, 2), "memory_flange": (0, 0)},
                                   data_shape=(4, 4), pooling="cls")
    layer = next(m for m in clf.modules() if isinstance(m, ImageTransformerAttention))
    assert layer.shape == (4, 4)
    tokens = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = clf(tokens)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    # the CLS output sees every pixel although each pixel's memory is its own 2 x 2 block
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 10
    assert not torch.allclose(clf(changed), logits)
    with pytest.raises(ValueError, match=r"image_transformer: shape=\(4, 4\) needs N = 16"):
        clf(tokens[:, :14])  # 1 + 14 tokens: fewer than the grid


def test_causal_2d_ignores_the_raster_future_and_generation_equals_full_forwards(greedy_by_full_forwards):
    layer = et.build_attention(NAME, DIM, HEADS, True, shape=(5, 6), query_shape=(2, 3), memory_flange=(2, 3))
    x = torch.randn(2, 30, DIM, generator=torch.Generator().manual_seed(0))
    for t in (0, 8, 17):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(2, 29 - t, DIM) * 10
        assert torch.equal(layer(x)[:, : t + 1], layer(x2)[:, : t + 1])
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=11, dim=DIM, depth=2, heads=HEADS, attention=NAME, max_seq_len=64,
                          data_shape=(4, 5), attention_options={"query_shape": (2, 2), "memory_flange": (2, 2)}).double()
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(lm.generate(prompt, max_new_tokens=12, top_k=1), greedy_by_full_forwards(lm, prompt, 12))


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("options,bound", [
    ({"query_block": 4, "memory": 6}, 4 + 6 - 1),  # 1-D: the last l_q + l_m positions
    ({"query_block": 5, "memory": 10}, 5 + 10 - 1),
    ({"shape": (9, 5), "query_shape": (2, 3), "memory_flange": (1, 3)}, (2 + 1) * 5),  # 2-D: the flange rows
])
def test_decoding_state_is_bounded_by_the_memory_and_equals_the_full_forward(options, bound, decode_in_steps):
    layer = build(True, **options)
    n = 40
    x = torch.randn(2, n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sizes = []
    stepped, state = decode_in_steps(layer, x, 3, on_step=lambda s: sizes.append(s.k.shape[-2]))
    torch.testing.assert_close(stepped, layer(x), atol=1e-10, rtol=1e-10)
    assert max(sizes) <= bound and state.length == n
    if "shape" not in options:  # the bound does not grow with N
        longer = torch.randn(1, 100, DIM, dtype=torch.float64)
        more = []
        decode_in_steps(layer, longer, 1, on_step=lambda s: more.append(s.k.shape[-2]))
        assert max(more) == max(sizes)


def test_causal_2d_decoding_past_the_image_is_refused(decode_in_steps):
    layer = build(True, shape=(2, 3), query_shape=(1, 1), memory_flange=(1, 1))
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    _, state = decode_in_steps(layer, x, 2)
    with pytest.raises(ValueError, match=r"image_transformer: shape=\(2, 3\) holds 6 pixels, got a sequence of N=7"):
        layer(x[:, :1], state=state)


# ----------------------------------------------------------------------------- sparse, not simulated
def test_layouts_grow_linearly_with_n():
    one_d = et.build_attention(NAME, DIM, HEADS, True)
    for n in (4096, 32768):
        (layout,) = one_d._layouts_1d(n)
        assert layout.key_blocks.shape == (1, n // 128, 3)  # (1, nq, S): S fixed by l_q and l_m
    two_d = et.build_attention(NAME, DIM, HEADS, shape=(128, 256))
    grid = two_d._grid(1 + 128 * 256)
    assert grid.layout.key_blocks.shape == (1, 128 * 256 // 256, 15) and grid.order.shape == (128 * 256,)


# ----------------------------------------------------------------------------- bad input
def test_bad_options_and_lengths_raise_value_errors_naming_the_mechanism():
    def raises(words, **options):
        with pytest.raises(ValueError) as info:
            et.build_attention(NAME, DIM, HEADS, **options)
        for word in (NAME, *words):
            assert word in str(info.value), str(info.value)

    raises(["query_block", "0"], query_block=0)
    raises(["memory", "-1"], memory=-1)
    raises(["memory", "True"], memory=True)
    raises(["shape", "(0, 4)"], shape=(0, 4))
    raises(["shape", "(32,)"], shape=(32,))
    raises(["query_shape", "(0, 4)"], shape=(8, 8), query_shape=(0, 4))
    raises(["memory_flange", "(-1, 2)"], shape=(8, 8), memory_flange=(-1, 2))
    raises(["memory_flange", "(3,)"], shape=(8, 8), memory_flange=(3,))
    raises(["query_shape=(8, 8)", "no effect in 1-D"], query_shape=(8, 8))
    raises(["memory_flange=(0, 8)", "no effect in 1-D"], memory_flange=(0, 8))
    raises(["query_block=64", "no effect in 2-D"], shape=(8, 8), query_block=64)
    raises(["memory=0", "no effect in 2-D"], shape=(8, 8), memory=0)
    q = torch.randn(1, HEADS, 15, D)
    with pytest.raises(ValueError, match=r"image_transformer: shape=\(4, 4\) needs N = 16 .* got N=15"):
        et.build_attention(NAME, DIM, HEADS, shape=(4, 4)).attend(q, q, q)
    q = torch.randn(1, HEADS, 17, D)
    with pytest.raises(ValueError, match=r"image_transformer: shape=\(4, 4\) holds 16 pixels, got a sequence of N=17"):
        et.build_attention(NAME, DIM, HEADS, True, shape=(4, 4)).attend(q, q, q)
    with pytest.raises(ValueError, match=r"image_transformer: shape=\(4, 4\) needs N"):
        et.build_attention(NAME, DIM, HEADS, shape=(4, 4)).dense_mask(3)
