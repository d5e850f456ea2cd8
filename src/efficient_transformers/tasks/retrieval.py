"""Byte-level document retrieval (LRA "Retrieval", ACL Anthology Network): do two papers cite each
other? 2 classes, two documents per example.

Each document is encoded separately as ``byte + 1`` tokens (vocabulary 257, 0 = PAD) and truncated
to ``max_len`` bytes (default 4000 per document, 8K per pair). The model encodes the two documents
with a shared encoder (two towers, no cross-attention); items carry ``tokens`` and ``tokens2``.

Official format: the LRA AAN TSV files ``{prefix}.{train,eval,test}.tsv`` (``prefix`` defaults to
``new_aan_pairs``; ``eval`` becomes the ``val`` split), with no header and the five tab-separated
columns ``label, id1, id2, text1, text2``; ``label`` is 0 or 1 and may be written as a float
(``1.0``), as LRA's reader parses it as one. Quotes are not special (LRA reads with
``use_quote_delim=False``). The text fields are taken as raw bytes.

Generator (``data_dir=None``) — a SYNTHETIC stand-in: each document is neutral filler text with a
"citation signature", four code words (from a fixed pool of 32, e.g. ``[ref:kamo]``) scattered at
random positions through it. A linked pair (label 1) carries the same four codes in both documents;
an unlinked pair (label 0) shares 0-3 of them, so deciding needs every code of both documents.
Document lengths are uniform in ``[min_len, max_len]`` (``min_len`` defaults to ``max_len // 2``;
``max_len`` must be at least 48). Labels are balanced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (
    BYTE_VOCAB,
    GENERATE,
    LOAD,
    Ragged,
    RetrievalDataset,
    Task,
    balanced_labels,
    data_error,
    missing_file,
    register_task,
    split_rng,
)
from .text import FILLER

_SYLLABLES = [c + v for c in "bdgkmnprstvz" for v in "aeiou"]  # 60 syllables
CODES = tuple(f"[ref:{_SYLLABLES[i]}{_SYLLABLES[(7 * i + 11) % 60]}]" for i in range(32))
SIGNATURE_SIZE = 4
MIN_GENERATED_LEN = 48  # four codes of 10 bytes and their spaces
SPLIT_FILES = {"train": "train", "val": "eval", "test": "test"}


def generate_document(rng: np.random.Generator, codes: np.ndarray, length: int) -> bytes:
    """Filler text of at most ``length`` bytes with each code of ``codes`` placed once at random."""
    marks = [CODES[c] for c in codes]
    budget = max(0, length - sum(len(m) + 1 for m in marks))
    words: list[str] = []
    used = 0
    for k in rng.integers(0, len(FILLER), size=budget // 3 + 8):
        w = FILLER[k]
        if used + len(w) + 1 > budget:
            break
        words.append(w)
        used += len(w) + 1
    for m in marks:  # insert each code at a uniformly random word slot
        words.insert(int(rng.integers(0, len(words) + 1)), m)
    return " ".join(words).encode("ascii")


def signature(text: bytes) -> frozenset[str]:
    """The set of citation codes in a generated document (a reference "oracle" for tests)."""
    return frozenset(w.decode() for w in text.split() if w.startswith(b"[ref:"))


def generate_pairs(rng: np.random.Generator, n: int, min_len: int, max_len: int) -> tuple[list[bytes], list[bytes], np.ndarray]:
    labels = balanced_labels(rng, n, 2)
    docs1, docs2 = [], []
    pool = len(CODES)
    for y in labels:
        codes1 = rng.choice(pool, size=SIGNATURE_SIZE, replace=False)
        if y == 1:
            codes2 = codes1
        else:
            shared = int(rng.integers(0, SIGNATURE_SIZE))  # 0..3 codes in common
            others = np.setdiff1d(np.arange(pool), codes1)
            codes2 = np.concatenate([rng.choice(codes1, size=shared, replace=False),
                                     rng.choice(others, size=SIGNATURE_SIZE - shared, replace=False)])
        for codes, docs in ((codes1, docs1), (codes2, docs2)):
            docs.append(generate_document(rng, codes, int(rng.integers(min_len, max_len + 1))))
    return docs1, docs2, labels


def write_tsv(path: str | Path, rows: list[tuple[int, str, str, bytes, bytes]]) -> None:
    """Write ``(label, id1, id2, text1, text2)`` rows in the LRA AAN TSV format (no header)."""
    with open(path, "wb") as f:
        for label, id1, id2, t1, t2 in rows:
            for text in (t1, t2):
                if b"\t" in text or b"\n" in text:
                    raise ValueError("AAN TSV texts cannot contain tabs or newlines")
            f.write(b"\t".join([str(float(label)).encode(), id1.encode(), id2.encode(), t1, t2]) + b"\n")


def read_tsv(path: Path, limit: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Read an LRA AAN TSV into byte arrays of both documents and labels (at most ``limit`` rows)."""
    if not path.is_file():
        raise missing_file(path, "AAN TSV file")
    docs1, docs2, labels = [], [], []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip(b"\n").rstrip(b"\r")
            if not line.strip():
                continue
            if limit is not None and len(labels) >= limit:
                break
            fields = line.split(b"\t")
            if len(fields) != 5:
                raise data_error(path, lineno, f"5 tab-separated fields (label, id1, id2, text1, text2), found {len(fields)}",
                                 line[:60])
            try:
                value = float(fields[0])
            except ValueError:
                value = None
            if value not in (0.0, 1.0):
                raise data_error(path, lineno, "a label of 0 or 1 in the first column", fields[0].decode("latin-1"))
            labels.append(int(value))
            docs1.append(np.frombuffer(fields[3], dtype=np.uint8))
            docs2.append(np.frombuffer(fields[4], dtype=np.uint8))
    if not labels and limit != 0:
        raise data_error(path, None, "at least one example", "an empty file")
    return docs1, docs2, labels


