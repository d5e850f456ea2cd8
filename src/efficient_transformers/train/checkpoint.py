"""Checkpoints without pickle: safetensors for tensors, JSON for everything else, atomic writes.

Files a run keeps in its output folder:

    model.safetensors      the weights at the last checkpoint (the final weights once training ends)
    best.safetensors       the weights that scored best on validation
    optimizer.safetensors  the optimiser state, tensors flattened; its structure as JSON in the metadata
    trainer_state.json     step, config, RNG states, data position, best metric: the commit record
    adapters.safetensors   with --adapters: the fine-tuned weights alone (adapters, norms, head), for a base
    memory.safetensors     with --segment-len: the recurrent memory after the checkpointed step

Every file is written to a temporary name in the same folder and moved into place with `os.replace`,
so a reader never sees half a file. A checkpoint is several files, so it is committed like a journal:

1. `stage`: the new weight / optimiser files are written completely as ``<name>.pending``;
2. `commit`: `trainer_state.json` is replaced (the single atomic commit point); it lists, for each file,
   the step tag that file must carry in its metadata;
3. the pending files are moved over the old ones.

A process killed at any moment (SIGKILL included) leaves a folder that `recover` brings to the last
committed checkpoint: a file whose tag does not match is rolled forward from its pending copy;
pending files of an uncommitted checkpoint are deleted.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
import torch
from torch import Tensor, nn

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
ADAPTERS_FILE = "adapters.safetensors"  # fine-tuning with --adapters: the trained weights apart from the base
MEMORY_FILE = "memory.safetensors"  # --segment-len: the recurrent memory after the checkpointed step
PENDING_SUFFIX = ".pending"
STATE_FORMAT = "efficient_transformers.trainer_state/1"
#: Everything a run writes; `--overwrite` removes exactly these.
RUN_FILES = (STATE_FILE, MODEL_FILE, BEST_FILE, OPTIMIZER_FILE, METRICS_FILE, RESULTS_FILE, ADAPTERS_FILE, MEMORY_FILE)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed (missing, inconsistent or from another run)."""


# ---------------------------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_NUMBER_LIST = re.compile(r"\[(?:\s*-?[\d.eE+-]+\s*,)*\s*-?[\d.eE+-]+\s*\]")


def dumps_json(obj: Any) -> str:
    """Indented JSON with lists of numbers (RNG states) kept on one line."""
    return _NUMBER_LIST.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), json.dumps(obj, indent=1))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps_json(obj) + "\n").encode("utf-8"))


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: line {err.lineno}: expected valid JSON ({err.msg})") from None


# ---------------------------------------------------------------------------------------------- tensor trees


