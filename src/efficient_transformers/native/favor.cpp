// Fused bidirectional FAVOR+ (Performer, positive features) for CPU: the computation of
// `core.kernel_attention._BidirectionalKernelAttention` with the FAVOR+ map, one head at a time.
//
// Why native: the Python form runs every elementwise step (row max, exp(P - max), key weights,
// normalisers, their gradients) as a separate pass over 1024-row segments of all heads; here each
// row of a segment is handled once while it is in cache, right after the matrix product that made
// it, and a row's argmax comes with its max (the epsilon term's gradient goes to that one feature,
// no one-hot pass). The matrix products are the same ones, through ATen or oneDNN (`Gemm`, rows.h), on the
// same strided views (no copy of q, k, v or of the heads-last gradient buffers).
//
// Notation (per batch item b and head h; see kernel_attention.py for the derivation):
//   P = x omega'^T (n, m), M = max_f P, E = exp(P - M), phi = E + eps (the eps term is folded into
//   rank-one corrections of the (m, d + 1) products);
//   keys: g = M - |k|^2 / (2 sqrt d) (-inf for padding), weight w = exp(g - R) with R the max of g
//   over the real keys, V1 = [v w, w], kv = sum_j phi_j V1_j^T (m, d + 1), stored transposed, (d + 1, m):
//   the faster layout of its products on this CPU;
//   queries: out1 = phi_q kv = E kv + eps colsum(kv), normaliser = out1[:, d], out = out1[:, :d] / normaliser.
// Stabilisers (M, R) are constants of the gradient: the output is exactly invariant to them.

#include "rows.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <numeric>

