// Row primitives shared by the native FAVOR+ kernels (favor.cpp: bidirectional, favor_causal.cpp:
// causal): per-row max and argmax, exp(x - max) in place, the gradient through it and the epsilon
// term, the keys' log-norms and weights, vectorised with ATen's `at::vec::Vectorized`.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace eft_native {

using at::Tensor;
constexpr int64_t kRowGrain = 32;  // rows per task of at::parallel_for

// The kernels' matrix products: ATen's (its BLAS, MKL in the x86 wheels) or oneDNN's. Where MKL runs its
// AVX2 kernels (on AMD CPUs) oneDNN's run about twice as fast; `core/gemm.py` measures that and the ops
// take its choice. oneDNN's product is `at::native::mkldnn_matmul(a, b, c, beta, alpha)`: c = beta c +
// alpha a b, 2-D or a batch of 3-D, any strides, float32 as float32 (unless the user allowed bf16/tf32
// for float32 products, as for PyTorch's own). libtorch_cpu exports it but the installed headers do not
// declare it, so it is looked up by its symbol; where a PyTorch build lacks it, ATen's product runs.
class Gemm {
 public:
  explicit Gemm(bool onednn) : onednn_(onednn ? onednn_matmul() : nullptr) {}
  bool onednn() const { return onednn_ != nullptr; }
  // out = a b, or out += a b with `accumulate`; 2-D operands, or 3-D for a batch of products
  void operator()(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate = false) const {
    if (onednn_ && out.scalar_type() == at::kFloat) {
      onednn_(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
      return;
    }
    Tensor target = out;
    if (a.dim() == 2) {
      if (accumulate) target.addmm_(a, b); else at::mm_out(target, a, b);
    } else {
      if (accumulate) target.baddbmm_(a, b); else at::bmm_out(target, a, b);
    }
  }

 private:
  using Matmul = void (*)(const Tensor&, const Tensor&, const Tensor&, float, float);
  static Matmul onednn_matmul() {
    static const Matmul found = [] {
      void* library = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
      return library ? reinterpret_cast<Matmul>(dlsym(library, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"))
                     : nullptr;
    }();
    return found;
  }
  Matmul onednn_;
};

template <typename T>
T negative_infinity() {
  return -std::numeric_limits<T>::infinity();
}

// The sum and the max of a vector's lanes, by shuffles (a scalar loop over stored lanes is a chain of
// dependent adds, measured to cost more than the row pass around it)
template <typename T>
inline T lane_sum(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return a + b; }, x);
}

template <typename T>
inline T lane_max(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return at::vec::maximum(a, b); }, x);
}

// sum_c a_c b_c over n numbers
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = at::vec::Vectorized<T>;
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) acc = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), acc);
  T total = lane_sum(acc);
  for (; c < n; ++c) total += a[c] * b[c];
  return total;
}

// The row's largest value and the first feature holding it. Four running maxima, not one: a single
// chain of dependent vector maxima is bound by their latency (measured: the max pass cost more than the
// exp pass after it).
template <typename T>
inline void row_max(const T* x, int64_t m, T& best, int64_t& arg) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V peak0(negative_infinity<T>()), peak1 = peak0, peak2 = peak0, peak3 = peak0;
  int64_t f = 0;
  for (; f + 4 * W <= m; f += 4 * W) {
    peak0 = at::vec::maximum(peak0, V::loadu(x + f));
    peak1 = at::vec::maximum(peak1, V::loadu(x + f + W));
    peak2 = at::vec::maximum(peak2, V::loadu(x + f + 2 * W));
    peak3 = at::vec::maximum(peak3, V::loadu(x + f + 3 * W));
  }
  for (; f + W <= m; f += W) peak0 = at::vec::maximum(peak0, V::loadu(x + f));
  best = lane_max(at::vec::maximum(at::vec::maximum(peak0, peak1), at::vec::maximum(peak2, peak3)));
  for (; f < m; ++f) best = std::max(best, x[f]);
  arg = 0;  // the first feature equal to the max, a vector at a time
  const V target(best);
  int64_t g = 0;
  for (; g + W <= m; g += W) {
    const int zeros = (V::loadu(x + g) - target).zero_mask();  // bit i set where lane i equals the max
    if (zeros) {
      arg = g + __builtin_ctz(zeros);
      return;
    }
  }
  for (; g < m; ++g) {
    if (x[g] == best) {
      arg = g;
      return;
    }
  }
}

// Prefetch the rows [j + kAhead] of a strided (rows, n) view: rows far apart defeat the hardware prefetcher.
constexpr int64_t kAhead = 4;
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  for (int64_t c = 0; c < n; c += 64 / int64_t(sizeof(T))) __builtin_prefetch(row + c);
}

// x <- exp(x - shift), in place. ATen's `exp_u20` (what its CPU flash attention uses): within 20 ulp
// in float32 (about 1e-6 relative, against 1 ulp for `exp`) at about half the cost; in float64 it is
// the exact `exp`. The backward pass recomputes with the same call, so its features are the forward's.
template <typename T>
inline void exp_shifted(T* x, int64_t m, T shift) {
  using V = at::vec::Vectorized<T>;
  const V s(shift);
  int64_t f = 0;
  for (; f + V::size() <= m; f += V::size()) (V::loadu(x + f) - s).exp_u20().store(x + f);
  if (f < m) (V::loadu(x + f, m - f) - s).exp_u20().store(x + f, m - f);
}

