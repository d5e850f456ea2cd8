"""ListOps (LRA): classify the value (0-9) of a long nested prefix expression.

Grammar (the LRA generator's, written here from its description): a node below ``max_depth`` (10) is
a digit with probability 0.75, otherwise an operator with ``randint(2, max_args)`` children
(``max_args`` 10, both ends inclusive); at ``max_depth`` a node is always a digit. Operators:
``MIN``, ``MAX``, ``MED`` (``int(median)``: the mean of the two middle values, rounded down, for an
even count) and ``SM`` (sum mod 10). The root is at depth 1. An expression's *length* counts digits,
operators and closing ``]`` but not parentheses; a tree is kept when ``min_len < length < max_len``
(LRA: 500 < length < 2000) and duplicates are dropped (across all three splits).

Official format (LRA ``listops-1000/{task}_{train,val,test}.tsv``, default task ``basic``):
tab-separated with the header ``Source\\tTarget``. ``Source`` renders each operator node as a
left-nested binary tree with single spaces between tokens, e.g. ``[MAX 4 9 ]`` is written
``( ( ( [MAX 4 ) 9 ) ] )``; ``Target`` is the value. Preprocessing (LRA's current pipeline):
``]`` -> ``X``, parentheses deleted, split on whitespace, then a fixed vocabulary: PAD = 0, digits
``0``-``9`` = 1-10, ``[MIN [MAX [MED [SM`` = 11-14, ``X`` = 15. The token count then equals the
generator's length.

The generator renders each tree to the TSV ``Source`` string and tokenizes it through the same
function as the loader, so both paths give the same token stream. Differences from LRA's generator:
it is seeded (LRA's is not), each split has its own random stream (test, then val, then train, each
skipping expressions already drawn), sizes default to 2000 / 200 / 200 instead of 96K / 2K / 2K,
a tree is abandoned as soon as it reaches ``max_len`` (same accepted distribution, faster), and
``min_len`` defaults to ``max_len // 4`` (500 for the default 2000) so that short settings such as
``max_len=200`` work without also passing ``min_len``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    GENERATE,
    LOAD,
    ClassificationDataset,
    Ragged,
    Task,
    data_error,
    missing_file,
    register_task,
    split_rng,
)

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # a node below max_depth is an operator when random() <= VALUE_P, else a digit
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("X",)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}

# A tree is a digit (int) or a pair (operator, [children]).
Tree = Any


class _TooLong(Exception):
    pass


def sample_tree(rnd: random.Random, max_depth: int = 10, max_args: int = 10, limit: int | None = None) -> tuple[Tree, int]:
    """Draw one tree from the LRA grammar; returns ``(tree, length)``. With ``limit``, raise
    `_TooLong` once the length reaches it (the caller would reject the tree anyway)."""
    count = [0]
    uniform = rnd.random  # int(uniform() * k) is uniform on range(k); much faster than randrange
    spread = max_args - 1  # children: 2 + int(uniform() * spread) is uniform on [2, max_args]

    def node(depth: int) -> Tree:
        if depth < max_depth and uniform() <= VALUE_P:
            count[0] += 2  # the operator and its closing bracket
            children = [node(depth + 1) for _ in range(2 + int(uniform() * spread))]
            return (OPERATORS[int(uniform() * 4)], children)
        count[0] += 1
        if limit is not None and count[0] >= limit:
            raise _TooLong
        return int(uniform() * 10)

    tree = node(1)
    return tree, count[0]


def to_source(tree: Tree) -> str:
    """Render a tree as an LRA ``Source`` string (left-nested binary tree with parentheses)."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = op
    for child in children:
        text = f"( {text} {to_source(child)} )"
    return f"( {text} {END} )"


def tokenize_source(source: str) -> list[str]:
    """LRA preprocessing: ``]`` -> ``X``, delete parentheses, split on whitespace."""
    return source.replace("]", "X").replace("(", " ").replace(")", " ").split()


def encode_source(source: str) -> np.ndarray:
    """``Source`` string -> token ids (uint8); unknown tokens raise ValueError."""
    words = tokenize_source(source)
    try:
        return np.array([TOKEN_ID[w] for w in words], dtype=np.uint8)
    except KeyError as e:
        raise ValueError(f"unknown ListOps token {e.args[0]!r}; expected a digit, one of {OPERATORS} or ']'") from None


