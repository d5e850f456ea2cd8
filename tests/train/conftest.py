"""Shared fixtures of the training tests: tiny in-memory tasks with the `tasks` interface, a tiny config,
and a comparison of two run folders tensor by tensor."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from efficient_transformers.tasks.base import collate
from efficient_transformers.train import TrainConfig

TENSOR_FILES = ("model.safetensors", "best.safetensors", "optimizer.safetensors")


class TinyTask:
    """A task with the `efficient_transformers.tasks` interface whose labels need attention to read:

    classification  label = 1 if token 7 occurs anywhere in the sequence (lengths 4..12, so padding)
    retrieval       label = 1 if both documents contain the same "topic" token (5 or 6)
    language_model  a periodic byte stream (period 5), windows of 12 bytes
    """

    pad_id = 0
    default_max_len = 12

    def __init__(self, kind: str = "classification") -> None:
        self.kind = kind
        self.name = f"tiny_{kind}"
        self.vocab_size = 257 if kind == "language_model" else 9
        self.num_classes = None if kind == "language_model" else 2
        self.metric = "bits_per_byte" if kind == "language_model" else "accuracy"

    def datasets(self, data_dir=None, *, seed=0, max_len=None, num_train=64, num_val=24, num_test=24, **options):
        g = torch.Generator().manual_seed(seed)
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        return {split: [self._item(g) for _ in range(n)] for split, n in sizes.items()}

    def _item(self, g: torch.Generator) -> dict:
        if self.kind == "language_model":
            start = int(torch.randint(0, 5, (1,), generator=g))
            stream = (torch.arange(start, start + 13) % 5) * 3 + 10  # (13,)
            return {"tokens": stream[:-1], "targets": stream[1:]}
        label = int(torch.randint(0, 2, (1,), generator=g))
        if self.kind == "classification":
            n = int(torch.randint(4, 13, (1,), generator=g))
            tokens = torch.randint(1, 7, (n,), generator=g)
            if label:
                tokens[int(torch.randint(0, n, (1,), generator=g))] = 7
            return {"tokens": tokens, "label": label}
        topic = int(torch.randint(5, 7, (1,), generator=g))
        other = topic if label else 11 - topic
        docs = []
        for t in (topic, other):
            doc = torch.randint(1, 5, (8,), generator=g)
            doc[int(torch.randint(0, 8, (1,), generator=g))] = t
            docs.append(doc)
        return {"tokens": docs[0], "tokens2": docs[1], "label": label}

    def collate(self, items):
        return collate(self.kind, items, self.pad_id)


@pytest.fixture
def tiny_task():
    return TinyTask


def tiny_config(out: Path, **overrides) -> TrainConfig:
    base = dict(task="tiny", attention="vanilla", out=str(out), steps=12, dim=32, depth=1, heads=2, batch_size=8,
                eval_every=4, log_every=2, lr=3e-3, dropout=0.1, progress="off", device="cpu")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def make_config():
    return tiny_config


def load_run_tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(Path(out) / name)) for name in TENSOR_FILES}


def assert_same_tensors(a: Path, b: Path) -> None:
    """Every tensor of the weight, best-weight and optimiser files of two runs is bit-identical."""
    ta, tb = load_run_tensors(a), load_run_tensors(b)
    for name in TENSOR_FILES:
        assert ta[name].keys() == tb[name].keys(), name
        assert ta[name], f"{name} holds no tensors"
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), f"{name}:{key} differs"


def metrics_without_time(out: Path) -> list[dict]:
    with open(Path(out) / "metrics.jsonl", encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in f]


def without_key_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters minus the key part of each fused q/k/v bias. That bias has zero gradient in exact
    arithmetic (softmax is shift-invariant along the keys), so Adam turns its rounding noise into
    full-size steps; runs that sum in a different order legitimately differ there and nowhere else."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith("to_qkv.bias"):
            third = value.shape[0] // 3
            out[name] = torch.cat([value[:third], value[2 * third:]])
    return out


def assert_close_parameters(a: dict, b: dict, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    a, b = without_key_bias(a), without_key_bias(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=rtol), (name, (a[name] - b[name]).abs().max())


@pytest.fixture
def run_helpers():
    class Helpers:
        same_tensors = staticmethod(assert_same_tensors)
        metrics = staticmethod(metrics_without_time)
        tensors = staticmethod(load_run_tensors)
        close_parameters = staticmethod(assert_close_parameters)
    return Helpers


def subprocess_env() -> dict[str, str]:
    """One thread per process (bit-identical comparisons between processes need equal thread counts)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def eft_command():
    """argv prefix that runs `eft` in a fresh interpreter."""
    return [sys.executable, "-m", "efficient_transformers"]


@pytest.fixture
def child_env():
    return subprocess_env()
