"""The results database: it refuses files that are not ours and results that are not valid."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from bench.foundation.errors import RobustMatrixError
from bench.storage.store import CellRecord, Store, decode_mask, encode_mask


def _cell(**changes) -> CellRecord:
    fields = dict(
        cell_key="k1",
        training_key="t1",
        dataset="digits",
        defense_id="standard-v1",
        attack_id="pgd-linf-v1",
        attack_version="abc",
        attack_kwargs={"steps": 5},
        family="gradient",
        norm="linf",
        eps=0.1,
        bounded=True,
        seed=0,
        n_eval=5,
        status="ok",
        error=None,
        clean_mask=np.array([1, 1, 1, 0, 1], dtype=bool),
        robust_mask=np.array([1, 0, 0, 0, 1], dtype=bool),
        mean_perturbation=0.1,
        forwards=10,
        backwards=8,
        wall_time=0.5,
        device="cpu",
        versions={"torch": "x"},
    )
    fields.update(changes)
    return CellRecord(**fields)


def test_masks_round_trip():
    mask = np.random.RandomState(0).rand(301) > 0.5
    assert np.array_equal(decode_mask(encode_mask(mask), 301), mask)


def test_cells_are_written_once_with_numbers_as_numbers(tmp_path):
    with Store.open(tmp_path / "r.db") as store:
        assert store.put_cell(_cell()) is True
        assert store.put_cell(_cell()) is False
        (row,) = store.cells()
        assert row["robust_accuracy"] == pytest.approx(0.4) and isinstance(row["eps"], float)
        assert isinstance(row["forwards"], int)
        assert decode_mask(row["success_mask"], 5).tolist() == [False, True, True, False, False]


def test_a_failed_cell_is_replaced_by_a_later_result(tmp_path):
    with Store.open(tmp_path / "r.db") as store:
        store.put_cell(_cell(status="failed", error="RuntimeError: boom", clean_mask=None, robust_mask=None))
        assert store.cell_status(["k1"]) == {"k1": "failed"}
        assert store.put_cell(_cell()) is True
        assert store.cell_status(["k1"]) == {"k1": "ok"}
        assert store.count("cells") == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"robust_mask": np.array([1, 1, 1, 1, 1], dtype=bool)}, "misclassified without attack"),
        ({"robust_mask": np.array([1, 0], dtype=bool)}, "mask length"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": "0.1"}, "eps"),
        ({"status": "failed", "error": None, "robust_mask": None}, "needs its reason"),
        ({"forwards": -1}, "non-negative"),
    ],
)
def test_invalid_results_are_refused(tmp_path, changes, message):
    with Store.open(tmp_path / "r.db") as store, pytest.raises(ValueError, match=message):
        store.put_cell(_cell(**changes))
    with Store.open(tmp_path / "r.db") as store:
        assert store.count("cells") == 0


def test_foreign_files_are_refused_with_one_clear_message(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("hello, this is not sqlite " * 20)
    with pytest.raises(RobustMatrixError, match="is not a robustmatrix database"):
        Store.open(text)
    other = tmp_path / "other.db"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE customers (name TEXT)")
    connection.commit()
    connection.close()
    with pytest.raises(RobustMatrixError, match="SQLite database of another program"):
        Store.open(other)


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.db"
    Store.open(path).close()
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(RobustMatrixError, match="newer robustmatrix"):
        Store.open(path)


def test_opening_a_missing_database_for_reading_is_an_error(tmp_path):
    with pytest.raises(RobustMatrixError, match="no results database"):
        Store.open_existing(tmp_path / "nothing.db")
    assert not (tmp_path / "nothing.db").exists()
