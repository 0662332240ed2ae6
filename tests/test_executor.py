"""The executor contract every executor keeps: outcomes come back as jobs finish, a failing training
or evaluation comes back as a JobFailure (never an exception), and the local executor works depth
first so results appear early. Also: asking for Ray without Ray installed is a one-line error."""

from __future__ import annotations

import sys

import torch

from bench.execution.executor import JobFailure, LocalExecutor
from bench.execution.jobs import EvaluationJob, TrainingJob
from bench.execution.timebudget import TimeBudgetExceeded, time_budget
from bench.execution.workbench import Workbench
from bench.foundation.registry import DEFENSES
from bench.storage.store import EvaluationRecord, TrainingRecord
from tests.components import components
from tests.conftest import TINY_MATRIX, run_cli, write_matrix
from tests.test_faults import BROKEN_DEFENSE


def _training(defense_id: str, key: str) -> TrainingJob:
    kwargs = DEFENSES.get(defense_id).resolve_kwargs("digits", {"epochs": 1})
    return TrainingJob(key, defense_id, kwargs, "digits", 0, f"{defense_id}-{key}.pt")


def test_local_executor_returns_failures_as_outcomes_and_works_depth_first(tmp_path):
    with components(tmp_path / "mods", BROKEN_DEFENSE):
        bench = Workbench("digits", torch.device("cpu"), tmp_path / "checkpoints")
        executor = LocalExecutor(bench)
        good, broken = _training("standard-v1", "a" * 32), _training("broken-v1", "b" * 32)
        executor.submit(good)
        executor.submit(broken)
        first = executor.next_finished()
        assert isinstance(first, TrainingRecord) and first.training_key == good.training_key
        executor.submit(EvaluationJob("e" * 32, good, 40))  # submitted later, runs before the queued training
        assert isinstance(executor.next_finished(), EvaluationRecord)
        failure = executor.next_finished()
        assert isinstance(failure, JobFailure) and failure.kind == "training"
        assert failure.error == "RuntimeError: deliberately broken defense"
        assert executor.pending() == 0
        assert list(executor.run_all([])) == []


def test_a_time_budget_interrupts_python_code_inside_a_loop():
    count = 0
    try:
        with time_budget(0.2) as budget:
            assert budget.interrupts
            while True:
                count += 1
    except TimeBudgetExceeded as exc:
        assert str(exc) == "exceeded its time budget of 0.2 s"
    assert count > 0
    with time_budget(None) as unlimited:
        unlimited.check()


def test_ray_without_ray_installed_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    result = run_cli("run", "--config", str(config), "--executor", "ray", "--db", str(tmp_path / "r.db"))
    assert result.code == 2, result.stderr
    assert result.stderr.strip() == (
        "robustmatrix: error: --executor ray needs Ray, an optional dependency: pip install 'robustmatrix[ray]'"
    )
    assert not (tmp_path / "r.db").exists()
