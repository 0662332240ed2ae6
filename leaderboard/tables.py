"""The leaderboard table: one row per defense — clean accuracy, robust accuracy per attack x eps
column, and the per-example worst case over all attacks at each threat model.

Worst case is per example (an example counts as robust only if *every* attack failed on it), then
averaged: the mean of the minimum, never the minimum of the means (Carlini et al. 2019). With
several seeds, each seed's number is computed on its own masks and the seeds are averaged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from leaderboard.results import Results, column_name


def threat_label(norm: str, eps: float) -> str:
    return f"worst {norm} {eps:g}"


def summary_table(results: Results) -> pd.DataFrame:
    rows = []
    cells = results.cells
    for defense_id, trainings in results.trainings.groupby("defense_id"):
        row: dict[str, object] = {
            "defense": defense_id,
            "source": trainings["source"].iloc[0],
            "clean": float(trainings["clean_accuracy"].mean()),
        }
        mine = cells[cells["defense_id"] == defense_id]
        for (attack_id, norm, eps), group in mine.groupby(["attack_id", "norm", "eps"]):
            row[column_name(attack_id, norm, eps)] = float(group["robust_accuracy"].mean())
        worst_values = []
        for (norm, eps), group in mine.groupby(["norm", "eps"]):
            per_seed = [
                float(np.mean(np.logical_and.reduce(list(seed_group["robust"]))))
                for _, seed_group in group.groupby("seed")
            ]
            row[threat_label(norm, eps)] = float(np.mean(per_seed))
            worst_values.append(row[threat_label(norm, eps)])
        row["worst case (mean)"] = float(np.mean(worst_values)) if worst_values else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    fixed = ["defense", "source", "clean", "worst case (mean)"]
    worst = sorted((c for c in table.columns if c.startswith("worst ") and c not in fixed), key=_threat_order)
    attacks = sorted(c for c in table.columns if c not in fixed and c not in worst)
    table = table[fixed + worst + attacks]
    return table.sort_values(["worst case (mean)", "clean"], ascending=False, na_position="last").reset_index(drop=True)


def _threat_order(column: str) -> tuple[str, float]:
    _, norm, eps = column.split(" ")
    return norm, float(eps)
