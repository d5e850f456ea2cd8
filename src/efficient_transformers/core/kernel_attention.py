"""Kernel attention: the shared engine of the Performer and the Linear Transformer.

With a feature map phi (see `feature_maps`), attention becomes

    out_i = phi(q_i)^T S_i / phi(q_i)^T z_i,    S_i = sum_{j in keys(i)} phi(k_j) v_j^T,  z_i = sum phi(k_j)

where keys(i) is every real key (bidirectional) or the real keys j <= i (causal). Values are carried
with an extra column of ones, V1 = [V, 1], so numerator and normaliser come out of one product
(S and z live in one (m, d + 1) matrix). Padded keys are excluded by zeroing their rows of V1 (and
their stabiliser, below). A query with no key to attend gives zeros, never NaN.

Bidirectional: S = phi(K)^T V1 once, then phi(Q) S. Cost O(N m d) time, O(m d) state.

Causal, in chunks of C tokens (never an N x m x d cumulative sum):

    T_c   = phi(K_c)^T V1_c                                  one batched product over all chunks
    S_c   = sum_{c' < c} T_c'                                (N/C) x m x (d+1) numbers
    out_c = phi(Q_c) S_c + tril(phi(Q_c) phi(K_c)^T) V1_c    quadratic only inside a chunk

Cost O(N C m + N m d). Decoding is the same computation on the new tokens with the carried state
(`KernelState`): constant time and memory per token, independent of the prefix length.

**Stabilisers for exponential feature maps (FAVOR+).** phi = exp(L) can overflow or underflow as a
whole in float32. Any factor that is common to a query's numerator and normaliser cancels, so:

- queries: phi(q_i) is computed as exp(L_i - max_f L_if) (a per-row constant);
- keys: key j is split as exp(L_j - g_j) * exp(g_j), g_j = max_f L_jf its own log-scale. A query
  i needs the keys scaled by one common constant, and only keys it may see may choose that
  constant: we use M_i = max_{j in keys(i)} g_j (the max over all real keys when bidirectional, the
  running max up to i when causal) and weight key j by exp(g_j - M_i) <= 1. Between chunks the
  carried state is stored relative to the running max at the chunk boundary and rescaled by
  exp(R_old - R_new) <= 1, as in an online softmax. A max over all keys would leak the future into
  the past numerically; this one is exactly causal, and every exponent is <= 0.

All stabilisers are detached: the output is exactly invariant to them, so the gradient is exact.
Feature maps, products and normalisers run in float32 (float64 for float64 inputs); outputs are
returned in the input dtype.

**Memory.** With `recompute=True` the sequence is processed in segments of `segment_size` tokens
under activation checkpointing: the backward pass keeps only q, k, v and (m, d+1) states per
segment, and recomputes one segment's features at a time. Peak memory is then linear in N with a
small constant even for many features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .blocking import pad_mask_to_multiple, pad_to_multiple, split_blocks
from .feature_maps import FeatureMap

NEG_INF = float("-inf")


@dataclass
class KernelState:
    """What a causal kernel layer carries between decoding steps: constant size, whatever the length.

    kv:     (B, H, m, d + 1)  sum over the consumed real keys of phi(k_j) exp(g_j - ref) [v_j, 1]^T,
            where phi(k_j) is the stabilised feature exp(L_j - g_j) (or phi itself for direct maps)
    ref:    (B, H)            the running max of the key log-scales g_j; -inf before the first real key
    length: int               tokens consumed so far
    """

    kv: Tensor
    ref: Tensor
    length: int


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: FeatureMap,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    state: KernelState | None = None,
    chunk_size: int = 64,
    segment_size: int = 1024,
    recompute: bool = False,
) -> tuple[Tensor, KernelState | None]:
    """Kernel attention on per-head tensors q, k, v (B, H, N, d) -> (out (B, H, N, d), state).

    `key_mask` (B, N) bool, True = real key. Causal calls return the state after the last token
    (continue from `state` when given); bidirectional calls return None.
    """
    out_dtype = v.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, N, d + 1)
    if key_mask is not None:
        v1 = v1.masked_fill(~key_mask[:, None, :, None], 0.0)  # padded keys contribute nothing
    use_checkpoint = recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if causal:
        out, state = _causal(q, k, v1, key_mask, feature_map, state, chunk_size, segment_size, use_checkpoint)
    else:
        if state is not None:
            raise ValueError("kernel attention: a decoding state was given to a bidirectional call")
        out = _bidirectional(q, k, v1, key_mask, feature_map, segment_size, use_checkpoint)
    return out.to(out_dtype), state


# ----------------------------------------------------------------------------- helpers
def _decay(log_from: Tensor, log_to: Tensor) -> Tensor:
    """exp(log_from - log_to) for log_from <= log_to, with -inf meaning 'nothing yet' (-> 0, not NaN)."""
    return torch.exp(log_from - log_to.nan_to_num(neginf=0.0))


def _normalise(out1: Tensor) -> Tensor:
    """(..., d + 1) numerator and normaliser -> (..., d); a zero normaliser (no key) gives zeros."""
    numerator, normaliser = out1[..., :-1], out1[..., -1:]
    return numerator / torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))


def _query_features(feature_map: FeatureMap, q: Tensor) -> Tensor:
    if not feature_map.exponential:
        return feature_map(q)  # (B, H, n, m)
    logits = feature_map(q)  # (B, H, n, m)
    return torch.exp(logits - logits.detach().amax(dim=-1, keepdim=True))  # per-row constant cancels


def _key_features(feature_map: FeatureMap, k: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Stabilised key features (B, H, n, m), each row's max 1 for exponential maps, and the key
    log-scales g (B, H, n): phi(k_j) = features_j * exp(g_j); g = -inf marks a padded key."""
    if feature_map.exponential:
        logits = feature_map(k)  # (B, H, n, m)
        log_scale = logits.detach().amax(dim=-1)  # (B, H, n)
        features = torch.exp(logits - log_scale[..., None])  # (B, H, n, m), <= 1
    else:
        features = feature_map(k)  # (B, H, n, m)
        log_scale = features.new_zeros(features.shape[:-1])  # (B, H, n)
    if key_mask is not None:
        log_scale = log_scale.masked_fill(~key_mask[:, None, :], NEG_INF)
    return features, log_scale


