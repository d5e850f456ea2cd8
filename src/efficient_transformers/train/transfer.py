"""Using a finished run in another: a teacher for distillation, a base for fine-tuning, a model to evaluate.

    info = read_run("runs/listops-vanilla-s0", "--teacher")    # config, model_config, best weights
    teacher = load_run_model(info)                              # its best model, rebuilt and loaded

A run folder is what `eft train` writes (see `checkpoint`): `trainer_state.json` holds the config,
`best.safetensors` the best weights with the model's constructor arguments in its metadata.

- `check_teacher`: a teacher must be of the student's task and vocabulary (and classes), and cover the
  student's sequence length; `distilbert_init` starts a student of the teacher's width and half its
  depth from every other teacher layer (DistilBERT, Sanh et al. 2019), copying every tensor whose name
  and shape agree (embeddings, norms, head; attention weights too when the mechanisms share them).
- `load_base_weights`: `--init-from` loads the base's best weights into a model of the same
  architecture on a (possibly) new task; the task head is re-initialised when the task differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import TrainConfig

#: model_config keys that make up the architecture (what --init-from takes from the base run)
ARCHITECTURE_KEYS = ("class", "dim", "depth", "heads", "attention", "attention_options", "ff_mult", "pooling",
                     "share", "embedding_dim", "reversible", "ff_chunks", "data_shape")
#: TrainConfig fields of the architecture
ARCHITECTURE_FIELDS = ("dim", "depth", "heads", "attention", "attention_options", "ff_mult", "pooling", "share",
                       "embedding_dim", "reversible", "ff_chunks")


@dataclass
class RunInfo:
    path: Path
    config: TrainConfig
    model_config: dict[str, Any]
    best: Path


def read_run(run_dir: str | Path, flag: str) -> RunInfo:
    """A finished (or at least evaluated) run folder; ValueError naming `flag` and what is missing."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{flag} {run_dir}: no such run folder; allowed: a folder written by `eft train`")
    state_path, best = path / ckpt.STATE_FILE, path / ckpt.BEST_FILE
    if not state_path.is_file():
        raise ValueError(f"{flag} {run_dir}: not a run folder ({ckpt.STATE_FILE} not found); "
                         f"allowed: a folder written by `eft train`")
    if not best.is_file():
        raise ValueError(f"{flag} {run_dir}: the run has no {ckpt.BEST_FILE} yet (it was never evaluated); "
                         f"train it to its first evaluation first")
    try:
        state = ckpt.read_json(state_path, "trainer state")
        config = TrainConfig.from_json(state["config"])
        meta = ckpt.read_metadata(best)
        model_config = json.loads(meta["model_config"]) if "model_config" in meta else state["model_config"]
    except (KeyError, TypeError, json.JSONDecodeError, ckpt.CheckpointError) as err:
        raise ValueError(f"{flag} {run_dir}: unreadable run folder ({err})") from None
    return RunInfo(path, config, model_config, best)


def load_run_model(info: RunInfo, device: torch.device | str = "cpu") -> nn.Module:
    """The run's best model, in eval mode."""
    from .objective import build_model

    model = build_model(info.model_config)
    ckpt.load_weights(info.best, model)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- distillation
def check_teacher(info: RunInfo, task_name: str, student_spec: dict[str, Any], max_len: int) -> None:
    teacher = info.model_config
    where = f"--teacher {info.path}"
    if info.config.task != task_name:
        raise ValueError(f"{where}: the teacher was trained on task {info.config.task!r}, the student's task is "
                         f"{task_name!r}; allowed: a teacher of the same task")
    if teacher.get("class") != student_spec["class"]:
        raise ValueError(f"{where}: the teacher is a {teacher.get('class')}, the student a {student_spec['class']}")
    if teacher.get("vocab_size") != student_spec["vocab_size"]:
        raise ValueError(f"{where}: the teacher's vocabulary has {teacher.get('vocab_size')} tokens, the student's "
                         f"task {student_spec['vocab_size']}; allowed: a teacher of the same vocabulary")
    if teacher.get("num_classes") != student_spec.get("num_classes"):
        raise ValueError(f"{where}: the teacher predicts {teacher.get('num_classes')} classes, the student "
                         f"{student_spec.get('num_classes')}")
    if teacher.get("max_seq_len", 0) < max_len:
        raise ValueError(f"{where}: the teacher takes sequences up to {teacher.get('max_seq_len')}, the student "
                         f"trains on {max_len}; allowed: --max-len <= {teacher.get('max_seq_len')}")