namespace {

using namespace eft_native;

template <typename T>
void forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& key_mask,
                  const Tensor& omega, T eps, int64_t segment_size, const Tensor& out, const Tensor& normaliser,
                  const Tensor& kv, const Tensor& log_ref, const Tensor& query_max, const Tensor& query_arg,
                  const Tensor& key_max, const Tensor& key_arg, const Tensor& key_log_scale,
                  const Tensor& query_features, const Tensor& key_features, const Gemm& gemm) {
  const Geometry g = geometry(q, omega, segment_size);
  const bool keep_queries = query_features.numel() > 0, keep_keys = key_features.numel() > 0;
  const int64_t d = g.d, m = g.m, N = g.N, S = g.segment;
  const T norm_scale = T(0.5) / std::sqrt(T(d));
  const Tensor omega_t = omega.t();  // (d, m)
  auto options = q.options();
  const bool* mask_all = key_mask ? key_mask->data_ptr<bool>() : nullptr;
  for_each_head(g.B, g.H, [&](int64_t b, int64_t h) {  // heads in parallel when there are enough
    Tensor P = at::empty({S, m}, options), V1 = at::empty({S, d + 1}, options);
    Tensor summary = at::empty({d + 1, m}, options), out1 = at::empty({S, d + 1}, options);
    Tensor weights = at::empty({S}, options);
    std::vector<T> value_sums(d + 1), kv_sums(d + 1);
    const bool* mask = mask_all ? mask_all + b * N : nullptr;
    const Tensor qh = q.select(0, b).select(0, h), kh = k.select(0, b).select(0, h), vh = v.select(0, b).select(0, h);
    const Tensor kvh = kv.select(0, b).select(0, h);  // (d + 1, m), contiguous: kv transposed
    T* kvp = kvh.data_ptr<T>();
    const int64_t row0 = (b * g.H + h) * N;  // offset of this head in the (B, H, N) tensors
    T* kmax = key_max.data_ptr<T>() + row0;
    int64_t* karg = key_arg.data_ptr<int64_t>() + row0;
    T* klog = key_log_scale.data_ptr<T>() + row0;
    std::fill(kvp, kvp + m * (d + 1), T(0));
    T ref = negative_infinity<T>();
    for (int64_t s = 0; s < N; s += S) {
      const int64_t n = std::min(S, N - s);
      Tensor Ps = keep_keys ? key_features.select(0, b).select(0, h).narrow(0, s, n) : P.narrow(0, 0, n);
      Tensor V1s = V1.narrow(0, 0, n);
      key_log_norms<T>(kh.narrow(0, s, n), norm_scale, klog + s);  // first: brings the rows into cache
      gemm(Ps, kh.narrow(0, s, n), omega_t);  // (n, m)
      key_rows<T>(Ps, mask ? mask + s : nullptr, kmax + s, karg + s, klog + s, false);
      T segment_ref = negative_infinity<T>();
      for (int64_t j = 0; j < n; ++j) segment_ref = std::max(segment_ref, klog[s + j]);
      if (segment_ref == negative_infinity<T>()) continue;  // only padding: nothing to add
      weighted_values<T>(V1s, vh.narrow(0, s, n), klog + s, segment_ref, weights.data_ptr<T>());
      column_sums(V1s.data_ptr<T>(), n, d + 1, value_sums.data());
      gemm(summary, V1s.t(), Ps);  // (d + 1, m): (E^T V1)^T, the faster layout of this product
      const T new_ref = std::max(ref, segment_ref);
      const T keep = decay(ref, new_ref), add = decay(segment_ref, new_ref);
      const T* sp = summary.data_ptr<T>();
      for (int64_t c = 0; c <= d; ++c)
        for (int64_t f = 0; f < m; ++f) kvp[c * m + f] = kvp[c * m + f] * keep + (sp[c * m + f] + eps * value_sums[c]) * add;
      ref = new_ref;
    }
    log_ref.data_ptr<T>()[b * g.H + h] = ref;
    for (int64_t c = 0; c <= d; ++c) kv_sums[c] = eps * std::accumulate(kvp + c * m, kvp + (c + 1) * m, T(0));
    // (the eps term of every query feature: eps sum_f kv_f)
    T* qmax = query_max.data_ptr<T>() + row0;
    int64_t* qarg = query_arg.data_ptr<int64_t>() + row0;
    T* norm = normaliser.data_ptr<T>() + row0;
    const Tensor outh = out.select(0, b).select(0, h);  // (N, d), any row stride
    T* outp = outh.data_ptr<T>();
    const int64_t out_stride = outh.stride(0);
    for (int64_t s = 0; s < N; s += S) {
      const int64_t n = std::min(S, N - s);
      Tensor Ps = keep_queries ? query_features.select(0, b).select(0, h).narrow(0, s, n) : P.narrow(0, 0, n);
      Tensor O1 = out1.narrow(0, 0, n);
      gemm(Ps, qh.narrow(0, s, n), omega_t);
      T* p = Ps.data_ptr<T>();
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          row_max(p + i * m, m, qmax[s + i], qarg[s + i]);
          exp_shifted(p + i * m, m, qmax[s + i]);
        }
      });
      gemm(O1, Ps, kvh.t());  // (n, d + 1)
      const T* o = O1.data_ptr<T>();
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const T* oi = o + i * (d + 1);
          const T z = oi[d] + kv_sums[d];
          norm[s + i] = z;
          T* target = outp + (s + i) * out_stride;
          const T inverse = z > 0 ? T(1) / z : T(0);  // no key: zeros
          for (int64_t c = 0; c < d; ++c) target[c] = z > 0 ? (oi[c] + kv_sums[c]) * inverse : T(0);
        }
      });
    }
  });
}

