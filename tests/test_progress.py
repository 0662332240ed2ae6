"""Progress output: the attack inside a cell is visible on a terminal, and quiet mode prints nothing."""

from __future__ import annotations

import contextlib
import io
import time

from bench.execution.progress import ATTACK_REFRESH, Progress
from bench.foundation.counting import PassCounter


def _run_attack(progress: Progress, counter: PassCounter) -> None:
    with progress.attack("pgd-linf-v1 vs standard-v1 at eps 0.1", counter, examples=100, max_forwards=21):
        for _ in range(8):
            counter.forwards += 100
            time.sleep(ATTACK_REFRESH / 2)


def test_attack_progress_inside_one_cell_is_shown_on_a_terminal():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        progress = Progress(enabled=True)
        progress.interactive = True  # as on a terminal
        _run_attack(progress, PassCounter())
        progress.close()
    text = err.getvalue()
    assert "attack pgd-linf-v1 vs standard-v1" in text and "/21" in text, text
    assert "passes/example" in text


def test_quiet_and_non_interactive_progress_print_no_attack_bar():
    for enabled in (False, True):  # --quiet; and a log file (not a terminal)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            progress = Progress(enabled=enabled)
            _run_attack(progress, PassCounter())
            progress.close()
        assert err.getvalue() == ""
