"""SIGTERM — Slurm's time limit, a plain `kill` — ends a run as cleanly as Ctrl-C: the run is
recorded as interrupted (not left `running`), the cells already finished stay, no worker outlives
the command, and the same command resumes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time

import pytest

from tests.conftest import TINY_MATRIX, cli_command, cli_env, write_matrix
from tests.test_runner import _cells_in, _processes_in

MATRIX = (
    TINY_MATRIX.replace('"standard-v1", "pgd-at-linf-v1"', '"standard-v1"')
    .replace("linf = [0.1, 0.3]", "linf = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]")
    .replace("steps = 5", "steps = 60")
)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_ends_a_run_like_ctrl_c(tmp_path, workers):
    config = write_matrix(tmp_path / "matrix.toml", MATRIX)
    db = tmp_path / "results" / "robustmatrix.db"
    command = cli_command("run", "--config", str(config), "--quiet", "--db", str(db))
    env = cli_env(ROBUSTMATRIX_WORKERS=workers)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _cells_in(db) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be terminated; make the matrix slower"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "robustmatrix: terminated (SIGTERM); finished cells are saved, run the same command to resume" in stderr

    connection = sqlite3.connect(db)
    try:
        assert connection.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]
        finished = connection.execute("SELECT count(*) FROM cells WHERE status = 'ok'").fetchone()[0]
    finally:
        connection.close()
    assert 1 <= finished < 12, "the cells finished before SIGTERM are kept"
    deadline = time.monotonic() + 10
    while _processes_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_in(tmp_path) == [], "no worker outlives a terminated driver"

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"0 defenses trained, {12 - finished} cells computed, {finished} already in" in resumed.stderr
