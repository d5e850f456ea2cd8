// Fused causal FAVOR+ (Performer, positive features) for CPU: the chunked causal scan of
// `core.kernel_attention` (`_CausalKernelAttention`, `_causal_segment`) with the FAVOR+ map, one head
// at a time, a segment of chunks at a time.
//
// Per segment of L rows in nc chunks of C (see kernel_attention.py for the derivation):
//   phi = exp(P - max) + eps for queries and keys, g_j = max_f P_jf + log_norm(k_j) (-inf: padding);
//   M_i the running max of g (from the incoming reference R_in), R_start,c / R_end,c before / after chunk c;
//   key weights exp(g_j - R_end,c), row scales exp(R_start,c - M_i), within-chunk weights exp(g_j - M_i), j <= i;
//   T_c = phi_k,c^T [v 1]_c (key-weighted), S_c+1 = S_c exp(R_start,c - R_end,c) + T_c;
//   out1_c = row_scale (phi_q,c S_c) + ((phi_q,c phi_k,c^T) * within_c) [v 1]_c, out = out1[:, :d] / out1[:, d].
// The chunk products of a segment are batched (one product over its chunks, `Gemm` of rows.h); the row work (features,
// weights, normalisers and their gradients) is fused per row after the product that made it. The
// backward pass recomputes a segment's pieces from the state entering it and the rows' saved maxima.

#include "rows.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <vector>

namespace {

using namespace eft_native;

// rows [0, n) of P (stride m) in place: P <- phi = exp(P - max) + eps; the max and argmax computed (forward)
// or given (the backward pass's recomputation: bitwise the forward's)
template <typename T>
void feature_rows(T* P, int64_t n, int64_t m, T eps, T* maxima, int64_t* args, bool given) {
  using V = at::vec::Vectorized<T>;
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = P + i * m;
      if (!given) row_max(row, m, maxima[i], args[i]);
      exp_shifted(row, m, maxima[i]);
      int64_t f = 0;
      for (; f + V::size() <= m; f += V::size()) (V::loadu(row + f) + V(eps)).store(row + f);
      for (; f < m; ++f) row[f] += eps;
    }
  });
}

// grad <- grad * (e - shift) (e - shift = E: the features phi less eps) with the epsilon term at the row's max;
// returns (sum_f grad, sum_f grad * E) of the input grad
template <typename T>
inline std::pair<T, T> through_exp_sums(T* grad, const T* e, int64_t m, int64_t arg, T eps, T shift) {
  using V = at::vec::Vectorized<T>;
  V sum(T(0)), weighted(T(0));
  int64_t f = 0;
  for (; f + V::size() <= m; f += V::size()) {
    const V g = V::loadu(grad + f), ge = g * (V::loadu(e + f) - V(shift));
    sum = sum + g;
    weighted = weighted + ge;
    ge.store(grad + f);
  }
  T s = lane_sum(sum), w = lane_sum(weighted);
  for (; f < m; ++f) {
    s += grad[f];
    grad[f] *= e[f] - shift;
    w += grad[f];
  }
  grad[arg] += eps * s;
  return {s, w};
}

template <typename T>
struct Segment {  // one head's scratch for a segment of up to S rows (nc_max chunks of C)
  int64_t S, C, m, d;
  Tensor PHq, PHk, V1, V1w, summaries, states, scores, within, out1, inter;  // PH: the features phi = E + eps
  std::vector<T> running, key_weights, row_scale, chunk_start, chunk_end, decay;
  Segment(int64_t S_, int64_t C_, int64_t m_, int64_t d_, const at::TensorOptions& o) : S(S_), C(C_), m(m_), d(d_) {
    const int64_t nc = S / C;
    for (Tensor* t : {&PHq, &PHk}) *t = at::empty({S, m}, o);
    for (Tensor* t : {&V1, &V1w, &out1, &inter}) *t = at::empty({S, d + 1}, o);
    summaries = at::empty({nc, d + 1, m}, o);  // states and summaries transposed: the faster product layouts
    states = at::empty({nc, d + 1, m}, o);
    scores = at::empty({nc, C, C}, o);
    within = at::empty({nc, C, C}, o);
    running.resize(S), key_weights.resize(S), row_scale.resize(S);
    chunk_start.resize(nc), chunk_end.resize(nc), decay.resize(nc);
  }
  Tensor chunks(const Tensor& rows, int64_t nc) const {  // (nc C, w) -> (nc, C, w)
    return rows.narrow(0, 0, nc * C).view({nc, C, rows.size(1)});
  }
};

