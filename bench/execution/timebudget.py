"""Time budgets for jobs: a cell that runs past its budget is stopped and recorded as failed.

A watchdog thread cannot stop Python code running in another thread, so the budget is enforced
with ``SIGALRM``: when the timer fires, the signal handler raises :class:`TimeBudgetExceeded` in
whatever Python code the job is running — inside an attack's loop, in the middle of one batch.
Signals reach only the main thread, which is where the local executor and Ray workers run jobs.
Elsewhere (a job run from a helper thread, or a platform without ``SIGALRM``) the budget falls back
to :meth:`Budget.check`, which the workbench calls between attack batches.

A single C call (one huge convolution) is not interrupted mid-call: the exception is raised when
it returns to Python. Ray tasks enforce their budget the same way, inside the task. A job stuck in
a call that never returns (a hung GPU kernel, or C code that blocks signals) is the driver's to end:
the worker pool kills its process and Ray cancels its task with ``force=True``, budget plus
``bench.execution.executor.GRACE_SECONDS`` after it started.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType


class TimeBudgetExceeded(BaseException):
    """Raised inside a job that ran past its budget. A ``BaseException`` (like ``KeyboardInterrupt``)
    so that an attack's own ``except Exception`` cannot swallow it."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"exceeded its time budget of {seconds:g} s")
        self.seconds = seconds


@dataclass
class Budget:
    seconds: float | None
    deadline: float | None
    interrupts: bool
    """True when the budget is enforced by a signal (it can stop a job inside a batch)."""

    def check(self) -> None:
        """Raise if the deadline has passed (the cooperative check between batches)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeBudgetExceeded(self.seconds or 0.0)


def _can_interrupt() -> bool:
    return (
        hasattr(signal, "SIGALRM")
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # nobody else's timer is running
    )


@contextmanager
def time_budget(seconds: float | None) -> Iterator[Budget]:
    """Run the block under a budget of ``seconds`` (None: no budget). Raises TimeBudgetExceeded."""
    if seconds is None:
        yield Budget(None, None, False)
        return
    deadline = time.monotonic() + seconds
    if not _can_interrupt():
        yield Budget(seconds, deadline, False)
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeBudgetExceeded(seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield Budget(seconds, deadline, True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
