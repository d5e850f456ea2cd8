"""Performer (FAVOR+): its own naive quadratic form, convergence to softmax attention, redraw, numerics."""

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.core import reference_attention
from efficient_transformers.core.kernel_attention import KernelState, reference_kernel_attention

DIM, HEADS = 16, 2


def naive_favor(layer, q, k, v, mask, causal):
    """phi(Q) phi(K)^T with the layer's own features (no stabilisers), masked, row-normalised, times V."""
    return reference_kernel_attention(layer.feature_map(q), layer.feature_map(k), v, key_mask=mask, causal=causal)


@pytest.mark.parametrize("features", ["positive", "hyperbolic", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_attend_equals_the_naive_form_with_the_same_features(features, causal):
    torch.manual_seed(0)
    layer = et.build_attention("performer", DIM, HEADS, causal, nb_features=24, features=features,
                               chunk_size=4 if causal else None).double()
    layer.segment_size = 12
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, HEADS, 41, DIM // HEADS, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(3, 41, generator=g) > 0.3
    mask[:, 0] = True
    out, state = layer.attend(q, k, v, mask)
    ref = naive_favor(layer, q, k, v, mask, causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert (state is None) != causal
    w = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("features", ["positive", "hyperbolic"])
@pytest.mark.parametrize("causal", [False, True])
def test_error_against_softmax_attention_shrinks_as_features_grow(features, causal):
    """FAVOR+ is an unbiased estimate of softmax attention: more features, smaller error (averaged over draws)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, HEADS, 48, 8, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    exact = reference_attention(q, k, v, causal=causal)
    errors = []
    for m in (8, 64, 512):
        per_seed = []
        for seed in range(6):
            torch.manual_seed(seed)
            layer = et.build_attention("performer", 8 * HEADS, HEADS, causal, nb_features=m, features=features).double()
            out, _ = layer.attend(q, k, v)
            per_seed.append(((out - exact).norm() / exact.norm()).item())
        errors.append(sum(per_seed) / len(per_seed))
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2], errors
    assert errors[2] < 0.1, errors


def test_features_are_fixed_buffers_unless_redraw_is_asked():
    torch.manual_seed(0)
    layer = et.build_attention("performer", DIM, HEADS, nb_features=16)
    assert "feature_map.omega" in layer.state_dict() and "feature_map.omega" not in dict(layer.named_parameters())
    omega = layer.feature_map.omega.clone()
    x = torch.randn(2, 9, DIM)
    layer.train()
    for _ in range(5):
        layer(x)
    assert torch.equal(layer.feature_map.omega, omega), "no redraw by default"


def test_redraw_every_interval_in_training_only_and_reproducibly():
    torch.manual_seed(0)
    a = et.build_attention("performer", DIM, HEADS, nb_features=16, redraw_interval=2)
    torch.manual_seed(0)
    b = et.build_attention("performer", DIM, HEADS, nb_features=16, redraw_interval=2)
    x = torch.randn(2, 9, DIM)
    first = a.feature_map.omega.clone()
    a.eval()
    for _ in range(4):
        a(x)
    assert torch.equal(a.feature_map.omega, first), "eval mode never redraws"
    a.train()
    draws = []
    for _ in range(5):
        a(x)
        draws.append(a.feature_map.omega.clone())
    assert torch.equal(draws[0], first) and torch.equal(draws[1], first)
    assert not torch.equal(draws[2], first) and torch.equal(draws[2], draws[3]) and not torch.equal(draws[4], draws[3])
    b.load_state_dict(a.state_dict())  # features, seed, draw and call counters travel with the weights
    a(x)
    b.train()
    b(x)
    assert torch.equal(a.feature_map.omega, b.feature_map.omega)


def test_recurrent_decoding_state_has_constant_size(decode_in_steps):
    torch.manual_seed(0)
    layer = et.build_attention("performer", DIM, HEADS, causal=True, nb_features=16, features="hyperbolic").double()
    x = torch.randn(1, 80, DIM, dtype=torch.float64)

    def constant_size(state):
        assert isinstance(state, KernelState) and state.kv.shape == (1, HEADS, 32, DIM // HEADS + 1)

    stepped, _ = decode_in_steps(layer, x, 10, constant_size)
    torch.testing.assert_close(stepped, layer(x), atol=1e-10, rtol=1e-10)


def test_generate_greedy_equals_repeated_full_forwards(greedy_by_full_forwards):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=19, dim=DIM, depth=2, heads=HEADS, attention="performer",
                          attention_options={"nb_features": 32}, max_seq_len=128).double()
    prompt = torch.randint(0, 19, (2, 70), generator=torch.Generator().manual_seed(2))
    fast = lm.generate(prompt, max_new_tokens=6, top_k=1)
    slow = greedy_by_full_forwards(lm, prompt, 6)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize(
    "option,value,words",
    [
        ("nb_features", 0, "nb_features must be a positive int"),
        ("features", "cosine", "unknown features 'cosine'"),
        ("orthogonal", "yes", "orthogonal must be a bool"),
        ("redraw_interval", 0, "redraw_interval must be None"),
        ("chunk_size", 0, "chunk_size must be None.*or a positive int"),
        ("saved_features", "queries", "unknown saved_features 'queries'"),
    ],
)
def test_bad_options_are_refused(option, value, words):
    with pytest.raises(ValueError, match=f"performer: {words}"):
        et.build_attention("performer", DIM, HEADS, **{option: value})


@pytest.mark.parametrize("features", ["relu", "hyperbolic"])
def test_saved_features_need_the_native_positive_features(features):
    assert et.build_attention("performer", DIM, HEADS, features=features).saved_features == "none"
    with pytest.raises(ValueError, match=f"performer: saved_features='keys' needs features='positive'"):
        et.build_attention("performer", DIM, HEADS, features=features, saved_features="keys")


def test_saved_features_default_to_the_keys_and_reach_the_core(monkeypatch):
    """Positive features keep the keys' features by default (README: the measured speed and memory);
    the option reaches kernel_attention unchanged."""
    import efficient_transformers.attention.performer as performer_module

    seen = []
    real = performer_module.kernel_attention
    monkeypatch.setattr(performer_module, "kernel_attention",
                        lambda *a, **kw: seen.append(kw["saved_features"]) or real(*a, **kw))
    x = torch.randn(1, 12, DIM)
    for option, expected in ((None, "keys"), ("none", "none"), ("all", "all")):
        layer = et.build_attention("performer", DIM, HEADS, nb_features=16, saved_features=option)
        assert layer.saved_features == expected and f"saved_features={expected}" in repr(layer)
        layer(x)
        assert seen[-1] == expected


def test_card_follows_the_survey():
    card = et.card("performer")
    assert (card.complexity, card.classes, card.causal, card.year, card.decoding) == ("O(N)", ("KR",), True, 2020, "recurrent")
    assert "2009.14794" in card.paper and math.isclose(card.options["nb_features"], 256)
