"""Run jobs in worker processes on this machine, so a CPU's cores work on the matrix in parallel.

Each worker is a spawned process with its own ``Workbench`` and a fixed number of torch threads
(one by default: the digits-sized models gain almost nothing from a second thread, while a second
worker nearly halves a run). Checkpoints are files in the driver's checkpoint folder, which every
worker reads; only the driver writes the database, one outcome at a time, as with every executor.

Jobs go to idle workers in the local executor's order (cells, then evaluations, then trainings).
The eps cells of one minimum-norm attack on one defense share a single minimal run, cached in the
worker that made it, so they all go to that worker. A worker that dies (killed, out of memory)
costs only the job it was running, recorded as failed with the reason; a new worker takes its place
(and its GPU: on a node with N GPUs worker i is pinned to ``cuda:i mod N``).
So does a worker whose cell (or training) runs past its budget plus ``GRACE_SECONDS``: the driver
kills it, since a job stuck in C code or a GPU kernel never sees ``SIGALRM``. A CUDA error in a job
(a device-side assert poisons the process's context) ends its worker instead of being stored; a
fresh worker on the same GPU retries the job, ``MAX_FAULT_RETRIES`` times at most.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from bench.execution.executor import (
    GRACE_SECONDS,
    MAX_FAULT_RETRIES,
    PRIORITY,
    Executor,
    Job,
    JobFailure,
    Outcome,
    after_faults,
    driver_limit,
    job_failed,
    job_key,
    killed_by_driver,
    run_job,
)
from bench.execution.jobs import CellJob
from bench.execution.workbench import DeviceFault, failure_reason, minimal_run_key
from bench.execution.worker import WorkerSettings, workbench_for
from bench.foundation.errors import RobustMatrixError

MAX_AUTO_WORKERS = 8
"""``--workers auto`` takes one worker per usable core, at most this many: every worker holds its
own copy of torch, the data and the models it has loaded."""


def auto_workers(devices: Sequence[str]) -> int:
    """One worker per GPU of ``devices`` (each GPU is kept busy by one worker's batches); on a CPU one
    per usable core (at most MAX_AUTO_WORKERS)."""
    if devices and devices[0].startswith("cuda"):
        return len(devices)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = multiprocessing.cpu_count()
    return max(1, min(cores, MAX_AUTO_WORKERS))


STARTED = -1
"""What a worker sends when it takes a job, before its outcome: the driver's budget clock starts."""
FAULT = -2
"""What a worker sends instead of an outcome after a device fault, just before it exits."""


def _die_with_parent() -> None:
    """Linux: a worker is killed when the driver dies (kill -9 included) instead of finishing its
    job for nobody. Elsewhere the closed pipe stops it after its current job."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def serve(connection: Connection, settings: WorkerSettings) -> None:
    """A worker's loop: run each job it is sent and send its outcome back; stop at None or when the
    driver is gone."""
    _die_with_parent()
    # Ctrl-C and Slurm's SIGTERM reach the whole process group: they are the driver's to handle (it
    # records the run as interrupted, then kills its workers), not a reason to fail the running job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        bench, broken = workbench_for(settings), None
    except Exception as exc:  # noqa: BLE001 - every job this worker is sent fails with the reason
        bench, broken = None, f"the worker could not start: {failure_reason(exc)}"
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        number, job = message
        try:
            connection.send((STARTED, None))
        except (BrokenPipeError, ConnectionError):
            return
        try:
            outcome = run_job(bench, job) if bench is not None else job_failed(job, broken or "")
        except DeviceFault as fault:  # this process's CUDA context may be unusable: end it
            with contextlib.suppress(BrokenPipeError, ConnectionError):
                connection.send((FAULT, str(fault)))
            return
        try:
            connection.send((number, outcome))
        except (BrokenPipeError, ConnectionError):
            return


@dataclass
class _Worker:
    process: Any
    connection: Connection
    slot: int = 0
    """Its place in the pool, which fixes its device: a replacement takes the same slot."""
    running: tuple[int, Job] | None = None
    deadline: float | None = None
    """``time.monotonic()`` past which the driver kills the running job (None: no budget)."""


def _affinity(job: Job) -> str | None:
    """Jobs that must run on the same worker: a minimum-norm attack's cells on one defense."""
    if isinstance(job, CellJob) and not job.bounded:
        return minimal_run_key(job)
    return None


class PoolExecutor(Executor):
    """``workers`` processes, each running one job at a time; outcomes come back in completion order."""

    def __init__(
        self,
        settings: WorkerSettings,
        workers: int,
        training_timeout: float | None = None,
        grace: float = GRACE_SECONDS,
        devices: Sequence[str] | None = None,
    ) -> None:
        """``devices``: worker i runs on ``devices[i % len(devices)]`` (default: ``settings.device``
        for all), so each GPU of a node gets its own workers."""
        if workers < 1:
            raise RobustMatrixError(f"--workers must be at least 1, got {workers}")
        self.settings = settings
        self.training_timeout = training_timeout
        self.grace = grace
        self._context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has threads
        self._queue: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._pinned: dict[str, int] = {}
        self._faults: dict[str, int] = {}
        """Device faults so far per job key."""
        self._size = workers
        self._devices = tuple(devices) if devices else (settings.device,)
        self._workers: list[_Worker] = []  # started with the first job: a cached run starts none

    def settings_for(self, slot: int) -> WorkerSettings:
        """The settings of the worker in ``slot``: the pool's, on that slot's device."""
        return replace(self.settings, device=self._devices[slot % len(self._devices)])

    def _start(self, slot: int) -> _Worker:
        driver_end, worker_end = self._context.Pipe()
        process = self._context.Process(target=serve, args=(worker_end, self.settings_for(slot)), daemon=True)
        process.start()
        worker_end.close()
        return _Worker(process, driver_end, slot)

    # ------------------------------------------------------------------------- the interface
    def submit(self, job: Job) -> None:
        heapq.heappush(self._queue, (PRIORITY[type(job)], next(self._order), job))

    def pending(self) -> int:
        return len(self._queue) + sum(worker.running is not None for worker in self._workers)

    def next_finished(self) -> Outcome | JobFailure:
        self._dispatch()
        while True:
            busy = {worker.connection: worker for worker in self._workers if worker.running is not None}
            if not busy:
                raise RuntimeError("next_finished() with no job submitted")
            ready = wait(list(busy), timeout=self._time_left(busy.values()))
            if not ready:
                overdue = [w for w in busy.values() if w.deadline is not None and time.monotonic() >= w.deadline]
                if overdue:
                    return self._kill(overdue[0])
                continue
            worker = busy[ready[0]]  # type: ignore[index]
            number, job = worker.running  # type: ignore[misc]
            try:
                finished, outcome = worker.connection.recv()
            except (EOFError, OSError):
                outcome = self._lost(worker, job)
            else:
                if finished == STARTED:  # the job's clock starts now, not while the worker imports torch
                    limit = driver_limit(job, self.training_timeout)
                    worker.deadline = None if limit is None else time.monotonic() + limit + self.grace
                    continue
                if finished == FAULT:  # the worker is gone; the job runs again, or has failed
                    failed = self._faulted(worker, job, str(outcome))
                    if failed is None:
                        continue
                    return failed
                if finished != number:  # pragma: no cover - one job per worker at a time
                    raise RuntimeError(f"worker answered job {finished} while running {number}")
            worker.running, worker.deadline = None, None
            self._dispatch()
            return outcome

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                worker.connection.send(None)
        for worker in self._workers:
            worker.process.join(timeout=5 if worker.running is None else 0)
            if worker.process.is_alive():
                worker.process.kill()  # workers ignore SIGTERM
                worker.process.join(timeout=5)
            worker.connection.close()
        self._workers = []
        self._queue.clear()

    # --------------------------------------------------------------------------- scheduling
    def _dispatch(self) -> None:
        """Give every idle worker the first queued job it may run."""
        if self._queue and not self._workers:
            self._workers = [self._start(slot) for slot in range(self._size)]
        for index, worker in enumerate(self._workers):
            if worker.running is None and self._queue:
                job = self._take_for(index)
                if job is not None:
                    number = next(self._order)
                    worker.running, worker.deadline = (number, job), None
                    worker.connection.send((number, job))

    def _take_for(self, index: int) -> Job | None:
        skipped = []
        chosen = None
        while self._queue:
            entry = heapq.heappop(self._queue)
            group = _affinity(entry[2])
            owner = self._pinned.setdefault(group, index) if group is not None else index
            if owner == index:
                chosen = entry[2]
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._queue, entry)
        return chosen

    @staticmethod
    def _time_left(workers: Iterable[_Worker]) -> float | None:
        """Seconds until the first running job's deadline (None: wait for as long as it takes)."""
        deadlines = [worker.deadline for worker in workers if worker.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _kill(self, worker: _Worker) -> Outcome | JobFailure:
        """Kill a worker whose job ran past its budget and grace — stuck where ``SIGALRM`` cannot
        reach (C code, a GPU kernel), so it would never answer — and fail that job; a new worker
        takes its place."""
        _, job = worker.running  # type: ignore[misc]
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.connection.close()
        replacement = self._start(worker.slot)  # same slot, same GPU
        worker.process, worker.connection = replacement.process, replacement.connection
        worker.running, worker.deadline = None, None
        self._dispatch()
        return killed_by_driver(job, driver_limit(job, self.training_timeout) or 0.0, self.grace)

    def _faulted(self, worker: _Worker, job: Job, fault: str) -> Outcome | JobFailure | None:
        """A device fault in ``job``: the worker exits and a fresh one takes its slot (and GPU); the
        job is queued again unless it has had ``MAX_FAULT_RETRIES`` retries, then it fails (returned)."""
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.connection.close()
        replacement = self._start(worker.slot)
        worker.process, worker.connection = replacement.process, replacement.connection
        worker.running, worker.deadline = None, None
        key = job_key(job)
        self._faults[key] = self._faults.get(key, 0) + 1
        failed = after_faults(job, self._faults.pop(key), fault) if self._faults[key] > MAX_FAULT_RETRIES else None
        if failed is None:
            self.submit(job)
        self._dispatch()
        return failed

    def _lost(self, worker: _Worker, job: Job) -> Outcome | JobFailure:
        """The worker died with ``job``: that job fails with the reason, a new worker takes its place."""
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        worker.connection.close()
        reason = f"worker process died (exit code {code})" if code is not None else "worker process stopped answering"
        replacement = self._start(worker.slot)  # same slot, same GPU
        worker.process, worker.connection = replacement.process, replacement.connection
        return job_failed(job, reason)
