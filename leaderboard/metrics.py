"""What the leaderboard computes: per-cell robust accuracy with Wilson intervals, the per-example
worst case per threat model ("best known" robust accuracy), seen vs unseen threat models, and the
competitive ratio of MultiRobustBench.

Worst case is per example — an example counts as robust only if *every* attack at that threat
model failed on it — then averaged: the mean of the minimum, never the minimum of the means
(Carlini et al. 2019). With several seeds the examples of all seeds are pooled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

Z_95 = 1.959963984540054
WHITE_BOX = ("gradient", "adaptive")
"""Families that see the model's gradients: only these can make a cell *seen* — a defense trained
against a threat model has not been trained against black-box, transfer or noise attacks."""
LP_NORMS = ("linf", "l2", "l1")


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Estimate:
    """A pooled robust accuracy: value, 95% Wilson interval, and the number of examples behind it."""

    value: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, masks: Sequence[np.ndarray]) -> Estimate:
        n = int(sum(len(m) for m in masks))
        successes = int(sum(int(m.sum()) for m in masks))
        low, high = wilson_interval(successes, n)
        return cls(successes / n if n else float("nan"), low, high, n)

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def is_seen(family: str, norm: str, eps: float, trained_against: Iterable[Mapping[str, Any]]) -> bool:
    """A white-box cell inside a threat model the defense declares it was trained against."""
    return family in WHITE_BOX and threat_is_seen(norm, eps, trained_against)


def threat_is_seen(norm: str, eps: float, trained_against: Iterable[Mapping[str, Any]]) -> bool:
    """A threat model inside one the defense declares it was trained against (any attack)."""
    return any(t["norm"] == norm and eps <= float(t["eps"]) + 1e-12 for t in trained_against)


def threat_label(norm: str, eps: float) -> str:
    return f"{norm} {eps:g}"


def column_label(attack_id: str, norm: str, eps: float) -> str:
    return f"{attack_id} {norm} {eps:g}"


def worst_case(cells: pd.DataFrame) -> dict[tuple[str, float], dict[str, Any]]:
    """Per threat model: the pooled per-example worst case over every attack, and the strongest single
    attack there (lowest robust accuracy; the cascade is not a single attack; ties go to adaptive
    attacks, which are what broke a defense that needed them)."""
    out = {}
    for (norm, eps), group in cells.groupby(["norm", "eps"]):
        per_seed = []
        for _, seed_group in group.groupby("seed"):
            per_seed.append(np.logical_and.reduce(list(seed_group["robust"])))
        estimate = Estimate.of(per_seed)
        singles = group[~group["cascade"]] if group["cascade"].any() and not group["cascade"].all() else group
        strongest = (
            singles.groupby(["attack_id", "family"])["robust_accuracy"]
            .mean()
            .reset_index()
            .assign(adaptive_first=lambda f: f["family"] != "adaptive")
            .sort_values(["robust_accuracy", "adaptive_first", "attack_id"], kind="stable")
        )
        values = strongest["robust_accuracy"].tolist()
        out[(str(norm), float(eps))] = {
            "estimate": estimate,
            "strongest_attack": str(strongest.iloc[0]["attack_id"]),
            "strongest_margin": float(values[1] - values[0]) if len(values) > 1 else 0.0,
            "attacks": int(group["attack_id"].nunique()),
        }
    return out


def cell_table(cells: pd.DataFrame, trained_against: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (attack, eps) column of a defense, pooled over seeds."""
    rows = []
    for (attack_id, family, norm, eps), group in cells.groupby(["attack_id", "family", "norm", "eps"]):
        estimate = Estimate.of(list(group["robust"]))
        steps = group["steps"].dropna()
        rows.append(
            {
                "attack": str(attack_id),
                "family": str(family),
                "norm": str(norm),
                "eps": float(eps),
                "steps": int(steps.iloc[0]) if len(steps) else None,
                "cascade": bool(group["cascade"].any()),
                "seen": is_seen(str(family), str(norm), float(eps), trained_against),
                "robust_accuracy": estimate.value,
                "ci_low": estimate.low,
                "ci_high": estimate.high,
                "n": estimate.n,
                "wall_time": float(group["wall_time"].sum()),
                "forwards": int(group["forwards"].sum()),
                "backwards": int(group["backwards"].sum()),
            }
        )
    return sorted(rows, key=lambda r: (r["norm"], r["eps"], r["attack"]))


RATIO_FLOOR = 0.05
"""The competitive ratio is left undefined on a column where no defense keeps this much robust
accuracy: near zero one example decides it (0.004 vs 0.000 would read as a ratio of 0)."""


def add_relative_robustness(
    entries_by_defense: Mapping[str, list[dict[str, Any]]], key: Sequence[str], value: str
) -> None:
    """Competitive ratio per column (MultiRobustBench): a defense's accuracy / the best defense's on
    that column, stored as ``relative``; None where the best is below RATIO_FLOOR. A column
    is the tuple of ``key`` fields: (attack, norm, eps) for cells, (norm, eps) for threat models."""
    best: dict[tuple, float] = {}
    for entries in entries_by_defense.values():
        for entry in entries:
            column = tuple(entry[k] for k in key)
            best[column] = max(best.get(column, 0.0), entry[value])
    for entries in entries_by_defense.values():
        for entry in entries:
            top = best[tuple(entry[k] for k in key)]
            entry["relative"] = entry[value] / top if top >= RATIO_FLOOR else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def generalization(cells: Sequence[Mapping[str, Any]], threats: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Seen vs unseen summary of one defense: mean robust accuracy over seen and unseen cells, gap and
    ratio; and the average and worst competitive ratio over seen and unseen threat models, taken on
    the per-example worst case — per-attack columns would compare against a masked defense's
    inflated number under an attack that cannot see through it."""
    seen = [r["robust_accuracy"] for r in cells if r["seen"]]
    unseen = [r["robust_accuracy"] for r in cells if not r["seen"]]
    seen_mean, unseen_mean = _mean(seen), _mean(unseen)
    relative_seen = [t["relative"] for t in threats if t["seen"] and t.get("relative") is not None]
    relative_unseen = [t["relative"] for t in threats if not t["seen"] and t.get("relative") is not None]
    return {
        "seen": seen_mean,
        "unseen": unseen_mean,
        "gap": seen_mean - unseen_mean if seen_mean is not None and unseen_mean is not None else None,
        "ratio": unseen_mean / seen_mean if seen_mean and unseen_mean is not None else None,
        "relative_seen_avg": _mean(relative_seen),
        "relative_seen_worst": min(relative_seen) if relative_seen else None,
        "relative_unseen_avg": _mean(relative_unseen),
        "relative_unseen_worst": min(relative_unseen) if relative_unseen else None,
    }
