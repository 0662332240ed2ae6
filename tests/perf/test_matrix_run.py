"""Cost of whole runs, measured with pytest-benchmark: the quick preset (also a smoke test of it, in
every test run), and — under `tox -e bench` — the default matrix cold and cached, with peak memory
(the command and its worker processes together). Both run as a user runs them: `--workers auto`."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import cli_command, cli_env

PEAK_MEMORY_LIMIT_KB = 2 * 1024 * 1024  # 2 GiB, the bound for the default matrix


def _tree_rss_kb(root: int) -> int:
    """Resident memory of a process and all its descendants (its worker processes), in kB."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[pid] = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree)


def run_measured(args: list[str], cwd: Path, **env: str) -> tuple[int, int, str]:
    """Run robustmatrix as a child; returns (exit status, peak resident memory in kB of the child and
    its worker processes together, sampled every 0.2 s, stderr)."""
    process = subprocess.Popen(
        cli_command(*args), cwd=cwd, env=cli_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss_kb(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = process.stderr.read() if process.stderr else ""
    process.wait()
    done.set()
    sampler.join()
    return process.returncode, peak[0], stderr


def test_quick_preset_finishes_and_stays_small(benchmark, tmp_path):
    outcome = {}

    def quick() -> None:
        outcome["code"], outcome["peak_kb"], outcome["stderr"] = run_measured(
            ["run", "--quick", "--quiet"], tmp_path, ROBUSTMATRIX_WORKERS="auto"
        )

    benchmark.pedantic(quick, rounds=1, iterations=1)
    assert outcome["code"] == 0, outcome["stderr"]
    assert (tmp_path / "results" / "quick" / "leaderboard.md").exists()
    benchmark.extra_info["peak_memory_mb"] = outcome["peak_kb"] / 1024
    assert outcome["peak_kb"] < PEAK_MEMORY_LIMIT_KB


def test_default_matrix_cold_then_cached(benchmark, tmp_path):
    if benchmark.disabled:
        pytest.skip("the cold default matrix takes minutes: it runs under `tox -e bench` (--benchmark-enable)")
    import time

    timings = {}

    def cold() -> None:
        start = time.perf_counter()
        timings["code"], timings["peak_kb"], timings["stderr"] = run_measured(
            ["run", "--quiet"], tmp_path, ROBUSTMATRIX_WORKERS="auto"
        )
        timings["cold"] = time.perf_counter() - start

    benchmark.pedantic(cold, rounds=1, iterations=1)
    assert timings["code"] == 0, timings["stderr"]
    start = time.perf_counter()
    code, _, stderr = run_measured(["run", "--quiet"], tmp_path, ROBUSTMATRIX_WORKERS="auto")
    warm = time.perf_counter() - start
    assert code == 0 and "0 cells computed" in stderr
    benchmark.extra_info.update(
        cold_seconds=timings["cold"], cached_seconds=warm, peak_memory_mb=timings["peak_kb"] / 1024
    )
    assert timings["cold"] < 600, "the default matrix must finish cold in under 10 minutes on 2 cores"
    assert warm < 0.1 * timings["cold"], "a cached re-run must take under 10% of the cold run"
    assert timings["peak_kb"] < PEAK_MEMORY_LIMIT_KB
