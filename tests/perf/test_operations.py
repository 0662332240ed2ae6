"""What the single writer can sustain: the driver stores every result itself, one transaction each,
so its write rate bounds how many workers a cluster can keep busy; and merging shard databases.
Measured with pytest-benchmark (`tox -e bench`; once, as a smoke test, in every test run)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from bench.storage.merge import merge_databases
from bench.storage.store import CellRecord, Store

CELLS = 300
N_EVAL = 1000


def _cells(count: int, salt: int = 0) -> list[CellRecord]:
    rng = np.random.default_rng(salt)
    records = []
    for i in range(count):
        clean = rng.random(N_EVAL) < 0.95
        records.append(
            CellRecord(
                cell_key=f"{salt:08x}{i:024x}",
                training_key="t" * 32,
                dataset="digits",
                defense_id="standard-v1",
                attack_id="pgd-linf-v1",
                attack_version="v",
                attack_kwargs={"steps": 20},
                family="gradient",
                norm="linf",
                eps=0.1 + i,
                bounded=True,
                seed=0,
                n_eval=N_EVAL,
                status="ok",
                error=None,
                clean_mask=clean,
                robust_mask=clean & (rng.random(N_EVAL) < 0.5),
                mean_perturbation=0.1,
                forwards=1000,
                backwards=1000,
                wall_time=1.0,
                device="cpu",
                versions={"torch": "x"},
            )
        )
    return records


WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.I)


def _transactions(store: Store, write: Callable[[], object]) -> list[list[str]]:
    """The statements of each transaction ``write`` makes, as SQLite executes them (its trace
    callback); a write outside BEGIN ... COMMIT (autocommit: a transaction of its own) fails."""
    statements: list[str] = []
    store.connection.set_trace_callback(statements.append)
    try:
        write()
    finally:
        store.connection.set_trace_callback(None)
    transactions: list[list[str]] = []
    current: list[str] | None = None
    for statement in statements:
        word = statement.strip().split()[0].upper()
        if word == "BEGIN":
            assert current is None, "nested BEGIN"
            current = []
        elif word in ("COMMIT", "END"):
            assert current is not None, "COMMIT without BEGIN"
            transactions.append(current)
            current = None
        elif WRITE.match(statement):
            assert current is not None, f"a write outside a transaction: {statement[:60]}"
            current.append(statement)
    assert current is None, "a transaction left open"
    return transactions


def _assert_one_transaction_per_cell(store: Store, records: Sequence[CellRecord]) -> None:
    before = store.connection.total_changes
    transactions = _transactions(store, lambda: [store.put_cell(record) for record in records])
    assert len(transactions) == len(records), f"{len(transactions)} transactions for {len(records)} cells"
    for record, statements in zip(records, transactions, strict=True):
        inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT") and record.cell_key in s]
        assert len(inserts) == 1, f"cell {record.cell_key}: {statements}"
    assert store.connection.total_changes - before == len(records), "one row per cell, nothing else"


def test_the_driver_stores_cells_one_transaction_each(benchmark, tmp_path):
    records = _cells(CELLS)
    with Store.open(tmp_path / "traced.db") as store:
        _assert_one_transaction_per_cell(store, records)
    paths = (tmp_path / f"w{i}.db" for i in itertools.count())

    def fresh():
        return (Store.open(next(paths)),), {}

    def write(store):
        for record in records:
            store.put_cell(record)
        store.close()

    benchmark.pedantic(write, setup=fresh, rounds=3)
    benchmark.extra_info["cells_per_second"] = CELLS / benchmark.stats.stats.mean if benchmark.stats else None


def test_the_transaction_count_catches_a_split_write(tmp_path, monkeypatch):
    """The oracle can fail: a store that commits between deleting a failed cell and inserting its
    retry (two transactions, a window where the cell is gone) is caught."""
    records = _cells(3)
    split = Store.put_cell

    def put_cell(self: Store, record: CellRecord, **kwargs: object) -> bool:
        with self.connection:
            self.connection.execute("DELETE FROM cells WHERE cell_key = ? AND status = 'failed'", (record.cell_key,))
        return split(self, record, replace_failed=False)

    monkeypatch.setattr(Store, "put_cell", put_cell)
    with Store.open(tmp_path / "split.db") as store, pytest.raises(AssertionError, match="6 transactions for 3"):
        _assert_one_transaction_per_cell(store, records)


def test_merging_shards(benchmark, tmp_path):
    shards = []
    for index in range(3):
        with Store.open(tmp_path / f"shard-{index}.db") as store:
            for record in _cells(CELLS, salt=index + 1):
                store.put_cell(record)
        shards.append(tmp_path / f"shard-{index}.db")
    targets = (tmp_path / f"merged-{i}.db" for i in itertools.count())

    report = benchmark.pedantic(lambda: merge_databases(shards, next(targets)), rounds=3)
    assert report.added["cells"] == 3 * CELLS and not report.conflicts
