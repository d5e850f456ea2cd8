// oneDNN's matrix product for Python (`core.gemm.onednn_matmul`): out = a b, or out += a b, 2-D or a batch of
// 3-D products, any strides, into `out` (PyTorch's Python API reaches oneDNN's float32 matmul only through
// `mkldnn::_linear_pointwise`, which allocates its result and takes no batch of weights). The product is
// `Gemm` of rows.h, the one the FAVOR+ kernels use.

#include "rows.h"

#include <torch/library.h>

namespace {

bool onednn_matmul_available() { return eft_native::Gemm(true).onednn(); }

void onednn_matmul_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const eft_native::Gemm gemm(true);
  TORCH_CHECK(gemm.onednn(), "onednn_matmul_out: oneDNN's matmul is not in this PyTorch build");
  TORCH_CHECK(out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "onednn_matmul_out: float32 operands only, got ", a.scalar_type(), ", ", b.scalar_type(), " -> ",
              out.scalar_type());
  TORCH_CHECK((a.dim() == 2 || a.dim() == 3) && b.dim() == a.dim() && out.dim() == a.dim(),
              "onednn_matmul_out: 2-D or 3-D operands of one rank, got ", a.dim(), ", ", b.dim(), " -> ", out.dim());
  const int64_t r = a.dim();
  TORCH_CHECK(a.size(r - 1) == b.size(r - 2) && out.size(r - 2) == a.size(r - 2) && out.size(r - 1) == b.size(r - 1) &&
                  (r == 2 || (a.size(0) == b.size(0) && out.size(0) == a.size(0))),
              "onednn_matmul_out: shapes do not multiply: ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes());
  gemm(out, a, b, accumulate);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(efficient_transformers, m) {
  m.def("onednn_matmul_available", &onednn_matmul_available);
  m.def("onednn_matmul_out", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(onednn_matmul_out)));
}
