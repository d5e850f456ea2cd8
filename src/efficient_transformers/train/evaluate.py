"""`eft eval RUN_DIR [--int8]`: evaluate a run folder's best weights on its task's test split.

    eft eval runs/listops-vanilla-s0                 test loss and metric, model size, CPU latency
    eft eval runs/listops-vanilla-s0 --int8          the same for the float32 model and its int8 copy, side by side

The task's data is rebuilt from the run's config (generated data from its seed and sizes, or its
--data folder), the model from the constructor arguments stored with the weights. Latency is the
median wall time of a no-grad forward pass over a batch of `--latency-batch` sequences at the task's
length (max_len), on the CPU, after warm-up, with the process's torch threads. Size is the bytes of
the weights (int8 Linears at their packed size; embeddings and norms stay float32). `--int8` uses
`et.quantize` (PyTorch's dynamic quantization) and runs on the CPU only.

Writes `eval.json` and `eval.md` in the run folder (or `--out DIR`); the run's own files are untouched.
Bad input (no run folder, a device int8 does not support) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .distributed import resolve_device
from .objective import BatchStats, batch_statistics, move_batch
from .transfer import RunInfo, load_run_model, read_run

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `eft train` or `eft distill`")
    parser.add_argument("--int8", action="store_true", help="also evaluate the int8 copy (CPU), side by side")
    parser.add_argument("--device", default="cpu", help="device of the float32 evaluation: cpu (default), cuda, auto")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: the run's)")
    parser.add_argument("--latency-batch", type=int, default=1, help="sequences per timed forward pass (default 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (default 10)")
    parser.add_argument("--out", default=None, help="folder for eval.json / eval.md (default RUN_DIR)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    try:
        for name in ("batch_size", "latency_batch", "repeats"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value}")
        if args.int8:
            from ..models.quantize import int8_supported

            problem = int8_supported("cpu")
            if problem is None and args.device != "cpu" and not (args.device == "auto" and not torch.cuda.is_available()):
                problem = (f"--int8 compares float32 and int8 on the CPU (PyTorch's dynamic int8 kernels are CPU-only); "
                           f"got --device {args.device!r}; allowed: --device cpu")
            if problem is not None:
                raise ValueError(problem)
        device = resolve_device(args.device)
        info = read_run(args.run_dir, "eft eval")
        out_dir = Path(args.out) if args.out else info.path
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} exists and is not a folder")
    except (ValueError, FileNotFoundError) as err:
        print(f"eft eval: error: {err}", file=sys.stderr)
        return 2
    try:
        result = evaluate_run(info, int8=args.int8, device=device, batch_size=args.batch_size,
                              latency_batch=args.latency_batch, repeats=args.repeats)
    except (ValueError, FileNotFoundError) as err:  # e.g. the run's --data folder is gone
        print(f"eft eval: error: {err}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(out_dir / EVAL_JSON, result)
    ckpt.atomic_write_bytes(out_dir / EVAL_MD, (markdown(result) + "\n").encode("utf-8"))
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


def rebuild_task(info: RunInfo, task: Any = None) -> tuple[Any, dict[str, Any], int]:
    """The run's task, its splits and its sequence length, as the trainer built them."""
    cfg = info.config
    if task is None:
        from ..tasks import get_task

        task = get_task(cfg.task)
    max_len = int(info.model_config["max_seq_len"])
    splits = task.datasets(cfg.data, seed=cfg.seed, max_len=max_len, num_train=cfg.num_train, num_val=cfg.num_val,
                           num_test=cfg.num_test, **cfg.task_options)
    return task, splits, max_len


