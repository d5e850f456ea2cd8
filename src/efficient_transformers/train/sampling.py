"""Deterministic data order: which examples each process trains on at each step.

The training examples are read as one endless stream: epoch e is a permutation of the training set
drawn from ``(seed, e)`` alone, and epochs follow each other. Micro-batch m of the whole run covers
stream positions ``[m * G, (m + 1) * G)`` with G = batch_size * world_size, and process r takes the
r-th block of ``batch_size`` of them. So

- the order is a pure function of (seed, step): a resumed run continues exactly where it stopped;
- K processes with per-process batch b see, at every step, the same examples as one process with
  batch K * b, and one process with ``accum = a`` the same as one with batch ``a * b``;
- batches may run across an epoch boundary, so a training set smaller than a batch still works.

Evaluation shards are interleaved (process r takes examples r, r + W, r + 2W, ...), in order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

# a constant mixed into the seed so the data order and the task generator's streams never coincide
_ORDER_STREAM = 0x0D47A0


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training set in `epoch`: a function of (seed, epoch) only."""
    rng = np.random.default_rng(np.random.SeedSequence([_ORDER_STREAM, int(seed), int(epoch)]))
    return rng.permutation(num_examples)


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands after `examples_consumed` draws."""

    examples_consumed: int
    train_size: int

    @property
    def epoch(self) -> int:
        return self.examples_consumed // self.train_size

    @property
    def offset_in_epoch(self) -> int:
        return self.examples_consumed % self.train_size

    def to_json(self) -> dict:
        return {"examples_consumed": self.examples_consumed, "epoch": self.epoch,
                "offset_in_epoch": self.offset_in_epoch, "train_size": self.train_size}


class ExampleStream:
    """Index access to the endless, epoch-by-epoch shuffled stream of training example ids."""

    def __init__(self, num_examples: int, seed: int) -> None:
        if num_examples < 1:
            raise ValueError(f"the training split is empty; need at least 1 example, got {num_examples}")
        self.num_examples, self.seed = num_examples, seed
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.num_examples, self.seed, epoch)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """Example ids at stream positions [start, start + count)."""
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.num_examples)
            out.append(int(self._epoch(epoch)[offset]))
        return out


class MicroBatchPlan:
    """Which stream positions one process reads for micro-batch `m` of the run."""

    def __init__(self, stream: ExampleStream, batch_size: int, rank: int, world_size: int) -> None:
        self.stream, self.batch_size, self.rank, self.world_size = stream, batch_size, rank, world_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def indices(self, micro_batch: int) -> list[int]:
        start = micro_batch * self.global_batch + self.rank * self.batch_size
        return self.stream.take(start, self.batch_size)

    def position(self, micro_batches_done: int) -> DataPosition:
        return DataPosition(micro_batches_done * self.global_batch, self.stream.num_examples)


def eval_shards(num_examples: int, batch_size: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """This process's evaluation batches: examples rank, rank + W, ... in order, `batch_size` at a time."""
    mine = list(range(rank, num_examples, world_size))
    for i in range(0, len(mine), batch_size):
        yield mine[i : i + batch_size]


def majority_baseline(train_labels: Sequence[int], eval_labels: Sequence[int]) -> dict:
    """Accuracy of always predicting the most frequent training label (ties: the smallest label)."""
    if not train_labels or not eval_labels:
        return {"label": None, "accuracy": None}
    counts = Counter(int(x) for x in train_labels)
    label = min(counts, key=lambda c: (-counts[c], c))
    return {"label": label, "accuracy": sum(int(y) == label for y in eval_labels) / len(eval_labels)}
