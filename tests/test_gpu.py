"""On a CUDA GPU only (marked ``gpu``, skipped elsewhere): the seeded CUDA path is bit-identical run
to run, keyed apart from the CPU's results, and one worker per GPU gives the one-worker database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MATRIX, run_cli, write_matrix
from tests.test_runner import snapshot

pytestmark = pytest.mark.gpu


def _run(config: Path, db: Path, *args: str) -> None:
    result = run_cli("run", "--config", str(config), "--quiet", "--db", str(db), *args)
    assert result.code == 0, result.stderr


def test_cuda_runs_are_bit_identical_and_keyed_apart_from_the_cpu(tmp_path: Path) -> None:
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    _run(config, tmp_path / "a/r.db", "--device", "cuda:0")
    _run(config, tmp_path / "b/r.db", "--device", "cuda:0")
    assert snapshot(tmp_path / "a/r.db") == snapshot(tmp_path / "b/r.db")
    _run(config, tmp_path / "c/r.db", "--device", "cpu")
    cuda, cpu = snapshot(tmp_path / "a/r.db"), snapshot(tmp_path / "c/r.db")
    assert not {row[0] for row in cuda["cells"]} & {row[0] for row in cpu["cells"]}, "CPU and CUDA keys differ"
    devices = sqlite3.connect(tmp_path / "a/r.db").execute("SELECT DISTINCT device FROM cells").fetchall()
    assert devices == [("cuda:0",)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_one_worker_per_gpu_gives_the_one_worker_database(tmp_path: Path) -> None:
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    _run(config, tmp_path / "all/r.db", "--device", "cuda", "--workers", "auto")
    _run(config, tmp_path / "one/r.db", "--device", "cuda:0", "--workers", "1")
    assert snapshot(tmp_path / "all/r.db") == snapshot(tmp_path / "one/r.db")
    devices = sqlite3.connect(tmp_path / "all/r.db").execute("SELECT DISTINCT device FROM cells").fetchall()
    assert len(devices) >= 2, "cells ran on more than one GPU"
