"""Set Transformer (ISAB attention): the naive two-step definition, permutation equivariance, padding,
linear cost, bad options."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.set_transformer import SetTransformerAttention

DIM, HEADS, D = 16, 2, 8


def build(num_inducing=5, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return et.build_attention("set_transformer", DIM, HEADS, num_inducing=num_inducing).to(dtype)


def inputs(batch, n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, DIM, generator=g, dtype=dtype)


def holes(batch, n):
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, n - n // 3:] = False
    if batch > 2:
        mask[2, 1::3] = False
    return mask


def lin(linear, t):
    return t @ linear.weight.T + linear.bias


def naive_isab_attention(layer, x, mask):
    """H = Att(I, X), out = Att(X, H), written out per item and head with explicit softmaxes (float64)."""
    B, n, _ = x.shape
    w = layer.to_x.weight.T
    b = layer.to_x.bias
    q2, k1, v1 = (x @ w[:, i * DIM:(i + 1) * DIM] + b[i * DIM:(i + 1) * DIM] for i in range(3))  # (B, N, dim)
    q1 = lin(layer.to_inducing_q, layer.inducing)  # (m, dim)
    out = torch.zeros(B, n, DIM, dtype=x.dtype)
    for item in range(B):
        keep = torch.ones(n, dtype=torch.bool) if mask is None else mask[item]
        heads = []
        for h in range(HEADS):
            cols = slice(h * D, (h + 1) * D)
            scores = q1[:, cols] @ k1[item, :, cols].T / D**0.5  # (m, N)
            scores = scores.masked_fill(~keep, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v1[item, :, cols])  # (m, d)
        summary = lin(layer.to_summary, torch.cat(heads, dim=-1))  # H: (m, dim)
        kv2 = lin(layer.to_summary_kv, summary)  # (m, 2 dim)
        k2, v2 = kv2[:, :DIM], kv2[:, DIM:]
        heads = []
        for h in range(HEADS):
            cols = slice(h * D, (h + 1) * D)
            scores = q2[item, :, cols] @ k2[:, cols].T / D**0.5  # (N, m)
            heads.append(torch.softmax(scores, dim=-1) @ v2[:, cols])  # (N, d)
        out[item] = lin(layer.to_out, torch.cat(heads, dim=-1))
    return out


@pytest.mark.parametrize("n,m", [(13, 5), (4, 9), (1, 3)])  # m < N, m >= N, a single token
def test_layer_equals_the_naive_two_step_attention_outputs_and_gradients(n, m):
    layer = build(m)
    x = inputs(3, n).requires_grad_()
    mask = holes(3, n) if n > 1 else None
    y = layer(x, mask)
    ref = naive_isab_attention(layer, x, mask)
    real = torch.ones(3, n, dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(y[real], ref[real], atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y) * real[..., None]
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad((y * w).sum(), params)
    expected = torch.autograd.grad((ref * w).sum(), params)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)


def test_summary_is_att_of_inducing_points_over_real_elements():
    layer = build(4)
    x, mask = inputs(3, 10), holes(3, 10)
    h = layer.summary(x, mask)
    assert h.shape == (3, 4, DIM)
    x2 = x.clone()
    x2[~mask] = 1e3
    torch.testing.assert_close(layer.summary(x2, mask), h, atol=1e-12, rtol=1e-12)
    # each item's summary equals that of its real elements alone
    for item in range(3):
        alone = layer.summary(x[item:item + 1, mask[item]])
        torch.testing.assert_close(alone[0], h[item], atol=1e-12, rtol=1e-12)


def test_permuting_the_set_permutes_the_outputs():
    layer = build(6)
    x, mask = inputs(3, 17), holes(3, 17)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(3))
    y = layer(x, mask)
    y_perm = layer(x[:, perm], mask[:, perm])
    torch.testing.assert_close(y_perm[mask[:, perm]], y[:, perm][mask[:, perm]], atol=1e-12, rtol=1e-12)


def test_real_outputs_do_not_depend_on_padding_and_empty_sets_stay_finite():
    layer = build(5)
    x, mask = inputs(3, 12), holes(3, 12)
    y = layer(x, mask)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), DIM, dtype=x.dtype) * 1e3
    torch.testing.assert_close(layer(x2, mask)[mask], y[mask], atol=1e-12, rtol=1e-12)
    # a padded item equals the item without its padding
    torch.testing.assert_close(layer(x[1:2, mask[1]])[0], y[1, mask[1]], atol=1e-12, rtol=1e-12)
    empty = torch.zeros(2, 12, dtype=torch.bool)
    empty[0] = True
    assert torch.isfinite(layer(x[:2], empty)).all()


def test_no_tensor_grows_with_n_squared(largest_tensor):
    layer = build(8, dtype=torch.float32)
    n = 512
    x = inputs(1, n, dtype=torch.float32).requires_grad_()
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, -7:] = False
    with largest_tensor() as mode:
        layer(x, mask).sum().backward()
    assert mode.largest <= 4 * n * DIM  # the fused x projection's (N, 3 dim) is the largest; N^2 = 32 N dim


def test_inside_a_model_and_in_float32_it_trains():
    torch.manual_seed(0)
    clf = et.TransformerClassifier(vocab_size=11, num_classes=3, dim=DIM, depth=1, heads=HEADS,
                                   attention="set_transformer", attention_options={"num_inducing": 4},
                                   pooling="mean", max_seq_len=32)
    tokens = torch.randint(0, 11, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[2, 5:] = False
    logits = clf(tokens, mask)
    logits.sum().backward()
    assert logits.shape == (4, 3)
    assert clf.encoder.stack.blocks[0].attn.inducing.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "32", None])
def test_bad_num_inducing_is_refused(bad):
    with pytest.raises(ValueError, match=r"set_transformer: num_inducing .*must be a positive int.*allowed: an int >= 1"):
        et.build_attention("set_transformer", DIM, HEADS, num_inducing=bad)


def test_causal_and_attend_are_refused():
    with pytest.raises(ValueError, match="set_transformer: causal=True is not supported.*allowed: causal=False"):
        et.build_attention("set_transformer", DIM, HEADS, causal=True)
    with pytest.raises(ValueError, match="set_transformer: causal=True is not supported"):
        SetTransformerAttention(DIM, HEADS, causal=True)
    layer = build()
    q = torch.randn(1, HEADS, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"set_transformer: attention is not a function of \(q, k, v\)"):
        layer.attend(q, q, q)
    with pytest.raises(ValueError, match="set_transformer: unknown option.*allowed options: \\['num_inducing'\\]"):
        et.build_attention("set_transformer", DIM, HEADS, m=4)
    with pytest.raises(ValueError, match="set_transformer: a decoding state was given"):
        layer(inputs(1, 3), state=object())


def test_card():
    card = et.card("set_transformer")
    assert card.options == {"num_inducing": 32}
    assert card.complexity == "O(kN)" and card.classes == ("M",)
    assert not card.causal and card.bidirectional and card.decoding == "none" and not card.fixed_pattern
    assert not SetTransformerAttention.has_attend
