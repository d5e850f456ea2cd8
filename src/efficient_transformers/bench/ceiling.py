"""The speed-up ceiling of kernel attention (Performer's FAVOR+) over SDPA: its matrix products alone.

`eft bench` measures what a layer costs. This asks a different question: how much faster than exact
attention *could* a Performer layer be on this machine, whatever the implementation? Every
implementation must at least do its matrix products, so the time of those products alone, run
back to back on preallocated buffers (no feature map, no exp, no normaliser, no recomputation, no
allocation), is a lower bound on its step, and

    ceiling = time(SDPA step) / time(Performer's products alone)

is an upper bound on its speed-up. Both steps are forward + backward of one layer, dim D, H heads,
head dim d = D / H, m features, batch 1, float32, including the q/k/v and output projections
(identical in both). The products, per step, in units of 2 N m d H multiply-adds:

- bidirectional: features of q and k (2), phi(K)^T [V 1] and phi(Q) S (2); backward: d phi(Q),
  d S, d phi(K), d V (4), d q and d k through the features (2): 10 units;
- causal, in chunks of C: the same 10, plus the intra-chunk products tril(phi(Q_c) phi(K_c)^T) [V 1]
  and their 4 backward products (about 3 (C / d) + 3 (C / m) units more).

The SDPA step is the same projections plus `scaled_dot_product_attention` forward and backward
(PyTorch's fused kernel; causal skips the masked blocks). Both are timed as `eft bench` times layers:
wall time in interleaved rounds with a rotating order, the ceiling being the median over rounds of
the ratio within a round (robust to drift of a shared machine); 1 thread by default.

    python -m efficient_transformers.bench.ceiling --lengths 4096,16384 --features 64,128,256 [--causal]

With `--mechanisms`, the same question for any registered layers, from their recorded products
(`products.py`, the ceiling `eft bench` reports): each layer's real step, its products replayed
alone, and vanilla (SDPA), all in the same interleaved rounds; the table gives the step, its speed-up
over vanilla, the ceiling, the fraction of it reached (ceiling / step, median over rounds) and the
ceiling's own speed-up over vanilla (vanilla's step / the ceiling):

    python -m efficient_transformers.bench.ceiling --mechanisms performer --lengths 16384 [--causal]

This standalone table times PyTorch's own products (`torch.mm`/`bmm`); on AMD CPUs they run through
MKL's AVX2 kernels at about half of oneDNN's rate (`--backends` prints both, `gemm.py`), and there
`--mechanisms`, which replays every shape on the faster backend, is the bound to quote.

The README's figures come from it: on this project's CPU, one thread, N = 16K and m = 256, the
products alone are 20.5-21.8x faster than the SDPA step (causal 8.1-8.4x), so a Performer layer,
which must also compute its features' exponentials, cannot be 20x faster (causal 10x) there.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from ..core import gemm
from . import harness, products
from .harness import TimingPlan, median_of, paired_ratio, time_interleaved


def _randn(*shape: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=requires_grad)  # values do not matter: only the time


def projection_products(n: int, dim: int) -> Callable[[], None]:
    """The q/k/v and output projections of one layer, forward and backward (every mechanism's share)."""
    x, w_qkv, b_qkv, w_out, b_out = _randn(n, dim), _randn(3 * dim, dim), _randn(3 * dim), _randn(dim, dim), _randn(dim)
    qkv, merged, grad_qkv, grad_y = torch.empty(n, 3 * dim), _randn(n, dim), _randn(n, 3 * dim), _randn(n, dim)
    y, grad_x, grad_merged = torch.empty(n, dim), torch.empty(n, dim), torch.empty(n, dim)
    grad_w_qkv, grad_w_out = torch.empty(3 * dim, dim), torch.empty(dim, dim)

    def run() -> None:
        torch.addmm(b_qkv, x, w_qkv.T, out=qkv)  # (N, 3D)
        torch.addmm(b_out, merged, w_out.T, out=y)  # (N, D)
        torch.mm(grad_y, w_out, out=grad_merged)
        torch.mm(grad_y.T, merged, out=grad_w_out)
        torch.mm(grad_qkv, w_qkv, out=grad_x)
        torch.mm(grad_qkv.T, x, out=grad_w_qkv)

    return run


def performer_products(n: int, dim: int, heads: int, features: int, *, causal: bool = False,
                       chunk_size: int = 64) -> Callable[[], None]:
    """Only the matrix products of one Performer train step (see the module doc), on preallocated
    buffers: a lower bound on any implementation's step."""
    d, m, H = dim // heads, features, heads
    projections = projection_products(n, dim)
    q, k, omega = _randn(H, n, d), _randn(H, n, d), _randn(d, m)
    phi_q, phi_k = torch.empty(H, n, m), torch.empty(H, n, m)  # (H, N, m)
    grad_phi_q, grad_phi_k, grad_x = torch.empty(H, n, m), torch.empty(H, n, m), torch.empty(H, n, d)
    if not causal:
        v1, kv, out1 = _randn(H, n, d + 1), torch.empty(H, m, d + 1), torch.empty(H, n, d + 1)
        grad_out1, grad_kv, grad_v1 = _randn(H, n, d + 1), torch.empty(H, m, d + 1), torch.empty(H, n, d + 1)

        def attention() -> None:
            torch.matmul(phi_k.transpose(1, 2), v1, out=kv)  # (H, m, d + 1)
            torch.matmul(phi_q, kv, out=out1)  # (H, N, d + 1)
            torch.matmul(grad_out1, kv.transpose(1, 2), out=grad_phi_q)
            torch.matmul(phi_q.transpose(1, 2), grad_out1, out=grad_kv)
            torch.matmul(v1, grad_kv.transpose(1, 2), out=grad_phi_k)
            torch.matmul(phi_k, grad_kv, out=grad_v1)
    else:
        if n % chunk_size:
            raise ValueError(f"ceiling: the length {n} must be a multiple of chunk_size={chunk_size}")
        C, nc = chunk_size, n // chunk_size
        pq, pk = phi_q.view(H * nc, C, m), phi_k.view(H * nc, C, m)  # (H nc, C, m) chunks
        gq, gk = grad_phi_q.view(H * nc, C, m), grad_phi_k.view(H * nc, C, m)
        v1, states, grad_out1 = _randn(H * nc, C, d + 1), _randn(H * nc, m, d + 1), _randn(H * nc, C, d + 1)
        summaries, out1, grad_states = torch.empty(H * nc, m, d + 1), torch.empty(H * nc, C, d + 1), torch.empty(H * nc, m, d + 1)
        scores, grad_scores, grad_v1 = torch.empty(H * nc, C, C), torch.empty(H * nc, C, C), torch.empty(H * nc, C, d + 1)

        def attention() -> None:
            torch.bmm(pk.transpose(1, 2), v1, out=summaries)  # (H nc, m, d + 1): T_c
            torch.bmm(pq, states, out=out1)  # inter-chunk
            torch.bmm(pq, pk.transpose(1, 2), out=scores)  # (H nc, C, C): intra-chunk
            torch.baddbmm(out1, scores, v1, out=out1)
            torch.bmm(grad_out1, states.transpose(1, 2), out=gq)
            torch.bmm(pq.transpose(1, 2), grad_out1, out=grad_states)
            torch.bmm(grad_out1, v1.transpose(1, 2), out=grad_scores)
            torch.baddbmm(gq, grad_scores, pk, out=gq)
            torch.bmm(grad_scores.transpose(1, 2), pq, out=gk)
            torch.bmm(scores.transpose(1, 2), grad_out1, out=grad_v1)
            torch.baddbmm(gk, v1, grad_states.transpose(1, 2), out=gk)  # through the carried states
            torch.baddbmm(grad_v1, pk, grad_states, out=grad_v1)

    def run() -> None:
        projections()
        torch.matmul(q, omega, out=phi_q)  # (H, N, m): the features' projections
        torch.matmul(k, omega, out=phi_k)
        attention()
        torch.matmul(grad_phi_q, omega.T, out=grad_x)  # (H, N, d): back through the features
        torch.matmul(grad_phi_k, omega.T, out=grad_x)

    return run


def sdpa_step(n: int, dim: int, heads: int, *, causal: bool = False) -> Callable[[], None]:
    """The projections plus SDPA forward and backward: vanilla's train step, in products."""
    projections = projection_products(n, dim)
    q, k, v = (_randn(1, heads, n, dim // heads, requires_grad=True) for _ in range(3))  # (1, H, N, d)
    grad = _randn(1, heads, n, dim // heads)

    def run() -> None:
        projections()
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)
        q.grad = k.grad = v.grad = None

    return run


def measure(n: int, args: argparse.Namespace, counts: list[int]) -> tuple[float, list[tuple[float, float]]]:
    """SDPA's median step (s) and, per feature count, (median products time (s), ceiling), all timed in
    the same interleaved rounds as `eft bench` times layers; the ceiling is the median over rounds of
    SDPA's time / the products' time."""
    steps = {"sdpa": sdpa_step(n, args.dim, args.heads, causal=args.causal)}
    for m in counts:
        steps[f"m={m}"] = performer_products(n, args.dim, args.heads, m, causal=args.causal, chunk_size=args.chunk_size)
    plan = TimingPlan(repeats=args.repeats, min_rounds=args.repeats, budget_s=1e9, timeout_s=1e9,
                      sample_min_s=0.02)
    result = time_interleaved(steps, plan)
    if result.failures:
        name, err = next(iter(result.failures.items()))
        raise RuntimeError(f"ceiling: {name} failed at N={n}: {err}") from err
    sdpa = result.samples["sdpa"]
    return median_of(sdpa), [(median_of(result.samples[f"m={m}"]), paired_ratio(sdpa, result.samples[f"m={m}"]))
                             for m in counts]


def measure_mechanisms(n: int, args: argparse.Namespace) -> list[dict]:
    """Per mechanism (vanilla first): its step, its recorded products' replay and vanilla's step, timed
    in the same interleaved rounds (see the module doc)."""
    names = ["vanilla"] + [m for m in args.mechanisms if m != "vanilla"]
    steps, ceilings = {}, {}
    for name in names:
        options = dict(args.options.get(name, {}))
        if name == "performer" and args.causal and args.chunk_size_given:
            options.setdefault("chunk_size", args.chunk_size)
        work = harness.Workload(name, n, args.mode, dim=args.dim, heads=args.heads, causal=args.causal, options=options)
        step = steps[name] = harness.make_step(harness.build_layer(work), work)
        step()  # warm-up, then one recorded call
        ceilings[name] = products.CeilingStep()
        ceilings[name].record(step)
    for name in names:
        steps[name + " (ceiling)"] = ceilings[name]
    plan = TimingPlan(repeats=args.repeats, min_rounds=args.repeats, budget_s=1e9, timeout_s=1e9, sample_min_s=0.02)
    result = time_interleaved(steps, plan)
    if result.failures:
        name, err = next(iter(result.failures.items()))
        raise RuntimeError(f"ceiling: {name} failed at N={n}: {err}") from err
    base = result.samples["vanilla"]
    rows = []
    for name in names:
        mine, ceiling = result.samples[name], result.samples[name + " (ceiling)"]
        rows.append({"mechanism": name, "n": n, "step_ms": median_of(mine) * 1e3, "speedup": 1 / paired_ratio(mine, base),
                     "ceiling_ms": median_of(ceiling) * 1e3, "fraction": paired_ratio(ceiling, mine),
                     "ceiling_speedup": 1 / paired_ratio(ceiling, base), "gflop": ceilings[name].products.flops / 1e9,
                     "fractions": [c / s for c, s in zip(ceiling, mine)]})
    return rows


def _options(text: str) -> dict[str, dict]:
    """"performer.nb_features=128,performer.chunk_size=128" -> {"performer": {...}} (ints where they parse)."""
    options: dict[str, dict] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        name, _, option = key.partition(".")
        options.setdefault(name, {})[option] = int(value) if value.lstrip("-").isdigit() else value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m efficient_transformers.bench.ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,16384", help="comma-separated N (default 4096,16384)")
    parser.add_argument("--features", default="256", help="comma-separated m (default 256, Performer's default)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=None, help="the causal chunk (default 64)")
    parser.add_argument("--mechanisms", default=None,
                        help="comma-separated registered layers: measure their real steps against their recorded ceilings")
    parser.add_argument("--mode", default="train", choices=list(harness.MODES), help="with --mechanisms (default train)")
    parser.add_argument("--options", type=_options, default={},
                        help="with --mechanisms: layer options, e.g. performer.nb_features=128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (default 5)")
    parser.add_argument("--backends", action="store_true",
                        help="only print PyTorch's and oneDNN's float32 matrix-multiply rates at a few shapes (gemm.py)")
    args = parser.parse_args(argv)
    args.chunk_size_given = args.chunk_size is not None
    args.chunk_size = args.chunk_size or 64
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.backends:
        print(f"float32 matrix-multiply rates, {args.threads} thread(s), best of 5 calls:\n")
        print(gemm.backend_table())
        return 0
    lengths = [int(t) for t in args.lengths.split(",")]
    if args.mechanisms:
        args.mechanisms = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
        print(f"Each layer's step against its ceiling, its recorded matrix products alone ({args.mode}, "
              f"{'causal' if args.causal else 'bidirectional'}, dim {args.dim}, {args.heads} heads, float32, "
              f"{args.threads} thread(s), median of {args.repeats} interleaved rounds):\n")
        print("| layer | N | step, ms | × vanilla | ceiling, ms | fraction of ceiling (per round) | ceiling × vanilla | GFLOP |")
        print("|---|---|---|---|---|---|---|---|")
        for n in lengths:
            for r in measure_mechanisms(n, args):
                per_round = ", ".join(f"{f:.0%}" for f in r["fractions"] if f is not None)
                print(f"| {r['mechanism']} | {n} | {r['step_ms']:,.0f} | {r['speedup']:.2f}× | {r['ceiling_ms']:,.0f} | "
                      f"{r['fraction']:.0%} ({per_round}) | {r['ceiling_speedup']:.2f}× | {r['gflop']:.1f} |")
        return 0
    counts = [int(t) for t in args.features.split(",")]
    print(f"Performer's matrix products alone against the SDPA step ({'causal' if args.causal else 'bidirectional'}, "
          f"dim {args.dim}, {args.heads} heads, float32, {args.threads} thread(s), median of {args.repeats} "
          "interleaved rounds; in parentheses the ceiling on Performer's speed-up):\n")
    print("| N | SDPA step, ms | " + " | ".join(f"m={m}: products, ms" for m in counts) + " |")
    print("|---|---|" + "---|" * len(counts))
    for n in lengths:
        sdpa, cells = measure(n, args, counts)
        print(f"| {n} | {sdpa * 1e3:,.0f} | " + " | ".join(f"{t * 1e3:,.0f} ({c:.1f}x)" for t, c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
