"""AdamW and the learning-rate schedule: linear warm-up, then cosine or linear decay (or constant).

    lr(s) = lr * (s + 1) / warmup                                 s < warmup
    lr(s) = lr * (r + (1 - r) * shape(p)),  p = (s - warmup) / (steps - warmup)   otherwise
    shape(p) = (1 + cos(pi p)) / 2 (cosine), 1 - p (linear), 1 (constant);  r = min_lr_ratio

`s` counts optimiser steps already taken, so the first update uses lr / warmup. The schedule is a pure
function of the step (no scheduler state to checkpoint). Weight decay applies to matrices only
(weights of linear layers and embeddings), not to biases, norms or other vectors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def learning_rate(step: int, config: TrainConfig) -> float:
    warmup, total = config.warmup_steps, config.steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.decay == "constant" or total <= warmup:
        return config.lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    shape = (1 + math.cos(math.pi * progress)) / 2 if config.decay == "cosine" else 1.0 - progress
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
