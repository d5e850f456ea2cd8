"""Streaming evaluation benchmark for the recurrence mechanisms (not a test):

    python -m efficient_transformers.bench.stream [--length 16384] [--segment 512] [--mem 512] [--out DIR]
                                                  [--compression conv [most_used ...]]

Evaluates an untrained byte-level `TransformerLM` on a random stream of `length` tokens, segment by
segment, and reports, per mechanism:

- `transformer_xl` / `compressive`: each segment of `segment` tokens attends its memory (mem_len =
  `mem`; compressive also cmem_len = `mem` / 2 slots at rate 2, one row per `--compression` f_c, named
  "compressive" for conv and "compressive (f_c)" otherwise), carried from the segment before;
  time per token, and the size of the state (numbers held in every layer's memory) after every
  segment and after every one of `--decode-tokens` single-token steps at the end of the stream (it
  must stay constant: bounded memory);
- `vanilla, recompute per segment`: dense attention recomputing the same context for each segment
  (the `mem` tokens before it and the segment: mem + segment tokens, scoring the last segment);
- `vanilla, sliding window per token` (the paper's baseline for its evaluation speed-up): for each
  token, a dense forward over the `mem + segment` tokens before it, timed on `--sliding-tokens` tokens.

Timings are medians over `--repeats` runs of the whole stream, in one process, so the ratios compare
like with like; the machine's load is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ..attention.compressive import COMPRESSIONS
from ..models import TransformerLM


def _lm(attention: str, options: dict, args) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(vocab_size=257, dim=args.dim, depth=args.depth, heads=args.heads, attention=attention,
                         attention_options=options, max_seq_len=args.mem + args.segment).eval()


def _state_size(memory: list) -> int:
    return sum(m.numel() for m in memory)


@torch.no_grad()
def stream_with_memory(lm: TransformerLM, tokens: torch.Tensor, segment: int, decode_tokens: int) -> dict:
    memory, sizes, start = None, [], time.perf_counter()
    n = tokens.shape[1] - decode_tokens
    for s in range(0, n, segment):
        _, memory = lm(tokens[:, s:min(n, s + segment)], memory=memory, return_state=True)
        sizes.append(_state_size(memory))
    evaluated = time.perf_counter() - start
    step_sizes, start = [], time.perf_counter()
    for t in range(n, tokens.shape[1]):
        _, memory = lm(tokens[:, t:t + 1], memory=memory, return_state=True)
        step_sizes.append(_state_size(memory))
    stepped = time.perf_counter() - start
    return {"seconds": evaluated, "per_token_ms": 1e3 * evaluated / n, "state_sizes": sizes,
            "decode_per_token_ms": 1e3 * stepped / max(decode_tokens, 1), "decode_state_sizes": step_sizes,
            "length": tokens.shape[1]}


@torch.no_grad()
def vanilla_recompute(lm: TransformerLM, tokens: torch.Tensor, segment: int, context: int) -> dict:
    n = tokens.shape[1]
    start = time.perf_counter()
    for s in range(0, n, segment):
        lm(tokens[:, max(0, s - context):min(n, s + segment)])  # the context recomputed for every segment
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_token_ms": 1e3 * seconds / n}


@torch.no_grad()
def vanilla_sliding(lm: TransformerLM, tokens: torch.Tensor, window: int, count: int) -> dict:
    start = time.perf_counter()
    for t in range(window, window + count):
        lm(tokens[:, t - window:t])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_token_ms": 1e3 * seconds / count, "tokens_timed": count}


def _steady(sizes: list[int]) -> str:
    """How the state size behaves: "constant S" (from the step its memories are full), or "bounded: lo..hi"
    when it oscillates (the Compressive Transformer's raw memory holds mem_len to mem_len + c - 1 states)."""
    first = sizes.index(max(sizes))
    tail = sizes[first:]
    where = "" if first == 0 else f" from #{first + 1} of {len(sizes)} (filling: {sizes[:first]})"
    if len(set(tail)) == 1:
        return f"constant {tail[0]}{where}"
    return f"bounded: {min(tail)}..{max(tail)}{where}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m efficient_transformers.bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--mem", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--sliding-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--out", default=None, help="folder for stream.json and stream.md")
    parser.add_argument("--compression", nargs="+", default=["conv"], choices=COMPRESSIONS,
                        help="the compressive rows' f_c (one row each)")
    args = parser.parse_args(argv)
    for name in ("length", "segment", "mem", "dim", "depth", "heads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = torch.randint(1, 257, (1, args.length), generator=torch.Generator().manual_seed(0))
    runs = {
        "transformer_xl": lambda: stream_with_memory(_lm("transformer_xl", {"mem_len": args.mem}, args), tokens,
                                                     args.segment, args.decode_tokens),
        **{("compressive" if f == "conv" else f"compressive ({f})"): (lambda f=f: stream_with_memory(
            _lm("compressive", {"mem_len": args.mem, "cmem_len": args.mem // 2, "compression_rate": 2,
                                "compression": f}, args), tokens, args.segment, args.decode_tokens))
           for f in dict.fromkeys(args.compression)},
        "vanilla, recompute per segment": lambda: vanilla_recompute(_lm("vanilla", {}, args), tokens, args.segment, args.mem),
        "vanilla, sliding window per token": lambda: vanilla_sliding(_lm("vanilla", {}, args), tokens,
                                                                     args.mem + args.segment, args.sliding_tokens),
    }
    rows = []
    for name, run in runs.items():
        results = [run() for _ in range(args.repeats)]
        row = dict(results[-1])
        row["per_token_ms"] = statistics.median(r["per_token_ms"] for r in results)
        row["per_token_ms_range"] = [min(r["per_token_ms"] for r in results), max(r["per_token_ms"] for r in results)]
        if "decode_per_token_ms" in row:
            row["decode_per_token_ms"] = statistics.median(r["decode_per_token_ms"] for r in results)
        row["mechanism"] = name
        rows.append(row)
    base = rows[0]["per_token_ms"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    lines = [f"stream of {args.length} tokens, segments of {args.segment}, memory {args.mem}, dim {args.dim}, "
             f"depth {args.depth}, heads {args.heads}, {torch.get_num_threads()} threads, load {load}", "",
             "| evaluation | ms / token (median, range) | vs transformer_xl | state per segment (numbers) | "
             "state per decoded token | decode ms / token |", "|---|---|---|---|---|---|"]
    for row in rows:
        sizes = row.get("state_sizes")
        steady = "-" if sizes is None else _steady(sizes)
        dsizes = row.get("decode_state_sizes")
        dsteady = "-" if not dsizes else _steady(dsizes)
        lo, hi = row["per_token_ms_range"]
        decode = f"{row['decode_per_token_ms']:.2f}" if "decode_per_token_ms" in row else "-"
        lines.append(f"| {row['mechanism']} | {row['per_token_ms']:.3f} ({lo:.3f}-{hi:.3f}) | "
                     f"{row['per_token_ms'] / base:.2f}x | {steady} | {dsteady} | {decode} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps({"config": vars(args), "load": load, "rows": rows}, indent=1))
        (out / "stream.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
