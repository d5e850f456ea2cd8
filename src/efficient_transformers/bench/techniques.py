"""Measurements of the model-level techniques (survey section 4.3, Reformer): benchmarks, not tests.

    python -m efficient_transformers.bench.techniques reversible [--length 1024] [--dim 128] [--depths 2,8]
                                                                 [--attention vanilla] [--device cpu] [--json]

`reversible`: training activation memory of a TransformerClassifier at depth 2 and 8, with and without
reversible layers, at the same N. Two figures per configuration:

- saved activations: the bytes autograd keeps between the forward and the backward pass (counted with
  `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded). Exact and
  deterministic; this is the memory that grows with depth in an ordinary network;
- peak step memory: the high-water mark of one forward + backward above the memory before it, in a
  fresh process per configuration (CPU: VmHWM - VmRSS, as the benchmark's probe; CUDA: max_memory_allocated).
  It adds the backward's transient buffers (one block's graph at a time when reversible). The child
  runs with glibc's MALLOC_MMAP_THRESHOLD_=65536: every tensor above 64 KiB is its own mapping, returned
  on free, so the resident set follows the live tensors (with glibc's default, growing threshold,
  freed blocks of one recomputed layer stay in the heap and the RSS overstates the peak).

The ratio depth 8 / depth 2 is printed for both; Reformer's claim is that it stays near 1 when
reversible (the deliverable: within 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch

from .memory import MIB, _malloc_trim, _read_status_kib, reset_cpu_high_water_mark


def _model(attention: str, depth: int, reversible: bool, dim: int, heads: int, n: int, device: str):
    from ..models import TransformerClassifier

    torch.manual_seed(0)
    model = TransformerClassifier(vocab_size=256, num_classes=10, dim=dim, depth=depth, heads=heads,
                                  attention=attention, max_seq_len=n, reversible=reversible, dropout=0.0)
    return model.to(device).train()


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (unique storages, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).float().square().mean()
    loss.backward()
    return sum(seen.values())


def probe(attention: str, depth: int, reversible: bool, dim: int, heads: int, n: int, batch: int,
          device: str) -> dict[str, Any]:
    """In a fresh process: the peak memory of one training step (MiB above the memory before it), then
    the saved-activation bytes of another."""
    model = _model(attention, depth, reversible, dim, heads, n, device)
    tokens = torch.randint(0, 256, (batch, n), device=device)
    for _ in range(2):  # warm-up (thread pools, kernel caches); gradients allocated before the measurement
        model(tokens[:, :16]).sum().backward()
    _malloc_trim()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ok, _ = reset_cpu_high_water_mark()
        before = _read_status_kib("VmRSS") * 1024 if ok else None
    model(tokens).float().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / MIB
    else:
        peak = None if before is None else max(0, _read_status_kib("VmHWM") * 1024 - before) / MIB
    saved = saved_activation_bytes(model, tokens) / MIB
    return {"peak_step_mb": None if peak is None else round(peak, 2), "saved_activations_mb": round(saved, 2)}


def _probe_in_child(**kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "efficient_transformers.bench.techniques", "_probe", json.dumps(kwargs)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())),
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module doc
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the memory probe failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_reversible(attention: str = "vanilla", n: int = 1024, dim: int = 128, heads: int = 4, batch: int = 2,
                       depths: tuple[int, ...] = (2, 8), device: str = "cpu") -> dict[str, Any]:
    rows = []
    for reversible in (False, True):
        for depth in depths:
            got = _probe_in_child(attention=attention, depth=depth, reversible=reversible, dim=dim, heads=heads,
                                  n=n, batch=batch, device=device)
            rows.append({"reversible": reversible, "depth": depth, **got})
    ratios = {}
    for reversible in (False, True):
        mine = {r["depth"]: r for r in rows if r["reversible"] == reversible}
        lo, hi = mine[min(depths)], mine[max(depths)]
        key = "reversible" if reversible else "ordinary"
        ratios[key] = {
            "saved_activations": round(hi["saved_activations_mb"] / lo["saved_activations_mb"], 3),
            "peak_step": (round(hi["peak_step_mb"] / lo["peak_step_mb"], 3)
                          if hi["peak_step_mb"] and lo["peak_step_mb"] else None),
        }
    config = dict(attention=attention, seq_len=n, dim=dim, heads=heads, batch=batch, depths=list(depths),
                  device=device, threads=torch.get_num_threads(), torch=torch.__version__)
    return {"config": config, "rows": rows, "ratio_deepest_to_shallowest": ratios}


def reversible_markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"Training activation memory, TransformerClassifier ({c['attention']}), N = {c['seq_len']}, "
             f"dim {c['dim']}, {c['heads']} heads, batch {c['batch']}, {c['device']}:", "",
             "| layers | depth | saved activations (MiB) | peak step memory (MiB) |", "|---|---|---|---|"]
    for r in result["rows"]:
        kind = "reversible" if r["reversible"] else "ordinary"
        lines.append(f"| {kind} | {r['depth']} | {r['saved_activations_mb']:.1f} | "
                     f"{'n/a' if r['peak_step_mb'] is None else format(r['peak_step_mb'], '.1f')} |")
    lo, hi = min(c["depths"]), max(c["depths"])
    for kind, ratio in result["ratio_deepest_to_shallowest"].items():
        peak = "n/a" if ratio["peak_step"] is None else f"{ratio['peak_step']:.2f}x"
        lines.append(f"\n{kind}: depth {hi} / depth {lo} = {ratio['saved_activations']:.2f}x saved activations, "
                     f"{peak} peak")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m efficient_transformers.bench.techniques",
                                     description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("reversible", help="activation memory at two depths, with and without reversible layers")
    p.add_argument("--attention", default="vanilla")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--depths", default="2,8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("_probe", help=argparse.SUPPRESS)
    p.add_argument("request")
    args = parser.parse_args(argv)
    if args.what == "_probe":
        print(json.dumps(probe(**json.loads(args.request))))
        return 0
    try:
        depths = tuple(int(d) for d in args.depths.split(","))
        if len(depths) < 2 or min(depths) < 1:
            raise ValueError
    except ValueError:
        print(f"techniques: error: --depths must be two or more positive ints, got {args.depths!r}", file=sys.stderr)
        return 2
    try:
        result = measure_reversible(args.attention, args.length, args.dim, args.heads, args.batch, depths, args.device)
    except ValueError as err:
        print(f"techniques: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else reversible_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
