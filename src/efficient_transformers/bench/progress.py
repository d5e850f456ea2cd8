"""A one-line progress bar for long commands: drawn on a terminal, silent in a pipe.

    bar = ProgressBar(total=40)              # enabled when stderr is a terminal
    bar.update(description="performer N=1024 train")
    bar.advance()
    bar.close()

Redraws at most every `min_interval_s` (and always on close), so it costs nothing measurable
between timed steps; it is never drawn while a step is being timed.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool | None = None,
                 width: int = 24, min_interval_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.total, self.done, self.width, self.min_interval_s = max(total, 0), 0, width, min_interval_s
        self.description = ""
        self._start = time.monotonic()
        self._last_draw = float("-inf")

    def update(self, *, description: str | None = None) -> None:
        if description is not None:
            self.description = description
        self._draw()

    def advance(self, steps: int = 1, *, description: str | None = None) -> None:
        self.done = min(self.total, self.done + steps)
        self.update(description=description)

    def render(self) -> str:
        fraction = self.done / self.total if self.total else 1.0
        filled = round(fraction * self.width)
        elapsed = int(time.monotonic() - self._start)
        return (f"[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed // 60:02d}:{elapsed % 60:02d} {self.description}")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last_draw < self.min_interval_s):
            return
        self._last_draw = now
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + self.render()[: columns - 1].ljust(columns - 1))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
