"""A one-line progress bar on a terminal, silence in a pipe, and the JSONL metrics log.

The metrics log is append-only JSON Lines (one object per logged step or evaluation). A checkpoint
records the log's size in bytes, and a resumed run cuts the log back to that size, so lines written
after the last checkpoint by a run that was killed are not duplicated.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any


class ProgressBar:
    """``label [#####.....] 120/400 loss 1.23 lr 9.0e-04 3.1 it/s`` redrawn in place, at most ~10 Hz."""

    def __init__(self, total: int, label: str = "", *, enabled: bool | None = None, stream: IO[str] | None = None,
                 width: int = 24) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.total, self.label, self.width = max(total, 1), label, width
        self._last_draw, self._start, self._start_count = 0.0, time.monotonic(), None

    def update(self, count: int, **fields: float | str | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._start_count is None:
            self._start_count, self._start = count, now
        if count < self.total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        filled = int(self.width * min(count, self.total) / self.total)
        rate = (count - self._start_count) / max(now - self._start, 1e-9)
        parts = [f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {count}/{self.total}"]
        parts += [f"{k} {_format(v)}" for k, v in fields.items() if v is not None]
        parts.append(f"{rate:.1f} it/s")
        self.stream.write("\r" + " ".join(parts) + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _format(value: float | str) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.4g}"
    return str(value)


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
