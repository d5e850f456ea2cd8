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
differentiated through each row's maximum, found as the floor of exp(P - max) (exactly 1 there, below
1 elsewhere: no max with indices, which costs about as much as a matrix product, and no scatter); the
FAVOR+ map's parts are differentiated by hand (`projection_backward`, `log_norm_backward`: no local
autograd graph); the bidirectional form keeps the epsilon out of the (n, m) features as rank-one
corrections of its (n, d + 1) products, saves each row's max for the backward pass and takes the
features' row sums from its small products (see `_BidirectionalKernelAttention`); the causal
carry between chunks is an in-place recurrence (a prefix sum for direct maps), and so is its
adjoint; outputs and input gradients are written heads-last, so that the layer's head merge and the
projection's backward pass read them without a copy; q, k, v are read in place (no contiguous copy:
the feature projections run one matrix at a time on the fused projection's strides, and the
projection backward writes straight into the gradient buffers, `RandomFeatures.project`,
`PositiveRandomFeatures.backward_into`). `torch.compile` of the elementwise parts was measured and
not adopted (minutes to compile for about 1.5 % of the step; see the notes of issue 18).

**The native FAVOR+ kernels.** Calls with the positive FAVOR+ map on CPU (float32, float64) run
`native/favor.cpp` (bidirectional) or `native/favor_causal.cpp` (the chunked scan, with states,
decoding and the incoming state's gradient) (`efficient_transformers.native`, built on first use)
instead of the Python Functions below: the same products through ATen and the same stabilisers, one head at a time, each
row's max, argmax and exp(P - max) (and, backwards, its gradient through the exp and the epsilon
term, which goes to the row's first maximal feature: a subgradient of the max) in one pass right
after the product that made the row. It equals `_BidirectionalKernelAttention` to rounding (tests:
float64 1e-12, float32 2e-5 relative), is 15-20 % faster at 16K tokens and 1.2-2x at small N with a
batch, and its scratch is a few (segment, m) matrices of one head, so with no features kept its peak
memory is SDPA's (1.02-1.05x measured at 4K-16K, against 1.2-1.9x for the Python form). The causal kernel batches each
segment's chunk products as the Python form does and fuses the rows' work and the within-chunk
weights; when a gradient is needed its forward pass also keeps the weighted within-chunk scores (N C
numbers per head, for chunks up to 128), so that the backward pass does not redo their product. It is
about 30 % faster at 16K (1.23-1.28x SDPA's memory with no features kept, against 1.45x). Both kernels can also keep the
(B, H, N, m) features of the keys, or of queries and keys, for the backward pass (`saved_features`;
the Performer keeps the keys' by default): the backward then skips those features' products and
exponentials, 3-12 % of the 16K train step for N m numbers per head each (README, "Performer's saved
features"). In float32 the kernels' exponentials are ATen's `exp_u20` (within 20 ulp); the Python forms use `torch.exp`. `native.portable()` or
`EFT_NATIVE=0` runs the Python forms; so does every other map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import native
from . import buffer_pool, gemm
from .blocking import pad_mask_to_multiple, pad_to_multiple, split_blocks
from .feature_maps import FeatureMap, Identity
from .heads import heads_last

NEG_INF = float("-inf")
SAVED_FEATURES = ("none", "keys", "all")  # kernel_attention's saved_features: what the native kernels keep


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
    saved_features: str = "none",
) -> tuple[Tensor, KernelState | None]:
    """Kernel attention on per-head tensors q, k, v (B, H, N, d) -> (out (B, H, N, d), state).

    `key_mask` (B, N) bool, True = real key. Causal calls return the state after the last token
    (continuing from `state` when given); bidirectional calls return None. `saved_features`: which
    (B, H, N, m) feature tensors the native FAVOR+ kernels keep for the backward pass instead of
    recomputing them from q and k ("none", "keys" or "all": queries and keys); the portable path
    always recomputes its features segment by segment.
    """
    if saved_features not in SAVED_FEATURES:
        raise ValueError(f"kernel attention: saved_features must be one of {SAVED_FEATURES}, got {saved_features!r}")
    keep = (saved_features == "all", saved_features in ("keys", "all"))  # (query features, key features)
    if state is not None and not causal:
        raise ValueError("kernel attention: a decoding state was given to a bidirectional call")
    out_dtype = v.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if feature_map.precompute:  # phi once, kept for the backward pass by the map itself
        # contiguous first: elementwise maps on the layer's strided q/k views are several times slower
        q, k = (feature_map(t.to(compute).contiguous()) for t in (q, k))  # (B, H, N, m) features
        feature_map = Identity(feature_map.num_features)
    # no copy of q, k, v: every use reads them in place (the projections one matrix at a time, see
    # `RandomFeatures.project`; direct maps elementwise; the causal scan of identity maps copies its segments)
    q, k, v = (t.to(compute) for t in (q, k, v))
    if not causal:
        if _native_favor(feature_map, q, k, v):
            out = _NativeFavorAttention.apply(q, k, v, key_mask, feature_map, segment_size, *keep)
        else:
            out = _BidirectionalKernelAttention.apply(q, k, v, key_mask, feature_map, segment_size)
        return out.to(out_dtype), None
    B, H, n, d = v.shape
    if state is None:
        kv_in = q.new_zeros(B, H, feature_map.num_features, d + 1)  # (B, H, m, d + 1)
        ref_in, length = q.new_full((B, H), NEG_INF), 0
    else:
        kv_in, ref_in, length = state.kv.to(compute), state.ref.to(compute), state.length
    segment_size = max(chunk_size, segment_size // chunk_size * chunk_size)  # chunks never straddle segments
    if _native_favor(feature_map, q, k, v):
        out, kv, ref = _NativeCausalFavor.apply(q, k, v, key_mask, kv_in, ref_in, feature_map, chunk_size, segment_size,
                                                *keep)
    else:
        out, kv, ref = _CausalKernelAttention.apply(q, k, v, key_mask, kv_in, ref_in, feature_map, chunk_size,
                                                    segment_size)
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

    phi:       (B, H, n, m) stabilised features: phi(x) up to a per-row factor (exp(log_scale) for keys);
               exponential maps with `with_eps=False` leave the epsilon out (the caller adds its rank-one
               contribution to the products: the bidirectional form)
    log_scale: (B, H, n) keys only: the log of that factor (-inf for padded keys); None for queries
    exp:       (B, H, n, m) exponential maps: exp(P - max_f P) without the epsilon (the same tensor as
               phi when the epsilon is left out); the backward pass overwrites it
    row_max:   (B, H, n) exponential maps: max_f P, the stabiliser (the backward pass reuses the forward's)
    raw, leaf: direct maps in the backward pass: the map's output with its graph back to `leaf`
    x:         the input (exponential maps: for the log-norm's gradient)
    """

    phi: Tensor
    log_scale: Tensor | None
    exp: Tensor | None = None
    row_max: Tensor | None = None
    raw: Tensor | None = None
    leaf: Tensor | None = None
    x: Tensor | None = None


def _explicit(feature_map: FeatureMap) -> bool:
    """Exponential maps with hand-derived gradients of their parts (no local autograd): FAVOR+."""
    return feature_map.exponential and hasattr(feature_map, "projection_backward")


def _stabilised(feature_map: FeatureMap, x: Tensor, row_max: Tensor | None, with_eps: bool, keep_exp: bool = True):
    """(phi, exp(P - max_f P), max_f P) for an exponential map, P = projection(x) (B, H, n, m): phi =
    exp(P - max) (+ eps), i.e. phi(x) / exp(max + log_norm). `row_max` given (the backward pass): the
    forward's, so the recomputed exponentials are bitwise the forward's and no max is taken. Without
    `keep_exp` (no backward pass follows) the epsilon is added in place: exp is then phi."""
    projection = feature_map.projection(x)  # (B, H, n, m), a fresh buffer overwritten below
    if row_max is None:
        row_max = projection.amax(dim=-1)  # (B, H, n)
    exp = torch.sub(projection, row_max[..., None], out=projection).exp_()  # (B, H, n, m), in (0, 1]
    phi = (exp + feature_map.epsilon if keep_exp else exp.add_(feature_map.epsilon)) if with_eps else exp
    return phi, exp, row_max


def _query_features(feature_map: FeatureMap, x: Tensor, graph: bool, *, row_max: Tensor | None = None,
                    with_eps: bool = True) -> _Features:
    """phi(q) up to a per-row constant, which cancels in the normalised output (a query's log-norm is
    never computed)."""
    if feature_map.identity:
        return _Features(x, None, leaf=x)
    if feature_map.exponential:
        phi, exp, row_max = _stabilised(feature_map, x, row_max, with_eps, keep_exp=graph)
        return _Features(phi, None, exp, row_max, x=x)
    leaf = x.detach().requires_grad_() if graph else x
    with torch.set_grad_enabled(graph):
        raw = feature_map(leaf)
    return _Features(raw.detach(), None, raw=raw, leaf=leaf)


def _key_features(feature_map: FeatureMap, x: Tensor, mask: Tensor | None, graph: bool, *,
                  row_max: Tensor | None = None, with_eps: bool = True) -> _Features:
    """Key features phi(k) exp(-g) and log-scales g (so phi = features e^g): for exponential maps
    g = max_f P + log_norm and the features are <= 1 + eps; for direct maps g = 0. Padded keys get
    g = -inf (weight 0)."""
    features = _query_features(feature_map, x, graph, row_max=row_max, with_eps=with_eps)
    if feature_map.exponential:
        log_scale = features.row_max + feature_map.log_norm(x)  # (B, H, n)
    else:
        log_scale = features.phi.new_zeros(features.phi.shape[:-1])  # (B, H, n)
    if mask is not None:
        log_scale = log_scale.masked_fill(~mask[:, None, :], NEG_INF)
    features.log_scale = log_scale
    return features


def _features_backward(feature_map: FeatureMap, features: _Features, grad_phi: Tensor, *,
                       grad_sum: Tensor | None = None, grad_norm: Tensor | None = None,
                       keys: bool = False, out: Tensor | None = None) -> Tensor:
    """d loss / d x from d loss / d phi (the per-row factors that the caller applied held fixed).

    Exponential maps: phi_f = exp(P_f - M) + eps with M = max_f P, scaled by exp(M + log_norm). The
    exp term gives grad_phi exp(P - M); the eps term follows M, i.e. the row's largest projection,
    where exp(P - M) is exactly 1 (so its floor is the one-hot of the max: no max with indices, no
    scatter); the key log-norm multiplies the whole row, so it gets sum_f grad_phi phi. (Queries have
    no log-norm: it cancels.) The row sums `grad_sum` = sum_f grad_phi and (keys) `grad_norm` =
    sum_f grad_phi phi may be given when the caller has them cheaply from its (n, d + 1) products.
    `grad_phi` and `features.exp` are overwritten. With `out` (any strides) the gradient is written there."""
    if feature_map.identity:
        return grad_phi if out is None else out.copy_(grad_phi)
    if not feature_map.exponential:
        grad_x = torch.autograd.grad(features.raw, features.leaf, grad_phi)[0]
        return grad_x if out is None else out.copy_(grad_x)
    eps = feature_map.epsilon
    if grad_sum is None:
        grad_sum = grad_phi.sum(-1)  # (B, H, n)
    grad_raw = grad_phi.mul_(features.exp)  # (B, H, n, m): through the exp term, in place
    if keys and grad_norm is None:
        grad_norm = grad_raw.sum(-1) + eps * grad_sum  # sum_f grad_phi (exp + eps)
    peak = features.exp.floor_()  # (B, H, n, m): 1 at each row's max (exp(0)), 0 elsewhere
    grad_raw.addcmul_(peak, (eps * grad_sum)[..., None])  # the eps term follows the row's max
    if _explicit(feature_map):
        if out is not None:  # (B, H, n, d), no temporary
            return feature_map.backward_into(out, grad_raw, *((features.x, grad_norm) if keys else ()))
        grad_x = feature_map.projection_backward(grad_raw)  # (B, H, n, d)
        return grad_x.add_(feature_map.log_norm_backward(features.x, grad_norm)) if keys else grad_x
    leaf = features.x.detach().requires_grad_()  # another exponential map: its parts through local autograd
    with torch.enable_grad():
        outputs, grads = [feature_map.projection(leaf)], [grad_raw]
        if keys:
            outputs.append(feature_map.log_norm(leaf))
            grads.append(grad_norm)
        grad_x = torch.autograd.grad(outputs, leaf, grads)[0]
        return grad_x if out is None else out.copy_(grad_x)


# ----------------------------------------------------------------------------- bidirectional
class _BidirectionalKernelAttention(torch.autograd.Function):
    """out = normalise(phi(Q) S), S = sum_j phi(k_j) [v_j, 1]^T, segment by segment (see module doc).

    Exponential maps keep the epsilon out of the (n, m) features: phi = E + eps with E = exp(P - max),
    so phi^T A = E^T A + eps 1^T A and phi B = E B + eps 1^T B, where the eps terms are column sums
    of (n, d + 1) or (m, d + 1) matrices (rank-one corrections, no pass over the features). The
    row sums that the features' gradients need come from the same small matrices too. The forward
    pass saves each row's max (B, H, N numbers per side), so the backward pass takes none."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, feature_map, segment_size):
        B, H, n, d = v.shape
        spans = _spans(n, segment_size)
        folded = feature_map.exponential  # the eps term as a rank-one correction (see the class doc)
        eps = feature_map.epsilon
        kv = q.new_zeros(B, H, feature_map.num_features, d + 1)  # (B, H, m, d + 1) relative to exp(log_ref)
        log_ref = q.new_full((B, H), NEG_INF)
        query_max, key_max = (q.new_empty(B, H, n) for _ in range(2)) if folded else (None, None)
        for s, e in spans:
            mask = _segment_mask(key_mask, s, e)
            keys = _key_features(feature_map, k[..., s:e, :], mask, graph=False, with_eps=not folded)
            segment_ref = keys.log_scale.amax(dim=-1)  # (B, H)
            values = _values_with_ones(v[..., s:e, :], _decay(keys.log_scale, segment_ref[..., None]), mask)
            summary = keys.phi.transpose(-1, -2) @ values  # (B, H, m, d + 1)
            if folded:
                key_max[..., s:e] = keys.row_max
                summary += eps * values.sum(-2, keepdim=True)  # the eps term: (B, H, 1, d + 1)
            new_ref = torch.maximum(log_ref, segment_ref)  # (B, H)
            kv = kv * _decay(log_ref, new_ref)[..., None, None] + summary * _decay(segment_ref, new_ref)[..., None, None]
            log_ref = new_ref
        out, normaliser = heads_last(v, n), v.new_empty(B, H, n)
        kv_sum = eps * kv.sum(-2, keepdim=True) if folded else None  # (B, H, 1, d + 1)
        for s, e in spans:
            queries = _query_features(feature_map, q[..., s:e, :], graph=False, with_eps=not folded)
            out1 = queries.phi @ kv  # (B, H, n_s, d + 1)
            if folded:
                query_max[..., s:e] = queries.row_max
                out1 += kv_sum
            _normalise(out1, out[..., s:e, :], normaliser[..., s:e])
        ctx.save_for_backward(q, k, v, key_mask, kv, log_ref, out, normaliser, query_max, key_max)
        ctx.feature_map, ctx.segment_size = feature_map, segment_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, key_mask, kv, log_ref, out, normaliser, query_max, key_max = ctx.saved_tensors
        feature_map = ctx.feature_map
        folded, eps = feature_map.exponential, feature_map.epsilon
        spans = _spans(q.shape[-2], ctx.segment_size)
        grad_q, grad_k, grad_v = heads_last(q), heads_last(k), heads_last(v)  # see `core.heads`
        grad_kv = torch.zeros_like(kv)  # (B, H, m, d + 1)
        kv_sum = kv.sum(-2, keepdim=True) if folded else None  # (B, H, 1, d + 1): sum_f kv_f
        for s, e in spans:
            queries = _query_features(feature_map, q[..., s:e, :], graph=True, with_eps=not folded,
                                      row_max=None if query_max is None else query_max[..., s:e])
            grad_out1 = _normalise_backward(out[..., s:e, :], normaliser[..., s:e], grad_out[..., s:e, :])  # (B,H,n_s,d+1)
            grad_kv += queries.phi.transpose(-1, -2) @ grad_out1
            grad_phi = grad_out1 @ kv.transpose(-1, -2)  # (B, H, n_s, m)
            if not folded:
                _features_backward(feature_map, queries, grad_phi, out=grad_q[..., s:e, :])
                continue
            grad_kv += eps * grad_out1.sum(-2, keepdim=True)
            grad_sum = (grad_out1 * kv_sum).sum(-1)  # (B, H, n_s): sum_f grad_phi
            _features_backward(feature_map, queries, grad_phi, grad_sum=grad_sum, out=grad_q[..., s:e, :])
        grad_kv_sum = grad_kv.sum(-2, keepdim=True) if folded else None  # (B, H, 1, d + 1)
        for s, e in spans:
            mask = _segment_mask(key_mask, s, e)
            keys = _key_features(feature_map, k[..., s:e, :], mask, graph=True, with_eps=not folded,
                                 row_max=None if key_max is None else key_max[..., s:e])
            weights = _decay(keys.log_scale, log_ref[..., None])  # (B, H, n_s): relative to the max over all keys
            values = _values_with_ones(v[..., s:e, :], weights, mask)  # (B, H, n_s, d + 1)
            phi_grad_kv = keys.phi @ grad_kv  # (B, H, n_s, d + 1)
            if folded:
                phi_grad_kv += eps * grad_kv_sum
            torch.mul(phi_grad_kv[..., :-1], weights[..., None], out=grad_v[..., s:e, :])
            grad_phi = values @ grad_kv.transpose(-1, -2)  # (B, H, n_s, m)
            if not folded:
                _features_backward(feature_map, keys, grad_phi, out=grad_k[..., s:e, :])
                continue
            grad_sum = (values * grad_kv_sum).sum(-1)  # (B, H, n_s): sum_f grad_phi
            grad_norm = (values * phi_grad_kv).sum(-1)  # sum_f grad_phi phi
            _features_backward(feature_map, keys, grad_phi, grad_sum=grad_sum, grad_norm=grad_norm, keys=True,
                               out=grad_k[..., s:e, :])
        return grad_q, grad_k, grad_v, None, None, None


def _native_favor(feature_map: FeatureMap, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the bidirectional call runs the native FAVOR+ kernel (`efficient_transformers.native`):
    the positive FAVOR+ map on CPU, float32 or float64, rows of q, k, v contiguous (the layer's strided
    views are), and the kernels built and not switched off."""
    return (getattr(feature_map, "native_favor", False) and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64) and all(t.stride(-1) == 1 for t in (q, k, v))
            and native.enabled())


class _NativeFavorAttention(torch.autograd.Function):
    """`_BidirectionalKernelAttention` for the FAVOR+ map, in the native kernel (`native/favor.cpp`): the same
    products and stabilisers, one head at a time, each row's elementwise work in one pass after the product
    that made it. Saves, per row, the max and argmax of the features' projections and the keys'
    log-scales (B, H, N numbers each); the backward pass recomputes the features from them, bitwise
    the forward's, except those `keep_queries` / `keep_keys` ask to keep: the forward then writes
    E = exp(P - max) of every row into a (B, H, N, m) tensor saved for the backward pass, which skips
    their product and exponentials. Its scratch is a few (segment, m) matrices of one head, so with
    nothing kept its peak memory is that of SDPA (measured 1.02-1.05x at 4K-16K); each kept tensor
    adds N m numbers per head (README, "Performer's saved features")."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, feature_map, segment_size, keep_queries, keep_keys):
        B, H, n, d = v.shape
        omega = feature_map.scaled_omega(q.dtype)  # (m, d)
        out, normaliser = heads_last(v, n), v.new_empty(B, H, n)
        kv, log_ref = v.new_empty(B, H, d + 1, omega.shape[0]), v.new_empty(B, H)  # kv transposed (the kernel's layout)
        query_max, key_max, key_log_scale = (v.new_empty(B, H, n) for _ in range(3))
        query_arg, key_arg = (torch.empty(B, H, n, dtype=torch.int64) for _ in range(2))
        mask = None if key_mask is None else key_mask.to(torch.bool).contiguous()
        saved = (omega, out, normaliser, kv, log_ref, query_max, query_arg, key_max, key_arg, key_log_scale)
        grad = any(ctx.needs_input_grad)
        features = tuple(buffer_pool.empty((B, H, n, omega.shape[0]) if grad and keep else (0,), q.dtype, q.device)
                         for keep in (keep_queries, keep_keys))  # E = exp(P - max), or (0,): recompute
        saved = saved + features
        onednn = gemm.prefers_onednn(q.dtype, q.device)  # the products' backend (`core.gemm`), kept for backward
        torch.ops.efficient_transformers.favor_forward(q, k, v, mask, omega, feature_map.epsilon, segment_size, *saved[1:],
                                                       onednn)
        ctx.save_for_backward(q, k, v, *saved)  # padding is in the keys' log-scales (-inf): no mask needed
        ctx.epsilon, ctx.segment_size, ctx.onednn = feature_map.epsilon, segment_size, onednn
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, omega, *saved, query_features, key_features = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = heads_last(q), heads_last(k), heads_last(v)  # see `core.heads`
        torch.ops.efficient_transformers.favor_backward(q, k, v, omega, ctx.epsilon, ctx.segment_size, *saved,
                                                        grad_out, grad_q, grad_k, grad_v, query_features, key_features,
                                                        ctx.onednn)
        return grad_q, grad_k, grad_v, None, None, None, None, None


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
            grad_kv = _causal_segment(
                q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], _segment_mask(key_mask, s, e), entry_kv[i],
                entry_ref[i], ctx.feature_map, ctx.chunk_size, out=out[..., s:e, :], normaliser=normaliser[..., s:e],
                grad_out=grad_out[..., s:e, :], grad_kv_out=grad_kv,
                grad_inputs=(grad_q[..., s:e, :], grad_k[..., s:e, :], grad_v[..., s:e, :]),
            )
        grad_kv_in = grad_kv if ctx.needs_input_grad[4] else None
        return grad_q, grad_k, grad_v, None, grad_kv_in, None, None, None, None


_MAX_SAVED_SCORES_CHUNK = 128  # larger chunks recompute their scores: N C numbers per head, over 2x q's at d = 64


class _NativeCausalFavor(torch.autograd.Function):
    """`_CausalKernelAttention` for the FAVOR+ map, in the native kernel (`native/favor_causal.cpp`): the same
    chunked scan, products and stabilisers, one head at a time, each segment's chunk products batched and
    every row's elementwise work fused. Saves what `_CausalKernelAttention` saves (q, k, v, the outputs,
    the state entering each segment) plus, per row, the features' max and argmax and the keys'
    log-scales (B, H, N numbers each), and, when a gradient is needed, the weighted within-chunk scores
    (B, H, N / C, C, C: as much memory as q at C = d; only for C <= 128), which the backward pass would
    otherwise recompute with one more chunk product (measured: about 4 % of the 16K train step), and
    the features phi = E + eps of the keys (`keep_keys`) and queries (`keep_queries`) when asked,
    (B, H, ceil(N / C) C, m) each (padding rows zero), whose products and exponentials the backward
    pass then skips."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, kv_in, ref_in, feature_map, chunk_size, segment_size, keep_queries, keep_keys):
        B, H, n, d = v.shape
        omega = feature_map.scaled_omega(q.dtype)  # (m, d)
        segment = min(segment_size, -(-n // chunk_size) * chunk_size)  # as the kernel caps it
        segments = -(-n // segment)
        out, normaliser = heads_last(v, n), v.new_empty(B, H, n)
        m = omega.shape[0]
        entry_kv = v.new_empty(B, H, segments, d + 1, m)  # the state entering each segment, transposed
        entry_ref = v.new_empty(B, H, segments)
        kv_out, ref_out = v.new_empty(B, H, d + 1, m), v.new_empty(B, H)  # states: the kernel's (d + 1, m) layout
        query_max, key_max, key_log_scale = (v.new_empty(B, H, n) for _ in range(3))
        query_arg, key_arg = (torch.empty(B, H, n, dtype=torch.int64) for _ in range(2))
        mask = None if key_mask is None else key_mask.to(torch.bool).contiguous()
        saved = (out, normaliser, entry_kv, entry_ref)
        rows = (query_max, query_arg, key_max, key_arg, key_log_scale)
        chunks = -(-n // chunk_size)
        keep_scores = any(ctx.needs_input_grad) and chunk_size <= _MAX_SAVED_SCORES_CHUNK
        scores = buffer_pool.empty((B, H, chunks, chunk_size, chunk_size) if keep_scores else (0,), v.dtype, v.device)  # (0,): recompute
        grad = any(ctx.needs_input_grad)
        features = tuple(buffer_pool.empty((B, H, chunks * chunk_size, m) if grad and keep else (0,), v.dtype, v.device)
                         for keep in (keep_queries, keep_keys))  # phi = E + eps, or (0,): recompute
        onednn = gemm.prefers_onednn(q.dtype, q.device)  # the products' backend (`core.gemm`), kept for backward
        torch.ops.efficient_transformers.favor_causal_forward(
            q, k, v, mask, kv_in.transpose(-1, -2).contiguous(), ref_in.contiguous(), omega, feature_map.epsilon,
            chunk_size, segment_size, *saved, kv_out, ref_out, *rows, scores, *features, onednn)
        ctx.save_for_backward(q, k, v, omega, *saved, *rows, scores, *features)  # padding is in the keys' log-scales (-inf)
        ctx.epsilon, ctx.chunk_size, ctx.segment_size = feature_map.epsilon, chunk_size, segment_size
        ctx.onednn = onednn
        ctx.mark_non_differentiable(ref_out)
        return out, kv_out.transpose(-1, -2), ref_out  # the state as (B, H, m, d + 1), a view

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_kv_out, _grad_ref):
        q, k, v, omega, *saved, scores, query_features, key_features = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        B, H, n, d = v.shape
        grad_kv_out = (q.new_zeros(B, H, d + 1, omega.shape[0]) if grad_kv_out is None
                       else grad_kv_out.transpose(-1, -2).contiguous())  # (B, H, d + 1, m)
        grad_q, grad_k, grad_v = heads_last(q), heads_last(k), heads_last(v)  # see `core.heads`
        grad_kv_in = torch.empty_like(grad_kv_out)
        torch.ops.efficient_transformers.favor_causal_backward(
            q, k, v, omega, ctx.epsilon, ctx.chunk_size, ctx.segment_size, *saved, grad_out, grad_kv_out,
            grad_q, grad_k, grad_v, grad_kv_in, scores, query_features, key_features, ctx.onednn)
        grad_kv_in = grad_kv_in.transpose(-1, -2) if ctx.needs_input_grad[4] else None  # (B, H, m, d + 1)
        return grad_q, grad_k, grad_v, None, grad_kv_in, None, None, None, None, None, None


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
                    grad_kv_out=None, grad_inputs=None):
    """One segment of the chunked causal scan. Forward: writes `out` (B, H, n, d) and `normaliser`
    (B, H, n), returns (kv_out, ref_out). Given the gradients of its outputs (and the outputs): writes
    the gradients of q, k, v into `grad_inputs` (three (B, H, n, d) tensors, any strides) and returns
    grad_kv_in, recomputing the forward pieces it needs.

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
    grad_q, grad_k, grad_v = grad_inputs
    if pad == 0:  # straight into the caller's buffers
        _features_backward(feature_map, queries, grad_phi_q.flatten(2, 3), out=grad_q)
        _features_backward(feature_map, keys, grad_phi_k.flatten(2, 3), keys=True, out=grad_k)
    else:
        grad_q.copy_(_features_backward(feature_map, queries, grad_phi_q.flatten(2, 3))[..., :n, :])
        grad_k.copy_(_features_backward(feature_map, keys, grad_phi_k.flatten(2, 3), keys=True)[..., :n, :])
    grad_v.copy_(grad_v1.flatten(2, 3)[..., :n, :d])  # (B, H, n, d)
    if mask is not None:
        grad_v.masked_fill_(~mask[:, None, :n, None], 0.0)
    return grad_kv_in


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
