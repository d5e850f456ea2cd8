"""Image: CIFAR-10 python batches -> grayscale pixel tokens; the synthetic shapes generator."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from efficient_transformers.tasks import get_task
from efficient_transformers.tasks import image as I


def write_cifar(folder, n_per_batch=20, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in I.TRAIN_FILES + (I.TEST_FILE,):
        rgb = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch)
        I.write_batch(folder / name, rgb, labels)
        batches[name] = (rgb, labels)
    return batches


def gray_by_hand(row: np.ndarray, pixel: int) -> int:
    r, g, b = (int(row[c * 1024 + pixel]) for c in range(3))
    return int(np.floor(0.2989 * r + 0.5870 * g + 0.1140 * b + 0.5))


def test_cifar_round_trip_and_lra_splits(tmp_path):
    batches = write_cifar(tmp_path)
    splits = get_task("image").datasets(tmp_path)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [90, 10, 20]  # val = last 10% of train
    train_rgb = np.concatenate([batches[n][0] for n in I.TRAIN_FILES])
    train_y = np.concatenate([batches[n][1] for n in I.TRAIN_FILES])
    rng = np.random.default_rng(1)
    for split, offset, rgb, y in (("train", 0, train_rgb, train_y), ("val", 90, train_rgb, train_y),
                                  ("test", 0, *batches[I.TEST_FILE])):
        for i in range(len(splits[split])):
            item = splits[split][i]
            assert item["label"] == int(y[offset + i])
            assert len(item["tokens"]) == 1024
            for p in rng.integers(0, 1024, size=8):
                assert int(item["tokens"][p]) == gray_by_hand(rgb[offset + i], int(p)) + 1


def test_grayscale_extremes():
    rows = np.zeros((3, 3072), dtype=np.uint8)
    rows[1] = 255
    rows[2, :1024] = 255  # pure red
    gray = I.to_grayscale(rows)
    assert gray[0].max() == 0 and gray[1].min() == 255 and (gray[2] == 76).all()  # round(0.2989 * 255) = 76


def test_cifar_subfolder_and_caps(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    splits = get_task("image").datasets(tmp_path, num_train=7, num_val=3, num_test=2)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [7, 3, 2]


def test_cifar_missing_batch(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        get_task("image").datasets(tmp_path)


@pytest.mark.parametrize("content, what", [
    ({b"labels": [1]}, "b'data'"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, "(n, 3072) uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "2 ints in 0-9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, "2 ints in 0-9"),
    ([1, 2, 3], "dict"),
])
def test_cifar_malformed_batches(tmp_path, content, what):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(content, f, protocol=2)
    with pytest.raises(ValueError) as e:
        get_task("image").datasets(tmp_path)
    assert "test_batch" in str(e.value) and what in str(e.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar_reader_refuses_arbitrary_objects(tmp_path):
    write_cifar(tmp_path)
    marker = str(tmp_path / "pwned")
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_1.*not allowed"):
        get_task("image").datasets(tmp_path)
    assert not os.path.exists(marker)


def test_cifar_not_a_pickle(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_2"):
        get_task("image").datasets(tmp_path)


# -- the generator -----------------------------------------------------------------------------


def test_generated_images_are_learnable_by_a_simple_rule():
    """A nearest-centroid rule on log power spectra (translation invariant) beats chance (10%) by
    far: the classes differ in content, not just in noise."""
    splits = get_task("image").datasets(seed=0, num_train=400, num_val=0, num_test=200)

    def features(ds):
        x = np.stack([ds[i]["tokens"].numpy().reshape(32, 32).astype(float) for i in range(len(ds))])
        spectrum = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True)))
        return np.log1p(spectrum).reshape(len(x), -1), ds.labels

    x, y = features(splits["train"])
    xt, yt = features(splits["test"])
    centroids = np.stack([x[y == c].mean(0) for c in range(10)])
    pred = ((xt[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.35


def test_generated_images_use_the_pixel_range():
    ds = get_task("image").datasets(seed=0, num_train=50, num_val=0, num_test=0)["train"]
    tokens = np.stack([ds[i]["tokens"].numpy() for i in range(len(ds))])
    assert tokens.min() == 1 and tokens.max() == 256  # pixels 0 and 255 both occur
    assert len({t.tobytes() for t in tokens}) == len(tokens)


def test_pool_averages_patches_and_sets_the_natural_length():
    task = get_task("image")
    full = task.datasets(seed=3, num_train=4, num_val=1, num_test=1)
    pooled = task.datasets(seed=3, num_train=4, num_val=1, num_test=1, pool=2)
    assert task.natural_max_len({"pool": 2}) == 256 and task.data_shape({"pool": 2}) == (16, 16)
    for i in range(4):
        gray = (full["train"][i]["tokens"] - 1).numpy().reshape(32, 32).astype(float)
        expected = np.floor(gray.reshape(16, 2, 16, 2).mean(axis=(1, 3)) + 0.5).reshape(-1)
        assert np.array_equal((pooled["train"][i]["tokens"] - 1).numpy(), expected)
        assert pooled["train"][i]["label"] == full["train"][i]["label"]
    images = np.arange(1024, dtype=np.int64).astype(np.uint8)[None]  # (1, 1024)
    assert I.pool_images(images, 1) is images
    for bad in (3, 0, True, "2"):
        with pytest.raises(ValueError, match="pool must be a divisor of 32"):
            task.datasets(seed=0, num_train=1, num_val=1, num_test=1, pool=bad)
