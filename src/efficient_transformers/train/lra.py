"""`eft lra`: the long-range suite. Every bidirectional mechanism is trained on every LRA task, then
the accuracy table (LRA Table 1 layout: mechanisms x tasks, plus the majority-class baseline) and the
efficiency table (LRA Table 2 layout: training-step time and peak memory against vanilla, from the
benchmark, `efficient_transformers.bench`) are written as JSON and Markdown.

    eft lra --quick --out lra-quick                   # generated data, small everything: minutes on a CPU
    eft lra --out lra --data listops=/data/listops-1000 --mechanisms vanilla,performer

Presets (per task; `--steps` overrides every task's step count):

- ``--quick``: generated data, 480 / 100 / 100 examples, lengths ListOps 128, Text 256, Retrieval
  2 x 128, Image 256 (the first 8 pixel rows), Pathfinder 16 x 16 = 256; one layer, dim 32, 2 heads,
  FFN 64, batch 16, 40 steps at lr 3e-3. A smoke test of the whole pipeline: its accuracies are
  near chance and say nothing about the mechanisms; the efficiency table uses lengths 256-1024.
- default: the LRA paper's lengths and the released base configs' model sizes (ListOps 2000, 4 layers,
  dim 512, FFN 1024, 8 heads; Text 1000, 4 layers, dim 256, FFN 1024; Retrieval 2 x 4000, 4 layers,
  dim 128, FFN 512; Image 1024, 1 layer, dim 32, 1 head; Pathfinder 1024, 1 layer, dim 32, 2 heads,
  mean pooling), AdamW with warm-up and cosine decay (LRA used other optimisers and schedules, so the
  learning rates are ours), and the tasks' default data sizes unless `--data` gives official files.
  Efficiency at 1K-4K as in LRA Table 2. Meant for a GPU.

Each run is an ordinary `eft train` run folder under ``OUT/runs/TASK/MECHANISM``; a run that fails
(e.g. a mechanism that cannot handle a setting) is reported in the tables and on stderr, and the
command then exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import mechanisms as registered_mechanisms
from . import checkpoint as ckpt
from .command import parse_key_values
from .config import TrainConfig
from .progress import ProgressBar, is_terminal

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
QUICK_BENCH_LENGTHS = (256, 512, 1024)
FULL_BENCH_LENGTHS = (1024, 2048, 3072, 4096)  # LRA Table 2


@dataclass(frozen=True)
class SuiteTask:
    """One task's data and training settings within the suite."""

    max_len: int
    model: dict[str, Any]
    train: dict[str, Any]
    task_options: dict[str, Any] = field(default_factory=dict)
    sizes: tuple[int | None, int | None, int | None] = (None, None, None)


