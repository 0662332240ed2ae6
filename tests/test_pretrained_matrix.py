"""A matrix of models trained elsewhere: it trains nothing (no standard-v1 surrogate either: the
transfer attacks are a named surrogate or left out, visibly), needs only MNIST's test files, and
`list` shows its models."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from bench.foundation.architectures import build_architecture
from tests.conftest import run_cli, write_matrix
from tests.test_pretrained import _sha, table

TRANSFER = 'attacks = ["fgsm-linf-v1", "transfer-pgd-linf-v1"]\n'


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "w.pt"
    torch.save(build_architecture("small-cnn-w16", (1, 8, 8), 10).state_dict(), path)
    return path


def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql).fetchall()


def _run(tmp_path: Path, matrix: Path):  # noqa: ANN202
    return run_cli(
        "run", "--config", str(matrix), "--db", str(tmp_path / "r.db"), "--out", str(tmp_path / "out"), "--quiet"
    )


def test_without_a_surrogate_transfer_is_left_out_with_a_warning(tmp_path: Path, weights: Path) -> None:
    matrix = write_matrix(
        tmp_path / "m.toml",
        'dataset = "digits"\ndefenses = []\n' + TRANSFER + "n_eval = 20\n[eps]\nlinf = [0.1]\n"
        + table("ext-v1", weights='"w.pt"', sha256=f'"{_sha(weights)}"'),
    )  # fmt: skip
    result = _run(tmp_path, matrix)
    assert result.code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "transfer-pgd-linf-v1 left out" in warning[0] and 'surrogate = "ID"' in warning[0]
    assert _rows(tmp_path / "r.db", "SELECT defense_id FROM trainings") == [("ext-v1",)]  # no standard-v1
    assert _rows(tmp_path / "r.db", "SELECT attack_id FROM cells") == [("fgsm-linf-v1",)]


def test_a_pretrained_surrogate_named_in_the_matrix_crafts_the_transfer_examples(tmp_path: Path, weights: Path) -> None:
    torch.manual_seed(1)
    other = tmp_path / "s.pt"
    torch.save(build_architecture("small-cnn-w16", (1, 8, 8), 10).state_dict(), other)
    matrix = write_matrix(
        tmp_path / "m.toml",
        'dataset = "digits"\ndefenses = []\nsurrogate = "ext-surrogate-v1"\n' + TRANSFER
        + "n_eval = 20\n[eps]\nlinf = [0.1]\n[attack_kwargs.\"transfer-pgd-linf-v1\"]\nsteps = 2\n"
        + table("ext-v1", weights='"w.pt"', sha256=f'"{_sha(weights)}"')
        + table("ext-surrogate-v1", weights='"s.pt"', sha256=f'"{_sha(other)}"'),
    )  # fmt: skip
    result = _run(tmp_path, matrix)
    assert result.code == 0, result.stderr
    assert "warning" not in result.stderr
    trained = {row[0] for row in _rows(tmp_path / "r.db", "SELECT defense_id FROM trainings")}
    assert trained == {"ext-v1", "ext-surrogate-v1"}  # loaded, and nothing else trained
    cells = _rows(tmp_path / "r.db", "SELECT defense_id, attack_id, status FROM cells")
    assert ("ext-v1", "transfer-pgd-linf-v1", "ok") in cells and len(cells) == 4
    unknown = write_matrix(
        tmp_path / "u.toml", matrix.read_text().replace('"ext-surrogate-v1"\n', '"ext-nope-v1"\n', 1)
    )
    bad = _run(tmp_path, unknown)
    assert bad.code == 2 and "surrogate: unknown defense" in bad.stderr and "ext-nope-v1" in bad.stderr


def test_evaluation_only_mnist_needs_only_the_test_files(tmp_path: Path, shared_mnist_dir: Path) -> None:
    """dataset mnist from a folder holding only the t10k files: all 10,000 official test images are
    evaluated, nothing is trained; a defense to train, or one example too many, is a one-line error."""
    torch.manual_seed(0)
    weights = tmp_path / "mnist.pt"
    torch.save(build_architecture("wong-mnist-net", (1, 28, 28), 10).state_dict(), weights)
    head = f'dataset = "mnist"\ndata_dir = "{shared_mnist_dir}"\ndownload = false\n'
    model = table("ext-mnist-v1", dataset='"mnist"', architecture='"wong-mnist-net"', weights='"mnist.pt"',
                  sha256=f'"{_sha(weights)}"')  # fmt: skip
    body = 'attacks = ["fgsm-linf-v1"]\n[eps]\nlinf = [0.3]\n' + model
    matrix = write_matrix(tmp_path / "m.toml", head + "defenses = []\nn_eval = 10000\n" + body)
    result = _run(tmp_path, matrix)
    assert result.code == 0, result.stderr
    assert "0 defenses trained, 1 cells computed" in result.stderr  # loaded, not trained
    assert _rows(tmp_path / "r.db", "SELECT n_eval, status FROM cells") == [(10000, "ok")]
    assert _rows(tmp_path / "r.db", "SELECT n_eval FROM evaluations") == [(10000,)]
    too_many = write_matrix(tmp_path / "big.toml", head + "defenses = []\nn_eval = 10001\n" + body)
    big = _run(tmp_path, too_many)
    assert big.code == 2 and big.stderr.strip() == (
        "robustmatrix: error: n_eval = 10001 but mnist has only 10000 test examples"
    )
    trains = write_matrix(tmp_path / "t.toml", head + 'defenses = ["standard-v1"]\nn_eval = 100\n' + body)
    needs = _run(tmp_path, trains)
    assert needs.code == 2 and len(needs.stderr.strip().splitlines()) == 1
    assert "train-images-idx3-ubyte.gz is missing" in needs.stderr and "needed to train standard-v1" in needs.stderr


def test_list_shows_the_matrix_s_pretrained_models(tmp_path: Path, weights: Path) -> None:
    matrix = write_matrix(
        tmp_path / "m.toml",
        'dataset = "digits"\ndefenses = []\n' + table("ext-v1", weights='"w.pt"', sha256=f'"{_sha(weights)}"'),
    )
    shown = run_cli("list", "--config", str(matrix), "ext-*")
    assert shown.code == 0, shown.stderr
    (line,) = [line for line in shown.stdout.splitlines() if line.startswith("ext-v1")]
    assert line.split()[:4] == ["ext-v1", "digits", "small-cnn-w16", _sha(weights)[:12]]
    assert str(matrix) in line
    described = json.loads(run_cli("list", "--json", "--config", str(matrix), "ext-v1").stdout)
    assert [(e["kind"], e["sha256"], e["architecture"]) for e in described] == [
        ("pretrained", _sha(weights), "small-cnn-w16")
    ]
