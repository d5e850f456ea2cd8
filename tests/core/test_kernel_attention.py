"""Kernel attention core: feature maps, the chunked causal scan and its state, against naive references."""

import math

import pytest
import torch

from efficient_transformers import native
from efficient_transformers.core.feature_maps import (
    EluPlusOne,
    PositiveRandomFeatures,
    ReluRandomFeatures,
    gaussian_random_matrix,
)
from efficient_transformers.core.kernel_attention import KernelState, kernel_attention, reference_kernel_attention

D = 8


def make_map(kind: str, m: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "elu":
        return EluPlusOne(D)
    if kind == "relu":
        return ReluRandomFeatures(D, m, orthogonal=True)
    return PositiveRandomFeatures(D, m, orthogonal=True, hyperbolic=kind == "hyperbolic").double()


def explicit_features(feature_map, x):
    """phi(x) with no stabiliser (the naive definition: the map's forward)."""
    return feature_map(x)


def qkv(batch=3, heads=2, n=37, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, n, D, generator=g, dtype=torch.float64) * scale).requires_grad_() for _ in range(3)]


def scattered_mask(batch, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False  # the last item: every key is padding
    return mask


# ----------------------------------------------------------------------------- feature maps
def test_orthogonal_random_matrix_has_orthogonal_blocks_and_gaussian_lengths():
    omega = gaussian_random_matrix(3 * D + 2, D, orthogonal=True, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)
    assert omega.shape == (3 * D + 2, D)
    for start in range(0, 3 * D, D):
        block = omega[start : start + D]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-10, "rows of one block must be exactly orthogonal"
    many = gaussian_random_matrix(800, D, orthogonal=True, generator=torch.Generator().manual_seed(1))
    mean_sq_length = many.square().sum(1).mean()  # chi-squared with D degrees of freedom: mean D, std 0.14 here
    assert abs(mean_sq_length - D) < 0.6
    iid = gaussian_random_matrix(D, D, orthogonal=False, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (iid @ iid.T - torch.diag(torch.diagonal(iid @ iid.T))).abs().max() > 1e-3


@pytest.mark.parametrize("hyperbolic", [False, True])
def test_positive_random_features_estimate_the_softmax_kernel(hyperbolic):
    torch.manual_seed(0)
    feature_map = PositiveRandomFeatures(D, 20000, orthogonal=False, hyperbolic=hyperbolic).double()
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 5, D, generator=g, dtype=torch.float64) * 0.5
    estimate = explicit_features(feature_map, q) @ explicit_features(feature_map, k).T / feature_map.num_features
    exact = torch.exp(q @ k.T / math.sqrt(D))
    assert ((estimate - exact) / exact).abs().max() < 0.05


def test_elu_plus_one_and_relu_maps():
    x = torch.linspace(-3, 3, 7 * D, dtype=torch.float64).view(7, D)
    assert torch.equal(EluPlusOne(D)(x), torch.nn.functional.elu(x) + 1)
    relu = ReluRandomFeatures(D, 12, orthogonal=True).double()
    torch.testing.assert_close(relu(x), torch.relu(x @ relu.omega.T * D**-0.25) + 1e-3)
    positive = PositiveRandomFeatures(D, 12, orthogonal=True).double()
    projected = x @ positive.omega.T * D**-0.25
    expected = (projected.exp() + 1e-6 * projected.amax(-1, keepdim=True).exp()) * torch.exp(-(x * D**-0.25).square().sum(-1, keepdim=True) / 2)
    torch.testing.assert_close(positive(x), expected)


def test_features_are_seeded_buffers_and_redraw_is_deterministic():
    a, b = make_map("positive", seed=5), make_map("positive", seed=5)
    assert torch.equal(a.omega, b.omega) and "omega" in dict(a.named_buffers())
    first = a.omega.clone()
    a.redraw()
    b.redraw()
    assert not torch.equal(a.omega, first) and torch.equal(a.omega, b.omega) and int(a.random.draws) == 1
    c = make_map("positive", seed=6)
    c.load_state_dict(a.state_dict())
    c.redraw()
    a.redraw()
    assert torch.equal(c.omega, a.omega), "seed and draw count travel with the state dict"


# ----------------------------------------------------------------------------- against the naive quadratic form
@pytest.mark.parametrize("kind", ["elu", "positive", "hyperbolic", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk,segment", [(4, 8), (5, 1024), (64, 1024)])
def test_equals_the_naive_quadratic_form_outputs_and_gradients(kind, causal, chunk, segment):
    feature_map = make_map(kind)
    q, k, v = qkv()
    mask = scattered_mask(3, 37)
    out, _ = kernel_attention(q, k, v, feature_map, key_mask=mask, causal=causal, chunk_size=chunk, segment_size=segment)
    ref = reference_kernel_attention(explicit_features(feature_map, q), explicit_features(feature_map, k), v,
                                     key_mask=mask, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert torch.equal(out[-1], torch.zeros_like(out[-1])), "an item whose keys are all padded gives zeros"
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_float32_causal_gradients_of_late_keys_keep_their_own_precision():
    """A key's gradient sums over the later queries only (a suffix). When the early queries' loss
    terms are 10^4 times larger, a suffix computed as total minus prefix would lose 4 digits in
    float32; the backward recurrence keeps them."""
    feature_map = EluPlusOne(D)
    q, k, v = (t.detach()[:1, :1, :].repeat(1, 1, 8, 1) for t in qkv(n=64))  # (1, 1, 512, D) float64
    n = q.shape[-2]
    loss_weights = torch.randn(1, 1, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss_weights[..., : n // 2, :] *= 1e4
    grads = {}
    for dtype in (torch.float64, torch.float32):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, _ = kernel_attention(*inputs, feature_map, causal=True, chunk_size=4, segment_size=n)
        grads[dtype] = torch.autograd.grad((out * loss_weights.to(dtype)).sum(), inputs[1:])
    for got, expected in zip(grads[torch.float32], grads[torch.float64]):
        late, late_expected = got[..., n // 2:, :].double(), expected[..., n // 2:, :]
        assert (late - late_expected).abs().max() <= 1e-5 * late_expected.abs().max()


# ----------------------------------------------------------------------------- the recurrent state
@pytest.mark.parametrize("kind", ["elu", "positive"])
def test_state_continuation_equals_one_call_for_any_split(kind):
    feature_map = make_map(kind)
    q, k, v = (t.detach() for t in qkv(n=29))
    mask = scattered_mask(3, 29)
    mask[-1, 3] = True  # the last item gets one real key after a run of padding
    full, full_state = kernel_attention(q, k, v, feature_map, key_mask=mask, causal=True, chunk_size=4)
    outs, state = [], None
    for s, e in [(0, 1), (1, 2), (2, 9), (9, 10), (10, 23), (23, 29)]:
        out, state = kernel_attention(q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], feature_map,
                                      key_mask=mask[:, s:e], causal=True, state=state, chunk_size=4)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=-2), full, atol=1e-12, rtol=1e-12)
    assert isinstance(state, KernelState) and state.length == 29
    torch.testing.assert_close(state.kv, full_state.kv, atol=1e-12, rtol=1e-12)
    assert torch.equal(state.ref, full_state.ref)
    assert state.kv.shape == (3, 2, feature_map.num_features, D + 1), "the state has constant size"


def test_gradients_flow_through_a_carried_state():
    feature_map = make_map("positive")
    q, k, v = qkv(n=20)
    weights = torch.randn(3, 2, 20, D, dtype=torch.float64)
    full, _ = kernel_attention(q, k, v, feature_map, causal=True, chunk_size=4)
    expected = torch.autograd.grad((full * weights).sum(), (q, k, v))
    first, state = kernel_attention(q[..., :9, :], k[..., :9, :], v[..., :9, :], feature_map, causal=True, chunk_size=4)
    second, _ = kernel_attention(q[..., 9:, :], k[..., 9:, :], v[..., 9:, :], feature_map, causal=True, state=state,
                                 chunk_size=4)
    got = torch.autograd.grad((torch.cat([first, second], -2) * weights).sum(), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_bidirectional_call_refuses_a_state():
    q, k, v = qkv(n=4)
    state = KernelState(torch.zeros(3, 2, D, D + 1), torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match="bidirectional"):
        kernel_attention(q, k, v, make_map("elu"), state=state)


# ----------------------------------------------------------------------------- stabilisers
def test_causal_stabiliser_is_exactly_causal_and_keeps_the_past_alive():
    """A max over all keys would make the past depend on (and underflow because of) huge future keys."""
    feature_map = make_map("positive", m=32).float()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 40, D, generator=g) for _ in range(3))
    out, _ = kernel_attention(q, k, v, feature_map, causal=True, chunk_size=8)
    k2 = k.clone()
    k2[..., 21:, :] *= 60.0  # log-features of the future keys are ~1e3 larger: exp() of them overflows float32
    out2, _ = kernel_attention(q, k2, v, feature_map, causal=True, chunk_size=8)
    assert torch.equal(out[..., :21, :], out2[..., :21, :])
    assert torch.isfinite(out2).all()
    ref = reference_kernel_attention(*(explicit_features(feature_map.double(), t.double()) for t in (q, k)),
                                     v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["elu", "positive", "hyperbolic", "relu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_large_magnitude_reduced_precision_inputs_stay_finite(kind, dtype, causal):
    """Outputs and gradients: the features underflow for all but a few keys, the normalisers do not."""
    feature_map = make_map(kind, m=32).float()
    g = torch.Generator().manual_seed(5)
    q, k, v = ((torch.randn(2, 2, 50, D, generator=g) * 300).to(dtype).requires_grad_() for _ in range(3))
    out, _ = kernel_attention(q, k, v, feature_map, causal=causal, chunk_size=8)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out.abs().max() <= v.abs().max() * 1.01, "a convex combination of values"
    out.float().mean().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_backward_keeps_no_feature_sized_tensor():
    """The Functions save O(N d) for the backward pass (q, k, v, the output and its normaliser, one state
    per segment, a few numbers per row; causal native: the weighted within-chunk scores, N C per head),
    not the N x m features nor per-chunk or per-token states."""
    feature_map = make_map("positive", m=256).float()
    q, k, v = (torch.randn(1, 2, 1024, D, requires_grad=True) for _ in range(3))
    chunk = 64
    for causal in (False, True):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            kernel_attention(q, k, v, feature_map, causal=causal, chunk_size=chunk, segment_size=256)
        inputs_and_output = 4 * q.numel() + q.numel() // D
        per_row = 5 * q.numel() // D + 256 * D  # the native kernels: rows' max, argmax, log-scale; omega
        scores = q.numel() // D * chunk if causal and native.available() else 0
        assert sum(saved) <= inputs_and_output + per_row + scores + 4 * 2 * 256 * (D + 1) + 8, \
            f"saved {sum(saved)} numbers (causal={causal})"


@pytest.mark.skipif(not native.available(), reason="the native FAVOR+ kernels are not built")
@pytest.mark.parametrize("causal", [False, True])
def test_saved_features_keep_exactly_the_features_asked_for(causal):
    """saved_features="keys" keeps one (B, H, N, m) tensor more than "none" (causal: N rounded up to whole
    chunks), "all" two; the output is the same either way, and a call without gradients keeps nothing."""
    feature_map = make_map("positive", m=32).float()
    n, chunk, m = 100, 16, 32
    q, k, v = (torch.randn(1, 2, n, D, requires_grad=True) for _ in range(3))
    rows = -(-n // chunk) * chunk if causal else n
    counts, outputs = {}, {}
    for saved_features in ("none", "keys", "all"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            outputs[saved_features], _ = kernel_attention(q, k, v, feature_map, causal=causal, chunk_size=chunk,
                                                          segment_size=32, saved_features=saved_features)
        counts[saved_features] = sum(saved)
    assert counts["keys"] - counts["none"] == 1 * 2 * rows * m
    assert counts["all"] - counts["none"] == 2 * 1 * 2 * rows * m
    assert torch.equal(outputs["none"], outputs["keys"]) and torch.equal(outputs["none"], outputs["all"])
    with torch.no_grad():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out, _ = kernel_attention(q, k, v, feature_map, causal=causal, chunk_size=chunk, segment_size=32,
                                      saved_features="all")
        assert saved == [] and torch.equal(out, outputs["none"])


def test_unknown_saved_features_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"saved_features must be one of \('none', 'keys', 'all'\), got 'queries'"):
        kernel_attention(q, k, v, make_map("positive"), saved_features="queries")
