"""The measuring primitives of `eft bench`: one workload, its step, its FLOPs, and interleaved timing.

What is measured is one attention layer as `et.build_attention(name, dim, heads, causal, **options)`
builds it (projections included) on an input x of shape (B, N, dim):

- mode "forward": one inference pass, `layer.eval()` under `torch.no_grad()`;
- mode "train": one forward and backward pass, `layer.train()`, x with requires_grad, parameter
  gradients reset to None before each step (as `optimizer.zero_grad()` does), a fixed random
  output gradient.

Time (`time_interleaved`): every layer of one (N, mode) block is warmed up (the runner counts FLOPs on
that first call), then timed in rounds; each
round runs every mechanism once, in an order rotated by one each round, so drift of a shared machine
hits all mechanisms alike. A sample is `inner` back-to-back steps (enough to last `sample_min_s`)
divided by `inner`. The figures are the median sample and the median over rounds of the ratio to
vanilla's sample in the same round (ALGORITHMS.md section 5).

FLOPs (`count_flops`): `torch.utils.flop_counter.FlopCounterMode` over one step. It counts matrix
products (mm, bmm, addmm, fused attention); elementwise work (softmax, exp, feature maps) is not
counted. PyTorch has no formula for the CPU flash-attention kernel that SDPA uses on CPU, so the
upstream dense-attention formulas are registered for it here (counted as dense even when causal, as
upstream does on GPU).

Machine rate (`matmul_rate`): the best of a few short float32 runs on square matrices, in GFLOP/s,
on the faster of `torch.matmul` and oneDNN's matmul (`gemm`: on AMD CPUs PyTorch's MKL runs at about
half the rate); achieved GFLOP/s of a mechanism is reported as a fraction of it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import native
from ..core import gemm

MODES = ("forward", "train")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")
TINY_WARMUP_LEN = 16
SLOW_WARMUP_S = 0.5  # a known step time above this plans the rounds without a timed warm-up call


@dataclass(frozen=True)
class Workload:
    """One configuration to measure: which layer, at which size, doing what.

    `factory` ("path/to/file.py:function") builds the layer with `function(dim=, heads=, causal=,
    **options)` instead of the registry; the memory probe imports it by path in its own process, so
    a toy layer (tests, experiments) never enters the global registry.
    """

    mechanism: str
    seq_len: int
    mode: str
    batch: int = 1
    dim: int = 256
    heads: int = 4
    dtype: str = "float32"
    causal: bool = False
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Workload":
        return cls(**data)

    def label(self) -> str:
        return f"{self.mechanism} N={self.seq_len} {self.mode}"


class UnsupportedWorkload(Exception):
    """The registry refused the configuration (e.g. causal for an encoder-only mechanism)."""


def load_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """Import `function` from `path/to/file.py:function` (a module loaded by file path)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise ValueError(f"layer factory {spec!r} must look like 'path/to/file.py:function'")
    module_spec = importlib.util.spec_from_file_location(f"_eft_bench_factory_{abs(hash(path))}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"layer factory {spec!r}: cannot import {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise ValueError(f"layer factory {spec!r}: {path!r} has no attribute {name!r}")
    return getattr(module, name)


def build_layer(work: Workload) -> torch.nn.Module:
    """The layer of `work`, seeded, on its device and dtype, in train or eval mode."""
    torch.manual_seed(0)
    if work.factory:
        layer = load_factory(work.factory)(dim=work.dim, heads=work.heads, causal=work.causal, **work.options)
    else:
        from ..registry import build_attention

        try:
            layer = build_attention(work.mechanism, work.dim, work.heads, work.causal, **work.options)
        except ValueError as err:  # the registry's verdict on an unsupported combination
            raise UnsupportedWorkload(str(err)) from err
    layer = layer.to(device=work.device, dtype=DTYPES[work.dtype])
    return layer.train(work.mode == "train")


def make_step(layer: torch.nn.Module, work: Workload, seq_len: int | None = None) -> Callable[[], None]:
    """A zero-argument callable running one step of `work` (inputs made here, once)."""
    n = work.seq_len if seq_len is None else seq_len
    gen = torch.Generator(device="cpu").manual_seed(1)
    dtype = DTYPES[work.dtype]
    x = torch.randn(work.batch, n, work.dim, generator=gen).to(work.device, dtype)  # (B, N, dim)
    if work.mode == "forward":

        def forward_step() -> None:
            with torch.no_grad():
                layer(x)

        return forward_step

    x.requires_grad_(True)
    grad_out = torch.randn(work.batch, n, work.dim, generator=gen).to(work.device, dtype)  # (B, N, dim)

    def train_step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)

    train_step.grad_output = grad_out  # the backward pass's root: `products.record_products` traces it
    return train_step


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- FLOPs
def _cpu_sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _onednn_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's matmul (`core.gemm`, the projections where MKL is slower): x (..., k) @ weight (n, k)^T."""
    return 2 * math.prod(x_shape) * weight_shape[0]


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if gemm.onednn_usable(torch.float32):
        formulas[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops
    for op_name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_forward_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flops),
    ):
        if hasattr(aten, op_name):
            formulas[getattr(aten, op_name)] = formula  # FlopCounterMode looks ops up by overload packet
    return formulas


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to "Global" and no hooks are set."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(step: Callable[[], None]) -> int:
    """Matrix-product FLOPs of one call of `step`, by `FlopCounterMode` (plus CPU fused attention).

    Only the total is needed, so the mode's per-module attribution is switched off: its ModuleTracker
    hooks module inputs into autograd and fails ("Expected gradient function to be set") on a module
    called inside a custom `autograd.Function` (a feature map inside a chunked kernel scan)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    counter.mod_tracker = _GlobalOnly()
    with counter, native.portable():  # native kernels do their products out of the counter's sight
        step()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------- machine rate
def matmul_rate(device: str = "cpu", *, size: int | None = None, seconds: float = 0.5) -> dict[str, Any]:
    """The machine's float32 matrix-multiply rate: best GFLOP/s over short runs of `size`^3 products, on
    the faster of PyTorch's product and oneDNN's (`gemm`; on AMD CPUs MKL runs at about half oneDNN's
    rate), `seconds` shared between them; "backends" gives each one's best."""
    size = size or (4096 if device == "cuda" else 1024)
    flops_per_product = 2 * size**3
    rates: dict[str, float] = {}
    runs = 0
    calls = gemm.square_rates(size, device)
    for name, product in calls.items():
        product()  # warm-up
        synchronize(device)
        best, tries, deadline = 0.0, 0, time.perf_counter() + seconds / len(calls)
        while tries < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(4):
                product()
            synchronize(device)
            best = max(best, 4 * flops_per_product / (time.perf_counter() - start) / 1e9)
            tries += 1
        rates[name], runs = best, runs + tries
    backend = max(rates, key=rates.get)
    return {"gflops": rates[backend], "backend": backend, "backends": rates, "size": size, "dtype": "float32",
            "runs": runs}


