"""Vanilla attention: against torch.nn.MultiheadAttention with the same weights, backends agree, KV cache."""

import pytest
import torch
from torch import nn

import efficient_transformers as et
from efficient_transformers.core import KVCache, dense_attention, reference_attention


def mha_with_same_weights(layer) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(layer.dim, layer.heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.to_qkv.weight)
        mha.in_proj_bias.copy_(layer.to_qkv.bias)
        mha.out_proj.weight.copy_(layer.to_out.weight)
        mha.out_proj.bias.copy_(layer.to_out.bias)
    return mha


@pytest.mark.parametrize("causal", [False, True])
def test_vanilla_equals_torch_multihead_attention(causal):
    torch.manual_seed(0)
    layer = et.build_attention("vanilla", 32, 4, causal).double()
    mha = mha_with_same_weights(layer)
    x = torch.randn(3, 17, 32, dtype=torch.float64)
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 12:] = False
    mask[2, 3:6] = False
    attn_mask = torch.triu(torch.ones(17, 17, dtype=torch.bool), 1) if causal else None  # True = masked (MHA)
    expected, _ = mha(x, x, x, key_padding_mask=~mask, attn_mask=attn_mask, need_weights=False)
    got = layer(x, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("offset", [0, 5])
def test_sdpa_and_math_backends_agree_with_the_reference(causal, offset):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 7 + offset, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 7 + offset, 8, generator=g, dtype=torch.float64, requires_grad=True)
    key_mask = torch.rand(2, 7 + offset, generator=g) > 0.3
    outs = []
    for backend in ("sdpa", "math"):
        out = dense_attention(q, k, v, key_mask=key_mask, causal=causal, query_offset=offset, backend=backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        outs.append((out, grads))
    ref = reference_attention(q, k, v, key_mask=key_mask, causal=causal, query_offset=offset)
    torch.testing.assert_close(outs[0][0], ref)
    torch.testing.assert_close(outs[1][0], ref)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)
    assert torch.isfinite(outs[0][0]).all()


def test_decoding_cache_grows_by_one_key_per_token_and_holds_the_projected_keys():
    torch.manual_seed(0)
    layer = et.build_attention("vanilla", 16, 2, causal=True)
    x = torch.randn(1, 6, 16)
    _, state = layer(x[:, :4], return_state=True)
    assert isinstance(state, KVCache) and state.length == 4 and state.k.shape == (1, 2, 4, 8)
    _, state = layer(x[:, 4:5], state=state, return_state=True)
    assert state.length == 5 and state.k.shape[-2] == 5
    _, k, _ = layer.project_qkv(x[:, :5])
    torch.testing.assert_close(state.k, k)


def test_bidirectional_layer_refuses_a_state():
    layer = et.build_attention("vanilla", 16, 2)
    with pytest.raises(ValueError, match="vanilla.*bidirectional"):
        layer(torch.randn(1, 3, 16), state=KVCache(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), None, 1))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="vanilla.*'flash'.*allowed"):
        et.build_attention("vanilla", 16, 2, backend="flash")
