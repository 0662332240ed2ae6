"""What the single writer can sustain: the driver stores every result itself, one transaction each,
so its write rate bounds how many workers a cluster can keep busy; and merging shard databases.
Measured with pytest-benchmark (`tox -e bench`; once, as a smoke test, in every test run)."""

from __future__ import annotations

import itertools

import numpy as np

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


def test_the_driver_stores_cells_one_transaction_each(benchmark, tmp_path):
    records = _cells(CELLS)
    paths = (tmp_path / f"w{i}.db" for i in itertools.count())

    def fresh():
        return (Store.open(next(paths)),), {}

    def write(store):
        for record in records:
            store.put_cell(record)
        store.close()

    benchmark.pedantic(write, setup=fresh, rounds=3)
    benchmark.extra_info["cells_per_second"] = CELLS / benchmark.stats.stats.mean if benchmark.stats else None


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