_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")


def distilbert_init(student: nn.Module, teacher: nn.Module, student_spec: dict[str, Any],
                    teacher_spec: dict[str, Any]) -> dict[str, Any] | None:
    """DistilBERT's initialisation when the student has the teacher's width and half its depth: student
    block i from teacher block 2 i, everything else by name; tensors whose names or shapes differ (another
    mechanism's own parameters) keep their fresh initialisation. None when the shapes do not call for it."""
    if student_spec["dim"] != teacher_spec["dim"] or 2 * student_spec["depth"] != teacher_spec["depth"]:
        return None
    source = teacher.state_dict()
    copied, kept = 0, []
    with torch.no_grad():
        for name, target in student.state_dict().items():
            theirs = _BLOCK.sub(lambda m: f"{m.group(1)}blocks.{2 * int(m.group(2))}.", name)
            value = source.get(theirs)
            if value is not None and value.shape == target.shape and value.dtype == target.dtype:
                target.copy_(value)
                copied += 1
            else:
                kept.append(name)
    return {"teacher_layers": [2 * i for i in range(student_spec["depth"])], "tensors_copied": copied,
            "tensors_initialised": len(kept)}


# ---------------------------------------------------------------------------------------------- fine-tuning
def check_base_architecture(info: RunInfo, spec: dict[str, Any]) -> None:
    """The new run's model must be the base's architecture (on any task of the same vocabulary)."""
    base = info.model_config
    differ = {k: (base.get(k), spec.get(k)) for k in ARCHITECTURE_KEYS if base.get(k) != spec.get(k)}
    if differ:
        detail = ", ".join(f"{k}: base {a!r} vs this run {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"--init-from {info.path}: the model must have the base run's architecture ({detail}); "
                         f"leave the model options out to take the base's")
    if base.get("vocab_size") != spec.get("vocab_size"):
        raise ValueError(f"--init-from {info.path}: the base's vocabulary has {base.get('vocab_size')} tokens, "
                         f"this task {spec.get('vocab_size')}; allowed: a task of the same vocabulary")


def load_base_weights(model: nn.Module, info: RunInfo, same_task: bool) -> dict[str, Any]:
    """Load the base's best weights into `model` (before adapters are added). The task head ("head." of a
    classifier or retrieval model) is loaded only for the same task; every other tensor must fit."""
    from safetensors.torch import load as load_bytes

    tensors = load_bytes(info.best.read_bytes())
    for name, target in json.loads(ckpt.read_metadata(info.best).get("aliases", "{}")).items():
        tensors[name] = tensors[target]
    own = model.state_dict()
    is_lm = info.model_config.get("class") == "TransformerLM"
    skip = set() if same_task or is_lm else {n for n in own if n.startswith("head.")}
    bad = [f"{n} {tuple(tensors[n].shape)} vs {tuple(t.shape)}" for n, t in own.items()
           if n not in skip and n in tensors and tensors[n].shape != t.shape]
    missing = [n for n in own if n not in skip and n not in tensors]
    if bad or missing:
        raise ValueError(f"--init-from {info.path}: the base weights do not fit this model (shapes differ: "
                         f"{bad[:3]}; missing: {missing[:3]}); a length-sized weight needs --max-len "
                         f"{info.model_config.get('max_seq_len')}")
    with torch.no_grad():
        for name, target in own.items():
            if name not in skip:
                target.copy_(tensors[name])
    return {"base": str(info.path), "base_task": info.config.task, "head_reinitialised": bool(skip)}


def merge_base_config(given: dict[str, Any], info: RunInfo) -> dict[str, Any]:
    """CLI: the architecture fields come from the base run; a different explicit value is an error."""
    merged = dict(given)
    base = info.config.to_json()
    for name in ARCHITECTURE_FIELDS:
        if name in given and given[name] != base[name]:
            raise ValueError(f"--init-from {info.path}: {name}={given[name]!r} differs from the base run's "
                             f"{name}={base[name]!r}; the architecture comes from --init-from (leave it out)")
        merged[name] = base[name]
    return merged
