"""Linear Transformer: the naive quadratic form, the RNN view (recurrent decoding), reduced precision."""

import pytest
import torch
import torch.nn.functional as F

import efficient_transformers as et
from efficient_transformers.core.kernel_attention import KernelState, reference_kernel_attention

DIM, HEADS = 16, 2


def naive_linear_attention(q, k, v, mask, causal):
    """phi(Q) phi(K)^T with phi = elu + 1, masked, row-normalised, times V: the paper's equation, N x N."""
    return reference_kernel_attention(F.elu(q) + 1, F.elu(k) + 1, v, key_mask=mask, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_layer_equals_the_naive_quadratic_form_outputs_and_gradients(causal):
    torch.manual_seed(0)
    layer = et.build_attention("linear_transformer", DIM, HEADS, causal, chunk_size=4 if causal else None).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 45, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 45, generator=g) > 0.25
    mask[:, 0] = True
    layer.segment_size = 16  # several segments and chunks
    y = layer(x, mask)
    q, k, v = layer.project_qkv(x)
    expected = layer.to_out(layer.merge_heads(naive_linear_attention(q, k, v, mask, causal)))
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(y)
    params = [x] + list(layer.parameters())
    for got, ref in zip(torch.autograd.grad((y * w).sum(), params), torch.autograd.grad((expected * w).sum(), params)):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_recurrent_decoding_carries_a_constant_size_state_and_equals_the_parallel_form():
    torch.manual_seed(0)
    layer = et.build_attention("linear_transformer", DIM, HEADS, causal=True).double()  # default chunk 64
    x = torch.randn(2, 150, DIM, dtype=torch.float64)
    full = layer(x)
    outs, state, sizes = [], None, set()
    for t in range(150):
        y, state = layer(x[:, t : t + 1], state=state, return_state=True)
        outs.append(y)
        sizes.add(tuple(state.kv.shape))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-10, rtol=1e-10)
    assert isinstance(state, KernelState) and state.length == 150
    assert sizes == {(2, HEADS, DIM // HEADS, DIM // HEADS + 1)}, "the RNN state does not grow with N"


def test_generate_greedy_equals_repeated_full_forwards(greedy_by_full_forwards):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=19, dim=DIM, depth=2, heads=HEADS, attention="linear_transformer",
                          max_seq_len=128).double()
    prompt = torch.randint(0, 19, (2, 70), generator=torch.Generator().manual_seed(2))  # prefill spans chunks
    fast = lm.generate(prompt, max_new_tokens=6, top_k=1)
    slow = greedy_by_full_forwards(lm, prompt, 6)
    assert torch.equal(fast, slow)


def test_bad_chunk_size_is_refused():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"linear_transformer: chunk_size must be None.*or a positive int"):
            et.build_attention("linear_transformer", DIM, HEADS, chunk_size=bad)
