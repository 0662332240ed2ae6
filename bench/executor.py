"""Executors run jobs and hand back records as they finish; only the driver writes the database.

``LocalExecutor`` runs everything in this process, in order. A distributed executor implements the
same three methods (yielding records in completion order) and nothing else changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

from bench.jobs import CellJob, EvaluationJob, TrainingJob
from bench.store import CellRecord, EvaluationRecord, TrainingRecord
from bench.workbench import Workbench


class Executor(ABC):
    @abstractmethod
    def train(self, jobs: Iterable[TrainingJob]) -> Iterator[TrainingRecord]: ...

    @abstractmethod
    def evaluate(self, jobs: Iterable[EvaluationJob]) -> Iterator[EvaluationRecord]: ...

    @abstractmethod
    def run_cells(self, jobs: Iterable[CellJob]) -> Iterator[CellRecord]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless an executor holds workers
        """Release workers (nothing to do for the local executor)."""


class LocalExecutor(Executor):
    def __init__(self, workbench: Workbench) -> None:
        self.workbench = workbench

    def train(self, jobs: Iterable[TrainingJob]) -> Iterator[TrainingRecord]:
        for job in jobs:
            yield self.workbench.train(job)

    def evaluate(self, jobs: Iterable[EvaluationJob]) -> Iterator[EvaluationRecord]:
        for job in jobs:
            yield self.workbench.evaluate(job)

    def run_cells(self, jobs: Iterable[CellJob]) -> Iterator[CellRecord]:
        for job in jobs:
            yield self.workbench.run_cell(job)
