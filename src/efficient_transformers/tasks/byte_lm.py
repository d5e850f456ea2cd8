"""Byte-level language modelling on a folder of text files; metric: bits per byte.

Items are fixed windows of ``L = max_len`` bytes (default 1024): ``tokens`` are bytes ``[i*L, i*L+L)``
and ``targets`` the next byte at each position, bytes ``[i*L+1, i*L+L]``, both as ``byte + 1`` so
0 stays PAD (vocabulary 257). Windows do not overlap; an incomplete last window is dropped.

Corpus: ``data_dir`` is any folder, read recursively; files whose name ends with one of
``extensions`` (default ``.py``, ``.txt``, ``.md``; case-insensitive) are used as raw bytes. With
``data_dir=None`` the corpus is the Python standard library's own sources
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` / ``dist-packages``), so the task
runs offline; note that it differs between Python versions.

Splits: files are taken in sorted order of their relative path and assigned by a stable hash of
that path: 90% train, 5% val, 5% test (so a file never straddles two splits). Each split is the
concatenation of its files. ``num_train`` / ``num_val`` / ``num_test`` cap the number of windows
(and reading stops once every capped split has its bytes); by default every window is used.
A split that receives no file raises ValueError: use a folder with more files.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

from .base import (
    BOTH,
    BYTE_VOCAB,
    Task,
    WindowDataset,
    data_error,
    register_task,
    stable_hash,
)

DEFAULT_EXTENSIONS = (".py", ".txt", ".md")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
SPLIT_BUCKETS = (("train", 90), ("val", 95), ("test", 100))  # hash % 100 below the bound


def split_of(relpath: str) -> str:
    """The split of a file, from a stable hash of its relative path (posix separators)."""
    bucket = stable_hash(relpath) % 100
    return next(split for split, bound in SPLIT_BUCKETS if bucket < bound)


def list_files(root: Path, extensions: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every matching file under ``root``, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.lower().endswith(extensions):
                path = Path(dirpath) / name
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _normalize_extensions(extensions) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        exts = tuple(str(e).lower() if str(e).startswith(".") else "." + str(e).lower() for e in extensions)
    except TypeError:
        raise ValueError(f"byte_lm: extensions must be a string or a sequence of strings, got {extensions!r}") from None
    if not exts or any(e == "." for e in exts):
        raise ValueError(f"byte_lm: extensions must be non-empty, got {extensions!r}")
    return exts


def read_corpus(root: Path, extensions: tuple[str, ...], need: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Byte streams (uint8) of each split; ``need[split]`` bytes suffice for a capped split."""
    files = list_files(root, extensions)
    if not files:
        raise data_error(root, None, f"text files ending in {list(extensions)} (searched recursively)", "none")
    chunks: dict[str, list[bytes]] = {s: [] for s, _ in SPLIT_BUCKETS}
    have = {s: 0 for s, _ in SPLIT_BUCKETS}
    counts = {s: 0 for s, _ in SPLIT_BUCKETS}
    for rel, path in files:
        split = split_of(rel)
        counts[split] += 1
        if need[split] is not None and have[split] >= need[split]:
            if all(need[s] is not None and have[s] >= need[s] for s in need):
                break
            continue
        data = path.read_bytes()
        chunks[split].append(data)
        have[split] += len(data)
    for split, n in counts.items():
        if n == 0 and need[split] != 0:
            raise data_error(root, None, f"files for the {split!r} split (files go to train/val/test by a hash of "
                             f"their path, 90/5/5; found {len(files)} matching files in all)", "none")
    return {s: np.frombuffer(b"".join(c), dtype=np.uint8) for s, c in chunks.items()}


def default_corpus() -> Path:
    """The folder of the Python standard library's sources."""
    return Path(sysconfig.get_paths()["stdlib"])


@register_task
class ByteLMTask(Task):
    """Next-byte prediction on text files (default: the Python standard library's sources)."""

    name = "byte_lm"
    kind = "language_model"
    vocab_size = BYTE_VOCAB
    num_classes = None
    default_max_len = 1024
    metric = "bits_per_byte"
    default_sizes = (None, None, None)  # every window of the corpus
    options = {"extensions": (DEFAULT_EXTENSIONS, BOTH)}

    def _generate(self, *, seed, max_len, sizes, extensions):
        del seed  # the default corpus is fixed; nothing is random
        return self._windows(default_corpus(), max_len, sizes, extensions)

    def _load(self, root, *, max_len, sizes, extensions):
        return self._windows(root, self.default_max_len if max_len is None else max_len, sizes, extensions)

    def _windows(self, root: Path, window: int, sizes: dict, extensions) -> dict:
        exts = _normalize_extensions(extensions)
        need = {s: None if n is None else (n * window + 1 if n else 0) for s, n in sizes.items()}  # bytes
        streams = read_corpus(root, exts, need)
        out = {s: WindowDataset(streams[s], window, limit=sizes[s]) for s in streams}
        for split, ds in out.items():
            if len(ds) == 0 and sizes[split] != 0:
                raise data_error(root, None, f"at least one window of {window + 1} bytes for the {split!r} split",
                                 f"{len(streams[split])} bytes")
        return out