// The pieces of segment [s0, s0 + L) of head (qh, kh, vh): features, scan weights, values, chunk summaries,
// the states entering each chunk (from S_in relative to R_in), the within-chunk weights and the weighted
// within-chunk scores, into `scores` (nc, C, C) unless `scores_given` (the backward pass reads the
// forward's). Returns the reference leaving the segment and writes the state leaving it into S_out.
template <typename T>
T segment_pieces(Segment<T>& w, const Tensor& qh, const Tensor& kh, const Tensor& vh, const bool* mask, int64_t s0,
                 int64_t L, const Tensor& omega_t, T eps, T norm_scale, const T* S_in, T R_in, T* S_out,
                 T* qmax, int64_t* qarg, T* kmax, int64_t* karg, T* klog, bool given, const Tensor& scores,
                 bool scores_given, const Tensor& PHq, bool queries_given, const Tensor& PHk, bool keys_given,
                 const Gemm& gemm) {
  const int64_t C = w.C, m = w.m, d = w.d, nc = (L + C - 1) / C, Lp = nc * C, width = m * (d + 1);
  // features phi = exp(P - max) + eps, in place of the projections P; padded rows (L .. Lp) are zeros and
  // carry g = -inf
  if (!queries_given) {
    Tensor target = PHq.narrow(0, 0, L);
    gemm(target, qh.narrow(0, s0, L), omega_t);
    feature_rows(target.data_ptr<T>(), L, m, eps, qmax, qarg, given);
  }
  if (!given) key_log_norms<T>(kh.narrow(0, s0, L), norm_scale, klog);
  if (!keys_given) {
    Tensor target = PHk.narrow(0, 0, L);
    gemm(target, kh.narrow(0, s0, L), omega_t);
    feature_rows(target.data_ptr<T>(), L, m, eps, kmax, karg, given);
  }
  if (!given)
    for (int64_t j = 0; j < L; ++j) klog[j] = (mask && !mask[j]) ? negative_infinity<T>() : kmax[j] + klog[j];
  if (Lp > L) {
    if (!queries_given) PHq.narrow(0, L, Lp - L).zero_();
    if (!keys_given) PHk.narrow(0, L, Lp - L).zero_();
  }
  auto g = [&](int64_t j) { return j < L ? klog[j] : negative_infinity<T>(); };
  // scan weights
  T run = R_in;
  for (int64_t c = 0; c < nc; ++c) {
    w.chunk_start[c] = run;
    for (int64_t i = c * C; i < (c + 1) * C; ++i) w.running[i] = run = std::max(run, g(i));
    w.chunk_end[c] = run;
    w.decay[c] = decay(w.chunk_start[c], w.chunk_end[c]);
    for (int64_t i = c * C; i < (c + 1) * C; ++i) {
      w.key_weights[i] = decay(g(i), w.chunk_end[c]);
      w.row_scale[i] = decay(w.chunk_start[c], w.running[i]);
    }
  }
  // values [v 1] (padding: zeros) and key-weighted values
  T* v1 = w.V1.template data_ptr<T>();
  T* v1w = w.V1w.template data_ptr<T>();
  const T* vp = vh.data_ptr<T>() + s0 * vh.stride(0);
  for (int64_t j = 0; j < Lp; ++j) {
    if (j + kAhead < L) prefetch_row(vp + (j + kAhead) * vh.stride(0), d);  // strided rows: fetch ahead
    T* row = v1 + j * (d + 1);
    T* roww = v1w + j * (d + 1);
    if (g(j) == negative_infinity<T>()) {
      std::fill(row, row + d + 1, T(0));
      std::fill(roww, roww + d + 1, T(0));
      continue;
    }
    const T* vj = vp + j * vh.stride(0);
    const T kw = w.key_weights[j];
    for (int64_t c = 0; c < d; ++c) {
      row[c] = vj[c];
      roww[c] = vj[c] * kw;
    }
    row[d] = T(1);
    roww[d] = kw;
  }
  // chunk summaries T_c and the states entering each chunk
  Tensor summaries = w.summaries.narrow(0, 0, nc), states = w.states.narrow(0, 0, nc);
  gemm(summaries, w.chunks(w.V1w, nc).transpose(1, 2), w.chunks(PHk, nc));  // (nc, d + 1, m): T_c^T
  const T* tp = summaries.data_ptr<T>();
  T* sp = states.data_ptr<T>();
  std::copy(S_in, S_in + width, sp);
  for (int64_t c = 0; c < nc; ++c) {
    T* next = c + 1 < nc ? sp + (c + 1) * width : S_out;
    const T* cur = sp + c * width;
    const T* t = tp + c * width;
    const T a = w.decay[c];
    for (int64_t x = 0; x < width; ++x) next[x] = cur[x] * a + t[x];
  }
  if (nc == 0) std::copy(S_in, S_in + width, S_out);
  // within-chunk weights exp(g_j - M_i) for j <= i (0 above the diagonal), and the weighted scores
  T* within = w.within.template data_ptr<T>();
  at::parallel_for(0, nc * C, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / C, i = r % C;
      T* row = within + r * C;
      const T Mi = w.running[r];
      std::fill(row + i + 1, row + C, T(0));
      if (Mi == negative_infinity<T>()) {  // no real key yet
        std::fill(row, row + i + 1, T(0));
        continue;
      }
      const int64_t real = std::max<int64_t>(0, std::min(i + 1, L - c * C));  // keys of the chunk before L
      std::copy(klog + c * C, klog + c * C + real, row);
      std::fill(row + real, row + i + 1, negative_infinity<T>());
      exp_shifted(row, i + 1, Mi);  // exp(-inf - M) = 0 for padding
    }
  });
  if (!scores_given) {
    Tensor target = scores;
    gemm(target, w.chunks(PHq, nc), w.chunks(PHk, nc).transpose(1, 2));  // (nc, C, C)
    target.mul_(w.within.narrow(0, 0, nc));
  }
  return nc > 0 ? w.chunk_end[nc - 1] : R_in;
}

