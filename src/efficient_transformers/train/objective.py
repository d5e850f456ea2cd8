"""The model and the loss for each kind of task.

    classification   TransformerClassifier(tokens, mask) -> (B, C)      cross-entropy, accuracy
    retrieval        RetrievalModel(tokens, tokens2, ...) -> (B, 2)     cross-entropy, accuracy
    language_model   TransformerLM(tokens, mask) -> (B, L, V)           cross-entropy per byte,
                                                                        bits per byte = CE / ln 2
    set_regression   SetTransformer(x, mask) -> (B,)                    L1 loss, mean absolute error
                     (the task decides the model; see `sets`)

`batch_statistics` returns sums (loss, correct, count), not means, so that evaluation over shards and
processes adds up exactly; the training loss is ``loss_sum / count`` of the micro-batch.

Auxiliary losses (`core.aux_losses`: Routing's commitment, Compressive's reconstruction) that the
attention layers report during the forward are added to the objective with their weights:
objective = loss_sum / count + sum(weight * value). Each value is logged (unweighted) as
``aux/<name>``, averaged over the logged batches of the main process (they are not all-reduced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.aux_losses import collect_aux_losses, weighted_aux_loss
from ..models import RetrievalModel, TransformerClassifier, TransformerLM
from ..models.adapters import add_adapters
from ..registry import card, mechanisms
from .config import TrainConfig
from .sets import build_set_model, check_set_mechanism, is_set_task, set_model_config, set_predictions

KINDS = ("classification", "retrieval", "language_model", "set_regression")
#: model keywords of the model-level techniques and their defaults (TrainConfig fields of the same names)
MODEL_TECHNIQUES = {"share": "none", "embedding_dim": None, "reversible": False, "ff_chunks": 1}
METRIC_DIRECTION = {"accuracy": "max", "bits_per_byte": "min", "mae": "min"}


def model_config(config: TrainConfig, task: Any, max_len: int) -> dict[str, Any]:
    """The keyword arguments that rebuild the model (also stored in the weight files' metadata)."""
    if is_set_task(task):
        return set_model_config(config, task, max_len)
    common = dict(dim=config.dim, depth=config.depth, heads=config.heads, attention=config.attention,
                  attention_options=dict(config.attention_options), max_seq_len=max_len,
                  ff_mult=config.ff_mult, dropout=config.dropout)
    for name, default in MODEL_TECHNIQUES.items():  # only when set, so older runs' configs read the same
        if getattr(config, name) != default:
            common[name] = getattr(config, name)
    data_shape = getattr(task, "data_shape", None)  # Task's method; duck-typed tasks may lack it
    shape = data_shape(dict(config.task_options)) if data_shape is not None else None
    if shape is not None and card(config.attention).uses_shape and math.prod(shape) == max_len:
        common["data_shape"] = list(shape)  # the image's grid, for mechanisms that lay tokens out on one
    if task.kind == "language_model":
        spec = {"class": "TransformerLM", "vocab_size": task.vocab_size, **common}
    else:
        common["pooling"] = config.pooling
        if task.kind == "retrieval":
            spec = {"class": "RetrievalModel", "vocab_size": task.vocab_size, "num_classes": task.num_classes or 2,
                    **common}
        else:
            spec = {"class": "TransformerClassifier", "vocab_size": task.vocab_size, "num_classes": task.num_classes,
                    **common}
    if config.adapters is not None:
        spec["adapters"] = config.adapters  # added after construction (models.adapters), base frozen
    return spec


def check_mechanism_fits(task: Any, attention: str) -> None:
    """A language model needs a causal mechanism, the encoders a bidirectional one."""
    the_card = card(attention)  # unknown names raise ValueError listing the registered ones
    if is_set_task(task):
        return check_set_mechanism(task, attention)
    if task.kind == "language_model" and not the_card.causal:
        allowed = [c.name for c in mechanisms() if c.causal]
        raise ValueError(f"task {task.name!r} is language modelling and needs a causal mechanism; "
                         f"{attention!r} cannot decode; allowed: {allowed}")
    if task.kind != "language_model" and not the_card.bidirectional:
        allowed = [c.name for c in mechanisms() if c.bidirectional]
        raise ValueError(f"task {task.name!r} needs a bidirectional mechanism; {attention!r} is causal only; "
                         f"allowed: {allowed}")


def build_model(spec: dict[str, Any]) -> nn.Module:
    classes = {"TransformerLM": TransformerLM, "RetrievalModel": RetrievalModel,
               "TransformerClassifier": TransformerClassifier}
    kwargs = dict(spec)
    name = kwargs.pop("class")
    adapters = kwargs.pop("adapters", None)
    if name == "SetTransformer":
        return build_set_model(kwargs)
    if name not in classes:
        raise ValueError(f"unknown model class {name!r}; allowed: {sorted([*classes, 'SetTransformer'])}")
    if name == "TransformerLM":
        model = TransformerLM(**kwargs)
    else:
        vocab_size = kwargs.pop("vocab_size")
        if name == "TransformerClassifier":
            model = TransformerClassifier(vocab_size, kwargs.pop("num_classes"), **kwargs)
        else:
            model = RetrievalModel(vocab_size, **kwargs)
    if adapters is not None:
        add_adapters(model, adapters)
    return model


@dataclass
class BatchStats:
    """Sums over one or more batches; `count` is examples (classification) or target bytes (LM).

    `aux_sums` holds each auxiliary loss summed over `aux_batches` batches (this process only)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    aux_sums: dict[str, float] = field(default_factory=dict)
    aux_batches: int = 0

    def add(self, other: "BatchStats") -> None:
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.count += other.count
        for name, value in other.aux_sums.items():
            self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value
        self.aux_batches += other.aux_batches

    def with_local_aux(self, local: "BatchStats") -> "BatchStats":
        """These (all-reduced) sums with `local`'s auxiliary losses."""
        return BatchStats(self.loss_sum, self.correct, self.count, dict(local.aux_sums), local.aux_batches)

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.loss_sum, self.correct, self.count], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "BatchStats":
        loss_sum, correct, count = (float(v) for v in t.tolist())
        return cls(loss_sum, correct, count)

    def summary(self, metric: str) -> dict[str, float | None]:
        """{"loss", "accuracy"} and, for language models, "bits_per_byte" (None when empty); for regression
        (metric "mae", trained with the L1 loss) {"loss", "mae"}, the same number."""
        if metric == "mae":
            mae = self.loss_sum / self.count if self.count else None
            return {"loss": mae, "mae": mae}
        if self.count == 0:
            return {"loss": None, "accuracy": None, **({"bits_per_byte": None} if metric == "bits_per_byte" else {})}
        loss = self.loss_sum / self.count
        out = {"loss": loss, "accuracy": self.correct / self.count}
        if metric == "bits_per_byte":
            out["bits_per_byte"] = loss / math.log(2)
        for name in sorted(self.aux_sums):
            out[f"aux/{name}"] = self.aux_sums[name] / max(self.aux_batches, 1)
        return out


