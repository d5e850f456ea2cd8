"""Synthesizer: every variant against a naive per-row reference of its own definition, mixtures, decoding."""

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.core.state import KVCache

DIM, HEADS, D, LENGTH = 16, 2, 8, 24
VARIANTS = ["dense", "random", "factorized_dense", "factorized_random", "dense+factorized_random+vanilla"]


def build(variant, causal=False, **options):
    torch.manual_seed(0)
    return et.build_attention("synthesizer", DIM, HEADS, causal, variant=variant, max_seq_len=LENGTH, rank=3,
                              **options).double()


def mlp(seq, x):
    first, _, second = seq
    return second.weight @ torch.relu(first.weight @ x + first.bias) + second.bias


def naive_synthesizer(layer, x, mask, causal):
    """Row by row, straight from the paper's equations; float64; N x N explicit."""
    B, n, _ = x.shape
    if "vanilla" in layer.components:
        qkv = x @ layer.to_qkv.weight.T + layer.to_qkv.bias
        q, k, v = (qkv[..., i * DIM : (i + 1) * DIM].reshape(B, n, HEADS, D) for i in range(3))
    else:
        v = (x @ layer.to_qkv.weight.T + layer.to_qkv.bias).reshape(B, n, HEADS, D)
    out = torch.zeros(B, n, HEADS, D, dtype=x.dtype)
    for b in range(B):
        for i in range(n):
            for h in range(HEADS):
                terms = []
                for c in layer.components:
                    if c == "dense":
                        terms.append(mlp(layer.dense, x[b, i]).view(HEADS, LENGTH)[h, :n])
                    elif c == "factorized_dense":
                        a = mlp(layer.dense_a, x[b, i]).view(HEADS, -1)[h]
                        bb = mlp(layer.dense_b, x[b, i]).view(HEADS, -1)[h]
                        terms.append(torch.stack([a[j % layer.factor_a] * bb[j // layer.factor_a] for j in range(n)]))
                    elif c == "random":
                        terms.append(layer.random_matrix[h, i, :n])
                    elif c == "factorized_random":
                        terms.append(layer.random_right[h, :n] @ layer.random_left[h, i])
                    else:
                        terms.append(k[b, :, h] @ q[b, i, h] / math.sqrt(D))
                logits = terms[0] if len(terms) == 1 else sum(layer.mix[t] * term for t, term in enumerate(terms))
                allowed = torch.ones(n, dtype=torch.bool) if mask is None else mask[b].clone()
                if causal:
                    allowed[i + 1 :] = False
                if allowed.any():
                    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=0)
                    out[b, i, h] = weights @ v[b, :, h]
    return out.reshape(B, n, DIM) @ layer.to_out.weight.T + layer.to_out.bias


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_each_variant_equals_its_naive_definition(variant, causal):
    layer = build(variant, causal)
    if len(layer.components) > 1:
        with torch.no_grad():
            layer.mix.copy_(torch.tensor([0.7, -0.4, 1.3]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 2] = mask[1, 8:] = False
    y = layer(x, mask)
    ref = naive_synthesizer(layer, x, mask, causal)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y)
    params = [x] + [p for p in layer.parameters()]
    for got, expected in zip(torch.autograd.grad((y * w).sum(), params, allow_unused=True),
                             torch.autograd.grad((ref * w).sum(), params, allow_unused=True)):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_mixture_with_all_weight_on_dot_products_is_vanilla_attention(causal):
    layer = build("random+vanilla", causal)
    with torch.no_grad():
        layer.mix.copy_(torch.tensor([0.0, 1.0]))
    vanilla = et.build_attention("vanilla", DIM, HEADS, causal).double()
    vanilla.load_state_dict({n: t for n, t in layer.state_dict().items() if n.startswith(("to_qkv", "to_out"))})
    x = torch.randn(3, 17, DIM, dtype=torch.float64)
    mask = torch.rand(3, 17) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(layer(x, mask), vanilla(x, mask), atol=1e-12, rtol=1e-12)


def test_fixed_random_is_a_saved_buffer_and_trainable_random_a_parameter():
    fixed, trained = build("random", trainable_random=False), build("random")
    assert "random_matrix" in fixed.state_dict() and "random_matrix" not in dict(fixed.named_parameters())
    assert "random_matrix" in dict(trained.named_parameters())
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    trained(x).sum().backward()
    assert trained.random_matrix.grad is not None and trained.random_matrix.grad[:, :9, :9].abs().sum() > 0
    assert trained.projections == "v" and trained.to_qkv.weight.shape == (DIM, DIM), "no dot-product term: no query/key projections"


def test_decoding_cache_holds_values_only_without_a_dot_product_term(decode_in_steps):
    layer = build("factorized_dense", causal=True)
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    stepped, state = decode_in_steps(layer, x, 5)
    torch.testing.assert_close(stepped, layer(x), atol=1e-12, rtol=1e-12)
    assert isinstance(state, KVCache) and state.k.shape == (2, HEADS, 12, 0) and state.v.shape == (2, HEADS, 12, D)


def test_attend_is_refused_and_bad_options_name_what_is_allowed():
    layer = build("dense")
    q = torch.randn(1, HEADS, 4, D)
    with pytest.raises(ValueError, match="synthesizer: attention is not a function of"):
        layer.attend(q, q, q)
    for bad, words in [("dense+dense", "repeats"), ("vanilla", "no synthetic component"), ("linear", "unknown variant"),
                       ("", "non-empty")]:
        with pytest.raises(ValueError, match=f"synthesizer: .*{words}"):
            et.build_attention("synthesizer", DIM, HEADS, variant=bad)
    with pytest.raises(ValueError, match="synthesizer: rank"):
        et.build_attention("synthesizer", DIM, HEADS, variant="factorized_random", rank=0)
    with pytest.raises(ValueError, match="synthesizer: trainable_random must be a bool"):
        et.build_attention("synthesizer", DIM, HEADS, trainable_random=1)