_QUICK_MODEL = dict(dim=32, depth=1, heads=2, ff_mult=2, pooling="cls", dropout=0.0)
_QUICK_TRAIN = dict(steps=40, batch_size=16, lr=3e-3, weight_decay=0.01, warmup=4, eval_every=20)
_QUICK_SIZES = (480, 100, 100)
QUICK: dict[str, SuiteTask] = {
    "listops": SuiteTask(128, _QUICK_MODEL, _QUICK_TRAIN, sizes=_QUICK_SIZES),
    "text": SuiteTask(256, _QUICK_MODEL, _QUICK_TRAIN, sizes=_QUICK_SIZES),
    "retrieval": SuiteTask(128, _QUICK_MODEL, _QUICK_TRAIN, sizes=_QUICK_SIZES),
    "image": SuiteTask(256, _QUICK_MODEL, _QUICK_TRAIN, sizes=_QUICK_SIZES),
    "pathfinder": SuiteTask(256, _QUICK_MODEL, _QUICK_TRAIN, task_options={"size": 16}, sizes=_QUICK_SIZES),
}
FULL: dict[str, SuiteTask] = {
    "listops": SuiteTask(2000, dict(dim=512, depth=4, heads=8, ff_mult=2, pooling="cls", dropout=0.1),
                         dict(steps=5000, batch_size=32, lr=5e-4, weight_decay=0.1, warmup=1000, eval_every=500)),
    "text": SuiteTask(1000, dict(dim=256, depth=4, heads=4, ff_mult=4, pooling="cls", dropout=0.1),
                      dict(steps=20000, batch_size=32, lr=5e-4, weight_decay=0.1, warmup=1000, eval_every=1000)),
    "retrieval": SuiteTask(4000, dict(dim=128, depth=4, heads=4, ff_mult=4, pooling="cls", dropout=0.1),
                           dict(steps=5000, batch_size=32, lr=5e-4, weight_decay=0.1, warmup=500, eval_every=500)),
    "image": SuiteTask(1024, dict(dim=32, depth=1, heads=1, ff_mult=2, pooling="cls", dropout=0.1),
                       dict(steps=35000, batch_size=256, lr=5e-4, weight_decay=0.0, warmup=175, eval_every=1750)),
    "pathfinder": SuiteTask(1024, dict(dim=32, depth=1, heads=2, ff_mult=2, pooling="mean", dropout=0.1),
                            dict(steps=62500, batch_size=512, lr=1e-3, weight_decay=0.0, warmup=312, eval_every=3125)),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--quick", action="store_true", help="generated data, short sequences, a tiny model")
    parser.add_argument("--out", default=None, help="output folder (default lra-quick or lra)")
    parser.add_argument("--mechanisms", default=None, help="comma-separated (default: every bidirectional mechanism)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(LRA_TASKS)}")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=DIR",
                        help="official files for a task (repeatable); other tasks generate their data")
    parser.add_argument("--steps", type=int, default=None, help="training steps for every task (overrides the preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-bench", action="store_true", help="skip the efficiency benchmark")
    parser.add_argument("--bench-lengths", default=None, help="comma-separated lengths for the efficiency table")
    parser.add_argument("--resume", action="store_true", help="keep finished runs in --out, resume unfinished ones")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
    parser.add_argument("--json", action="store_true", help="print the suite's JSON instead of the tables")


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class SuitePlan:
    out: Path
    preset: dict[str, SuiteTask]
    quick: bool
    tasks: list[str]
    mechanisms: list[str]
    data: dict[str, str]
    steps: int | None
    seed: int
    device: str
    bench_lengths: list[int] | None  # None: no benchmark
    resume: bool
    overwrite: bool

    def run_config(self, task: str, mechanism: str) -> TrainConfig:
        spec = self.preset[task]
        sizes = dict(zip(("num_train", "num_val", "num_test"), spec.sizes))
        train = {**spec.train, **({"steps": self.steps} if self.steps is not None else {})}
        return TrainConfig(task=task, attention=mechanism, out=str(self.out / "runs" / task / mechanism),
                           data=self.data.get(task), seed=self.seed, max_len=spec.max_len, device=self.device,
                           task_options=dict(spec.task_options), progress="off", **spec.model, **train, **sizes)


def _split_names(text: str | None, allowed: list[str], what: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"unknown {what} {bad or text!r}; allowed: {allowed}")
    return names


