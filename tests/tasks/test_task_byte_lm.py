"""Byte-level LM: windows over a folder of text files, split by a hash of each file's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efficient_transformers.tasks import get_task
from efficient_transformers.tasks import byte_lm as B
from efficient_transformers.tasks.base import decode_bytes


def make_corpus(root, n_files=80, size=300):
    rng = np.random.default_rng(0)
    files = {}
    for i in range(n_files):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        name = f"mod{i}.py" if i % 3 else f"NOTES{i}.TXT"
        data = f"# file {i}\n".encode() + rng.integers(32, 127, size=size, dtype=np.uint8).tobytes()
        (sub / name).write_bytes(data)
        files[f"pkg{i % 4}/{name}"] = data
    (root / "pkg0" / "blob.bin").write_bytes(b"\x00" * 5000)  # not a text extension: ignored
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_bytes(b"never read")
    return files


def stream_of(files: dict, split: str) -> bytes:
    return b"".join(files[rel] for rel in sorted(files) if B.split_of(rel) == split)


def test_windows_cover_each_split_in_order(tmp_path):
    files = make_corpus(tmp_path)
    splits = get_task("byte_lm").datasets(tmp_path, max_len=64)
    for split in ("train", "val", "test"):
        stream = stream_of(files, split)
        ds = splits[split]
        assert len(stream) > 64 and len(ds) == (len(stream) - 1) // 64
        for i in (0, len(ds) - 1):
            item = ds[i]
            assert decode_bytes(item["tokens"]) == stream[i * 64 : i * 64 + 64]
            assert decode_bytes(item["targets"]) == stream[i * 64 + 1 : i * 64 + 65]  # next bytes
            assert item["tokens"].dtype == torch.long and item["tokens"].min() >= 1 and item["tokens"].max() <= 256


def test_split_by_path_hash_is_roughly_90_5_5_and_stable():
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(4000):
        counts[B.split_of(f"dir/file_{i}.py")] += 1
    assert 0.87 < counts["train"] / 4000 < 0.93 and 0.03 < counts["val"] / 4000 < 0.07
    assert B.split_of("dir/file_1.py") == B.split_of("dir/file_1.py")


def test_extensions_and_skipped_folders(tmp_path):
    files = make_corpus(tmp_path)
    only_py = get_task("byte_lm").datasets(tmp_path, max_len=32, extensions=[".py"])
    stream = b"".join(files[r] for r in sorted(files) if r.endswith(".py") and B.split_of(r) == "train")
    assert len(only_py["train"]) == (len(stream) - 1) // 32
    assert decode_bytes(only_py["train"][0]["tokens"]) == stream[:32]
    # upper-case extensions match case-insensitively; "txt" without the dot works too
    txt = get_task("byte_lm").datasets(tmp_path, max_len=32, extensions="txt", num_val=0, num_test=0)
    stream = b"".join(files[r] for r in sorted(files) if r.endswith(".TXT") and B.split_of(r) == "train")
    assert decode_bytes(txt["train"][0]["tokens"]) == stream[:32]
    listed = [rel for rel, _ in B.list_files(tmp_path, (".py", ".txt", ".bin"))]
    assert "pkg0/blob.bin" in listed and not any("site-packages" in r for r in listed)


def test_caps(tmp_path):
    make_corpus(tmp_path)
    splits = get_task("byte_lm").datasets(tmp_path, max_len=16, num_train=5, num_val=2, num_test=1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5, 2, 1]


def test_errors_name_the_folder(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"split"):  # one file cannot fill three splits
        get_task("byte_lm").datasets(tmp_path, max_len=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*\.py"):
        get_task("byte_lm").datasets(empty)
    with pytest.raises(ValueError, match="extensions"):
        get_task("byte_lm").datasets(tmp_path, extensions=[])
    make_corpus(tmp_path / "c")
    with pytest.raises(ValueError, match="at least one window"):
        get_task("byte_lm").datasets(tmp_path / "c", max_len=10_000)


def test_default_corpus_is_the_standard_library():
    splits = get_task("byte_lm").datasets(max_len=128, num_train=8, num_val=2, num_test=2)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    text = decode_bytes(splits["train"][0]["tokens"])
    assert len(text) == 128
    files = B.list_files(B.default_corpus(), B.DEFAULT_EXTENSIONS)
    assert any(rel == "os.py" for rel, _ in files)
    first_train = next(p for rel, p in files if B.split_of(rel) == "train")
    assert first_train.read_bytes()[:128] == text