def _run(fn, *args, use_checkpoint: bool):
    if use_checkpoint:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _segments(n: int, segment_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + segment_size, n)) for s in range(0, n, segment_size)]


def _slice_mask(key_mask: Tensor | None, s: int, e: int) -> Tensor | None:
    return None if key_mask is None else key_mask[:, s:e]


# ----------------------------------------------------------------------------- bidirectional
def _bidirectional(q, k, v1, key_mask, feature_map, segment_size, use_checkpoint) -> Tensor:
    n = q.shape[-2]
    summaries, log_refs = [], []
    for s, e in _segments(n, segment_size):
        summary, log_ref = _run(
            _key_summary, k[..., s:e, :], v1[..., s:e, :], _slice_mask(key_mask, s, e), feature_map,
            use_checkpoint=use_checkpoint,
        )
        summaries.append(summary)  # (B, H, m, d + 1) relative to exp(log_ref)
        log_refs.append(log_ref)  # (B, H)
    log_ref = torch.stack(log_refs).amax(dim=0)  # (B, H): the max over all real keys
    kv = sum(_decay(r, log_ref)[..., None, None] * t for r, t in zip(log_refs, summaries))  # (B, H, m, d+1)
    outs = [
        _run(_query_readout, q[..., s:e, :], kv, feature_map, use_checkpoint=use_checkpoint)
        for s, e in _segments(n, segment_size)
    ]
    return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]  # (B, H, N, d)


def _key_summary(k: Tensor, v1: Tensor, key_mask: Tensor | None, feature_map: FeatureMap) -> tuple[Tensor, Tensor]:
    """sum_j phi(k_j) exp(g_j - r) [v_j, 1]^T over one segment's real keys, with r = max_j g_j."""
    features, log_scale = _key_features(feature_map, k, key_mask)  # (B, H, n, m), (B, H, n)
    log_ref = log_scale.amax(dim=-1)  # (B, H)
    weights = _decay(log_scale, log_ref[..., None])  # (B, H, n), <= 1; 0 for padded keys
    return (features * weights[..., None]).transpose(-1, -2) @ v1, log_ref  # (B, H, m, d + 1)


def _query_readout(q: Tensor, kv: Tensor, feature_map: FeatureMap) -> Tensor:
    return _normalise(_query_features(feature_map, q) @ kv)  # (B, H, n, d)


# ----------------------------------------------------------------------------- causal
def _causal(q, k, v1, key_mask, feature_map, state, chunk_size, segment_size, use_checkpoint):
    B, H, n, _ = q.shape
    if state is None:
        m = feature_map.num_features
        kv = q.new_zeros(B, H, m, v1.shape[-1])  # (B, H, m, d + 1)
        log_ref = q.new_full((B, H), NEG_INF)
        length = 0
    else:
        kv, log_ref, length = state.kv.to(q.dtype), state.ref.to(q.dtype), state.length
    segment_size = max(chunk_size, segment_size // chunk_size * chunk_size)  # chunks never straddle segments
    outs = []
    for s, e in _segments(n, segment_size):
        out, kv, log_ref = _run(
            _causal_segment, q[..., s:e, :], k[..., s:e, :], v1[..., s:e, :], _slice_mask(key_mask, s, e),
            kv, log_ref, feature_map, chunk_size, use_checkpoint=use_checkpoint,
        )
        outs.append(out)
    out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]  # (B, H, N, d)
    return out, KernelState(kv, log_ref, length + n)


