"""Transformer-XL: relative-position attention over [memory; segment] against a plainly written dense
reference (outputs and gradients, float64), the shift trick against explicit indexing, memory carried
across calls against one call over the concatenation, the model's memory API, bounded state, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.transformer_xl import XLMemory, set_mem_len
from efficient_transformers.core import KVCache
from efficient_transformers.core.masks import masked_softmax
from efficient_transformers.core.relative_positions import relative_shift, sinusoid_of_distances

DIM, HEADS = 16, 2
D = DIM // HEADS


def build(dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    layer = et.build_attention("transformer_xl", DIM, HEADS, True, **{"mem_len": 5, **options}).to(dtype)
    with torch.no_grad():  # non-zero biases, so the u and v terms are exercised
        layer.content_bias.normal_()
        layer.position_bias.normal_()
    return layer


def stream(batch, n, seed=1):
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_xl_reference(layer, x, memory_hidden=None, key_mask=None, same_length=True):
    """The layer's output written out: q from x, k, v from [memory; x], every score
    A_ij = ((q_i + u) . k_j + (q_i + v) . W_R R(i - j)) / sqrt(d) built pair by pair from the explicit
    distance, causal (i - j >= 0), within mem_len when same_length, padded keys masked."""
    W = layer.to_qkv.weight
    b = layer.to_qkv.bias
    ctx = x if memory_hidden is None else torch.cat([memory_hidden, x], dim=1)  # (B, m + n, dim)
    B, n, m = x.shape[0], x.shape[1], ctx.shape[1] - x.shape[1]
    heads = lambda t: t.view(B, -1, HEADS, D).transpose(1, 2)  # noqa: E731
    q = heads(x @ W[:DIM].T + b[:DIM])  # (B, H, n, d)
    k = heads(ctx @ W[DIM:2 * DIM].T + b[DIM:2 * DIM])  # (B, H, m + n, d)
    v = heads(ctx @ W[2 * DIM:].T + b[2 * DIM:])
    qpos = torch.arange(n)[:, None] + m
    distance = qpos - torch.arange(m + n)[None, :]  # (n, m + n)
    R = sinusoid_of_distances(distance.clamp(min=0).flatten(), DIM, torch.float64).view(n, m + n, DIM)
    r = (R @ layer.to_r.weight.T).view(n, m + n, HEADS, D).permute(2, 0, 1, 3)  # (H, n, m + n, d)
    u, vb = layer.content_bias[None, :, None, :], layer.position_bias[None, :, None, :]
    scores = torch.einsum("bhid,bhjd->bhij", q + u, k) + torch.einsum("bhid,hijd->bhij", q + vb, r)
    allowed = distance >= 0
    if same_length:
        allowed = allowed & (distance <= layer.mem_len)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    weights = masked_softmax(scores / math.sqrt(D), allowed)
    out = (weights @ v).transpose(1, 2).reshape(B, n, DIM)
    return layer.to_out(out)


def test_the_shift_trick_equals_explicit_indexing():
    g = torch.Generator().manual_seed(0)
    for n, K in ((1, 1), (3, 3), (4, 9), (7, 12)):
        x = torch.randn(2, n, K, generator=g)
        shifted = relative_shift(x)
        for i in range(n):
            for j in range(K - n + i + 1):  # the causal part: distance K - n + i - j >= 0
                assert shifted[0, i, j] == x[0, i, j + n - 1 - i] and shifted[1, i, j] == x[1, i, j + n - 1 - i]


@pytest.mark.parametrize("same_length", [True, False])
def test_one_step_with_memory_equals_the_dense_reference_outputs_and_gradients(same_length):
    layer = build(same_length=same_length)
    prefix, x = stream(3, 4, seed=2), stream(3, 9, seed=3).requires_grad_()
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2] = False
    _, memory = layer(prefix, return_state=True)  # a memory of 4 states (mem_len 5)
    y, _ = layer(x, mask, state=memory, return_state=True)
    full_mask = torch.cat([torch.ones(3, 4, dtype=torch.bool), mask], dim=1)
    ref = dense_xl_reference(layer, x, memory.hidden, full_mask, same_length)
    real = mask[..., None].double()
    torch.testing.assert_close(y * real, ref * real, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y) * real
    params = [x, layer.to_qkv.weight, layer.to_qkv.bias, layer.to_r.weight, layer.content_bias, layer.position_bias]
    got = torch.autograd.grad((y * w).sum(), params)
    expected = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    assert got[3].abs().sum() > 0 and got[5].abs().sum() > 0  # W_R and v are trained


@pytest.mark.parametrize("same_length", [True, False])
def test_the_fused_path_equals_the_math_path(same_length):
    fused, math_path = build(same_length=same_length, backend="sdpa"), build(same_length=same_length)
    x = stream(3, 21).requires_grad_()
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[1, 15:] = False
    mask[2, 0] = False  # a row whose only key... is itself padding, with nothing before it
    _, memory = fused(stream(3, 2, seed=5), return_state=True)
    a, _ = fused(x, mask, state=memory, return_state=True)
    b, _ = math_path(x, mask, state=memory, return_state=True)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(a)
    for g1, g2 in zip(torch.autograd.grad((a * w).sum(), [x, *fused.parameters()]),
                      torch.autograd.grad((b * w).sum(), [x, *math_path.parameters()])):
        torch.testing.assert_close(g1, g2, atol=1e-11, rtol=1e-11)


def test_long_calls_are_computed_in_chunks_equal_to_the_reference():
    layer = build(mem_len=3)  # chunks of 64 queries: 150 tokens take three
    x = stream(2, 150)
    torch.testing.assert_close(layer(x), dense_xl_reference(layer, x), atol=1e-12, rtol=1e-12)


def test_the_memory_is_detached():
    layer = build()
    a, b = stream(1, 6).requires_grad_(), stream(1, 4, seed=2)
    _, memory = layer(a, return_state=True)
    y, _ = layer(b, state=memory, return_state=True)
    assert not memory.hidden.requires_grad
    y.sum().backward()
    assert a.grad is None


@pytest.mark.parametrize("cuts", [(7,), (1, 2, 3), (5, 5, 5, 5)])
def test_same_length_carrying_the_memory_equals_one_call_over_the_concatenation(cuts):
    layer = build()
    x = stream(2, 23)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 3:6] = False  # padding inside the stream, later in the memory
    full = layer(x, mask)
    outs, memory, start = [], None, 0
    for size in list(cuts) + [23 - sum(cuts)]:
        y, memory = layer(x[:, start:start + size], mask[:, start:start + size], state=memory, return_state=True)
        outs.append(y)
        start += size
    torch.testing.assert_close(torch.cat(outs, dim=1)[mask], full[mask], atol=1e-12, rtol=1e-12)
    assert memory.hidden.shape == (2, 5, DIM) and memory.length == 23


def test_paper_form_equals_one_call_when_the_memory_holds_the_whole_prefix():
    layer = build(mem_len=8, same_length=False)
    x = stream(2, 14)
    y1, memory = layer(x[:, :8], return_state=True)
    y2, _ = layer(x[:, 8:], state=memory, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), layer(x), atol=1e-12, rtol=1e-12)
    short = build(mem_len=3, same_length=False)  # a shorter memory: the definitions differ, and so do the outputs
    _, memory = short(x[:, :8], return_state=True)
    assert not torch.allclose(short(x[:, 8:], state=memory), short(x)[:, 8:])


def test_attend_carries_a_kv_memory_equal_to_the_forward_path():
    layer = build()
    x = stream(2, 12)
    q, k, v = layer.project_qkv(x)
    out, cache = layer.attend(q[..., :7, :], k[..., :7, :], v[..., :7, :])
    assert isinstance(cache, KVCache) and cache.k.shape == (2, HEADS, 5, D) and cache.length == 7
    out2, cache = layer.attend(q[..., 7:, :], k[..., 7:, :], v[..., 7:, :], state=cache)
    torch.testing.assert_close(layer.output(torch.cat([out, out2], dim=-2)), layer(x), atol=1e-12, rtol=1e-12)


def tiny_lm(mem_len=4, same_length=True, seed=0, depth=2):
    torch.manual_seed(seed)
    return et.TransformerLM(vocab_size=19, dim=DIM, depth=depth, heads=HEADS, attention="transformer_xl",
                            attention_options={"mem_len": mem_len, "same_length": same_length}, max_seq_len=64).double()


def tokens(batch, n, seed=4):
    return torch.randint(0, 19, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_the_model_carries_memories_across_calls_and_adds_no_absolute_positions():
    lm = tiny_lm()
    assert lm.embed.positions is None
    t = tokens(2, 30)
    full = lm(t)
    logits, memory = lm(t[:, :11], return_state=True)
    assert len(memory) == 2 and all(isinstance(m, XLMemory) and m.hidden.shape == (2, 4, DIM) for m in memory)
    rest, memory = lm(t[:, 11:], memory=memory, return_state=True)
    torch.testing.assert_close(torch.cat([logits, rest], dim=1), full, atol=1e-12, rtol=1e-12)


def test_a_stream_longer_than_max_seq_len_is_evaluated_through_the_memory():
    lm = tiny_lm()  # max_seq_len 64
    t = tokens(1, 200)
    memory, outs = None, []
    for start in range(0, 200, 50):
        logits, memory = lm(t[:, start:start + 50], memory=memory, return_state=True)
        outs.append(logits)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        lm(t)
    lm.max_seq_len = 200  # the reference: one call over the whole stream
    torch.testing.assert_close(torch.cat(outs, dim=1), lm(t), atol=1e-11, rtol=1e-11)
    assert memory[0].length == 200


def test_evaluation_with_a_longer_memory_than_training():
    lm = tiny_lm(mem_len=4)
    t = tokens(2, 40)
    trained = lm(t)
    set_mem_len(lm, 12)  # the weights do not depend on mem_len
    longer = tiny_lm(mem_len=12)
    longer.load_state_dict(lm.state_dict())
    evaluated = lm(t)
    torch.testing.assert_close(evaluated, longer(t), atol=0, rtol=0)
    torch.testing.assert_close(evaluated[:, :5], trained[:, :5], atol=1e-12, rtol=1e-12)  # the first 5 see everything either way
    assert not torch.allclose(evaluated[:, 20:], trained[:, 20:])
    logits, memory = lm(t[:, :30], return_state=True)
    assert memory[0].hidden.shape[1] == 12
    with pytest.raises(ValueError, match="transformer_xl: mem_len must be an int >= 0, got -1"):
        set_mem_len(lm, -1)


def test_generate_through_the_memory_equals_greedy_full_forwards(greedy_by_full_forwards):
    lm = tiny_lm(mem_len=3)
    prompt = tokens(2, 9)  # longer than mem_len
    assert torch.equal(lm.generate(prompt, max_new_tokens=8, top_k=1), greedy_by_full_forwards(lm, prompt, 8))
    # continuing a stream: the memory after a text, then a prompt
    text = tokens(2, 20, seed=8)
    _, memory = lm(text, return_state=True)
    continued = lm.generate(prompt, max_new_tokens=6, top_k=1, memory=memory)
    lm.max_seq_len = 64
    reference = greedy_by_full_forwards(lm, torch.cat([text, prompt], dim=1), 6)[:, 20:]
    assert torch.equal(continued, reference)


def test_generate_at_the_default_mem_len_with_a_longer_prompt(greedy_by_full_forwards):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=19, dim=DIM, depth=1, heads=HEADS, attention="transformer_xl",
                          max_seq_len=1024).double()
    assert lm.stack.blocks[0].attn.mem_len == 512
    prompt = tokens(1, 520)
    assert torch.equal(lm.generate(prompt, max_new_tokens=3, top_k=1), greedy_by_full_forwards(lm, prompt, 3))


def test_the_state_is_bounded_per_segment_and_per_token():
    lm = tiny_lm(mem_len=6)
    sizes = []
    memory = None
    with torch.no_grad():
        for start in range(0, 120, 20):
            _, memory = lm(tokens(1, 20, seed=start), memory=memory, return_state=True)
            sizes.append(sum(m.numel() for m in memory))
        for _ in range(10):
            _, memory = lm(tokens(1, 1), memory=memory, return_state=True)
            sizes.append(sum(m.numel() for m in memory))
    assert len(set(sizes)) == 1, sizes


def test_no_score_matrix_larger_than_a_chunk_times_its_span(largest_tensor):
    layer = build(mem_len=16).float()
    for n in (256, 1024):
        with torch.no_grad(), largest_tensor() as mode:
            layer(torch.randn(1, n, DIM))
        # the (N, 3 dim) projection, or one chunk's (H, 64, 64 + 16) scores: never N x N
        assert mode.largest <= max(3 * n * DIM, HEADS * 64 * (64 + 16)), (n, mode.largest)


def test_bad_input_names_the_mechanism_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"transformer_xl: mem_len must be an int >= 0, got -1; allowed"):
        et.build_attention("transformer_xl", DIM, HEADS, True, mem_len=-1)
    with pytest.raises(ValueError, match=r"transformer_xl: same_length must be a bool, got 1"):
        et.build_attention("transformer_xl", DIM, HEADS, True, same_length=1)
    with pytest.raises(ValueError, match=r"transformer_xl: causal=False is not supported"):
        et.build_attention("transformer_xl", DIM, HEADS, False)
    layer = build()
    x = stream(2, 4)
    _, memory = layer(x, return_state=True)
    bad = [
        (XLMemory(memory.hidden[:1], None, 4), r"\(B, m, dim\) = \(2, m <= mem_len = 5, 16\), got \(1, 4, 16\)"),
        (XLMemory(torch.zeros(2, 4, DIM + 1, dtype=torch.float64), None, 4), r"got \(2, 4, 17\)"),
        (XLMemory(torch.zeros(2, 6, DIM, dtype=torch.float64), None, 6), r"m <= mem_len = 5"),
        (XLMemory(memory.hidden, torch.ones(2, 3, dtype=torch.bool), 4), r"key_mask must be a bool tensor of shape \(B, m\) = \(2, 4\)"),
        ("memory", r"must be an XLMemory"),
    ]
    for state, message in bad:
        with pytest.raises(ValueError, match="transformer_xl: .*" + message):
            layer(x, state=state)
    q = torch.randn(2, HEADS, 3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"transformer_xl: attend\(\)'s memory must be a KVCache"):
        layer.attend(q, q, q, state=memory)
    with pytest.raises(ValueError, match=r"transformer_xl: attend\(\)'s memory keys and values must have shape"):
        layer.attend(q, q, q, state=KVCache(q[:, :1], q[:, :1], None, 3))
    lm = tiny_lm()
    with pytest.raises(ValueError, match=r"transformer_xl: memory must be the list of 2 per-layer states.*length 1"):
        lm(tokens(1, 3), memory=[None])


@pytest.mark.parametrize("name", ["transformer_xl", "compressive"])
def test_int8_quantized_models_run_through_the_memory(name):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=19, dim=DIM, depth=2, heads=HEADS, attention=name,
                          attention_options={"mem_len": 4}, max_seq_len=64).eval()
    q = et.quantize(lm)  # every nn.Linear, W_kR included, becomes an int8 Linear
    t = tokens(1, 30)
    with torch.no_grad():
        assert (q(t) - lm(t)).abs().max() < 0.05
    assert q.generate(t[:, :6], max_new_tokens=4, top_k=1).shape == (1, 10)
