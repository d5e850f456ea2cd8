"""The JSONL metrics log of a training run (the progress bar is tqdm's: `efficient_transformers.progress`).

The metrics log is append-only JSON Lines (one object per logged step or evaluation). A checkpoint
records the log's size in bytes, and a resumed run cuts the log back to that size, so lines written
after the last checkpoint by a run that was killed are not duplicated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append JSON objects to ``metrics.jsonl``; `size` is what a checkpoint records."""

    def __init__(self, path: str | Path, *, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def truncate(self, size: int) -> None:
        """Cut the log back to `size` bytes (the size recorded by the checkpoint being resumed)."""
        if not self.enabled:
            return
        if not self.path.exists():
            if size:
                raise ValueError(f"{self.path}: missing, but the checkpoint recorded {size} bytes of metrics")
            return
        if self.path.stat().st_size < size:
            raise ValueError(f"{self.path}: {self.path.stat().st_size} bytes, shorter than the {size} bytes "
                             f"the checkpoint recorded; the log was changed outside the trainer")
        with open(self.path, "r+b") as f:
            f.truncate(size)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def size(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics log (for reports and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