@register_task
class RetrievalTask(Task):
    """Two-document byte-level matching (AAN citation links or the synthetic signature stand-in)."""

    name = "retrieval"
    kind = "retrieval"
    vocab_size = BYTE_VOCAB
    num_classes = 2
    default_max_len = 4000
    metric = "accuracy"
    default_sizes = (2000, 200, 200)
    options = {
        "min_len": (None, GENERATE),  # None -> max_len // 2
        "prefix": ("new_aan_pairs", LOAD),
    }

    def _generate(self, *, seed, max_len, sizes, min_len):
        if max_len < MIN_GENERATED_LEN:
            raise ValueError(f"retrieval: the generator needs max_len >= {MIN_GENERATED_LEN} so the codes fit, got {max_len}")
        min_len = max_len // 2 if min_len is None else int(min_len)
        if not 0 <= min_len <= max_len:
            raise ValueError(f"retrieval: need 0 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        out = {}
        for split in ("train", "val", "test"):
            d1, d2, labels = generate_pairs(split_rng(seed, self.name, split), sizes[split], min_len, max_len)
            as_arrays = lambda docs: Ragged([np.frombuffer(d, dtype=np.uint8) for d in docs], np.uint8)  # noqa: E731
            out[split] = RetrievalDataset(as_arrays(d1), as_arrays(d2), labels, shift=1, max_len=max_len)
        return out

    def _load(self, root, *, max_len, sizes, prefix):
        max_len = self.default_max_len if max_len is None else max_len
        out = {}
        for split, suffix in SPLIT_FILES.items():
            d1, d2, labels = read_tsv(root / f"{prefix}.{suffix}.tsv", limit=sizes[split])
            # keep only what can be used: LRA also cuts each text (at 10000 bytes) before encoding
            d1 = [d[:max_len] for d in d1]
            d2 = [d[:max_len] for d in d2]
            out[split] = RetrievalDataset(Ragged(d1, np.uint8), Ragged(d2, np.uint8), labels, shift=1, max_len=max_len)
        return out
