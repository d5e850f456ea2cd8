"""Training with recurrence: segment by segment with the memory (truncated backpropagation through time).

    eft train --task byte_lm --attention transformer_xl --segment-len 128

With ``segment_len`` = L, a language-model split is read as one byte stream cut into ``lanes``
contiguous lanes (the batch size; Transformer-XL's batching): lane b holds bytes
[b T', (b + 1) T'] with T' = (T - 1) // lanes, and micro-batch i reads, in every lane, the segment
i mod S (S = T' // L segments per lane) — the bytes right after those of micro-batch i - 1, so the
memory the model carries from micro-batch i - 1 belongs to the text that follows. Gradients stop at
the segment boundary (the mechanisms detach their memories); when a lane wraps around (a new epoch
over the split) the memory starts empty.

Evaluation reads the split the same way (``eval_batch_size`` lanes, every segment once, the memory
carried), so bits per byte are those of the model reading the split as streams.

Exact resume: the data position is a function of the micro-batch index, and the memory after the
last micro-batch of a checkpointed step is saved with the checkpoint (`memory.safetensors`, the
memory's hidden states; cached keys are recomputed, as in training), so a resumed run repeats the
uninterrupted one bit for bit.

Several processes (`torchrun`, DDP): the split is cut into batch_size x world_size lanes (batch_size
per process, as for every other task) and process r reads lanes [r batch_size, (r + 1) batch_size),
so W processes read the lanes one process reads at W times the batch. Each process carries the memory
of its own lanes; the checkpoint gathers them (a collective) and holds the memory of all lanes in
lane order, which each process slices again on resume. Evaluation splits the eval_batch_size x
world_size lanes over the processes the same way and sums the statistics over them.

Only recurrence mechanisms (survey class RC: `transformer_xl`, `compressive`) carry a bounded memory
without gradients across segments; other mechanisms are refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor, nn

from ..attention.compressive import CompressiveMemory
from ..attention.transformer_xl import XLMemory
from ..registry import card, mechanisms
from . import checkpoint as ckpt
from .objective import BatchStats, batch_statistics

MEMORY_FILE = ckpt.MEMORY_FILE
MEMORY_TYPES = {"XLMemory": XLMemory, "CompressiveMemory": CompressiveMemory}


def check_recurrence(config: Any, task: Any, world_size: int) -> None:
    """--segment-len needs a language-model task and a recurrence mechanism (any number of processes)."""
    if config.segment_len is None:
        return
    if task.kind != "language_model":
        raise ValueError(f"--segment-len {config.segment_len}: segment-level recurrence trains language models; "
                         f"task {task.name!r} is {task.kind}; allowed: a language-model task (byte_lm)")
    if "RC" not in card(config.attention).classes:
        allowed = [c.name for c in mechanisms() if "RC" in c.classes]
        raise ValueError(f"--segment-len {config.segment_len}: {config.attention!r} carries no recurrent memory; "
                         f"allowed: --attention {' or '.join(allowed)}")


class StreamLanes:
    """A byte stream as `lanes` contiguous lanes read `segment_len` bytes at a time."""

    def __init__(self, stream: np.ndarray, lanes: int, segment_len: int, split: str = "train") -> None:
        stream = np.asarray(stream, dtype=np.uint8)
        self.lane_len = (len(stream) - 1) // lanes  # bytes per lane (one more is read as the last target)
        self.segments = self.lane_len // segment_len
        if self.segments < 1:
            raise ValueError(f"--segment-len {segment_len}: the {split} split ({len(stream)} bytes) is too short for "
                             f"{lanes} lanes of one segment each; allowed: segment_len * lanes < {len(stream)}")
        self.stream, self.lanes, self.segment_len = stream, lanes, segment_len

    def segment(self, index: int, lanes: range | None = None) -> tuple[dict[str, Tensor], bool]:
        """Micro-batch `index` -> ({"tokens", "targets", "mask"} (lanes, L), True when the lanes start over);
        `lanes`: only those lanes (one process's share), default all."""
        j = index % self.segments
        lanes = range(self.lanes) if lanes is None else lanes
        starts = np.asarray(lanes, dtype=np.int64) * self.lane_len + j * self.segment_len  # (lanes,)
        rows = np.stack([self.stream[s:s + self.segment_len + 1] for s in starts]).astype(np.int64) + 1  # (lanes, L + 1)
        chunk = torch.from_numpy(rows)  # bytes + 1: 0 stays PAD
        batch = {"tokens": chunk[:, :-1], "targets": chunk[:, 1:],
                 "mask": torch.ones(len(lanes), self.segment_len, dtype=torch.bool)}
        return batch, j == 0


def split_stream(dataset: Any) -> np.ndarray:
    """The bytes of a language-model split (its windows, concatenated, as `WindowDataset` reads them)."""
    stream = getattr(dataset, "stream", None)
    window = getattr(dataset, "window", None)
    if stream is None or window is None:
        raise ValueError("--segment-len needs a language-model split read from one byte stream (byte_lm)")
    return np.asarray(stream)[: len(dataset) * window + 1]


class CarryMemory(nn.Module):
    """`model(tokens, mask)` for `batch_statistics` that feeds and keeps the memory of `holder`."""

    def __init__(self, model: nn.Module, holder: "Recurrence") -> None:
        super().__init__()
        self.model, self.holder = model, holder

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        logits, self.holder.memory = self.model(tokens, mask, memory=self.holder.memory, return_state=True)
        return logits


class Recurrence:
    """The training lanes and the memory carried between micro-batches."""

    def __init__(self, splits: dict[str, Any], batch_size: int, eval_batch: int, segment_len: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.segment_len, self.eval_batch = segment_len, eval_batch
        self.splits, self.rank, self.world_size = splits, rank, world_size
        self.train = StreamLanes(split_stream(splits["train"]), batch_size * world_size, segment_len)
        self.my_lanes = _share(self.train.lanes, rank, world_size)  # this process's training lanes
        self.memory: list | None = None  # the memory of this process's lanes

    def train_batch(self, index: int) -> dict[str, Tensor]:
        """Micro-batch `index` (this process's lanes); the memory is dropped when the lanes start over."""
        batch, restart = self.train.segment(index, self.my_lanes)
        if restart:
            self.memory = None
        return batch

    def carrying(self, model: nn.Module) -> nn.Module:
        return CarryMemory(model, self)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device, kind: str, autocast) -> BatchStats:
        """Statistics over every segment of the split read as `eval_batch` x world_size lanes, the memory
        carried: this process's share of the lanes (the caller sums the statistics over processes)."""
        stream = split_stream(self.splits[split])
        lanes = max(1, min(self.eval_batch * self.world_size, (len(stream) - 1) // self.segment_len))
        reader = StreamLanes(stream, lanes, self.segment_len, split)
        mine = _share(lanes, self.rank, self.world_size)
        saved, self.memory = self.memory, None
        stats = BatchStats()
        try:
            carry = self.carrying(model)
            for i in range(reader.segments if len(mine) else 0):
                batch, _ = reader.segment(i, mine)
                with autocast():
                    stats.add(batch_statistics(carry, {k: v.to(device) for k, v in batch.items()}, kind)[1])
        finally:
            self.memory = saved
        return stats

    # ------------------------------------------------------------------ checkpoints
    def memory_bytes(self, step: int, env: Any = None) -> bytes:
        """The checkpoint's memory file: every process's lanes, in lane order. With several processes a
        collective (every process calls it; the bytes matter on rank 0 only)."""
        memory = self.memory
        if env is not None and env.distributed:
            memory = join_lanes([memory_from_tree(tree, torch.device("cpu")) for tree in _gather_trees(
                env, memory_to_tree(self.memory))])
        return ckpt.tree_to_bytes({"memory": memory_to_tree(memory)},
                                  {"step": str(step), "lanes": str(self.train.lanes)})

    def restore(self, path, device: torch.device) -> None:
        """This process's lanes of the checkpointed memory."""
        tree, meta = ckpt.load_tree(path)
        if meta.get("lanes", str(self.train.lanes)) != str(self.train.lanes):
            raise ckpt.CheckpointError(f"{path}: holds the memory of {meta['lanes']} lanes, this run reads "
                                       f"{self.train.lanes} (batch size x processes)")
        memory = memory_from_tree(tree["memory"], torch.device("cpu"))
        self.memory = None if memory is None else [
            _to_device(state, device) for state in slice_lanes(memory, self.my_lanes.start, self.my_lanes.stop)]


def _share(lanes: int, rank: int, world_size: int) -> range:
    """Process `rank`'s contiguous share of `lanes` lanes (the last ones may get fewer, or none)."""
    per = -(-lanes // world_size)
    return range(min(lanes, rank * per), min(lanes, (rank + 1) * per))


def _to_device(state, device: torch.device):
    return dataclasses.replace(state, **{f.name: getattr(state, f.name).to(device) for f in dataclasses.fields(state)
                                         if isinstance(getattr(state, f.name), Tensor)})


def _gather_trees(env: Any, tree: Any) -> list:
    """Every process's memory tree, in rank order (a collective; the serialised sizes may differ)."""
    data = torch.frombuffer(bytearray(ckpt.tree_to_bytes({"memory": tree})), dtype=torch.uint8)
    sizes = [int(t.view(torch.int64)) for t in env.all_gather_bytes(torch.tensor([data.numel()]).view(torch.uint8))]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[:data.numel()] = data
    return [_tree_from_bytes(bytes(part[:size].numpy()))["memory"] for part, size in zip(env.all_gather_bytes(padded), sizes)]


def _tree_from_bytes(data: bytes) -> Any:
    """`ckpt.tree_to_bytes` read back from memory (safetensors: 8-byte header length, JSON header with metadata)."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return ckpt.unflatten_tree(json.loads(header["__metadata__"]["structure"]), load_safetensors_bytes(data))


def join_lanes(memories: list[list | None]) -> list | None:
    """Per-process memories (each a list of per-layer states, or None after a restart) -> one memory of
    all their lanes (batch rows) in order; a padding mask that is None in one part is all True there."""
    if all(m is None for m in memories):
        return None
    if any(m is None for m in memories):
        raise ValueError("recurrence: some processes hold a memory and others none; their lanes restart together")
    joined = []
    for states in zip(*memories):
        fields = {}
        for f in dataclasses.fields(states[0]):
            values = [getattr(s, f.name) for s in states]
            if all(v is None for v in values):
                fields[f.name] = None
            elif f.name.endswith("mask"):  # (B, m) bool or None
                rows = [s.hidden.shape[0] for s in states]
                width = next(v for v in values if v is not None).shape[1]
                parts = [torch.ones(b, width, dtype=torch.bool) if v is None else v.cpu() for v, b in zip(values, rows)]
                fields[f.name] = torch.cat(parts, dim=0)
            elif isinstance(values[0], Tensor):
                fields[f.name] = torch.cat([v.cpu() for v in values], dim=0)
            else:
                if len(set(values)) != 1:
                    raise ValueError(f"recurrence: the processes' memories differ in {f.name}: {values}")
                fields[f.name] = values[0]
        joined.append(type(states[0])(**fields))
    return joined


def slice_lanes(memory: list, lo: int, hi: int) -> list:
    """The lanes (batch rows) [lo, hi) of a memory; a padding mask with every kept entry True becomes None."""
    out = []
    for state in memory:
        fields = {}
        for f in dataclasses.fields(state):
            value = getattr(state, f.name)
            if isinstance(value, Tensor):
                value = value[lo:hi]
                if f.name.endswith("mask") and bool(value.all()):
                    value = None
            fields[f.name] = value
        out.append(type(state)(**fields))
    return out


def memory_to_tree(memory: list | None) -> list | None:
    """Per-layer memories -> a tree of tensors and ints (hidden states only: cached keys are recomputed)."""
    if memory is None:
        return None
    out = []
    for state in memory:
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                  if f.name not in ("keys", "values", "weights_version")}
        out.append({"type": type(state).__name__, **fields})
    return out


def memory_from_tree(tree: list | None, device: torch.device) -> list | None:
    if tree is None:
        return None
    memory = []
    for item in tree:
        item = dict(item)
        cls = MEMORY_TYPES.get(item.pop("type", None))
        if cls is None:
            raise ckpt.CheckpointError(f"{MEMORY_FILE}: unknown memory type; allowed: {sorted(MEMORY_TYPES)}")
        memory.append(cls(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in item.items()}))
    return memory


def evaluate_with_memory_lengths(run_dir: str, mem_lens: list[int], split: str = "test") -> dict[int, float]:
    """Bits per byte of a --segment-len run's best weights on `split`, read as streams with each memory
    length in `mem_lens` (the weights do not depend on it: e.g. 0 = no memory, or longer than in training)."""
    import contextlib
    import json
    from pathlib import Path

    from ..attention.transformer_xl import set_mem_len
    from ..tasks import get_task
    from .objective import build_model

    results = json.loads((Path(run_dir) / ckpt.RESULTS_FILE).read_text())
    config, spec = results["config"], results["model_config"]
    if not config.get("segment_len"):
        raise ValueError(f"{run_dir}: not a --segment-len run")
    task = get_task(config["task"])
    splits = task.datasets(config["data"], seed=config["seed"], max_len=spec["max_seq_len"], num_train=config["num_train"],
                           num_val=config["num_val"], num_test=config["num_test"], **config["task_options"])
    model = build_model(spec)
    ckpt.load_weights(Path(run_dir) / ckpt.BEST_FILE, model)
    model.eval()
    reader = Recurrence(splits, config["batch_size"], config["eval_batch_size"] or config["batch_size"], config["segment_len"])
    out = {}
    for mem_len in mem_lens:
        set_mem_len(model, mem_len)
        stats = reader.evaluate(model, split, torch.device("cpu"), task.kind, contextlib.nullcontext)
        out[mem_len] = stats.summary("bits_per_byte")["bits_per_byte"]
    return out