template <typename T>
void backward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& omega, T eps, int64_t segment_size, const Tensor& out, const Tensor& normaliser,
                   const Tensor& kv, const Tensor& log_ref, const Tensor& query_max, const Tensor& query_arg,
                   const Tensor& key_max, const Tensor& key_arg, const Tensor& key_log_scale, const Tensor& grad_out,
                   const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_v, const Tensor& query_features,
                   const Tensor& key_features, const Gemm& gemm) {
  const Geometry g = geometry(q, omega, segment_size);
  const bool queries_given = query_features.numel() > 0, keys_given = key_features.numel() > 0;
  const int64_t d = g.d, m = g.m, N = g.N, S = g.segment;
  const Tensor omega_t = omega.t();
  auto options = q.options();
  for_each_head(g.B, g.H, [&](int64_t b, int64_t h) {  // heads in parallel when there are enough
    Tensor P = at::empty({S, m}, options), grad_phi = at::empty({S, m}, options);
    Tensor rows1 = at::empty({S, d + 1}, options), products1 = at::empty({S, d + 1}, options);
    Tensor grad_kv = at::empty({d + 1, m}, options), weights = at::empty({S}, options);  // transposed, as kv
    std::vector<T> kv_sums(d + 1), grad_sums(d + 1), grad_kv_sums(d + 1), row_grad_sum(S), row_grad_norm(S);
    const Tensor qh = q.select(0, b).select(0, h), kh = k.select(0, b).select(0, h), vh = v.select(0, b).select(0, h);
    const Tensor kvh = kv.select(0, b).select(0, h);
    const Tensor outh = out.select(0, b).select(0, h), gouth = grad_out.select(0, b).select(0, h);
    const Tensor gqh = grad_q.select(0, b).select(0, h), gkh = grad_k.select(0, b).select(0, h);
    const Tensor gvh = grad_v.select(0, b).select(0, h);
    const int64_t row0 = (b * g.H + h) * N;
    const T* kvp = kvh.data_ptr<T>();
    for (int64_t c = 0; c <= d; ++c) kv_sums[c] = std::accumulate(kvp + c * m, kvp + (c + 1) * m, T(0));  // sum_f kv_f
    std::fill(grad_sums.begin(), grad_sums.end(), T(0));
    grad_kv.zero_();
    // queries: grad_out1 = d loss / d out1, then d loss / d kv and d loss / d q
    const T* qmax = query_max.data_ptr<T>() + row0;
    const int64_t* qarg = query_arg.data_ptr<int64_t>() + row0;
    const T* norm = normaliser.data_ptr<T>() + row0;
    for (int64_t s = 0; s < N; s += S) {
      const int64_t n = std::min(S, N - s);
      Tensor Ps = queries_given ? query_features.select(0, b).select(0, h).narrow(0, s, n) : P.narrow(0, 0, n);
      Tensor G1 = rows1.narrow(0, 0, n), GP = grad_phi.narrow(0, 0, n);
      if (!queries_given) gemm(Ps, qh.narrow(0, s, n), omega_t);  // recomputed features: bitwise the forward's
      T* p = Ps.data_ptr<T>();
      T* g1 = G1.data_ptr<T>();
      const T* outp = outh.data_ptr<T>() + s * outh.stride(0);
      const T* gop = gouth.data_ptr<T>() + s * gouth.stride(0);
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          if (!queries_given) exp_shifted(p + i * m, m, qmax[s + i]);  // with the forward's max
          const T z = norm[s + i];
          T* row = g1 + i * (d + 1);
          const T* go = gop + i * gouth.stride(0);
          if (i + kAhead < end) {
            prefetch_row(gop + (i + kAhead) * gouth.stride(0), d);
            prefetch_row(outp + (i + kAhead) * outh.stride(0), d);
          }
          if (z > 0) {
            const T inverse = T(1) / z;
            for (int64_t c = 0; c < d; ++c) row[c] = go[c] * inverse;
            row[d] = -dot(row, outp + i * outh.stride(0), d);
          } else {
            std::fill(row, row + d + 1, T(0));
          }
        }
      });
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c <= d; ++c) grad_sums[c] += g1[i * (d + 1) + c];
      gemm(grad_kv, G1.t(), Ps, true);  // += (E^T grad_out1)^T
      gemm(GP, G1, kvh);  // (n, m): d loss / d phi
      T* gp = GP.data_ptr<T>();
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const T grad_sum = dot(g1 + i * (d + 1), kv_sums.data(), d + 1);  // sum_f d loss / d phi_f
          through_exp(gp + i * m, p + i * m, m, qarg[s + i], eps * grad_sum);
        }
      });
      Tensor target = gqh.narrow(0, s, n);
      gemm(target, GP, omega);  // (n, d), into the heads-last buffer
    }
    T* gkv = grad_kv.data_ptr<T>();
    for (int64_t c = 0; c <= d; ++c) {
      for (int64_t f = 0; f < m; ++f) gkv[c * m + f] += eps * grad_sums[c];
      grad_kv_sums[c] = std::accumulate(gkv + c * m, gkv + (c + 1) * m, T(0));
    }
    // keys: d loss / d v and d loss / d k from d loss / d kv
    const T ref = log_ref.data_ptr<T>()[b * g.H + h];
    T* kmax = key_max.data_ptr<T>() + row0;
    int64_t* karg = key_arg.data_ptr<int64_t>() + row0;
    T* klog = key_log_scale.data_ptr<T>() + row0;
    for (int64_t s = 0; s < N; s += S) {
      const int64_t n = std::min(S, N - s);
      Tensor Ps = keys_given ? key_features.select(0, b).select(0, h).narrow(0, s, n) : P.narrow(0, 0, n);
      Tensor V1 = rows1.narrow(0, 0, n), PG = products1.narrow(0, 0, n), GP = grad_phi.narrow(0, 0, n);
      if (!keys_given) {
        gemm(Ps, kh.narrow(0, s, n), omega_t);
        key_rows<T>(Ps, nullptr, kmax + s, karg + s, klog + s, true);
      }
      weighted_values<T>(V1, vh.narrow(0, s, n), klog + s, ref, weights.data_ptr<T>());
      gemm(PG, Ps, grad_kv.t());  // (n, d + 1): E grad_kv
      T* pg = PG.data_ptr<T>();
      const T* v1 = V1.data_ptr<T>();
      const T* w = weights.data_ptr<T>();
      T* gvp = gvh.data_ptr<T>() + s * gvh.stride(0);
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          T* row = pg + j * (d + 1);
          for (int64_t c = 0; c <= d; ++c) row[c] += eps * grad_kv_sums[c];
          T* gv = gvp + j * gvh.stride(0);
          for (int64_t c = 0; c < d; ++c) gv[c] = row[c] * w[j];
          row_grad_sum[j] = dot(v1 + j * (d + 1), grad_kv_sums.data(), d + 1);
          row_grad_norm[j] = dot(v1 + j * (d + 1), row, d + 1);  // sum_f d loss / d phi_f phi_f
        }
      });
      gemm(GP, V1, grad_kv);  // (n, m)
      T* gp = GP.data_ptr<T>();
      const T* p = Ps.data_ptr<T>();
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) through_exp(gp + j * m, p + j * m, m, karg[s + j], eps * row_grad_sum[j]);
      });
      Tensor target = gkh.narrow(0, s, n);
      gemm(target, GP, omega);
      add_log_norm_gradient<T>(target, kh.narrow(0, s, n), row_grad_norm.data());
    }
  });
}

