"""ListOps: the LRA sample loads unchanged and agrees with our evaluator; the generator follows the
LRA grammar and emits what the loader would read from the same TSV."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from efficient_transformers.tasks import get_task
from efficient_transformers.tasks import listops as L

LRA_DIR = Path("/work/shared/data/listops-lra")
ID_TO_WORD = {i: w for w, i in L.TOKEN_ID.items()}

needs_lra_sample = pytest.mark.skipif(not (LRA_DIR / "basic_train.tsv").is_file(),
                                      reason="LRA ListOps sample not present on this machine")


def words_of(tokens) -> list[str]:
    return [ID_TO_WORD[t] for t in tokens.tolist()]


def structure(words: list[str]) -> tuple[int, list[int]]:
    """(deepest operator nesting, argument count of every operator) of a token list."""
    depth = deepest = 0
    stack, arities = [], []
    for w in words:
        if w in L.OPERATORS:
            depth += 1
            deepest = max(deepest, depth)
            if stack:
                stack[-1] += 1
            stack.append(0)
        elif w == "X":
            depth -= 1
            arities.append(stack.pop())
        elif stack:
            stack[-1] += 1
    return deepest, arities


def read_rows(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "Source\tTarget"
    return [(src, int(tgt)) for src, tgt in (line.split("\t") for line in lines[1:] if line)]


@pytest.fixture(scope="module")
def lra_splits():
    return get_task("listops").datasets(LRA_DIR)


@pytest.fixture(scope="module")
def generated():
    # default LRA lengths (500..2000), a few hundred examples
    return get_task("listops").datasets(seed=0, num_train=300, num_val=0, num_test=0)["train"]


# -- the LRA sample ----------------------------------------------------------------------------


@needs_lra_sample
def test_lra_sample_loads_unchanged(lra_splits):
    assert {s: len(d) for s, d in lra_splits.items()} == {"train": 400, "val": 100, "test": 100}
    for split, ds in lra_splits.items():
        rows = read_rows(LRA_DIR / f"basic_{split}.tsv")
        for i, (src, tgt) in enumerate(rows):
            item = ds[i]
            assert item["label"] == tgt
            # the preprocessing: ']' -> 'X', parentheses dropped, whitespace split
            expected = src.replace("]", "X").replace("(", "").replace(")", "").split()
            assert words_of(item["tokens"]) == expected
            assert 500 < len(expected) < 2000  # LRA's length window, counted after preprocessing


@needs_lra_sample
def test_lra_targets_equal_our_evaluation(lra_splits):
    for split, ds in lra_splits.items():
        for i in range(len(ds)):
            item = ds[i]
            assert L.evaluate_tokens(words_of(item["tokens"])) == item["label"], (split, i)


@needs_lra_sample
def test_lra_sample_obeys_the_grammar_we_generate(lra_splits):
    deepest_all = 0
    for ds in lra_splits.values():
        for i in range(len(ds)):
            deepest, arities = structure(words_of(ds[i]["tokens"]))
            deepest_all = max(deepest_all, deepest)
            assert min(arities) >= 2 and max(arities) <= 10
    # root at depth 1, leaves forced at depth 10: operators nest at most 9 deep, and LRA reaches it
    assert deepest_all == 9


@needs_lra_sample
def test_generator_matches_lra_statistics(lra_splits, generated):
    lra_len = np.concatenate([d.tokens.lengths() for d in lra_splits.values()])
    lra_lab = np.concatenate([d.labels for d in lra_splits.values()])
    ours_len, ours_lab = generated.tokens.lengths(), generated.labels
    assert abs(ours_len.mean() - lra_len.mean()) < 0.1 * lra_len.mean()
    # MIN and MAX pull values to the extremes: 0 and 9 are the two most frequent targets in both
    assert set(np.argsort(np.bincount(lra_lab, minlength=10))[-2:]) == {0, 9}
    assert set(np.argsort(np.bincount(ours_lab, minlength=10))[-2:]) == {0, 9}
    assert np.bincount(ours_lab, minlength=10).min() > 0


# A 16-row excerpt of the LRA sample's basic_val.tsv (its shortest rows; made by LRA's own
# generator), bundled so that the agreement with LRA is checked on every machine.
EXCERPT = Path(__file__).parent / "data" / "lra_listops_excerpt.tsv"


def test_bundled_lra_excerpt_loads_and_evaluates(tmp_path):
    for split in ("train", "val", "test"):
        (tmp_path / f"basic_{split}.tsv").write_bytes(EXCERPT.read_bytes())
    ds = get_task("listops").datasets(tmp_path)["val"]
    rows = read_rows(EXCERPT)
    assert len(ds) == len(rows) == 16
    for i, (src, tgt) in enumerate(rows):
        words = words_of(ds[i]["tokens"])
        assert words == src.replace("]", "X").replace("(", "").replace(")", "").split()
        assert ds[i]["label"] == tgt == L.evaluate_tokens(words) == L.evaluate(src)
        deepest, arities = structure(words)
        assert deepest <= 9 and 2 <= min(arities) and max(arities) <= 10


# -- the evaluator -----------------------------------------------------------------------------


@pytest.mark.parametrize("source, value", [
    ("( ( ( ( [MAX ( ( ( ( [SM 4 ) 6 ) 8 ) ] ) ) 8 ) 9 ) ] )", 9),  # the example in the survey
    ("[MIN 7 3 5 ]", 3),
    ("[MAX 7 3 5 ]", 7),
    ("[SM 9 9 9 ]", 7),
    ("[MED 1 2 ]", 1),  # int(median(1, 2)) = int(1.5)
    ("[MED 3 8 1 6 ]", 4),  # int(4.5)
    ("[MED 5 0 9 ]", 5),
    ("[MIN [MAX 1 2 ] [SM 5 6 ] ]", 1),
    ("4", 4),
])
def test_evaluate(source, value):
    assert L.evaluate(source) == value


@pytest.mark.parametrize("source", ["[MAX 4 9", "4 5", "[MAX ]", "] 4", "[FOO 1 2 ]", ""])
def test_evaluate_rejects_malformed(source):
    with pytest.raises(ValueError):
        L.evaluate(source)


def test_tree_rendering_matches_lra_format():
    tree = ("[MAX", [("[SM", [4, 6, 8]), 8, 9])
    assert L.to_source(tree) == "( ( ( ( [MAX ( ( ( ( [SM 4 ) 6 ) 8 ) ] ) ) 8 ) 9 ) ] )"
    assert L.evaluate(tree) == L.evaluate(L.to_source(tree)) == 9


# -- the generator -----------------------------------------------------------------------------


def test_generated_examples_follow_grammar_and_length_window():
    rows = L.generate_examples(random.Random(5), 150, min_len=40, max_len=160)
    sources = [s for s, _ in rows]
    assert len(set(sources)) == len(sources)
    for src, target in rows:
        words = L.tokenize_source(src)
        assert 40 < len(words) < 160
        deepest, arities = structure(words)
        assert deepest <= 9 and min(arities) >= 2 and max(arities) <= 10
        assert L.evaluate_tokens(words) == target


def test_max_depth_and_max_args_options_bind():
    ds = get_task("listops").datasets(seed=1, max_len=60, num_train=60, num_val=0, num_test=0,
                                      min_len=8, max_depth=3, max_args=3)["train"]
    for i in range(len(ds)):
        deepest, arities = structure(words_of(ds[i]["tokens"]))
        assert deepest <= 2 and max(arities) <= 3
        assert L.evaluate_tokens(words_of(ds[i]["tokens"])) == ds[i]["label"]


def test_generator_emits_what_the_loader_reads(tmp_path):
    sizes = {"train": 30, "val": 10, "test": 10}
    rows = L.generate_splits(7, sizes, max_len=150)
    for split, split_rows in rows.items():
        L.write_tsv(tmp_path / f"basic_{split}.tsv", split_rows)
    loaded = get_task("listops").datasets(tmp_path)
    made = get_task("listops").datasets(seed=7, max_len=150, num_train=30, num_val=10, num_test=10)
    for split in ("train", "val", "test"):
        assert len(loaded[split]) == len(made[split]) == sizes[split]
        for i in range(sizes[split]):
            assert loaded[split][i]["tokens"].tolist() == made[split][i]["tokens"].tolist()
            assert loaded[split][i]["label"] == made[split][i]["label"]
    all_sources = [s for r in rows.values() for s, _ in r]
    assert len(set(all_sources)) == len(all_sources)  # no example shared between splits


def test_bad_length_options():
    with pytest.raises(ValueError, match="min_len"):
        get_task("listops").datasets(max_len=100, min_len=99, num_train=1, num_val=1, num_test=1)


# -- the loader --------------------------------------------------------------------------------


def write_split_files(folder: Path, train_text: str, prefix: str = "basic") -> None:
    good = "Source\tTarget\n( ( ( [MAX 4 ) 9 ) ] )\t9\n"
    (folder / f"{prefix}_train.tsv").write_bytes(train_text.encode("utf-8", "surrogateescape"))
    (folder / f"{prefix}_val.tsv").write_text(good)
    (folder / f"{prefix}_test.tsv").write_text(good)


@pytest.mark.parametrize("text, line, what", [
    ("Src\tTgt\n4\t4\n", 1, "header"),
    ("Source\tTarget\n( ( [MIN 1 ) ] )\t1\n( [MAX 4 ] )\n", 3, "2 tab-separated fields"),
    ("Source\tTarget\n( ( [MIN 1 ) ] )\t1\n( ( [AVG 1 ) ] )\t1\n", 3, "unknown ListOps token"),
    ("Source\tTarget\n( ( [MIN 1 ) ] )\t12\n", 2, "Target digit"),
    ("", None, "at least one example"),
    ("Source\tTarget\n( ( [MIN 1 ) ] )\t1\n\udcff\t1\n", 3, "UTF-8"),
])
def test_malformed_tsv_names_file_and_line(tmp_path, text, line, what):
    write_split_files(tmp_path, text)
    with pytest.raises(ValueError) as e:
        get_task("listops").datasets(tmp_path)
    msg = str(e.value)
    where = f"basic_train.tsv:{line}" if line is not None else "basic_train.tsv"
    assert where in msg and what in msg


def test_missing_file_is_named(tmp_path):
    write_split_files(tmp_path, "Source\tTarget\n( [MAX 4 ] )\t4\n")
    (tmp_path / "basic_val.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="basic_val.tsv"):
        get_task("listops").datasets(tmp_path)


def test_prefix_caps_and_truncation(tmp_path):
    rows = L.generate_examples(random.Random(0), 12, min_len=30, max_len=80)
    L.write_tsv(tmp_path / "deep_train.tsv", rows)
    L.write_tsv(tmp_path / "deep_val.tsv", rows[:3])
    L.write_tsv(tmp_path / "deep_test.tsv", rows[3:6])
    splits = get_task("listops").datasets(tmp_path, prefix="deep", num_train=5, max_len=20)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5, 3, 3]
    for i in range(5):
        tokens = splits["train"][i]["tokens"]
        assert len(tokens) == 20
        assert tokens.tolist() == L.encode_source(rows[i][0])[:20].tolist()
    with pytest.raises(ValueError, match="min_len"):  # a generator option, refused for the loader
        get_task("listops").datasets(tmp_path, prefix="deep", min_len=3)


def test_crlf_line_endings_are_accepted(tmp_path):
    write_split_files(tmp_path, "Source\tTarget\r\n( ( ( [SM 4 ) 9 ) ] )\t3\r\n\r\n")
    ds = get_task("listops").datasets(tmp_path)["train"]
    assert len(ds) == 1 and ds[0]["label"] == 3 and words_of(ds[0]["tokens"]) == ["[SM", "4", "9", "X"]
