"""The kernel mechanisms as whole layers (projections included) in fp16 / bf16 with large inputs: the
features underflow for all but a few keys and the projections amplify, yet nothing overflows.
(The core's own tests bound the attention output; the conformance suite compares bf16 with float32.)"""

import pytest
import torch

import efficient_transformers as et

DIM, HEADS = 32, 4
KERNEL_LAYERS = {"performer": {"nb_features": 32}, "linear_transformer": {}}


@pytest.mark.parametrize("name", sorted(KERNEL_LAYERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_large_magnitude_inputs_in_reduced_precision_give_finite_outputs_and_gradients(name, dtype, causal):
    torch.manual_seed(0)
    chunks = {"chunk_size": 8} if causal else {}
    layer = et.build_attention(name, DIM, HEADS, causal, **KERNEL_LAYERS[name], **chunks).to(dtype)
    x = (torch.randn(2, 40, DIM) * 200).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(KERNEL_LAYERS))
def test_chunk_size_is_for_causal_layers_and_defaults_to_64(name):
    assert et.card(name).options["chunk_size"] is None
    assert et.build_attention(name, DIM, HEADS, causal=True).chunk_size == 64
    assert et.build_attention(name, DIM, HEADS, causal=True, chunk_size=16).chunk_size == 16
    assert et.build_attention(name, DIM, HEADS, causal=False).chunk_size is None
    with pytest.raises(ValueError, match=rf"{name}: chunk_size=16 was given to a bidirectional layer.*allowed: chunk_size=None"):
        et.build_attention(name, DIM, HEADS, causal=False, chunk_size=16)
