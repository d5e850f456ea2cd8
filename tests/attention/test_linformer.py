"""Linformer: identity projections give dense attention, the naive projected form, sharing, padding."""

import pytest
import torch
from safetensors.torch import load_model, save_model

import efficient_transformers as et
from efficient_transformers.attention.linformer import share_layerwise
from efficient_transformers.bench.harness import count_flops
from efficient_transformers.core import AttentionLayer, reference_attention

DIM, HEADS, D = 16, 2, 8


def qkv(batch, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, n, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def naive_linformer(layer, q, k, v, mask):
    """softmax(Q (E K)^T / sqrt(d)) (F V) per head, padded keys and values zeroed, in plain einsums."""
    n = q.shape[-2]
    if mask is not None:
        k, v = k * mask[:, None, :, None], v * mask[:, None, :, None]
    e = layer.proj_k[..., :n].expand(HEADS, -1, -1)  # (H, k, N)
    f = e if layer.proj_v is None else layer.proj_v[..., :n].expand(HEADS, -1, -1)
    k_short = torch.einsum("hrn,bhnd->bhrd", e, k)
    v_short = torch.einsum("hrn,bhnd->bhrd", f, v)
    scores = torch.einsum("bhid,bhrd->bhir", q, k_short) / D**0.5
    return torch.einsum("bhir,bhrd->bhid", scores.softmax(-1), v_short)


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_identity_projections_with_k_equal_n_give_dense_attention(sharing):
    n = 13
    layer = et.build_attention("linformer", DIM, HEADS, k=n, sharing=sharing, max_seq_len=20).double()
    with torch.no_grad():
        for p in (layer.proj_k, layer.proj_v):
            if p is not None:
                p.zero_()
                p[:, :, :n] = torch.eye(n)
    q, k, v = qkv(3, n)
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, 9:] = False
    mask[2, ::3] = False
    out, state = layer.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, key_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert state is None
    w = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_naive_projected_form_for_any_n_up_to_the_maximum(sharing, masked):
    torch.manual_seed(0)
    layer = et.build_attention("linformer", DIM, HEADS, k=6, sharing=sharing, max_seq_len=40).double()
    for n in (3, 17, 40):  # projections sliced to the first n columns
        q, k, v = qkv(2, n, seed=n)
        mask = None
        if masked:
            mask = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) > 0.3
            mask[:, 0] = True
        out, _ = layer.attend(q, k, v, mask)
        ref = naive_linformer(layer, q, k, v, mask)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        params = [q, k, v, layer.proj_k] + ([] if layer.proj_v is None else [layer.proj_v])
        w = torch.randn_like(out)
        for got, expected in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sharing", ["headwise", "kv"])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_projections_compress_x_first_with_the_same_values_and_gradients(sharing, masked):
    """forward evaluates (E X) W + (E 1) b; the base layer's order E (X W + b) is the reference."""
    torch.manual_seed(0)
    layer = et.build_attention("linformer", DIM, HEADS, k=6, sharing=sharing, max_seq_len=24).double()
    for n in (5, 24):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(3, n, DIM, generator=g, dtype=torch.float64, requires_grad=True)
        mask = None
        if masked:
            mask = torch.rand(3, n, generator=g) > 0.4
            mask[:, 0], mask[2] = True, False  # the last item: all padding
        out = layer(x, mask)
        ref = project_first(layer, x, mask)  # project q, k, v for all N tokens, then compress
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        w = torch.randn_like(out)
        params = [x] + list(layer.parameters())
        for got, expected in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def project_first(layer, x, mask=None):
    """The equation's order: the base class's q, k, v projection of all N tokens, then the core compresses."""
    q, k, v, _ = AttentionLayer.project(layer, x, mask)
    out, _ = layer._attend(q, k, v, mask, None)
    return layer.output(out)


@pytest.mark.parametrize("sharing", ["headwise", "kv", "none"])
def test_shared_projections_skip_the_key_and_value_projections_of_n_tokens(sharing):
    """Matrix-product FLOPs of a train step, against the project-first order: the N x dim key and
    value projections (forward and two backward products each) are gone; what replaces them is the
    (k, dim) x (dim, dim) product and E 1; with E = F, X is also compressed once instead of twice."""
    n, dim, k = 64, 32, 8
    layer = et.build_attention("linformer", dim, HEADS, k=k, sharing=sharing, max_seq_len=n)
    x = torch.randn(1, n, dim, requires_grad=True)
    flops = count_flops(lambda: layer(x).sum().backward())
    reference_flops = count_flops(lambda: project_first(layer, x).sum().backward())
    projections, small_products, row_sums, compression = 2 * 6 * n * dim**2, 2 * 6 * k * dim**2, 2 * 4 * n * k, 6 * k * n * dim
    saved = {
        "headwise": projections - small_products - row_sums,
        "kv": projections + compression - small_products - row_sums // 2,
        "none": 0,  # per-head E_i: the equation's own order is the cheaper one, and is kept
    }[sharing]
    assert reference_flops - flops == saved


