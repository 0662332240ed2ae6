"""Reading the results database into tables: the only input the leaderboard has.

When the database holds several generations of a result (a defense retrained after a code change,
an attack re-run), only the newest counts: the newest training of each (dataset, defense, seed),
its newest evaluation, and the newest cell per (training, attack, eps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.store import Store, decode_mask


@dataclass(frozen=True)
class Results:
    dataset: str
    n_eval: int
    trainings: pd.DataFrame
    """One row per (defense_id, seed): the newest training, with clean mask and observations."""
    cells: pd.DataFrame
    """One row per (defense_id, seed, attack_id, eps), status ok, with decoded ``robust`` masks."""
    failed: pd.DataFrame
    """Failed cells (the newest per key), with their reasons."""

    @property
    def defenses(self) -> list[str]:
        return sorted(self.trainings["defense_id"].unique())


def _newest(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values("created_at", kind="stable").drop_duplicates(keys, keep="last")


def load_results(db_path: str | Path, dataset: str | None = None) -> list[Results]:
    """Results per dataset (and evaluation size) found in the database, newest generation only."""
    with Store.open_existing(db_path) as store:
        connection = store.connection
        trainings = pd.read_sql("SELECT * FROM trainings", connection)
        evaluations = pd.read_sql("SELECT * FROM evaluations", connection)
        cells = pd.read_sql("SELECT * FROM cells", connection)
    if dataset is not None:
        trainings = trainings[trainings["dataset"] == dataset]
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
        table["observed"] = [json.loads(o) for o in table["observed"]]
        table["trained_against"] = [json.loads(t) for t in table["trained_against"]]
        table["nature"] = [json.loads(n) for n in table["nature"]]
        relevant = cells[cells["training_key"].isin(table["training_key"]) & (cells["n_eval"] == n_eval)]
        relevant = _newest(relevant, ["training_key", "attack_id", "eps"])
        ok = relevant[relevant["status"] == "ok"].copy()
        ok["robust"] = [decode_mask(blob, n_eval) for blob in ok["robust_mask"]]
        failed = relevant[relevant["status"] == "failed"]
        out.append(
            Results(
                name, n_eval, table.reset_index(drop=True), ok.reset_index(drop=True), failed.reset_index(drop=True)
            )
        )
    return out


def column_name(attack_id: str, norm: str, eps: float) -> str:
    return f"{attack_id} {norm} {eps:g}"


def mask_mean(masks: list[np.ndarray]) -> float:
    return float(np.mean(np.logical_and.reduce(masks))) if masks else float("nan")
