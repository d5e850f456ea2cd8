"""Reformer: LSH buckets, per-bucket chunks (causal), global sort (bidirectional), rounds, self rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import efficient_transformers as et

DIM, HEADS = 16, 2
D = DIM // HEADS


def build(causal, seed=0, **options):
    torch.manual_seed(seed)
    return et.build_attention("reformer", DIM, HEADS, causal, **options).double()


def qkv(B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, HEADS, N, D, generator=g, dtype=torch.float64) for _ in range(3)]


def naive(layer, q, k, v, mask, once=True):
    """The paper's pattern built element by element: per round the keys in the query's own or previous
    chunk (causal: chunks cut per bucket, rank in bucket // c; bidirectional: global sort by (bucket,
    position), pads last), no self, union over rounds, each key counted once however many rounds
    hold it (the paper's duplicate correction, exp(s_ij - log N_ij) per round); alone -> v_i."""
    B, H, N, _ = q.shape
    kn = F.normalize(k, dim=-1)
    buckets = layer.hash(kn)  # (B, H, R, N)
    c, nb, R = layer.bucket_size, layer.n_buckets, layer.n_hashes
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            count = torch.zeros(N, N, dtype=torch.float64)
            for r in range(R):
                bk = [int(buckets[b, h, r, j]) if mask[b, j] else nb for j in range(N)]
                if layer.causal:
                    rank, seen = [0] * N, {}
                    for j in range(N):
                        rank[j] = seen.get(bk[j], 0)
                        seen[bk[j]] = rank[j] + 1
                    for i in range(N):
                        for j in range(i):
                            if mask[b, j] and bk[j] == bk[i] and rank[i] // c - rank[j] // c in (0, 1):
                                count[i, j] += 1
                else:
                    order = sorted(range(N), key=lambda j: (bk[j], j))
                    chunk = {j: t // c for t, j in enumerate(order)}
                    for i in range(N):
                        for j in range(N):
                            if j != i and mask[b, j] and chunk[i] - chunk[j] in (0, 1):
                                count[i, j] += 1
            s = q[b, h] @ kn[b, h].T / math.sqrt(D)  # (N, N)
            w = torch.where(count > 0, torch.exp(s - s.max()), torch.zeros_like(s))  # each key once (the paper)
            w = w if once else w * count  # (without the correction: a key weighs once per round that holds it)
            for i in range(N):
                if w[i].sum() > 0:
                    out[b, h, i] = (w[i] / w[i].sum()) @ v[b, h]
                else:
                    out[b, h, i] = v[b, h, i]
    return out


def padded_mask(B, N):
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, N - 4:] = False
    mask[1, 2] = False
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_bucket_one_chunk_is_full_shared_qk_attention_with_the_self_rule(causal, n_hashes):
    N = 13
    layer = build(causal, n_buckets=1, bucket_size=16, n_hashes=n_hashes)
    q, _, v = qkv(2, N)
    k = q  # shared QK
    mask = padded_mask(2, N)
    out, _ = layer.attend(q, k, v, mask)
    kn = F.normalize(k, dim=-1)
    s = q @ kn.transpose(-1, -2) / math.sqrt(D)  # (B, H, N, N)
    allowed = mask[:, None, None, :] & ~torch.eye(N, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    ref = p @ v
    alone = ~allowed.any(-1)  # (B, 1|H, N): only itself -> its own value
    ref = torch.where(alone[..., None], v, ref)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)
    if causal:  # the first token has nothing before it: it attends itself
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,c", [(12, 2), (17, 3), (150, 32)])  # 150, 32: several chunks per bucket, causal blocks of 16
def test_rounds_equal_the_naive_union_over_explicit_windows(causal, N, c):
    layer = build(causal, n_buckets=4, bucket_size=c, n_hashes=3)
    q, k, v = qkv(2, N, seed=N)
    mask = padded_mask(2, N)
    out, _ = layer.attend(q, k, v, mask)
    ref = naive(layer, q, k, v, mask)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_duplicate_pairs_count_once_in_values_and_gradients(causal):
    N, c = 14, 2
    layer = build(causal, n_buckets=2, bucket_size=c, n_hashes=4)  # few buckets: many pairs in several rounds
    q, k, v = (x.requires_grad_() for x in qkv(2, N, seed=5))
    mask = padded_mask(2, N)
    out, _ = layer.attend(q, k, v, mask)
    ref = naive(layer, q, k, v, mask)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3)) * real
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # the correction matters here: the multiplicity-weighted union (no correction) differs
    uncorrected = naive(layer, q, k, v, mask, once=False)
    assert (uncorrected - ref)[real].abs().max() > 1e-3


