"""Files from someone else: a checkpoint is the training it claims to be (its sha256 recorded, the
training key inside it checked on every load and on merge), and a database someone sent is read
without being changed, through the store's own validation."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from bench.execution.jobs import TrainingJob
from bench.execution.workbench import Workbench
from bench.foundation.errors import RobustMatrixError
from bench.foundation.registry import DEFENSES
from bench.storage.store import SCHEMA, Store, checkpoint_dir, read_checkpoint
from tests.conftest import run_cli, write_matrix
from tests.test_runner import snapshot

MATRIX = """
dataset = "digits"
defenses = ["standard-v1", "pgd-at-linf-v1"]
attacks = ["fgsm-linf-v1"]
seeds = [0]
n_eval = 60
[eps]
linf = [0.1]
[defense_kwargs."*"]
epochs = 1
"""


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _job(key: str) -> TrainingJob:
    kwargs = DEFENSES.get("standard-v1").resolve_kwargs("digits", {"epochs": 1})
    return TrainingJob(key, "standard-v1", kwargs, "digits", 0, f"standard-v1-{key[:8]}.pt")


def _rows(db, sql, *parameters):
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def _execute(db, sql, *parameters):
    connection = sqlite3.connect(db)
    try:
        with connection:
            connection.execute(sql, parameters)
    finally:
        connection.close()


# ------------------------------------------------------------------------------ checkpoints
def test_the_workbench_records_the_digest_and_retrains_over_a_file_that_is_not_its_training(tmp_path, capsys):
    bench = Workbench("digits", torch.device("cpu"), tmp_path)
    job = _job("a" * 32)
    record = bench.train(job)
    path = tmp_path / job.checkpoint
    assert record.checkpoint_sha256 == _sha(path)
    assert (
        read_checkpoint(path, job.training_key, record.checkpoint_sha256)[0]["meta"]["training_key"] == job.training_key
    )

    # Another training's file under this name: never evaluated as this one, retrained over.
    payload = torch.load(path, weights_only=True)
    payload["meta"]["training_key"] = "b" * 32
    torch.save(payload, path)
    with pytest.raises(RobustMatrixError, match="holds training bbbb"):
        read_checkpoint(path, job.training_key)
    bench.load(job)
    assert "warning: checkpoint" in capsys.readouterr().err
    assert read_checkpoint(path, job.training_key)[0]["meta"]["training_key"] == job.training_key

    # The right key but other weights: the digest this workbench recorded tells them apart.
    other = Workbench("digits", torch.device("cpu"), tmp_path)
    other.train(job)
    payload = torch.load(path, weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = payload["state_dict"][first] + 1.0
    torch.save(payload, path)
    tampered = _sha(path)
    loaded = other.load(job)
    assert _sha(path) != tampered and "sha256" in capsys.readouterr().err
    assert not torch.equal(loaded.model.state_dict()[first].cpu(), payload["state_dict"][first])


def test_run_retrains_a_swapped_checkpoint_instead_of_evaluating_another_model(tmp_path):
    config = write_matrix(tmp_path / "matrix.toml", MATRIX)
    db = tmp_path / "r.db"
    assert run_cli("run", "--config", str(config), "--quiet", "--db", str(db)).code == 0
    expected = snapshot(db)
    trainings = _rows(db, "SELECT training_key, defense_id, checkpoint, checkpoint_sha256 FROM trainings")
    folder = checkpoint_dir(db)
    assert all(sha == _sha(folder / name) for _, _, name, sha in trainings), "every checkpoint's digest is stored"
    (at_key, _, at_file, _) = next(t for t in trainings if t[1] == "pgd-at-linf-v1")
    (_, _, standard_file, _) = next(t for t in trainings if t[1] == "standard-v1")
    shutil.copy(folder / standard_file, folder / at_file)  # another model under pgd-at's name
    _execute(db, "DELETE FROM cells WHERE training_key = ?", at_key)
    _execute(db, "DELETE FROM evaluations WHERE training_key = ?", at_key)
    assert run_cli("run", "--config", str(config), "--quiet", "--db", str(db)).code == 0
    assert snapshot(db) == expected, "the pgd-at cells were measured on pgd-at, retrained"
    assert read_checkpoint(folder / at_file, at_key)[0]["meta"]["training_key"] == at_key


def test_run_retrains_over_weights_changed_under_their_own_training_key(tmp_path):
    """Only the digest the database recorded can tell: the file still says it is that training."""
    config = write_matrix(tmp_path / "matrix.toml", MATRIX)
    db = tmp_path / "r.db"
    assert run_cli("run", "--config", str(config), "--quiet", "--db", str(db)).code == 0
    expected = snapshot(db)
    (key, name) = _rows(db, "SELECT training_key, checkpoint FROM trainings WHERE defense_id = 'standard-v1'")[0]
    path = checkpoint_dir(db) / name
    payload = torch.load(path, weights_only=True)
    for tensor in payload["state_dict"].values():
        tensor.mul_(0.5)  # a different model, same key inside
    torch.save(payload, path)
    _execute(db, "DELETE FROM cells WHERE training_key = ?", key)
    _execute(db, "DELETE FROM evaluations WHERE training_key = ?", key)
    result = run_cli("run", "--config", str(config), "--quiet", "--db", str(db))
    assert result.code == 0 and "not the recorded" in result.stderr, result.stderr
    assert snapshot(db) == expected, "the standard-v1 cells were measured on standard-v1, retrained"
    assert _sha(path) == _rows(db, "SELECT checkpoint_sha256 FROM trainings WHERE training_key = ?", key)[0][0]


def test_a_database_without_the_digest_column_is_upgraded_and_stays_readable(tmp_path):
    db = tmp_path / "old.db"
    connection = sqlite3.connect(db)
    with connection:
        connection.executescript(SCHEMA.replace("    checkpoint_sha256 TEXT,\n", ""))
        connection.execute("PRAGMA application_id = 0x524D5458")
        connection.execute("PRAGMA user_version = 1")
        connection.execute(
            "INSERT INTO trainings VALUES ('t', 'standard-v1', 'v', 'builtin', 'digits', 0, '{}', '[]', '{}', "
            "'small-cnn', 'standard-v1-t.pt', 1, 1.0, 1, 1, 'cpu', '{}', 'now')"
        )
    connection.close()
    with Store.open_existing(db) as store:
        assert "checkpoint_sha256" in store.columns("trainings")
        assert store.training("t")["checkpoint_sha256"] is None


def test_torch_is_required_new_enough_that_weights_only_cannot_be_bypassed():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (torch_requirement,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch"]
    assert not torch_requirement.specifier.contains("2.5.1"), "CVE-2025-32434: torch.load(weights_only) < 2.6"
    assert torch_requirement.specifier.contains("2.6.0") and torch_requirement.specifier.contains("2.13.0")
