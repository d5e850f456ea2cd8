"""ETC: the four pieces (g2g, g2l, l2g, l2l) against a dense global-local reference written out plainly,
outputs and gradients in float64 (the inputs and the learned relative biases); radius >= N equals full
attention over [global; long] with the same biases; the layer's pooled global input; structured
input; no N x N tensor; bad input."""

import math

import pytest
import torch
from per_head_inputs import padding

import efficient_transformers as et

F64 = torch.float64


def build(seed=0, dim=16, heads=2, **options):
    torch.manual_seed(seed)
    opts = {"radius": 3, "relative_clip": 2, "segment_len": 4, "block_size": 4, **options}
    layer = et.build_attention("etc", dim, heads, **opts).double()
    with torch.no_grad():  # the biases start at zero: give them values, so that the tests see them
        for p in (layer.local_bias, layer.global_bias, layer.cross_bias):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 11), dtype=F64))
    return layer


def tensors(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_()


# ----------------------------------------------------------------------------- the plain reference
def piece_biases(layer, n_g, n, assignment):
    """The (B|1, H, n_g + n, n_g + n) additive biases of [global; long] x [global; long], piece by
    piece, from the paper's labels, with loops over the labels (no shared code with the layer)."""
    k, H = layer.relative_clip, layer.heads
    a = assignment if assignment.dim() == 2 else assignment[None]  # (B|1, N)
    s = torch.arange(n_g)
    i = torch.arange(n)
    clip = lambda d: d.clamp(-k, k) + k  # noqa: E731
    bias = torch.zeros(a.shape[0], H, n_g + n, n_g + n, dtype=F64)
    for h in range(H):
        bias[:, h, :n_g, :n_g] = layer.global_bias[h][clip(s[None, :] - s[:, None])]  # g2g: t - s
        own_gl = a[:, None, :] == s[None, :, None]  # (B, n_g, N): long j belongs to global s
        bias[:, h, :n_g, n_g:] = torch.where(own_gl, layer.cross_bias[h, 2], layer.cross_bias[h, 3])  # g2l
        own_lg = a[:, :, None] == s[None, None, :]  # (B, N, n_g)
        bias[:, h, n_g:, :n_g] = torch.where(own_lg, layer.cross_bias[h, 0], layer.cross_bias[h, 1])  # l2g
        bias[:, h, n_g:, n_g:] = layer.local_bias[h][clip(i[None, :] - i[:, None])]  # l2l: j - i
    return bias


def dense_global_local(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, global_mask, assignment):
    """The four pieces written out: one (n_g + n) x (n_g + n) score matrix with the pieces' biases,
    l2l restricted to |i - j| <= r, padded keys removed, softmax per row (zeros for empty rows)."""
    B, H, n, d = q_l.shape
    n_g = q_g.shape[-2]
    q, k, v = (torch.cat(pair, dim=2) for pair in ((q_g, q_l), (k_g, k_l), (v_g, v_l)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + piece_biases(layer, n_g, n, assignment)
    allowed = torch.ones(n_g + n, n_g + n, dtype=torch.bool)
    i = torch.arange(n)
    allowed[n_g:, n_g:] = (i[None, :] - i[:, None]).abs() <= layer.radius  # l2l: the local radius
    a = assignment if assignment.dim() == 2 else assignment[None]  # (B|1, N)
    allowed = allowed.expand(a.shape[0], n_g + n, n_g + n).clone()
    if layer.hard_l2g:  # a long token sees only its own global token
        allowed[:, n_g:, :n_g] = a[:, :, None] == torch.arange(n_g)[None, None, :]
    if layer.hard_g2l:  # a global token sees only its own long tokens
        allowed[:, :n_g, n_g:] = a[:, None, :] == torch.arange(n_g)[None, :, None]
    allowed = allowed[:, None]  # (B|1, 1, n_g + n, n_g + n)
    real_global = torch.ones(B, n_g, dtype=torch.bool) if global_mask is None else global_mask
    real_long = torch.ones(B, n, dtype=torch.bool) if mask is None else mask
    keys = torch.cat([real_global, real_long], dim=1)[:, None, None, :]  # (B, 1, 1, n_g + n)
    scores = scores.masked_fill(~(allowed & keys), -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zeros
    out = weights @ v
    return out[:, :, :n_g], out[:, :, n_g:]


def full_attention_with_biases(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, global_mask, assignment):
    """Plain full softmax attention over the concatenation [global; long] with the same biases."""
    n_g, d = q_g.shape[-2], q_g.shape[-1]
    q, k, v = (torch.cat(pair, dim=2) for pair in ((q_g, q_l), (k_g, k_l), (v_g, v_l)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + piece_biases(layer, n_g, q_l.shape[-2], assignment)
    real = torch.cat([global_mask, mask], dim=1)[:, None, None, :]
    out = torch.softmax(scores.masked_fill(~real, -math.inf), dim=-1) @ v
    return out[:, :, :n_g], out[:, :, n_g:]


def plain_pool(x, mask, segment_len):
    """Mean of each segment's real tokens (a loop over segments); (B, n_g, f), valid (B, n_g)."""
    B, n, f = x.shape
    pooled, valid = [], []
    for start in range(0, n, segment_len):
        w = mask[:, start : start + segment_len].to(x.dtype)  # (B, L)
        total = (x[:, start : start + segment_len] * w[..., None]).sum(1)
        count = w.sum(1)
        pooled.append(total / count.clamp(min=1)[:, None])
        valid.append(count > 0)
    return torch.stack(pooled, 1), torch.stack(valid, 1)


def compare(got, expected, inputs, atol=1e-10, weights=None):
    """Outputs and the gradients of <outputs, w> w.r.t. `inputs` agree."""
    g = torch.Generator().manual_seed(9)
    weights = weights or [torch.randn(t.shape, generator=g, dtype=F64) for t in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    loss_got = sum((a * w).sum() for a, w in zip(got, weights))
    loss_expected = sum((b * w).sum() for b, w in zip(expected, weights))
    for a, b in zip(torch.autograd.grad(loss_got, inputs), torch.autograd.grad(loss_expected, inputs)):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def structured_case(B, n, n_g, seed):
    """A per-item assignment with sentence-like runs, some long tokens in no global token, and a padded
    global token in item 1."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, n_g, (B, n), generator=g), dim=1).values  # non-decreasing runs
    cuts[:, : max(1, n // 7)] = -1  # a prefix in no global token (e.g. a question)
    global_mask = torch.ones(B, n_g, dtype=torch.bool)
    if B > 1:
        global_mask[1, -1] = False
    return cuts, global_mask


# ----------------------------------------------------------------------------- the four pieces
@pytest.mark.parametrize("n,radius,block_size,hard", [(1, 3, 4, False), (13, 3, 4, False), (37, 5, 4, False),
                                                      (37, 2, 8, False), (30, 0, 4, False), (37, 5, 8, True)])
def test_four_pieces_equal_the_dense_global_local_reference(n, radius, block_size, hard):
    layer = build(radius=radius, block_size=block_size, hard_l2g=hard, hard_g2l=hard)
    B, H, d = 3, 2, 8
    n_g = layer.num_global(n)
    q_g, k_g, v_g = (tensors(B, H, n_g, d, seed=s) for s in (1, 2, 3))
    q_l, k_l, v_l = (tensors(B, H, n, d, seed=s) for s in (4, 5, 6))
    mask = padding(B, n)
    global_mask = torch.ones(B, n_g, dtype=torch.bool)
    global_mask[2, 0] = False
    assignment = layer.default_assignment(n)
    got = layer.attend_global_local(q_g, k_g, v_g, q_l, k_l, v_l, mask=mask, global_mask=global_mask)
    ref = dense_global_local(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, global_mask, assignment)
    real_l = mask[:, None, :, None].to(F64)  # outputs at padded long positions are unspecified
    real_g = global_mask[:, None, :, None].to(F64)
    compare([got[0] * real_g, got[1] * real_l], [ref[0] * real_g, ref[1] * real_l],
            [q_g, k_g, v_g, q_l, k_l, v_l, layer.local_bias, layer.global_bias, layer.cross_bias])


@pytest.mark.parametrize("n,n_g,hard", [(23, 5, False), (40, 3, False), (23, 5, True), (31, 4, True)])
def test_structured_input_equals_the_reference(n, n_g, hard):
    """long_to_global per item (runs like sentences, tokens in no global token), a padded global token;
    with the hard l2g and g2l masks too."""
    layer = build(radius=4, hard_l2g=hard, hard_g2l=hard)
    B, H, d = 2, 2, 8
    assignment, global_mask = structured_case(B, n, n_g, seed=n)
    q_g, k_g, v_g = (tensors(B, H, n_g, d, seed=s) for s in (1, 2, 3))
    q_l, k_l, v_l = (tensors(B, H, n, d, seed=s) for s in (4, 5, 6))
    mask = padding(B, n)
    got = layer.attend_global_local(q_g, k_g, v_g, q_l, k_l, v_l, mask=mask, global_mask=global_mask,
                                    long_to_global=assignment)
    ref = dense_global_local(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, global_mask, assignment)
    real_l, real_g = mask[:, None, :, None].to(F64), global_mask[:, None, :, None].to(F64)
    compare([got[0] * real_g, got[1] * real_l], [ref[0] * real_g, ref[1] * real_l],
            [q_g, k_g, q_l, v_l, layer.cross_bias, layer.local_bias])
    # the same assignment shared by the batch, given as (N,)
    shared = assignment[0]
    got = layer.attend_global_local(q_g, k_g, v_g, q_l, k_l, v_l, mask=mask, long_to_global=shared)
    ref = dense_global_local(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, None, shared)
    torch.testing.assert_close(got[1] * real_l, ref[1] * real_l, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n", [9, 26])
def test_radius_at_least_n_is_full_attention_over_global_and_long_with_the_biases(n):
    layer = build(radius=n, relative_clip=3, segment_len=5)
    B, H, d = 2, 2, 8
    n_g = layer.num_global(n)
    q_g, k_g, v_g = (tensors(B, H, n_g, d, seed=s) for s in (11, 12, 13))
    q_l, k_l, v_l = (tensors(B, H, n, d, seed=s) for s in (14, 15, 16))
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, -3:] = False
    global_mask = torch.ones(B, n_g, dtype=torch.bool)
    got = layer.attend_global_local(q_g, k_g, v_g, q_l, k_l, v_l, mask=mask, global_mask=global_mask)
    ref = full_attention_with_biases(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, global_mask,
                                     layer.default_assignment(n))
    compare(list(got), list(ref), [q_g, v_g, k_l, v_l, layer.local_bias, layer.global_bias, layer.cross_bias])


def test_outputs_are_the_same_for_every_block_size():
    n, B, H, d = 45, 2, 2, 8
    outs = []
    for block_size in (1, 4, 16, 64):
        layer = build(radius=6, block_size=block_size)
        n_g = layer.num_global(n)
        args = [tensors(B, H, m, d, seed=s) for m, s in ((n_g, 1), (n_g, 2), (n_g, 3), (n, 4), (n, 5), (n, 6))]
        outs.append(layer.attend_global_local(*args, mask=padding(B, n)))
    for g, l in outs[1:]:
        torch.testing.assert_close(g, outs[0][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(l, outs[0][1], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- the layer
def test_layer_forward_is_the_long_rows_over_pooled_segments_through_the_global_projections():
    layer = build(radius=3, segment_len=4)
    B, n, dim, H = 3, 18, 16, 2
    x = tensors(B, n, dim, seed=21)
    mask = padding(B, n)
    mask[2, 4:8] = False  # a segment with no real token: no global token
    y = layer(x, mask)
    # the reference: pool by a loop, project with the global weights, four pieces written out
    pooled, valid = plain_pool(x, mask, 4)
    q_l, k_l, v_l = layer.project_qkv(x)
    q_g, k_g, v_g = (t.unflatten(-1, (H, -1)).transpose(1, 2)
                     for t in (pooled @ layer.to_global_qkv.weight.T + layer.to_global_qkv.bias).chunk(3, -1))
    _, out_l = dense_global_local(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, valid, layer.default_assignment(n))
    ref = layer.to_out(out_l.transpose(1, 2).flatten(2))
    real = mask[..., None].to(F64)
    compare([y * real], [ref * real], [x, layer.to_global_qkv.weight, layer.local_bias, layer.cross_bias])
    assert not valid[2, 1] and valid[2, 0]


def test_attend_pools_the_given_keys_and_values():
    layer = build(radius=2, segment_len=3)
    B, H, n, d = 3, 2, 14, 8
    q, k, v = (tensors(B, H, n, d, seed=s) for s in (31, 32, 33))
    mask = padding(B, n)
    out, state = layer.attend(q, k, v, mask)
    assert state is None
    w = mask[:, None, :, None].to(F64)
    per_segment = lambda t: plain_pool(t.flatten(0, 1), mask.repeat_interleave(H, 0), 3)[0].unflatten(0, (B, H))  # noqa: E731
    k_g, v_g = per_segment(k), per_segment(v)
    valid = plain_pool(q[:, 0], mask, 3)[1]
    _, ref = dense_global_local(layer, k_g, k_g, v_g, q, k, v, mask, valid, layer.default_assignment(n))
    compare([out * w], [ref * w], [q, k, v])


def test_forward_global_local_returns_both_streams():
    layer = build(radius=3)
    B, n, n_g, dim, H = 2, 21, 4, 16, 2
    x_long, x_global = tensors(B, n, dim, seed=41), tensors(B, n_g, dim, seed=42)
    assignment, global_mask = structured_case(B, n, n_g, seed=5)
    mask = padding(B, n)
    y_g, y_l = layer.forward_global_local(x_global, x_long, mask, global_mask, assignment)
    q_l, k_l, v_l = layer.project_qkv(x_long)
    q_g, k_g, v_g = (t.unflatten(-1, (H, -1)).transpose(1, 2)
                     for t in (x_global @ layer.to_global_qkv.weight.T + layer.to_global_qkv.bias).chunk(3, -1))
    out_g, out_l = dense_global_local(layer, q_g, k_g, v_g, q_l, k_l, v_l, mask, global_mask, assignment)
    ref_g, ref_l = (layer.to_out(o.transpose(1, 2).flatten(2)) for o in (out_g, out_l))
    real_l, real_g = mask[..., None].to(F64), global_mask[..., None].to(F64)
    compare([y_g * real_g, y_l * real_l], [ref_g * real_g, ref_l * real_l], [x_long, x_global, layer.global_bias])


def test_models_build_and_train_with_etc():
    torch.manual_seed(0)
    clf = et.TransformerClassifier(vocab_size=11, num_classes=3, dim=16, depth=2, heads=2, attention="etc",
                                   attention_options={"segment_len": 8, "radius": 4, "block_size": 8},
                                   pooling="cls")
    tokens = torch.randint(0, 11, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    logits = clf(tokens, mask)
    logits.sum().backward()
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    from efficient_transformers.attention.etc import ETCAttention

    layers = [m for m in clf.modules() if isinstance(m, ETCAttention)]
    assert len(layers) == 2 and all(m.local_bias.grad.abs().sum() > 0 for m in layers)
    with pytest.raises(ValueError, match="etc: TransformerLM needs a causal mechanism"):
        et.TransformerLM(vocab_size=11, dim=16, depth=1, heads=2, attention="etc")


def test_no_tensor_grows_with_n_squared(largest_tensor):
    torch.manual_seed(0)
    n = 8192  # transients are bounded by the score budget (2^19 elements), far under N^2 / 32 = 2^21
    layer = et.build_attention("etc", 32, 2, radius=20, segment_len=64, block_size=32)
    x = torch.randn(1, n, 32, requires_grad=True)
    with largest_tensor() as mode:
        layer(x).sum().backward()
        x_g = torch.randn(1, layer.num_global(n), 32)
        sum(y.sum() for y in layer.forward_global_local(x_g, x)).backward()
    assert mode.largest < n * n / 32, f"a {mode.largest}-element tensor for N = {n}"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,words", [
    ({"radius": -1}, ["radius", "-1", "an int >= 0"]),
    ({"relative_clip": -2}, ["relative_clip", "-2", "an int >= 0"]),
    ({"segment_len": 0}, ["segment_len", "0", "an int >= 1"]),
    ({"block_size": 0}, ["block_size", "0", "an int >= 1"]),
    ({"radius": 2.5}, ["radius", "2.5"]),
    ({"hard_l2g": 1}, ["hard_l2g", "1", "True or False"]),
])
def test_bad_options_raise_value_errors_naming_etc(options, words):
    with pytest.raises(ValueError) as info:
        et.build_attention("etc", 16, 2, **options)
    message = str(info.value)
    assert message.startswith("etc: ") and all(w in message for w in words), message


def test_causal_is_refused_and_the_card_says_so():
    card = et.card("etc")
    assert not card.causal and card.bidirectional and card.decoding == "none" and "encoder" in card.notes
    assert not card.fixed_pattern and not card.global_tokens and card.classes == ("FP", "M")
    with pytest.raises(ValueError, match=r"etc: causal=True is not supported.*allowed: causal=False"):
        et.build_attention("etc", 16, 2, causal=True)
    from efficient_transformers.attention.etc import ETCAttention

    with pytest.raises(ValueError, match=r"etc: causal=True is not supported"):
        ETCAttention(16, 2, causal=True)
    assert not hasattr(build(), "dense_mask")


def test_bad_global_inputs_and_assignments_raise_value_errors():
    layer = build()
    B, n, dim = 2, 10, 16
    x = torch.randn(B, n, dim, dtype=F64)
    x_g = torch.randn(B, 3, dim, dtype=F64)  # ceil(10 / 4) = 3 segments

    def raises(fn, *words):
        with pytest.raises(ValueError) as info:
            fn()
        message = str(info.value)
        assert message.startswith("etc: ") and all(w in message for w in words), message

    raises(lambda: layer.forward_global_local(x_g[:, :2], x), "n_g = 3", "got n_g = 2", "long_to_global")
    raises(lambda: layer.forward_global_local(x_g, x, long_to_global=torch.zeros(B, n - 1, dtype=torch.long)),
           "long_to_global", "(2, 10)", "(2, 9)")
    raises(lambda: layer.forward_global_local(x_g, x, long_to_global=torch.zeros(B, n)), "integer tensor")
    raises(lambda: layer.forward_global_local(x_g, x, long_to_global=torch.full((n,), 3)), "[-1, 2]", "3")
    raises(lambda: layer.forward_global_local(x_g, x, long_to_global=torch.full((n,), -2)), "[-1, 2]", "-2")
    raises(lambda: layer.forward_global_local(x_g, x, global_mask=torch.ones(B, 4, dtype=torch.bool)),
           "global_mask", "(2, 3)")
    raises(lambda: layer.forward_global_local(x_g[..., :8], x), "x_global", "(2, n_g >= 1, 16)")
    raises(lambda: layer.forward_global_local(x_g.float(), x), "dtype")
    raises(lambda: layer(x, global_mask=torch.ones(B, n, dtype=torch.bool)), "no global tokens")