def test_sharing_shapes():
    layers = {s: et.build_attention("linformer", DIM, HEADS, k=5, sharing=s, max_seq_len=30) for s in ("none", "headwise", "kv")}
    assert layers["none"].proj_k.shape == (HEADS, 5, 30) and layers["none"].proj_v.shape == (HEADS, 5, 30)
    assert layers["headwise"].proj_k.shape == (1, 5, 30) and layers["headwise"].proj_v.shape == (1, 5, 30)
    assert layers["kv"].proj_k.shape == (1, 5, 30) and layers["kv"].proj_v is None


def test_layerwise_sharing_ties_every_layer_to_one_projection(tmp_path):
    torch.manual_seed(0)
    opts = {"k": 4, "sharing": "kv"}
    a = et.TransformerClassifier(vocab_size=11, num_classes=3, dim=DIM, depth=3, heads=HEADS, attention="linformer",
                                 attention_options=opts, max_seq_len=24)
    b = et.TransformerClassifier(vocab_size=11, num_classes=3, dim=DIM, depth=3, heads=HEADS, attention="linformer",
                                 attention_options=opts, max_seq_len=24)
    for model in (a, b):
        share_layerwise(block.attn for block in model.encoder.stack.blocks)
    blocks = a.encoder.stack.blocks
    assert all(block.attn.proj_k is blocks[0].attn.proj_k for block in blocks)
    projections = [p for name, p in a.named_parameters() if name.endswith("proj_k")]  # shared ones listed once
    assert len(projections) == 1 and projections[0] is blocks[0].attn.proj_k
    tokens = torch.randint(0, 11, (2, 24))
    a(tokens).sum().backward()
    assert blocks[0].attn.proj_k.grad is not None
    save_model(a, str(tmp_path / "a.safetensors"))
    load_model(b, str(tmp_path / "a.safetensors"))
    assert torch.equal(a(tokens), b(tokens))


def test_layerwise_sharing_needs_kv_layers_of_one_shape():
    kv = et.build_attention("linformer", DIM, HEADS, k=4, sharing="kv", max_seq_len=24)
    with pytest.raises(ValueError, match="linformer: share_layerwise needs layers built with sharing='kv'"):
        share_layerwise([kv, et.build_attention("linformer", DIM, HEADS, k=4, max_seq_len=24)])
    with pytest.raises(ValueError, match="k=5"):
        share_layerwise([kv, et.build_attention("linformer", DIM, HEADS, k=5, sharing="kv", max_seq_len=24)])
    with pytest.raises(ValueError, match="Linformer layers"):
        share_layerwise([kv, et.build_attention("vanilla", DIM, HEADS)])


def test_all_padded_item_gives_zeros_and_padding_never_leaks():
    torch.manual_seed(0)
    layer = et.build_attention("linformer", DIM, HEADS, k=5, max_seq_len=32)
    x = torch.randn(2, 20, DIM)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    q, k, v = layer.project_qkv(x)
    out, _ = layer.attend(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    mask[0, 15:] = False
    x2 = x.clone()
    x2[0, 15:] = 1e4
    torch.testing.assert_close(layer(x, mask)[0, :15], layer(x2, mask)[0, :15])


def test_causal_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="linformer: causal=True is not supported .*mixes every position"):
        et.build_attention("linformer", DIM, HEADS, causal=True)
    with pytest.raises(ValueError, match="linformer: unknown sharing 'layer'.*share_layerwise"):
        et.build_attention("linformer", DIM, HEADS, sharing="layer")
    with pytest.raises(ValueError, match="linformer: k .* must be a positive int, got 0"):
        et.build_attention("linformer", DIM, HEADS, k=0)
    layer = et.build_attention("linformer", DIM, HEADS, max_seq_len=10)
    with pytest.raises(ValueError, match="linformer: sequence length 11 exceeds max_seq_len=10"):
        layer(torch.randn(1, 11, DIM))