def _mask_or_none(mask: Tensor) -> Tensor | None:
    """All-real masks are dropped, so mechanisms take their unmasked (often faster) path."""
    return None if bool(mask.all()) else mask


def move_batch(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_logits(model: nn.Module, batch: dict[str, Tensor], kind: str) -> Tensor:
    """The model's logits on one batch: (B, L, V) for language models, (B, C) otherwise."""
    if kind == "language_model":
        return model(batch["tokens"], _mask_or_none(batch["mask"]))  # (B, L, V)
    if kind == "retrieval":
        mask, mask2 = batch["mask"], batch["mask2"]
        if bool(mask.all()) and bool(mask2.all()):
            mask = mask2 = None
        return model(batch["tokens"], batch["tokens2"], mask, mask2)  # (B, 2)
    if kind == "classification":
        return model(batch["tokens"], _mask_or_none(batch["mask"]))  # (B, C)
    if kind == "set_regression":
        return set_predictions(model, batch)  # (B,)
    raise ValueError(f"unknown task kind {kind!r}; allowed: {list(KINDS)}")


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation (Hinton et al. 2015): the objective per example (or per target byte) is

        alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau)) + (1 - alpha) * CE(s, labels)

    with s, t the student's and the (frozen) teacher's logits; tau^2 keeps the soft term's gradients
    on the scale of the hard term's as tau changes. Logged as ``aux/distill_kl`` (the KL, unscaled)."""

    teacher: nn.Module
    temperature: float = 2.0
    alpha: float = 0.5


def batch_statistics(model: nn.Module, batch: dict[str, Tensor], kind: str,
                     distill: Distillation | None = None) -> tuple[Tensor, BatchStats]:
    """Forward one batch: (the objective sum, a differentiable scalar, and detached statistics).

    The objective sum is loss_sum + count * sum(weight * aux) (see the module doc), so that
    objective / count is the per-example loss plus the weighted auxiliary losses. With `distill`, the
    task loss in the objective is replaced by the distillation mix (`Distillation`); the statistics
    keep the task loss, so metrics compare with runs trained without a teacher."""
    logits = model_logits(model, batch, kind)
    if kind == "language_model":
        real = batch["mask"].flatten()  # (B*L,)
        flat = logits.float().flatten(0, 1)[real]  # (T, V): the real target positions
        targets = batch["targets"].flatten()[real]  # (T,)
        loss_sum = F.cross_entropy(flat, targets, reduction="sum")
        correct = (flat.argmax(-1) == targets).sum()
        count = real.sum()
    elif kind == "set_regression":
        flat, targets = logits.float(), batch["target"].float()  # (B,), (B,)
        loss_sum = (flat - targets).abs().sum()  # L1, as the paper trains its max regression
        correct = torch.zeros(())
        count = torch.tensor(targets.numel())
    else:
        flat, targets = logits.float(), batch["label"]  # (B, C), (B,)
        loss_sum = F.cross_entropy(flat, targets, reduction="sum")
        correct = (flat.argmax(-1) == targets).sum()
        count = torch.tensor(targets.numel())
    aux = collect_aux_losses(model)
    aux_values = {name: float(loss.value.detach()) for name, loss in aux.items()}
    task_term = loss_sum
    if distill is not None:
        with torch.no_grad():
            teacher = model_logits(distill.teacher, batch, kind).float()
        teacher = teacher.flatten(0, 1)[real] if kind == "language_model" else teacher
        tau = distill.temperature
        kl_sum = F.kl_div(F.log_softmax(flat / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1),
                          log_target=True, reduction="sum")
        task_term = distill.alpha * tau * tau * kl_sum + (1.0 - distill.alpha) * loss_sum
        aux_values["distill_kl"] = float(kl_sum.detach()) / max(float(count), 1.0)
    stats = BatchStats(float(loss_sum.detach()), float(correct), float(count), aux_values, 1 if aux_values else 0)
    weighted = weighted_aux_loss(aux)
    objective = task_term if weighted is None else task_term + weighted * count
    return objective, stats
