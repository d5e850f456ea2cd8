"""Progress bars for long work (`eft bench`, `eft train`, `eft lra`, `eft search`): tqdm, drawn on a
terminal and silent in a pipe.

    bar = progress_bar(400, "listops/vanilla")      # enabled when stderr is a terminal
    bar.update(1); bar.set_postfix(loss=1.23, refresh=False)
    bar.close()

`enabled=None` decides by `is_terminal(stream)`; a disabled bar is a tqdm with ``disable=True``, whose
methods do nothing, so callers never branch on it. tqdm redraws at most every ``mininterval`` seconds
(0.1 here), so the bar costs nothing measurable between timed steps.
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, desc: str = "", *, enabled: bool | None = None, stream: IO[str] | None = None,
                 initial: int = 0, unit: str = "it") -> tqdm:
    """A tqdm bar on `stream` (default stderr), shown when `enabled` (None: when `stream` is a terminal)."""
    stream = sys.stderr if stream is None else stream
    show = is_terminal(stream) if enabled is None else bool(enabled)
    return tqdm(total=total, desc=desc or None, initial=initial, unit=unit, file=stream, disable=not show,
                mininterval=0.1, dynamic_ncols=True, leave=False)
