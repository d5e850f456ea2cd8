"""`eft distill --teacher RUN_DIR --attention M [...]`: knowledge distillation into a student of any mechanism.

    eft distill --teacher runs/listops-vanilla-s0 --attention performer --depth 1 --out runs/listops-distilled
    eft distill --teacher runs/listops-vanilla-s0 --attention linear_transformer --temperature 4 --alpha 0.9

The student trains on the teacher's task and data (its task, data folder or generated sizes, length and
seed are taken from the teacher's run) against the teacher's temperature-softened outputs mixed with
the labels (Hinton et al. 2015; see `objective.Distillation`):

    loss = alpha tau^2 KL(softmax(t / tau) || softmax(s / tau)) + (1 - alpha) CE(s, y)

The student's mechanism, depth, width and every other model option are free; by default it has the
teacher's width (dim, heads, ff-mult) and half its depth, and such a student starts from every other
teacher layer (DistilBERT). Training is an ordinary `eft train` run with a teacher: resume, bf16 /
fp16, DDP through torchrun, evaluation and best-checkpoint selection all work, and the run folder is
an ordinary run folder (`eft eval` evaluates it). Everything else (steps, lr, batch size, ...) defaults
to the teacher's settings. Bad input (a missing teacher folder, a teacher of another task or
vocabulary, --out holding a run) prints one line and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse

from . import command as train_command

#: taken from the teacher's run: the data the student trains and is tested on
DATA_FIELDS = ("task", "data", "task_options", "num_train", "num_val", "num_test", "max_len", "seed")
#: model fields that default to the teacher's (depth defaults to half the teacher's)
WIDTH_FIELDS = ("dim", "heads", "ff_mult", "pooling", "dropout")


def configure(parser: argparse.ArgumentParser) -> None:
    train_command.configure(parser)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    S = argparse.SUPPRESS
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", default=S, metavar="RUN_DIR", help="the teacher's run folder (required)")
    group.add_argument("--temperature", dest="distill_temperature", type=float, default=S,
                       help="tau, the softmax temperature of teacher and student (default 2)")
    group.add_argument("--alpha", dest="distill_alpha", type=float, default=S,
                       help="weight of the soft (teacher) term; 1 - alpha weighs the labels (default 0.5)")


def config_from_args(args: argparse.Namespace):
    from .config import TrainConfig
    from .transfer import ARCHITECTURE_FIELDS, read_run

    if args.resume:  # the checkpoint holds the whole config, the teacher included
        return train_command.config_from_args(args)
    if not hasattr(args, "teacher"):
        raise ValueError("missing required option --teacher RUN_DIR (the teacher's run folder)")
    if not hasattr(args, "attention"):
        raise ValueError("missing required option --attention (the student's mechanism, see `eft models`)")
    teacher = read_run(args.teacher, "--teacher")
    given = {name: getattr(args, name) for name in train_command.CONFIG_FIELDS if hasattr(args, name)}
    for name in ("distill_temperature", "distill_alpha"):
        if hasattr(args, name):
            given[name] = getattr(args, name)
    if args.task_option:
        given["task_options"] = train_command.parse_key_values(args.task_option, "--task-option")
    if args.attention_option:
        given["attention_options"] = train_command.parse_key_values(args.attention_option, "--attention-option")
    base = teacher.config.to_json()
    for name in DATA_FIELDS:
        if name in given and given[name] != base[name]:
            raise ValueError(f"--teacher {teacher.path}: the student trains on the teacher's data, but --"
                             f"{name.replace('_', '-')} {given[name]!r} differs from the teacher's {base[name]!r}; "
                             f"allowed: leave it out (or give the teacher's value)")
    config = {k: v for k, v in base.items() if k not in ARCHITECTURE_FIELDS and k not in (
        "init_from", "adapters", "out", "teacher", "distill_temperature", "distill_alpha", "bf16", "fp16")}
    for name in WIDTH_FIELDS:
        config[name] = base[name]
    config["depth"] = max(1, base["depth"] // 2)
    config.update(given)
    config["teacher"] = str(teacher.path)
    config.setdefault("out", f"runs/distill-{config['task']}-{config['attention']}-s{config['seed']}")
    return TrainConfig(**config)


def run(args: argparse.Namespace) -> int:
    return train_command.run(args, config_from_args=config_from_args, prog="eft distill")
