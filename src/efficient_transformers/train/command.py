"""`eft train`: train and evaluate one model (one attention mechanism) on one task.

    eft train --task listops --attention performer --max-len 256 --steps 2000 --out runs/listops-performer
    eft train --task listops --attention performer --out runs/listops-performer --resume
    eft train --task text --attention vanilla --data /data/aclImdb --bf16
    eft train --task listops --attention vanilla --share all --reversible --fp16
    eft train --task text --init-from runs/listops-vanilla-s0 --adapters houlsby:16 --out runs/text-adapters
    eft train --task max_of_set --steps 500     # a set task: the SetTransformer (ISAB encoder) on sets of vectors
    torchrun --nproc_per_node 2 -m efficient_transformers train --task listops --attention vanilla ...

Without --data the task generates its data offline; with it, the official files are read. Bad input
(unknown task or mechanism, malformed data files, an output folder that already holds a run) is
reported as one line on stderr with exit status 2, before anything is written.

A task may name defaults for options not given: max_of_set (a set task, see `train.sets`) trains the
SetTransformer, with --attention set_transformer (ISAB; vanilla gives SAB), --pooling pma and --dropout 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import DECAYS, POOLINGS, TrainConfig

# argparse destination -> TrainConfig field, for every option that maps onto the config
CONFIG_FIELDS = (
    "task", "attention", "data", "out", "steps", "seed", "dim", "depth", "heads", "ff_mult", "max_len", "pooling",
    "dropout", "num_train", "num_val", "num_test", "batch_size", "eval_batch_size", "lr", "weight_decay", "warmup",
    "decay", "min_lr_ratio", "grad_clip", "accum", "bf16", "eval_every", "checkpoint_every", "log_every", "device",
    "progress", "share", "embedding_dim", "reversible", "ff_chunks", "fp16", "init_from", "adapters",
    "segment_len",
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = (__doc__ or "").split("\n\n")[0]
    S = argparse.SUPPRESS  # only options the user gives reach the config (its defaults apply otherwise)
    d = TrainConfig.__dataclass_fields__
    what = parser.add_argument_group("what to train")
    what.add_argument("--task", default=S, help="task name (listops, text, retrieval, image, pathfinder, byte_lm, max_of_set)")
    what.add_argument("--attention", default=S, help="attention mechanism (see `eft models`)")
    what.add_argument("--data", default=S, help="folder with the task's official files (default: generate offline)")
    what.add_argument("--num-train", type=int, default=S, help="training examples (generated) or cap (loaded)")
    what.add_argument("--num-val", type=int, default=S, help="validation examples")
    what.add_argument("--num-test", type=int, default=S, help="test examples")
    what.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                      help="task option (repeatable); VALUE is parsed as JSON when possible")
    out = parser.add_argument_group("output and resume")
    out.add_argument("--out", default=S, help="output folder (default runs/TASK-ATTENTION-sSEED)")
    out.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    out.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    out.add_argument("--stop-at", type=int, default=None,
                     help="stop after this step with a checkpoint (resume later with --resume)")
    out.add_argument("--json", action="store_true", help="print the results as JSON")
    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=int, default=S, help=f"model width (default {d['dim'].default})")
    model.add_argument("--depth", type=int, default=S, help=f"layers (default {d['depth'].default})")
    model.add_argument("--heads", type=int, default=S, help=f"attention heads (default {d['heads'].default})")
    model.add_argument("--ff-mult", type=int, default=S, help=f"FFN width / dim (default {d['ff_mult'].default})")
    model.add_argument("--max-len", type=int, default=S, help="sequence length (default: the task's)")
    model.add_argument("--pooling", choices=POOLINGS, default=S, help=f"(default {d['pooling'].default})")
    model.add_argument("--dropout", type=float, default=S, help=f"(default {d['dropout'].default})")
    model.add_argument("--attention-option", action="append", default=[], metavar="KEY=VALUE",
                       help="attention option (repeatable); VALUE is parsed as JSON when possible")
    model.add_argument("--share", default=S, metavar="MODE",
                       help="cross-layer weight sharing: none, all, attention or ffn (default none)")
    model.add_argument("--embedding-dim", type=int, default=S, metavar="E",
                       help="ALBERT's factorised embedding of E < --dim dimensions (default: none)")
    model.add_argument("--reversible", action="store_true", default=S,
                       help="reversible residual layers (Reformer): activation memory independent of depth")
    model.add_argument("--ff-chunks", type=int, default=S, metavar="N",
                       help="apply the feed-forward to N slices of the sequence (default 1)")
    model.add_argument("--segment-len", type=int, default=S, metavar="L",
                       help="recurrence mechanisms (transformer_xl, compressive): train and evaluate segment by "
                            "segment of L tokens with the memory (truncated BPTT); each batch lane reads a contiguous stream")
    tune = parser.add_argument_group("fine-tuning")
    tune.add_argument("--init-from", default=S, metavar="RUN_DIR",
                      help="start from this run's best weights (and architecture); the task head is new if the task is")
    tune.add_argument("--adapters", default=S, metavar="KIND:SIZE",
                      help="with --init-from: train only houlsby:SIZE bottleneck adapters or lora:RANK updates "
                           "(plus layer norms and the task head), the base frozen")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=S, help=f"optimiser steps (default {d['steps'].default})")
    opt.add_argument("--seed", type=int, default=S, help="seed of data generation, order, init and dropout (default 0)")
    opt.add_argument("--batch-size", type=int, default=S, help=f"per process and micro-batch (default {d['batch_size'].default})")
    opt.add_argument("--eval-batch-size", type=int, default=S, help="(default: --batch-size)")
    opt.add_argument("--accum", type=int, default=S, help="micro-batches per step (gradient accumulation, default 1)")
    opt.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default {d['lr'].default})")
    opt.add_argument("--weight-decay", type=float, default=S, help=f"AdamW weight decay (default {d['weight_decay'].default})")
    opt.add_argument("--warmup", type=int, default=S, help="linear warm-up steps (default 10%% of --steps)")
    opt.add_argument("--decay", choices=DECAYS, default=S, help=f"decay after warm-up (default {d['decay'].default})")
    opt.add_argument("--min-lr-ratio", type=float, default=S, help="final lr / peak lr (default 0)")
    opt.add_argument("--grad-clip", type=float, default=S, help=f"max gradient norm, 0 = off (default {d['grad_clip'].default})")
    opt.add_argument("--bf16", action="store_true", default=S, help="bf16 autocast")
    opt.add_argument("--fp16", action="store_true", default=S,
                     help="float16 autocast with a gradient scaler (overflowing steps skipped, counted in metrics.jsonl)")
    book = parser.add_argument_group("evaluation, checkpoints, device")
    book.add_argument("--eval-every", type=int, default=S, help=f"validate every N steps (default {d['eval_every'].default})")
    book.add_argument("--checkpoint-every", type=int, default=S, help="checkpoint every N steps (default: --eval-every)")
    book.add_argument("--log-every", type=int, default=S, help=f"training metrics every N steps (default {d['log_every'].default})")
    book.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    book.add_argument("--progress", choices=("auto", "on", "off"), default=S,
                      help="progress bar: auto = only on a terminal (default auto)")


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """["k=v", ...] -> {k: v}; v parsed as JSON when it is valid JSON (numbers, booleans, lists), else a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        if key in out:
            raise ValueError(f"{flag} {key!r} is given twice")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: from the arguments, or on --resume from the checkpoint plus the arguments given."""
    given = {name: getattr(args, name) for name in CONFIG_FIELDS if hasattr(args, name)}
    if args.task_option:
        given["task_options"] = parse_key_values(args.task_option, "--task-option")
    if args.attention_option:
        given["attention_options"] = parse_key_values(args.attention_option, "--attention-option")
    if args.resume:
        if "out" not in given:
            raise ValueError("--resume needs --out, the folder of the run to continue")
        from .trainer import load_resume_config

        return load_resume_config(given.pop("out"), given)
    if "init_from" in given:
        from .transfer import merge_base_config, read_run

        given = merge_base_config(given, read_run(given["init_from"], "--init-from"))
    if "task" in given:
        apply_task_defaults(given)
    missing = [f"--{name}" for name in ("task", "attention") if name not in given]
    if missing:
        raise ValueError(f"missing required option(s) {' and '.join(missing)}")
    given.setdefault("out", f"runs/{given['task']}-{given['attention']}-s{given.get('seed', 0)}")
    return TrainConfig(**given)


def apply_task_defaults(given: dict[str, Any]) -> None:
    """Fill options the user did not give with the task's defaults (its `default_attention` and
    `train_defaults`, e.g. the set task's SetTransformer settings); unknown tasks raise ValueError."""
    from ..tasks import get_task

    task = get_task(given["task"])
    attention = getattr(task, "default_attention", None)
    if attention is not None:
        given.setdefault("attention", attention)
    for name, value in getattr(task, "train_defaults", {}).items():
        given.setdefault(name, value)


