"""The training loop: one model, one task, exact resume, optional data parallel.

    trainer = Trainer(TrainConfig(task="listops", attention="performer", out="runs/x", steps=2000))
    results = trainer.fit()          # {"best": {...}, "test": {...}, "baseline": {...}, ...}

A step is one AdamW update from ``accum`` micro-batches of ``batch_size`` examples per process
(gradients averaged over micro-batches and processes), with linear warm-up then cosine / linear decay,
gradient clipping and optional bf16 autocast, or fp16 autocast with a gradient scaler (`--fp16`: a step
whose scaled gradients overflow is skipped; skips are counted in metrics.jsonl and the results). Every
``eval_every`` steps (and at the last step) the model is evaluated on the validation split; the best score (highest accuracy, or lowest bits per byte
for language models) keeps its weights in ``best.safetensors``, and when training ends those weights
are evaluated on the test split. Metrics go to ``metrics.jsonl``; checkpoints (see `checkpoint`) every
``checkpoint_every`` steps.

With `teacher` the objective is knowledge distillation (`objective.Distillation`); with `init_from` the
model starts from another run's best weights, and with `adapters` only adapters / LoRA (plus norms and
the task head) train, the base frozen, and `adapters.safetensors` holds them apart (see `transfer`).

Exact resume: the data order is a function of (seed, step) (`sampling`), the learning rate a function
of the step (`optim`), and a checkpoint holds the weights, the optimiser state, every process's RNG
states (dropout), the running training statistics and the metrics log's size, so a resumed run
repeats bit for bit what the uninterrupted run would have done.

Construction does all the checking (config, task, data files, mechanism, output folder) without writing
anything, so bad input fails before a file is touched; `fit` does the writing.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import RESUME_MAY_CHANGE, TrainConfig
from .distributed import DistEnv, resolve_device
from . import transfer
from .objective import (
    METRIC_DIRECTION,
    BatchStats,
    Distillation,
    batch_statistics,
    build_model,
    check_mechanism_fits,
    model_config,
    move_batch,
)
from .optim import build_optimizer, learning_rate, set_learning_rate
from .progress import MetricsLog
from ..progress import is_terminal, progress_bar
from .sampling import ExampleStream, MicroBatchPlan, eval_shards, majority_baseline
from .recurrence import Recurrence, check_recurrence
from .sets import constant_baseline, is_set_task, split_targets
from ..models.adapters import adapter_state, add_adapters, parameter_counts

#: the gradient scaler's first scale with --fp16 (PyTorch's default)
FP16_INIT_SCALE = 2.0**16
#: a forward pass whose loss stays non-finite this many steps in a row under --fp16 is divergence, not overflow
FP16_MAX_NONFINITE_STEPS = 10


def dropout_seed(seed: int, rank: int) -> int:
    """Each process draws its own dropout masks, reproducibly."""
    return (seed * 1_000_003 + 7919 * rank + 1) % (2**63)


def load_resume_config(out_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config saved in `out_dir`'s trainer state, with `overrides` applied; overriding a field
    that changes the computation (anything outside `RESUME_MAY_CHANGE`) raises ValueError."""
    out_dir = Path(out_dir)
    state_path = out_dir / ckpt.STATE_FILE
    if not state_path.is_file():
        raise ValueError(f"--resume: no checkpoint to resume in {out_dir} ({ckpt.STATE_FILE} not found); "
                         f"start without --resume")
    saved = ckpt.read_json(state_path, "trainer state").get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{state_path}: expected a 'config' object")
    saved = TrainConfig.from_json(saved)
    merged = TrainConfig.from_json({**saved.to_json(), **overrides, "out": str(out_dir)})
    changed = merged.differences(saved, ignore=RESUME_MAY_CHANGE)
    if changed:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs given {b!r}" for k, (b, a) in changed.items())
        raise ValueError(f"--resume: the run in {out_dir} was trained with different settings ({detail}); "
                         f"only {list(RESUME_MAY_CHANGE)} may change on resume")
    return merged


