"""The fixed task interface, checked on every registered task with tiny generated data."""

from __future__ import annotations

import pytest
import torch

from efficient_transformers.tasks import get_task, task_names
from efficient_transformers.tasks.base import Ragged, decode_bytes, encode_bytes, pad_sequences

EXPECTED = {
    # name: (kind, vocab_size, num_classes, default_max_len, metric)
    "listops": ("classification", 16, 10, 2000, "accuracy"),
    "text": ("classification", 257, 2, 4000, "accuracy"),
    "retrieval": ("retrieval", 257, 2, 4000, "accuracy"),
    "image": ("classification", 257, 10, 1024, "accuracy"),
    "pathfinder": ("classification", 257, 2, 1024, "accuracy"),
    "byte_lm": ("language_model", 257, None, 1024, "bits_per_byte"),
}

# small, fast settings for each task's generator (byte_lm reads the stdlib: capped)
SMALL = {
    "listops": dict(max_len=120, num_train=24, num_val=8, num_test=8),
    "text": dict(max_len=400, num_train=24, num_val=8, num_test=8),
    "retrieval": dict(max_len=300, num_train=24, num_val=8, num_test=8),
    "image": dict(num_train=24, num_val=8, num_test=8),
    "pathfinder": dict(num_train=12, num_val=4, num_test=4),
    "byte_lm": dict(max_len=64, num_train=24, num_val=8, num_test=8),
}

_CACHE: dict = {}


def small_splits(name: str, seed: int = 0):
    key = (name, seed)
    if key not in _CACHE:
        _CACHE[key] = get_task(name).datasets(seed=seed, **SMALL[name])
    return _CACHE[key]


def items(ds):
    return [ds[i] for i in range(len(ds))]


def same_items(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], torch.Tensor):
                if not torch.equal(x[k], y[k]):
                    return False
            elif x[k] != y[k]:
                return False
    return True


# tasks of sets of continuous vectors (no tokens): their interface is tested in their own files
SET_TASKS = ("max_of_set",)


def test_task_names_in_order():
    assert task_names() == list(EXPECTED) + list(SET_TASKS)


def test_unknown_task_names_the_bad_and_the_allowed():
    with pytest.raises(ValueError) as e:
        get_task("listopz")
    assert "listopz" in str(e.value) and "pathfinder" in str(e.value)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_attributes(name):
    task = get_task(name)
    kind, vocab, classes, max_len, metric = EXPECTED[name]
    assert (task.name, task.kind, task.vocab_size, task.num_classes, task.default_max_len, task.metric) == (
        name, kind, vocab, classes, max_len, metric)
    assert task.pad_id == 0


@pytest.mark.parametrize("name", list(EXPECTED))
def test_unknown_option_is_named(name):
    with pytest.raises(ValueError) as e:
        get_task(name).datasets(seed=0, bogus_option=3, **SMALL[name])
    assert "bogus_option" in str(e.value) and "allowed" in str(e.value)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_items_and_collate(name):
    task = get_task(name)
    splits = small_splits(name)
    assert list(splits) == ["train", "val", "test"]
    for split, n in zip(("train", "val", "test"), (SMALL[name]["num_train"], SMALL[name]["num_val"], SMALL[name]["num_test"])):
        assert len(splits[split]) == n
    its = items(splits["train"])
    max_len = SMALL[name].get("max_len", task.default_max_len)
    for it in its:
        assert it["tokens"].dtype == torch.long and it["tokens"].dim() == 1
        seqs = [it["tokens"]] + ([it["tokens2"]] if task.kind == "retrieval" else [])
        for s in seqs:
            assert 1 <= len(s) <= max_len
            assert int(s.min()) >= 1 and int(s.max()) < task.vocab_size  # 0 (PAD) is never a real token
        if task.kind == "language_model":
            assert it.keys() == {"tokens", "targets"}
            assert len(it["tokens"]) == max_len
            assert torch.equal(it["tokens"][1:], it["targets"][:-1])  # targets are the next bytes
        else:
            assert isinstance(it["label"], int) and 0 <= it["label"] < task.num_classes
    batch = task.collate(its[:5])
    B = 5
    N = max(len(it["tokens"]) for it in its[:5])
    assert batch["tokens"].shape == (B, N) and batch["tokens"].dtype == torch.long
    assert batch["mask"].shape == (B, N) and batch["mask"].dtype == torch.bool
    for b, it in enumerate(its[:5]):
        n = len(it["tokens"])
        assert torch.equal(batch["tokens"][b, :n], it["tokens"])
        assert batch["mask"][b, :n].all() and not batch["mask"][b, n:].any()
        assert (batch["tokens"][b, n:] == task.pad_id).all()
    if task.kind == "language_model":
        assert set(batch) == {"tokens", "targets", "mask"} and batch["targets"].shape == (B, N)
    else:
        assert batch["label"].tolist() == [it["label"] for it in its[:5]] and batch["label"].dtype == torch.long
    if task.kind == "retrieval":
        M = max(len(it["tokens2"]) for it in its[:5])
        assert batch["tokens2"].shape == (B, M) and batch["mask2"].shape == (B, M)
        assert batch["mask2"].sum(1).tolist() == [len(it["tokens2"]) for it in its[:5]]


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "byte_lm"])
def test_generators_are_deterministic_and_seeded(name):
    a = small_splits(name, seed=0)
    b = get_task(name).datasets(seed=0, **SMALL[name])
    c = small_splits(name, seed=1)
    for split in ("train", "val", "test"):
        assert same_items(items(a[split]), items(b[split]))
        assert not same_items(items(a[split]), items(c[split]))
    # splits differ from each other
    assert not same_items(items(a["train"])[:8], items(a["val"]))