template <typename T>
void causal_forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& key_mask,
                         const Tensor& kv_in, const Tensor& ref_in, const Tensor& omega, T eps, int64_t chunk,
                         int64_t segment, const Tensor& out, const Tensor& normaliser, const Tensor& entry_kv,
                         const Tensor& entry_ref, const Tensor& kv_out, const Tensor& ref_out, const Tensor& query_max,
                         const Tensor& query_arg, const Tensor& key_max, const Tensor& key_arg,
                         const Tensor& key_log_scale, const Tensor& saved_scores, const Tensor& saved_queries,
                         const Tensor& saved_keys, const Gemm& gemm) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), m = omega.size(0);
  const bool save_scores = saved_scores.numel() > 0;  // (B, H, chunks, C, C) for the backward pass, or empty
  const bool save_queries = saved_queries.numel() > 0;  // (B, H, chunks C, m): the query features, or empty
  const bool save_keys = saved_keys.numel() > 0;  // the same for the keys
  const int64_t C = chunk, S = segment, segments = (N + S - 1) / S, width = m * (d + 1);
  const T norm_scale = T(0.5) / std::sqrt(T(d));
  const Tensor omega_t = omega.t();
  const bool* mask_all = key_mask ? key_mask->data_ptr<bool>() : nullptr;
  for_each_head(B, H, [&](int64_t b, int64_t h) {  // heads in parallel when there are enough
    Segment<T> w(S, C, m, d, q.options());
    const Tensor qh = q.select(0, b).select(0, h), kh = k.select(0, b).select(0, h), vh = v.select(0, b).select(0, h);
    const Tensor outh = out.select(0, b).select(0, h);
    const int64_t head = b * H + h, row0 = head * N;
    std::vector<T> state(kv_in.data_ptr<T>() + head * width, kv_in.data_ptr<T>() + (head + 1) * width);
    T ref = ref_in.data_ptr<T>()[head];
    for (int64_t si = 0; si < segments; ++si) {
      const int64_t s0 = si * S, L = std::min(S, N - s0), nc = (L + C - 1) / C;
      std::copy(state.begin(), state.end(), entry_kv.data_ptr<T>() + (head * segments + si) * width);
      entry_ref.data_ptr<T>()[head * segments + si] = ref;
      std::vector<T> next(width);
      const Tensor scores = save_scores ? saved_scores.select(0, b).select(0, h).narrow(0, s0 / C, nc)
                                        : w.scores.narrow(0, 0, nc);
      const Tensor PHq = save_queries ? saved_queries.select(0, b).select(0, h).narrow(0, s0, nc * C) : w.PHq;
      const Tensor PHk = save_keys ? saved_keys.select(0, b).select(0, h).narrow(0, s0, nc * C) : w.PHk;
      const T next_ref = segment_pieces<T>(
          w, qh, kh, vh, mask_all ? mask_all + b * N + s0 : nullptr, s0, L, omega_t, eps, norm_scale, state.data(),
          ref, next.data(), query_max.data_ptr<T>() + row0 + s0, query_arg.data_ptr<int64_t>() + row0 + s0,
          key_max.data_ptr<T>() + row0 + s0, key_arg.data_ptr<int64_t>() + row0 + s0,
          key_log_scale.data_ptr<T>() + row0 + s0, false, scores, false, PHq, false, PHk, false, gemm);
      Tensor inter = w.chunks(w.inter, nc), out1 = w.chunks(w.out1, nc);
      gemm(inter, w.chunks(PHq, nc), w.states.narrow(0, 0, nc).transpose(1, 2));  // (nc, C, d + 1): phi_q S_c
      gemm(out1, scores, w.chunks(w.V1, nc));  // within the chunks
      const T* ip = w.inter.template data_ptr<T>();
      const T* op = w.out1.template data_ptr<T>();
      T* norm = normaliser.data_ptr<T>() + row0 + s0;
      T* target = outh.data_ptr<T>() + s0 * outh.stride(0);
      at::parallel_for(0, L, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const T* oi = op + i * (d + 1);
          const T* ii = ip + i * (d + 1);
          const T scale = w.row_scale[i];
          const T z = oi[d] + scale * ii[d];
          norm[i] = z;
          T* row = target + i * outh.stride(0);
          const T inverse = z > 0 ? T(1) / z : T(0);  // no key yet: zeros
          for (int64_t c = 0; c < d; ++c) row[c] = (oi[c] + scale * ii[c]) * inverse;
        }
      });
      state.swap(next);
      ref = next_ref;
    }
    std::copy(state.begin(), state.end(), kv_out.data_ptr<T>() + head * width);
    ref_out.data_ptr<T>()[head] = ref;
  });
}

