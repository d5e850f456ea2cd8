"""The learning-rate schedule, weight-decay groups, the deterministic data order and its sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from efficient_transformers.train import TrainConfig
from efficient_transformers.train.optim import build_optimizer, learning_rate
from efficient_transformers.train.sampling import (
    ExampleStream,
    MicroBatchPlan,
    epoch_permutation,
    eval_shards,
    majority_baseline,
)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(task="t", attention="vanilla", out="o", **{"steps": 110, "warmup": 10, "lr": 1.0, **kw})


def test_warmup_is_linear_and_cosine_decays_to_the_floor():
    cfg = _cfg(min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)  # the first update uses lr / warmup
    assert learning_rate(4, cfg) == pytest.approx(0.5)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) -> 0.5
    assert learning_rate(85, cfg) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_linear_and_constant_decay():
    assert learning_rate(60, _cfg(decay="linear")) == pytest.approx(0.5)
    assert learning_rate(35, _cfg(decay="linear")) == pytest.approx(0.75)
    assert learning_rate(100, _cfg(decay="constant")) == 1.0
    assert learning_rate(0, _cfg(warmup=0)) == 1.0
    assert _cfg(warmup=None).warmup_steps == 11  # default: 10% of the steps


@pytest.mark.parametrize("field,value,fragment", [
    ("lr", 0.0, "lr must be a number in (0.0"),
    ("decay", "step", "unknown decay 'step'; allowed: ['cosine', 'linear', 'constant']"),
    ("heads", 3, "heads=3 does not divide dim=128"),
    ("accum", 0, "accum must be an int >= 1, got 0"),
    ("dropout", 1.0, "dropout must be a number in [0.0, 1.0), got 1.0"),
    ("pooling", "max", "unknown pooling 'max'"),
    ("steps", 2.5, "steps must be an int >= 0, got 2.5"),
])
def test_bad_config_values_are_named(field, value, fragment):
    with pytest.raises(ValueError) as err:
        _cfg(**{field: value})
    assert fragment in str(err.value)


def test_weight_decay_applies_to_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, _cfg(weight_decay=0.3))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[1].bias), id(model[2].weight), id(model[2].bias)}


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    a, b = epoch_permutation(50, 3, 0), epoch_permutation(50, 3, 1)
    assert sorted(a.tolist()) == list(range(50)) and sorted(b.tolist()) == list(range(50))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, epoch_permutation(50, 3, 0))
    assert not np.array_equal(a, epoch_permutation(50, 4, 0))
    stream = ExampleStream(50, 3)
    assert stream.take(45, 10) == a[45:].tolist() + b[:5].tolist()  # batches run across epochs


def test_processes_split_the_global_batch_of_a_single_process():
    stream = ExampleStream(37, 0)
    single = MicroBatchPlan(stream, batch_size=8, rank=0, world_size=1)
    ranks = [MicroBatchPlan(stream, batch_size=4, rank=r, world_size=2) for r in range(2)]
    accum = MicroBatchPlan(stream, batch_size=4, rank=0, world_size=1)
    for m in range(12):  # several epochs
        assert ranks[0].indices(m) + ranks[1].indices(m) == single.indices(m)
        assert accum.indices(2 * m) + accum.indices(2 * m + 1) == single.indices(m)
    position = single.position(12)
    assert (position.examples_consumed, position.epoch, position.offset_in_epoch) == (96, 2, 22)


def test_eval_shards_cover_every_example_once():
    seen = [i for r in range(3) for batch in eval_shards(10, 2, r, 3) for i in batch]
    assert sorted(seen) == list(range(10))
    assert list(eval_shards(5, 2, 0, 1)) == [[0, 1], [2, 3], [4]]


def test_majority_baseline():
    assert majority_baseline([1, 1, 0, 2], [1, 0, 1, 1]) == {"label": 1, "accuracy": 0.75}
    assert majority_baseline([2, 0], [0, 0, 2])["label"] == 0  # ties go to the smallest label
    with pytest.raises(ValueError, match="the training split is empty"):
        ExampleStream(0, 0)
