"""`robustmatrix export`: a defense trained here, exported and re-imported through its
[pretrained] table, has exactly the cells it had."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bench.foundation.config import load_spec
from tests.conftest import run_cli, write_matrix

MATRIX = """
dataset = "digits"
defenses = ["standard-v1"]
attacks = ["fgsm-linf-v1", "pgd-linf-v1"]
n_eval = 60
[eps]
linf = [0.1, 0.3]
[defense_kwargs."standard-v1"]
epochs = 2
[attack_kwargs."pgd-linf-v1"]
steps = 5
random_start = false
"""


def _cells(db: Path, defense: str) -> dict[tuple[str, float], list]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT attack_id, eps, status, robust_mask, success_mask, mean_perturbation FROM cells "
            "WHERE defense_id = ?",
            (defense,),
        ).fetchall()
    return {(a, e): rest for a, e, *rest in rows}


def test_export_then_import_reproduces_the_cells(tmp_path: Path) -> None:
    db, out = tmp_path / "r.db", tmp_path / "board"
    first = run_cli(
        "run",
        "--config",
        str(write_matrix(tmp_path / "m.toml", MATRIX)),
        "--db",
        str(db),
        "--out",
        str(out),
        "--workers",
        "1",
        "--quiet",
    )
    assert first.code == 0, first.stderr
    exported = tmp_path / "exported"
    result = run_cli("export", "standard-v1", "--out", str(exported), "--db", str(db))
    assert result.code == 0, result.stderr
    assert 'architecture = "small-cnn-w16"' in result.stdout
    snippet = (exported / "pretrained.toml").read_text()
    assert '[pretrained."standard-export-v1"]' in snippet
    # The snippet is a ready table: a matrix in the export folder that only adds it.
    matrix = write_matrix(exported / "m.toml", MATRIX.replace('defenses = ["standard-v1"]', "defenses = []") + snippet)
    assert load_spec(matrix).pretrained["standard-export-v1"].architecture == "small-cnn-w16"
    again = run_cli("run", "--config", str(matrix), "--db", str(db), "--out", str(out), "--workers", "1", "--quiet")
    assert again.code == 0, again.stderr
    original, reimported = _cells(db, "standard-v1"), _cells(db, "standard-export-v1")
    assert len(original) == 4 and original == reimported


def test_export_refuses_what_it_cannot_express(tmp_path: Path) -> None:
    missing = run_cli("export", "standard-v1", "--out", str(tmp_path / "x"), "--db", str(tmp_path / "none.db"))
    assert missing.code == 2 and "does not exist" in missing.stderr
