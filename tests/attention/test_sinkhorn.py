"""Sinkhorn Transformer: the layer against a naive float64 reference written from the paper's steps
(block summaries -> sort network -> Sinkhorn -> sorted blocks -> one softmax over [local; sorted]),
outputs and gradients, with padding, N not a multiple of the block, causal and SortCut; the exact
limits (one block is dense attention, P = identity is local block attention, a causal shift is the
previous block); Sinkhorn's balancing; exact causality of the sort; parameters independent of N;
Gumbel noise in training only; bad options."""

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.sinkhorn import SCORE_BUDGET, sinkhorn
from efficient_transformers.core import reference_attention

DIM, HEADS, D = 16, 2, 8
F64 = torch.float64

from per_head_inputs import padding, qkv  # noqa: E402  (tests/attention/per_head_inputs.py)


def build(causal=False, seed=0, **options):
    torch.manual_seed(seed)
    options = {"block_size": 4, "max_seq_len": 64, **options}
    layer = et.build_attention("sinkhorn", DIM, HEADS, causal, **options).double()
    with torch.no_grad():  # larger sort weights than the init, so the sort is far from uniform
        layer.sort_w1.mul_(3.0), layer.sort_w2.mul_(3.0), layer.sort_b2.normal_()
    return layer






# ----------------------------------------------------------------------------- the naive reference
def naive_sort(layer, keys, real, iterations=None):
    """P (nB, nB) and its support for one item and head, from the paper's steps, in probability space.
    keys: list of nB (b, d) blocks (padding zeroed); real: list of nB (b,) bool."""
    nb = len(keys)
    h = naive_sort.head
    summaries = []
    for i in range(nb):
        used = range(i) if layer.causal else [i]  # causal: the blocks before i only
        tokens = [keys[j][t] for j in used for t in range(len(real[j])) if real[j][t]]
        summaries.append(torch.stack(tokens).mean(0) if tokens else torch.zeros(keys[0].shape[-1], dtype=F64))
    w1, b1, w2, b2 = layer.sort_w1[h], layer.sort_b1[h], layer.sort_w2[h], layer.sort_b2[h]
    R = torch.stack([torch.relu(s @ w1 + b1) @ w2[:, :nb] + b2[:nb] for s in summaries])  # (nB, nB)
    has = [bool(r.any()) for r in real]
    allowed = torch.tensor([[has[i] and has[j] and (j < i or not layer.causal) for j in range(nb)]
                            for i in range(nb)])
    P = torch.exp(R / layer.temperature) * allowed
    safe = lambda num, den: torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)  # noqa: E731
    for _ in range(layer.iterations if iterations is None else iterations):
        P = safe(P, P.sum(1, keepdim=True))  # the rows, then the columns
        P = safe(P, torch.cumsum(P, 0) if layer.causal else P.sum(0, keepdim=True))  # causal: over rows <= i
    if layer.causal:  # a last row step: convex mixtures of earlier blocks
        P = safe(P, P.sum(1, keepdim=True))
    return P, allowed


