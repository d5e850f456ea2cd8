"""Retrieval: the synthetic pairs' label is exactly "same citation signature"; the AAN TSV loader."""

from __future__ import annotations

import numpy as np
import pytest

from efficient_transformers.tasks import get_task
from efficient_transformers.tasks import retrieval as R
from efficient_transformers.tasks.base import decode_bytes


@pytest.fixture(scope="module")
def pairs():
    ds = get_task("retrieval").datasets(seed=0, max_len=600, num_train=200, num_val=0, num_test=0)["train"]
    return [(decode_bytes(ds[i]["tokens"]), decode_bytes(ds[i]["tokens2"]), ds[i]["label"]) for i in range(len(ds))]


def test_label_is_signature_equality(pairs):
    for d1, d2, label in pairs:
        s1, s2 = R.signature(d1), R.signature(d2)
        assert len(s1) == len(s2) == R.SIGNATURE_SIZE
        assert (s1 == s2) == bool(label)


def test_unlinked_pairs_share_some_codes(pairs):
    shared = [len(R.signature(a) & R.signature(b)) for a, b, y in pairs if y == 0]
    assert set(shared) == {0, 1, 2, 3}  # partial overlaps: one code is not enough to decide


def test_codes_are_scattered_and_documents_fit(pairs):
    firsts, lasts = [], []
    for d1, d2, _ in pairs:
        for d in (d1, d2):
            assert 300 - 12 <= len(d) <= 600
            starts = [i / len(d) for i in range(len(d)) if d.startswith(b"[ref:", i)]
            firsts.append(min(starts))
            lasts.append(max(starts))
    # codes are not all at the start: on average the last one is deep into the document
    assert np.mean(lasts) > 0.6 and np.mean(firsts) < 0.4


def test_short_documents_keep_every_code():
    ds = get_task("retrieval").datasets(seed=0, max_len=48, num_train=50, num_val=0, num_test=0)["train"]
    for i in range(len(ds)):
        d1, d2 = decode_bytes(ds[i]["tokens"]), decode_bytes(ds[i]["tokens2"])
        assert len(d1) <= 48 and len(R.signature(d1)) == len(R.signature(d2)) == R.SIGNATURE_SIZE
        assert (R.signature(d1) == R.signature(d2)) == bool(ds[i]["label"])


def test_codes_are_distinct():
    assert len(set(R.CODES)) == len(R.CODES) == 32


# -- the AAN TSV loader ------------------------------------------------------------------------


def write_aan(folder, n=(12, 4, 4), prefix="new_aan_pairs", seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, suffix, k in zip(("train", "val", "test"), ("train", "eval", "test"), n):
        d1, d2, labels = R.generate_pairs(rng, k, 100, 300)
        rows = [(int(y), f"P{i}-A", f"P{i}-B", a, b) for i, (a, b, y) in enumerate(zip(d1, d2, labels))]
        R.write_tsv(folder / f"{prefix}.{suffix}.tsv", rows)
        out[split] = rows
    return out


def test_aan_round_trip(tmp_path):
    rows = write_aan(tmp_path)
    splits = get_task("retrieval").datasets(tmp_path)
    for split, split_rows in rows.items():
        assert len(splits[split]) == len(split_rows)
        for i, (label, _, _, t1, t2) in enumerate(split_rows):
            item = splits[split][i]
            assert item["label"] == label
            assert item["tokens"].tolist() == [b + 1 for b in t1]
            assert item["tokens2"].tolist() == [b + 1 for b in t2]


def test_aan_integer_labels_caps_truncation_and_prefix(tmp_path):
    line = b"1\tid1\tid2\t\xe2\x80\x9cquoted\xe2\x80\x9d \"text\" one\ttext two\n"
    for suffix in ("train", "eval", "test"):
        (tmp_path / f"aan.{suffix}.tsv").write_bytes(line * 3 + b"0\ta\tb\tx\ty\r\n")
    splits = get_task("retrieval").datasets(tmp_path, prefix="aan", num_train=2, max_len=8)
    assert len(splits["train"]) == 2 and len(splits["val"]) == 4
    item = splits["val"][3]
    assert item["label"] == 0 and decode_bytes(item["tokens"]) == b"x" and decode_bytes(item["tokens2"]) == b"y"
    item = splits["train"][0]
    assert item["label"] == 1 and decode_bytes(item["tokens"]) == b"\xe2\x80\x9cquoted"[:8]
    assert len(item["tokens"]) == 8


@pytest.mark.parametrize("bad, what", [
    (b"1.0\tid1\tid2\tonly four fields\n", "5 tab-separated fields"),
    (b"yes\tid1\tid2\tt1\tt2\n", "label of 0 or 1"),
    (b"2.0\tid1\tid2\tt1\tt2\n", "label of 0 or 1"),
])
def test_aan_malformed_rows_name_file_and_line(tmp_path, bad, what):
    write_aan(tmp_path)
    path = tmp_path / "new_aan_pairs.eval.tsv"
    path.write_bytes(path.read_bytes() + bad)
    with pytest.raises(ValueError) as e:
        get_task("retrieval").datasets(tmp_path)
    assert "new_aan_pairs.eval.tsv:5" in str(e.value) and what in str(e.value)


def test_aan_missing_and_empty_files(tmp_path):
    write_aan(tmp_path)
    (tmp_path / "new_aan_pairs.test.tsv").write_bytes(b"")
    with pytest.raises(ValueError, match="new_aan_pairs.test.tsv"):
        get_task("retrieval").datasets(tmp_path)
    (tmp_path / "new_aan_pairs.test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="new_aan_pairs.test.tsv"):
        get_task("retrieval").datasets(tmp_path)


def test_writer_refuses_tabs():
    with pytest.raises(ValueError, match="tabs"):
        R.write_tsv("/dev/null", [(1, "a", "b", b"has\ttab", b"ok")])
