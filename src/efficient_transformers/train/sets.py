"""Training on set tasks (kind ``set_regression``, e.g. `tasks.max_of_set`): the task decides the model.

    set_regression   SetTransformer(x, mask) -> (B, 1, 1) -> (B,)    L1 loss, mean absolute error ("mae")

A set task trains the paper's `SetTransformer` (models/set_transformer.py: encoder of ISAB or SAB
blocks, decoder PMA -> SAB -> Linear), not a token model. `--attention` chooses the encoder:

    --attention set_transformer   ISAB_m blocks (m = --attention-option num_inducing, default 32), O(N m)
    --attention vanilla           SAB blocks (dense self-attention over the set), O(N^2)

and `--dim`, `--depth`, `--heads`, `--ff-mult` size it (ff_mult is the rFF width of every MAB). PMA has
one seed (one output vector per set). The model has no dropout, no positions and no token embedding,
so `--dropout` must be 0 and `--pooling` is `pma` (`eft train` sets both for a set task unless given);
the model-level techniques (`--share`, `--embedding-dim`, `--reversible`, `--ff-chunks`) and transfer
(`--init-from`, `--adapters`, `eft distill`) are token-model features and are refused with a ValueError.

The objective is the L1 loss, as the paper trains its max regression, so ``loss`` and ``mae`` are the
same number; the trivial baseline in the results is the best constant prediction under MAE, the
median of the training targets.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import Tensor, nn

SET_KINDS = ("set_regression",)
#: --attention -> the SetTransformer's encoder blocks
SET_ENCODERS = {"set_transformer": "isab", "vanilla": "sab"}
#: attention options each encoder takes (SAB is plain dense attention, with no option)
ENCODER_OPTIONS = {"set_transformer": ("num_inducing",), "vanilla": ()}
#: TrainConfig fields a set task refuses unless they keep these values
TOKEN_MODEL_ONLY = {"share": "none", "embedding_dim": None, "reversible": False, "ff_chunks": 1,
                    "init_from": None, "adapters": None, "teacher": None}


def is_set_task(task: Any) -> bool:
    return getattr(task, "kind", None) in SET_KINDS


def check_set_mechanism(task: Any, attention: str) -> None:
    if attention not in SET_ENCODERS:
        raise ValueError(f"task {task.name!r} trains the SetTransformer model, whose encoder is ISAB "
                         f"(--attention set_transformer) or SAB (--attention vanilla); got {attention!r}; "
                         f"allowed: {list(SET_ENCODERS)}")


def set_model_config(config: Any, task: Any, max_len: int) -> dict[str, Any]:
    """The keyword arguments of the run's SetTransformer (plus ``class`` and ``max_seq_len``, the largest
    set, which rebuilds the task's data for `eft eval`)."""
    check_set_mechanism(task, config.attention)
    for name, default in TOKEN_MODEL_ONLY.items():
        if getattr(config, name) != default:
            raise ValueError(f"task {task.name!r} trains the SetTransformer model, which does not take {name}="
                             f"{getattr(config, name)!r} (a token-model feature); allowed: {default!r}")
    if config.dropout != 0:
        raise ValueError(f"task {task.name!r} trains the SetTransformer model, which has no dropout; got dropout="
                         f"{config.dropout!r}; allowed: 0")
    if config.pooling != "pma":
        raise ValueError(f"task {task.name!r} trains the SetTransformer model, which pools by PMA; got pooling="
                         f"{config.pooling!r}; allowed: 'pma'")
    options = dict(config.attention_options)
    allowed = ENCODER_OPTIONS[config.attention]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{config.attention}: unknown option(s) {unknown} for the SetTransformer's "
                         f"{SET_ENCODERS[config.attention].upper()} encoder; allowed options: {list(allowed) or 'none'}")
    spec = {"class": "SetTransformer", "in_features": task.input_features(dict(config.task_options)),
            "out_features": 1, "dim": config.dim, "heads": config.heads, "depth": config.depth,
            "encoder": SET_ENCODERS[config.attention], "num_seeds": 1, "ff_mult": config.ff_mult,
            "max_seq_len": max_len}
    if "num_inducing" in options:
        spec["num_inducing"] = options["num_inducing"]
    return spec


def build_set_model(kwargs: dict[str, Any]) -> nn.Module:
    from ..models.set_transformer import SetTransformer

    kwargs = {k: v for k, v in kwargs.items() if k != "max_seq_len"}
    return SetTransformer(kwargs.pop("in_features"), kwargs.pop("out_features"), **kwargs)


def set_predictions(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's prediction per set: (B,)."""
    mask = batch["mask"]
    return model(batch["x"], None if bool(mask.all()) else mask)[:, 0, 0]  # (B,)


def constant_baseline(train_targets: Sequence[float], eval_targets: Sequence[float]) -> dict[str, float | None]:
    """MAE of always predicting the median of the training targets (the best constant under MAE)."""
    train, held = np.asarray(train_targets, dtype=np.float64), np.asarray(eval_targets, dtype=np.float64)
    if not len(train) or not len(held):
        return {"prediction": None, "mae": None}
    prediction = float(np.median(train))
    return {"prediction": prediction, "mae": float(np.abs(held - prediction).mean())}


def split_targets(dataset: Any) -> list[float]:
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return [float(t) for t in targets]
    return [float(dataset[i]["target"]) for i in range(len(dataset))]
