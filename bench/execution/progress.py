"""Progress bars on stderr (tqdm): matrix cells, training epochs, attack batches, and the attack
inside a cell (forward passes per attacked example, against the attack's declared bound).

Non-interactive use gets one line per finished job instead, so logs of nightly runs stay readable;
quiet mode prints nothing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from bench.foundation.counting import PassCounter

ATTACK_REFRESH = 0.25
"""Seconds between refreshes of the in-cell attack bar (read from a background thread)."""


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._bars: dict[str, Any] = {}

    def _bar(self, name: str, total: int | None, desc: str, position: int, leave: bool) -> Any:
        current = self._bars.get(name)
        if current is not None and current[0] == (total, desc):
            return current[1]
        if current is not None:
            current[1].close()
        bar = tqdm(
            total=total,
            desc=desc,
            position=position,
            leave=leave,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self.interactive,
        )
        self._bars[name] = ((total, desc), bar)
        return bar

    def _close(self, name: str) -> None:
        current = self._bars.pop(name, None)
        if current is not None:
            current[1].close()

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def epoch(self, defense_id: str, epoch: int, epochs: int, loss: float) -> None:
        bar = self._bar("epochs", epochs, f"train {defense_id}", 1, False)
        bar.n = epoch
        bar.set_postfix(loss=f"{loss:.3f}", refresh=True)
        if epoch == epochs:
            self._close("epochs")
            if self.enabled and not self.interactive:
                self.message(f"trained {defense_id}: {epochs} epochs, final loss {loss:.3f}")

    def batch(self, number: int, total: int) -> None:
        if total > 1:
            bar = self._bar("batches", total, "attack batches", 2, False)
            bar.n = number
            bar.refresh()
            if number == total:
                self._close("batches")

    @contextmanager
    def attack(
        self, label: str, counter: PassCounter, examples: int, max_forwards: int | None = None
    ) -> Iterator[None]:
        """Show an attack's progress inside one cell while the block runs: forward passes per
        attacked example so far (``counter`` is the cell's pass counter, read a few times a second
        from a background thread, so the attack's own loop pays nothing), out of ``max_forwards``
        per example when the attack declares a bound. Interactive terminals only."""
        if not self.interactive or examples < 1:
            yield
            return
        bar = self._bar("attack", max_forwards, f"attack {label[:50]}", 3, False)
        bar.unit = " passes/example"
        start = counter.forwards
        done = threading.Event()

        def refresh() -> None:
            while not done.wait(ATTACK_REFRESH):
                bar.n = (counter.forwards - start) // examples
                bar.refresh()

        watcher = threading.Thread(target=refresh, name="robustmatrix-attack-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
            self._close("attack")

    def start_cells(self, total: int) -> None:
        self._bar("cells", total, "matrix cells", 0, True)

    def more_cells(self, count: int) -> None:
        """Cells are planned per defense as it becomes ready: grow the bar's total."""
        current = self._bars.get("cells")
        if current is not None and count:
            bar = current[1]
            bar.total = (bar.total or 0) + count
            bar.refresh()

    def cell_done(self, label: str, outcome: str) -> None:
        current = self._bars.get("cells")
        if current is not None:
            bar = current[1]
            bar.update(1)
            bar.set_postfix_str(label[:60])
        if self.enabled and not self.interactive:
            self.message(f"{label}: {outcome}")

    def close(self) -> None:
        for name in list(self._bars):
            self._close(name)
