"""Executors run jobs and hand back their outcomes as they finish; only the driver writes the database.

The runner submits jobs as soon as they can run — a defense's evaluation when its checkpoint
exists, its cells when it is evaluated — and takes outcomes back one at a time with
``next_finished``, writing each to the database before asking for the next. An executor never
raises for a job's own failure: a cell that fails comes back as a failed ``CellRecord``, a training
or evaluation that fails as a :class:`JobFailure`, so one broken defense costs only its own cells.

``LocalExecutor`` runs jobs in this process, one at a time, depth first (cells before evaluations
before trainings), so results appear early; ``bench.execution.pool_executor.PoolExecutor`` runs them in that
order in worker processes on this machine; ``bench.execution.ray_executor.RayExecutor`` runs them as Ray tasks.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from bench.execution.jobs import CellJob, EvaluationJob, TrainingJob, VerificationJob
from bench.execution.workbench import (
    DeviceFault,
    Workbench,
    failed_cell,
    failed_verification,
    failure_reason,
    is_cuda_error,
    is_out_of_memory,
)
from bench.storage.store import CellRecord, EvaluationRecord, TrainingRecord, VerificationRecord

Job = TrainingJob | EvaluationJob | CellJob | VerificationJob
Outcome = TrainingRecord | EvaluationRecord | CellRecord | VerificationRecord


@dataclass(frozen=True)
class JobFailure:
    """A training or evaluation that raised: the runner records it and skips that defense's cells."""

    job: TrainingJob | EvaluationJob
    error: str

    @property
    def kind(self) -> str:
        return "training" if isinstance(self.job, TrainingJob) else "evaluation"

    @property
    def training(self) -> TrainingJob:
        return self.job if isinstance(self.job, TrainingJob) else self.job.training


MAX_FAULT_RETRIES = 2
"""How often a job that hit a :class:`DeviceFault` is retried (on a fresh worker where the executor
has workers) before it is recorded as failed with the fault's reason."""


def run_job(workbench: Workbench, job: Job) -> Outcome | JobFailure:
    """Run one job on a workbench; a failing training or evaluation becomes a JobFailure
    (a cell turns its own failures into a failed record). A CUDA error or out-of-memory raises
    :class:`DeviceFault` instead: the worker is at fault, not the job."""
    if isinstance(job, CellJob):
        return workbench.run_cell(job)
    if isinstance(job, VerificationJob):
        return workbench.verify(job)
    try:
        return workbench.train(job) if isinstance(job, TrainingJob) else workbench.evaluate(job)
    except Exception as exc:  # noqa: BLE001 - recorded with its reason; other defenses go on
        if is_cuda_error(exc) or is_out_of_memory(exc):
            raise DeviceFault(failure_reason(exc)) from exc
        return JobFailure(job, failure_reason(exc))


def job_key(job: Job) -> str:
    """The key a job's result is stored under."""
    if isinstance(job, CellJob):
        return job.cell_key
    if isinstance(job, VerificationJob):
        return job.verification_key
    return job.training_key if isinstance(job, TrainingJob) else job.eval_key


def after_faults(job: Job, tries: int, fault: str) -> Outcome | JobFailure:
    """The failed outcome of a job that hit a device fault on every one of ``tries`` tries."""
    return job_failed(job, f"{fault} (a device fault, on each of {tries} tries)"[:500])


def job_failed(job: Job, reason: str) -> Outcome | JobFailure:
    """The outcome of a job that could not run at all (its worker died, its task was lost): a failed
    record for a cell, a JobFailure for a training or evaluation."""
    if isinstance(job, VerificationJob):
        return failed_verification(job, reason)
    return failed_cell(job, reason) if isinstance(job, CellJob) else JobFailure(job, reason)


GRACE_SECONDS = 10.0
"""How long past its budget a job in a worker process or Ray task may run before the driver kills
it. ``SIGALRM`` stops Python code inside the worker; the grace lets it do so (and record what it
can) before the driver assumes the job is stuck where no signal reaches: C code, a GPU kernel."""


def driver_limit(job: Job, training_timeout: float | None) -> float | None:
    """The budget the driver enforces on ``job`` (before the grace): a cell's ``cell_timeout``,
    a training's ``training_timeout``; None for evaluations and unbudgeted jobs."""
    if isinstance(job, CellJob):
        return job.timeout
    return training_timeout if isinstance(job, TrainingJob) else None


def killed_by_driver(job: Job, limit: float, grace: float) -> Outcome | JobFailure:
    """The failed outcome of a job the driver killed for running past ``limit`` + ``grace`` seconds."""
    kind = "cell" if isinstance(job, CellJob) else "training" if isinstance(job, TrainingJob) else "evaluation"
    return job_failed(
        job, f"timeout: {kind} ran past its time budget of {limit:g} s and {grace:g} s of grace; killed by the driver"
    )


class Executor(ABC):
    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queue a job; its outcome comes back from :meth:`next_finished`."""

    @abstractmethod
    def pending(self) -> int:
        """Jobs submitted whose outcome has not been handed back yet."""

    @abstractmethod
    def next_finished(self) -> Outcome | JobFailure:
        """Block until a submitted job finishes and return its outcome (in completion order)."""

    def run_all(self, jobs: Iterable[Job]) -> Iterator[Outcome | JobFailure]:
        """Submit ``jobs`` and yield every outcome as it finishes (for callers without dependencies)."""
        for job in jobs:
            self.submit(job)
        while self.pending():
            yield self.next_finished()

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless an executor holds workers
        """Release workers (nothing to do for the local executor)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PRIORITY = {CellJob: 0, VerificationJob: 0, EvaluationJob: 1, TrainingJob: 2}


class LocalExecutor(Executor):
    """Jobs in this process, one at a time. With ``threads``, torch runs on that many threads until
    :meth:`close` (a worker process's count: results are bit-identical at equal thread counts)."""

    def __init__(self, workbench: Workbench, threads: int | None = None) -> None:
        self.workbench = workbench
        self._queue: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._threads_before: int | None = None
        if threads is not None:
            import torch

            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def close(self) -> None:
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def submit(self, job: Job) -> None:
        heapq.heappush(self._queue, (PRIORITY[type(job)], next(self._order), job))

    def pending(self) -> int:
        return len(self._queue)

    def next_finished(self) -> Outcome | JobFailure:
        """The next job's outcome. A device fault is retried in this process, which has no fresh
        worker to move to (a transient fault passes; after a device-side assert the tries fail too)."""
        _, _, job = heapq.heappop(self._queue)
        fault = ""
        for _ in range(MAX_FAULT_RETRIES + 1):
            try:
                return run_job(self.workbench, job)
            except DeviceFault as exc:
                fault = str(exc)
        return after_faults(job, MAX_FAULT_RETRIES + 1, fault)
