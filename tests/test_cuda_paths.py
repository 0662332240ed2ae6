"""The GPU paths, on the CPU: worker-per-GPU scheduling with faked device counts, the evaluation
precision settings, and CUDA faults (out of memory, a device-side assert) raised by fake attacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.execution import launch
from bench.execution.executor import LocalExecutor
from bench.execution.jobs import TrainingJob
from bench.execution.pool_executor import PoolExecutor, auto_workers
from bench.execution.progress import Progress
from bench.execution.runner import Runner
from bench.execution.worker import WorkerSettings
from bench.foundation.config import MatrixSpec
from bench.foundation.device import evaluation_precision, prepare_device, worker_devices
from bench.storage.store import Store
from tests.components import HEADER, components
from tests.conftest import TINY_MATRIX, run_cli, write_matrix


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch, torch_flags: None) -> None:
    """A node with four visible CUDA GPUs, as far as device selection and pinning can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def test_one_worker_per_gpu(four_gpus: None) -> None:
    gpus = [f"cuda:{i}" for i in range(4)]
    assert worker_devices("auto") == worker_devices("cuda") == gpus
    assert auto_workers(gpus) == 4, "--workers auto: one worker per visible GPU"
    assert worker_devices("cuda:2") == ["cuda:2"] and auto_workers(["cuda:2"]) == 1, "cuda:N pins to one GPU"
    assert worker_devices("cpu") == ["cpu"]