template <typename T>
void causal_backward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& omega, T eps, int64_t chunk,
                          int64_t segment, const Tensor& out, const Tensor& normaliser, const Tensor& entry_kv,
                          const Tensor& entry_ref, const Tensor& query_max, const Tensor& query_arg,
                          const Tensor& key_max, const Tensor& key_arg, const Tensor& key_log_scale,
                          const Tensor& grad_out, const Tensor& grad_kv_out, const Tensor& grad_q, const Tensor& grad_k,
                          const Tensor& grad_v, const Tensor& grad_kv_in, const Tensor& saved_scores,
                          const Tensor& saved_queries, const Tensor& saved_keys, const Gemm& gemm) {
  const bool scores_given = saved_scores.numel() > 0;  // the forward's weighted scores, or recompute them
  const bool queries_given = saved_queries.numel() > 0;  // the forward's query features, or recompute them
  const bool keys_given = saved_keys.numel() > 0;  // the same for the keys
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), m = omega.size(0);
  const int64_t C = chunk, S = segment, segments = (N + S - 1) / S, width = m * (d + 1), nc_max = S / C;
  const T norm_scale = T(0.5) / std::sqrt(T(d));
  const Tensor omega_t = omega.t();
  auto o = q.options();
  for_each_head(B, H, [&](int64_t b, int64_t h) {  // heads in parallel when there are enough
    Segment<T> w(S, C, m, d, o);
    Tensor G1 = at::empty({S, d + 1}, o), scaled = at::empty({S, d + 1}, o), GV1 = at::empty({S, d + 1}, o);
    Tensor through = at::empty({S, d + 1}, o);
    Tensor GPq = at::empty({S, m}, o), GPk = at::empty({S, m}, o);
    Tensor grad_states = at::empty({nc_max, d + 1, m}, o), grad_summaries = at::empty({nc_max, d + 1, m}, o);
    Tensor grad_scores = at::empty({nc_max, C, C}, o);
    std::vector<T> exit_state(width), grad_norm(S);
    const Tensor qh = q.select(0, b).select(0, h), kh = k.select(0, b).select(0, h), vh = v.select(0, b).select(0, h);
    const Tensor outh = out.select(0, b).select(0, h), gouth = grad_out.select(0, b).select(0, h);
    const Tensor gqh = grad_q.select(0, b).select(0, h), gkh = grad_k.select(0, b).select(0, h);
    const Tensor gvh = grad_v.select(0, b).select(0, h);
    const int64_t head = b * H + h, row0 = head * N;
    std::vector<T> grad_state(grad_kv_out.data_ptr<T>() + head * width, grad_kv_out.data_ptr<T>() + (head + 1) * width);
    for (int64_t si = segments - 1; si >= 0; --si) {
      const int64_t s0 = si * S, L = std::min(S, N - s0), nc = (L + C - 1) / C, Lp = nc * C;
      const T* qmax = query_max.data_ptr<T>() + row0 + s0;
      const int64_t* qarg = query_arg.data_ptr<int64_t>() + row0 + s0;
      const T* kmax = key_max.data_ptr<T>() + row0 + s0;
      const int64_t* karg = key_arg.data_ptr<int64_t>() + row0 + s0;
      T* klog = key_log_scale.data_ptr<T>() + row0 + s0;
      const Tensor scores = scores_given ? saved_scores.select(0, b).select(0, h).narrow(0, s0 / C, nc)
                                         : w.scores.narrow(0, 0, nc);
      const Tensor PHq = queries_given ? saved_queries.select(0, b).select(0, h).narrow(0, s0, Lp) : w.PHq;
      const Tensor PHk = keys_given ? saved_keys.select(0, b).select(0, h).narrow(0, s0, Lp) : w.PHk;
      segment_pieces<T>(w, qh, kh, vh, nullptr, s0, L, omega_t, eps, norm_scale,
                        entry_kv.data_ptr<T>() + (head * segments + si) * width,
                        entry_ref.data_ptr<T>()[head * segments + si], exit_state.data(), const_cast<T*>(qmax),
                        const_cast<int64_t*>(qarg), const_cast<T*>(kmax), const_cast<int64_t*>(karg), klog, true,
                        scores, scores_given, PHq, queries_given, PHk, keys_given, gemm);
      // d loss / d out1 (padded rows: zeros) and its row-scaled copy
      T* g1 = G1.data_ptr<T>();
      T* sc = scaled.data_ptr<T>();
      const T* norm = normaliser.data_ptr<T>() + row0 + s0;
      const T* outp = outh.data_ptr<T>() + s0 * outh.stride(0);
      const T* gop = gouth.data_ptr<T>() + s0 * gouth.stride(0);
      at::parallel_for(0, Lp, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T* row = g1 + i * (d + 1);
          T* srow = sc + i * (d + 1);
          const T z = i < L ? norm[i] : T(0);
          if (i + kAhead < std::min(end, L)) {
            prefetch_row(gop + (i + kAhead) * gouth.stride(0), d);
            prefetch_row(outp + (i + kAhead) * outh.stride(0), d);
          }
          if (z > 0) {
            const T inverse = T(1) / z;
            const T* go = gop + i * gouth.stride(0);
            for (int64_t c = 0; c < d; ++c) row[c] = go[c] * inverse;
            row[d] = -dot(row, outp + i * outh.stride(0), d);
          } else {
            std::fill(row, row + d + 1, T(0));
          }
          const T rs = w.row_scale[i];
          for (int64_t c = 0; c <= d; ++c) srow[c] = row[c] * rs;
        }
      });
      Tensor G1c = w.chunks(G1, nc), scaledc = w.chunks(scaled, nc);
      Tensor PHqc = w.chunks(PHq, nc), PHkc = w.chunks(PHk, nc);
      Tensor GPqc = w.chunks(GPq, nc), GPkc = w.chunks(GPk, nc), GV1c = w.chunks(GV1, nc);
      Tensor states = w.states.narrow(0, 0, nc), gstates = grad_states.narrow(0, 0, nc);
      Tensor gsumm = grad_summaries.narrow(0, 0, nc), gscores = grad_scores.narrow(0, 0, nc);
      // inter-chunk
      gemm(GPqc, scaledc, states);  // (nc, C, m)
      gemm(gstates, scaledc.transpose(1, 2), PHqc);  // (nc, d + 1, m)
      // intra-chunk: d loss / d scores, weighted like the scores
      gemm(gscores, G1c, w.chunks(w.V1, nc).transpose(1, 2));  // (nc, C, C)
      gscores.mul_(w.within.narrow(0, 0, nc));
      gemm(GPqc, gscores, PHkc, true);
      gemm(GPkc, gscores.transpose(1, 2), PHqc);  // (nc, C, m)
      gemm(GV1c, scores.transpose(1, 2), G1c);  // (nc, C, d + 1)
      // through the carried states: the adjoint recurrence
      {
        const T* gst = gstates.data_ptr<T>();
        T* gsu = gsumm.data_ptr<T>();
        for (int64_t c = nc - 1; c >= 0; --c) {
          std::copy(grad_state.begin(), grad_state.end(), gsu + c * width);  // d loss / d T_c = d loss / d S_c+1
          const T a = w.decay[c];
          const T* direct = gst + c * width;
          for (int64_t x = 0; x < width; ++x) grad_state[x] = direct[x] + a * grad_state[x];
        }
      }
      gemm(GPkc, w.chunks(w.V1w, nc), gsumm, true);
      Tensor throughc = w.chunks(through, nc);
      gemm(throughc, PHkc, gsumm.transpose(1, 2));  // (nc, C, d + 1), times the key weights below
      // through the feature maps, and d loss / d v
      T* gpq = GPq.data_ptr<T>();
      T* gpk = GPk.data_ptr<T>();
      // E = exp(P - max) = phi - eps, from the recomputed or the kept features
      const T* eq = PHq.template data_ptr<T>();
      const T* ek = PHk.template data_ptr<T>();
      const T* gv1 = GV1.data_ptr<T>();
      const T* thr = through.data_ptr<T>();
      T* gvp = gvh.data_ptr<T>() + s0 * gvh.stride(0);
      at::parallel_for(0, L, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          through_exp_sums(gpq + i * m, eq + i * m, m, qarg[i], eps, eps);
          const auto sums = through_exp_sums(gpk + i * m, ek + i * m, m, karg[i], eps, eps);
          grad_norm[i] = sums.second + eps * sums.first;  // sum_f d loss / d phi_f phi_f
          T* gv = gvp + i * gvh.stride(0);
          const bool padded = klog[i] == negative_infinity<T>();
          const T kw = w.key_weights[i];
          for (int64_t c = 0; c < d; ++c) gv[c] = padded ? T(0) : gv1[i * (d + 1) + c] + thr[i * (d + 1) + c] * kw;
        }
      });
      Tensor gq_target = gqh.narrow(0, s0, L), gk_target = gkh.narrow(0, s0, L);
      gemm(gq_target, GPq.narrow(0, 0, L), omega);  // (L, d), into the heads-last buffers
      gemm(gk_target, GPk.narrow(0, 0, L), omega);
      add_log_norm_gradient<T>(gk_target, kh.narrow(0, s0, L), grad_norm.data());
    }
    std::copy(grad_state.begin(), grad_state.end(), grad_kv_in.data_ptr<T>() + head * width);
  });
}

