"""Auxiliary losses: what a layer adds to the training objective beside the task's loss.

Some mechanisms train part of themselves with a loss of their own: Routing's commitment loss pulls
queries and keys towards their centroids, the Compressive Transformer's attention-reconstruction
loss trains its compressor. The protocol, once for all:

- a layer calls `self.report_aux_loss(name, value, weight)` during its forward pass (value a scalar
  tensor, weight the coefficient the paper gives it); the layer's `aux_losses` dict then holds
  `AuxLoss(value, weight)` per name, from its latest forward;
- inside a model, the model resets every layer's losses at the start of its own forward and the
  layers accumulate over the calls that forward makes (`reset_aux_losses(model)`), so a model that
  runs its encoder twice (two documents of different lengths) reports both;
- `collect_aux_losses(module)` sums the losses of all layers under a module by name (the weights of
  one name must agree); `weighted_aux_loss(losses)` is sum(weight * value), what the trainer adds to
  the task loss. The trainer logs each value (unweighted) in `metrics.jsonl` as `aux/<name>`.

A plain user reads `layer.aux_losses` (or `collect_aux_losses(model)`) after a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class AuxLoss:
    value: Tensor  # a scalar
    weight: float

    def __post_init__(self) -> None:
        if not isinstance(self.value, Tensor) or self.value.dim() != 0:
            raise ValueError(f"an auxiliary loss must be a scalar tensor, got {getattr(self.value, 'shape', self.value)!r}")


class ReportsAuxLosses:
    """Mixed into `AttentionLayer`: `report_aux_loss` and the per-forward `aux_losses` dict."""

    aux_losses: dict[str, AuxLoss]
    accumulate_aux_losses: bool  # True inside a model (the model resets), False for a bare layer

    def _init_aux_losses(self) -> None:
        self.aux_losses = {}
        self.accumulate_aux_losses = False

    def _start_forward_aux(self) -> None:
        if not self.accumulate_aux_losses:
            self.aux_losses = {}

    def report_aux_loss(self, name: str, value: Tensor, weight: float = 1.0) -> None:
        """Add `weight * value` to the training objective under `name` (summed over calls in one model forward)."""
        new = AuxLoss(value, float(weight))
        old = self.aux_losses.get(name)
        if old is not None:
            if old.weight != new.weight:
                raise ValueError(f"auxiliary loss {name!r} reported with weights {old.weight} and {new.weight}")
            new = AuxLoss(old.value + value, old.weight)
        self.aux_losses[name] = new


def _layers(module: nn.Module):
    return (m for m in module.modules() if isinstance(m, ReportsAuxLosses))


def reset_aux_losses(module: nn.Module) -> None:
    """Clear the losses of every layer under `module` and make them accumulate until the next reset."""
    for layer in _layers(module):
        layer.aux_losses = {}
        layer.accumulate_aux_losses = True


def collect_aux_losses(module: nn.Module) -> dict[str, AuxLoss]:
    """The auxiliary losses of every layer under `module`, summed by name."""
    total: dict[str, AuxLoss] = {}
    for layer in _layers(module):
        for name, loss in layer.aux_losses.items():
            if name in total:
                if total[name].weight != loss.weight:
                    raise ValueError(f"auxiliary loss {name!r} has weights {total[name].weight} and {loss.weight} in two layers")
                total[name] = AuxLoss(total[name].value + loss.value, loss.weight)
            else:
                total[name] = loss
    return total


def weighted_aux_loss(losses: dict[str, AuxLoss]) -> Tensor | None:
    """sum(weight * value) over `losses`, in float32; None when there are none."""
    if not losses:
        return None
    return torch.stack([loss.weight * loss.value.float() for loss in losses.values()]).sum()
