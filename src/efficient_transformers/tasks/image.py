"""Image classification on pixel sequences (LRA "Image"): CIFAR-10 as 8-bit grayscale, one token per
pixel in row-major order, 1024 tokens per 32x32 image, 10 classes.

Tokens are ``gray + 1`` (vocabulary 257, 0 = PAD), where ``gray = round(0.2989 R + 0.5870 G + 0.1140 B)``
(the luma weights of ``tf.image.rgb_to_grayscale``, which LRA uses; rounded half up here).
No augmentation, no 2-D positions: the model sees a flat sequence. Option ``pool`` (default 1) averages
each ``pool x pool`` patch first (``pool=2``: 16x16 = 256 tokens, used by `eft lra --quick`), for the
generated and the official images alike.

Official format: the CIFAR-10 python batches ``data_batch_1`` .. ``data_batch_5`` and
``test_batch`` (in ``data_dir`` or in ``data_dir/cifar-10-batches-py``). Each is a pickled dict with
``b"data"``, a (10000, 3072) uint8 array (1024 red, then 1024 green, then 1024 blue values per image,
row-major), and ``b"labels"``, 10000 ints in 0-9. As in LRA, val is the last 10% of the 50K
training images (train 45K / val 5K) and test is the official test batch. These files are python
pickles: reading them is reading the official *data* format, and it goes through a restricted
unpickler that only accepts the few globals a numpy array needs (nothing else can be constructed).

Generator (``data_dir=None``) — a SYNTHETIC stand-in, not CIFAR: 32x32 grayscale images of 10
procedurally drawn classes (disk, ring, square, triangle, plus, stripes, checkerboard, concentric
rings, two disks, dot lattice) at random position, scale and rotation, with random contrast and
polarity, a random brightness gradient and Gaussian pixel noise. Labels are balanced.
"""

from __future__ import annotations

import importlib
import math
import pickle
from pathlib import Path

import numpy as np

from .base import (
    BOTH,
    BYTE_VOCAB,
    ClassificationDataset,
    Ragged,
    Task,
    balanced_labels,
    data_error,
    missing_file,
    register_task,
    split_rng,
)

SIDE = 32
LUMA = (0.2989, 0.5870, 0.1140)
CLASS_NAMES = ("disk", "ring", "square", "triangle", "plus", "stripes", "checkerboard", "concentric",
               "two_disks", "dots")
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"


# ----------------------------------------------------------------------------------------------
# CIFAR-10 python batches


def _numpy_global(module_names: tuple[str, ...], attr: str):
    for mod in module_names:
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: any other global is refused."""

    _MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
    _NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global(_ArrayUnpickler._MULTIARRAY, "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global(_ArrayUnpickler._MULTIARRAY, "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global(_ArrayUnpickler._NUMERIC, "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global(_ArrayUnpickler._NUMERIC, "_frombuffer"),
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: __import__("codecs").encode,
    }

    def find_class(self, module: str, name: str):
        make = self.ALLOWED.get((module, name))
        obj = make() if make is not None else None
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return obj


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (images (n, 3072) uint8, labels (n,) int64), validated."""
    if not path.is_file():
        raise missing_file(path, "CIFAR-10 batch file")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001  (any unpickling failure means a malformed file)
        raise data_error(path, None, f"a CIFAR-10 python batch (a pickled dict) [{type(e).__name__}: {e}]") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise data_error(path, None, "a dict with keys b'data' and b'labels'", keys)
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        raise data_error(path, None, "b'data' as a (n, 3072) uint8 array", got)
    labels = np.asarray(batch[b"labels"])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) or labels.size and (
            labels.min() < 0 or labels.max() > 9):
        raise data_error(path, None, f"b'labels' as {len(data)} ints in 0-9", f"{labels.dtype} {labels.shape}")
    return data, labels.astype(np.int64)


def write_batch(path: str | Path, rgb: np.ndarray, labels: np.ndarray) -> None:
    """Write a CIFAR-10 python batch (for tests and for exporting data): ``rgb`` (n, 3072) uint8."""
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"batch", b"labels": [int(y) for y in labels],
                     b"data": np.ascontiguousarray(rgb, dtype=np.uint8),
                     b"filenames": [f"{i}.png".encode() for i in range(len(rgb))]}, f, protocol=2)


