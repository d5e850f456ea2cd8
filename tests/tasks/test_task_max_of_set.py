"""max_of_set: sets of continuous vectors generated offline, deterministic from the seed, targets the
maximum of the first coordinate, padded batches with a mask, bad options."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from efficient_transformers.tasks import get_task, task_names
from efficient_transformers.tasks.base import split_rng

SMALL = dict(num_train=40, num_val=10, num_test=10)


def items(ds):
    return [ds[i] for i in range(len(ds))]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x["x"], y["x"]) and x["target"] == y["target"] for x, y in zip(a, b))


def test_registered_with_its_kind_metric_and_model_defaults():
    task = get_task("max_of_set")
    assert "max_of_set" in task_names()
    assert (task.kind, task.metric, task.default_max_len, task.num_classes) == ("set_regression", "mae", 10, None)
    assert task.default_attention == "set_transformer"
    assert task.train_defaults == {"pooling": "pma", "dropout": 0.0}
    assert task.input_features({}) == 1 and task.input_features({"features": 3}) == 3


def test_sets_and_targets_are_what_the_docstring_says():
    task = get_task("max_of_set")
    splits = task.datasets(seed=0, max_len=7, features=3, min_size=2, low=-1.0, high=3.0, **SMALL)
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        ds = splits[split]
        assert len(ds) == n
        for it in items(ds):
            x = it["x"]
            assert x.dtype == torch.float32 and x.shape[1] == 3 and 2 <= x.shape[0] <= 7
            assert float(x.min()) >= -1.0 and float(x.max()) < 3.0
            assert it["target"] == float(x[:, 0].max())  # exactly the max of the stored first coordinates
    sizes = splits["train"].sizes()
    assert sizes.min() == 2 and sizes.max() == 7  # both ends of the size range are drawn in 40 sets


def test_the_generator_is_the_documented_draw():
    """Example i is (size ~ U{min..max}, then the size x F values ~ U[low, high)) from the split's own stream."""
    ds = get_task("max_of_set").datasets(seed=5, features=2, **SMALL)["val"]
    rng = split_rng(5, "max_of_set", "val")
    for it in items(ds):
        size = int(rng.integers(1, 11))
        values = rng.uniform(-2.0, 2.0, size=(size, 2)).astype(np.float32)
        assert torch.equal(it["x"], torch.from_numpy(values))
        assert it["target"] == float(values[:, 0].max())


def test_deterministic_seeded_and_splits_independent_of_num_train():
    task = get_task("max_of_set")
    a, b, c = task.datasets(seed=0, **SMALL), task.datasets(seed=0, **SMALL), task.datasets(seed=1, **SMALL)
    more = task.datasets(seed=0, **{**SMALL, "num_train": 55})
    for split in ("train", "val", "test"):
        assert same(items(a[split]), items(b[split]))
        assert not same(items(a[split]), items(c[split]))
    assert same(items(a["val"]), items(more["val"])) and same(items(a["test"]), items(more["test"]))
    assert same(items(a["train"]), items(more["train"])[:40])
    assert not same(items(a["train"])[:10], items(a["val"]))


def test_collate_pads_sets_of_different_sizes_with_a_mask():
    task = get_task("max_of_set")
    its = items(task.datasets(seed=0, features=2, **SMALL)["train"])[:6]
    batch = task.collate(its)
    n = max(len(it["x"]) for it in its)
    assert set(batch) == {"x", "mask", "target"}
    assert batch["x"].shape == (6, n, 2) and batch["x"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum(1).tolist() == [len(it["x"]) for it in its]
    assert len(set(batch["mask"].sum(1).tolist())) > 1  # sizes do differ in this batch
    for b, it in enumerate(its):
        k = len(it["x"])
        assert torch.equal(batch["x"][b, :k], it["x"]) and not batch["x"][b, k:].any()
        assert batch["target"][b].item() == it["target"]
    with pytest.raises(ValueError, match="empty"):
        task.collate([])


def test_datasets_and_collate_pickle_for_dataloader_workers():
    task = get_task("max_of_set")
    ds = task.datasets(seed=0, **SMALL)["val"]
    assert same(items(pickle.loads(pickle.dumps(ds))), items(ds))
    assert torch.equal(pickle.loads(pickle.dumps(task.collate))(items(ds))["x"], task.collate(items(ds))["x"])


def test_empty_splits_are_allowed():
    splits = get_task("max_of_set").datasets(seed=0, num_train=3, num_val=0, num_test=0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (3, 0, 0)


@pytest.mark.parametrize("options,message", [
    ({"features": 0}, r"max_of_set: features must be an int >= 1, got 0"),
    ({"min_size": True}, r"max_of_set: min_size must be an int >= 1, got True"),
    ({"min_size": 11}, r"max_of_set: min_size=11 exceeds max_len=10 .*allowed: 1 <= min_size <= max_len"),
    ({"low": 1.0, "high": 1.0}, r"max_of_set: low=1.0 must be below high=1.0; allowed: low < high"),
    ({"high": float("nan")}, r"max_of_set: high must be a finite number"),
    ({"bogus": 1}, r"unknown option 'bogus' for task 'max_of_set'; allowed options: \['features', 'high', 'low'"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        get_task("max_of_set").datasets(seed=0, **SMALL, **options)


def test_there_are_no_official_files(tmp_path):
    with pytest.raises(ValueError, match="max_of_set: the task has no official files .*allowed: no --data"):
        get_task("max_of_set").datasets(tmp_path)
