"""How close ``robustmatrix plan``'s time estimate comes to a measured run: a part of the default
matrix (one undefended, one adversarially trained and one quantizing defense, every attack that
pairs with them, the quick preset's grid and budgets) is run cold on one worker, timed, and planned
with ``--cold`` on the database it wrote (the plan then knows the clean-correct counts, not the
outcome). The run is measured in CPU seconds (its process's user + system time), which other load
on a shared machine barely changes, where its wall time can triple; on an idle machine with one
worker the two agree. Under `tox -e bench` only: it runs a real matrix for about a minute."""

from __future__ import annotations

import re
import resource
import subprocess
import time

import pytest

from tests.conftest import cli_command, cli_env

MATRIX = """
defenses = ["standard-v1", "pgd-at-linf-v1", "bit-depth-v1"]
"""
TOLERANCE = 1.5
"""The estimate must be within this factor of the measured wall time (the issue asks 30% on the
default matrix; a small matrix's few long cells make its estimate noisier)."""


def _seconds(text: str) -> float:
    value, unit = re.search(r"([0-9.]+) (s|min|h) wall on", text).groups()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def test_plan_estimate_against_a_measured_run(benchmark, tmp_path):
    if benchmark.disabled:
        pytest.skip("runs a real matrix for about a minute: under `tox -e bench` (--benchmark-enable)")
    (tmp_path / "m.toml").write_text(MATRIX)
    args = ["--quick", "--config", "m.toml", "--workers", "1"]
    measured = {}

    def cold() -> None:
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        run = subprocess.run(
            cli_command("run", *args, "--quiet"), cwd=tmp_path, env=cli_env(), capture_output=True, text=True
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        measured["wall"] = time.perf_counter() - start
        measured["seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert run.returncode == 0, run.stderr

    benchmark.pedantic(cold, rounds=1, iterations=1)
    plan = subprocess.run(
        cli_command("plan", *args, "--cold", "--summary"), cwd=tmp_path, env=cli_env(), capture_output=True, text=True
    )
    assert plan.returncode == 0, plan.stderr
    estimate = _seconds(plan.stdout)
    benchmark.extra_info.update(
        cpu_seconds=measured["seconds"], wall_seconds=measured["wall"], estimated_seconds=estimate
    )
    print(f"plan estimate {estimate:.0f} s; run: {measured['seconds']:.0f} CPU s, {measured['wall']:.0f} s wall")
    assert measured["seconds"] / TOLERANCE <= estimate <= measured["seconds"] * TOLERANCE, (estimate, measured)