# ---------------------------------------------------------------------------------------- timing
@dataclass
class TimingPlan:
    """How long to time: at most `repeats` rounds, fewer for slow steps (but at least `min_rounds`
    while the per-configuration `timeout_s` allows), samples of at least `sample_min_s` seconds."""

    repeats: int
    min_rounds: int
    budget_s: float
    timeout_s: float
    sample_min_s: float

    def inner_and_rounds(self, step_s: float) -> tuple[int, int]:
        step_s = max(step_s, 1e-7)
        inner = max(1, min(10_000, math.ceil(self.sample_min_s / step_s)))
        sample_s = inner * step_s
        rounds = min(self.repeats, max(self.min_rounds, math.floor(self.budget_s / sample_s)))
        rounds_in_limit = max(1, math.floor(self.timeout_s / sample_s) - 1)  # minus the warm-up
        return inner, max(1, min(rounds, rounds_in_limit))


@dataclass
class TimingResult:
    """Per mechanism: seconds per step for each round (None where it did not run), or the failure."""

    samples: dict[str, list[float | None]]
    inner: dict[str, int]
    failures: dict[str, BaseException]


def time_interleaved(steps: dict[str, Callable[[], None]], plan: TimingPlan, device: str = "cpu",
                     on_round: Callable[[int, int], None] | None = None,
                     first_call: Callable[[str, Callable[[], None]], None] | None = None,
                     estimates_s: dict[str, float] | None = None) -> TimingResult:
    """Warm each step up, then time all of them in rounds with a rotating order (see module doc).

    `first_call(name, step)` replaces the plain first (warm-up) call, e.g. to count FLOPs on it.
    `estimates_s[name]`, a step time known from elsewhere (the memory probe): when it is at least
    `SLOW_WARMUP_S`, it plans the rounds and no second, timed warm-up call is made."""
    failures: dict[str, BaseException] = {}
    inner: dict[str, int] = {}
    rounds: dict[str, int] = {}
    for name, step in steps.items():
        try:
            (first_call or (lambda _, s: s()))(name, step)  # lazy initialisation
            synchronize(device)
            step_s = (estimates_s or {}).get(name) or 0.0
            if step_s < SLOW_WARMUP_S:  # a timed call for the estimate; slow steps need no inner loop anyway
                start = time.perf_counter()
                step()
                synchronize(device)
                step_s = time.perf_counter() - start
            inner[name], rounds[name] = plan.inner_and_rounds(step_s)
        except Exception as err:  # recorded per mechanism (oom or error), never fatal to the block
            failures[name] = err
    names = [n for n in steps if n not in failures]
    total_rounds = max(rounds.values(), default=0)
    samples: dict[str, list[float | None]] = {n: [None] * total_rounds for n in steps}
    for r in range(total_rounds):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            if name in failures or r >= rounds[name]:
                continue
            step = steps[name]
            try:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(inner[name]):
                    step()
                synchronize(device)
                samples[name][r] = (time.perf_counter() - start) / inner[name]
            except Exception as err:
                failures[name] = err
        if on_round:
            on_round(r + 1, total_rounds)
    return TimingResult(samples=samples, inner=inner, failures=failures)


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def paired_ratio(samples: list[float | None], reference: list[float | None]) -> float | None:
    """Median over rounds of sample / reference sample in the same round (rounds where both ran)."""
    ratios = [s / r for s, r in zip(samples, reference) if s is not None and r is not None and r > 0]
    return statistics.median(ratios) if ratios else None


# ---------------------------------------------------------------------------------------- failures
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def classify_failure(err: BaseException) -> tuple[str, str]:
    """(status, message) for an exception raised by a step: "oom" for allocation failures, else "error"."""
    message = f"{type(err).__name__}: {err}".strip()
    first_lines = " ".join(message.splitlines()[:3])[:500]
    if isinstance(err, MemoryError) or any(m in message.lower() for m in OOM_MARKERS):
        return "oom", first_lines
    if isinstance(err, UnsupportedWorkload):
        return "unsupported", str(err)[:500]
    return "error", first_lines
