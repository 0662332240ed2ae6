"""Shards and merging: N shards cover every cell exactly once, their merged databases hold exactly
what one unsharded run writes, merging twice changes nothing, and conflicting results are reported,
never overwritten."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3

import numpy as np
import pytest

from bench.execution.shard import Shard
from bench.foundation.errors import RobustMatrixError
from bench.storage.store import decode_mask, encode_mask
from tests.conftest import TINY_MATRIX, run_cli, write_matrix
from tests.test_runner import snapshot


def test_shards_partition_any_set_of_keys():
    keys = [f"{i:032x}" for i in range(0, 10**6, 997)]
    shards = [Shard(i, 4) for i in range(1, 5)]
    owners = [[s for s in shards if s.owns(k)] for k in keys]
    assert all(len(o) == 1 for o in owners)
    assert all(abs(sum(s.owns(k) for k in keys) - len(keys) / 4) < len(keys) / 10 for s in shards)
    assert Shard.parse(" 2/4 ") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    assert Shard(2, 3).rotate(["a", "b", "c"]) == ["b", "c", "a"]


@pytest.mark.parametrize("text", ["0/3", "4/3", "a/b", "3", "1/0"])
def test_bad_shards_are_one_line_errors(text):
    with pytest.raises(RobustMatrixError, match="bad shard"):
        Shard.parse(text)
    result = run_cli("run", "--shard", text)
    assert result.code == 2 and "bad shard" in result.stderr


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    config = write_matrix(root / "matrix.toml", TINY_MATRIX)
    full = run_cli("run", "--config", str(config), "--quiet", "--db", str(root / "full" / "r.db"), cwd=root)
    assert full.code == 0, full.stderr
    shards = []
    for index in (1, 2, 3):
        db = root / "shards" / f"shard-{index}.db"  # one folder: the shards share their checkpoints
        result = run_cli("run", "--config", str(config), "--quiet", "--shard", f"{index}/3", "--db", str(db), cwd=root)
        assert result.code == 0, result.stderr
        assert "shard " + f"{index}/3" in result.stderr
        shards.append(db)
    # Shards split by (defense, norm): this matrix has two such groups, so one shard may be empty;
    # the tests that take "a shard" take the fullest.
    shards.sort(key=lambda db: -len(_cell_keys(db)))
    return root, snapshot(root / "full" / "r.db"), shards


def _cell_keys(db):
    connection = sqlite3.connect(db)
    try:
        return {row[0] for row in connection.execute("SELECT cell_key FROM cells")}
    finally:
        connection.close()


def test_shards_cover_every_cell_exactly_once(sharded):
    _, full, shards = sharded
    per_shard = [_cell_keys(db) for db in shards]
    assert sum(len(k) for k in per_shard) == len(full["cells"])
    assert set().union(*per_shard) == {row[0] for row in full["cells"]}


def test_merged_shards_equal_one_unsharded_run_and_merging_twice_changes_nothing(sharded, tmp_path):
    _, full, shards = sharded
    merged = tmp_path / "merged" / "r.db"
    first = run_cli("merge", *map(str, shards), "--into", str(merged))
    assert first.code == 0, first.stderr
    assert "0 conflict(s)" in first.stdout and f" {len(full['cells'])} cells," in first.stdout
    assert " 3 runs," in first.stdout
    assert snapshot(merged) == full
    assert len(list((merged.parent / "checkpoints").glob("*.pt"))) == 2, "checkpoints travel with the merge"
    again = run_cli("merge", *map(str, shards), "--into", str(merged))
    assert again.code == 0 and "nothing new; 0 conflict(s)" in again.stdout
    assert snapshot(merged) == full
    resumed = run_cli("run", "--config", str(sharded[0] / "matrix.toml"), "--quiet", "--db", str(merged))
    assert resumed.code == 0 and "0 defenses trained, 0 cells computed" in resumed.stderr


def _first(db, sql):
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql).fetchone()
    finally:
        connection.close()  # the last connection to close folds the write-ahead log into the file


def _execute(db, sql, *parameters):
    connection = sqlite3.connect(db)
    try:
        with connection:
            connection.execute(sql, parameters)
    finally:
        connection.close()


def test_conflicting_cells_are_reported_not_overwritten(sharded, tmp_path):
    _, _, shards = sharded
    target = tmp_path / "target.db"
    assert run_cli("merge", str(shards[0]), "--into", str(target)).code == 0
    tampered = tmp_path / "other" / "tampered.db"
    tampered.parent.mkdir()
    shutil.copy(shards[0], tampered)
    key, robust, success, n = _first(
        tampered, "SELECT cell_key, robust_mask, success_mask, n_eval FROM cells WHERE robust_accuracy > 0"
    )
    clean = decode_mask(robust, n) | decode_mask(success, n)  # a valid but different result: nothing robust
    _execute(
        tampered,
        "UPDATE cells SET robust_mask = ?, success_mask = ?, robust_accuracy = 0.0 WHERE cell_key = ?",
        encode_mask(np.zeros(n, dtype=bool)),
        encode_mask(clean),
        key,
    )
    before = snapshot(target)
    result = run_cli("merge", str(tampered), "--into", str(target))
    assert result.code == 1
    assert "1 conflict(s) kept as they were" in result.stderr and "robust_mask" in result.stderr
    assert snapshot(target) == before


def test_an_ok_cell_replaces_a_failed_one_but_never_the_reverse(sharded, tmp_path):
    _, _, shards = sharded
    failed = tmp_path / "failed.db"
    shutil.copy(shards[0], failed)
    (key,) = _first(failed, "SELECT cell_key FROM cells ORDER BY cell_key")
    _execute(
        failed,
        "UPDATE cells SET status = 'failed', error = 'boom', robust_mask = NULL, robust_accuracy = NULL "
        "WHERE cell_key = ?",
        key,
    )
    target = tmp_path / "target.db"
    shutil.copy(failed, target)
    replaced = run_cli("merge", str(shards[0]), "--into", str(target))
    assert replaced.code == 0 and "1 failed cell(s) replaced by ok results" in replaced.stdout
    assert snapshot(target) == snapshot(shards[0])
    kept = run_cli("merge", str(failed), "--into", str(target))
    assert kept.code == 0 and snapshot(target) == snapshot(shards[0])


def test_merge_refuses_bad_input(sharded, tmp_path):
    _, _, shards = sharded
    same = run_cli("merge", str(shards[0]), "--into", str(shards[0]))
    assert same.code == 2 and "both a source and the target" in same.stderr
    missing = run_cli("merge", str(tmp_path / "nope.db"), "--into", str(tmp_path / "t.db"))
    assert missing.code == 2 and "no results database" in missing.stderr
    assert not (tmp_path / "t.db").exists()


# ------------------------------------------------------------------ a database someone sent
def _sent(shards, tmp_path, name="sent"):
    """A copy of shard 1 with its checkpoints, as someone would send it."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(shards[0], folder / "r.db")
    shutil.copytree(shards[0].parent / "checkpoints", folder / "checkpoints")
    return folder / "r.db"


