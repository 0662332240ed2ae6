"""Cost of whole runs, measured with pytest-benchmark: the quick preset (also a smoke test of it, in
every test run), and — under `tox -e bench` — the default matrix cold and cached, with peak memory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli_command, cli_env

PEAK_MEMORY_LIMIT_KB = 2 * 1024 * 1024  # 2 GiB, the bound for the default matrix


def run_measured(args: list[str], cwd: Path) -> tuple[int, int, str]:
    """Run robustmatrix as a child; returns (exit status, peak RSS in kB of that child, stderr)."""
    process = subprocess.Popen(
        cli_command(*args), cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = process.stderr.read() if process.stderr else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss, stderr


def test_quick_preset_finishes_and_stays_small(benchmark, tmp_path):
    outcome = {}

    def quick() -> None:
        outcome["code"], outcome["peak_kb"], outcome["stderr"] = run_measured(["run", "--quick", "--quiet"], tmp_path)

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
        timings["code"], timings["peak_kb"], timings["stderr"] = run_measured(["run", "--quiet"], tmp_path)
        timings["cold"] = time.perf_counter() - start

    benchmark.pedantic(cold, rounds=1, iterations=1)
    assert timings["code"] == 0, timings["stderr"]
    start = time.perf_counter()
    code, _, stderr = run_measured(["run", "--quiet"], tmp_path)
    warm = time.perf_counter() - start
    assert code == 0 and "0 cells computed" in stderr
    benchmark.extra_info.update(
        cold_seconds=timings["cold"], cached_seconds=warm, peak_memory_mb=timings["peak_kb"] / 1024
    )
    assert timings["cold"] < 600, "the default matrix must finish cold in under 10 minutes on 2 cores"
    assert warm < 0.1 * timings["cold"], "a cached re-run must take under 10% of the cold run"
    assert timings["peak_kb"] < PEAK_MEMORY_LIMIT_KB
