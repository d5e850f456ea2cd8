"""Shared pieces of the long-range tasks: the `Task` base class, the task registry, datasets,
padding collation, byte encoding and the data-error helper.

Every task turns its data into integer token ids in ``[0, vocab_size)`` with id 0 reserved for
padding (`PAD_ID`); byte-level tasks use ``token = byte + 1`` so the vocabulary is 257.

A task builds its three splits in one of two ways (see `Task.datasets`):

* ``data_dir=None``: an offline generator (deterministic from ``seed``) makes data of the official
  shape, so every task runs on a fresh machine with no download;
* ``data_dir`` given: a loader reads the official released format from that folder.

Each split's examples come from their own random stream, seeded by ``(seed, task, split)``, so
changing ``num_train`` never changes the validation or test examples.

Malformed or missing files raise `ValueError` (`data_error`) or `FileNotFoundError`
(`missing_file`), naming the file, the line (where lines exist) and what was expected.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

PAD_ID = 0
BYTE_VOCAB = 257  # 256 byte values shifted by one, plus PAD
SPLITS = ("train", "val", "test")
KINDS = ("classification", "retrieval", "language_model", "set_regression")  # set_regression: max_of_set.py


# ----------------------------------------------------------------------------------------------
# errors


def data_error(path: str | Path, line: int | None, expected: str, got: Any = None) -> ValueError:
    """A ValueError that names the file, the 1-based line (if any) and what was expected."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    msg = f"{where}: expected {expected}"
    if got is not None:
        shown = repr(got)
        msg += f", got {shown[:80] + '...' if len(shown) > 80 else shown}"
    return ValueError(msg)


def missing_file(path: str | Path, what: str = "file") -> FileNotFoundError:
    """A FileNotFoundError that names the missing path."""
    return FileNotFoundError(f"{what} not found: {path}")


def require_dir(path: Path, what: str = "folder") -> Path:
    if not path.is_dir():
        raise missing_file(path, what)
    return path


# ----------------------------------------------------------------------------------------------
# byte encoding and randomness helpers


def encode_bytes(data: bytes) -> np.ndarray:
    """Bytes -> token ids ``byte + 1`` (uint16 array), so 0 stays PAD."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16) + 1


def decode_bytes(tokens: torch.Tensor | np.ndarray | Sequence[int]) -> bytes:
    """Token ids -> bytes (inverse of `encode_bytes`); PAD ids are dropped."""
    ids = np.asarray(tokens, dtype=np.int64)
    ids = ids[ids != PAD_ID]
    if ids.size and (ids.min() < 1 or ids.max() > 256):
        raise ValueError(f"byte token ids must lie in [1, 256], got range [{ids.min()}, {ids.max()}]")
    return (ids - 1).astype(np.uint8).tobytes()


def split_rng(seed: int, task: str, split: str) -> np.random.Generator:
    """The random stream of one split of one task: independent of the other splits' sizes."""
    key = zlib.crc32(f"{task}/{split}".encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def stable_hash(text: str) -> int:
    """A hash that is the same on every machine and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little")


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` labels, every class as often as possible (counts differ by at most one), in random order.

    Consumes exactly one draw of ``rng`` and takes the labels from a child stream, as consecutive
    random permutations of the classes: the first ``m`` labels for ``n`` examples are the labels for
    ``m``, so a generator that then draws each example in turn from ``rng`` gives a bigger split that
    extends the smaller one.
    """
    child = np.random.default_rng(int(rng.integers(2**63)))
    blocks = [child.permutation(num_classes) for _ in range(-(-n // num_classes))]
    return np.concatenate(blocks)[:n].astype(np.int64) if blocks else np.zeros(0, dtype=np.int64)


def fixed_permutation(n: int) -> np.ndarray:
    """A permutation that depends only on ``n``: used to carve validation splits and to interleave
    sorted file lists, identically on every run and for every training seed."""
    return np.random.default_rng(np.random.SeedSequence([0x5EED, n])).permutation(n)


# ----------------------------------------------------------------------------------------------
# storage and datasets


class Ragged:
    """Many 1-D integer sequences held as one flat array plus offsets (compact, fast to slice)."""

    def __init__(self, seqs: Iterable[np.ndarray], dtype: Any = np.uint16):
        seqs = [np.asarray(s, dtype=dtype).reshape(-1) for s in seqs]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n + 1,)
        self.flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=dtype)  # (total,)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> "Ragged":
        """Equal-length rows, e.g. images: (n, L) -> n sequences of length L."""
        out = cls.__new__(cls)
        n, length = matrix.shape
        out.flat = np.ascontiguousarray(matrix).reshape(-1)
        out.offsets = np.arange(n + 1, dtype=np.int64) * length
        return out

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def check_index(i: int, n: int) -> int:
    if not isinstance(i, (int, np.integer)):
        raise TypeError(f"dataset index must be an int, got {type(i).__name__}")
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} examples")
    return int(i)


def _to_tensor(seq: np.ndarray, shift: int, max_len: int | None) -> torch.Tensor:
    if max_len is not None:
        seq = seq[:max_len]
    return torch.from_numpy(seq.astype(np.int64) + shift)  # (n,)


class ClassificationDataset(Dataset):
    """Items ``{"tokens": LongTensor (n,), "label": int}``; token = stored value + ``shift``."""

    def __init__(self, tokens: Ragged, labels: Sequence[int], *, shift: int = 0, max_len: int | None = None):
        if len(tokens) != len(labels):
            raise ValueError(f"{len(tokens)} sequences but {len(labels)} labels")
        self.tokens, self.labels = tokens, np.asarray(labels, dtype=np.int64)
        self.shift, self.max_len = shift, max_len

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, len(self))
        return {"tokens": _to_tensor(self.tokens[i], self.shift, self.max_len), "label": int(self.labels[i])}