def run(args: argparse.Namespace, config_from_args=config_from_args, prog: str = "eft train") -> int:
    """`eft train` (and `eft distill`, which builds its config with its own `config_from_args`)."""
    from .distributed import init_distributed, shutdown_distributed
    from .trainer import Trainer

    try:
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; choose one")
        if args.stop_at is not None and args.stop_at < 1:
            raise ValueError(f"--stop-at must be a positive step, got {args.stop_at}")
        config = config_from_args(args)
        env = init_distributed(config.device)
        if env.distributed and env.device.type == "cpu":
            import torch  # one gloo process per core: do not let each of K processes use every core

            torch.set_num_threads(max(1, torch.get_num_threads() // env.world_size))
        trainer = Trainer(config, env=env, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        shutdown_distributed()
        return 2
    try:
        results = trainer.fit(stop_at=args.stop_at)
        env.barrier()  # no process tears the group down while another is still in a collective or writing
    except FloatingPointError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if env.is_main:
        print(json.dumps(results, indent=1) if args.json else summary_line(results))
    return 0


def summary_line(results: dict[str, Any]) -> str:
    if not results.get("complete"):
        return f"stopped at step {results['step']} of {results['steps']}; continue with --resume --out {results['out']}"
    metric, best, test = results["metric"], results["best"], results["test"] or {}
    parts = [f"{results['task']}/{results['attention']}: {results['steps']} steps",
             f"best val {metric} {best['value']:.4f} (step {best['step']})"]
    if test.get(metric) is not None:
        parts.append(f"test {metric} {test[metric]:.4f}")
    baseline = results.get("baseline")
    if baseline and baseline["test"].get("accuracy") is not None:
        parts.append(f"majority baseline {baseline['test']['accuracy']:.4f}")
    elif baseline and baseline["test"].get("mae") is not None:
        parts.append(f"constant (median) baseline mae {baseline['test']['mae']:.4f}")
    parts.append(f"-> {results['out']}")
    return "; ".join(parts)