def evaluate_model(model: nn.Module, task: Any, data: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Loss and metric of `model` on a dataset, in one process."""
    stats = BatchStats()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            stats.add(batch_statistics(model, move_batch(task.collate(items), device), task.kind)[1])
    return {**stats.summary(task.metric), "examples": len(data)}


def latency_inputs(task: Any, model_config: dict[str, Any], batch: int, max_len: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    if model_config.get("class") == "SetTransformer":  # a set task: continuous vectors, no tokens
        return (torch.randn(batch, max_len, model_config["in_features"], generator=g),)  # (B, N, F), no padding
    low = 1 if model_config["vocab_size"] > 1 else 0
    tokens = torch.randint(low, model_config["vocab_size"], (batch, max_len), generator=g)  # (B, N), no padding
    if task.kind == "retrieval":
        return tokens, torch.randint(low, model_config["vocab_size"], (batch, max_len), generator=g)
    return (tokens,)


def cpu_latency_ms(model: nn.Module, inputs: tuple, repeats: int) -> float:
    """Median wall time (ms) of a no-grad forward on the CPU, after two warm-up calls."""
    model = model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(*inputs)
            if i >= 2:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def evaluate_run(info: RunInfo, *, int8: bool = False, device: torch.device | str = "cpu",
                 batch_size: int | None = None, latency_batch: int = 1, repeats: int = 10,
                 task: Any = None) -> dict[str, Any]:
    from ..models.quantize import model_nbytes, quantize

    device = torch.device(device)
    task, splits, max_len = rebuild_task(info, task)
    test = splits["test"]
    if len(test) == 0:
        raise ValueError(f"eft eval {info.path}: the task's test split is empty (num_test={info.config.num_test})")
    batch = batch_size or info.config.eval_batch
    model = load_run_model(info, device)
    inputs = latency_inputs(task, info.model_config, latency_batch, max_len)
    cpu_model = model if device.type == "cpu" else load_run_model(info, "cpu")
    rows = {"float32": {**evaluate_model(model, task, test, batch, device),
                        "size_mb": model_nbytes(cpu_model) / 2**20,
                        "cpu_latency_ms": cpu_latency_ms(cpu_model, inputs, repeats)}}
    if int8:
        q = quantize(cpu_model)
        rows["int8"] = {**evaluate_model(q, task, test, batch, torch.device("cpu")),
                        "size_mb": model_nbytes(q) / 2**20, "cpu_latency_ms": cpu_latency_ms(q, inputs, repeats)}
    metric = task.metric
    result = {
        "run": str(info.path), "task": info.config.task, "attention": info.config.attention, "metric": metric,
        "seq_len": max_len, "latency_batch": latency_batch, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "parameters": sum(p.numel() for p in cpu_model.parameters()),
        "best_step": int(ckpt.read_metadata(info.best).get("step", -1)), "models": rows,
    }
    if int8:
        f, q = rows["float32"], rows["int8"]
        result["int8_vs_float32"] = {
            f"{metric}_delta": None if f[metric] is None or q[metric] is None else q[metric] - f[metric],
            "size_ratio": q["size_mb"] / f["size_mb"], "latency_ratio": q["cpu_latency_ms"] / f["cpu_latency_ms"],
        }
    return result


def markdown(result: dict[str, Any]) -> str:
    metric = result["metric"]
    lines = [f"# eft eval {result['run']}", "",
             f"{result['task']} / {result['attention']}, test split, best step {result['best_step']}; latency: "
             f"batch {result['latency_batch']} x {result['seq_len']} tokens, CPU, {result['threads']} threads", "",
             f"| model | {metric} | loss | size (MB) | CPU latency (ms) |", "|---|---|---|---|---|"]
    for name, row in result["models"].items():
        value = "n/a" if row[metric] is None else f"{row[metric]:.4f}"
        loss = "n/a" if row["loss"] is None else f"{row['loss']:.4f}"
        lines.append(f"| {name} | {value} | {loss} | {row['size_mb']:.3f} | {row['cpu_latency_ms']:.2f} |")
    delta = result.get("int8_vs_float32")
    if delta:
        d = delta[f"{metric}_delta"]
        lines += ["", f"int8 vs float32: {metric} {'n/a' if d is None else f'{d:+.4f}'}, size x{delta['size_ratio']:.2f}, "
                      f"latency x{delta['latency_ratio']:.2f}"]
    return "\n".join(lines)