def to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """(n, 3072) uint8 CIFAR rows -> (n, 1024) uint8 luma, rounded half up."""
    planes = rgb.reshape(len(rgb), 3, SIDE * SIDE).astype(np.float64)  # (n, 3, 1024)
    gray = LUMA[0] * planes[:, 0] + LUMA[1] * planes[:, 1] + LUMA[2] * planes[:, 2]  # (n, 1024)
    return np.clip(np.floor(gray + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# the synthetic generator


def draw_image(rng: np.random.Generator, label: int, side: int = SIDE) -> np.ndarray:
    """One (side, side) uint8 image of class ``label`` (see CLASS_NAMES)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)  # (side, side) each
    s = side / 32.0
    cx, cy = side / 2 + rng.uniform(-5, 5, size=2) * s
    r = rng.uniform(6, 11) * s
    th = rng.uniform(0, 2 * np.pi)
    u = (x - cx) * np.cos(th) + (y - cy) * np.sin(th)  # (side, side) rotated coordinates
    v = -(x - cx) * np.sin(th) + (y - cy) * np.cos(th)
    d = np.hypot(u, v)
    if label == 0:
        m = d < r
    elif label == 1:
        m = np.abs(d - r) < rng.uniform(1.2, 2.2) * s
    elif label == 2:
        m = np.maximum(np.abs(u), np.abs(v)) < 0.8 * r
    elif label == 3:
        m = np.ones_like(d, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            m &= u * np.cos(a) + v * np.sin(a) < 0.5 * r
    elif label == 4:
        w = rng.uniform(1.5, 2.5) * s
        m = ((np.abs(u) < w) & (np.abs(v) < r)) | ((np.abs(v) < w) & (np.abs(u) < r))
    elif label == 5:
        m = np.sin(2 * np.pi * u / (rng.uniform(4, 8) * s)) > 0
    elif label == 6:
        p = rng.uniform(6, 12) * s
        m = np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p) > 0
    elif label == 7:
        m = np.sin(2 * np.pi * d / (rng.uniform(4, 7) * s)) > 0
    elif label == 8:
        m = (np.hypot(u - 0.6 * r, v) < 0.4 * r) | (np.hypot(u + 0.6 * r, v) < 0.4 * r)
    elif label == 9:
        p = rng.uniform(5, 8) * s
        m = (np.cos(2 * np.pi * u / p) > 0.6) & (np.cos(2 * np.pi * v / p) > 0.6)
    else:
        raise ValueError(f"label must be in 0-9, got {label}")
    fg, bg = rng.uniform(140, 255), rng.uniform(0, 110)
    if rng.random() < 0.5:
        fg, bg = bg, fg
    g = rng.uniform(-30, 30)
    ga = rng.uniform(0, 2 * np.pi)
    img = bg + (fg - bg) * m + g * ((x - side / 2) * np.cos(ga) + (y - side / 2) * np.sin(ga)) / (side / 2)
    img = img + rng.normal(0, rng.uniform(8, 24), size=img.shape)
    return np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8)


def _check_pool(pool) -> int:
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1 or SIDE % pool:
        raise ValueError(f"image: pool must be a divisor of {SIDE} (1, 2, 4, 8, 16, 32), got {pool!r}")
    return pool


def pool_images(images: np.ndarray, pool: int) -> np.ndarray:
    """(n, 1024) uint8 row-major 32x32 images -> (n, (32 / pool)^2): the mean of each pool x pool patch,
    rounded half up (pool 1 returns the images unchanged)."""
    if pool == 1:
        return images
    side = SIDE // pool
    patches = images.reshape(len(images), side, pool, side, pool).astype(np.float64)  # (n, s, p, s, p)
    return np.floor(patches.mean(axis=(2, 4)) + 0.5).astype(np.uint8).reshape(len(images), side * side)


def generate_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic images (n, 1024) uint8 and balanced labels (n,)."""
    labels = balanced_labels(rng, n, 10)
    images = np.stack([draw_image(rng, int(y)).reshape(-1) for y in labels]) if n else np.zeros((0, SIDE * SIDE), np.uint8)
    return images, labels


@register_task
class ImageTask(Task):
    """CIFAR-10 (or the synthetic shapes stand-in) as 1024-pixel grayscale sequences, 10 classes."""

    name = "image"
    kind = "classification"
    vocab_size = BYTE_VOCAB
    num_classes = 10
    default_max_len = SIDE * SIDE
    metric = "accuracy"
    default_sizes = (5000, 500, 500)
    options = {"pool": (1, BOTH)}  # average-pool each pool x pool patch: a (32 / pool)^2-token image

    def data_shape(self, opts):
        side = SIDE // _check_pool(opts.get("pool", 1))
        return (side, side)

    def natural_max_len(self, opts):
        return math.prod(self.data_shape(opts))

    def _generate(self, *, seed, max_len, sizes, pool):
        _check_pool(pool)
        out = {}
        for split in ("train", "val", "test"):
            images, labels = generate_images(split_rng(seed, self.name, split), sizes[split])
            out[split] = ClassificationDataset(Ragged.from_matrix(pool_images(images, pool)), labels, shift=1,
                                               max_len=max_len)
        return out

    def _load(self, root, *, max_len, sizes, pool):
        _check_pool(pool)
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        max_len = self.default_max_len if max_len is None else max_len
        parts = [read_batch(base / name) for name in TRAIN_FILES]
        train_rgb = np.concatenate([p[0] for p in parts])  # (50000, 3072)
        train_y = np.concatenate([p[1] for p in parts])
        test_rgb, test_y = read_batch(base / TEST_FILE)
        n_train = len(train_rgb) - len(train_rgb) // 10  # LRA: train[:90%], val train[90%:]
        raw = {"train": (train_rgb[:n_train], train_y[:n_train]), "val": (train_rgb[n_train:], train_y[n_train:]),
               "test": (test_rgb, test_y)}
        out = {}
        for split, (rgb, y) in raw.items():
            if sizes[split] is not None:
                rgb, y = rgb[: sizes[split]], y[: sizes[split]]
            out[split] = ClassificationDataset(Ragged.from_matrix(pool_images(to_grayscale(rgb), pool)), y, shift=1,
                                               max_len=max_len)
        return out