class _FakeProcess:
    """A worker process that never starts: the pool's bookkeeping alone."""

    started: list[str] = []

    def __init__(self, target: object, args: tuple[object, WorkerSettings], daemon: bool) -> None:
        self.settings = args[1]
        self.exitcode = -9

    def start(self) -> None:
        _FakeProcess.started.append(self.settings.device)

    def join(self, timeout: float | None = None) -> None:
        pass

    def kill(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False


class _FakeConnection:
    def send(self, message: object) -> None:
        pass

    def close(self) -> None:
        pass


def _pool(monkeypatch: pytest.MonkeyPatch, workers: int, devices: list[str]) -> PoolExecutor:
    pool = PoolExecutor(WorkerSettings("digits", devices[0]), workers, devices=devices)
    monkeypatch.setattr(pool._context, "Process", _FakeProcess)
    monkeypatch.setattr(pool._context, "Pipe", lambda: (_FakeConnection(), _FakeConnection()))
    _FakeProcess.started = []
    return pool


def test_workers_are_pinned_round_robin_and_a_replacement_keeps_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [f"cuda:{i}" for i in range(4)]
    pool = _pool(monkeypatch, 8, gpus)
    job = TrainingJob("t" * 32, "standard-v1", {}, "digits", 0, "c.pt")
    pool._queue = []  # start the workers without running anything
    pool.submit(job)
    pool._dispatch()
    assert _FakeProcess.started == gpus + gpus, "worker i on cuda:(i mod 4), not every worker on cuda:0"
    busy = next(w for w in pool._workers if w.running is not None)
    assert busy.process.settings.device == "cuda:0"
    third = pool._workers[2]
    third.running = (99, job)
    pool._lost(third, job)  # died (a driver kill goes through the same replacement)
    assert third.process.settings.device == "cuda:2", "the replacement keeps the dead worker's GPU"
    pool._workers = []


def test_cuda_n_pins_every_worker_to_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _pool(monkeypatch, 3, ["cuda:1"])
    assert [pool.settings_for(slot).device for slot in range(3)] == ["cuda:1"] * 3


def test_make_executor_spreads_auto_over_the_gpus(four_gpus: None, tmp_path: Path) -> None:
    spec = MatrixSpec(defenses=("standard-v1",), attacks=("fgsm-linf-v1",))
    executor, described = launch.make_executor(
        launch.ExecutionOptions(device="auto"), spec, tmp_path / "r.db", None, False, Progress()
    )
    assert isinstance(executor, PoolExecutor) and described == "cuda (4 workers)"
    assert [executor.settings_for(slot).device for slot in range(4)] == [f"cuda:{i}" for i in range(4)]
    pinned, described = launch.make_executor(
        launch.ExecutionOptions(device="cuda:3"), spec, tmp_path / "r.db", None, False, Progress()
    )
    assert isinstance(pinned, PoolExecutor) and described == "cuda:3 (1 worker)", "a worker that can be replaced"
    many, _ = launch.make_executor(
        launch.ExecutionOptions(device="cuda:3", workers=2), spec, tmp_path / "r.db", None, False, Progress()
    )
    assert isinstance(many, PoolExecutor) and {many.settings_for(s).device for s in range(2)} == {"cuda:3"}


class _Recorder(LocalExecutor):
    """Takes jobs and runs none: what the runner submits, in order."""

    def __init__(self) -> None:
        self.submitted: list[object] = []

    def submit(self, job: object) -> None:
        self.submitted.append(job)

    def pending(self) -> int:
        return 0


def test_longest_trainings_start_first(digits: object, tmp_path: Path) -> None:
    spec = MatrixSpec(
        defenses=("standard-v1", "fgsm-at-linf-v1", "pgd-at-linf-v1"),
        attacks=("fgsm-linf-v1",),
        defense_kwargs={"*": {"epochs": 2}, "fgsm-at-linf-v1": {"epochs": 3}, "pgd-at-linf-v1": {"steps": 5}},
    )
    recorder = _Recorder()
    runner = Runner(spec, digits, recorder)  # type: ignore[arg-type]
    with Store.open(tmp_path / "r.db") as store:
        runner.run(store)
    lengths = [job.declared_length for job in recorder.submitted]  # type: ignore[attr-defined]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == 12, lengths


@pytest.fixture
def torch_flags(monkeypatch: pytest.MonkeyPatch):
    """Restore every process-wide flag a CUDA preparation changes."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[2:5]
    torch.set_float32_matmul_precision(saved[5])


def test_a_cuda_worker_is_pinned_and_deterministic(monkeypatch: pytest.MonkeyPatch, torch_flags: None) -> None:
    pinned: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    torch.backends.cudnn.benchmark = True
    prepare_device(torch.device("cpu"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    prepare_device(torch.device("cuda", 2))
    assert pinned == [torch.device("cuda", 2)]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest", "torch's defaults"


def test_evaluation_runs_without_tf32(torch_flags: None) -> None:
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")  # TF32 matmuls
    with evaluation_precision(torch.device("cpu")):
        assert torch.backends.cudnn.allow_tf32, "the CPU has no TF32: nothing changes"
    with evaluation_precision(torch.device("cuda", 0)):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high", "restored"


def test_cuda_keys_carry_the_device_type_and_precision() -> None:
    cpu, cuda = launch.keyed_environment("cpu (2 workers)", 1), launch.keyed_environment("cuda (4 workers)", 1)
    assert cpu == {"device": "cpu", "threads": 1}, "CPU keys are unchanged"
    assert cuda["device"] == "cuda" and cuda["precision"]["tf32_evaluation"] is False
    assert cuda["precision"]["deterministic"] is True
    assert launch.keyed_environment("cuda:3", 1) == cuda, "every GPU of a type shares its results"


FAULTY = (
    HEADER
    + """
import os
from pathlib import Path

TRIES = Path(__file__).with_name("tries")


@register_attack("oom-above-16-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class OomAbove16(Attack):
    \"\"\"Runs out of GPU memory on batches of more than 16 examples.\"\"\"

    def generate(self, victim, x, y):
        if len(x) > 16:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({len(x)} examples)")
        return x


@register_attack("oom-always-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class OomAlways(Attack):
    def generate(self, victim, x, y):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 MiB")


@register_attack("assert-once-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class AssertOnce(Attack):
    \"\"\"A device-side assert in the first process that runs it (the file lists the pids that tried).\"\"\"

    def generate(self, victim, x, y):
        pids = TRIES.read_text().split() if TRIES.exists() else []
        if str(os.getpid()) not in pids:
            TRIES.write_text(" ".join([*pids, str(os.getpid())]))
        if len(pids) == 0:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return x


@register_attack("assert-always-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class AssertAlways(Attack):
    def generate(self, victim, x, y):
        raise RuntimeError("CUDA error: device-side assert triggered")
"""
)


def _faulty_matrix(tmp_path: Path, *attacks: str) -> Path:
    listed = ", ".join(f'"{a}"' for a in attacks)
    text = TINY_MATRIX.replace('"fgsm-linf-v1", "pgd-linf-v1"', listed).replace(
        '"standard-v1", "pgd-at-linf-v1"', '"standard-v1"'
    )
    return write_matrix(tmp_path / "matrix.toml", text.replace("n_eval = 60", "n_eval = 60\nbatch_size = 64")[:])


def _cells(db: Path) -> list[tuple]:
    import sqlite3

    query = "SELECT attack_id, eps, status, error, json_extract(versions, '$.attack_batch_size') FROM cells"
    return sqlite3.connect(db).execute(query + " ORDER BY attack_id, eps").fetchall()


def test_out_of_memory_halves_the_batch_and_records_it(tmp_path: Path) -> None:
    with components(tmp_path / "mods", FAULTY):
        config = _faulty_matrix(tmp_path, "oom-above-16-linf-v1", "oom-always-linf-v1")
        result = run_cli("run", "--config", str(config), "--quiet", "--device", "cpu", "--db", str(tmp_path / "r.db"))
    assert result.code == 1, result.stderr
    cells = _cells(tmp_path / "r.db")
    assert [c[2:] for c in cells if c[0] == "oom-above-16-linf-v1"] == [("ok", None, "16")] * 2, "64 -> 32 -> 16"
    always = [c for c in cells if c[0] == "oom-always-linf-v1"]
    assert len(always) == 2 and all(c[2] == "failed" and c[4] == "8" for c in always), "down to the floor of 8"
    assert all(c[3].startswith("out of memory at attack batch 8") for c in always), always


def test_a_device_side_assert_restarts_the_worker_and_retries(tmp_path: Path) -> None:
    """The assert is never stored: the worker exits, a fresh one (another process) runs the cell."""
    with components(tmp_path / "mods", FAULTY):
        config = _faulty_matrix(tmp_path, "assert-once-linf-v1", "assert-always-linf-v1")
        db = str(tmp_path / "r.db")
        result = run_cli("run", "--config", str(config), "--quiet", "--device", "cpu", "--workers", "2", "--db", db)
        tries = (tmp_path / "mods" / "tries").read_text().split()
    assert result.code == 1, result.stderr
    cells = _cells(tmp_path / "r.db")
    assert [c[2] for c in cells if c[0] == "assert-once-linf-v1"] == ["ok", "ok"]
    assert len(set(tries)) >= 2, "retried in a fresh worker process"
    always = [c for c in cells if c[0] == "assert-always-linf-v1"]
    assert [c[2] for c in always] == ["failed", "failed"]
    assert all("device-side assert triggered (a device fault, on each of 3 tries)" in c[3] for c in always), always


def test_the_in_process_executor_retries_a_device_fault_then_fails(tmp_path: Path) -> None:
    with components(tmp_path / "mods", FAULTY):
        config = _faulty_matrix(tmp_path, "assert-always-linf-v1")
        result = run_cli("run", "--config", str(config), "--quiet", "--device", "cpu", "--db", str(tmp_path / "r.db"))
    assert result.code == 1 and "device fault, on each of 3 tries" in result.stderr, result.stderr


def test_the_suite_runs_on_the_cpu_on_a_gpu_host(four_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/conftest.py sets $ROBUSTMATRIX_DEVICE=cpu: every command's --device defaults to it, in
    process and in subprocesses, even where CUDA is there; without it the default is auto."""
    from bench.commands.cli import _build_parser

    assert os.environ["ROBUSTMATRIX_DEVICE"] == "cpu"
    for command in (["run"], ["nightly"], ["check", "standard-v1"]):
        assert _build_parser().parse_args(command).device == "cpu", command
    monkeypatch.delenv("ROBUSTMATRIX_DEVICE")
    assert _build_parser().parse_args(["run"]).device == "auto"
