"""The local worker pool (`run --workers N`): real spawned processes give the database the in-process
executor gives, the driver alone writes it, and a worker that dies costs only the job it was running."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from bench.execution.executor import GRACE_SECONDS, JobFailure
from bench.execution.jobs import CellJob, TrainingJob
from bench.execution.pool_executor import MAX_AUTO_WORKERS, PoolExecutor, _affinity, auto_workers
from bench.execution.worker import WorkerSettings
from tests.components import HEADER, components
from tests.conftest import TINY_MATRIX, run_cli, write_matrix
from tests.test_runner import snapshot

MINIMUM_NORM_MATRIX = """
dataset = "digits"
defenses = ["standard-v1"]
attacks = ["fgsm-linf-v1", "deepfool-l2-v1"]
n_eval = 60
[eps]
linf = [0.1, 0.3]
l2 = [0.5, 1.0, 1.5]
[defense_kwargs."*"]
epochs = 2
"""


def test_two_workers_give_the_in_process_database(tmp_path):
    """Every job is seeded from its own key and runs on one torch thread wherever it runs, so the
    schedule across processes changes nothing."""
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    pooled = run_cli("run", "--config", str(config), "--quiet", "--workers", "2", "--db", str(tmp_path / "p/r.db"))
    assert pooled.code == 0, pooled.stderr
    assert "2 defenses trained, 8 cells computed" in pooled.stderr
    alone = run_cli("run", "--config", str(config), "--quiet", "--workers", "1", "--db", str(tmp_path / "l/r.db"))
    assert alone.code == 0, alone.stderr
    assert snapshot(tmp_path / "p" / "r.db") == snapshot(tmp_path / "l" / "r.db")
    devices = sqlite3.connect(tmp_path / "p" / "r.db").execute("SELECT device FROM runs").fetchall()
    assert devices == [("cpu (2 workers)",)]
    again = run_cli("run", "--config", str(config), "--quiet", "--workers", "2", "--db", str(tmp_path / "p/r.db"))
    assert again.code == 0 and "0 defenses trained, 0 cells computed, 8 already in" in again.stderr


def test_minimum_norm_cells_across_workers_give_the_in_process_results(tmp_path):
    """DeepFool's three eps cells share one minimal run (seeded independently of eps): across workers
    the database equals the in-process one. (That the run is made once is the scheduler's test below.)"""
    config = write_matrix(tmp_path / "matrix.toml", MINIMUM_NORM_MATRIX)
    pooled = run_cli("run", "--config", str(config), "--quiet", "--workers", "2", "--db", str(tmp_path / "p/r.db"))
    assert pooled.code == 0, pooled.stderr
    alone = run_cli("run", "--config", str(config), "--quiet", "--workers", "1", "--db", str(tmp_path / "l/r.db"))
    assert alone.code == 0, alone.stderr
    assert snapshot(tmp_path / "p" / "r.db") == snapshot(tmp_path / "l" / "r.db")
    rows = sqlite3.connect(tmp_path / "p" / "r.db").execute(
        "SELECT eps, forwards, robust_accuracy FROM cells WHERE attack_id = 'deepfool-l2-v1' ORDER BY eps"
    )
    (small, _, low), (_, _, middle), (large, _, high) = rows.fetchall()
    assert small < large and low >= middle >= high, "one minimal run, thresholded at growing eps"


def test_cells_of_one_minimal_run_are_pinned_to_one_worker():
    """The scheduler itself: a minimum-norm cell goes to the worker that took its group first, and
    an idle worker takes other work meanwhile."""
    training = TrainingJob("t" * 32, "standard-v1", {}, "digits", 0, "c.pt")
    cells = [_cell(training, "deepfool-l2-v1", eps, bounded=False) for eps in (0.5, 1.0)]
    other = _cell(training, "fgsm-linf-v1", 0.1, bounded=True)
    assert _affinity(cells[0]) == _affinity(cells[1]) is not None and _affinity(other) is None
    pool = PoolExecutor.__new__(PoolExecutor)  # the scheduling state alone, no processes
    pool._queue, pool._pinned = [], {}
    pool._order = iter(range(100))
    for job in (*cells, other):
        pool.submit(job)
    assert pool._take_for(0) is cells[0]
    assert pool._take_for(1) is other, "worker 1 may not take the second eps of worker 0's minimal run"
    assert pool._take_for(1) is None
    assert pool._take_for(0) is cells[1]


def _cell(training: TrainingJob, attack_id: str, eps: float, bounded: bool) -> CellJob:
    return CellJob(
        f"{attack_id}-{eps}".ljust(32, "0"), training, attack_id, "v", {}, "gradient", "l2", eps, bounded,
        60, 500, b"\xff", False, None,
    )  # fmt: skip


SUICIDAL = (
    HEADER
    + '''
import os
import signal
from pathlib import Path


@register_attack("suicidal-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class Suicidal(Attack):
    """Kills the worker process running it, once (a marker file remembers): a segfault, an OOM kill."""

    def generate(self, victim, x, y):
        marker = Path(__file__).with_name("suicidal.done")
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return x
'''
)


def test_a_dying_worker_costs_only_its_job(tmp_path):
    with components(tmp_path / "mods", SUICIDAL):
        config = write_matrix(
            tmp_path / "matrix.toml",
            TINY_MATRIX.replace('"fgsm-linf-v1", "pgd-linf-v1"', '"fgsm-linf-v1", "suicidal-linf-v1"').replace(
                '"standard-v1", "pgd-at-linf-v1"', '"standard-v1"'
            ),
        )
        db = tmp_path / "r.db"
        first = run_cli("run", "--config", str(config), "--quiet", "--workers", "2", "--db", str(db))
        assert first.code == 1, first.stderr
        assert "1 failure(s); everything else completed" in first.stderr
        failed = sqlite3.connect(db).execute("SELECT attack_id, error FROM cells WHERE status = 'failed'").fetchall()
        assert len(failed) == 1 and failed[0][0] == "suicidal-linf-v1"
        assert failed[0][1] == "worker process died (exit code -9)"
        pooled = ("--quiet", "--workers", "2", "--db", str(db))
        retried = run_cli("run", "--config", str(config), *pooled, "--retry-failed")
        assert retried.code == 0, retried.stderr
    ok = sqlite3.connect(db).execute("SELECT count(*) FROM cells WHERE status = 'ok'").fetchone()
    assert ok == (4,)


def test_worker_counts():
    assert auto_workers(["cuda:0"]) == 1, "one worker keeps a GPU busy"
    cores = len(os.sched_getaffinity(0))
    assert auto_workers(["cpu"]) == min(cores, MAX_AUTO_WORKERS), "one per usable core, capped"
    config_free = run_cli("run", "--workers", "0", "--quiet")
    assert config_free.code == 2 and "--workers must be 'auto' or a number of processes >= 1" in config_free.stderr
    ray = run_cli("run", "--workers", "2", "--executor", "ray", "--quiet")
    assert ray.code == 2 and "--workers is for the local executor" in ray.stderr


SLOW_TRAINING = (
    HEADER
    + '''
@register_defense("sleepy-v1", kwargs=KWARGS, dataset_kwargs=DATASET_KWARGS)
class Sleepy(Defense):
    """Trains for a minute: long enough that only the driver's death can stop its worker in time."""

    def __init__(self, **kwargs):
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model, data, ctx):
        time.sleep(60)
'''
)

DRIVER = """
import sys
sys.path[:0] = [{repo!r}, {modules!r}]
from bench.execution.jobs import TrainingJob
from bench.execution.pool_executor import PoolExecutor
from bench.foundation.plugins import load_builtins
from bench.execution.worker import WorkerSettings
load_builtins()
import {module}
pool = PoolExecutor(WorkerSettings("digits", "cpu", modules=({module!r},), checkpoint_cache={cache!r}), 1)
pool.submit(TrainingJob("5" * 32, "sleepy-v1", {{}}, "digits", 0, "sleepy.pt"))
print("submitted", flush=True)
pool.next_finished()
"""


def test_workers_die_with_a_killed_driver(tmp_path):
    """kill -9 of the driver mid-training: its worker goes too (Linux parent-death signal), instead
    of finishing a job nobody will record."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from tests.test_runner import _processes_in

    with components(tmp_path / "mods", SLOW_TRAINING) as module:
        script = DRIVER.format(repo=str(REPO), modules=str(tmp_path / "mods"), module=module.name, cache=str(tmp_path))
        work = tmp_path / "work"
        work.mkdir()
        driver = subprocess.Popen([sys.executable, "-c", script], cwd=work, stdout=subprocess.PIPE, text=True)
        assert driver.stdout.readline().strip() == "submitted"
        time.sleep(5)  # the worker imports torch and starts its minute of training
        assert set(_processes_in(work)) - {driver.pid}, "the worker (and spawn's resource tracker) run"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 5
        while _processes_in(work) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_in(work) == [], "the worker outlived its driver"


WEDGED = (
    HEADER
    + '''
import signal


@register_attack("wedged-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class Wedged(Attack):
    """Stuck where SIGALRM cannot reach it, as in C code or a GPU kernel: the signal is blocked, so the
    worker's own budget never fires (bounded, so a driver that fails to kill it fails the test)."""

    def generate(self, victim, x, y):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(45)
        return x
'''
)


def run_wedged_matrix(tmp_path: Path, modules: Path, *executor: str) -> None:
    """Run a matrix with the wedged attack (cell_timeout 1 s) on ``executor``; assert the driver ended
    it within the time a kill allows and stored exactly its cells as failed, the others ok."""
    with components(modules, WEDGED):
        config = write_matrix(
            tmp_path / "matrix.toml",
            TINY_MATRIX.replace('"fgsm-linf-v1", "pgd-linf-v1"', '"fgsm-linf-v1", "wedged-linf-v1"')
            .replace('"standard-v1", "pgd-at-linf-v1"', '"standard-v1"')
            .replace("n_eval = 60", "n_eval = 60\ncell_timeout = 1"),
        )
        db = tmp_path / "r.db"
        started = time.monotonic()
        result = run_cli("run", "--config", str(config), "--quiet", *executor, "--db", str(db))
        elapsed = time.monotonic() - started
    assert result.code == 1, result.stderr
    assert elapsed < 40, "the driver waited for the stuck attack instead of ending it"
    connection = sqlite3.connect(db)
    cells = connection.execute("SELECT attack_id, status, error FROM cells ORDER BY attack_id, eps").fetchall()
    connection.close()
    reason = f"timeout: cell ran past its time budget of 1 s and {GRACE_SECONDS:g} s of grace; killed by the driver"
    assert cells == [
        ("fgsm-linf-v1", "ok", None),
        ("fgsm-linf-v1", "ok", None),
        ("wedged-linf-v1", "failed", reason),
        ("wedged-linf-v1", "failed", reason),
    ]


def test_a_cell_stuck_beyond_sigalrm_is_killed_by_the_driver(tmp_path):
    """cell_timeout + grace after a worker took the cell, the driver kills that worker, stores the
    cell as failed and lets a new worker run the rest."""
    run_wedged_matrix(tmp_path, tmp_path / "mods", "--workers", "2")


def test_a_training_past_its_timeout_is_killed_by_the_driver(tmp_path):
    """training_timeout (no SIGALRM inside a training) is the driver's alone: the training fails
    with the reason, and its clock starts when the worker takes the job, not while it starts up."""
    with components(tmp_path / "mods", SLOW_TRAINING) as module:
        settings = WorkerSettings("digits", "cpu", modules=(module.name,), checkpoint_cache=str(tmp_path))
        pool = PoolExecutor(settings, 1, training_timeout=1, grace=0.5)
        try:
            job = TrainingJob("5" * 32, "sleepy-v1", {}, "digits", 0, "sleepy.pt")
            pool.submit(job)
            outcome = pool.next_finished()
            assert isinstance(outcome, JobFailure) and outcome.job == job
            assert (
                outcome.error
                == "timeout: training ran past its time budget of 1 s and 0.5 s of grace; killed by the driver"
            )
            assert pool.pending() == 0 and pool._workers[0].process.is_alive(), "a new worker took its place"
        finally:
            pool.close()
