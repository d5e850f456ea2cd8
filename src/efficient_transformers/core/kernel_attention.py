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
whole in float32, L = P + n with P the projection (one value per feature) and n the log-norm (one
per row). Any factor common to a query's numerator and normaliser cancels, so:

- queries: phi(q_i) is computed as exp(P_i - max_f P_if) (+ the map's epsilon): a per-row
  constant, so a query's log-norm is never computed;
- keys: key j is split as [exp(P_j - max_f P_jf) + eps] * exp(g_j), g_j = max_f P_jf + n_j its own
  log-scale. A query i needs the keys scaled by one common constant, and only keys it may see may
  choose that constant: we use M_i = max_{j in keys(i)} g_j (the max over all real keys when
  bidirectional, the running max up to i when causal) and weight key j by exp(g_j - M_i) <= 1,
  applied to its row of V1 (d + 1 numbers) rather than to its m features. Between chunks the
  carried state is stored relative to the running max at the chunk boundary and rescaled by
  exp(R_old - R_new) <= 1, as in an online softmax. A max over all keys would leak the future into
  the past numerically; this one is exactly causal, and every exponent is <= 0.

With the maps' epsilon, each normaliser is at least epsilon times the query's largest feature (the
heaviest visible key has weight 1 and every feature >= epsilon), so 1 / normaliser stays bounded
and the backward pass cannot overflow even when the estimate itself underflows.

All stabilisers are detached: the output is exactly invariant to them, so the gradient is exact
(the epsilon term, which follows each row's largest projection, is differentiated as such).
Feature maps, products and normalisers run in float32 (float64 for float64 inputs); outputs are
returned in the input dtype.

**Memory and time.** Both forms are custom autograd Functions that work through the sequence in
segments of `segment_size` tokens: the forward pass writes each segment's outputs into one
preallocated tensor and keeps nothing but q, k, v and one (m, d + 1) state per segment; the backward
pass recomputes one segment's features at a time (the feature map's own gradient comes from local
autograd on that segment) and applies the hand-derived gradient of the products above. Peak memory
is O(N d + segment_size m) whatever the number of features, every large buffer is allocated once
per call, and no autograd graph is built over the N x m features. Maps no larger than their input
(`FeatureMap.precompute`, the Linear Transformer's elu + 1) are instead evaluated once on the whole
sequence and kept: recomputing them would cost more than the N x d numbers they occupy.

Performance notes (measured with `eft bench`, see the README): the stabiliser's epsilon term is
differentiated through the index of each row's maximum (a scatter), not a dense mask; the causal
carry between chunks is an in-place recurrence (a prefix sum for direct maps), and so is its
adjoint; outputs and input gradients are written heads-last, so that the layer's head merge and the
projection's backward pass read them without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blocking import pad_mask_to_multiple, pad_to_multiple, split_blocks
from .feature_maps import FeatureMap, Identity
from .heads import heads_last

NEG_INF = float("-inf")


@dataclass
class KernelState:
    """What a causal kernel layer carries between decoding steps: constant size, whatever the length.

    kv:     (B, H, m, d + 1)  sum over the consumed real keys of phi(k_j) exp(-ref) [v_j, 1]^T
    ref:    (B, H)            the running max of the key log-scales g_j (exponential maps; -inf before
                              the first real key; direct maps need no stabiliser and leave it as given)
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
) -> tuple[Tensor, KernelState | None]:
    """Kernel attention on per-head tensors q, k, v (B, H, N, d) -> (out (B, H, N, d), state).

    `key_mask` (B, N) bool, True = real key. Causal calls return the state after the last token
    (continuing from `state` when given); bidirectional calls return None.
    """
    if state is not None and not causal:
        raise ValueError("kernel attention: a decoding state was given to a bidirectional call")
    out_dtype = v.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if feature_map.precompute:  # phi once, kept for the backward pass by the map itself
        # contiguous first: elementwise maps on the layer's strided q/k views are several times slower
        q, k = (feature_map(t.to(compute).contiguous()) for t in (q, k))  # (B, H, N, m) features
        feature_map = Identity(feature_map.num_features)
    q, k, v = (t.to(compute).contiguous() for t in (q, k, v))  # segments and chunks are then plain views
    if not causal:
        out = _BidirectionalKernelAttention.apply(q, k, v, key_mask, feature_map, segment_size)
        return out.to(out_dtype), None
    B, H, n, d = v.shape
    if state is None:
        kv_in = q.new_zeros(B, H, feature_map.num_features, d + 1)  # (B, H, m, d + 1)
        ref_in, length = q.new_full((B, H), NEG_INF), 0
    else:
        kv_in, ref_in, length = state.kv.to(compute), state.ref.to(compute), state.length
    segment_size = max(chunk_size, segment_size // chunk_size * chunk_size)  # chunks never straddle segments
    out, kv, ref = _CausalKernelAttention.apply(q, k, v, key_mask, kv_in, ref_in, feature_map, chunk_size, segment_size)
    return out.to(out_dtype), KernelState(kv, ref, length + n)


# ----------------------------------------------------------------------------- shared pieces
def _decay(log_from: Tensor, log_to: Tensor) -> Tensor:
    """exp(log_from - log_to) for log_from <= log_to, with -inf meaning 'nothing yet' (-> 0, not NaN)."""
    return torch.exp(log_from - log_to.nan_to_num(neginf=0.0))


def _spans(n: int, segment_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + segment_size, n)) for s in range(0, n, segment_size)]


def _segment_mask(key_mask: Tensor | None, s: int, e: int) -> Tensor | None:
    return None if key_mask is None else key_mask[:, s:e]


def _values_with_ones(v: Tensor, weights: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """[v w, w] (B, H, n, d + 1): the values and the ones column of the normaliser, each key's row scaled
    by its weight w (B, H, n) (1 when None); padded rows zero, whatever their content."""
    B, H, n, d = v.shape
    v1 = v.new_empty(B, H, n, d + 1)
    if weights is None:
        v1[..., :d] = v
        v1[..., d] = 1.0
    else:
        torch.mul(v, weights[..., None], out=v1[..., :d])
        v1[..., d] = weights
    return v1 if mask is None else v1.masked_fill_(~mask[:, None, :, None], 0.0)


def _normalise(out1: Tensor, out: Tensor, normaliser: Tensor) -> None:
    """(..., d + 1) numerator and normaliser -> `out` (..., d) and `normaliser` (...), written in place;
    a zero normaliser (no key) gives zeros."""
    normaliser.copy_(out1[..., -1])
    safe = torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))
    torch.div(out1[..., :-1], safe[..., None], out=out)


def _normalise_backward(out: Tensor, normaliser: Tensor, grad_out: Tensor) -> Tensor:
    """The gradient of `_normalise` with respect to its input (..., d + 1), from its outputs."""
    has_keys = normaliser > 0  # (...)
    safe = torch.where(has_keys, normaliser, torch.ones_like(normaliser))[..., None]
    grad_out1 = out.new_empty(out.shape[:-1] + (out.shape[-1] + 1,))
    torch.div(grad_out, safe, out=grad_out1[..., :-1])
    grad_out1[..., -1] = (-(grad_out1[..., :-1] * out).sum(-1)).masked_fill_(~has_keys, 0.0)
    return grad_out1


@dataclass
class _Features:
    """Features of one segment's queries or keys, and what their backward pass needs.

    phi:       (B, H, n, m) stabilised features: phi(x) up to a per-row factor (exp(log_scale) for keys)
    log_scale: (B, H, n) keys only: the log of that factor (-inf for padded keys); None for queries
    peak:      (B, H, n) int64, exponential maps in the backward pass: the index of each row's largest projection
    raw, norm, leaf: the map's outputs with their graph back to `leaf` (backward pass only)
    """

    phi: Tensor
    log_scale: Tensor | None
    peak: Tensor | None = None
    raw: Tensor | None = None
    norm: Tensor | None = None
    leaf: Tensor | None = None


def _evaluate(feature_map: FeatureMap, x: Tensor, graph: bool, *, with_norm: bool):
    """The map's raw output (projection for exponential maps, phi itself otherwise), its log-norm
    when asked (exponential keys), and the leaf they hang from when `graph` (backward pass)."""
    if feature_map.identity:
        return x, None, x
    leaf = x.detach().requires_grad_() if graph else x
    with torch.set_grad_enabled(graph):
        if not feature_map.exponential:
            return feature_map(leaf), None, leaf
        norm = feature_map.log_norm(leaf) if with_norm else None  # (B, H, n)
        return feature_map.projection(leaf), norm, leaf  # (B, H, n, m)


def _stabilised(feature_map: FeatureMap, projection: Tensor, graph: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """exp(P - max_f P) + eps (B, H, n, m), each row's max and (for the backward pass) where it is:
    phi(x) / exp(max + log_norm). Overwrites `projection` (a detached buffer nobody reads again)."""
    if graph:
        row_max, peak = projection.max(dim=-1)  # (B, H, n) each: the max and where it is
    else:
        row_max, peak = projection.amax(dim=-1), None  # (B, H, n)
    phi = projection.sub_(row_max[..., None]).exp_().add_(feature_map.epsilon)  # (B, H, n, m), in (0, 1 + eps]
    return phi, row_max, peak


def _query_features(feature_map: FeatureMap, x: Tensor, graph: bool) -> _Features:
    """phi(q) up to a per-row constant, which cancels in the normalised output (a query's log-norm is
    never computed)."""
    raw, _, leaf = _evaluate(feature_map, x, graph, with_norm=False)
    if not feature_map.exponential:
        return _Features(raw.detach(), None, None, raw, None, leaf)
    phi, _, peak = _stabilised(feature_map, raw.detach(), graph)
    return _Features(phi, None, peak, raw, None, leaf)


def _key_features(feature_map: FeatureMap, x: Tensor, mask: Tensor | None, graph: bool) -> _Features:
    """Key features phi(k) exp(-g) and log-scales g (so phi = features e^g): for exponential maps
    g = max_f P + log_norm and the features are <= 1 + eps; for direct maps g = 0. Padded keys get
    g = -inf (weight 0)."""
    raw, norm, leaf = _evaluate(feature_map, x, graph, with_norm=True)
    if feature_map.exponential:
        phi, row_max, peak = _stabilised(feature_map, raw.detach(), graph)
        log_scale = row_max + norm.detach()  # (B, H, n)
    else:
        phi, peak = raw.detach(), None
        log_scale = phi.new_zeros(phi.shape[:-1])  # (B, H, n)
    if mask is not None:
        log_scale = log_scale.masked_fill(~mask[:, None, :], NEG_INF)
    return _Features(phi, log_scale, peak, raw, norm, leaf)


def _features_backward(feature_map: FeatureMap, features: _Features, grad_phi: Tensor) -> Tensor:
    """d loss / d x from d loss / d phi (the per-row factors that the caller applied held fixed).

    Exponential maps: phi_f = exp(P_f - M) + eps with M = max_f P, scaled by exp(M + log_norm). The
    exp term gives grad_phi (phi - eps); the eps term follows M, i.e. the row's largest projection;
    the key log-norm multiplies the whole row, so it gets sum_f grad_phi phi. (Queries have no
    log-norm: it cancels.)"""
    if feature_map.identity:
        return grad_phi
    if not feature_map.exponential:
        return torch.autograd.grad(features.raw, features.leaf, grad_phi)[0]
    eps = feature_map.epsilon
    grad_eps = grad_phi.sum(-1, keepdim=True) * eps  # (B, H, n, 1): through each row's eps term
    grad_raw = grad_phi.mul_(features.phi.sub_(eps))  # (B, H, n, m), in place: phi is not needed after this
    grad_norm = None if features.norm is None else grad_raw.sum(-1) + grad_eps[..., 0]  # sum_f grad_phi phi
    grad_raw.scatter_add_(-1, features.peak[..., None], grad_eps)  # the eps term follows the row's max
    if grad_norm is None:
        return torch.autograd.grad(features.raw, features.leaf, grad_raw)[0]
    return torch.autograd.grad((features.raw, features.norm), features.leaf, (grad_raw, grad_norm))[0]


# ----------------------------------------------------------------------------- bidirectional
class _BidirectionalKernelAttention(torch.autograd.Function):
    """out = normalise(phi(Q) S), S = sum_j phi(k_j) [v_j, 1]^T, segment by segment (see module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, feature_map, segment_size):
        B, H, n, d = v.shape
        spans = _spans(n, segment_size)
        kv = q.new_zeros(B, H, feature_map.num_features, d + 1)  # (B, H, m, d + 1) relative to exp(log_ref)
        log_ref = q.new_full((B, H), NEG_INF)
        for s, e in spans:
            mask = _segment_mask(key_mask, s, e)
            keys = _key_features(feature_map, k[..., s:e, :], mask, graph=False)
            segment_ref = keys.log_scale.amax(dim=-1)  # (B, H)
            values = _values_with_ones(v[..., s:e, :], _decay(keys.log_scale, segment_ref[..., None]), mask)
            summary = keys.phi.transpose(-1, -2) @ values  # (B, H, m, d + 1)
            new_ref = torch.maximum(log_ref, segment_ref)  # (B, H)
            kv = kv * _decay(log_ref, new_ref)[..., None, None] + summary * _decay(segment_ref, new_ref)[..., None, None]
            log_ref = new_ref
        out, normaliser = heads_last(v, n), v.new_empty(B, H, n)
        for s, e in spans:
            out1 = _query_features(feature_map, q[..., s:e, :], graph=False).phi @ kv  # (B, H, n_s, d + 1)
            _normalise(out1, out[..., s:e, :], normaliser[..., s:e])
        ctx.save_for_backward(q, k, v, key_mask, kv, log_ref, out, normaliser)
        ctx.feature_map, ctx.segment_size = feature_map, segment_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, key_mask, kv, log_ref, out, normaliser = ctx.saved_tensors
        feature_map = ctx.feature_map
        spans = _spans(q.shape[-2], ctx.segment_size)
        grad_q, grad_k, grad_v = heads_last(q), heads_last(k), heads_last(v)  # see `core.heads`
        grad_kv = torch.zeros_like(kv)  # (B, H, m, d + 1)
        for s, e in spans:
            queries = _query_features(feature_map, q[..., s:e, :], graph=True)
            grad_out1 = _normalise_backward(out[..., s:e, :], normaliser[..., s:e], grad_out[..., s:e, :])  # (B,H,n_s,d+1)
            grad_kv += queries.phi.transpose(-1, -2) @ grad_out1
            grad_q[..., s:e, :] = _features_backward(feature_map, queries, grad_out1 @ kv.transpose(-1, -2))
        for s, e in spans:
            mask = _segment_mask(key_mask, s, e)
            keys = _key_features(feature_map, k[..., s:e, :], mask, graph=True)
            weights = _decay(keys.log_scale, log_ref[..., None])  # (B, H, n_s): relative to the max over all keys
            values = _values_with_ones(v[..., s:e, :], weights, mask)  # (B, H, n_s, d + 1)
            grad_v[..., s:e, :] = (keys.phi @ grad_kv)[..., :-1] * weights[..., None]
            grad_k[..., s:e, :] = _features_backward(feature_map, keys, values @ grad_kv.transpose(-1, -2))
        return grad_q, grad_k, grad_v, None, None, None


# ----------------------------------------------------------------------------- causal
class _CausalKernelAttention(torch.autograd.Function):
    """The chunked causal scan, segment by segment, continuing from (kv_in, ref_in) (see module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, kv_in, ref_in, feature_map, chunk_size, segment_size):
        B, H, n, d = v.shape
        spans = _spans(n, segment_size)
        out, normaliser = heads_last(v, n), v.new_empty(B, H, n)
        entry_kv = kv_in.new_empty((len(spans),) + kv_in.shape)  # the state entering each segment
        entry_ref = ref_in.new_empty((len(spans),) + ref_in.shape)
        kv, ref = kv_in, ref_in
        for i, (s, e) in enumerate(spans):
            entry_kv[i], entry_ref[i] = kv, ref
            kv, ref = _causal_segment(
                q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], _segment_mask(key_mask, s, e), kv, ref,
                feature_map, chunk_size, out=out[..., s:e, :], normaliser=normaliser[..., s:e],
            )
        ctx.save_for_backward(q, k, v, key_mask, entry_kv, entry_ref, out, normaliser)
        ctx.feature_map, ctx.chunk_size, ctx.segment_size = feature_map, chunk_size, segment_size
        ctx.mark_non_differentiable(ref)
        return out, kv, ref

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_kv_out, _grad_ref):
        q, k, v, key_mask, entry_kv, entry_ref, out, normaliser = ctx.saved_tensors
        spans = _spans(q.shape[-2], ctx.segment_size)
        grad_q, grad_k, grad_v = heads_last(q), heads_last(k), heads_last(v)  # see `core.heads`
        grad_kv = torch.zeros_like(entry_kv[0]) if grad_kv_out is None else grad_kv_out
        for i, (s, e) in reversed(list(enumerate(spans))):
            grad_q[..., s:e, :], grad_k[..., s:e, :], grad_v[..., s:e, :], grad_kv = _causal_segment(
                q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], _segment_mask(key_mask, s, e), entry_kv[i],
                entry_ref[i], ctx.feature_map, ctx.chunk_size, out=out[..., s:e, :], normaliser=normaliser[..., s:e],
                grad_out=grad_out[..., s:e, :], grad_kv_out=grad_kv,
            )
        grad_kv_in = grad_kv if ctx.needs_input_grad[4] else None
        return grad_q, grad_k, grad_v, None, grad_kv_in, None, None, None, None


@dataclass
class _ScanWeights:
    """The stabiliser factors of one segment's causal scan (exponential maps; see the module doc).

    All are <= 1 and causal: key_weights exp(g_j - R_end,c) (B, H, nc, C); decay exp(R_start,c -
    R_end,c) (B, H, nc), the rescaling of the carried state across chunk c; row_scale exp(R_start,c -
    M_i) (B, H, nc, C); within exp(g_j - M_i) for j <= i in a chunk (B, H, nc, C, C); ref_out (B, H).
    R_start,c is the running max before chunk c (R_start,0 = R_in), R_end,c = R_start,c+1 after it.
    """

    key_weights: Tensor
    decay: Tensor
    row_scale: Tensor
    within: Tensor
    ref_out: Tensor


def _scan_weights(log_scale: Tensor, ref_in: Tensor, size: int) -> _ScanWeights:
    """From the key log-scales g (B, H, L) of one segment and the incoming reference R_in (B, H)."""
    running = torch.maximum(log_scale.cummax(dim=-1).values, ref_in[..., None])  # (B, H, L): M_i
    log_scale, running = log_scale.unflatten(-1, (-1, size)), running.unflatten(-1, (-1, size))  # (B, H, nc, C)
    chunk_end = running[..., -1]  # (B, H, nc): running max after each chunk
    chunk_start = torch.cat([ref_in[..., None], chunk_end[..., :-1]], dim=-1)  # (B, H, nc): before each chunk
    future = torch.ones(size, size, dtype=torch.bool, device=log_scale.device).triu(1)  # (C, C): j > i
    exponent = log_scale[..., None, :] - running.nan_to_num(neginf=0.0)[..., :, None]  # (B, H, nc, C, C)
    return _ScanWeights(
        key_weights=_decay(log_scale, chunk_end[..., None]),
        decay=_decay(chunk_start, chunk_end),
        row_scale=_decay(chunk_start[..., None], running),
        within=torch.exp(exponent.masked_fill_(future, NEG_INF)),
        ref_out=chunk_end[..., -1],
    )


def _carry_states(summaries: Tensor, kv_in: Tensor, w: _ScanWeights | None) -> tuple[Tensor, Tensor]:
    """The state entering each chunk (B, H, nc, m, d + 1) and leaving the segment (B, H, m, d + 1).

    The recurrence S_{c+1} = S_c decay_c + T_c, run chunk by chunk in place: direct maps have decay 1
    (exclusive prefix sums); exponential maps rescale by exp(R_start,c - R_end,c) <= 1, each T_c being
    relative to R_end,c, so nothing overflows (a rescaled prefix sum is not a cumsum)."""
    nc = summaries.shape[2]
    states = torch.empty_like(summaries)  # (B, H, nc, m, d + 1)
    states[:, :, 0] = kv_in  # relative to R_start,0 = R_in
    for c in range(nc):  # S_{c+1}, relative to R_end,c; the last one is the segment's output state
        target = states[:, :, c + 1] if c + 1 < nc else None
        if w is None:
            target = torch.add(summaries[:, :, c], states[:, :, c], out=target)
        else:
            target = torch.addcmul(summaries[:, :, c], states[:, :, c], w.decay[:, :, c, None, None], out=target)
    return states, target


def _carry_states_backward(grad_states: Tensor, grad_kv_out: Tensor, w: _ScanWeights | None) -> tuple[Tensor, Tensor]:
    """The gradients of `_carry_states` with respect to the chunk summaries and the incoming state.

    The adjoint recurrence, run backwards chunk by chunk: d loss / d S_c = grad_states_c + decay_c
    d loss / d S_{c+1}, and T_c's gradient is S_{c+1}'s. Each step adds a true suffix sum, so the
    result rounds relative to the suffix (a total minus a prefix sum would round relative to the total)."""
    nc = grad_states.shape[2]
    grad_summaries = torch.empty_like(grad_states)  # (B, H, nc, m, d + 1)
    grad_summaries[:, :, -1] = grad_kv_out
    for c in range(nc - 1, -1, -1):  # d loss / d S_c; the last one is the incoming state's
        target = grad_summaries[:, :, c - 1] if c > 0 else None
        if w is None:
            target = torch.add(grad_states[:, :, c], grad_summaries[:, :, c], out=target)
        else:
            target = torch.addcmul(grad_states[:, :, c], grad_summaries[:, :, c], w.decay[:, :, c, None, None], out=target)
    return grad_summaries, target


def _scaled(x: Tensor, factor: Tensor | None) -> Tensor:
    return x if factor is None else x * factor[..., None]


def _within_chunks(scores: Tensor, w: _ScanWeights | None) -> Tensor:
    """Restrict (B, H, nc, C, C) query-key products to j <= i, with the stabiliser weights if any."""
    return scores.tril_() if w is None else scores.mul_(w.within)


def _causal_segment(q, k, v, mask, kv_in, ref_in, feature_map, chunk_size, *, out, normaliser, grad_out=None,
                    grad_kv_out=None):
    """One segment of the chunked causal scan. Forward: writes `out` (B, H, n, d) and `normaliser`
    (B, H, n), returns (kv_out, ref_out). Given the gradients of its outputs (and the outputs):
    -> (grad_q, grad_k, grad_v, grad_kv_in), recomputing the forward pieces it needs.

    Direct maps need no stabiliser (padded keys are zero rows of V1), so their scan is plain:
    unit weights, prefix sums between chunks, the causal triangle inside them."""
    B, H, n, d = v.shape
    size = min(chunk_size, n)
    if feature_map.identity:  # q, k are the features: contiguous chunks fold into one batch dimension
        q, k = q.contiguous(), k.contiguous()  # without a copy per product
    (q, _), (k, _), (v, pad) = (pad_to_multiple(t, size) for t in (q, k, v))  # (B, H, L = nc * C, .)
    mask = None if mask is None and pad == 0 else pad_mask_to_multiple(mask, n, size, B, q.device)
    backward = grad_out is not None
    queries = _query_features(feature_map, q, backward)  # phi: (B, H, L, m)
    keys = _key_features(feature_map, k, mask, backward)  # phi: (B, H, L, m), log_scale g: (B, H, L)
    v1 = _values_with_ones(v, None, mask)  # (B, H, L, d + 1)
    w = _scan_weights(keys.log_scale, ref_in, size) if feature_map.exponential else None
    phi_q, phi_k, v1 = split_blocks(queries.phi, size), split_blocks(keys.phi, size), split_blocks(v1, size)  # (B,H,nc,C,.)

    weighted_v1 = _scaled(v1, None if w is None else w.key_weights)  # (B, H, nc, C, d + 1)
    summaries = phi_k.transpose(-1, -2) @ weighted_v1  # (B, H, nc, m, d + 1): T_c
    states, kv_out = _carry_states(summaries, kv_in, w)  # (B, H, nc, m, d + 1): S_c
    scores = _within_chunks(phi_q @ phi_k.transpose(-1, -2), w)  # (B, H, nc, C, C)
    if not backward:
        out1 = _scaled(phi_q @ states, None if w is None else w.row_scale) + scores @ v1  # (B, H, nc, C, d + 1)
        _normalise(out1.flatten(2, 3)[..., :n, :], out, normaliser)
        return kv_out, (ref_in if w is None else w.ref_out)

    out, grad_out, normaliser = (split_blocks(pad_to_multiple(t, size)[0], size) for t in (out, grad_out, normaliser[..., None]))
    grad_out1 = _normalise_backward(out, normaliser[..., 0], grad_out)  # (B, H, nc, C, d + 1); padding: 0
    # inter-chunk
    scaled = _scaled(grad_out1, None if w is None else w.row_scale)  # (B, H, nc, C, d + 1)
    grad_phi_q = scaled @ states.transpose(-1, -2)  # (B, H, nc, C, m)
    grad_states = phi_q.transpose(-1, -2) @ scaled  # (B, H, nc, m, d + 1)
    # intra-chunk
    grad_scores = _within_chunks(grad_out1 @ v1.transpose(-1, -2), w)  # (B, H, nc, C, C)
    grad_phi_q += grad_scores @ phi_k
    grad_phi_k = grad_scores.transpose(-1, -2) @ phi_q  # (B, H, nc, C, m)
    grad_v1 = scores.transpose(-1, -2) @ grad_out1  # (B, H, nc, C, d + 1)
    # through the carried states to the chunk summaries and the incoming state
    grad_summaries, grad_kv_in = _carry_states_backward(grad_states, grad_kv_out, w)  # (B, H, nc, m, d + 1)
    grad_phi_k += weighted_v1 @ grad_summaries.transpose(-1, -2)
    grad_v1 += _scaled(phi_k @ grad_summaries, None if w is None else w.key_weights)
    # through the feature maps
    grad_q = _features_backward(feature_map, queries, grad_phi_q.flatten(2, 3))[..., :n, :]
    grad_k = _features_backward(feature_map, keys, grad_phi_k.flatten(2, 3))[..., :n, :]
    grad_v = grad_v1.flatten(2, 3)[..., :n, :d]  # (B, H, n, d)
    if mask is not None:
        grad_v = grad_v.masked_fill(~mask[:, None, :n, None], 0.0)
    return grad_q, grad_k, grad_v, grad_kv_in


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