// The weighted within-chunk scores: empty (recompute them) or (B, H, ceil(N / C), C, C), contiguous, q's dtype
void check_saved_scores(const Tensor& q, int64_t chunk, const Tensor& scores) {
  if (scores.numel() == 0) return;
  const std::vector<int64_t> expected{q.size(0), q.size(1), (q.size(2) + chunk - 1) / chunk, chunk, chunk};
  TORCH_CHECK(scores.sizes() == at::IntArrayRef(expected) && scores.is_contiguous() &&
                  scores.scalar_type() == q.scalar_type(),
              "favor_causal: saved_scores must be empty or a contiguous (B, H, ceil(N / C), C, C) tensor of q's dtype, got ",
              scores.sizes());
}

// Query or key features kept for the backward pass (phi = E + eps): empty (recompute them) or
// (B, H, ceil(N / C) C, m), contiguous, q's dtype
void check_saved_features(const Tensor& q, const Tensor& omega, int64_t chunk, const Tensor& features,
                          const char* name) {
  if (features.numel() == 0) return;
  const std::vector<int64_t> expected{q.size(0), q.size(1), (q.size(2) + chunk - 1) / chunk * chunk, omega.size(0)};
  TORCH_CHECK(features.sizes() == at::IntArrayRef(expected) && features.is_contiguous() &&
                  features.scalar_type() == q.scalar_type(),
              "favor_causal: ", name, " must be empty or a contiguous (B, H, ceil(N / C) C, m) tensor of q's dtype, got ",
              features.sizes());
}

