"""The runner end to end on a tiny digits matrix: every cell stored once, cached work skipped,
identical results with a fixed seed, and a killed run resumed with nothing lost or duplicated."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_MATRIX, cli_command, cli_env, run_cli, write_matrix

DETERMINISTIC_CELL_COLUMNS = (
    "cell_key, training_key, defense_id, attack_id, norm, eps, seed, n_eval, status, "
    "clean_accuracy, robust_accuracy, robust_mask, success_mask, mean_perturbation, forwards, backwards"
)


def snapshot(db: Path) -> dict[str, list[tuple]]:
    """Everything in the database that must not depend on timing or interruption."""
    connection = sqlite3.connect(db)
    try:
        return {
            "cells": connection.execute(f"SELECT {DETERMINISTIC_CELL_COLUMNS} FROM cells ORDER BY cell_key").fetchall(),
            "trainings": connection.execute(
                "SELECT training_key, defense_id, kwargs, trained_against, forwards, backwards, epochs "
                "FROM trainings ORDER BY training_key"
            ).fetchall(),
            "evaluations": connection.execute(
                "SELECT eval_key, clean_mask, observed FROM evaluations ORDER BY eval_key"
            ).fetchall(),
        }
    finally:
        connection.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    config = write_matrix(root / "matrix.toml", TINY_MATRIX)
    first = run_cli("run", "--config", str(config), "--quiet", cwd=root)
    return root, config, first


def test_run_stores_every_cell_and_writes_the_leaderboard(tiny_run):
    root, _, result = tiny_run
    assert result.code == 0, result.stderr
    db = root / "results" / "robustmatrix.db"
    cells = snapshot(db)["cells"]
    assert len(cells) == 2 * 2 * 2  # defenses x attacks x eps
    assert {c[9] for c in cells} != {None}
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "index.html", "heatmap.png"):
        assert (root / "results" / name).exists(), name
    assert "standard-v1" in (root / "results" / "leaderboard.md").read_text()
    assert "pgd-at-linf-v1" in (root / "results" / "leaderboard.csv").read_text()
    connection = sqlite3.connect(db)
    specs = {row[0]: json.loads(row[1]) for row in connection.execute("SELECT attack_id, spec FROM attacks")}
    connection.close()
    assert specs["fgsm-linf-v1"]["budget"]["steps"] == 1 and specs["pgd-linf-v1"]["budget"]["steps"] == 5
    assert re.search(r"\|\s+rank\s+\|\s+defense", result.stdout), "run prints the leaderboard"


def test_a_second_run_computes_nothing(tiny_run):
    root, config, _ = tiny_run
    before = snapshot(root / "results" / "robustmatrix.db")
    again = run_cli("run", "--config", str(config), "--quiet", cwd=root)
    assert again.code == 0
    assert "0 defenses trained, 0 cells computed, 8 already in" in again.stderr
    assert snapshot(root / "results" / "robustmatrix.db") == before


def test_robust_accuracy_never_rises_with_eps(tiny_run):
    root, _, _ = tiny_run
    connection = sqlite3.connect(root / "results" / "robustmatrix.db")
    rows = connection.execute(
        "SELECT defense_id, attack_id, eps, robust_accuracy FROM cells ORDER BY defense_id, attack_id, eps"
    ).fetchall()
    by_pair: dict[tuple[str, str], list[float]] = {}
    for defense, attack, _, accuracy in rows:
        by_pair.setdefault((defense, attack), []).append(accuracy)
    for pair, accuracies in by_pair.items():
        assert accuracies == sorted(accuracies, reverse=True), pair


def test_a_fixed_seed_gives_identical_databases(tiny_run, tmp_path):
    root, config, _ = tiny_run
    result = run_cli("run", "--config", str(config), "--quiet", "--db", str(tmp_path / "again.db"), cwd=tmp_path)
    assert result.code == 0
    assert snapshot(tmp_path / "again.db") == snapshot(root / "results" / "robustmatrix.db")


RESUME_MATRIX = TINY_MATRIX.replace("linf = [0.1, 0.3]", "linf = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]").replace(
    "steps = 5", "steps = 20"
)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the run never reached the point where the test kills it")


def _processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is ``folder`` (a killed run's leftover workers would be)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == folder:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _cells_in(db: Path) -> int:
    try:
        connection = sqlite3.connect(db, timeout=0.1)
        try:
            return connection.execute("SELECT count(*) FROM cells").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_killed_run_resumes_with_nothing_lost_or_duplicated(tmp_path, workers):
    """kill -9 of the command — in process, or the driver of a worker pool, whose workers die with
    it — at four points, then the same command: every cell exactly once, as an uninterrupted run."""
    config = write_matrix(tmp_path / "matrix.toml", RESUME_MATRIX)
    reference = tmp_path / "reference.db"
    command = ["run", "--config", str(config), "--quiet"]
    assert run_cli(*command, "--db", str(reference), cwd=tmp_path).code == 0
    expected = snapshot(reference)
    total = len(expected["cells"])

    db = tmp_path / "killed" / "robustmatrix.db"
    kill_points = [
        lambda: (db.parent / "checkpoints").exists(),  # during the first training
        lambda: any((db.parent / "checkpoints").glob("*.pt")),  # a checkpoint saved, maybe not yet recorded
        lambda: _cells_in(db) >= 1,
        lambda: _cells_in(db) >= total // 2,
    ]
    killed = 0
    for ready in kill_points:
        process = subprocess.Popen(
            cli_command(*command, "--db", str(db)), cwd=tmp_path, env=cli_env(ROBUSTMATRIX_WORKERS=workers)
        )
        killed += _kill_when(process, ready)
        deadline = time.monotonic() + 10
        while _processes_in(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_in(tmp_path) == [], "workers must not outlive a killed driver"
    assert killed == len(kill_points), "a run finished before it could be killed; make the matrix slower"
    resumed = run_cli(*command, "--db", str(db), cwd=tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert snapshot(db) == expected


def test_keys_change_with_whatever_changes_results_and_nothing_else(digits, monkeypatch):
    """Batch size (the seeded stream is drawn batch by batch), the device type and CPU thread count,
    and the versions of torch, numpy and ART are keyed; the same matrix twice gives the same keys."""
    from dataclasses import replace

    import numpy as np

    from bench.execution.launch import keyed_environment
    from bench.execution.runner import Runner
    from bench.foundation import keys
    from bench.foundation.config import MatrixSpec
    from bench.foundation.registry import DEFENSES
    from bench.storage.store import encode_mask

    spec = MatrixSpec(defenses=("standard-v1",), attacks=("fgsm-linf-v1",), eps={"linf": (0.1,)}, n_eval=10)
    row = {"observed": json.dumps({}), "clean_mask": encode_mask(np.ones(10, dtype=bool))}

    def planned(matrix=spec, environment=None):
        runner = Runner(matrix, digits, executor=None)
        if environment is not None:
            runner.environment = environment
        training = runner.training_job(DEFENSES.get("standard-v1"), 0)
        (cell,) = runner.cell_jobs(training, row, {0: training})
        return training.training_key, cell.cell_key

    base = planned()
    assert planned() == base
    assert planned(replace(spec, batch_size=spec.batch_size // 2))[1] != base[1]
    assert planned(replace(spec, batch_size=spec.batch_size // 2))[0] == base[0], "training does not batch-attack"
    assert planned(environment=keyed_environment("cpu", 1)) == base
    assert set(planned(environment=keyed_environment("cpu", 2))).isdisjoint(base)
    assert set(planned(environment=keyed_environment("cuda:0", 1))).isdisjoint(base)
    assert planned(environment=keyed_environment("cuda:0", 1)) == planned(environment=keyed_environment("cuda:3", 8))
    for library in keys.KEYED_LIBRARIES:
        upgraded = {**keys.keyed_versions(), library: "99.0"}
        monkeypatch.setattr("bench.execution.runner.keyed_versions", lambda upgraded=upgraded: upgraded)
        assert set(planned()).isdisjoint(base), f"an upgrade of {library} must not reuse cells"