def apply_operator(op: str, args: list[int]) -> int:
    if not args:
        raise ValueError(f"operator {op} has no arguments")
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def evaluate_tokens(words: list[str]) -> int:
    """Value of a preprocessed token list (digits, operators, ``X``); malformed lists raise ValueError."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for pos, w in enumerate(words):
        if result is not None:
            raise ValueError(f"token {pos} ({w!r}) follows a complete expression")
        if w in OPERATORS:
            stack.append((w, []))
            continue
        if w == "X":
            if not stack:
                raise ValueError(f"token {pos}: closing bracket without an open operator")
            op, args = stack.pop()
            value = apply_operator(op, args)
        elif len(w) == 1 and w.isdigit():
            value = int(w)
        else:
            raise ValueError(f"token {pos}: unknown token {w!r}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if result is None or stack:
        raise ValueError("incomplete expression")
    return result


def evaluate(tree_or_source: Tree | str) -> int:
    """Value of a tree, or of a ``Source`` string (through the LRA preprocessing)."""
    if isinstance(tree_or_source, str):
        return evaluate_tokens(tokenize_source(tree_or_source))
    if isinstance(tree_or_source, int):
        return tree_or_source
    op, children = tree_or_source
    return apply_operator(op, [evaluate(c) for c in children])


def generate_examples(rnd: random.Random, n: int, *, min_len: int, max_len: int, max_depth: int = 10,
                      max_args: int = 10, seen: set[str] | None = None) -> list[tuple[str, int]]:
    """``n`` distinct ``(source, target)`` rows with ``min_len < length < max_len``, skipping any
    source already in ``seen`` (which is updated)."""
    seen = set() if seen is None else seen
    rows: list[tuple[str, int]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ValueError(f"could not draw {n} distinct ListOps trees with {min_len} < length < {max_len} "
                             f"(max_depth={max_depth}, max_args={max_args}); widen the length range")
        try:
            tree, length = sample_tree(rnd, max_depth, max_args, limit=max_len)
        except _TooLong:
            continue
        if not min_len < length < max_len:
            continue
        source = to_source(tree)
        if source in seen:
            continue
        seen.add(source)
        rows.append((source, evaluate(tree)))
    return rows


def generate_splits(seed: int, sizes: dict[str, int], *, min_len: int | None = None, max_len: int = 2000,
                    max_depth: int = 10, max_args: int = 10) -> dict[str, list[tuple[str, int]]]:
    """The generator's ``(source, target)`` rows of each split, as `ListOpsTask` makes them: test,
    then val, then train, each from its own seeded stream and skipping sources drawn before."""
    min_len = max_len // 4 if min_len is None else int(min_len)
    if not 0 <= min_len < max_len - 1:
        raise ValueError(f"listops: need 0 <= min_len < max_len - 1, got min_len={min_len}, max_len={max_len}")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"listops: need max_depth >= 1 and max_args >= 2, got {max_depth}, {max_args}")
    seen: set[str] = set()
    rows = {}
    for split in ("test", "val", "train"):
        rnd = random.Random(int(split_rng(seed, "listops", split).integers(2**63)))
        rows[split] = generate_examples(rnd, sizes[split], min_len=min_len, max_len=max_len, max_depth=max_depth,
                                        max_args=max_args, seen=seen)
    return {split: rows[split] for split in ("train", "val", "test")}


def write_tsv(path: str | Path, rows: list[tuple[str, int]]) -> None:
    """Write rows in the LRA TSV format (header ``Source\\tTarget``)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("Source\tTarget\n")
        for source, target in rows:
            f.write(f"{source}\t{target}\n")


def read_tsv(path: Path, limit: int | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Read an LRA ListOps TSV into token arrays and targets (at most ``limit`` rows)."""
    if not path.is_file():
        raise missing_file(path, "ListOps TSV file")
    seqs: list[np.ndarray] = []
    labels: list[int] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise data_error(path, lineno, "UTF-8 text", raw[:40]) from None
            if lineno == 1:
                if line != "Source\tTarget":
                    raise data_error(path, 1, "the header 'Source\\tTarget'", line)
                continue
            if not line.strip():
                continue
            if limit is not None and len(seqs) >= limit:
                break
            fields = line.split("\t")
            if len(fields) != 2:
                raise data_error(path, lineno, f"2 tab-separated fields (Source, Target), found {len(fields)}", line)
            source, target = fields
            try:
                tokens = encode_source(source)
            except ValueError as e:
                raise data_error(path, lineno, f"a ListOps expression ({e})") from None
            if len(tokens) == 0:
                raise data_error(path, lineno, "a non-empty Source", source)
            if target.strip() not in {str(d) for d in range(10)}:
                raise data_error(path, lineno, "a Target digit 0-9", target)
            seqs.append(tokens)
            labels.append(int(target))
    if not seqs and limit != 0:
        raise data_error(path, None, "the header 'Source\\tTarget' and at least one example")
    return seqs, labels


@register_task
class ListOpsTask(Task):
    """ListOps: nested MIN/MAX/MED/SM expressions, 10 classes (see the module docstring)."""

    name = "listops"
    kind = "classification"
    vocab_size = len(VOCAB)  # 16
    num_classes = 10
    default_max_len = 2000
    metric = "accuracy"
    default_sizes = (2000, 200, 200)
    options = {
        "min_len": (None, GENERATE),  # None -> max_len // 4
        "max_depth": (10, GENERATE),
        "max_args": (10, GENERATE),
        "prefix": ("basic", LOAD),  # files {prefix}_{train,val,test}.tsv
    }

    def _generate(self, *, seed, max_len, sizes, min_len, max_depth, max_args):
        rows = generate_splits(seed, sizes, min_len=min_len, max_len=max_len, max_depth=max_depth, max_args=max_args)
        out = {}
        for split, split_rows in rows.items():
            seqs = [encode_source(src) for src, _ in split_rows]  # the loader's own tokenization
            out[split] = ClassificationDataset(Ragged(seqs, np.uint8), [t for _, t in split_rows], max_len=max_len)
        return out

    def _load(self, root, *, max_len, sizes, prefix):
        max_len = self.default_max_len if max_len is None else max_len
        out = {}
        for split in ("train", "val", "test"):
            seqs, labels = read_tsv(root / f"{prefix}_{split}.tsv", limit=sizes[split])
            out[split] = ClassificationDataset(Ragged(seqs, np.uint8), labels, max_len=max_len)
        return out
