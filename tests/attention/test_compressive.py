"""Compressive Transformer: rate 1 with an identity f_c equals Transformer-XL with the longer memory
(outputs and gradients, float64), a plainly written per-query reference at rate 3 (mean pooling, and
most-used with its usage computed query by query), the compression functions against their formulas,
segmentation independence and generation for every f_c, the attention-reconstruction loss (value and
where its gradient goes), bounded state, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.compressive import COMPRESSIONS, CompressiveMemory
from efficient_transformers.core.relative_positions import sinusoid_of_distances

DIM, HEADS = 16, 2
D = DIM // HEADS


def build(seed=0, **options):
    torch.manual_seed(seed)
    layer = et.build_attention("compressive", DIM, HEADS, True,
                               **{"mem_len": 4, "cmem_len": 3, "compression_rate": 2, **options}).double()
    with torch.no_grad():
        layer.content_bias.normal_()
        layer.position_bias.normal_()
    return layer


def stream(batch, n, seed=1):
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_in_calls(layer, x, cuts, mask=None):
    outs, state, start = [], None, 0
    for size in list(cuts) + [x.shape[1] - sum(cuts)]:
        part = None if mask is None else mask[:, start:start + size]
        y, state = layer(x[:, start:start + size], part, state=state, return_state=True)
        outs.append(y)
        start += size
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("same_length", [True, False])
@pytest.mark.parametrize("compression", ["mean", "max", "most_used"])  # each the identity at c = 1
def test_rate_one_identity_compression_equals_transformer_xl_with_the_longer_memory(same_length, compression):
    comp = build(compression_rate=1, compression=compression, same_length=same_length)
    xl = et.build_attention("transformer_xl", DIM, HEADS, True, mem_len=4 + 3, same_length=same_length).double()
    xl.load_state_dict(comp.state_dict())
    x = stream(2, 31).requires_grad_()
    mask = torch.ones(2, 31, dtype=torch.bool)
    mask[1, 5:8] = False
    cuts = (6, 1, 9)
    y_c, state = run_in_calls(comp, x, cuts, mask)
    y_x, _ = run_in_calls(xl, x, cuts, mask)
    real = mask[..., None].double()
    torch.testing.assert_close(y_c * real, y_x * real, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y_c) * real
    for a, b in zip(torch.autograd.grad((y_c * w).sum(), [x, *comp.parameters()]),
                    torch.autograd.grad((y_x * w).sum(), [x, *xl.parameters()])):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    assert state.compressed.shape == (2, 3, DIM) and state.hidden.shape == (2, 4, DIM)


def window_start(p, M, c):
    return max(0, ((p - M) // c) * c)


def scores_of(layer, x, p, states, distances):
    """The Transformer-XL scores (B, H, 1, K) of query p for `states` (B, K, dim) at `distances`, and their values."""
    B = x.shape[0]
    W, b = layer.to_qkv.weight, layer.to_qkv.bias
    heads = lambda t: t.view(B, -1, HEADS, D).transpose(1, 2)  # noqa: E731
    qp = heads(x[:, p:p + 1] @ W[:DIM].T + b[:DIM])  # (B, H, 1, d)
    k, v = heads(states @ W[DIM:2 * DIM].T + b[DIM:2 * DIM]), heads(states @ W[2 * DIM:].T + b[2 * DIM:])  # (B, H, K, d)
    R = sinusoid_of_distances(torch.tensor(distances), DIM, torch.float64) @ layer.to_r.weight.T
    r = R.view(-1, HEADS, D).transpose(0, 1)  # (H, K, d)
    u, vb = layer.content_bias[None, :, None, :], layer.position_bias[None, :, None, :]
    scores = ((qp + u) @ k.transpose(-1, -2) + torch.einsum("bhid,hkd->bhik", qp + vb, r)) / math.sqrt(D)
    return scores, v


def most_used_choice(layer, x):
    """The most-used state of every group, from the definition: the usage of state j is the mean over heads
    and over the queries p with j in their raw window [w(p), p] of its attention weight in the softmax over
    that window only; each group of c keeps its most-used state. -> {group: (B,) chosen positions}."""
    c, M = layer.rate, layer.mem_len
    B, N, _ = x.shape
    total = torch.zeros(B, N, dtype=torch.float64)
    queries = torch.zeros(N)
    with torch.no_grad():
        for p in range(N):
            w = window_start(p, M, c)
            raw = list(range(w, p + 1))
            scores, _ = scores_of(layer, x, p, x[:, raw], [p - j for j in raw])
            weights = torch.softmax(scores, -1)[:, :, 0]  # (B, H, K)
            for i, j in enumerate(raw):
                total[:, j] += weights[:, :, i].sum(1)
                queries[j] += HEADS
    usage = total / queries
    complete = window_start(N, M, c) // c  # groups whose every attending query is in x
    return {g: g * c + usage[:, g * c:(g + 1) * c].argmax(1) for g in range(complete)}


def reference(layer, x, compression="mean"):
    """Per query p, from the definitions: raw keys j in [w(p), p] with w(p) = c floor((p - mem_len)/c)
    (>= 0), the cmem_len groups g < w(p)/c as slots (mean-pooled, or the group's most-used state) at
    concatenation distance p - w(p) + w(p)/c - g, the Transformer-XL score of each key."""
    c, M, S = layer.rate, layer.mem_len, layer.cmem_len
    B, N, _ = x.shape
    chosen = most_used_choice(layer, x) if compression == "most_used" else None
    outs = []
    for p in range(N):
        w = window_start(p, M, c)
        groups = list(range(max(0, w // c - S), w // c))
        if chosen is None:
            slots = [x[:, g * c:(g + 1) * c].mean(1) for g in groups]
        else:
            slots = [x[torch.arange(B), chosen[g]] for g in groups]
        states = torch.stack(slots + [x[:, j] for j in range(w, p + 1)], dim=1)  # (B, G + raw, dim)
        distances = [p - w + w // c - g for g in groups] + [p - j for j in range(w, p + 1)]
        scores, v = scores_of(layer, x, p, states, distances)
        outs.append(torch.softmax(scores, -1) @ v)
    out = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, N, DIM)
    return layer.to_out(out)


@pytest.mark.parametrize("compression", ["mean", "most_used"])
def test_a_long_call_equals_the_per_query_reference_and_decoding(compression):
    layer = build(compression=compression, mem_len=3, cmem_len=4, compression_rate=3)
    x = stream(2, 40).requires_grad_()
    y = layer(x)
    ref = reference(layer, x, compression)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y)
    params = [x, layer.to_qkv.weight, layer.to_r.weight, layer.content_bias, layer.position_bias]
    for a, b in zip(torch.autograd.grad((y * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    stepped, state = run_in_calls(layer, x.detach(), (1,) * 39)
    torch.testing.assert_close(stepped, y.detach(), atol=1e-12, rtol=1e-12)
    assert state.hidden.shape[1] <= 3 + 3 - 1 and state.compressed.shape[1] == 4
    if compression == "most_used":  # the selection is not trivial, and it matters
        offsets = {int(j) % 3 for chosen in most_used_choice(layer, x.detach()).values() for j in chosen}
        assert len(offsets) > 1, offsets
        assert not torch.allclose(y, reference(layer, x, "mean"))
        # the state carries the usage of the raw states it holds: a continuation selects as one call would
        more = stream(2, 12, seed=5)
        y_more, _ = layer(more, state=state, return_state=True)
        joint = torch.cat([x.detach(), more], dim=1)
        torch.testing.assert_close(y_more, reference(layer, joint, compression)[:, 40:], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_is_independent_of_how_the_stream_is_cut(compression):
    layer = build(compression=compression, compression_rate=3, mem_len=4, cmem_len=3)
    x = stream(3, 33, seed=2)
    mask = torch.ones(3, 33, dtype=torch.bool)
    mask[1, 3:9] = False  # padded states: never a query's usage, never chosen, never attended
    mask[2, 20:] = False
    real = mask[..., None].double()
    with torch.no_grad():
        whole, _ = run_in_calls(layer, x, (), mask)
        for cuts in [(1,) * 32, (5, 1, 2, 13), (16,)]:
            parts, state = run_in_calls(layer, x, cuts, mask)
            torch.testing.assert_close(parts * real, whole * real, atol=1e-12, rtol=1e-12)
        alone, _ = run_in_calls(layer, x[:1], (7,), mask[:1])  # an item's output never depends on the others
        torch.testing.assert_close(alone, whole[:1], atol=1e-12, rtol=1e-12)
    assert (state.usage is not None) == (compression == "most_used")


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_generate_through_the_memory_equals_greedy_full_forwards_for_every_compression(compression, greedy_by_full_forwards):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=19, dim=DIM, depth=2, heads=HEADS, attention="compressive", max_seq_len=64,
                          attention_options={"mem_len": 3, "cmem_len": 2, "compression_rate": 2,
                                             "compression": compression}).double()
    prompt = torch.randint(0, 19, (2, 9), generator=torch.Generator().manual_seed(3))  # longer than mem_len
    assert torch.equal(lm.generate(prompt, max_new_tokens=8, top_k=1), greedy_by_full_forwards(lm, prompt, 8))


def test_most_used_trains_the_kept_states_without_a_reconstruction_loss():
    """Non-parametric: nothing for L_ar to train (none reported, in training mode too); within a call the task
    loss reaches each group's kept state through its slot and no other state of the group; across calls
    (here the paper's form, same_length=False) the memory carries the usage, and everything is detached."""
    layer = build(compression="most_used", compression_rate=2, mem_len=4, cmem_len=3).train()
    assert layer.compress_weight is None
    x = stream(2, 12).requires_grad_()
    y = layer(x)
    assert layer.aux_losses == {}
    chosen = most_used_choice(layer, x.detach())
    grad = torch.autograd.grad(y[:, 11].sum(), x)[0]  # query 11: raw window [6, 11], slots of groups 0, 1, 2
    for g in range(3):
        for b in range(2):
            reached = grad[b, 2 * g:2 * g + 2].abs().sum(-1) > 0  # (2,)
            assert reached.tolist() == [j == int(chosen[g][b]) for j in (2 * g, 2 * g + 1)]

    paper = build(compression="most_used", same_length=False, compression_rate=2, mem_len=4, cmem_len=3).train()
    _, state = paper(x, return_state=True)  # the raw window keeps the last 4 states: groups 0..3 compressed
    assert state.compressed.shape == (2, 3, DIM) and state.usage.shape == (2, 4) and paper.aux_losses == {}
    assert not state.compressed.requires_grad and not state.usage.requires_grad
    # every query of the call attended every state before it: usage_queries counts them (positions 8..11)
    torch.testing.assert_close(state.usage_queries, torch.tensor([[4, 3, 2, 1]] * 2))
    y2, state2 = paper(stream(2, 6, seed=3), state=state, return_state=True)
    assert torch.autograd.grad(y2.sum(), x, allow_unused=True)[0] is None
    assert state2.compressed.shape[1] == 3 and state2.usage_queries.shape == (2, 4)


def test_compression_functions_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    groups = torch.randn(2, 5, 4, DIM, generator=g, dtype=torch.float64)  # (B, G, c, dim)
    mask = torch.ones(2, 5, 4, dtype=torch.bool)
    mask[1, 2, 1:] = False
    mask[1, 3] = False  # a group of padding only
    usage = torch.rand(2, 5, 4, generator=g, dtype=torch.float64)
    usage[0, 1] = 0.5  # a tie: the first is kept
    usage[1, 2, 0] = 0.0  # the only real state of its group, the least used
    for name in COMPRESSIONS:
        layer = build(compression=name, compression_rate=4)
        if name == "most_used":
            slots, slot_mask = layer.select_most_used(groups, mask, usage)
            with pytest.raises(ValueError, match="compressive: compression='most_used' selects by the attention"):
                layer.compress(groups, mask)
        else:
            slots, slot_mask = layer.compress(groups, mask)
        assert torch.equal(slot_mask, mask.any(2))
        for bi in range(2):
            for gi in range(5):
                real = groups[bi, gi][mask[bi, gi]]  # (r, dim)
                if real.shape[0] == 0:
                    assert torch.equal(slots[bi, gi], torch.zeros(DIM, dtype=torch.float64))
                    continue
                if name == "max":
                    expected = real.max(0).values
                elif name == "mean":
                    expected = real.mean(0)
                elif name == "most_used":
                    real_usage = usage[bi, gi][mask[bi, gi]]
                    expected = real[int(real_usage.argmax())]
                else:
                    zeroed = groups[bi, gi] * mask[bi, gi, :, None]
                    taps = zeroed if name == "conv" else zeroed[0::2]  # dilated: every second state
                    expected = sum(layer.compress_weight[:, :, t] @ taps[t] for t in range(taps.shape[0])) + layer.compress_bias
                torch.testing.assert_close(slots[bi, gi], expected, atol=1e-12, rtol=1e-12)
    assert build(compression="dilated_conv", compression_rate=5).compress_weight.shape == (DIM, DIM, 3)


def test_the_reconstruction_loss_trains_the_compressor_only():
    layer = build(compression="conv", mem_len=4, cmem_len=3, compression_rate=2, reconstruction_weight=0.5)
    x = stream(2, 12).requires_grad_()
    _, state = layer(x[:, :6].detach(), return_state=True)  # w(6) = 2: one group compressed in the first call
    y, _ = layer(x[:, 6:], state=state, return_state=True)  # positions 6..11: groups [2, 8) leave
    loss = layer.aux_losses["compressive_reconstruction"]
    assert loss.weight == 0.5 and loss.value > 0
    # the value from the definition: content attention of the call's h over the old states vs their slots
    h, old = x[:, 6:].detach(), torch.cat([state.hidden[:, :4], x[:, 6:8].detach()], dim=1)  # positions 2..7
    W, b = layer.to_qkv.weight.detach(), layer.to_qkv.bias.detach()
    heads = lambda t: t.view(2, -1, HEADS, D).transpose(1, 2)  # noqa: E731
    proj = lambda t, i: heads(t @ W[i * DIM:(i + 1) * DIM].T + b[i * DIM:(i + 1) * DIM])  # noqa: E731
    attn = lambda s: torch.softmax(proj(h, 0) @ proj(s, 1).transpose(-1, -2) / math.sqrt(D), -1) @ proj(s, 2)  # noqa: E731
    slots, _ = layer.compress(old.view(2, 3, 2, DIM), None)
    expected = (attn(old) - attn(slots)).square().mean()
    torch.testing.assert_close(loss.value, expected.float(), atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(loss.value, [x, layer.to_qkv.weight, layer.compress_weight], allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2].abs().sum() > 0
    # and the main output does not backpropagate into the compressor
    main = torch.autograd.grad(y.sum(), [layer.compress_weight], allow_unused=True)[0]
    assert main is None or main.abs().sum() == 0
    layer.eval()  # evaluation: nothing to train, nothing reported
    layer(x[:, 6:], state=state)
    assert layer.aux_losses == {}


def test_the_reconstruction_loss_reaches_the_trainer_objective():
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=11, dim=DIM, depth=2, heads=HEADS, attention="compressive",
                          attention_options={"mem_len": 4, "cmem_len": 2, "compression_rate": 2}, max_seq_len=64)
    lm(torch.randint(0, 11, (2, 20)))
    losses = lm.aux_losses()
    assert set(losses) == {"compressive_reconstruction"} and losses["compressive_reconstruction"].value > 0


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_the_state_is_bounded_over_a_stream(compression):
    layer = build(compression=compression)
    sizes, state = [], None
    with torch.no_grad():
        for start in range(0, 90, 15):
            _, state = layer(stream(1, 15, seed=start), state=state, return_state=True)
            sizes.append(state.compressed.numel())
            assert state.hidden.shape[1] <= 4 + 2 - 1
        for t in range(8):
            _, state = layer(stream(1, 1, seed=t), state=state, return_state=True)
            sizes.append(state.compressed.numel())
            assert state.hidden.shape[1] <= 5
    assert len(set(sizes)) == 1


def test_bad_input_names_the_mechanism_the_value_and_what_is_allowed():
    cases = [
        ({"compression_rate": 0}, r"compressive: compression_rate must be an int >= 1 \(states per compressed slot\), got 0; allowed"),
        ({"compression_rate": 1.5}, r"compression_rate must be an int >= 1.*got 1.5"),
        ({"compression": "most"}, r"compressive: unknown compression 'most'; allowed: \['conv', 'dilated_conv', 'max', 'mean', 'most_used'\]"),
        ({"mem_len": -1}, r"compressive: mem_len must be an int >= 0, got -1"),
        ({"cmem_len": -2}, r"compressive: cmem_len must be an int >= 0, got -2"),
        ({"reconstruction_weight": -1.0}, r"compressive: reconstruction_weight must be a number in \[0.0, inf\)"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            et.build_attention("compressive", DIM, HEADS, True, **options)
    layer = build()
    x = stream(2, 9)
    _, state = layer(x, return_state=True)
    bad = [
        (CompressiveMemory(state.hidden[:1], None, state.compressed, None, 9), r"\(B, m, dim\) = \(2, m <= mem_len \+ compression_rate - 1 = 5, 16\)"),
        (CompressiveMemory(state.hidden, None, torch.zeros(2, 4, DIM, dtype=torch.float64), None, 9), r"\(B, s, dim\) = \(2, s <= cmem_len = 3, 16\), got \(2, 4, 16\)"),
        (CompressiveMemory(state.hidden, None, state.compressed, None, 10), r"multiple of compression_rate=2"),
        ("memory", r"must be a CompressiveMemory"),
    ]
    for memory, message in bad:
        with pytest.raises(ValueError, match="compressive: .*" + message):
            layer(x, state=memory)
    with pytest.raises(ValueError, match="compressive: attention is not a function of"):
        layer.attend(*layer.project_qkv(x))
    used = build(compression="most_used")
    _, used_state = used(x, return_state=True)
    m = used_state.hidden.shape[1]
    with pytest.raises(ValueError, match=r"compressive: the memory holds usage statistics \(from compression='most_used'\), "
                                         r"this layer has compression='conv'"):
        layer(x, state=used_state)
    for usage, queries in [(None, None), (used_state.usage[:, 1:], used_state.usage_queries),
                           (used_state.usage, used_state.usage_queries.double())]:
        memory = CompressiveMemory(used_state.hidden, None, used_state.compressed, None, 9, usage, queries)
        with pytest.raises(ValueError, match=rf"compressive: compression='most_used' needs the memory's usage statistics: "
                                             rf"usage \(float\) and usage_queries \(int\) of shape \(B, m\) = \(2, {m}\)"):
            used(x, state=memory)