@pytest.mark.parametrize("name", ["listops", "text", "retrieval", "image", "pathfinder"])
def test_val_and_test_do_not_depend_on_num_train(name):
    base = small_splits(name)
    more = get_task(name).datasets(seed=0, **{**SMALL[name], "num_train": SMALL[name]["num_train"] + 5})
    assert same_items(items(base["val"]), items(more["val"]))
    assert same_items(items(base["test"]), items(more["test"]))
    assert same_items(items(base["train"]), items(more["train"])[: len(base["train"])])


@pytest.mark.parametrize("name", ["text", "retrieval", "image", "pathfinder"])  # ListOps: see its own tests
def test_generated_labels_are_balanced(name):
    task = get_task(name)
    ds = small_splits(name)["train"]
    counts = torch.bincount(torch.tensor([ds[i]["label"] for i in range(len(ds))]), minlength=task.num_classes)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("name", list(EXPECTED))
def test_empty_splits_are_allowed(name):
    splits = get_task(name).datasets(seed=0, **{**SMALL[name], "num_val": 0, "num_test": 0})
    assert len(splits["val"]) == len(splits["test"]) == 0 and len(splits["train"]) == SMALL[name]["num_train"]


def test_max_len_truncates_image_tokens():
    ds = get_task("image").datasets(seed=0, max_len=100, num_train=3, num_val=1, num_test=1)["train"]
    full = get_task("image").datasets(seed=0, num_train=3, num_val=1, num_test=1)["train"]
    assert len(ds[0]["tokens"]) == 100 and torch.equal(ds[0]["tokens"], full[0]["tokens"][:100])


def test_bad_sizes_and_lengths_are_rejected():
    task = get_task("image")
    with pytest.raises(ValueError, match="max_len"):
        task.datasets(max_len=0)
    with pytest.raises(ValueError, match="num_train"):
        task.datasets(num_train=-1)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        task.datasets("/tmp/definitely/no_such_dir")


def test_loader_only_option_is_refused_for_the_generator():
    with pytest.raises(ValueError, match="prefix"):
        get_task("listops").datasets(prefix="basic", max_len=100, num_train=2, num_val=1, num_test=1)


def test_index_errors():
    ds = small_splits("image")["val"]
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert torch.equal(ds[-1]["tokens"], ds[len(ds) - 1]["tokens"])


def test_byte_encoding_round_trip():
    data = bytes(range(256))
    tokens = encode_bytes(data)
    assert tokens.min() == 1 and tokens.max() == 256 and decode_bytes(tokens) == data
    assert decode_bytes(torch.tensor([66, 67, 0, 0])) == b"AB"  # padding is dropped
    with pytest.raises(ValueError):
        decode_bytes([300])


def test_pad_sequences_and_ragged():
    tokens, mask = pad_sequences([torch.tensor([3, 4, 5]), torch.tensor([], dtype=torch.long)])
    assert tokens.tolist() == [[3, 4, 5], [0, 0, 0]] and mask.tolist() == [[True] * 3, [False] * 3]
    tokens, mask = pad_sequences([torch.tensor([], dtype=torch.long)])
    assert tokens.shape == (1, 1) and not mask.any()  # never a zero-width batch
    r = Ragged([[1, 2], [], [3]])
    assert len(r) == 3 and r[0].tolist() == [1, 2] and r[1].tolist() == [] and r[2].tolist() == [3]
    with pytest.raises(ValueError, match="empty"):
        get_task("text").collate([])


def test_tasks_import_nothing_else_from_the_package():
    """Tasks only make and load data: no imports of models, attention, bench, train, core, ..."""
    import ast
    import sys
    from pathlib import Path

    import efficient_transformers.tasks as pkg

    allowed = set(sys.stdlib_module_names) | {"numpy", "torch", "PIL"}
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only siblings inside tasks/
                    assert node.level == 1, f"{path.name}:{node.lineno} reaches outside tasks/"
                    continue
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for m in modules:
                assert m.split(".")[0] in allowed, f"{path.name}:{node.lineno} imports {m}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_datasets_and_collate_pickle_for_dataloader_workers(name):
    import pickle

    task = get_task(name)
    ds = small_splits(name)["val"]
    copy = pickle.loads(pickle.dumps(ds))
    assert same_items(items(ds), items(copy))
    collate = pickle.loads(pickle.dumps(task.collate))
    assert torch.equal(collate(items(ds))["tokens"], task.collate(items(ds))["tokens"])