void favor_causal_forward(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& key_mask,
                          const Tensor& kv_in, const Tensor& ref_in, const Tensor& omega, double eps, int64_t chunk,
                          int64_t segment, const Tensor& out, const Tensor& normaliser, const Tensor& entry_kv,
                          const Tensor& entry_ref, const Tensor& kv_out, const Tensor& ref_out, const Tensor& query_max,
                          const Tensor& query_arg, const Tensor& key_max, const Tensor& key_arg,
                          const Tensor& key_log_scale, const Tensor& saved_scores, const Tensor& saved_queries,
                          const Tensor& saved_keys, bool onednn) {
  TORCH_CHECK(chunk > 0 && segment % chunk == 0, "favor_causal: the segment must be a multiple of the chunk");
  check_saved_scores(q, chunk, saved_scores);
  check_saved_features(q, omega, chunk, saved_queries, "saved_queries");
  check_saved_features(q, omega, chunk, saved_keys, "saved_keys");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "favor_causal_forward", [&] {
    causal_forward_impl<scalar_t>(q, k, v, key_mask, kv_in, ref_in, omega, static_cast<scalar_t>(eps), chunk,
                                  std::min<int64_t>(segment, (q.size(2) + chunk - 1) / chunk * chunk), out, normaliser,
                                  entry_kv, entry_ref, kv_out, ref_out, query_max, query_arg, key_max, key_arg,
                                  key_log_scale, saved_scores, saved_queries, saved_keys, Gemm(onednn));
  });
}

