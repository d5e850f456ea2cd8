"""Byte-level text: the synthetic generator's label needs the whole document; the IMDb loader reads
the aclImdb layout."""

from __future__ import annotations

import numpy as np
import pytest

from efficient_transformers.tasks import get_task
from efficient_transformers.tasks import text as T
from efficient_transformers.tasks.base import decode_bytes


@pytest.fixture(scope="module")
def docs():
    ds = get_task("text").datasets(seed=0, max_len=1000, num_train=600, num_val=0, num_test=0)["train"]
    return [(decode_bytes(ds[i]["tokens"]), ds[i]["label"]) for i in range(len(ds))]


def prefix_accuracy(docs, fraction: float) -> float:
    """Accuracy of the cue-count rule on the first ``fraction`` of each document (ties: 1/2)."""
    scores = []
    for text, label in docs:
        guess = T.cue_label(text[: int(len(text) * fraction)])
        scores.append(0.5 if guess is None else float(guess == label))
    return float(np.mean(scores))


def test_filler_never_contains_a_cue():
    for word in T.FILLER:
        for cue in T.POSITIVE_CUES + T.NEGATIVE_CUES:
            assert cue not in word, (word, cue)


def test_label_is_the_cue_majority_of_the_whole_text(docs):
    assert all(T.cue_label(text) == label for text, label in docs)


def test_a_prefix_does_not_give_the_label(docs):
    # the cue rule is exact on the whole text but near chance on the first 10%
    assert prefix_accuracy(docs, 1.0) == 1.0
    assert prefix_accuracy(docs, 0.1) < 0.62
    assert prefix_accuracy(docs, 0.1) < prefix_accuracy(docs, 0.5) < 1.0


def test_cues_are_spread_over_the_whole_text(docs):
    positions = []
    for text, _ in docs:
        words = text.split()
        offsets = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
        positions += [off / len(text) for w, off in zip(words, offsets)
                      if w.strip(b".").decode() in T.POSITIVE_CUES + T.NEGATIVE_CUES]
    hist = np.histogram(positions, bins=10, range=(0, 1))[0] / len(positions)
    assert hist.min() > 0.07 and hist.max() < 0.13  # roughly uniform over the deciles


def test_lengths_and_bytes(docs):
    lengths = [len(t) for t, _ in docs]
    assert min(lengths) >= 500 - 12 and max(lengths) <= 1000  # min_len defaults to max_len // 2
    assert all(t.isascii() for t, _ in docs)


@pytest.mark.parametrize("max_len", [64, 100, 263])
def test_short_documents_keep_every_cue(max_len):
    ds = get_task("text").datasets(seed=0, max_len=max_len, num_train=200, num_val=0, num_test=0)["train"]
    for i in range(len(ds)):
        text = decode_bytes(ds[i]["tokens"])
        assert len(text) <= max_len and T.cue_label(text) == ds[i]["label"]


def test_generator_rejects_too_short_max_len():
    with pytest.raises(ValueError, match="max_len"):
        get_task("text").datasets(max_len=40, num_train=2, num_val=1, num_test=1)
    with pytest.raises(ValueError, match="max_len"):
        get_task("retrieval").datasets(max_len=40, num_train=2, num_val=1, num_test=1)


# -- the IMDb loader ---------------------------------------------------------------------------


def make_imdb(root, n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    train = T.generate_reviews(rng, n_train, 300, 600)
    test = T.generate_reviews(rng, n_test, 300, 600)
    # a non-ASCII review: bytes are read as they are
    train[0][0] = "Un film très émouvant <br /><br />".encode("utf-8") + train[0][0]
    T.write_imdb(root, {"train": train, "test": test})
    return train, test


def test_imdb_layout_round_trip(tmp_path):
    train, test = make_imdb(tmp_path)
    splits = get_task("text").datasets(tmp_path)  # the folder holding aclImdb
    again = get_task("text").datasets(tmp_path / "aclImdb")  # or aclImdb itself
    assert [len(splits[s]) for s in ("train", "val", "test")] == [36, 4, 20]
    source = {bytes(d): int(y) for d, y in zip(*train)}
    seen = []
    for split in ("train", "val"):
        for i in range(len(splits[split])):
            item = splits[split][i]
            doc = decode_bytes(item["tokens"])
            assert source[doc] == item["label"]
            assert item["tokens"].min() >= 1
            assert item["tokens"].tolist() == again[split][i]["tokens"].tolist()
            seen.append(doc)
    assert sorted(seen) == sorted(source)  # val carved from train: disjoint, and together all of it
    test_docs = {bytes(d): int(y) for d, y in zip(*test)}
    for i in range(len(splits["test"])):
        assert test_docs[decode_bytes(splits["test"][i]["tokens"])] == splits["test"][i]["label"]
    # token = byte + 1
    raw = sorted(source)[0]
    for split in ("train", "val"):
        for i in range(len(splits[split])):
            if decode_bytes(splits[split][i]["tokens"]) == raw:
                assert splits[split][i]["tokens"].tolist() == [b + 1 for b in raw]


def test_imdb_capped_splits_hold_both_classes_and_val_is_stable(tmp_path):
    make_imdb(tmp_path)
    a = get_task("text").datasets(tmp_path, num_test=6, seed=0)
    b = get_task("text").datasets(tmp_path, num_test=6, seed=1, val_fraction=0.1)
    assert sorted(a["test"][i]["label"] for i in range(6)) == [0, 0, 0, 1, 1, 1]  # capped prefixes stay balanced
    assert sorted(a["val"][i]["label"] for i in range(4)) == [0, 0, 1, 1]
    # the val split does not depend on the training seed
    assert [a["val"][i]["tokens"].tolist() for i in range(4)] == [b["val"][i]["tokens"].tolist() for i in range(4)]
    c = get_task("text").datasets(tmp_path, val_fraction=0.25)
    assert len(c["val"]) == 10 and len(c["train"]) == 30


def test_imdb_truncates_to_max_len(tmp_path):
    make_imdb(tmp_path)
    ds = get_task("text").datasets(tmp_path, max_len=50)["train"]
    assert max(len(ds[i]["tokens"]) for i in range(len(ds))) == 50


def test_imdb_missing_and_empty_folders(tmp_path):
    make_imdb(tmp_path)
    for f in (tmp_path / "aclImdb" / "test" / "neg").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"test[/\\]neg.*\*\.txt"):
        get_task("text").datasets(tmp_path)
    (tmp_path / "aclImdb" / "test" / "neg").rmdir()
    with pytest.raises(FileNotFoundError, match=r"test[/\\]neg"):
        get_task("text").datasets(tmp_path)