def make_plan(args: argparse.Namespace) -> SuitePlan:
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; choose one")
    cards = registered_mechanisms()
    bidirectional = [c.name for c in cards if c.bidirectional]
    requested = _split_names(args.mechanisms, [c.name for c in cards], "mechanism(s)")
    if requested:
        causal_only = [m for m in requested if m not in bidirectional]
        if causal_only:
            raise ValueError(f"mechanism(s) {causal_only} are causal only; the LRA tasks need an encoder; "
                             f"allowed: {bidirectional}")
    tasks = _split_names(args.tasks, list(LRA_TASKS), "task(s)") or list(LRA_TASKS)
    data = parse_key_values(args.data, "--data")
    unknown = [t for t in data if t not in LRA_TASKS]
    if unknown:
        raise ValueError(f"--data: unknown task(s) {unknown}; allowed: {list(LRA_TASKS)}")
    if args.quick and data:
        raise ValueError("--quick generates its data; --data is for the full suite")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive int, got {args.steps}")
    if args.no_bench and args.bench_lengths:
        raise ValueError("--no-bench and --bench-lengths contradict each other; choose one")
    lengths = None
    if not args.no_bench:
        lengths = list(QUICK_BENCH_LENGTHS if args.quick else FULL_BENCH_LENGTHS)
        if args.bench_lengths:
            try:
                lengths = [int(v) for v in args.bench_lengths.split(",")]
            except ValueError:
                lengths = []
            if not lengths or min(lengths) < 1:
                raise ValueError(f"--bench-lengths {args.bench_lengths!r}: expected comma-separated positive ints")
    return SuitePlan(
        out=Path(args.out or ("lra-quick" if args.quick else "lra")), preset=QUICK if args.quick else FULL,
        quick=args.quick, tasks=tasks, mechanisms=requested or bidirectional, data={k: str(v) for k, v in data.items()},
        steps=args.steps, seed=args.seed, device=args.device, bench_lengths=lengths, resume=args.resume,
        overwrite=args.overwrite,
    )


# ---------------------------------------------------------------------------------------------- running


def _load_benchmark():
    """The benchmark entry point, imported only when the suite needs it (`eft train` never does)."""
    try:
        from ..bench import run_benchmark
    except ImportError as err:
        raise ValueError(f"the efficiency benchmark (efficient_transformers.bench) is not available ({err}); "
                         f"pass --no-bench to write the accuracy table alone") from None
    return run_benchmark


def _existing_result(config: TrainConfig) -> dict[str, Any] | None:
    """A finished run of exactly this config in its folder (kept by --resume), else None."""
    path = Path(config.out) / ckpt.RESULTS_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    return result if result.get("config") == config.to_json() else None


