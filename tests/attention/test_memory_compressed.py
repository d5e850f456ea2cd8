"""Memory-compressed attention: the compressed path against an explicitly convolved dense reference with
the causal window rule built element by element, the dense limits (k = 1 with the identity conv, one
local block), the local pattern from its definition, decoding and its bounded state, bad options."""

import pytest
import torch
import torch.nn.functional as F

import efficient_transformers as et
from efficient_transformers.attention import memory_compressed as mc
from efficient_transformers.core import reference_attention

DIM, HEADS, D = 16, 2, 8


def qkv(batch, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, n, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def holes(batch, n, seed=2):
    """Item 0 all real, item 1 right-padded, item 2 random holes plus a wholly padded window (3..5)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, n - n // 3:] = False
    mask[2] = torch.rand(n, generator=g) > 0.3
    mask[2, 3:6] = False
    mask[2, 0] = True
    return mask


def layer(causal, *, tile=4, randomise=True, **options):
    torch.manual_seed(0)
    out = et.build_attention("memory_compressed", DIM, HEADS, causal, **options).double()
    out._tile = tile  # small tiles: several query runs and key blocks at test sizes
    if randomise and out.mode == "compressed":
        with torch.no_grad():
            for p in (out.compress_k, out.compress_v, out.compress_k_bias, out.compress_v_bias):
                p.normal_(0.0, 0.3)
    return out


def naive_compressed(lay, q, k, v, mask):
    """The definition written out: zero the padding, convolve with F.conv1d (kernel = stride = k, one
    group per head), build the allowed set over [slots; raw keys] element by element, dense attention."""
    B, H, n, d = k.shape
    c = lay.compression
    m = -(-n // c)
    mask = torch.ones(B, n, dtype=torch.bool) if mask is None else mask
    keep = mask[:, None, :, None].to(k.dtype)

    def conv(x, weight, bias):  # x (B, H, n, d); weight (H, c d, d) acting on the window's [t, f] numbers
        x = F.pad(x * keep, (0, 0, 0, m * c - n))  # (B, H, m c, d)
        kernel = weight.reshape(H, c, d, d).permute(0, 3, 2, 1).reshape(H * d, d, c)  # [h e, f, t]
        y = F.conv1d(x.permute(0, 1, 3, 2).reshape(B, H * d, m * c), kernel, bias.reshape(-1), stride=c, groups=H)
        return y.reshape(B, H, d, m).transpose(-1, -2)  # (B, H, m, d)

    slot_k, slot_v = conv(k, lay.compress_k, lay.compress_k_bias), conv(v, lay.compress_v, lay.compress_v_bias)
    padded = F.pad(mask, (0, m * c - n), value=False)
    slot_mask = torch.stack([padded[:, s * c:(s + 1) * c].any(-1) for s in range(m)], dim=1)  # (B, m)
    if not lay.causal:
        return reference_attention(q, slot_k, slot_v, key_mask=slot_mask)
    allowed = torch.zeros(n, m + n, dtype=torch.bool)
    for i in range(n):
        for s in range(m):
            allowed[i, s] = s * c + c - 1 <= i  # the whole window at or before i
        for j in range(n):
            allowed[i, m + j] = c * ((i + 1) // c) <= j <= i  # after the last complete window
    keys, values = torch.cat([slot_k, k], 2), torch.cat([slot_v, v], 2)
    return reference_attention(q, keys, values, pattern=allowed, key_mask=torch.cat([slot_mask, mask], 1))


def compare(out, ref, mask, tensors):
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(ref.shape, generator=g, dtype=ref.dtype) * real
    grads = torch.autograd.grad((out * w).sum(), tensors)
    ref_grads = torch.autograd.grad((ref * w).sum(), tensors)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("c,n", [(3, 37), (2, 16), (4, 30), (3, 2)])
def test_compressed_equals_the_explicit_convolution_reference(causal, c, n):
    lay = layer(causal, compression=c)
    q, k, v = qkv(3, n)
    mask = holes(3, n)
    out, _ = lay.attend(q, k, v, mask)
    ref = naive_compressed(lay, q, k, v, mask)
    params = [lay.compress_k, lay.compress_v, lay.compress_k_bias, lay.compress_v_bias]
    compare(out, ref, mask, [q, k, v, *params])


@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_unpadded_bidirectional_paths_equal_the_reference(backend, monkeypatch):
    """Without padding the slot attention runs in SDPA, or in the block-sparse engine where the library's
    float32 products run on oneDNN (`core.block_sparse.dense_over_compressed_keys`): float32 on either
    backend against the float64 explicit-convolution reference."""
    from efficient_transformers.core import dense, gemm

    monkeypatch.setenv("EFT_MATMUL", backend)
    calls = []
    sdpa = dense.dense_attention
    monkeypatch.setattr(dense, "dense_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    lay = layer(False, compression=3)
    q, k, v = qkv(2, 37)
    lay32 = layer(False, compression=3).float()
    lay32.load_state_dict({name: t.float() for name, t in lay.state_dict().items()})
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, _ = lay32.attend(q32, k32, v32, None)
    assert bool(calls) == (not gemm.prefers_onednn(torch.float32))
    ref = naive_compressed(lay, q, k, v, None)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.autograd.grad((out * w.float()).sum(), (q32, k32, v32))
    for got, want in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("tile", [4, 256])
def test_compression_one_with_the_identity_conv_is_dense_attention(causal, tile):
    lay = layer(causal, tile=tile, randomise=False, compression=1)  # the default init is the identity at k = 1
    with torch.no_grad():
        torch.testing.assert_close(lay.compress_k, torch.eye(D, dtype=torch.float64).expand(HEADS, D, D))
    n = 29
    q, k, v = qkv(3, n)
    mask = holes(3, n)
    out, _ = lay.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, key_mask=mask, causal=causal)
    compare(out, ref, mask, [q, k, v])


def test_mean_pooling_initialisation():
    lay = layer(False, randomise=False, compression=3)
    q, k, v = qkv(1, 9)
    out, _ = lay.attend(q, k, v)
    pooled_k, pooled_v = (x.unflatten(2, (3, 3)).mean(3) for x in (k, v))  # (1, H, 3, d): window means
    torch.testing.assert_close(out, reference_attention(q, pooled_k, pooled_v), atol=1e-6, rtol=1e-6)  # 1/3 in float32


def test_causal_rule_sizes_from_the_definition():
    """Every earlier position is seen exactly once: as its slot when its window is complete, else raw;
    the raw part of a query is (i + 1) mod k <= k - 1 keys."""
    c, n = 3, 14
    for i in range(n):
        slots = [s for s in range(-(-n // c)) if s * c + c - 1 <= i]
        raw = [j for j in range(n) if c * ((i + 1) // c) <= j <= i]
        covered = sorted([p for s in slots for p in range(s * c, s * c + c)] + raw)
        assert covered == list(range(i + 1)) and len(raw) == (i + 1) % c


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_real_outputs_ignore_padded_content_in_partly_padded_windows(causal):
    lay = layer(causal, compression=3)
    q, k, v = qkv(3, 20)
    mask = holes(3, 20)
    out, _ = lay.attend(q, k, v, mask)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~mask[:, None, :, None].expand_as(k2)] = 1e3
    v2[~mask[:, None, :, None].expand_as(v2)] = -1e3
    out2, _ = lay.attend(q, k2, v2, mask)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out2[real], out[real], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- local mode
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_local_dense_mask_is_the_block_diagonal_of_the_paper(causal):
    b, n = 5, 23
    pattern = layer(causal, mode="local", block_size=b).dense_mask(n)
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            expected[i, j] = i // b == j // b and (j <= i or not causal)
    assert torch.equal(pattern, expected)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("b,n", [(5, 23), (4, 16), (8, 3)])
def test_local_equals_dense_attention_on_its_pattern(causal, b, n):
    lay = layer(causal, mode="local", block_size=b)
    q, k, v = qkv(3, n)
    mask = holes(3, n)
    out, _ = lay.attend(q, k, v, mask)
    compare(out, reference_attention(q, k, v, pattern=lay.dense_mask(n), key_mask=mask), mask, [q, k, v])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_one_local_block_is_dense_attention(causal):
    n = 19
    lay = layer(causal, mode="local", block_size=n)
    q, k, v = qkv(3, n)
    mask = holes(3, n)
    out, _ = lay.attend(q, k, v, mask)
    compare(out, reference_attention(q, k, v, key_mask=mask, causal=causal), mask, [q, k, v])


# ----------------------------------------------------------------------------- decoding
def stepped(lay, x, mask, steps):
    """Prefill, then chunks of the given sizes with the carried state; returns outputs and the states."""
    outs, states, start, state = [], [], 0, None
    for size in steps:
        y, state = lay(x[:, start:start + size], mask[:, start:start + size], state=state, return_state=True)
        outs.append(y)
        states.append(state)
        start += size
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("options", [{"compression": 3}, {"compression": 4}, {"mode": "local", "block_size": 5}],
                         ids=["k3", "k4", "local"])
def test_decoding_with_padding_equals_the_full_forward_and_the_state_is_bounded(options, monkeypatch):
    monkeypatch.setattr(mc, "_DECODE_CHUNK", 4)  # a long step runs as several chunks
    lay = layer(True, **options)
    n = 31
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, n, DIM, generator=g, dtype=torch.float64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 7:10] = False
    mask[1, 20] = False
    with torch.no_grad():
        full = lay(x, mask)
        out, states = stepped(lay, x, mask, [5, 1, 1, 11] + [1] * 13)
    real = mask[..., None].expand_as(full)
    torch.testing.assert_close(out[real], full[real], atol=1e-9, rtol=1e-9)
    for state in states:
        if lay.mode == "compressed":
            c = lay.compression
            assert state.recent_k.shape[-2] == state.length % c < c  # the uncompressed part is below k
            assert state.slot_k.shape[-2] == state.length // c  # one slot per complete window
        else:
            assert state.k.shape[-2] == state.length % lay.block_size  # the current block only


def test_decoding_state_stays_bounded_as_n_grows():
    lay = layer(True, compression=3)
    with torch.no_grad():
        _, state = lay(torch.randn(1, 50, DIM, dtype=torch.float64), return_state=True)
        for t in range(12):
            _, state = lay(torch.randn(1, 1, DIM, dtype=torch.float64), state=state, return_state=True)
            assert state.recent_k.shape[-2] <= 2 and state.slot_k.shape[-2] == state.length // 3


def test_alternating_local_and_compressed_layers_decode_exactly(greedy_by_full_forwards):
    """The paper's L-M-L-M-L stack: built by replacing the local layers' attention (see the module doc)."""
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=17, dim=DIM, depth=5, heads=HEADS, attention="memory_compressed",
                          max_seq_len=64)
    for i in (0, 2, 4):
        lm.stack.blocks[i].attn = et.build_attention("memory_compressed", DIM, HEADS, True, mode="local", block_size=4)
    lm = lm.double()
    assert [blk.attn.mode for blk in lm.stack.blocks] == ["local", "compressed", "local", "compressed", "local"]
    prompt = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(lm.generate(prompt, max_new_tokens=8, top_k=1), greedy_by_full_forwards(lm, prompt, 8))


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("options,words", [
    ({"mode": "global"}, ["mode", "'global'", "compressed", "local"]),
    ({"compression": 0}, ["compression", "0", ">= 1"]),
    ({"compression": True}, ["compression", "True"]),
    ({"compression": 2.5}, ["compression", "2.5"]),
    ({"block_size": 0, "mode": "local"}, ["block_size", "0", ">= 1"]),
    ({"mode": "local", "compression": 5}, ["compression=5", "mode='local'", "compression=3"]),
    ({"block_size": 64}, ["block_size=64", "mode='compressed'", "block_size=256"]),
])
def test_bad_options_raise_value_errors(options, words):
    with pytest.raises(ValueError) as info:
        et.build_attention("memory_compressed", DIM, HEADS, **options)
    message = str(info.value)
    assert "memory_compressed" in message
    for word in words:
        assert word in message, message


def test_dense_mask_and_foreign_states_are_refused_in_compressed_mode():
    with pytest.raises(ValueError, match="memory_compressed: dense_mask is defined for mode='local' only"):
        layer(False).dense_mask(8)
    lay = layer(True)
    _, local_state = layer(True, mode="local", block_size=4)(torch.randn(1, 3, DIM, dtype=torch.float64),
                                                             return_state=True)
    with pytest.raises(ValueError, match="memory_compressed: state must be the CompressedKVState"):
        lay(torch.randn(1, 1, DIM, dtype=torch.float64), state=local_state)
    compressed_state = lay(torch.randn(1, 3, DIM, dtype=torch.float64), return_state=True)[1]
    with pytest.raises(ValueError, match="memory_compressed: state must be the PositionedKVCache"):
        layer(True, mode="local", block_size=4)(torch.randn(1, 1, DIM, dtype=torch.float64), state=compressed_state)
