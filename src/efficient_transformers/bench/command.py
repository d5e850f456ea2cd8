"""`eft bench`: the command-line face of `run_benchmark` (see efficient_transformers.bench).

    eft bench --quick                                   every mechanism, lengths 256..4096, about minutes
    eft bench --mechanisms vanilla,performer --lengths 1024,4096 --mode train --out DIR --json

Writes DIR/bench.json, DIR/bench.md and DIR/*.png; `--json` also prints the JSON on stdout. Exit
status: 0 done, 2 bad arguments, 130 interrupted (the partial results are written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import harness
from ..argtypes import length_list as _length_list, name_list as _name_list, threads as _threads
from .runner import (DEFAULT_LENGTHS, FULL_EFFORT, QUICK_EFFORT, QUICK_LENGTHS, load_average, machine_is_busy,
                     run_benchmark)








def _mode_list(text: str) -> list[str]:
    modes = [t.strip() for t in text.split(",")]
    bad = [m for m in modes if m not in harness.MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad} in {text!r}; allowed: {','.join(harness.MODES)}")
    return modes


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"lengths {','.join(map(str, QUICK_LENGTHS))} (unless --lengths), up to "
                             f"{QUICK_EFFORT.repeats} rounds, {QUICK_EFFORT.timeout_s:g} s limit per configuration")
    parser.add_argument("--mechanisms", type=_name_list, default=None,
                        help="comma-separated registry names (default: all registered; vanilla is always added)")
    parser.add_argument("--lengths", type=_length_list, default=None,
                        help=f"comma-separated sequence lengths (default {','.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("--mode", type=_mode_list, default=list(harness.MODES), dest="modes",
                        help="forward, train (forward+backward) or both (default forward,train)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--dim", type=int, default=256, help="model dimension (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dtype", choices=list(harness.DTYPES), default="float32", help="default float32")
    parser.add_argument("--causal", action="store_true", help="build causal (decoder) layers")
    parser.add_argument("--device", choices=list(harness.DEVICES), default="cpu", help="default cpu")
    parser.add_argument("--threads", type=_threads, default="auto",
                        help="torch CPU threads for the timed and probed steps, or 'auto' (default): torch's "
                             "default (one per core), but 1 when other processes already load the machine, "
                             "where multi-threaded steps are slowed and distorted by waiting for descheduled threads")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timing rounds per configuration (default {FULL_EFFORT.repeats}, quick {QUICK_EFFORT.repeats})")
    parser.add_argument("--timeout", type=float, default=None, dest="timeout_s",
                        help=f"seconds per configuration (default {FULL_EFFORT.timeout_s:g}, quick {QUICK_EFFORT.timeout_s:g})")
    parser.add_argument("--no-ceiling", action="store_false", dest="ceiling",
                        help="do not time each row's ceiling (its matrix products replayed alone; bench/products.py)")
    parser.add_argument("--out", default="eft-report", help="output directory (default ./eft-report)")
    parser.add_argument("--json", action="store_true", help="also print the JSON result on stdout")


def run(args: argparse.Namespace) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)  # called in-process (tests, other commands): leave no trace


def _run(args: argparse.Namespace) -> int:
    if args.threads == "auto":
        load = load_average()
        if args.device == "cpu" and torch.get_num_threads() > 1 and machine_is_busy(load):
            print(f"eft bench: the machine is busy (load average {load:.1f} on {os.cpu_count()} CPUs): measuring with "
                  "1 thread (pass --threads to choose)", file=sys.stderr)
            torch.set_num_threads(1)
    else:
        torch.set_num_threads(args.threads)
    try:
        result = run_benchmark(
            mechanisms=args.mechanisms, lengths=args.lengths or DEFAULT_LENGTHS, modes=args.modes,
            batch=args.batch, dim=args.dim, heads=args.heads, dtype=args.dtype, causal=args.causal,
            device=args.device, out_dir=args.out, quick=args.quick, repeats=args.repeats,
            timeout_s=args.timeout_s, progress=None, ceiling=getattr(args, "ceiling", True))
    except ValueError as err:
        print(f"eft bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eft bench: interrupted; the partial results are in {args.out}/", file=sys.stderr)
        return 130
    files = ", ".join(result["config"]["files"])
    message = f"eft bench: wrote {files} to {args.out}/ in {result['config']['wall_time_s']:.0f} s"
    if args.json:
        print(json.dumps(result, indent=1))
        print(message, file=sys.stderr)
    else:
        print(message)
    return 0