def run_suite(plan: SuitePlan, *, progress: bool | None = None) -> dict[str, Any]:
    """Train every (task, mechanism) pair, run the benchmark, write lra.json and lra.md; returns the JSON."""
    from ..tasks import get_task  # tasks are only needed here, not for `eft models`
    from .distributed import DistEnv, resolve_device
    from .trainer import Trainer

    run_benchmark = _load_benchmark() if plan.bench_lengths else None
    env = DistEnv(device=resolve_device(plan.device))
    started = time.monotonic()
    # all data first: a missing or malformed file fails before any training starts
    datasets = {}
    for name in plan.tasks:
        task, cfg = get_task(name), plan.run_config(name, plan.mechanisms[0])
        splits = task.datasets(cfg.data, seed=cfg.seed, max_len=cfg.max_len, num_train=cfg.num_train,
                               num_val=cfg.num_val, num_test=cfg.num_test, **cfg.task_options)
        datasets[name] = (task, splits)
    if not (plan.resume or plan.overwrite):
        taken = [str(plan.out / "runs" / t / m) for t in plan.tasks for m in plan.mechanisms
                 if (plan.out / "runs" / t / m).is_dir() and any((plan.out / "runs" / t / m).iterdir())]
        if taken:
            raise ValueError(f"--out {plan.out} already holds runs ({taken[0]}, ...); pass --resume to keep "
                             f"finished ones or --overwrite to replace them")

    results: dict[str, dict[str, Any]] = {t: {} for t in plan.tasks}
    bar = ProgressBar(len(plan.tasks) * len(plan.mechanisms), "lra", enabled=progress)
    done = 0
    for name in plan.tasks:
        task, splits = datasets[name]
        for mechanism in plan.mechanisms:
            config = plan.run_config(name, mechanism)
            try:
                result = _existing_result(config) if plan.resume else None
                if result is None:
                    resume = plan.resume and (Path(config.out) / ckpt.STATE_FILE).is_file()
                    trainer = Trainer(config, env=env, task=task, splits=splits, resume=resume,
                                      overwrite=not resume)
                    result = trainer.fit()
                results[name][mechanism] = _summarise_run(result)
            except Exception as err:  # one mechanism failing must not hide the others' results
                message = f"{type(err).__name__}: {err}"
                print(f"eft lra: {name}/{mechanism} failed: {message}", file=sys.stderr)
                results[name][mechanism] = {"status": "error", "error": message, "out": config.out}
            done += 1
            bar.update(done, run=f"{name}/{mechanism}")
    bar.close()
    baseline = {t: _baseline(datasets[t][1]) for t in plan.tasks}

    efficiency = None
    if run_benchmark is not None:
        bench = run_benchmark(mechanisms=plan.mechanisms, lengths=plan.bench_lengths, modes=("train",),
                              out_dir=str(plan.out / "bench"), quick=plan.quick)
        efficiency = efficiency_table(bench, plan.mechanisms, plan.bench_lengths)

    suite = {
        "config": {
            "quick": plan.quick, "tasks": plan.tasks, "mechanisms": plan.mechanisms, "seed": plan.seed,
            "steps": plan.steps, "data": plan.data, "device": str(env.device), "bench_lengths": plan.bench_lengths,
            "presets": {t: dataclasses.asdict(plan.preset[t]) for t in plan.tasks},
        },
        "accuracy": {"metric": "test accuracy of the best-validation checkpoint", "results": results,
                     "majority_baseline": baseline},
        "efficiency": efficiency,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    plan.out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(plan.out / "lra.json", suite)
    ckpt.atomic_write_bytes(plan.out / "lra.md", markdown(suite).encode("utf-8"))
    return suite


def _summarise_run(result: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok", "test_accuracy": (result["test"] or {}).get("accuracy"),
            "val_accuracy": result["best"]["value"], "best_step": result["best"]["step"], "steps": result["steps"],
            "parameters": result["parameters"], "elapsed_s": round(result["elapsed"], 1), "out": result["out"]}


def _baseline(splits: dict[str, Any]) -> dict[str, Any]:
    from .sampling import majority_baseline
    from .trainer import split_labels

    train = split_labels(splits["train"])
    return {split: majority_baseline(train, split_labels(splits[split]))["accuracy"] for split in ("val", "test")}


# ---------------------------------------------------------------------------------------------- tables


def efficiency_table(bench: dict[str, Any], mechanisms: list[str], lengths: list[int]) -> dict[str, Any]:
    """Training-step time and peak memory per mechanism and length, with ratios to vanilla at the same
    length (speed-up = vanilla time / time, memory = peak / vanilla's peak), from the benchmark's rows."""
    rows = {(r["mechanism"], r["seq_len"]): r for r in bench["rows"] if r.get("mode") == "train"}
    names = ["vanilla"] + [m for m in mechanisms if m != "vanilla"]
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        table[name] = {}
        for n in lengths:
            row, ref = rows.get((name, n)), rows.get(("vanilla", n))
            cell: dict[str, Any] = {"status": row["status"] if row else "missing"}
            if row and row["status"] == "ok":
                cell.update(time_ms=row["time_ms"], peak_mem_mb=row["peak_mem_mb"])
                if ref and ref["status"] == "ok":
                    cell["speedup"] = ref["time_ms"] / row["time_ms"] if row["time_ms"] else None
                    cell["mem_ratio"] = (row["peak_mem_mb"] / ref["peak_mem_mb"]
                                         if row["peak_mem_mb"] is not None and ref["peak_mem_mb"] else None)
            table[name][str(n)] = cell
    return {"mode": "train", "lengths": lengths, "table": table, "bench_config": {
        k: bench.get("config", {}).get(k) for k in ("batch", "dim", "heads", "dtype", "device", "device_name")}}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown(suite: dict[str, Any]) -> str:
    cfg, acc = suite["config"], suite["accuracy"]
    tasks, mechs = cfg["tasks"], cfg["mechanisms"]
    lines = [f"# Long Range Arena suite ({'quick' if cfg['quick'] else 'full'})", ""]
    if cfg["quick"]:
        lines += ["Quick mode: generated data, short sequences and a one-layer model trained for a few dozen steps. "
                  "It checks the pipeline end to end; the accuracies are not a comparison of the mechanisms.", ""]
    lines += ["## Accuracy", "",
              "Test accuracy (%) of the checkpoint with the best validation accuracy; "
              "the last row predicts the training set's most frequent label.", ""]
    header = ["Model"] + [t for t in tasks] + ["Avg"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    errors = []
    for m in mechs:
        cells, values = [], []
        for t in tasks:
            r = acc["results"][t][m]
            if r["status"] == "ok":
                cells.append(_percent(r["test_accuracy"]))
                values.append(r["test_accuracy"])
            else:
                cells.append("error")
                errors.append(f"- {t} / {m}: {r['error']}")
        avg = sum(values) / len(values) if values and len(values) == len(tasks) else None
        lines.append("| " + " | ".join([m] + cells + [_percent(avg)]) + " |")
    base = [acc["majority_baseline"][t]["test"] for t in tasks]
    base_avg = sum(base) / len(base) if all(b is not None for b in base) else None
    lines.append("| " + " | ".join(["majority class"] + [_percent(b) for b in base] + [_percent(base_avg)]) + " |")
    if errors:
        lines += ["", "Failed runs:", ""] + errors
    lines += ["", "Settings per task:", ""]
    for t in tasks:
        p = cfg["presets"][t]
        steps = cfg["steps"] or p["train"]["steps"]
        lines.append(f"- {t}: length {p['max_len']}, {p['model']['depth']} layer(s), dim {p['model']['dim']}, "
                     f"{p['model']['heads']} heads, {steps} steps, batch {p['train']['batch_size']}, "
                     f"lr {p['train']['lr']}, data {cfg['data'].get(t, 'generated')}"
                     + (f" ({p['sizes'][0]} / {p['sizes'][1]} / {p['sizes'][2]})" if p["sizes"][0] else ""))
    eff = suite["efficiency"]
    lines += ["", "## Efficiency", ""]
    if eff is None:
        lines.append("Not measured (--no-bench).")
    else:
        bc = eff["bench_config"]
        lines += [f"Training step (forward + backward of one attention layer), batch {bc['batch']}, dim {bc['dim']}, "
                  f"{bc['heads']} heads, {bc['dtype']} on {bc['device_name'] or bc['device']}; in brackets: speed-up "
                  f"over vanilla (time) and memory relative to vanilla. Full benchmark: bench/bench.md.", ""]
        header = ["Model"] + [f"time ms N={n}" for n in eff["lengths"]] + [f"memory MiB N={n}" for n in eff["lengths"]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m, cells in eff["table"].items():
            times = [_eff_cell(cells[str(n)], "time_ms", "speedup") for n in eff["lengths"]]
            mems = [_eff_cell(cells[str(n)], "peak_mem_mb", "mem_ratio") for n in eff["lengths"]]
            lines.append("| " + " | ".join([m] + times + mems) + " |")
    lines += ["", f"Wall time: {suite['wall_time_s']} s", ""]
    return "\n".join(lines)


def _eff_cell(cell: dict[str, Any], value_key: str, ratio_key: str) -> str:
    if cell["status"] != "ok":
        return cell["status"]
    value = cell[value_key]
    text = "-" if value is None else f"{value:.3g}"
    ratio = cell.get(ratio_key)
    return text + (f" ({ratio:.2f}x)" if ratio is not None else "")


# ---------------------------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
        suite = run_suite(plan, progress=None if is_terminal(sys.stderr) else False)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"eft lra: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(suite, indent=1))
    else:
        print((plan.out / "lra.md").read_text(encoding="utf-8"))
        print(f"written: {plan.out / 'lra.json'}, {plan.out / 'lra.md'}")
    failed = [(t, m) for t, runs in suite["accuracy"]["results"].items() for m, r in runs.items() if r["status"] != "ok"]
    return 1 if failed else 0
