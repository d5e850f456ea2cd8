"""Longformer: the paper's window (dilated per head) element by element, equality with dense attention
when the window covers the sequence, global tokens against a naive per-row reference, bounded decoding."""

from __future__ import annotations

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.core import reference_attention

DIM, HEADS = 16, 2
D = DIM // HEADS


def build(causal=False, dtype=torch.float64, **options):
    torch.manual_seed(0)
    return et.build_attention("longformer", DIM, HEADS, causal, **{"window": 6, "block_size": 4, **options}).to(dtype)


def paper_window(n: int, window: int, dilation: int, causal: bool) -> torch.Tensor:
    """A(i) = {j : |i - j| = t d, t = 0 .. w/2}, j <= i when causal, straight from the definition."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for t in range(window // 2 + 1):
            for j in (i - t * dilation, i + t * dilation):
                if 0 <= j < n and (not causal or j <= i):
                    allowed[i, j] = True
    return allowed


def qkv(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, n, D, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [1, 3, (1, 2)])
@pytest.mark.parametrize("n", [5, 23, 40])
def test_dense_mask_is_the_papers_dilated_window(causal, dilation, n):
    layer = build(causal, dilation=dilation)
    pattern = layer.dense_mask(n)
    dilations = dilation if isinstance(dilation, tuple) else (dilation,)
    expected = torch.stack([paper_window(n, 6, d, causal) for d in dilations])
    assert torch.equal(pattern if pattern.dim() == 3 else pattern[None], expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [1, (2, 3)])
def test_attend_equals_dense_attention_on_the_window_with_padding(causal, dilation):
    layer = build(causal, dilation=dilation)
    n = 29
    q, k, v = qkv(3, n)
    mask = torch.rand(3, n, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    out, _ = layer.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, pattern=layer.dense_mask(n), key_mask=mask)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_covering_the_sequence_is_dense_attention(causal):
    n = 13
    layer = build(causal, window=2 * n)
    q, k, v = qkv(2, n)
    out, _ = layer.attend(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=causal), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_the_block_size_does_not_change_the_outputs(block_size):
    n = 37
    q, k, v = qkv(2, n)
    want, _ = build(block_size=4, dilation=(1, 2)).attend(q, k, v)
    got, _ = build(block_size=block_size, dilation=(1, 2)).attend(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def window_and_global_reference(q, k, v, window_pattern, mask, global_mask):
    """Per item: a global query attends every real key; the others their window and every global key."""
    outs = []
    for b in range(q.shape[0]):
        g = global_mask[b] & mask[b]
        pattern = window_pattern | g[None, :] | g[:, None]  # (N, N)
        outs.append(reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pattern=pattern, key_mask=mask[b:b + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("dilation", [1, (1, 3)])
def test_global_tokens_attend_all_and_are_attended_by_all(dilation):
    layer = build(dilation=dilation)
    n = 31
    q, k, v = qkv(3, n, seed=2)
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, 25:] = False
    g = torch.zeros(3, n, dtype=torch.bool)
    g[0, [0, 4, 30]] = True  # a global key inside some windows counts once
    g[1, [0, 27]] = True  # 27 is padding: not global
    g[2, 12] = True
    out, _ = layer.attend(q, k, v, mask, global_mask=g)
    ref = window_and_global_reference(q, k, v, layer.dense_mask(n), mask, g)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


def test_the_layer_uses_its_own_global_projections_for_global_queries():
    layer = build()
    with torch.no_grad():
        layer.to_global_qkv.weight.add_(0.3 * torch.randn_like(layer.to_global_qkv.weight))
    n = 19
    x = torch.randn(2, n, DIM, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(2, n, dtype=torch.bool)
    g[:, 0] = True
    g[1, 9] = True
    y = layer(x, global_mask=g)
    # naive: row by row, local projections for window rows, global projections for global rows
    q, k, v = (t.view(2, n, HEADS, D).transpose(1, 2) for t in layer.to_qkv(x).chunk(3, -1))
    qg, kg, vg = (t.view(2, n, HEADS, D).transpose(1, 2) for t in layer.to_global_qkv(x).chunk(3, -1))
    window = layer.dense_mask(n)
    out = torch.zeros(2, HEADS, n, D, dtype=torch.float64)
    for b in range(2):
        for i in range(n):
            if g[b, i]:
                w = torch.softmax(torch.einsum("hd,hnd->hn", qg[b, :, i], kg[b]) / math.sqrt(D), -1)  # (H, N)
                out[b, :, i] = torch.einsum("hn,hnd->hd", w, vg[b])
            else:
                keys = window[i] | g[b]
                w = torch.softmax(torch.einsum("hd,hnd->hn", q[b, :, i], k[b, :, keys]) / math.sqrt(D), -1)
                out[b, :, i] = torch.einsum("hn,hnd->hd", w, v[b, :, keys])
    ref = layer.to_out(out.transpose(1, 2).reshape(2, n, DIM))
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.to_global_qkv.weight])
    want = torch.autograd.grad(ref.square().sum(), [x, layer.to_global_qkv.weight])
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_the_classifier_cls_token_is_global_and_sees_far_tokens():
    torch.manual_seed(0)
    clf = et.TransformerClassifier(11, 2, dim=DIM, depth=1, heads=HEADS, attention="longformer",
                                   attention_options={"window": 2, "block_size": 4})
    tokens = torch.randint(0, 11, (1, 40))
    far = tokens.clone()
    far[0, -1] = (far[0, -1] + 1) % 11  # 40 positions from the CLS token, far outside a window of 2
    assert not torch.allclose(clf(tokens), clf(far)), "the CLS token did not see the last token"


def test_causal_decoding_keeps_only_the_reachable_keys(decode_in_steps):
    layer = build(causal=True, dilation=(1, 2))
    x = torch.randn(1, 60, DIM, dtype=torch.float64)
    sizes = []
    stepped, _ = decode_in_steps(layer, x, 5, lambda state: sizes.append(state.k.shape[-2]))
    torch.testing.assert_close(stepped, layer(x), atol=1e-10, rtol=1e-10)
    assert max(sizes) <= 3 * 2 + 1, sizes  # w/2 max(d) + 1 keys, whatever N


def test_a_causal_layer_refuses_global_tokens():
    with pytest.raises(ValueError, match="longformer: global tokens are an encoder feature.*allowed: global_mask=None"):
        build(causal=True)(torch.randn(1, 5, DIM, dtype=torch.float64), global_mask=torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.parametrize("options,words", [
    ({"window": 7}, "window must be even"),
    ({"window": 0}, "window must be an int >= 2"),
    ({"dilation": 0}, "dilation must be a positive int"),
    ({"dilation": (1, 2, 3)}, "dilation has 3 entries for 2 heads"),
    ({"dilation": (1, 0)}, "dilation must be a tuple of 2 positive ints"),
    ({"block_size": 0}, "block_size must be a positive int"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(ValueError, match=f"longformer: {words}"):
        et.build_attention("longformer", DIM, HEADS, **options)