void favor_causal_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& omega, double eps,
                           int64_t chunk, int64_t segment, const Tensor& out, const Tensor& normaliser,
                           const Tensor& entry_kv, const Tensor& entry_ref, const Tensor& query_max,
                           const Tensor& query_arg, const Tensor& key_max, const Tensor& key_arg,
                           const Tensor& key_log_scale, const Tensor& grad_out, const Tensor& grad_kv_out,
                           const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_v, const Tensor& grad_kv_in,
                           const Tensor& saved_scores, const Tensor& saved_queries, const Tensor& saved_keys,
                           bool onednn) {
  check_saved_scores(q, chunk, saved_scores);
  check_saved_features(q, omega, chunk, saved_queries, "saved_queries");
  check_saved_features(q, omega, chunk, saved_keys, "saved_keys");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "favor_causal_backward", [&] {
    causal_backward_impl<scalar_t>(q, k, v, omega, static_cast<scalar_t>(eps), chunk,
                                   std::min<int64_t>(segment, (q.size(2) + chunk - 1) / chunk * chunk), out,
                                   normaliser, entry_kv, entry_ref, query_max, query_arg, key_max, key_arg,
                                   key_log_scale, grad_out, grad_kv_out, grad_q, grad_k, grad_v, grad_kv_in,
                                   saved_scores, saved_queries, saved_keys, Gemm(onednn));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(efficient_transformers, m) {
  m.def("favor_causal_forward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(favor_causal_forward)));
  m.def("favor_causal_backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(favor_causal_backward)));
}
