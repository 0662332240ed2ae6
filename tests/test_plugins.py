"""Submitting a defense end to end: the scaffold and the example plugin are pip-installed into a
temporary virtual environment, pass `check` there, and add one row to an existing leaderboard —
computing only their own cells."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MATRIX, cli_env, run_cli, write_matrix

EXAMPLE = REPO / "examples" / "gradient-regularization"


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory) -> Path:
    """A real virtual environment that sees this environment's packages (torch, robustmatrix) through a
    .pth file, so installing a plugin into it touches nothing else and downloads nothing."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    (site,) = (root / "lib").glob("python*/site-packages")
    parents = [p for p in sys.path if p.endswith("site-packages")] + [str(REPO)]
    (site / "robustmatrix-parent.pth").write_text("\n".join(parents) + "\n")
    return root / "bin" / "python"


def pip_install(python: Path, package: Path, scratch: Path) -> None:
    """Install from a copy: setuptools writes build/ and .egg-info/ next to the sources it builds."""
    package = Path(shutil.copytree(package, scratch / f"build-{package.name}"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            str(package),
        ],
        check=True,
    )


def robustmatrix(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "bench.commands.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_scaffold_refuses_bad_names_and_existing_folders(tmp_path):
    bad = run_cli("new-defense", "My_Defense", "--dir", str(tmp_path))
    assert bad.code == 2 and "bad plugin name 'My_Defense'" in bad.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    taken = run_cli("new-defense", "taken", "--dir", str(tmp_path))
    assert taken.code == 2 and "already exists" in taken.stderr


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("defenses", "a module named 'defenses' is already importable"),
        ("torch", "a module named 'torch'"),
        ("numpy", "a module named 'numpy'"),
        ("bench", "a module named 'bench'"),
        ("tests", "a module named 'tests'"),
        ("class", "'class' is a Python keyword"),
        ("standard", "id standard-v1 is already registered (by builtin)"),
        ("pgd-at-linf", "id pgd-at-linf-v1 is already registered"),
    ],
)
def test_scaffold_refuses_names_that_would_shadow_or_collide(tmp_path, name, fragment):
    result = run_cli("new-defense", name, "--dir", str(tmp_path))
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"bad plugin name '{name}'" in lines[0] and fragment in lines[0], lines
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_scaffold_installs_and_passes_check_as_generated(tmp_path, plugin_venv):
    result = run_cli("new-defense", "noise-aug", "--dir", str(tmp_path))
    assert result.code == 0, result.stderr
    package = tmp_path / "noise-aug"
    assert {p.name for p in package.iterdir()} >= {"pyproject.toml", "noise_aug", "tests", "README.md"}
    pip_install(plugin_venv, package, tmp_path)
    listed = robustmatrix(plugin_venv, "list", "--kind", "defense", "noise-aug-*", cwd=tmp_path)
    assert "noise-aug-v1" in listed.stdout and "noise-aug==0.1.0" in listed.stdout
    checked = robustmatrix(plugin_venv, "check", "noise-aug-v1", "--device", "cpu", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "passed: 0 failure(s)" in checked.stdout
    own_test = subprocess.run(
        [str(plugin_venv), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        cwd=package,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert own_test.returncode == 0, own_test.stdout


@pytest.mark.slow
def test_example_plugin_adds_one_row_to_an_existing_leaderboard(tmp_path, plugin_venv):
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    built = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
    assert built.code == 0, built.stderr
    db = tmp_path / "results" / "robustmatrix.db"
    before = _cells(db)

    pip_install(plugin_venv, EXAMPLE, tmp_path)
    checked = robustmatrix(plugin_venv, "check", "gradient-regularization-v1", "--device", "cpu", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    added = robustmatrix(plugin_venv, "run", "--defense", "gradient-regularization-v1", "--quiet", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert "1 defenses trained, 4 cells computed" in added.stderr
    after = _cells(db)
    assert {k: v for k, v in after.items() if k in before} == before, "other rows were recomputed"
    new = {k: v for k, v in after.items() if k not in before}
    assert {v[0] for v in new.values()} == {"gradient-regularization-v1"} and len(new) == 4
    board = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "gradient-regularization-v1" in board
    assert "robustmatrix-gradient-regularization==1.0.0" in board


def _cells(db: Path) -> dict[str, tuple]:
    connection = sqlite3.connect(db)
    try:
        return {
            row[0]: row[1:]
            for row in connection.execute("SELECT cell_key, defense_id, attack_id, eps, created_at FROM cells")
        }
    finally:
        connection.close()