def naive_attention(layer, q, k, v, mask=None, sort=None):
    """Per query, an explicit softmax over its local block's keys and its sorted block's keys."""
    B, H, n, d = q.shape
    b = layer.block_size
    nb = -(-n // b)
    real_tokens = torch.ones(B, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(B, H, n, d, dtype=F64)
    for bi in range(B):
        for h in range(H):
            def block(x, j):
                rows = [x[bi, h, p] if p < n and real_tokens[bi, p] else torch.zeros(d, dtype=F64)
                        for p in range(j * b, (j + 1) * b)]
                return torch.stack(rows)  # (b, d)
            K = [block(k, j) for j in range(nb)]
            V = [block(v, j) for j in range(nb)]
            real = [torch.tensor([p < n and bool(real_tokens[bi, p]) for p in range(j * b, (j + 1) * b)])
                    for j in range(nb)]
            naive_sort.head = h
            P, allowed = naive_sort(layer, K, real) if sort is None else sort(nb)
            rows = nb if layer.sortcut_blocks is None else min(layer.sortcut_blocks, nb)
            SK = [sum(P[i, j] * K[j] for j in range(nb)) for i in range(rows)]
            SV = [sum(P[i, j] * V[j] for j in range(nb)) for i in range(rows)]
            s_real = [torch.tensor([any(bool(allowed[i, j]) and bool(real[j][t]) for j in range(nb)) for t in range(b)])
                      for i in range(rows)]
            for p in range(n):
                i = p // b
                keys, values = [], []
                if layer.sortcut_blocks is None:
                    for t in range(b):
                        pos = i * b + t
                        if real[i][t] and (not layer.causal or pos <= p):
                            keys.append(K[i][t]), values.append(V[i][t])
                    sorted_blocks = [i]
                else:
                    sorted_blocks = range(rows)
                for r in sorted_blocks:
                    for t in range(b):
                        if s_real[r][t]:
                            keys.append(SK[r][t]), values.append(SV[r][t])
                if not keys:
                    continue
                scores = torch.stack(keys) @ q[bi, h, p] / math.sqrt(d)
                out[bi, h, p] = torch.softmax(scores, 0) @ torch.stack(values)
    return out


CASES = [
    (False, {}), (True, {}), (False, {"sortcut_blocks": 2}), (False, {"sortcut_blocks": 9}),
    (False, {"block_size": 3, "sinkhorn_iterations": 1, "temperature": 0.3}),
    (True, {"block_size": 5, "sinkhorn_iterations": 3, "temperature": 2.0}),
]


@pytest.mark.parametrize("causal,options", CASES)
@pytest.mark.parametrize("n", [1, 7, 13])
def test_attend_equals_the_naive_reference_with_padding(causal, options, n):
    layer = build(causal, **options)
    q, k, v = qkv(3, n)
    mask = padding(3, n)
    out, _ = layer.attend(q, k, v, mask)
    ref = naive_attention(layer, q, k, v, mask)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal,options", [(False, {}), (True, {}), (False, {"sortcut_blocks": 2})])
def test_gradients_equal_the_naive_reference(causal, options):
    layer = build(causal, **options)
    mask = padding(2, 10)
    grads = []
    for fn in (lambda *t: layer.attend(*t, mask)[0], lambda *t: naive_attention(layer, *t, mask)):
        q, k, v = qkv(2, 10)
        layer.zero_grad()
        out = fn(q, k, v)
        (out * mask[:, None, :, None]).square().sum().backward()
        grads.append([q.grad, k.grad, v.grad, layer.sort_w1.grad, layer.sort_w2.grad, layer.sort_b2.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_the_layer_matches_the_reference_at_the_default_block_size():
    layer = build(False, block_size=64, max_seq_len=256)
    q, k, v = qkv(1, 150)
    out, _ = layer.attend(q, k, v)
    torch.testing.assert_close(out, naive_attention(layer, q, k, v), atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- exact limits
@pytest.mark.parametrize("causal,options", [(False, {}), (True, {}), (False, {"sortcut_blocks": 1})])
def test_one_block_is_dense_attention(causal, options):
    layer = build(causal, block_size=16, **options)
    q, k, v = qkv(3, 13)
    mask = padding(3, 13)
    out, _ = layer.attend(q, k, v, mask)
    pattern = torch.ones(13, 13, dtype=torch.bool)
    ref = reference_attention(q, k, v, pattern=pattern.tril() if causal else pattern, key_mask=mask)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


def block_pattern(n, b, offsets, causal):
    """(N, N): key j allowed for query i iff block(j) - block(i) is in offsets (and j <= i when causal),
    straight from the definition."""
    pattern = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            pattern[i, j] = (j // b - i // b) in offsets and (not causal or j <= i)
    return pattern


def fixed_sort(matrix):
    def sort_matrix(k_blocks, real_blocks):
        B, H, nb = k_blocks.shape[:3]
        P = matrix(nb).to(k_blocks.dtype).expand(B, H, nb, nb)
        return P, (P[:, :1] > 0)
    return sort_matrix


def test_identity_sort_is_local_block_attention():
    layer = build(False)
    layer.sort_matrix = fixed_sort(torch.eye)  # the test hook: a hard identity permutation
    q, k, v = qkv(3, 14)
    mask = padding(3, 14)
    out, _ = layer.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, pattern=block_pattern(14, 4, {0}, False), key_mask=mask)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shift", [False, True])
def test_causal_hard_sorts_give_the_block_patterns(shift):
    """Causal: no sorted block (P = 0) is causal local block attention; the hard sort 'block i takes
    block i - 1' is causal attention to the own and the previous block."""
    layer = build(True)
    matrix = (lambda nb: torch.eye(nb).roll(1, 0).tril(-1)) if shift else (lambda nb: torch.zeros(nb, nb))
    layer.sort_matrix = fixed_sort(matrix)
    q, k, v = qkv(3, 15)
    mask = padding(3, 15)
    out, _ = layer.attend(q, k, v, mask)
    pattern = block_pattern(15, 4, {0, -1} if shift else {0}, True)
    ref = reference_attention(q, k, v, pattern=pattern, key_mask=mask)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_rows_and_columns_sum_to_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, 7, generator=g, dtype=F64) * 2
    support = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    P = sinkhorn(logits, support, 200)
    ones = torch.ones(2, 3, 7, dtype=F64)
    torch.testing.assert_close(P.sum(-1), ones, atol=1e-8, rtol=0)
    torch.testing.assert_close(P.sum(-2), ones, atol=1e-8, rtol=0)
    few = sinkhorn(logits, support, 1)  # one iteration: columns exact, rows not yet
    torch.testing.assert_close(few.sum(-2), ones, atol=1e-12, rtol=0)
    assert (few.sum(-1) - 1).abs().max() > 1e-3
    # a low temperature drives it towards a permutation
    hard = sinkhorn(logits / 0.01, support, 200)
    assert hard.max(-1).values.mean() > 0.9 > P.max(-1).values.mean()


def test_sinkhorn_excludes_what_is_not_in_the_support_and_empty_rows_give_zeros():
    logits = torch.randn(5, 5, dtype=F64)
    support = torch.ones(5, 5, dtype=torch.bool)
    support[3], support[:, 3] = False, False  # an all-padding block: neither row nor column
    P = sinkhorn(logits, support, 100)
    assert torch.equal(P[3], torch.zeros(5, dtype=F64)) and torch.equal(P[:, 3], torch.zeros(5, dtype=F64))
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(P[keep][:, keep], sinkhorn(logits[keep][:, keep], torch.ones(4, 4, dtype=torch.bool), 100))


def test_causal_sinkhorn_rows_depend_only_on_earlier_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 6, generator=g, dtype=F64)
    support = torch.ones(6, 6, dtype=torch.bool).tril(-1)
    P = sinkhorn(logits, support, 8, causal=True)
    assert torch.equal(P.triu(), torch.zeros(6, 6, dtype=F64)), "only strictly earlier blocks"
    torch.testing.assert_close(P[1:].sum(-1), torch.ones(5, dtype=F64))  # convex mixtures; row 0 empty
    for i in range(6):
        changed = logits.clone()
        changed[i + 1:] = torch.randn(5 - i, 6, generator=g, dtype=F64) * 10
        assert torch.equal(sinkhorn(changed, support, 8, causal=True)[: i + 1], P[: i + 1])


@pytest.mark.parametrize("options", [{}, {"block_size": 3, "sinkhorn_iterations": 20}])
def test_causal_layer_ignores_the_future_exactly_and_decoding_equals_the_full_forward(options):
    torch.manual_seed(0)
    layer = et.build_attention("sinkhorn", DIM, HEADS, True, max_seq_len=64, **{"block_size": 4, **options})
    x = torch.randn(2, 41, DIM)
    y = layer(x)
    for t in (2, 3, 4, 11, 12, 30):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(2, 40 - t, DIM) * 10
        assert torch.equal(layer(x2)[:, : t + 1], y[:, : t + 1])
    state, steps = None, []
    for start in range(0, 41, 5):
        out, state = layer(x[:, start:start + 5], state=state, return_state=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), y, atol=1e-5, rtol=1e-5)
    assert state.length == 41  # honest: decoding recomputes on the whole history


# ----------------------------------------------------------------------------- parameters and randomness
def test_parameters_are_sized_from_max_seq_len_not_from_the_call():
    layer = et.build_attention("sinkhorn", DIM, HEADS, block_size=4, max_seq_len=50)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes["sort_w1"] == (HEADS, D, D) and shapes["sort_w2"] == (HEADS, D, 13) and shapes["sort_b2"] == (HEADS, 13)
    for n in (1, 5, 50):
        assert torch.isfinite(layer(torch.randn(1, n, DIM))).all()
    assert {name: tuple(p.shape) for name, p in layer.named_parameters()} == shapes


@pytest.mark.parametrize("causal", [False, True])
def test_without_gumbel_noise_training_changes_no_buffer_and_equals_eval(causal):
    # the card says updates_buffers_in_training (true with gumbel_noise=True), so the conformance suite
    # skips this check; at the default (no noise) it must hold
    x = torch.randn(2, 19, DIM)
    layer = et.build_attention("sinkhorn", DIM, HEADS, causal, block_size=4, max_seq_len=64)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.train()
    y_train = layer(x)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer.eval()
    assert torch.equal(y_train, layer(x))
    assert et.card("sinkhorn").updates_buffers_in_training


def test_gumbel_noise_only_in_training_from_the_seeded_draws():
    x = torch.randn(2, 19, DIM)
    a = et.build_attention("sinkhorn", DIM, HEADS, block_size=4, max_seq_len=64, gumbel_noise=True)
    a.eval()
    y_eval = a(x)
    assert torch.equal(y_eval, a(x))
    a.train()
    draws = int(a.draws.draws)
    y1, y2 = a(x), a(x)
    assert not torch.equal(y1, y_eval) and not torch.equal(y1, y2)
    assert int(a.draws.draws) == draws + 2
    b = et.build_attention("sinkhorn", DIM, HEADS, block_size=4, max_seq_len=64, gumbel_noise=True)
    b.load_state_dict(a.state_dict())
    b.train()
    a.train()
    assert torch.equal(a(x), b(x)), "the noise comes from the seeded draws saved with the weights"
    plain = et.build_attention("sinkhorn", DIM, HEADS, block_size=4, max_seq_len=64)
    plain.load_state_dict({k: v for k, v in a.state_dict().items()})
    plain.eval(), a.eval()
    assert torch.equal(plain(x), a(x))


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("causal,options,words", [
    (False, {"block_size": 0}, ["block_size", "0"]),
    (False, {"block_size": 2.0}, ["block_size"]),
    (False, {"sinkhorn_iterations": 0}, ["sinkhorn_iterations", "0", ">= 1"]),
    (False, {"temperature": 0}, ["temperature", "0"]),
    (False, {"temperature": -1.0}, ["temperature", "-1.0"]),
    (False, {"temperature": True}, ["temperature"]),
    (False, {"sortcut_blocks": 0}, ["sortcut_blocks", "0"]),
    (False, {"sortcut_blocks": 17}, ["sortcut_blocks=17", "[1, 16]"]),
    (True, {"sortcut_blocks": 2}, ["sortcut_blocks=2", "causal"]),
    (False, {"gumbel_noise": 1}, ["gumbel_noise", "True or False"]),
    (False, {"max_seq_len": 0}, ["max_seq_len", "0"]),
])
def test_bad_options_raise_value_errors(causal, options, words):
    with pytest.raises(ValueError) as info:
        et.build_attention("sinkhorn", DIM, HEADS, causal, **{"block_size": 4, "max_seq_len": 64, **options})
    message = str(info.value)
    assert message.startswith("sinkhorn:"), message
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------- no N x N tensor
def test_no_tensor_of_n_squared_elements_forward_or_backward():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    n, b = 1024, 32
    for causal in (False, True):
        torch.manual_seed(0)
        layer = et.build_attention("sinkhorn", DIM, HEADS, causal, block_size=b, max_seq_len=n)
        x = torch.randn(1, n, DIM, requires_grad=True)
        mask = torch.ones(1, n, dtype=torch.bool)
        mask[0, -100:] = False
        Largest.largest = 0
        with Largest():
            layer(x, mask).square().sum().backward()
        # the key tables hold 2 N d per head, the kernel's transients are bounded by its score budget
        # (2^18 elements): nothing of the order of N^2 = 1M elements
        assert Largest.largest <= max(SCORE_BUDGET, 4 * n * DIM) < n * n // 3, Largest.largest


@pytest.mark.parametrize("causal", [False, True])
def test_balancing_one_head_at_a_time_equals_all_heads_at_once(causal, monkeypatch):
    from efficient_transformers.attention import sinkhorn as module

    results = []
    for limit in (2**40, 0):  # every call whole, every call split by head
        monkeypatch.setattr(module, "WHOLE_SINKHORN_ELEMENTS", limit)
        layer = build(causal)
        q, k, v = qkv(2, 10)
        out, _ = layer.attend(q, k, v, padding(2, 10))
        out.square().sum().backward()
        results.append([out, q.grad, k.grad, v.grad, layer.sort_w1.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("heads_per_call", [3, 1])
@pytest.mark.parametrize("partial", [False, True])
def test_hand_written_balancing_backward_equals_autograd_of_the_iterations(heads_per_call, partial):
    """The bidirectional layer's `_SinkhornBalance` (iterations without a graph, backward by hand) against
    autograd through `sinkhorn`'s steps: values and gradients, float64, with and without excluded
    rows and columns (padding), whole and one head at a time."""
    from efficient_transformers.attention.sinkhorn import _SinkhornBalance

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, 7, dtype=F64, generator=g, requires_grad=True)
    support = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    if partial:
        support[0, :, 5:, :] = support[0, :, :, 5:] = False  # item 0: blocks 5, 6 are padding
        support[1, :, 2, :] = False  # item 1: an empty row
    P = _SinkhornBalance.apply(logits, support, 5, heads_per_call)
    ref = sinkhorn(logits, support, 5)
    torch.testing.assert_close(P, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn(P.shape, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad((P * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)