// grad <- grad * e, then grad[arg] += extra (the epsilon term follows the row's max)
template <typename T>
inline void through_exp(T* grad, const T* e, int64_t m, int64_t arg, T extra) {
  using V = at::vec::Vectorized<T>;
  int64_t f = 0;
  for (; f + V::size() <= m; f += V::size()) (V::loadu(grad + f) * V::loadu(e + f)).store(grad + f);
  for (; f < m; ++f) grad[f] *= e[f];
  grad[arg] += extra;
}

// exp(a - b) for a <= b, with -inf meaning "nothing" (-> 0, never NaN)
template <typename T>
inline T decay(T a, T b) {
  return a == negative_infinity<T>() ? T(0) : std::exp(a - b);
}

// f(b, h) for every head: in parallel over heads (one thread each, their products and row loops serial)
// when there are at least as many heads as threads, else one head at a time with the parallelism inside
template <typename F>
void for_each_head(int64_t B, int64_t H, const F& f) {
  const int64_t heads = B * H, threads = at::get_num_threads();
  if (threads > 1 && heads >= threads) {
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i / H, i % H);
    });
  } else {
    for (int64_t i = 0; i < heads; ++i) f(i / H, i % H);
  }
}

struct Geometry {
  int64_t B, H, N, d, m, segment;
};

inline Geometry geometry(const Tensor& q, const Tensor& omega, int64_t segment) {
  TORCH_CHECK(q.dim() == 4, "favor: q must be (B, H, N, d)");
  TORCH_CHECK(omega.dim() == 2 && omega.size(1) == q.size(3), "favor: omega must be (m, d)");
  TORCH_CHECK(segment > 0, "favor: segment must be positive");
  return {q.size(0), q.size(1), q.size(2), q.size(3), omega.size(0), std::min(segment, q.size(2))};
}

// Key segment [s, s + n) of head (b, h): P <- E (in place); unless `recompute`, per row its max, argmax
// and log-scale g = max + log_norm (`log_scale` holds the log-norms on entry; -inf for padding).
template <typename T>
void key_rows(const Tensor& P, const bool* mask, T* key_max, int64_t* key_arg, T* log_scale, bool recompute) {
  const int64_t n = P.size(0), m = P.size(1);
  T* p = P.data_ptr<T>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T* row = p + j * m;
      if (!recompute) {
        row_max(row, m, key_max[j], key_arg[j]);
        log_scale[j] = (mask && !mask[j]) ? negative_infinity<T>() : key_max[j] + log_scale[j];
      }
      exp_shifted(row, m, key_max[j]);
    }
  });
}

// log_norm(k_j) = -|k_j|^2 / (2 sqrt d) for the rows of a strided (n, d) view, into `log_norm`.
template <typename T>
void key_log_norms(const Tensor& keys, T norm_scale, T* log_norm) {
  const int64_t n = keys.size(0), d = keys.size(1), stride = keys.stride(0);
  const T* k = keys.data_ptr<T>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (j + kAhead < end) prefetch_row(k + (j + kAhead) * stride, d);
      const T* kj = k + j * stride;
      log_norm[j] = -dot(kj, kj, d) * norm_scale;
    }
  });
}

// V1 rows [v_j w_j, w_j] with w_j = exp(g_j - ref); returns nothing, writes V1 (n, d + 1) and weights.
template <typename T>
void weighted_values(const Tensor& V1, const Tensor& values, const T* log_scale, T ref, T* weights) {
  const int64_t n = V1.size(0), d = values.size(1);
  T* out = V1.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  const int64_t v_stride = values.stride(0);
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T w = decay(log_scale[j], ref);
      weights[j] = w;
      T* row = out + j * (d + 1);
      const T* vj = v + j * v_stride;
      if (j + kAhead < end) prefetch_row(v + (j + kAhead) * v_stride, d);
      for (int64_t c = 0; c < d; ++c) row[c] = vj[c] * w;
      row[d] = w;
    }
  });
}

// grad_k_j += k_j * grad_norm_j * (-1 / sqrt d): the log-norm's gradient, for the rows of strided (n, d) views
template <typename T>
void add_log_norm_gradient(const Tensor& grad_keys, const Tensor& keys, const T* grad_norm) {
  const int64_t n = keys.size(0), d = keys.size(1);
  const T scale = T(-1) / std::sqrt(T(d));
  T* gk = grad_keys.data_ptr<T>();
  const T* kp = keys.data_ptr<T>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T* row = gk + j * grad_keys.stride(0);
      const T* kj = kp + j * keys.stride(0);
      if (j + kAhead < end) prefetch_row(kp + (j + kAhead) * keys.stride(0), d);
      const T factor = grad_norm[j] * scale;
      for (int64_t c = 0; c < d; ++c) row[c] += kj[c] * factor;
    }
  });
}

template <typename T>
void column_sums(const T* x, int64_t rows, int64_t cols, T* sums) {
  std::fill(sums, sums + cols, T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) sums[c] += x[r * cols + c];
}

}  // namespace eft_native
