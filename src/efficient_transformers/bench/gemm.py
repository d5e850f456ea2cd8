"""The matrix-multiply backends a ceiling may use: PyTorch's own product and oneDNN's, the faster per shape.

PyTorch runs a float32 `mm`/`bmm`/`addmm` on CPU through its BLAS, MKL in the x86 wheels. MKL picks
its code path by CPU *vendor*: on an AMD CPU it runs its AVX2 kernels even where the core has
AVX-512. The same wheel also ships oneDNN, which picks by instruction set, and exposes its matmul
as `torch.ops.mkldnn._linear_pointwise` (the op PyTorch's CPU inductor backend fuses linear layers
into). Measured one thread, float32 (`python -m efficient_transformers.bench.ceiling --backends`):

| machine | torch.mm (MKL) | oneDNN |
|---|---|---|
| Intel Xeon, AVX-512 (sessions up to 24) | about 183 GFLOP/s | not measured then |
| AMD EPYC Zen 5, 2.6 GHz, AVX-512 | 90-96 GFLOP/s | 200-212 GFLOP/s (1024 x 256 x 64: 201) |

A ceiling is a lower bound on *any* implementation's step, so a replayed product runs on whichever
backend is faster for its shape on this machine (`fastest`, timed once per shape, dtype and thread
count, then cached), and the machine's matrix-multiply rate is the faster backend's. PyTorch's
float32 products never reach oneDNN on their own (its `fp32_precision` routes use bf16/tf32
arithmetic, not float32), so on such a machine every layer, vanilla's SDPA included, runs its
products at MKL's rate, and the fraction of the ceiling says so. oneDNN takes float32 and bfloat16;
other dtypes and non-CPU devices use PyTorch's product only.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_choices: dict[tuple, str] = {}


def onednn_usable(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether oneDNN's matmul can run this product here (CPU, float32 or bfloat16, oneDNN built in)."""
    return (torch.device(device).type == "cpu" and dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_product(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a @ weight^T through oneDNN: a (..., k), weight (n, k) -> (..., n) (a new tensor: the op has no out=)."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")


def best_time(call: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls after a warm-up call, in seconds."""
    call()  # warm-up: oneDNN creates (and caches) its primitive here
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def fastest(key: tuple, candidates: dict[str, Callable[[], object]]) -> str:
    """The name of the fastest candidate (each the same product on another backend), best of 3 timed calls
    after a warm-up; remembered per `key` and thread count, so a shape is timed once per process."""
    full_key = key + (torch.get_num_threads(),)
    if full_key not in _choices:
        _choices[full_key] = min(candidates, key=lambda name: best_time(candidates[name])) if len(candidates) > 1 \
            else next(iter(candidates))
    return _choices[full_key]


def square_rates(size: int, device: str = "cpu") -> dict[str, Callable[[], object]]:
    """size^3 float32 products, one callable per backend usable here (for `harness.matmul_rate`)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    calls: dict[str, Callable[[], object]] = {"torch.matmul": lambda: torch.matmul(a, b)}
    if onednn_usable(torch.float32, device):
        weight = b.t().contiguous()  # (n, k): a @ b
        calls["oneDNN"] = lambda: onednn_product(a, weight)
    return calls


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