class Trainer:
    def __init__(self, config: TrainConfig, *, env: DistEnv | None = None, task: Any = None,
                 splits: dict[str, Any] | None = None, resume: bool = False, overwrite: bool = False) -> None:
        """Check everything and build the model; writes nothing.

        task / splits: an already built task object and its splits (the LRA suite shares generated data
        across mechanisms); by default `get_task(config.task).datasets(...)`."""
        config.validate()
        self.config, self.resume, self.overwrite = config, resume, overwrite
        self.env = env or DistEnv(device=resolve_device(config.device))
        self.device = self.env.device
        self.out_dir = Path(config.out)
        if task is None:
            from ..tasks import get_task  # tasks only make data; imported here so models never depend on them

            task = get_task(config.task)
        self.task = task
        check_mechanism_fits(task, config.attention)
        self.metric = task.metric
        if self.metric not in METRIC_DIRECTION:
            raise ValueError(f"task {task.name!r}: unknown metric {self.metric!r}; allowed: {sorted(METRIC_DIRECTION)}")
        self._check_out_dir()
        # None -> the task's natural length for these options (e.g. 128 x 128 = 16,384 for Path-X generated
        # with size=128); official Path-X files need --max-len 16384, since their size is not an option
        natural = getattr(task, "natural_max_len", None)
        self.max_len = config.max_len or (natural(dict(config.task_options)) if natural else task.default_max_len)
        if splits is None:
            splits = task.datasets(config.data, seed=config.seed, max_len=self.max_len, num_train=config.num_train,
                                   num_val=config.num_val, num_test=config.num_test, **config.task_options)
        self.splits = splits
        for name in ("train", "val"):
            if len(splits[name]) == 0:
                raise ValueError(f"task {task.name!r}: the {name} split is empty; "
                                 f"training needs at least one {name} example (check --num-{name} and --data)")
        check_recurrence(config, task, self.env.world_size)
        #: --segment-len: the training lanes and the memory carried between micro-batches (`recurrence`)
        self.recurrence = (Recurrence(splits, config.batch_size, config.eval_batch, config.segment_len,
                                      self.env.rank, self.env.world_size)
                           if config.segment_len is not None else None)
        self.model_spec = model_config(config, task, self.max_len)
        self.transfer: dict[str, Any] = {}
        base = transfer.read_run(config.init_from, "--init-from") if config.init_from else None
        teacher = transfer.read_run(config.teacher, "--teacher") if config.teacher else None
        for info, flag in ((base, "--init-from"), (teacher, "--teacher")):
            if info is not None and info.path.resolve() == self.out_dir.resolve():
                raise ValueError(f"{flag} {info.path} is this run's own --out folder; allowed: another run's folder")
        if base is not None:
            transfer.check_base_architecture(base, self.model_spec)
        if teacher is not None:
            transfer.check_teacher(teacher, config.task, self.model_spec, self.max_len)
        torch.manual_seed(config.seed)
        self.model = build_model({k: v for k, v in self.model_spec.items() if k != "adapters"})
        if base is not None:
            self.transfer["init_from"] = transfer.load_base_weights(self.model, base, base.config.task == config.task)
        self.distill: Distillation | None = None
        if teacher is not None:
            teacher_model = transfer.load_run_model(teacher, self.device)
            for p in teacher_model.parameters():
                p.requires_grad_(False)
            self.distill = Distillation(teacher_model, config.distill_temperature, config.distill_alpha)
            if base is None:
                init = transfer.distilbert_init(self.model, teacher_model, self.model_spec, teacher.model_config)
                if init is not None:
                    self.transfer["distilbert_init"] = init
        if config.adapters is not None:
            add_adapters(self.model, config.adapters)
        self.model = self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=FP16_INIT_SCALE, enabled=config.fp16)
        self.plan = MicroBatchPlan(ExampleStream(len(splits["train"]), config.seed), config.batch_size,
                                   self.env.rank, self.env.world_size)
        self.metrics = MetricsLog(self.out_dir / ckpt.METRICS_FILE, enabled=self.env.is_main)
        # training state (restored on resume)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.window = BatchStats()  # training statistics since the last train log line
        self.window_steps = 0
        self.elapsed_before = 0.0
        self._last_loss: float | None = None
        self.skipped_steps = 0  # --fp16: optimiser steps skipped because the scaled gradients overflowed
        self.window_skipped = 0
        self.nonfinite_run = 0  # consecutive steps whose forward loss was not finite (--fp16)

    # ------------------------------------------------------------------ checks (read-only)
    def _check_out_dir(self) -> None:
        existing = [n for n in ckpt.RUN_FILES if (self.out_dir / n).exists()]
        existing += [p.name for p in self.out_dir.glob("*" + ckpt.PENDING_SUFFIX)] if self.out_dir.is_dir() else []
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--out {self.out_dir} exists and is not a folder")
        if self.resume:
            if not (self.out_dir / ckpt.STATE_FILE).is_file():
                raise ValueError(f"--resume: no checkpoint to resume in {self.out_dir} ({ckpt.STATE_FILE} not found)")
            saved = ckpt.read_json(self.out_dir / ckpt.STATE_FILE, "trainer state")
            if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
                raise ValueError(f"{self.out_dir / ckpt.STATE_FILE}: expected a trainer state with a 'config' object")
            changed = TrainConfig.from_json(saved["config"]).differences(self.config, ignore=RESUME_MAY_CHANGE)
            if changed:
                raise ValueError(f"--resume: settings differ from the checkpoint in {self.out_dir}: {sorted(changed)}")
            if saved.get("step", 0) > self.config.steps:
                raise ValueError(f"--resume: the checkpoint in {self.out_dir} is at step {saved['step']}, "
                                 f"beyond --steps {self.config.steps}; allowed: --steps >= {saved['step']}")
            if saved.get("world_size") != self.env.world_size:
                raise ValueError(f"--resume: the checkpoint was written by {saved.get('world_size')} process(es); "
                                 f"resume it with the same number, not {self.env.world_size}")
        elif existing and not self.overwrite:
            raise ValueError(f"--out {self.out_dir} already holds a run ({', '.join(sorted(existing))}); "
                             f"pass --resume to continue it or --overwrite to replace it")

    # ------------------------------------------------------------------ public
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to `config.steps` (or stop after step `stop_at`, with a checkpoint, to be resumed later).
        Returns the results (also written to results.json once training is complete)."""
        cfg = self.config
        if stop_at is not None and (not isinstance(stop_at, int) or stop_at < 1):
            raise ValueError(f"stop_at must be a positive int or None, got {stop_at!r}")
        self._prepare_out_dir()
        if self.resume:
            self._restore()
        else:
            torch.manual_seed(dropout_seed(cfg.seed, self.env.rank))
        model = self._wrap(self.model)
        start_time = time.monotonic()
        elapsed = lambda: self.elapsed_before + time.monotonic() - start_time  # noqa: E731
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        show = self.env.is_main and (cfg.progress == "on" or (cfg.progress == "auto" and is_terminal(sys.stderr)))
        bar = progress_bar(end, f"{cfg.task}/{cfg.attention}", enabled=show, initial=self.step, unit="step")
        model.train()
        while self.step < end:
            lr = learning_rate(self.step, cfg)
            self._train_step(model, lr)
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log_train(lr, elapsed())
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._evaluate_and_select(lr, elapsed())
            if self.step % cfg.checkpoint_interval == 0 or self.step == end:
                self._checkpoint(elapsed())
            bar.update(1)
            bar.set_postfix(loss=self._last_loss, lr=lr, refresh=False)
        bar.close()
        if self.step < cfg.steps:
            return {"complete": False, "step": self.step, "steps": cfg.steps, "out": str(self.out_dir)}
        return self._finish(elapsed())

    # ------------------------------------------------------------------ the step
    def _train_step(self, model: nn.Module, lr: float) -> None:
        cfg = self.config
        set_learning_rate(self.optimizer, lr)
        step_stats = BatchStats()
        for micro in range(cfg.accum):
            batch = self._train_batch(self.step * cfg.accum + micro)
            last = micro == cfg.accum - 1  # DDP averages gradients over processes after the last one only
            with contextlib.nullcontext() if last or not self.env.distributed else model.no_sync():
                with self._autocast():
                    stepped = model if self.recurrence is None else self.recurrence.carrying(model)
                    loss_sum, stats = batch_statistics(stepped, batch, self.task.kind, self.distill)
                self.scaler.scale(loss_sum / max(stats.count, 1.0) / cfg.accum).backward()
            step_stats.add(stats)
        finite = math.isfinite(step_stats.loss_sum)
        self.nonfinite_run = 0 if finite else self.nonfinite_run + 1
        if not finite and (not cfg.fp16 or self.nonfinite_run >= FP16_MAX_NONFINITE_STEPS):
            raise FloatingPointError(f"training diverged: the loss is {step_stats.loss_sum} at step {self.step + 1}"
                                     f"{f' ({self.nonfinite_run} steps in a row under --fp16)' if cfg.fp16 else ''}; "
                                     f"try a lower --lr or --grad-clip")
        self.scaler.unscale_(self.optimizer)  # no-op without --fp16
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        scale = self.scaler.get_scale() if cfg.fp16 else None
        self.scaler.step(self.optimizer)  # skips the update when a scaled gradient overflowed (--fp16)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scale is not None and self.scaler.get_scale() < scale:  # the scaler backed off: the step was skipped
            self.skipped_steps += 1
            self.window_skipped += 1
            if not finite:
                step_stats = BatchStats()  # an overflowing forward says nothing about the loss
        self.window.add(step_stats)
        self.window_steps += 1
        self._last_loss = step_stats.loss_sum / max(step_stats.count, 1.0) if step_stats.count else self._last_loss

    def _train_batch(self, micro_batch: int) -> dict[str, torch.Tensor]:
        if self.recurrence is not None:  # the next segment of every lane (the memory restarts with the lanes)
            return move_batch(self.recurrence.train_batch(micro_batch), self.device)
        train = self.splits["train"]
        items = [train[i] for i in self.plan.indices(micro_batch)]
        return move_batch(self.task.collate(items), self.device)

    def _autocast(self):
        dtype = torch.float16 if self.config.fp16 else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=self.config.bf16 or self.config.fp16)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return model
        unused = self._unused_parameters()
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(unused))

    def _unused_parameters(self) -> list[str]:
        """Parameters that get no gradient (DDP must be told); probed on one batch without touching the
        RNG streams, so the probe does not change the run."""
        devices = [self.device] if self.device.type == "cuda" else []
        memory = None if self.recurrence is None else self.recurrence.memory  # the probe must not reset it
        with torch.random.fork_rng(devices=devices):
            with self._autocast():
                loss_sum, _ = batch_statistics(self.model, self._train_batch(0), self.task.kind, self.distill)
            loss_sum.backward()
        if self.recurrence is not None:
            self.recurrence.memory = memory
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        self.model.zero_grad(set_to_none=True)
        return unused

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, model: nn.Module | None = None) -> dict[str, float | None]:
        """Loss and metric of `model` (default: the trained model) on `split`, over all processes."""
        model = self.model if model is None else model
        data = self.splits[split]
        stats = BatchStats()
        was_training = model.training
        model.eval()
        if self.recurrence is not None:  # the split read as streams, segment by segment with the memory
            stats = self.recurrence.evaluate(model, split, self.device, self.task.kind, self._autocast)
            model.train(was_training)
            total = BatchStats.from_tensor(self.env.all_reduce_sum(stats.as_tensor())).with_local_aux(stats)
            return {**total.summary(self.metric), "examples": len(data)}
        with torch.no_grad(), self._autocast():
            for ids in eval_shards(len(data), self.config.eval_batch, self.env.rank, self.env.world_size):
                batch = move_batch(self.task.collate([data[i] for i in ids]), self.device)
                stats.add(batch_statistics(model, batch, self.task.kind)[1])
        model.train(was_training)
        total = BatchStats.from_tensor(self.env.all_reduce_sum(stats.as_tensor())).with_local_aux(stats)
        return {**total.summary(self.metric), "examples": len(data)}

    def _log_train(self, lr: float, elapsed: float) -> None:
        total = BatchStats.from_tensor(self.env.all_reduce_sum(self.window.as_tensor())).with_local_aux(self.window)
        extra = {"skipped_steps": self.window_skipped, "skipped_steps_total": self.skipped_steps,
                 "loss_scale": self.scaler.get_scale()} if self.config.fp16 else {}
        self.metrics.write({"step": self.step, "split": "train", **total.summary(self.metric), "lr": lr,
                            "elapsed": round(elapsed, 3), "steps_averaged": self.window_steps,
                            "examples_seen": self.plan.position(self.step * self.config.accum).examples_consumed,
                            **extra})
        self.window, self.window_steps, self.window_skipped = BatchStats(), 0, 0

    def _evaluate_and_select(self, lr: float, elapsed: float) -> None:
        result = self.evaluate("val")
        value = result[self.metric]
        improved = value is not None and (
            self.best is None
            or (value > self.best["value"] if METRIC_DIRECTION[self.metric] == "max" else value < self.best["value"])
        )
        if improved:
            self.best = {"metric": self.metric, "value": value, "step": self.step}
            if self.env.is_main:
                ckpt.stage(self.out_dir, ckpt.BEST_FILE, self._weights_bytes())
        self.metrics.write({"step": self.step, "split": "val", **result, "lr": lr, "elapsed": round(elapsed, 3),
                            "best": improved})

    # ------------------------------------------------------------------ checkpoints
    def _weights_bytes(self) -> bytes:
        meta = {"step": str(self.step), "model_config": json.dumps(self.model_spec, sort_keys=True), "task": self.config.task}
        return ckpt.weights_to_bytes(self.model, meta)

    def _rng_states(self) -> dict[str, list[list[int]]]:
        """Every process's RNG states, gathered (a collective: all processes call it)."""
        states = {"torch_cpu": self.env.all_gather_bytes(torch.get_rng_state())}
        if self.device.type == "cuda":
            states["torch_cuda"] = self.env.all_gather_bytes(torch.cuda.get_rng_state(self.device))
        return {k: [t.tolist() for t in v] for k, v in states.items()}

    def _checkpoint(self, elapsed: float) -> None:
        rng = self._rng_states()
        window = BatchStats.from_tensor(self.env.all_reduce_sum(self.window.as_tensor())).with_local_aux(self.window)
        memory = None if self.recurrence is None else self.recurrence.memory_bytes(self.step, self.env)  # collective
        if not self.env.is_main:
            return
        ckpt.stage(self.out_dir, ckpt.MODEL_FILE, self._weights_bytes())
        ckpt.stage(self.out_dir, ckpt.OPTIMIZER_FILE,
                   ckpt.tree_to_bytes(self.optimizer.state_dict(), {"step": str(self.step)}))
        files = {ckpt.MODEL_FILE: self.step, ckpt.OPTIMIZER_FILE: self.step}
        if self.recurrence is not None:
            ckpt.stage(self.out_dir, ckpt.MEMORY_FILE, memory)
            files[ckpt.MEMORY_FILE] = self.step
        if self.best is not None:
            files[ckpt.BEST_FILE] = self.best["step"]
        state = {
            "format": ckpt.STATE_FORMAT,
            "step": self.step,
            "steps": self.config.steps,
            "config": self.config.to_json(),
            "model_config": self.model_spec,
            "world_size": self.env.world_size,
            "data_position": self.plan.position(self.step * self.config.accum).to_json(),
            "best": self.best,
            "rng": rng,
            "train_window": {"loss_sum": window.loss_sum, "correct": window.correct, "count": window.count,
                             "steps": self.window_steps, "aux_sums": window.aux_sums, "aux_batches": window.aux_batches},
            "metrics_bytes": self.metrics.size(),
            "elapsed": elapsed,
            "files": files,
        }
        if self.config.fp16:
            state["fp16"] = {"grad_scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps,
                             "window_skipped": self.window_skipped, "nonfinite_run": self.nonfinite_run}
        ckpt.commit(self.out_dir, state)

    def _prepare_out_dir(self) -> None:
        if self.env.is_main:
            if self.overwrite and not self.resume:
                for name in ckpt.RUN_FILES:
                    (self.out_dir / name).unlink(missing_ok=True)
                for pending in self.out_dir.glob("*" + ckpt.PENDING_SUFFIX) if self.out_dir.is_dir() else []:
                    pending.unlink()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.resume:
                ckpt.recover(self.out_dir)
        self.env.barrier()

    def _restore(self) -> None:
        state = ckpt.read_json(self.out_dir / ckpt.STATE_FILE, "trainer state")
        meta = ckpt.load_weights(self.out_dir / ckpt.MODEL_FILE, self.model)
        if int(meta["step"]) != state["step"]:
            raise ckpt.CheckpointError(f"{self.out_dir / ckpt.MODEL_FILE}: holds step {meta['step']}, "
                                       f"the trainer state step {state['step']}")
        opt_state, _ = ckpt.load_tree(self.out_dir / ckpt.OPTIMIZER_FILE)
        self.optimizer.load_state_dict(opt_state)
        if self.recurrence is not None:
            self.recurrence.restore(self.out_dir / ckpt.MEMORY_FILE, self.device)
        self.step, self.best, self.elapsed_before = state["step"], state["best"], state["elapsed"]
        window = state["train_window"]  # summed over processes: rank 0 carries it, the others start at zero
        if self.env.is_main:
            self.window = BatchStats(window["loss_sum"], window["correct"], window["count"],
                                     dict(window.get("aux_sums", {})), window.get("aux_batches", 0))
        self.window_steps = window["steps"]
        position = self.plan.position(self.step * self.config.accum).to_json()
        if position != state["data_position"]:
            raise ckpt.CheckpointError(f"{self.out_dir / ckpt.STATE_FILE}: data position {state['data_position']} "
                                       f"does not match this run's {position} (was the data changed?)")
        torch.set_rng_state(torch.tensor(state["rng"]["torch_cpu"][self.env.rank], dtype=torch.uint8))
        if self.device.type == "cuda" and "torch_cuda" in state["rng"]:
            torch.cuda.set_rng_state(torch.tensor(state["rng"]["torch_cuda"][self.env.rank], dtype=torch.uint8),
                                     self.device)
        self.metrics.truncate(state["metrics_bytes"])
        if self.config.fp16 and "fp16" in state:
            self.scaler.load_state_dict(state["fp16"]["grad_scaler"])
            self.skipped_steps = state["fp16"]["skipped_steps"]
            self.window_skipped = state["fp16"]["window_skipped"]
            self.nonfinite_run = state["fp16"]["nonfinite_run"]

    # ------------------------------------------------------------------ the end
    def _finish(self, elapsed: float) -> dict[str, Any]:
        self.env.barrier()  # best.safetensors is in place
        test: dict[str, Any] | None = None
        if len(self.splits["test"]):
            best_model = build_model(self.model_spec).to(self.device)
            ckpt.load_weights(self.out_dir / ckpt.BEST_FILE, best_model)
            test = self.evaluate("test", best_model)
            if self.config.adapters is not None and self.env.is_main:
                self._save_adapters(best_model)
            self.metrics.write({"step": self.step, "split": "test", **test, "best_step": self.best["step"],
                                "elapsed": round(elapsed, 3)})
        results = {
            "complete": True,
            "task": self.config.task,
            "attention": self.config.attention,
            "metric": self.metric,
            "steps": self.step,
            "best": self.best,
            "val": self.best and {self.metric: self.best["value"]},
            "test": test,
            "baseline": self._baseline(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **self._technique_results(),
            "world_size": self.env.world_size,
            "elapsed": elapsed,
            "config": self.config.to_json(),
            "model_config": self.model_spec,
            "out": str(self.out_dir),
        }
        if self.env.is_main:
            ckpt.atomic_write_json(self.out_dir / ckpt.RESULTS_FILE, results)
        return results

    def _technique_results(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        counts = parameter_counts(self.model)
        if counts["trainable"] != counts["total"]:
            out["trainable_parameters"] = counts["trainable"]
            out["trainable_fraction"] = counts["trainable"] / counts["total"]
        if self.config.fp16:
            out["skipped_steps"] = self.skipped_steps
        if self.distill is not None:
            out["distillation"] = {"teacher": self.config.teacher, "temperature": self.config.distill_temperature,
                                   "alpha": self.config.distill_alpha,
                                   "teacher_parameters": sum(p.numel() for p in self.distill.teacher.parameters())}
        out.update(self.transfer)
        return out

    def _save_adapters(self, best_model: nn.Module) -> None:
        """What fine-tuning trained (the adapters, norms and head of the best weights), apart from the base."""
        meta = {"adapters": self.config.adapters, "base": str(self.config.init_from), "task": self.config.task,
                "model_config": json.dumps(self.model_spec, sort_keys=True), "step": str(self.best["step"])}
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter_state(best_model).items()}
        from safetensors.torch import save as save_bytes

        ckpt.atomic_write_bytes(self.out_dir / ckpt.ADAPTERS_FILE, save_bytes(tensors, metadata=meta))

    def _baseline(self) -> dict[str, Any] | None:
        """The majority-class baseline (classification and retrieval tasks); for set regression the best
        constant, the median of the training targets (`sets.constant_baseline`)."""
        if self.task.kind == "language_model":
            return None
        if is_set_task(self.task):
            train = split_targets(self.splits["train"])
            return {split: constant_baseline(train, split_targets(self.splits[split])) for split in ("val", "test")}
        train = split_labels(self.splits["train"])
        return {split: majority_baseline(train, split_labels(self.splits[split])) for split in ("val", "test")}


def split_labels(dataset: Any) -> list[int]:
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == len(dataset):
        return [int(x) for x in labels]
    return [int(dataset[i]["label"]) for i in range(len(dataset))]
