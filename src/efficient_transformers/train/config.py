"""The training configuration: one flat dataclass, validated once, saved in `trainer_state.json`.

Everything that decides the computation (model shape, optimiser, schedule, data, seed) lives here, so
a checkpoint carries what is needed to rebuild its run, and `--resume` can check that the resumed run
is the same run. Fields in `RESUME_MAY_CHANGE` only change what is logged or saved (or the length of
the run), never the weights reached at a given step, so they may differ on resume.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DECAYS = ("cosine", "linear", "constant")
POOLINGS = ("cls", "mean", "pma")

#: Fields a resumed run may set differently from the checkpointed one.
RESUME_MAY_CHANGE = ("steps", "eval_every", "checkpoint_every", "log_every", "device", "progress", "out")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (see `eft train --help` for each field)."""

    task: str
    attention: str
    out: str
    data: str | None = None
    steps: int = 1000
    seed: int = 0
    # model
    dim: int = 128
    depth: int = 2
    heads: int = 4
    ff_mult: int = 4
    max_len: int | None = None  # None -> the task's default_max_len
    pooling: str = "cls"
    dropout: float = 0.1
    attention_options: dict[str, Any] = field(default_factory=dict)
    share: str = "none"  # cross-layer weight sharing: none | all | attention | ffn
    embedding_dim: int | None = None  # ALBERT's factorised embedding (E < dim)
    reversible: bool = False  # Reformer's reversible residual layers
    ff_chunks: int = 1  # chunked feed-forward
    segment_len: int | None = None  # recurrence mechanisms: train segment by segment with the memory (truncated BPTT)
    # fine-tuning and distillation
    init_from: str | None = None  # a run folder whose best weights initialise the model (its architecture)
    adapters: str | None = None  # "houlsby:SIZE" | "lora:RANK": train those only, the base frozen
    teacher: str | None = None  # a run folder: distil its model's softened outputs into this one
    distill_temperature: float = 2.0  # tau: softmax(logits / tau) for teacher and student
    distill_alpha: float = 0.5  # loss = alpha tau^2 KL(teacher || student) + (1 - alpha) task loss
    # data
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    # optimisation
    batch_size: int = 32  # per process and per micro-batch
    eval_batch_size: int | None = None  # None -> batch_size
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int | None = None  # steps; None -> 10% of steps
    decay: str = "cosine"
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    accum: int = 1  # micro-batches per optimiser step
    bf16: bool = False
    fp16: bool = False  # float16 autocast with a gradient scaler (overflowing steps are skipped and counted)
    # bookkeeping
    eval_every: int = 100
    checkpoint_every: int | None = None  # None -> eval_every
    log_every: int = 10
    device: str = "auto"
    progress: str = "auto"  # "auto" (a bar on a terminal), "on", "off"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("task", "attention", "out"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        _check_int("steps", self.steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("dim", "depth", "heads", "ff_mult", "batch_size", "accum", "eval_every", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("max_len", "eval_batch_size", "checkpoint_every", "segment_len"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        for name in ("num_train", "num_val", "num_test", "warmup"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0)
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} does not divide dim={self.dim}; choose heads among the divisors of dim")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; allowed: {list(POOLINGS)}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; allowed: {list(DECAYS)}")
        _check_float("lr", self.lr, low=0.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _check_float("grad_clip", self.grad_clip, low=0.0)
        for name in ("bf16", "fp16", "reversible"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 contradict each other; allowed: one of --bf16, --fp16 or neither")
        from ..models.blocks import check_embedding_dim, check_ff_chunks, check_share  # late: models import torch

        check_share(self.share)
        check_embedding_dim(self.embedding_dim, self.dim)
        check_ff_chunks(self.ff_chunks)
        if self.adapters is not None:
            from ..models.adapters import parse_adapters

            parse_adapters(self.adapters)
            if self.init_from is None:
                raise ValueError(f"adapters={self.adapters!r} fine-tune a trained base: give --init-from RUN_DIR "
                                 f"(a run folder) with --adapters")
        for name in ("init_from", "teacher"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a run folder path or None, got {value!r}")
        _check_float("distill_temperature", self.distill_temperature, low=0.0, low_open=True)
        _check_float("distill_alpha", self.distill_alpha, low=0.0, high=1.0)
        if self.progress not in ("auto", "on", "off"):
            raise ValueError(f"progress must be one of ['auto', 'on', 'off'], got {self.progress!r}")
        for name in ("attention_options", "task_options"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a dict with string keys, got {value!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup

    @property
    def checkpoint_interval(self) -> int:
        return self.eval_every if self.checkpoint_every is None else self.checkpoint_every

    @property
    def eval_batch(self) -> int:
        return self.batch_size if self.eval_batch_size is None else self.eval_batch_size

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def differences(self, other: "TrainConfig", ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: name -> (self's value, other's value)."""
        mine, theirs = self.to_json(), other.to_json()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")
