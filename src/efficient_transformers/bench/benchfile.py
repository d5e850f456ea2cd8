"""Reading an `eft bench` JSON back: the schema check and the machine check, shared by `eft advise
--bench FILE` and `eft models NAME --bench FILE`.

    result = load_bench_file("eft-report/bench.json")          # BenchFileError (a ValueError) when wrong
    check_same_machine(result, "eft-report/bench.json")         # BenchFileError when measured elsewhere

A file is an `eft bench` result when it is a JSON object with "config", "rows" and "summary", its
config names the settings the rows were measured at, and every row carries the keys DESIGN.md
section 4 fixes. "Same machine" means the same device name as this machine's (the CPU model and the
number of logical CPUs, as `eft bench` writes it; the GPU's name for a CUDA run): times measured on
another machine say nothing about this one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG_KEYS = ("mechanisms", "lengths", "modes", "batch", "dim", "heads", "dtype", "causal", "device", "device_name")
ROW_KEYS = ("mechanism", "seq_len", "mode", "batch", "dim", "heads", "status", "time_ms", "peak_mem_mb")


class BenchFileError(ValueError):
    """The file is missing, unreadable, not an `eft bench` JSON, or from another machine."""


def load_bench_file(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `eft bench` JSON at `path`, after the schema check (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise BenchFileError(f"cannot read the bench file {str(path)!r}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BenchFileError(f"{path} is not JSON ({err.msg} at line {err.lineno}); expected the bench.json "
                             "that `eft bench` writes") from None
    problem = schema_problem(data)
    if problem:
        raise BenchFileError(f"{path} is not an `eft bench` result: {problem}; expected the bench.json that "
                             "`eft bench --out DIR` writes (DIR/bench.json)")
    return data


def schema_problem(data: Any) -> str | None:
    """What is wrong with `data` as an `eft bench` result, or None."""
    if not isinstance(data, dict):
        return f"the top level is a JSON {type(data).__name__}, not an object with config, rows and summary"
    if "accuracy" in data and "rows" not in data:
        return "it looks like an `eft lra` result (it has 'accuracy'; pass it with --lra)"
    missing = [k for k in ("config", "rows", "summary") if k not in data]
    if missing:
        return f"missing top-level key(s) {missing} (it has {sorted(data)[:8]})"
    config, rows = data["config"], data["rows"]
    if not isinstance(config, dict) or not isinstance(rows, list) or not isinstance(data["summary"], dict):
        return "config and summary must be objects and rows a list"
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        return f"its config lacks {missing}"
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"row {i} is not an object"
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            return f"row {i} lacks {missing}"
    return None


def this_device_name(device: str) -> str | None:
    """This machine's device name, as `eft bench` writes it into config.device_name (None: no such device)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    from .runner import _cpu_name

    return _cpu_name()


def check_same_machine(data: dict[str, Any], path: str | os.PathLike) -> None:
    """BenchFileError when the file's device differs from this machine's (the message says which)."""
    config = data["config"]
    here = this_device_name(config["device"])
    if here != config["device_name"]:
        where = f"this machine has {here!r}" if here else f"this machine has no {config['device']!r} device"
        raise BenchFileError(
            f"{path} was measured on another machine: {config['device']} {config['device_name']!r} "
            f"({config.get('platform', 'platform unknown')}), {where}; times measured elsewhere say nothing "
            "about this machine (pass --any-machine to use them anyway)")
