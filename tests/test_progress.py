"""The progress bar (tqdm) of bench, train, lra and search: drawn on a terminal, silent in a pipe."""

from __future__ import annotations

import io

from efficient_transformers.progress import is_terminal, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_and_stays_silent_in_a_pipe():
    tty, pipe = Terminal(), io.StringIO()
    assert is_terminal(tty) and not is_terminal(pipe) and not is_terminal(None)
    for stream in (tty, pipe):
        bar = progress_bar(4, "listops/vanilla", stream=stream, unit="step")
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss=0.5, refresh=False)
        bar.set_description_str("done")
        bar.close()
    assert pipe.getvalue() == ""
    assert "listops/vanilla" in tty.getvalue() and "4/4" in tty.getvalue() and "loss=0.5" in tty.getvalue()


def test_enabled_overrides_the_terminal_check_and_initial_counts_resumed_work():
    shown, hidden = io.StringIO(), Terminal()
    bar = progress_bar(10, "resumed", stream=shown, enabled=True, initial=6)
    bar.update(1)
    bar.close()
    assert "6/10" in shown.getvalue()  # drawn at once, from the resumed count
    bar = progress_bar(3, stream=hidden, enabled=False)
    bar.update(3)
    bar.close()
    assert hidden.getvalue() == ""
