"""Routing Transformer: the routing heads against naive references built in the test from the paper's
rules (balanced top-w clusters, nearest-centroid per-cluster chunks), the local heads against their
band, the EMA update and commitment loss against their formulas, exact causality and decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import efficient_transformers as et

DIM, HEADS = 16, 2
D = DIM // HEADS


def build(causal, **options):
    torch.manual_seed(0)
    return et.build_attention("routing", DIM, HEADS, causal, **options).double()


def qkv(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, n, D, generator=g, dtype=torch.float64) for _ in range(3)]


def padding(batch, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) > 0.3
    mask[:, 0] = True
    mask[0] = True
    return mask


def naive(q, k, v, weight):
    """Dense softmax attention with a per-pair weight (B, H, N, N) >= 0 (0 = not attended); zeros when none."""
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = scores + torch.log(weight)  # log 0 = -inf
    peak = scores.amax(-1, keepdim=True).clamp(min=-1e300)
    p = torch.exp(scores - peak).nan_to_num(0.0)
    total = p.sum(-1, keepdim=True)
    return (p / torch.where(total > 0, total, torch.ones_like(total))) @ v


def normalised(x):
    return F.layer_norm(x, (x.shape[-1],))


def scores(layer, x):
    mu = layer.centroids.double()  # (Hr, K, d)
    return normalised(x) @ mu.transpose(-1, -2) - 0.5 * (mu * mu).sum(-1)[:, None, :]  # (B, Hr, N, K)


# ----------------------------------------------------------------------------- limits
@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_and_a_wide_window_is_dense_attention(causal):
    n = 19
    layer = build(causal, num_clusters=1, window=32, local_heads=0).eval()
    q, k, v = qkv(3, n)
    mask = padding(3, n)
    out, _ = layer.attend(q, k, v, mask)
    keys = q if causal else k  # causal routing heads share Q = K
    weight = mask[:, None, None, :].expand(3, HEADS, n, n).double()
    if causal:
        weight = weight * torch.ones(n, n, dtype=torch.float64).tril()
    ref = naive(q, keys, v, weight)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_local_heads_attend_their_band(causal):
    n, w = 23, 6
    layer = build(causal, window=w, local_heads=HEADS).eval()
    q, k, v = qkv(2, n)
    mask = padding(2, n)
    out, _ = layer.attend(q, k, v, mask)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = ((i - j >= 0) & (i - j < w)) if causal else ((i - j).abs() <= w // 2)
    weight = (band[None, None] & mask[:, None, None, :]).double()
    ref = naive(q, k, v, weight)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- the routing rules
@pytest.mark.parametrize("n", [23, 40])
def test_bidirectional_balanced_clusters_match_a_naive_top_w_per_centroid(n):
    K = 3
    layer = build(False, num_clusters=K, local_heads=0).eval()
    q, k, v = qkv(3, n, seed=2)
    mask = padding(3, n)
    mask[1, n - 7:] = False
    out, _ = layer.attend(q, k, v, mask)
    w = -(-n // K)
    sq, sk = scores(layer, q), scores(layer, k)  # (B, H, N, K)
    weight = torch.zeros(3, HEADS, n, n, dtype=torch.float64)
    for b in range(3):
        real = [t for t in range(n) if mask[b, t]]
        for h in range(HEADS):
            members_q, members_k = [], []
            for c in range(K):  # each centroid: its top w real queries, its top w real keys
                members_q.append(sorted(real, key=lambda t: -float(sq[b, h, t, c]))[:w])
                members_k.append(sorted(real, key=lambda t: -float(sk[b, h, t, c]))[:w])
            for c in range(K):
                for i in members_q[c]:
                    for j in members_k[c]:
                        weight[b, h, i, j] += 1.0  # overlapping clusters: a multiset union
            for i in real:  # a query chosen by no centroid joins its nearest one
                if not any(i in m for m in members_q):
                    c = int(sq[b, h, i].argmax())
                    for j in members_k[c]:
                        weight[b, h, i, j] += 1.0
    assert (weight.sum(-1)[mask[:, None, :].expand(3, HEADS, n)] > 0).all()
    assert (weight > 1).any(), "the test should exercise overlapping clusters"
    ref = naive(q, k, v, weight)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("window,K,n", [(2, 3, 41), (3, 3, 41), (5, 3, 41), (12, 3, 41), (32, 1, 100), (48, 2, 130)])
def test_causal_routing_matches_naive_per_cluster_chunks(window, K, n):
    """(32 and 48: chunks of several blocks of 16.)"""
    layer = build(True, num_clusters=K, window=window, local_heads=0).eval()
    q, k, v = qkv(2, n, seed=3)
    mask = padding(2, n)
    out, _ = layer.attend(q, k, v, mask)
    nearest = scores(layer, q).argmax(-1)  # (B, H, N): shared QK, routed by the query
    weight = torch.zeros(2, HEADS, n, n, dtype=torch.float64)
    for b in range(2):
        for h in range(HEADS):
            rank, seen = {}, [0] * K
            for t in range(n):
                if mask[b, t]:
                    rank[t] = seen[int(nearest[b, h, t])]
                    seen[int(nearest[b, h, t])] += 1
            for i in rank:
                for j in rank:
                    same = nearest[b, h, i] == nearest[b, h, j]
                    if same and j <= i and rank[j] // window >= rank[i] // window - 1:
                        weight[b, h, i, j] = 1.0
    ref = naive(q, q, v, weight)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-12)
    assert (weight.sum(-1) > 2).any() and (weight.sum(-1) < (weight.sum(-1).max())).any()


# ----------------------------------------------------------------------------- centroids and the aux loss
def _ema_expected(layer, vectors, masks):
    mu = layer.centroids.double()
    sums, counts = torch.zeros_like(mu), torch.zeros(mu.shape[:2], dtype=torch.float64)
    for x, mask in zip(vectors, masks):
        xn = normalised(x)
        nearest = scores(layer, x).argmax(-1)
        for b in range(x.shape[0]):
            for h in range(x.shape[1]):
                for t in range(x.shape[2]):
                    if mask[b, t]:
                        sums[h, nearest[b, h, t]] += xn[b, h, t]
                        counts[h, nearest[b, h, t]] += 1
    moved = layer.ema_decay * mu + (1 - layer.ema_decay) * sums / counts.clamp(min=1)[..., None]
    return torch.where(counts[..., None] > 0, moved, mu)


def _commitment_expected(layer, vectors, masks):
    mu = layer.centroids.double()
    total, count = 0.0, 0
    for x, mask in zip(vectors, masks):
        xn, nearest = normalised(x), scores(layer, x).argmax(-1)
        for b in range(x.shape[0]):
            for h in range(x.shape[1]):
                for t in range(x.shape[2]):
                    if mask[b, t]:
                        total += float(((xn[b, h, t] - mu[h, nearest[b, h, t]]) ** 2).sum())
                        count += 1
    return total / count


@pytest.mark.parametrize("causal", [False, True])
def test_ema_update_in_training_equals_the_formula_and_eval_changes_nothing(causal):
    n = 17
    layer = build(causal, num_clusters=3, window=4, local_heads=0, ema_decay=0.9)
    q, k, v = qkv(2, n, seed=4)
    q.requires_grad_()
    mask = padding(2, n)
    start = layer.centroids.clone()
    vectors = [q.detach()] if causal else [q.detach(), k]
    expected = _ema_expected(layer, vectors, [mask] * len(vectors))
    assert not torch.allclose(expected, start)
    layer.attend(q, k, v, mask)  # one training step
    torch.testing.assert_close(layer.next_centroids, expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(layer.centroids, start), "a step routes with the centroids it started with"
    # padding excluded: padded content changes nothing
    q2 = q.detach().clone()
    q2[~mask[:, None, :, None].expand_as(q2)] = 1e3
    layer.centroids.copy_(start)
    layer.next_centroids.copy_(start)
    layer.attend(q2.requires_grad_(), k, v, mask)
    torch.testing.assert_close(layer.next_centroids, expected, atol=1e-12, rtol=1e-12)
    layer.attend(q, k, v, mask)  # the next step applies the move
    torch.testing.assert_close(layer.centroids, expected, atol=1e-12, rtol=1e-12)
    # no update without autograd (an inspection) or in eval
    frozen = {name: b.clone() for name, b in layer.named_buffers()}
    with torch.no_grad():
        layer.attend(q, k, v, mask)
    layer.eval()
    layer.attend(q, k, v, mask)
    assert all(torch.equal(frozen[name], b) for name, b in layer.named_buffers())
    assert {"centroids", "next_centroids"} <= set(layer.state_dict())


@pytest.mark.parametrize("causal", [False, True])
def test_commitment_loss_is_reported_and_equals_the_formula(causal):
    n = 15
    layer = build(causal, num_clusters=3, window=4, local_heads=0, commitment_weight=0.25).eval()
    q, k, v = qkv(2, n, seed=5)
    q.requires_grad_()
    mask = padding(2, n)
    layer.attend(q, k, v, mask)
    loss = layer.aux_losses["routing_commitment"]
    assert loss.weight == 0.25
    vectors = [q.detach()] if causal else [q.detach(), k]
    expected = _commitment_expected(layer, vectors, [mask] * len(vectors))
    assert abs(float(loss.value.detach()) - expected) < 1e-10
    loss.value.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0  # it trains the queries (and keys)
    y = build(causal).double()(torch.randn(1, 5, DIM, dtype=torch.float64))
    assert y.shape == (1, 5, DIM)


# ----------------------------------------------------------------------------- causality and decoding
def test_causal_outputs_ignore_the_future_exactly_with_many_chunks_per_cluster():
    layer = build(True, num_clusters=2, window=3)
    n = 48
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, n, DIM, generator=g, dtype=torch.float64)
    mask = padding(2, n)
    y = layer(x, mask)
    for t in (3, 20, 40):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(2, n - t - 1, DIM, generator=g, dtype=torch.float64) * 10
        m2 = mask.clone()
        m2[:, t + 1:] = torch.rand(2, n - t - 1, generator=g) > 0.5  # future padding changes too
        assert torch.equal(layer(x2, m2)[:, : t + 1], y[:, : t + 1])


def test_decoding_equals_the_full_forward_and_the_state_is_bounded(decode_in_steps):
    K, c = 3, 3
    layer = build(True, num_clusters=K, window=c).eval()
    sizes = []

    def on_step(state):
        sizes.append((tuple(state.ring_k.shape), state.local.k.shape[-2]))
        assert (state.ring_rank >= 0).sum(-1).max() <= 2 * c

    for n in (16, 40):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(2, n, DIM, generator=g, dtype=torch.float64)
        full = layer(x)
        stepped, state = decode_in_steps(layer, x, 5, on_step)
        torch.testing.assert_close(stepped, full, atol=1e-10, rtol=1e-10)
    assert {s[0] for s in sizes} == {(2, HEADS // 2, K, 2 * c, D)}  # K 2c keys per routing head, whatever N
    assert max(s[1] for s in sizes) <= c  # the local heads keep their window
    # padding during decoding, and a multi-token step after a prefill
    x = torch.randn(2, 30, DIM, dtype=torch.float64)
    mask = padding(2, 30)
    full = layer(x, mask)
    y1, state = layer(x[:, :11], mask[:, :11], return_state=True)
    y2, state = layer(x[:, 11:19], mask[:, 11:19], state=state, return_state=True)
    y3, _ = layer(x[:, 19:], mask[:, 19:], state=state, return_state=True)
    got = torch.cat([y1, y2, y3], 1)
    torch.testing.assert_close(got[mask], full[mask], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- options
def test_defaults_follow_the_paper():
    layer = et.build_attention("routing", 256, 4, max_seq_len=4096)
    assert layer.num_clusters == 64 and layer.local_count == 2 and layer.window == 256
    assert tuple(layer.centroids.shape) == (2, 64, 64)
    assert et.card("routing").updates_buffers_in_training and not et.card("routing").fixed_pattern


@pytest.mark.parametrize("option,value,words", [
    ("num_clusters", 0, "num_clusters"), ("num_clusters", True, "num_clusters"), ("window", 0, "window"),
    ("window", 2.5, "window"), ("local_heads", 3, "[0, 2]"), ("local_heads", -1, "local_heads"),
    ("ema_decay", 1.5, "ema_decay"), ("ema_decay", -0.1, "ema_decay"), ("commitment_weight", -1.0, "commitment_weight"),
    ("max_seq_len", 0, "max_seq_len"),
])
def test_bad_options_raise_value_errors(option, value, words):
    with pytest.raises(ValueError) as info:
        et.build_attention("routing", DIM, HEADS, **{option: value})
    message = str(info.value)
    assert "routing" in message and words in message and repr(value) in message


def test_commitment_gradient_is_that_of_the_formula():
    from efficient_transformers.attention.routing import _Commitment

    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    nearest = torch.randint(0, 3, (2, 2, 5), generator=g)
    weight = (torch.rand(2, 2, 5, generator=g) > 0.3).double()
    assert torch.autograd.gradcheck(lambda t: _Commitment.apply(t, mu, nearest, weight), (x,))