def test_a_source_is_opened_read_only_and_never_changed(sharded, tmp_path):
    _, _, shards = sharded
    sent = _sent(shards, tmp_path)
    _execute(sent, "DROP TABLE nightly")  # written before the operations tables: opening it must not add them
    before = sent.read_bytes()
    result = run_cli("merge", str(sent), "--into", str(tmp_path / "t.db"))
    assert result.code == 0, result.stderr
    assert sent.read_bytes() == before
    assert _first(sent, "SELECT count(*) FROM sqlite_master WHERE name = 'nightly'") == (0,)


@pytest.mark.parametrize(
    "sql, message",
    [
        ("UPDATE runs SET status = 'running'", "is still running"),
        ("UPDATE cells SET robust_mask = substr(robust_mask, 1, 2) WHERE rowid = 1", "cannot hold 60 examples"),
        ("UPDATE evaluations SET clean_mask = substr(clean_mask, 1, 3)", "cannot hold 60 examples"),
        ("UPDATE cells SET robust_accuracy = 0.99 WHERE rowid = 1", "robust_accuracy disagrees with its masks"),
        ("UPDATE cells SET attack_id = '=HYPERLINK(\"http://x\")-v1' WHERE rowid = 1", "attack_id"),
        ("UPDATE cells SET norm = '../x' WHERE rowid = 1", "norm '../x' is not one of"),
        ("UPDATE trainings SET defense_id = '<b>x</b>-v1'", "defense_id"),
        ("UPDATE trainings SET checkpoint = '../../elsewhere.pt'", "checkpoint name"),
        ("UPDATE failures SET defense_id = '@SUM(1)'", "defense_id"),
    ],
)
def test_a_source_with_an_invalid_record_is_refused_with_one_line(sharded, tmp_path, sql, message):
    _, _, shards = sharded
    sent = _sent(shards, tmp_path)
    if "failures" in sql:
        _execute(sent, "INSERT INTO failures VALUES ('k', 'training', 'x-v1', 'digits', 0, 'boom', 'now')")
    _execute(sent, sql)
    target = tmp_path / "t.db"
    result = run_cli("merge", str(sent), "--into", str(target))
    assert result.code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot merge" in result.stderr
    assert not target.exists(), "nothing is written before every source is checked"


def test_a_checkpoint_that_is_not_its_training_is_refused(sharded, tmp_path):
    _, _, shards = sharded
    sent = _sent(shards, tmp_path)
    files = sorted((sent.parent / "checkpoints").glob("*.pt"))
    assert len(files) == 2
    files[0].write_bytes(files[1].read_bytes())  # another training's checkpoint under its name
    result = run_cli("merge", str(sent), "--into", str(tmp_path / "t.db"))
    assert result.code == 2 and "sha256" in result.stderr, result.stderr

    _execute(sent, "UPDATE trainings SET checkpoint_sha256 = NULL")  # no digest to compare: the key inside decides
    result = run_cli("merge", str(sent), "--into", str(tmp_path / "t.db"))
    assert result.code == 2 and "holds training" in result.stderr and "another model" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoints_travel_with_their_digests(sharded, tmp_path):
    _, _, shards = sharded
    target = tmp_path / "t.db"
    assert run_cli("merge", str(_sent(shards, tmp_path)), "--into", str(target)).code == 0
    connection = sqlite3.connect(target)
    rows = connection.execute("SELECT checkpoint, checkpoint_sha256 FROM trainings").fetchall()
    connection.close()
    for name, sha in rows:
        assert hashlib.sha256((tmp_path / "checkpoints" / name).read_bytes()).hexdigest() == sha