class RetrievalDataset(Dataset):
    """Items ``{"tokens": (n,), "tokens2": (m,), "label": int}`` for two-document tasks."""

    def __init__(self, tokens: Ragged, tokens2: Ragged, labels: Sequence[int], *, shift: int = 0,
                 max_len: int | None = None):
        if not len(tokens) == len(tokens2) == len(labels):
            raise ValueError(f"{len(tokens)} / {len(tokens2)} documents but {len(labels)} labels")
        self.tokens, self.tokens2 = tokens, tokens2
        self.labels = np.asarray(labels, dtype=np.int64)
        self.shift, self.max_len = shift, max_len

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, len(self))
        return {
            "tokens": _to_tensor(self.tokens[i], self.shift, self.max_len),
            "tokens2": _to_tensor(self.tokens2[i], self.shift, self.max_len),
            "label": int(self.labels[i]),
        }


class WindowDataset(Dataset):
    """Language-model windows over one byte stream: item ``i`` covers bytes ``[i*L, i*L + L]``;
    ``tokens`` are the first L (+1 so PAD stays 0), ``targets`` the next byte at each position."""

    def __init__(self, stream: np.ndarray, window: int, limit: int | None = None):
        if window < 1:
            raise ValueError(f"window length must be >= 1, got {window}")
        self.stream = np.asarray(stream, dtype=np.uint8)  # (T,)
        self.window = window
        n = max(0, (len(self.stream) - 1) // window)
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, self.n)
        start = i * self.window
        chunk = torch.from_numpy(self.stream[start : start + self.window + 1].astype(np.int64)) + 1  # (L+1,)
        return {"tokens": chunk[:-1], "targets": chunk[1:]}  # (L,), (L,)


# ----------------------------------------------------------------------------------------------
# collation