def _causal_segment(q, k, v1, key_mask, kv_in, ref_in, feature_map, chunk_size):
    """One segment of the chunked causal scan, continuing from (kv_in, ref_in). See the module doc."""
    B, H, n, _ = q.shape
    size = min(chunk_size, n)
    (q, _), (k, _), (v1, pad) = (pad_to_multiple(t, size) for t in (q, k, v1))  # (B, H, nc*C, .)
    mask = None if key_mask is None and pad == 0 else pad_mask_to_multiple(key_mask, n, size, B, q.device)
    phi_q = _query_features(feature_map, q)  # (B, H, L, m)
    phi_k, log_scale = _key_features(feature_map, k, mask)  # (B, H, L, m), (B, H, L)
    running = torch.maximum(log_scale.cummax(dim=-1).values, ref_in[..., None])  # (B, H, L): M_i

    phi_q, phi_k, v1 = split_blocks(phi_q, size), split_blocks(phi_k, size), split_blocks(v1, size)  # (B,H,nc,C,.)
    log_scale, running = log_scale.unflatten(-1, (-1, size)), running.unflatten(-1, (-1, size))  # (B, H, nc, C)
    chunk_end = running[..., -1]  # (B, H, nc): running max after each chunk
    chunk_start = torch.cat([ref_in[..., None], chunk_end[..., :-1]], dim=-1)  # (B, H, nc): before each chunk

    # each chunk's contribution, relative to its own end: T_c = phi(K_c)^T diag(exp(g - R_end)) V1_c
    key_weights = _decay(log_scale, chunk_end[..., None])  # (B, H, nc, C)
    summaries = (phi_k * key_weights[..., None]).transpose(-1, -2) @ v1  # (B, H, nc, m, d + 1)

    # the state before each chunk (and after the last): S_c = sum_{c' < c} exp(R_end,c' - R_start,c) T_c'
    nc = phi_q.shape[2]
    starts = torch.cat([chunk_start, chunk_end[..., -1:]], dim=-1)  # (B, H, nc + 1)
    earlier = torch.ones(nc + 1, nc, dtype=torch.bool, device=q.device).tril(-1)  # (nc+1, nc): c' < c
    carry = _decay(chunk_end[..., None, :].masked_fill(~earlier, NEG_INF), starts[..., :, None])  # (B,H,nc+1,nc)
    states = (carry @ summaries.flatten(-2)).unflatten(-1, summaries.shape[-2:])  # (B, H, nc + 1, m, d + 1)
    states = states + _decay(ref_in[..., None], starts)[..., None, None] * kv_in[:, :, None]

    # inter-chunk: phi(q_i)^T S_c rescaled from R_start,c to M_i
    inter = (phi_q @ states[:, :, :nc]) * _decay(chunk_start[..., None], running)[..., None]  # (B, H, nc, C, d+1)
    # intra-chunk: tril(phi(Q_c) phi(K_c)^T) with weights exp(g_j - M_i), exponent <= 0 for j <= i
    future = torch.ones(size, size, dtype=torch.bool, device=q.device).triu(1)  # (C, C): j > i
    exponent = (log_scale[..., None, :] - running.nan_to_num(neginf=0.0)[..., :, None]).masked_fill(future, NEG_INF)
    scores = (phi_q @ phi_k.transpose(-1, -2)) * torch.exp(exponent)  # (B, H, nc, C, C)
    out1 = inter + scores @ v1  # (B, H, nc, C, d + 1)

    out = _normalise(out1).flatten(2, 3)[..., :n, :]  # (B, H, n, d)
    return out, states[:, :, nc], chunk_end[..., -1]


# ----------------------------------------------------------------------------- the slow reference
def reference_kernel_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """The naive quadratic form: A = phi(Q) phi(K)^T (B, H, N, N), masked, row-normalised, times V.

    phi_q, phi_k: (B, H, N, m) explicit features (no stabilisers); rows with no key give zeros.
    Only for tests.
    """
    weights = phi_q @ phi_k.transpose(-1, -2)  # (B, H, N, N)
    n = weights.shape[-1]
    if causal:
        weights = weights * torch.ones(n, n, dtype=torch.bool, device=weights.device).tril()
    if key_mask is not None:
        weights = weights * key_mask[:, None, None, :]
    normaliser = weights.sum(-1, keepdim=True)
    return (weights @ v) / torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))
