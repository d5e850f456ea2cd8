"""Byte-level text classification (LRA "Text"): IMDb reviews as raw bytes, 2 classes.

Tokens are ``byte + 1`` (vocabulary 257, 0 = PAD); sequences are truncated to ``max_len`` bytes
(default 4000, the LRA paper's 4K; LRA's released config used 1000).

Official format: the IMDb ``aclImdb`` folder, ``aclImdb/{train,test}/{pos,neg}/*.txt`` (``data_dir``
may be the folder holding ``aclImdb`` or ``aclImdb`` itself); label 1 = pos, 0 = neg (as in TFDS
``imdb_reviews``). Each split's files are put in a fixed order that does not depend on ``seed``:
each class's sorted files shuffled by a fixed permutation, then the classes interleaved, so any
prefix is balanced. The validation split is the first ``val_fraction`` (10%) of the training files
in that order; ``num_*`` caps take prefixes. Files are read as bytes, without decoding.

Generator (``data_dir=None``) — a SYNTHETIC stand-in, not IMDb: each document is noise text made of
neutral English words with a few sentiment cue words scattered uniformly through it. The majority
class has 5-11 cue words (fewer when ``max_len`` < 264: at most one per 24 bytes of ``max_len``)
and the minority 1-3 fewer; the label is the class with more cue words.
Because the margin is small and the cues are spread over the whole document, a prefix (say the
first 10%) says almost nothing about the label, while counting over the whole text gives it
exactly. Lengths are uniform in ``[min_len, max_len]`` bytes (``min_len`` defaults to
``max_len // 2``; ``max_len`` must be at least 64). Labels are balanced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (
    BYTE_VOCAB,
    GENERATE,
    LOAD,
    ClassificationDataset,
    Ragged,
    Task,
    balanced_labels,
    data_error,
    fixed_permutation,
    register_task,
    require_dir,
    split_rng,
)

POSITIVE_CUES = ("good", "great", "superb", "brilliant", "wonderful", "enjoyable", "delightful", "moving")
NEGATIVE_CUES = ("bad", "awful", "terrible", "boring", "dreadful", "tedious", "clumsy", "weak")
CUES = (NEGATIVE_CUES, POSITIVE_CUES)  # indexed by label: 0 = negative, 1 = positive

# Neutral filler; none contains a cue word as a substring (tested).
FILLER = tuple("""
the a film movie story actor scene plot director camera music character and of to in is was it this
that with for as on at by an be his her their which from when while after before about there into
then some many long short first last other new old city house night day time year life world family
friend man woman child war love road water light dark red blue green small large early late slow
fast quiet loud open line part end start role cast script screen sound shot cut frame set show play
series version ending opening dialogue audience critic studio budget minute hour sequel genre drama
comedy western thriller mystery romance documentary animation feature moment place street town
country river forest train car letter phone door window table room garden school office doctor
soldier police king queen village island summer winter""".split())

MIN_GENERATED_LEN = 64
CUE_BYTES = 24  # at most one majority cue per CUE_BYTES of max_len, so every cue always fits


def max_cues(max_len: int) -> int:
    """The most majority-class cues a document of at most ``max_len`` bytes gets (11 from 264 on)."""
    return min(11, max(2, max_len // CUE_BYTES))


def generate_review(rng: np.random.Generator, label: int, length: int, most: int = 11) -> bytes:
    """One synthetic document of about ``length`` bytes (never more, unless the cues alone are
    longer) whose label is ``label``; the majority class has ``most - 6`` to ``most`` cues (at
    least 2) and the minority 1 to 3 fewer."""
    n_major = int(rng.integers(max(2, most - 6), most + 1))
    n_minor = n_major - int(rng.integers(1, min(3, n_major) + 1))
    counts = (n_minor, n_major) if label == 1 else (n_major, n_minor)
    cues = [CUES[c][k] for c in (0, 1) for k in rng.integers(0, len(CUES[c]), size=counts[c])]
    cue_bytes = sum(len(w) + 1 for w in cues)
    budget = max(0, length - cue_bytes)  # bytes left for filler (each word costs len + 1 space)
    picks = rng.integers(0, len(FILLER), size=budget // 3 + 8)
    words: list[str] = []
    used = 0
    for k in picks:
        w = FILLER[k] + ("." if rng.random() < 0.08 else "")
        if used + len(w) + 1 > budget:
            break
        words.append(w)
        used += len(w) + 1
    # scatter the cues uniformly over the filler word slots
    slots = np.sort(rng.integers(0, len(words) + 1, size=len(cues)))
    order = rng.permutation(len(cues))
    out: list[str] = []
    j = 0
    for pos in range(len(words) + 1):
        while j < len(cues) and slots[j] == pos:
            out.append(cues[order[j]])
            j += 1
        if pos < len(words):
            out.append(words[pos])
    text = " ".join(out).encode("ascii")
    assert len(text) <= max(length, cue_bytes)
    return text


def cue_label(text: bytes) -> int | None:
    """The label by counting cue words (1 = more positive); None on a tie. Used by tests and as a
    reference "oracle" classifier for the generated data."""
    words = [w.strip(b".") for w in text.split()]
    pos = sum(w.decode() in POSITIVE_CUES for w in words)
    neg = sum(w.decode() in NEGATIVE_CUES for w in words)
    return None if pos == neg else int(pos > neg)


def generate_reviews(rng: np.random.Generator, n: int, min_len: int, max_len: int) -> tuple[list[bytes], np.ndarray]:
    labels = balanced_labels(rng, n, 2)
    most = max_cues(max_len)
    docs = [generate_review(rng, int(y), int(rng.integers(min_len, max_len + 1)), most) for y in labels]
    return docs, labels


def write_imdb(root: str | Path, splits: dict[str, tuple[list[bytes], np.ndarray]]) -> None:
    """Write documents in the ``aclImdb/{split}/{pos,neg}/{id}_{rating}.txt`` layout (for tests and
    for exporting generated data); ``splits`` maps "train"/"test" to (docs, labels)."""
    for split, (docs, labels) in splits.items():
        for cls in ("pos", "neg"):
            (Path(root) / "aclImdb" / split / cls).mkdir(parents=True, exist_ok=True)
        for i, (doc, y) in enumerate(zip(docs, labels)):
            cls, rating = ("pos", 8) if y == 1 else ("neg", 2)
            (Path(root) / "aclImdb" / split / cls / f"{i}_{rating}.txt").write_bytes(doc)


def _list_split(base: Path, split: str) -> list[tuple[Path, int]]:
    """The files of one IMDb split: each class's sorted files in a fixed shuffled order, then the
    two classes interleaved (neg, pos, neg, pos, ...), so every prefix is balanced."""
    per_class = []
    for cls, label in (("neg", 0), ("pos", 1)):
        folder = require_dir(base / split / cls, "IMDb folder")
        files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise data_error(folder, None, "review files *.txt", "an empty folder")
        per_class.append([(files[j], label) for j in fixed_permutation(len(files))])
    longest = max(len(c) for c in per_class)
    return [c[i] for i in range(longest) for c in per_class if i < len(c)]


def _read(items: list[tuple[Path, int]], limit: int | None, max_len: int) -> tuple[Ragged, list[int]]:
    items = items if limit is None else items[:limit]
    docs = [np.frombuffer(p.read_bytes()[:max_len], dtype=np.uint8) for p, _ in items]
    return Ragged(docs, np.uint8), [y for _, y in items]


@register_task
class TextTask(Task):
    """Byte-level review classification (IMDb or the synthetic cue-word stand-in), 2 classes."""

    name = "text"
    kind = "classification"
    vocab_size = BYTE_VOCAB
    num_classes = 2
    default_max_len = 4000
    metric = "accuracy"
    default_sizes = (2000, 200, 200)
    options = {
        "min_len": (None, GENERATE),  # None -> max_len // 2
        "val_fraction": (0.1, LOAD),
    }

    def _generate(self, *, seed, max_len, sizes, min_len):
        if max_len < MIN_GENERATED_LEN:
            raise ValueError(f"text: the generator needs max_len >= {MIN_GENERATED_LEN} so every cue fits, got {max_len}")
        min_len = max_len // 2 if min_len is None else int(min_len)
        if not 0 <= min_len <= max_len:
            raise ValueError(f"text: need 0 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        out = {}
        for split in ("train", "val", "test"):
            docs, labels = generate_reviews(split_rng(seed, self.name, split), sizes[split], min_len, max_len)
            seqs = [np.frombuffer(d, dtype=np.uint8) for d in docs]
            out[split] = ClassificationDataset(Ragged(seqs, np.uint8), labels, shift=1, max_len=max_len)
        return out

    def _load(self, root, *, max_len, sizes, val_fraction):
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"text: val_fraction must lie in [0, 1), got {val_fraction!r}")
        max_len = self.default_max_len if max_len is None else max_len
        base = root / "aclImdb" if (root / "aclImdb").is_dir() else root
        train = _list_split(base, "train")
        test = _list_split(base, "test")
        n_val = int(round(len(train) * float(val_fraction)))
        parts = {"train": train[n_val:], "val": train[:n_val], "test": test}
        out = {}
        for split, items in parts.items():
            tokens, labels = _read(items, sizes[split], max_len)
            out[split] = ClassificationDataset(tokens, labels, shift=1, max_len=max_len)
        return out