// Features kept for the backward pass (E = exp(P - max), without the eps): empty (recompute them) or
// (B, H, N, m), contiguous, q's dtype
void check_features(const Tensor& q, const Tensor& omega, const Tensor& features, const char* name) {
  if (features.numel() == 0) return;
  const std::vector<int64_t> expected{q.size(0), q.size(1), q.size(2), omega.size(0)};
  TORCH_CHECK(features.sizes() == at::IntArrayRef(expected) && features.is_contiguous() &&
                  features.scalar_type() == q.scalar_type(),
              "favor: ", name, " must be empty or a contiguous (B, H, N, m) tensor of q's dtype, got ", features.sizes());
}

void favor_forward(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& key_mask,
                   const Tensor& omega, double eps, int64_t segment, const Tensor& out, const Tensor& normaliser,
                   const Tensor& kv, const Tensor& log_ref, const Tensor& query_max, const Tensor& query_arg,
                   const Tensor& key_max, const Tensor& key_arg, const Tensor& key_log_scale,
                   const Tensor& query_features, const Tensor& key_features, bool onednn) {
  check_features(q, omega, query_features, "query_features");
  check_features(q, omega, key_features, "key_features");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "favor_forward", [&] {
    forward_impl<scalar_t>(q, k, v, key_mask, omega, static_cast<scalar_t>(eps), segment, out, normaliser, kv, log_ref,
                           query_max, query_arg, key_max, key_arg, key_log_scale, query_features, key_features,
                           Gemm(onednn));
  });
}

void favor_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& omega, double eps, int64_t segment, const Tensor& out, const Tensor& normaliser,
                    const Tensor& kv, const Tensor& log_ref, const Tensor& query_max, const Tensor& query_arg,
                    const Tensor& key_max, const Tensor& key_arg, const Tensor& key_log_scale, const Tensor& grad_out,
                    const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_v, const Tensor& query_features,
                    const Tensor& key_features, bool onednn) {
  check_features(q, omega, query_features, "query_features");
  check_features(q, omega, key_features, "key_features");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "favor_backward", [&] {
    backward_impl<scalar_t>(q, k, v, omega, static_cast<scalar_t>(eps), segment, out, normaliser, kv, log_ref,
                            query_max, query_arg, key_max, key_arg, key_log_scale, grad_out, grad_q, grad_k, grad_v,
                            query_features, key_features, Gemm(onednn));
  });
}

}  // namespace

// CPU kernels (not catch-all ones): a dispatch mode sees each call as one op, not the products inside it
TORCH_LIBRARY(efficient_transformers, m) {
  m.def("favor_forward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(favor_forward)));
  m.def("favor_backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(favor_backward)));
}