def pad_sequences(seqs: Sequence[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D sequences to the longest (at least 1): tokens (B, N) and mask (B, N), True = real."""
    width = max([1] + [int(s.numel()) for s in seqs])
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, N)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)  # (B, N)
    for b, s in enumerate(seqs):
        tokens[b, : s.numel()] = s
        mask[b, : s.numel()] = True
    return tokens, mask


def collate(kind: str, items: Sequence[dict], pad_id: int = PAD_ID) -> dict:
    """Batch items of a task of the given kind (see `Task.collate`)."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    if kind == "language_model":
        tokens, mask = pad_sequences([it["tokens"] for it in items], pad_id)  # (B, L)
        targets, _ = pad_sequences([it["targets"] for it in items], pad_id)  # (B, L)
        return {"tokens": tokens, "targets": targets, "mask": mask}
    tokens, mask = pad_sequences([it["tokens"] for it in items], pad_id)  # (B, N)
    batch = {"tokens": tokens, "mask": mask}
    if kind == "retrieval":
        batch["tokens2"], batch["mask2"] = pad_sequences([it["tokens2"] for it in items], pad_id)  # (B, M)
    elif kind != "classification":
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    batch["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)  # (B,)
    return batch


# ----------------------------------------------------------------------------------------------
# the Task base class and registry

# where an option applies: only to the offline generator, only to the loader, or to both
GENERATE, LOAD, BOTH = "generate", "load", "both"


class Task:
    """One long-range task. Subclasses set the class attributes and implement `_generate` and
    `_load`; `datasets` checks the arguments and dispatches.

    ``options`` maps each task option to ``(default, where)`` with ``where`` one of
    ``"generate"`` (data_dir=None only), ``"load"`` (data_dir given only) or ``"both"``.
    ``default_sizes`` are the generator's (train, val, test) sizes when ``num_*`` is None; loaders
    read every example unless capped.
    """

    name: str = ""
    kind: str = "classification"
    vocab_size: int = 0
    num_classes: int | None = None
    default_max_len: int = 0
    metric: str = "accuracy"
    pad_id: int = PAD_ID
    options: dict[str, tuple[Any, str]] = {}
    default_sizes: tuple[int, int, int] = (2000, 200, 200)

    # -- public -------------------------------------------------------------------------------

    def datasets(self, data_dir: str | Path | None = None, *, seed: int = 0, max_len: int | None = None,
                 num_train: int | None = None, num_val: int | None = None, num_test: int | None = None,
                 **task_options: Any) -> dict[str, Dataset]:
        """The three splits ``{"train", "val", "test"}`` as map-style, deterministic datasets.

        data_dir: None -> generate offline (from ``seed``); a folder -> load the official format.
        max_len: truncate every sequence to this many tokens (generators also bound the generated
            length by it); None -> the task's natural length (`default_max_len` for most tasks).
        num_train / num_val / num_test: cap the number of examples; generators use them as sizes.
        task_options: see the task's ``options``; unknown ones raise ValueError.
        """
        mode = GENERATE if data_dir is None else LOAD
        opts = self._resolve_options(task_options, mode)
        if max_len is not None:
            if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len < 1:
                raise ValueError(f"{self.name}: max_len must be a positive int or None, got {max_len!r}")
            max_len = int(max_len)
        sizes = {}
        for split, n in zip(SPLITS, (num_train, num_val, num_test)):
            if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0):
                raise ValueError(f"{self.name}: num_{split} must be a non-negative int or None, got {n!r}")
            sizes[split] = None if n is None else int(n)
        if data_dir is None:
            for split, default in zip(SPLITS, self.default_sizes):
                if sizes[split] is None:
                    sizes[split] = default
            if max_len is None:
                max_len = self.natural_max_len(opts)
            out = self._generate(seed=int(seed), max_len=max_len, sizes=sizes, **opts)
        else:
            root = require_dir(Path(data_dir), f"{self.name} data folder")
            out = self._load(root, max_len=max_len, sizes=sizes, **opts)
        assert set(out) == set(SPLITS), out.keys()
        return {split: out[split] for split in SPLITS}

    def collate(self, items: Sequence[dict]) -> dict:
        """Pad a list of items into a batch.

        classification: ``tokens`` (B, N) long padded with pad_id, ``mask`` (B, N) bool True = real,
        ``label`` (B,) long; retrieval adds ``tokens2`` / ``mask2`` (B, M); language_model gives
        ``tokens``, ``targets`` and ``mask``, all (B, L).
        """
        return collate(self.kind, items, self.pad_id)

    def data_shape(self, opts: dict[str, Any]) -> tuple[int, ...] | None:
        """The grid the sequence is the raster order of (an image's (H, W)), or None for 1-D data."""
        return None

    def natural_max_len(self, opts: dict[str, Any]) -> int:
        """The generator's length bound when ``max_len`` is None (overridden where it depends on
        an option, e.g. the Pathfinder image size)."""
        return self.default_max_len

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"num_classes={self.num_classes}, default_max_len={self.default_max_len})")

    # -- for subclasses -----------------------------------------------------------------------

    def _generate(self, *, seed: int, max_len: int, sizes: dict[str, int], **opts: Any) -> dict[str, Dataset]:
        raise NotImplementedError

    def _load(self, root: Path, *, max_len: int | None, sizes: dict[str, int | None], **opts: Any) -> dict[str, Dataset]:
        raise NotImplementedError

    def _resolve_options(self, given: dict[str, Any], mode: str) -> dict[str, Any]:
        allowed = [k for k, (_, where) in self.options.items() if where in (mode, BOTH)]
        for key in given:
            if key not in self.options:
                raise ValueError(f"unknown option {key!r} for task {self.name!r}; allowed options: "
                                 f"{sorted(self.options) or 'none'}")
            if key not in allowed:
                other = "data_dir=None (the generator)" if mode == LOAD else "a data_dir (the loader)"
                raise ValueError(f"option {key!r} of task {self.name!r} applies only with {other}; "
                                 f"allowed here: {sorted(allowed) or 'none'}")
        return {k: given.get(k, self.options[k][0]) for k in allowed}


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make the task available to `get_task` under ``cls.name``."""
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"task name {cls.name!r} is empty or already registered")
    if cls.kind not in KINDS:
        raise ValueError(f"task {cls.name!r}: kind must be one of {KINDS}, got {cls.kind!r}")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Registered task names, in registration order."""
    return list(_TASKS)


def get_task(name: str) -> Task:
    """A task by name; unknown names raise ValueError listing the allowed ones."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; allowed tasks: {task_names()}")
    return _TASKS[name]()
