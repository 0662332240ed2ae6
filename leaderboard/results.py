"""Reading the results database into tables: the only input the leaderboard has.

When the database holds several generations of a result (a defense retrained after a code change,
an attack re-run), only the newest counts: the newest training of each (dataset, defense, seed),
its newest evaluation, and the newest cell per (training, attack, eps).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.store import Store, decode_mask

DEFAULT_CLASSES = 10
"""Classes assumed for chance accuracy when an evaluation predates recording ``num_classes``."""


@dataclass(frozen=True)
class Results:
    dataset: str
    n_eval: int
    trainings: pd.DataFrame
    """One row per (defense_id, seed): the newest training, with clean mask and observations."""
    cells: pd.DataFrame
    """One row per (defense_id, seed, attack_id, eps), status ok, with decoded ``robust`` masks and the
    attack's declared ``steps`` (from the attacks table)."""
    failed: pd.DataFrame
    """Failed cells (the newest per key), with their reasons."""
    failed_trainings: pd.DataFrame
    """Defenses whose training or evaluation failed (so none of their cells ran)."""

    @property
    def defenses(self) -> list[str]:
        return sorted(self.trainings["defense_id"].unique())

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.trainings["seed"].unique())

    @property
    def num_classes(self) -> int:
        counts = [o.get("num_classes") for o in self.trainings["observed"] if o.get("num_classes")]
        return int(max(counts)) if counts else DEFAULT_CLASSES


def _newest(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values("created_at", kind="stable").drop_duplicates(keys, keep="last")


def _read(connection: sqlite3.Connection, table: str) -> pd.DataFrame:
    present = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if table not in present:
        return pd.DataFrame()
    return pd.read_sql(f"SELECT * FROM {table}", connection)


def _declared_steps(spec_json: str) -> Any:
    budget = json.loads(spec_json).get("budget") or {}
    return budget.get("steps")


def _is_cascade(spec_json: str) -> bool:
    """A cascade (the adaptive worst case) declares its member attacks as a kwarg."""
    return "members" in (json.loads(spec_json).get("kwargs") or {})


def load_results(db_path: str | Path, dataset: str | None = None) -> list[Results]:
    """Results per dataset (and evaluation size) found in the database, newest generation only."""
    with Store.open_existing(db_path) as store:
        connection = store.connection
        trainings = _read(connection, "trainings")
        evaluations = _read(connection, "evaluations")
        cells = _read(connection, "cells")
        attacks = _read(connection, "attacks")
        failures = _read(connection, "failures")
    if trainings.empty:
        return []
    if dataset is not None:
        trainings = trainings[trainings["dataset"] == dataset]
    if not attacks.empty:
        attacks = attacks.assign(
            steps=[_declared_steps(s) for s in attacks["spec"]], cascade=[_is_cascade(s) for s in attacks["spec"]]
        )
        cells = cells.merge(
            attacks[["attack_id", "attack_version", "steps", "cascade"]], on=["attack_id", "attack_version"], how="left"
        )
        cells["cascade"] = cells["cascade"].astype("boolean").fillna(False).astype(bool)
    else:
        cells = cells.assign(steps=None, cascade=False)
    out = []
    for name in sorted(trainings["dataset"].unique()):
        chosen = _newest(trainings[trainings["dataset"] == name], ["defense_id", "seed"])
        evals = evaluations[evaluations["training_key"].isin(chosen["training_key"])]
        if evals.empty:
            continue
        # The evaluation size of the newest evaluation is the one shown; masks of other sizes cannot mix.
        n_eval = int(evals.sort_values("created_at", kind="stable").iloc[-1]["n_eval"])
        evals = _newest(evals[evals["n_eval"] == n_eval], ["training_key"])
        table = chosen.merge(evals[["training_key", "clean_accuracy", "clean_mask", "observed"]], on="training_key")
        table["clean"] = [decode_mask(blob, n_eval) for blob in table["clean_mask"]]
        for column in ("observed", "trained_against", "nature", "kwargs"):
            table[column] = [json.loads(value) for value in table[column]]
        relevant = cells[cells["training_key"].isin(table["training_key"]) & (cells["n_eval"] == n_eval)]
        relevant = _newest(relevant, ["training_key", "attack_id", "eps"])
        ok = relevant[relevant["status"] == "ok"].copy()
        ok["robust"] = [decode_mask(blob, n_eval) for blob in ok["robust_mask"]]
        failed = relevant[relevant["status"] == "failed"]
        broken = pd.DataFrame(columns=["defense_id", "seed", "kind", "error"])
        if not failures.empty:
            mine = failures[(failures["dataset"] == name) & ~failures["defense_id"].isin(table["defense_id"])]
            broken = _newest(mine, ["defense_id", "seed"])[["defense_id", "seed", "kind", "error"]]
        out.append(
            Results(
                name,
                n_eval,
                table.reset_index(drop=True),
                ok.reset_index(drop=True),
                failed.reset_index(drop=True),
                broken.reset_index(drop=True),
            )
        )
    return out