def flatten_tree(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested structure (dicts, lists, tuples, scalars, tensors) into a JSON-able skeleton and a
    flat name -> tensor map. Tensors become ``{"__tensor__": name}``, tuples ``{"__tuple__": [...]}``
    and dicts with non-string keys ``{"__items__": [[key, value], ...]}``, so `unflatten_tree` restores
    the exact types (an optimiser's integer parameter ids and ``betas`` tuples included)."""
    tensors: dict[str, Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            tensors[path] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": path}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, f"{path}.{k}") for k, v in x.items()}
            return {"__items__": [[walk(k, f"{path}.key{i}"), walk(v, f"{path}.{k}")] for i, (k, v) in enumerate(x.items())]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__} at {path or 'the root'}")

    return walk(obj, prefix), tensors


def unflatten_tree(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of `flatten_tree`."""
    if isinstance(skeleton, list):
        return [unflatten_tree(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            name = skeleton["__tensor__"]
            if name not in tensors:
                raise CheckpointError(f"tensor {name!r} named in the checkpoint structure is missing from its file")
            return tensors[name]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_tree(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__items__"}:
            return {unflatten_tree(k, tensors): unflatten_tree(v, tensors) for k, v in skeleton["__items__"]}
        return {k: unflatten_tree(v, tensors) for k, v in skeleton.items()}
    return skeleton


def tree_to_bytes(obj: Any, metadata: dict[str, str] | None = None) -> bytes:
    """A nested structure as safetensors bytes; its skeleton goes in the metadata under "structure"."""
    skeleton, tensors = flatten_tree(obj)
    meta = {**(metadata or {}), "structure": json.dumps(skeleton)}
    return save_safetensors_bytes(tensors, metadata=meta)


def load_tree(path: str | Path) -> tuple[Any, dict[str, str]]:
    """Read a file written by `tree_to_bytes`: (structure with tensors, metadata)."""
    path = Path(path)
    metadata = read_metadata(path)
    if "structure" not in metadata:
        raise CheckpointError(f"{path}: expected a 'structure' entry in the safetensors metadata")
    tensors = load_safetensors_bytes(path.read_bytes())
    return unflatten_tree(json.loads(metadata["structure"]), tensors), metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: expected a safetensors file ({err})") from None


# ---------------------------------------------------------------------------------------------- weights


def weights_to_bytes(module: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """A module's state_dict as safetensors bytes. Tied tensors (e.g. an LM head sharing the embedding)
    are stored once; the metadata's "aliases" maps each dropped name to the name that holds its data."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in module.state_dict().items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    meta = {**(metadata or {}), "aliases": json.dumps(aliases)}
    return save_safetensors_bytes(tensors, metadata=meta)


def load_weights(path: str | Path, module: nn.Module) -> dict[str, str]:
    """Load weights written by `weights_to_bytes` into `module` (strict: names and shapes must match);
    returns the file's metadata."""
    path = Path(path)
    metadata = read_metadata(path)
    tensors = load_safetensors_bytes(path.read_bytes())
    for name, target in json.loads(metadata.get("aliases", "{}")).items():
        tensors[name] = tensors[target]
    _check_shared_names(path, module, tensors)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit this model ({err})") from None
    return metadata


def _check_shared_names(path: Path, module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Names that are one tensor in `module` (tied embeddings, cross-layer sharing) must hold equal values
    in the file: otherwise loading would keep whichever came last (a file saved with another `share=`)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in module.state_dict().items():
        if t.numel():
            groups.setdefault((t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in tensors]
        first = present[0] if present else None
        for other in present[1:]:
            a, b = tensors[first], tensors[other]
            if a.shape != b.shape or not torch.equal(a, b):
                raise CheckpointError(
                    f"{path}: {first!r} and {other!r} are one shared weight in this model but differ in the file "
                    f"(saved from a model with other weight sharing? check its share= setting)")


# ---------------------------------------------------------------------------------------------- the journal


def pending_path(out_dir: Path, name: str) -> Path:
    return out_dir / (name + PENDING_SUFFIX)


def stage(out_dir: Path, name: str, data: bytes) -> None:
    """Write the next version of checkpoint file `name` as ``name.pending`` (not yet committed)."""
    atomic_write_bytes(pending_path(out_dir, name), data)


def commit(out_dir: Path, state: dict[str, Any]) -> None:
    """Make `state` the current checkpoint: write `trainer_state.json` (the commit point), then move
    the pending files it lists into place. ``state["files"]`` maps file name -> the step tag it carries."""
    atomic_write_json(out_dir / STATE_FILE, state)
    for name in state["files"]:
        if pending_path(out_dir, name).exists():
            os.replace(pending_path(out_dir, name), out_dir / name)


def file_tag(path: Path) -> int | None:
    """The step tag in a checkpoint file's metadata, or None when the file is missing or unreadable."""
    try:
        return int(read_metadata(path)["step"])
    except (CheckpointError, KeyError, ValueError):
        return None


def recover(out_dir: Path) -> dict[str, Any]:
    """Bring `out_dir` to its last committed checkpoint and return that checkpoint's state.

    Rolls forward files whose pending copy carries the committed tag, deletes pending files of an
    uncommitted checkpoint and the temporary files of writes a killed process left unfinished, and
    raises `CheckpointError` when a committed file cannot be found."""
    state = read_json(out_dir / STATE_FILE, "trainer state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{out_dir / STATE_FILE}: expected a trainer state with format {STATE_FORMAT!r}")
    for name, tag in state["files"].items():
        final, pending = out_dir / name, pending_path(out_dir, name)
        if file_tag(final) == tag:
            continue
        if pending.exists() and file_tag(pending) == tag:
            os.replace(pending, final)
            continue
        raise CheckpointError(f"{final}: expected the checkpoint of step {tag} committed in {STATE_FILE}, "
                              f"found step {file_tag(final)}; the folder was changed outside the trainer")
    for leftover in out_dir.glob("*" + PENDING_SUFFIX):
        leftover.unlink()
    for orphan in out_dir.glob(".*.tmp"):  # `atomic_write_bytes` temporaries of a process killed mid-write
        orphan.unlink()
    return state
