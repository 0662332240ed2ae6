"""Run the matrix on a Ray cluster: trainings, evaluations and cells become Ray tasks.

Only the driver writes the database. Each task returns its record to the driver, which takes them
back one at a time as they finish (``ray.wait``) and writes each before asking for the next, so a
dead driver loses at most the jobs in flight.

Checkpoints travel through Ray's object store, not a shared filesystem: a training task returns
its checkpoint's bytes beside its record, the driver saves them next to its database, and every
evaluation and cell of that defense gets the bytes as a task argument — Ray starts a cell only once
its defense's checkpoint exists, and ships it to whichever node runs the cell. A worker keeps a
file cache of checkpoints and one ``Workbench`` per process, so consecutive tasks on a worker reuse
the loaded data and models.

With CUDA, a training task asks Ray for ``gpus_per_training`` GPUs and an evaluation or cell for
``gpus_per_task`` (a fraction lets several small cells share one GPU). Each task runs torch with
``cpus_per_task`` threads: CPU results are bit-identical to the local executor's at the same
number of threads.

A cell (or training) still running ``GRACE_SECONDS`` past its budget is stuck where ``SIGALRM``
cannot reach (C code, a GPU kernel): the driver cancels its task with ``force=True``, which kills the
worker process, and stores the job as failed. A small actor (:class:`Clock`) tells how long each task
has run, since a task's time in Ray's queue is not its time running.

Ray is an optional dependency (``pip install 'robustmatrix[ray]'``); nothing imports this module
unless ``--executor ray`` is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.execution.executor import (
    GRACE_SECONDS,
    Executor,
    Job,
    JobFailure,
    Outcome,
    driver_limit,
    job_failed,
    killed_by_driver,
    run_job,
)
from bench.execution.jobs import CellJob, EvaluationJob, TrainingJob
from bench.execution.workbench import Workbench, failed_cell, failure_reason
from bench.execution.worker import WorkerSettings, workbench_for
from bench.foundation.errors import RobustMatrixError
from bench.storage.store import TrainingRecord

LOCAL_ONLY_ENV = {
    # A local instance listens on the loopback interface only and reports no usage statistics.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def import_ray(local: bool) -> Any:
    """Import Ray, or explain how to get it. A local instance is configured before the import
    (Ray reads these settings once, when it is imported)."""
    if local:
        for key, value in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise RobustMatrixError(
            "--executor ray needs Ray, an optional dependency: pip install 'robustmatrix[ray]'"
        ) from None
    return ray


# ----------------------------------------------------------------------------- versions
_VERSIONS: dict[str, str] = {}


def code_versions(job: Job) -> dict[str, str]:
    """Everything whose code determines a job's result, as this process has it: the harness
    (RESULTS_VERSION), the keyed libraries, the architectures, the defense (and the surrogate) and,
    for a cell, its attack and every attack a cascade runs. The driver computes it when it submits,
    the worker again before it runs: a worker with other code would store results under the
    driver's keys."""
    import inspect

    import bench.foundation.models
    from bench.foundation.keys import RESULTS_VERSION, digest, keyed_versions
    from bench.foundation.registry import ATTACKS, DEFENSES

    def cached(kind: str, spec_id: str) -> str:
        name = f"{kind}:{spec_id}"
        if name not in _VERSIONS:
            registry = DEFENSES if kind == "defense" else ATTACKS
            _VERSIONS[name] = registry.get(spec_id).code_version()
        return _VERSIONS[name]

    if "models" not in _VERSIONS:
        _VERSIONS["models"] = digest(inspect.getsource(bench.foundation.models))
    out = {"harness": str(RESULTS_VERSION), "models": _VERSIONS["models"]}
    out.update({f"library:{name}": version for name, version in keyed_versions().items()})
    training = job if isinstance(job, TrainingJob) else job.training
    out[f"defense:{training.defense_id}"] = cached("defense", training.defense_id)
    if isinstance(job, CellJob):
        if job.surrogate is not None:
            out[f"defense:{job.surrogate.defense_id}"] = cached("defense", job.surrogate.defense_id)
        for attack_id in (job.attack_id, *(member for member, _ in job.member_versions)):
            out[f"attack:{attack_id}"] = cached("attack", attack_id)
    return out