def test_self_is_attended_only_when_nothing_else_is():
    layer = build(False, n_buckets=1, bucket_size=8, n_hashes=1)
    q, k, v = qkv(1, 5)
    mask = torch.tensor([[True, False, False, False, False]])  # token 0 alone
    out, _ = layer.attend(q, k, v, mask)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    q2 = q.clone()
    q2[..., 1, :] = q2[..., 0, :] * 50  # a key along the query's own direction: self would dominate
    out2, _ = layer.attend(q2, q2, v, torch.ones(1, 5, dtype=torch.bool))
    assert not torch.allclose(out2[:, :, 0], v[:, :, 0])  # self is not attended


def test_more_hash_rounds_reduce_the_error_against_full_attention():
    N, errors = 64, {}
    for n_hashes in (1, 8):
        total = 0.0
        for seed in range(4):
            layer = build(False, seed=seed, n_buckets=8, bucket_size=8, n_hashes=n_hashes)
            g = torch.Generator().manual_seed(100 + seed)
            centres = torch.randn(6, D, generator=g, dtype=torch.float64) * 3
            q = (centres[torch.randint(0, 6, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g,
                 dtype=torch.float64)).expand(1, HEADS, N, D).contiguous()
            v = torch.randn(1, HEADS, N, D, generator=g, dtype=torch.float64)
            out, _ = layer.attend(q, q, v)
            s = q @ F.normalize(q, dim=-1).transpose(-1, -2) / math.sqrt(D)
            s = s.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf"))
            total += float((out - torch.softmax(s, -1) @ v).norm() / v.norm())
        errors[n_hashes] = total / 4
    assert errors[8] < 0.7 * errors[1], errors


def test_causal_decoding_state_is_bounded_and_equals_the_forward():
    c, nb, R = 2, 4, 2
    layer = build(True, n_buckets=nb, bucket_size=c, n_hashes=R)
    x = torch.randn(1, 60, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    full = layer(x)
    y, state = layer(x[:, :3], return_state=True)
    outs, sizes = [y], []
    for t in range(3, 60):
        y, state = layer(x[:, t:t + 1], state=state, return_state=True)
        outs.append(y)
        sizes.append(state.k.shape[-2])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-9, rtol=1e-9)
    assert max(sizes) <= HEADS * R * nb * 2 * c  # the union over heads of per-(head) bounds
    assert max(sizes[30:]) <= max(sizes[:30]) + HEADS * R * nb * 2 * c // 2
    # per (item, head): at most n_hashes * n_buckets * 2 * bucket_size tokens are still reachable
    floor = (state.counts // c - 1).clamp(min=0) * c
    needed = (state.ranks >= floor.gather(-1, state.buckets)).any(2)  # (B, H, m)
    assert int(needed.sum(-1).max()) <= R * nb * 2 * c


def test_rotations_are_a_seeded_buffer_independent_of_n():
    layer = build(True, n_buckets=6, bucket_size=4, n_hashes=3, max_seq_len=512)
    assert layer.rotations.shape == (3, D, 3)
    assert "rotations" in dict(layer.named_buffers())
    k = torch.randn(1, HEADS, 40, D, dtype=torch.float64)
    torch.testing.assert_close(layer.hash(k)[..., :10], layer.hash(k[:, :, :10]), atol=0, rtol=0)
    assert build(True, n_buckets=6, bucket_size=4, n_hashes=3).rotations.equal(layer.rotations)
    assert build(False).n_buckets == 64  # max_seq_len 4096 / bucket_size 64


@pytest.mark.parametrize("options,match", [
    ({"bucket_size": 0}, "bucket_size"), ({"n_hashes": 0}, "n_hashes"), ({"n_buckets": 3}, "n_buckets"),
    ({"n_buckets": 0}, "n_buckets"), ({"n_buckets": 2.0}, "n_buckets"), ({"max_seq_len": -1}, "max_seq_len"),
    ({"bucket_size": "64"}, "bucket_size"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=f"reformer.*{match}"):
        et.build_attention("reformer", DIM, HEADS, False, **options)
