"""Max-of-set regression (Lee et al. 2019, Set Transformer, ICML; its toy problem of maximum value regression):
given a set of continuous vectors, predict the largest first coordinate; metric: mean absolute error.

    x_1, ..., x_n ~ Uniform[low, high)^F  (i.i.d.),   n ~ Uniform{min_size, ..., max_len}
    target = max_i x_i[0]                            (the other F - 1 coordinates are distractors)

The paper's task is the F = 1 case (sets of reals, scored by mean absolute error; the trainer's
objective is the L1 loss, so it optimises the metric itself); `features` adds distractor coordinates.
Defaults (this project's choice where the paper's exact ranges are not restated): F = 1, values in
[-2, 2), set sizes 1..10 (`max_len`, the largest set, is 10 by default), 2000 / 200 / 200 examples.

Why this task: it is the paper's own toy task for its pooling (PMA), the Set Transformer learns it
within a few hundred CPU steps, and the maximum is not a function of the mean of the elements, so
mean pooling cannot read it off: the best constant (the median of the training targets) has an MAE of
about 0.55 at the defaults, and a mean-pooling DeepSets, which can only approximate the maximum through
thresholded per-element features, stays more than 10 times behind the Set Transformer at the same steps
(measured, with the commands, in the README).

Data: each split has its own random stream (`split_rng(seed, "max_of_set", split)`) and its examples
are drawn one after another from it (size, then the n x F values), so more training examples extend
the smaller split and never change validation or test. Values are drawn in float64 and stored as
float32; the target is the maximum of the stored float32 values, so it is exact for the model's input.

Items are ``{"x": FloatTensor (n, F), "target": float}``; `collate` pads sets to the largest in the
batch: ``x`` (B, N, F) zero-padded, ``mask`` (B, N) bool True = element, ``target`` (B,) float32.
There are no official files: ``data_dir`` is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import GENERATE, Task, check_index, register_task, split_rng

NAME = "max_of_set"


def _positive_int(option: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{NAME}: {option} must be an int >= 1, got {value!r}; allowed: an int >= 1")
    return int(value)


def _finite(option: str, value: Any) -> float:
    if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool) or not np.isfinite(value):
        raise ValueError(f"{NAME}: {option} must be a finite number, got {value!r}")
    return float(value)


class SetRegressionDataset(Dataset):
    """Sets of vectors held as one (total, F) float32 array plus offsets, with one float target per set."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray, targets: np.ndarray) -> None:
        self.values = np.ascontiguousarray(values, dtype=np.float32)  # (total, F)
        self.offsets = np.asarray(offsets, dtype=np.int64)  # (n + 1,)
        self.targets = np.asarray(targets, dtype=np.float32)  # (n,)
        if self.values.ndim != 2 or len(self.offsets) != len(self.targets) + 1:
            raise ValueError(f"{NAME}: values (total, F) and offsets (n + 1,) for n targets, got "
                             f"{self.values.shape}, {self.offsets.shape}, {self.targets.shape}")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, len(self))
        x = torch.from_numpy(self.values[self.offsets[i]: self.offsets[i + 1]].copy())  # (n, F)
        return {"x": x, "target": float(self.targets[i])}

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def collate_sets(items: Sequence[dict]) -> dict:
    """Pad sets to the largest of the batch: x (B, N, F) zeros at padding, mask (B, N) True = element,
    target (B,) float32."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    features = int(items[0]["x"].shape[-1])
    width = max(int(it["x"].shape[0]) for it in items)
    x = torch.zeros(len(items), width, features, dtype=torch.float32)  # (B, N, F)
    mask = torch.zeros(len(items), width, dtype=torch.bool)  # (B, N)
    for b, it in enumerate(items):
        n = int(it["x"].shape[0])
        x[b, :n] = it["x"]
        mask[b, :n] = True
    target = torch.tensor([float(it["target"]) for it in items], dtype=torch.float32)  # (B,)
    return {"x": x, "mask": mask, "target": target}


def generate_sets(rng: np.random.Generator, n: int, *, min_size: int, max_size: int, features: int,
                  low: float, high: float) -> SetRegressionDataset:
    """``n`` sets drawn one after another: size ~ U{min_size..max_size}, values ~ U[low, high)^F."""
    chunks, sizes = [], []
    for _ in range(n):
        size = int(rng.integers(min_size, max_size + 1))
        chunks.append(rng.uniform(low, high, size=(size, features)).astype(np.float32))  # (size, F)
        sizes.append(size)
    values = np.concatenate(chunks) if chunks else np.zeros((0, features), dtype=np.float32)  # (total, F)
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    targets = np.array([c[:, 0].max() for c in chunks], dtype=np.float32)  # (n,)
    return SetRegressionDataset(values, offsets, targets)


@register_task
class MaxOfSetTask(Task):
    """Max-of-set regression: sets of 1..max_len vectors in R^F -> max of the first coordinate (MAE)."""

    name = NAME
    kind = "set_regression"
    vocab_size = 0  # continuous inputs: no tokens
    num_classes = None
    default_max_len = 10  # the largest set size
    metric = "mae"
    default_sizes = (2000, 200, 200)
    options = {
        "features": (1, GENERATE),  # F, the width of each element
        "min_size": (1, GENERATE),  # the smallest set size (the largest is max_len)
        "low": (-2.0, GENERATE),  # values ~ U[low, high)
        "high": (2.0, GENERATE),
    }
    default_attention = "set_transformer"  # eft train's --attention when not given: ISAB encoder
    train_defaults = {"pooling": "pma", "dropout": 0.0}  # the SetTransformer pools by PMA and has no dropout

    def input_features(self, opts: dict[str, Any]) -> int:
        """F, the width of the model's input vectors, for these task options."""
        return _positive_int("features", opts.get("features", self.options["features"][0]))

    def collate(self, items: Sequence[dict]) -> dict:
        return collate_sets(items)

    def _generate(self, *, seed, max_len, sizes, features, min_size, low, high):
        features = _positive_int("features", features)
        min_size = _positive_int("min_size", min_size)
        low, high = _finite("low", low), _finite("high", high)
        if min_size > max_len:
            raise ValueError(f"{NAME}: min_size={min_size} exceeds max_len={max_len} (the largest set size); "
                             f"allowed: 1 <= min_size <= max_len")
        if not low < high:
            raise ValueError(f"{NAME}: low={low} must be below high={high}; allowed: low < high")
        return {split: generate_sets(split_rng(seed, self.name, split), sizes[split], min_size=min_size,
                                     max_size=max_len, features=features, low=low, high=high)
                for split in ("train", "val", "test")}

    def _load(self, root, *, max_len, sizes, **opts):
        raise ValueError(f"{NAME}: the task has no official files (it is generated offline); got data folder "
                         f"{root}; allowed: no --data")
