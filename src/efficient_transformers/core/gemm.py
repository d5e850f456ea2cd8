"""Which library runs a float32 matrix product on this CPU: PyTorch's BLAS (MKL) or oneDNN.

PyTorch runs a float32 `mm`/`bmm`/`addmm` on CPU through its BLAS, MKL in the x86 wheels. MKL picks
its code path by CPU *vendor*: on an AMD CPU it runs its AVX2 kernels even where the core has
AVX-512. The same wheel also ships oneDNN, which picks by instruction set, and exposes its matmul
as `torch.ops.mkldnn._linear_pointwise` (the op PyTorch's CPU inductor backend fuses linear layers
into; C++ code reaches it as `at::native::mkldnn_matmul`). Measured one thread, float32
(`python -m efficient_transformers.bench.ceiling --backends`):

| machine | torch.mm (MKL) | oneDNN |
|---|---|---|
| Intel Xeon, AVX-512 (sessions up to 24) | about 183 GFLOP/s | not measured then |
| AMD EPYC Zen 5, 2.6 GHz, AVX-512 | 90-96 GFLOP/s | 200-212 GFLOP/s (1024 x 256 x 64: 190-201) |

PyTorch's float32 products never reach oneDNN on their own (its `fp32_precision` routes use bf16 or
tf32 arithmetic, not float32). So:

- **the library's heavy float32 products** -- every layer's q/k/v and output projections (`linear`,
  `matmul`, used by `core.projection` and `core.layer`) and the native FAVOR+ kernels' products
  (`prefers_onednn`, passed to `native`) -- run on oneDNN where MKL is throttled: `EFT_MATMUL` =
  "auto" (default: oneDNN on an AVX-512 CPU that is not Intel's, where PyTorch's BLAS is MKL -- a
  rule, not a timing, so that every process of a run, e.g. a training run and its resumption, makes
  the same products bit for bit), "torch" (always PyTorch's product) or "onednn" (oneDNN wherever it
  takes the dtype). Both compute the same float32 products, in another order of
  summation; float64 and other dtypes, autocast and non-CPU devices always use PyTorch's product.
  So do the block-sparse engine's batched products (`batched_matmul`) and the mechanisms' own
  differentiable products (`product_with_grad`: Transformer-XL's and Compressive's relative-position
  attention, Linformer's and Sinkhorn's projections). Everything else (Reformer's hashing and
  Routing's k-means assignments, SDPA's kernel) runs PyTorch's products as it always does.
- **a ceiling** (`bench.products.replay`) is a lower bound on *any* implementation's step, so each
  replayed shape runs on whichever backend is faster for it (`fastest`, timed once per shape), and the
  machine's matrix-multiply rate (`bench.harness.matmul_rate`) is the faster backend's.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import native
from . import buffer_pool

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
BACKEND_ENV = "EFT_MATMUL"
BACKENDS = ("auto", "torch", "onednn")
# The smallest batched product (2 batch m k n) that "auto" takes to oneDNN: measured one thread on the AMD
# EPYC, 64 x 64 x 128 takes 14 us on MKL and 27 on oneDNN, 2 x 64 x 64 x 256 (4.2 MFLOP) 51 and 46,
# 3 x 64 x 64 x 320 88 and 55.
ONEDNN_MIN_BATCH_FLOPS = 2**22
_choices: dict[tuple, str] = {}


def onednn_usable(dtype: torch.dtype, device: str | torch.device = "cpu") -> bool:
    """Whether oneDNN's matmul can run this product here (CPU, float32 or bfloat16, oneDNN built in)."""
    return (torch.device(device).type == "cpu" and dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_product(a: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """a @ weight^T (+ bias) through oneDNN: a (..., k), weight (n, k) -> (..., n); any strides (a new
    tensor: the op has no out=)."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")


def onednn_matmul(a: Tensor, b: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
    """out = a @ b (out += a @ b with `accumulate`) through oneDNN, 2-D or a batch of 3-D float32 products.

    With the native kernels built (`native.enabled()`), oneDNN's product writes into `out` directly
    (`native/matmul.cpp`); otherwise `onednn_product` per batch item, its result copied or added."""
    if native.enabled() and torch.ops.efficient_transformers.onednn_matmul_available():
        torch.ops.efficient_transformers.onednn_matmul_out(out, a, b, accumulate)
        return out
    pairs = [(a, b, out)] if a.dim() == 2 else zip(a, b, out)
    for a_i, b_i, out_i in pairs:
        result = onednn_product(a_i, b_i.t())
        out_i.add_(result) if accumulate else out_i.copy_(result)
    return out


def best_time(call: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls after a warm-up call, in seconds."""
    call()  # warm-up: oneDNN creates (and caches) its primitive here
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def fastest(key: tuple, candidates: dict[str, Callable[[], object]] | Callable[[], dict[str, Callable[[], object]]]) -> str:
    """The name of the fastest candidate (each the same product on another backend), best of 3 timed calls
    after a warm-up; remembered per `key` and thread count, so a shape is timed once per process
    (`candidates` may be a callable making them, called only then)."""
    full_key = key + (torch.get_num_threads(),)
    if full_key not in _choices:
        candidates = candidates() if callable(candidates) else candidates
        times = {name: best_time(call) for name, call in candidates.items()}
        _choices[full_key] = min(times, key=times.get)
    return _choices[full_key]


def library_backend() -> str:
    """`EFT_MATMUL` from the environment ("auto" when unset), checked."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a matrix-multiply backend; allowed: {', '.join(BACKENDS)}")
    return value


def prefers_onednn(dtype: torch.dtype, device: str | torch.device = "cpu") -> bool:
    """Whether the library's heavy products of this dtype run on oneDNN here (see the module doc)."""
    backend = library_backend()
    if backend == "torch" or not onednn_usable(dtype, device) or dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast decides the products' dtype: PyTorch's ops keep that contract
    return backend == "onednn" or mkl_is_throttled()


@functools.cache
def mkl_is_throttled() -> bool:
    """PyTorch's BLAS is MKL and the CPU is an AVX-512 one not made by Intel (MKL then runs its AVX2
    kernels: half the rate measured on an AMD EPYC Zen 5, see the module doc)."""
    if not torch.backends.mkl.is_available() or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return cpu_vendor() not in ("GenuineIntel", "")  # unknown: assume nothing


def cpu_vendor() -> str:
    """The x86 vendor string of /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), or "" where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def square_rates(size: int, device: str = "cpu") -> dict[str, Callable[[], object]]:
    """size^3 float32 products, one callable per backend usable here (for `bench.harness.matmul_rate`)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    calls: dict[str, Callable[[], object]] = {"torch.matmul": lambda: torch.matmul(a, b)}
    if onednn_usable(torch.float32, device):
        weight = b.t().contiguous()  # (n, k): a @ b
        calls["oneDNN"] = lambda: onednn_product(a, weight)
    return calls


# ---------------------------------------------------------------------------------------- the library's products
def _into_new(a: Tensor, b: Tensor, bias: Tensor | None = None, shape: tuple[int, ...] | None = None) -> Tensor:
    """a (m, k) @ b (k, n) (+ bias (n,)) on the preferred backend, no autograd, into a new buffer of
    `shape` (default (m, n); not a view, so that a caller may modify it in place) from `core.buffer_pool`
    (a large one is memory already touched: no page faults)."""
    shape = (a.shape[0], b.shape[1]) if shape is None else shape
    onednn = prefers_onednn(a.dtype, a.device) and b.dtype == a.dtype
    if onednn and not native.enabled():  # oneDNN's product without out=: it allocates its result
        return onednn_product(a, b.t(), bias).reshape(shape)
    out = buffer_pool.empty(shape, a.dtype, a.device)
    rows = out.view(a.shape[0], b.shape[1])  # (m, n)
    if onednn:
        if bias is not None:
            rows.copy_(bias.expand_as(rows))
        onednn_matmul(a, b, rows, accumulate=bias is not None)
    elif bias is None:
        torch.mm(a, b, out=rows)
    else:
        torch.addmm(bias, a, b, out=rows)
    return out


def matmul(a: Tensor, b: Tensor, *, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """a (m, k) @ b (k, n) on the preferred backend (`prefers_onednn`), without autograd; into `out`, or
    added to it with `accumulate`; a new result comes from `core.buffer_pool`."""
    if out is None:
        return _into_new(a, b)  # (m, n)
    if not prefers_onednn(a.dtype, a.device) or b.dtype != a.dtype:
        return torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    return onednn_matmul(a, b, out, accumulate)


def batched_matmul(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a @ b for a batch of products, without autograd: a (..., m, k), b (..., k, n) -> out (..., m, n),
    one leading shape for all three (no broadcasting), any strides in the last two dimensions.

    On oneDNN (`native/matmul.cpp`) where `prefers_onednn` and the native kernels are built, when the
    leading dimensions of each operand merge into one without a copy; otherwise `torch.matmul(out=)`
    (also inside `native.portable()`, so that the ceiling recorder and the FLOP counter see the
    product). The block-sparse engine's products (`core.block_sparse`) run here: batches of small
    products, 64 x 64 x 192 and the like, where oneDNN measured 1.7-2.7x MKL's rate on the AMD EPYC.
    A oneDNN call costs about 20 us more than a `bmm`, so under "auto" a batch of fewer than
    `ONEDNN_MIN_BATCH_FLOPS` stays on PyTorch's product (a rule on the shape: every process decides the
    same); `EFT_MATMUL=onednn` takes every batch to oneDNN."""
    if (a.dim() >= 3 and a.shape[:-2] == b.shape[:-2] == out.shape[:-2] and a.dtype == b.dtype == out.dtype
            and prefers_onednn(a.dtype, a.device) and native.enabled()
            and (2 * out.numel() * a.shape[-1] >= ONEDNN_MIN_BATCH_FLOPS or library_backend() == "onednn")
            and torch.ops.efficient_transformers.onednn_matmul_available()):
        try:
            a3, b3, out3 = (x.view(-1, *x.shape[-2:]) for x in (a, b, out))  # (batch, m, k), (batch, k, n), (batch, m, n)
        except RuntimeError:  # leading dimensions that do not merge: PyTorch's product below
            pass
        else:
            torch.ops.efficient_transformers.onednn_matmul_out(out3, _dense_batch(a3), _dense_batch(b3), False)
            return out
    return torch.matmul(a, b, out=out)


def _dense_batch(x: Tensor) -> Tensor:
    """x (batch, m, k) as oneDNN's matmul reads it without a copy of its own: each matrix dense, row- or
    column-major, one after the other. Other strides (the block-sparse engine's overlapping band views)
    are copied here into whichever of the two layouts keeps x's contiguous dimension contiguous:
    PyTorch's wrapper would copy to row-major, a transposing copy that measured 96 GFLOP/s for the
    whole product against 144 this way (7 x 64 x 64 by 64 x 576, one thread, AMD EPYC)."""
    if x.is_contiguous() or x.transpose(1, 2).is_contiguous():
        return x
    if x.stride(1) == 1 and x.stride(2) != 1:
        return x.transpose(1, 2).contiguous().transpose(1, 2)  # (batch, m, k), column-major matrices
    return x.contiguous()


def product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., k) @ weight^T (+ bias): `F.linear`'s value, without autograd, on the preferred backend and
    into a `core.buffer_pool` buffer (for custom autograd Functions' forward passes). Under autocast, or
    with mixed dtypes, it is `F.linear` itself."""
    if (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)
            or torch.is_autocast_enabled(x.device.type)):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (M, k): a view of a contiguous or heads-merged x
    return _into_new(rows, weight.t(), bias, (*x.shape[:-1], weight.shape[0]))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` on the preferred backend, with its gradients (first order: a layer
    whose loss needs double backward sets `EFT_MATMUL=torch`)."""
    if not prefers_onednn(x.dtype, x.device) or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return product(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def product_with_grad(a: Tensor, b: Tensor) -> Tensor:
    """`torch.matmul(a, b)`'s value and first-order gradients, a (..., m, k) and b (..., k, n) of two or more
    dimensions, leading dimensions broadcast; forward and backward products on oneDNN where
    `prefers_onednn` (`matmul` for two 2-D operands, else `batched_matmul`), otherwise `torch.matmul`
    itself. The dense products of the mechanisms that attend over a window or memory with relative
    positions (Transformer-XL, Compressive) and the low-rank projections (Linformer, Sinkhorn's sorting)
    run here. Double backward: set `EFT_MATMUL=torch`, as for `linear`."""
    if a.dim() < 2 or b.dim() < 2 or a.dtype != b.dtype or not prefers_onednn(a.dtype, a.device):
        return torch.matmul(a, b)
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return _product(a, b)
    return _OneDNNProduct.apply(a, b)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b without autograd on the preferred backend: (m, k) @ (k, n), or broadcast batches."""
    if a.dim() == 2 and b.dim() == 2:
        return matmul(a, b)  # (m, n)
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = buffer_pool.empty((*lead, a.shape[-2], b.shape[-1]), a.dtype, a.device)  # (..., m, n)
    return batched_matmul(a.expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:]), out)


class _OneDNNProduct(torch.autograd.Function):
    """y = a b with d a = g b^T and d b = a^T g (summed over broadcast dimensions), every product on
    `_product`."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return _product(a, b)  # (..., m, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _product(grad, b.transpose(-1, -2)).sum_to_size(a.shape)  # (..., m, k)
        if ctx.needs_input_grad[1]:
            grad_b = _product(a.transpose(-1, -2), grad).sum_to_size(b.shape)  # (..., k, n)
        return grad_a, grad_b


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with every product (forward, d x = g W, d W = g^T x) on oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)  # (..., n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows_grad = grad.reshape(-1, weight.shape[0])  # (M, n)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(rows_grad, weight).view(x.shape)  # g W
        if ctx.needs_input_grad[1]:  # g^T x: (n, k), the transposed operand read in place (no copy)
            grad_weight = onednn_matmul(rows_grad.t(), x.reshape(-1, x.shape[-1]), torch.empty_like(weight))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows_grad.sum(0)
        return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------- measuring
def backend_table(shapes=((1024, 1024, 1024), (1024, 256, 64), (1024, 65, 256), (16384, 768, 256),
                          (16384, 256, 256))) -> str:
    """Markdown: both backends' float32 rates at a few shapes of this project's layers, at the current
    thread count (`python -m efficient_transformers.bench.ceiling --backends`)."""
    lines = ["| m x n x k | torch.mm, GFLOP/s | oneDNN, GFLOP/s |", "|---|---|---|"]
    for m, n, k in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out, weight = torch.empty(m, n), b.t().contiguous()
        flops = 2 * m * n * k
        cells = [f"{flops / best_time(lambda: torch.mm(a, b, out=out), 5) / 1e9:.0f}"]
        cells.append(f"{flops / best_time(lambda: onednn_product(a, weight), 5) / 1e9:.0f}"
                     if onednn_usable(torch.float32) else "not available")
        lines.append(f"| {m} x {n} x {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