def version_mismatch(job: Job, expected: Mapping[str, str]) -> str | None:
    """The first component whose code on this worker differs from the driver's, as one line."""
    try:
        here = code_versions(job)
    except RobustMatrixError as exc:
        return f"on the Ray worker: {exc}"
    for name, version in expected.items():
        if here.get(name) != version:
            return (
                f"the worker's {name} (version {here.get(name, 'absent')}) differs from the driver's "
                f"({version}); install the same code on every worker"
            )
    return None


# ----------------------------------------------------------------------------- worker side


def _materialize(bench: Workbench, training: TrainingJob | None, checkpoint: bytes | None) -> None:
    """Write a checkpoint shipped by the driver into this worker's cache (atomically, once)."""
    if training is None or checkpoint is None:
        return
    path = bench.checkpoint_dir / training.checkpoint
    if path.exists() and _sha256(path) == hashlib.sha256(checkpoint).hexdigest():
        return  # a file of the same size may be another model (a truncated or foreign write)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(checkpoint)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Clock:
    """A Ray actor that knows how long each budgeted task has been running. The driver cannot tell:
    a task waits in Ray's queue for a free CPU or GPU, so its time since submission is not its time
    running. Each task reports its start; durations are measured on the actor's own clock."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def start(self, key: str) -> None:
        self._started[key] = time.monotonic()

    def running_for(self, keys: list[str]) -> dict[str, float]:
        now = time.monotonic()
        return {key: now - self._started[key] for key in keys if key in self._started}

    def forget(self, key: str) -> None:
        self._started.pop(key, None)


def _job_key(job: Job) -> str:
    if isinstance(job, TrainingJob):
        return job.training_key
    return job.eval_key if isinstance(job, EvaluationJob) else job.cell_key


def _started(clock: Any, job: Job) -> None:
    if clock is not None:
        clock.start.remote(_job_key(job))


def train_task(
    settings: WorkerSettings, job: TrainingJob, expected: Mapping[str, str], clock: Any = None
) -> tuple[Outcome | JobFailure, bytes | None]:
    _started(clock, job)
    bench = workbench_for(settings)  # loads the components, whose versions are compared next
    mismatch = version_mismatch(job, expected)
    if mismatch:
        return job_failed(job, mismatch), None
    outcome = run_job(bench, job)
    if not isinstance(outcome, TrainingRecord):
        return outcome, None
    return outcome, (bench.checkpoint_dir / job.checkpoint).read_bytes()


def evaluate_task(
    settings: WorkerSettings, job: EvaluationJob, checkpoint: bytes, expected: Mapping[str, str], clock: Any = None
) -> Outcome | JobFailure:
    _started(clock, job)
    bench = workbench_for(settings)
    mismatch = version_mismatch(job, expected)
    if mismatch:
        return job_failed(job, mismatch)
    _materialize(bench, job.training, checkpoint)
    return run_job(bench, job)


def cell_task(
    settings: WorkerSettings,
    job: CellJob,
    checkpoint: bytes,
    surrogate_checkpoint: bytes | None,
    expected: Mapping[str, str],
    clock: Any = None,
) -> Outcome | JobFailure:
    _started(clock, job)
    bench = workbench_for(settings)
    mismatch = version_mismatch(job, expected)
    if mismatch:
        return failed_cell(job, mismatch, device=str(bench.foundation.device))
    _materialize(bench, job.training, checkpoint)
    _materialize(bench, job.surrogate, surrogate_checkpoint)
    return run_job(bench, job)


# ----------------------------------------------------------------------------- driver side
@dataclass
class _Pending:
    job: Job
    checkpoint: Any = None
    """For a training: the reference to its checkpoint bytes (the task's second return value)."""
    limit: float | None = None
    """The job's budget, which the driver enforces (plus the grace) by cancelling the task."""
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class RayExecutor(Executor):
    """Submit jobs as Ray tasks; hand back outcomes in completion order; save checkpoints locally."""

    settings: WorkerSettings
    checkpoint_dir: Path
    address: str | None = None
    cpus_per_task: float = 1
    gpus_per_task: float = 1.0
    gpus_per_training: float = 1.0
    max_retries: int = 2
    """How often Ray re-runs a task whose worker process died (results are keyed, so re-running is safe)."""
    training_timeout: float | None = None
    grace: float = GRACE_SECONDS
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    _pending: dict[Any, _Pending] = field(default_factory=dict, init=False)
    _checkpoints: dict[str, Any] = field(default_factory=dict, init=False)
    _clock: Any = field(default=None, init=False)
    """The Clock actor, started with the first budgeted job."""

    def __post_init__(self) -> None:
        # ``--address local`` is the same new instance as no address, so it gets the same loopback-only
        # hardening: a local instance bound to every interface would take jobs from anyone who can reach it.
        local = self.address in (None, "local")
        self.ray = import_ray(local=local)
        self._started_here = False
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, **self.init_kwargs}
            if local:
                # "local" starts a new instance even where RAY_ADDRESS or `ray start` names a cluster:
                # joining one is what --address is for.
                kwargs.setdefault("_node_ip_address", "127.0.0.1")
            else:
                require_reachable(str(self.address))
            try:
                self.ray.init(address="local" if local else self.address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = "a local Ray instance" if local else f"the Ray cluster at {self.address}"
                raise RobustMatrixError(f"cannot start or reach {where}: {failure_reason(exc)}") from None
            self._started_here = True
        try:
            self.settings = replace(self.settings, device=ray_device(self.settings.device, cluster_gpus(self.ray)))
        except RobustMatrixError:
            self.close()
            raise
        gpu = self.settings.device == "cuda"
        common = {"max_retries": self.max_retries, "num_cpus": self.cpus_per_task}
        remote = self.ray.remote
        self._train = remote(train_task).options(num_returns=2, num_gpus=self.gpus_per_training if gpu else 0, **common)
        self._evaluate = remote(evaluate_task).options(num_gpus=self.gpus_per_task if gpu else 0, **common)
        self._cell = remote(cell_task).options(num_gpus=self.gpus_per_task if gpu else 0, **common)

    # ------------------------------------------------------------------------- submitting
    def submit(self, job: Job) -> None:
        expected = code_versions(job)
        limit = driver_limit(job, self.training_timeout)
        clock = self._budget_clock() if limit is not None else None
        if isinstance(job, TrainingJob):
            record_ref, checkpoint_ref = self._train.remote(self.settings, job, expected, clock)
            self._pending[record_ref] = _Pending(job, checkpoint_ref, limit)
            return
        if isinstance(job, EvaluationJob):
            ref = self._evaluate.remote(self.settings, job, self._checkpoint(job.training), expected, clock)
        else:
            surrogate = self._checkpoint(job.surrogate) if job.surrogate is not None else None
            ref = self._cell.remote(self.settings, job, self._checkpoint(job.training), surrogate, expected, clock)
        self._pending[ref] = _Pending(job, limit=limit)

    def _budget_clock(self) -> Any:
        if self._clock is None:
            self._clock = self.ray.remote(num_cpus=0)(Clock).remote()
        return self._clock

    def _checkpoint(self, training: TrainingJob) -> Any:
        """The object-store reference of a defense's checkpoint (put once from the driver's file
        when it was trained in an earlier run)."""
        ref = self._checkpoints.get(training.training_key)
        if ref is None:
            path = self.checkpoint_dir / training.checkpoint
            ref = self.ray.put(path.read_bytes())
            self._checkpoints[training.training_key] = ref
        return ref

    # -------------------------------------------------------------------------- collecting
    def pending(self) -> int:
        return len(self._pending)

    def next_finished(self) -> Outcome | JobFailure:
        while True:
            ready, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=self._poll())
            if ready:
                break
            overdue = self._overdue()
            if overdue is not None:
                entry = self._pending.pop(overdue)
                with contextlib.suppress(Exception):  # it may have finished meanwhile: it is failed anyway
                    self.ray.cancel(overdue, force=True)
                    self._clock.forget.remote(_job_key(entry.job))
                return killed_by_driver(entry.job, entry.limit or 0.0, self.grace)
        (ref,) = ready
        entry = self._pending.pop(ref)
        try:
            result = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the worker died or the task was lost: only this job fails
            return job_failed(entry.job, f"Ray task failed: {failure_reason(exc)}")
        if isinstance(entry.job, TrainingJob):
            return self._trained(entry, result)
        return result

    def _suspects(self) -> dict[Any, _Pending]:
        """Budgeted tasks submitted longer ago than budget + grace: only these can be overdue."""
        now = time.monotonic()
        return {
            ref: entry
            for ref, entry in self._pending.items()
            if entry.limit is not None and now - entry.submitted >= entry.limit + self.grace
        }

    def _poll(self) -> float | None:
        """How long to wait for a result before checking budgets again (None: no budgeted task)."""
        budgeted = [entry for entry in self._pending.values() if entry.limit is not None]
        if not budgeted:
            return None
        now = time.monotonic()
        return max(1.0, min(entry.submitted + (entry.limit or 0.0) + self.grace - now for entry in budgeted))

    def _overdue(self) -> Any:
        """The reference of a task running past its budget and grace, on the clock actor's count."""
        suspects = self._suspects()
        if not suspects:
            return None
        keys = {_job_key(entry.job): ref for ref, entry in suspects.items()}
        try:
            running = self.ray.get(self._clock.running_for.remote(list(keys)), timeout=30)
        except Exception:  # noqa: BLE001 - the clock is unreachable: check again at the next poll
            return None
        for key, seconds in running.items():
            if seconds >= (suspects[keys[key]].limit or 0.0) + self.grace:
                return keys[key]
        return None

    def _trained(self, entry: _Pending, outcome: Outcome | JobFailure) -> Outcome | JobFailure:
        """Save a finished training's checkpoint beside the driver's database, then hand back its
        record (the runner counts a training as done once both exist)."""
        assert isinstance(entry.job, TrainingJob)
        if not isinstance(outcome, TrainingRecord):
            return outcome
        try:
            data = self.ray.get(entry.checkpoint)
        except Exception as exc:  # noqa: BLE001
            return JobFailure(entry.job, f"Ray lost the checkpoint: {failure_reason(exc)}")
        path = self.checkpoint_dir / entry.job.checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        self._checkpoints[entry.job.training_key] = entry.checkpoint
        return outcome

    def close(self) -> None:
        for ref in list(self._pending):
            with contextlib.suppress(Exception):  # best effort on the way out
                self.ray.cancel(ref, force=True)
        self._pending.clear()
        self._checkpoints.clear()
        if self._clock is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(self._clock)
            self._clock = None
        if self._started_here and self.ray.is_initialized():
            self.ray.shutdown()


def require_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a cluster address nobody answers at: Ray itself retries for minutes in silence.
    ``auto`` (the cluster this node belongs to) is left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:([0-9]+)/?", address.strip())
    if address.strip() == "auto" or match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise RobustMatrixError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def ray_device(name: str, gpus: float) -> str:
    """The device Ray tasks use. Ray assigns each task its GPU, so only auto, cpu and cuda make sense."""
    if re.fullmatch(r"cuda:[0-9]+", name):
        raise RobustMatrixError(f"with --executor ray, Ray assigns GPUs to tasks: use --device cuda, not {name}")
    if name not in ("auto", "cpu", "cuda"):
        raise RobustMatrixError(f"bad device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and gpus <= 0:
        raise RobustMatrixError("--device cuda but the Ray cluster has no GPUs")
    if name == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return name
