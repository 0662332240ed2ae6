"""One matrix run, as ``robustmatrix run`` and ``robustmatrix nightly`` both do it: pick the executor,
record the run, let the runner fill the database, and link the run to the cells it covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.execution.executor import Executor, LocalExecutor
from bench.execution.pool_executor import PoolExecutor, auto_workers
from bench.execution.progress import Progress
from bench.execution.runner import Runner, RunSummary
from bench.execution.shard import Shard
from bench.execution.workbench import Workbench
from bench.execution.worker import WorkerSettings
from bench.foundation.config import MatrixSpec
from bench.foundation.data import load_dataset
from bench.foundation.device import cuda_precision, resolve_device, worker_devices
from bench.foundation.errors import RobustMatrixError
from bench.foundation.keys import versions
from bench.foundation.registry import ATTACKS, DEFENSES
from bench.storage.store import Store, checkpoint_dir

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutionOptions:
    executor: str = "local"
    address: str | None = None
    """A Ray cluster to join (``auto``, ``HOST:6379`` or ``ray://HOST:10001``); None starts a local one."""
    device: str = "auto"
    workers: int | None = None
    """Local executor: worker processes (None: one per usable core on a CPU, one per visible GPU for
    ``auto``/``cuda``, one for ``cuda:N``)."""
    cpus_per_task: int = 1
    gpus_per_task: float = 1.0
    gpus_per_training: float = 1.0

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise RobustMatrixError(f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}")
        if self.address is not None and self.executor != "ray":
            raise RobustMatrixError("--address names a Ray cluster: use it with --executor ray")
        if self.workers is not None and self.executor != "local":
            raise RobustMatrixError("--workers is for the local executor: Ray schedules its tasks itself")
        if self.workers is not None and self.workers < 1:
            raise RobustMatrixError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_task < 1:
            raise RobustMatrixError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        for name, value in (("--gpus-per-task", self.gpus_per_task), ("--gpus-per-training", self.gpus_per_training)):
            if not 0 < value <= 64:
                raise RobustMatrixError(f"{name} must be a positive number of GPUs (a fraction shares one): {value}")


@dataclass
class RunResult:
    run_id: int
    summary: RunSummary
    device: str


def component_modules(spec: MatrixSpec) -> tuple[str, ...]:
    """Modules defining the matrix's components, so Ray workers can register ones that are neither
    built in nor installed as plugins (a component defined in a user's own importable module)."""
    modules = set()
    for component in [*DEFENSES.select(list(spec.defenses)), *ATTACKS.select(list(spec.attacks))]:
        factory = component.factory
        name = factory.split(":")[0] if isinstance(factory, str) else getattr(factory, "__module__", None)
        if name and name != "__main__":
            modules.add(name)
    return tuple(sorted(modules))


def make_executor(
    options: ExecutionOptions,
    spec: MatrixSpec,
    db_path: Path,
    data_dir: str | None,
    download: bool,
    progress: Progress,
) -> tuple[Executor, str]:
    """The executor, and the device its jobs run on (as recorded with the run)."""
    if options.executor == "local":
        device = resolve_device(options.device)
        devices = worker_devices(options.device)
        workers = options.workers if options.workers is not None else auto_workers(devices)
        if workers > 1 or device.type == "cuda":  # a CUDA job runs in a worker that can be replaced
            settings = WorkerSettings(
                spec.dataset,
                str(device),
                data_dir,
                download,
                options.cpus_per_task,
                component_modules(spec),
                pretrained=tuple(spec.pretrained.values()),
                checkpoint_cache=str(checkpoint_dir(db_path)),
            )
            pool = PoolExecutor(settings, workers, training_timeout=spec.training_timeout, devices=devices)
            return pool, f"{device} ({workers} worker{'s' if workers > 1 else ''})"
        workbench = Workbench(
            spec.dataset,
            device,
            checkpoint_dir(db_path),
            data_dir=data_dir,
            download=download,
            on_epoch=progress.epoch,
            on_batch=progress.batch,
            on_attack=progress.attack if progress.interactive else None,
        )
        return LocalExecutor(workbench, threads=options.cpus_per_task), str(device)
    from bench.execution.ray_executor import RayExecutor

    settings = WorkerSettings(
        spec.dataset,
        options.device,
        data_dir,
        download,
        options.cpus_per_task,
        component_modules(spec),
        pretrained=tuple(spec.pretrained.values()),
    )
    executor = RayExecutor(
        settings,
        checkpoint_dir(db_path),
        address=options.address,
        cpus_per_task=options.cpus_per_task,
        gpus_per_task=options.gpus_per_task,
        gpus_per_training=options.gpus_per_training,
        training_timeout=spec.training_timeout,
    )
    return executor, f"{executor.settings.device} (ray)"


def keyed_environment(device: str, threads: int) -> dict[str, Any]:
    """What of the executor's environment goes into every key: CPU and CUDA results differ (other
    kernels, other reductions), so do CPU results at other torch thread counts, and CUDA results at
    another precision (TF32) or without deterministic algorithms."""
    if device.startswith("cuda"):
        return {"device": "cuda", "threads": None, "precision": cuda_precision()}
    return {"device": "cpu", "threads": int(threads)}


def run_matrix(
    spec: MatrixSpec,
    db_path: Path,
    options: ExecutionOptions,
    *,
    kind: str = "run",
    data_dir: str | None = None,
    download: bool = True,
    retry_failed: bool = False,
    only_defenses: list[str] | None = None,
    shard: Shard | None = None,
    progress: Progress | None = None,
    git_commit: str | None = None,
) -> RunResult:
    """Fill ``db_path`` with the matrix's missing results and record the run. Bad input fails
    before any work starts; results are written the moment they arrive."""
    progress = progress or Progress(enabled=False)
    if options.executor == "local":
        resolve_device(options.device)
    data = load_dataset(spec.dataset, data_dir, download)
    runner = Runner(spec, data, None, progress, retry_failed)
    if only_defenses:
        runner.validate_defenses(DEFENSES.select(only_defenses))  # type: ignore[arg-type]
    executor, device = make_executor(options, spec, db_path, data_dir, download, progress)
    runner.executor = executor
    runner.environment = keyed_environment(device, options.cpus_per_task)
    with executor, Store.open(db_path) as store:
        run_id = store.start_run(kind, spec.to_dict(), device, versions(), git_commit)
        try:
            summary = runner.run(store, only_defenses, shard)
        except BaseException:
            partial: RunSummary | None = getattr(runner, "_summary", None)
            if partial is not None:
                store.link_run_cells(run_id, partial.cell_keys)
            store.finish_run(run_id, "interrupted", partial.computed if partial else 0, 0)
            raise
        store.link_run_cells(run_id, summary.cell_keys)
        store.finish_run(run_id, "ok" if summary.ok else "failed", summary.computed, len(summary.failed))
    return RunResult(run_id, summary, device)
