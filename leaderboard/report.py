"""The leaderboard as data: one JSON-ready report built from the database, validated before any file
is written. Every output (Markdown, CSV, JSON, HTML, plots) renders this one structure.

Ranking: by the *best-known* robust accuracy — per threat model the per-example worst case over
every attack that ran there (adaptive ones included), averaged over the matrix's threat models —
never by a single, possibly weaker, attack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leaderboard.flags import masking_flags
from leaderboard.metrics import (
    Estimate,
    add_relative_robustness,
    cell_table,
    generalization,
    threat_is_seen,
    worst_case,
)
from leaderboard.results import Results, load_results

SCHEMA = "robustmatrix-leaderboard/1"


def decisive_attack(worst: Mapping[tuple[str, float], Mapping[str, Any]]) -> str | None:
    """The single attack that lowers this defense's worst case the most beyond every other attack
    (summed over the Lp threat models where it is strongest); when no attack stands out, the one
    strongest at the most threat models. It names what broke a defense."""
    lp = {k: v for k, v in worst.items() if k[0] in ("linf", "l2", "l1")} or dict(worst)
    lead: dict[str, float] = {}
    wins: dict[str, int] = {}
    for entry in lp.values():
        name = entry["strongest_attack"]
        lead[name] = lead.get(name, 0.0) + entry["strongest_margin"]
        wins[name] = wins.get(name, 0) + 1
    if not wins:
        return None
    return max(sorted(wins), key=lambda name: (lead[name], wins[name]))


def _defense_entry(results: Results, defense_id: str, trainings, cells) -> dict[str, Any]:
    first = trainings.iloc[0]
    trained_against = list(first["trained_against"])
    rows = cell_table(cells, trained_against)
    worst = worst_case(cells)
    observed = dict(first["observed"])
    for other in trainings["observed"].iloc[1:]:  # any seed's observation counts
        for key, value in other.items():
            if isinstance(value, bool):
                observed[key] = observed.get(key, False) or value
            elif isinstance(value, (int, float)) and isinstance(observed.get(key), (int, float)):
                observed[key] = max(observed[key], value)
    clean = Estimate.of(list(trainings["clean"]))
    flags = masking_flags(rows, worst, observed, first["nature"], results.num_classes, clean.value)
    by_threat = [
        {
            "norm": norm,
            "eps": eps,
            **entry["estimate"].as_dict(),
            "strongest_attack": entry["strongest_attack"],
            "attacks": entry["attacks"],
            "seen": threat_is_seen(norm, eps, trained_against),
        }
        for (norm, eps), entry in sorted(worst.items())
    ]
    strongest = decisive_attack(worst)
    return {
        "defense": defense_id,
        "strongest_attack": strongest,
        "source": str(first["source"]),
        "trained_against": trained_against,
        "nature": dict(first["nature"]),
        "kwargs": dict(first["kwargs"]),
        "clean": clean.as_dict(),
        "worst_case": float(np.mean([t["value"] for t in by_threat])) if by_threat else None,
        "worst_case_by_threat": by_threat,
        "flags": [{"key": f.key, "title": f.title, "evidence": f.evidence} for f in flags],
        "training": {
            "wall_time": float(trainings["wall_time"].mean()),
            "forwards": int(trainings["forwards"].mean()),
            "backwards": int(trainings["backwards"].mean()),
            "epochs": int(trainings["epochs"].max()),
        },
        "observed": observed,
        "cells": rows,
    }


def dataset_report(results: Results) -> dict[str, Any]:
    defenses = []
    for defense_id, trainings in results.trainings.groupby("defense_id"):
        cells = results.cells[results.cells["defense_id"] == defense_id]
        defenses.append(_defense_entry(results, str(defense_id), trainings, cells))
    add_relative_robustness({d["defense"]: d["cells"] for d in defenses}, ("attack", "norm", "eps"), "robust_accuracy")
    add_relative_robustness({d["defense"]: d["worst_case_by_threat"] for d in defenses}, ("norm", "eps"), "value")
    for entry in defenses:
        entry.update(generalization(entry["cells"], entry["worst_case_by_threat"]))
    defenses.sort(
        key=lambda d: (d["worst_case"] is None, -(d["worst_case"] or 0.0), -d["clean"]["value"], d["defense"])
    )
    for rank, entry in enumerate(defenses, start=1):
        entry["rank"] = rank
    threats = sorted({(t["norm"], t["eps"]) for d in defenses for t in d["worst_case_by_threat"]})
    return {
        "dataset": results.dataset,
        "n_eval": results.n_eval,
        "seeds": results.seeds,
        "num_classes": results.num_classes,
        "threat_models": [{"norm": n, "eps": e} for n, e in threats],
        "defenses": defenses,
        "failed_cells": [
            {
                "defense": r.defense_id,
                "attack": r.attack_id,
                "norm": r.norm,
                "eps": float(r.eps),
                "seed": int(r.seed),
                "error": str(r.error),
            }
            for r in results.failed.itertuples()
        ],
        "failed_defenses": [
            {"defense": r.defense_id, "seed": int(r.seed), "stage": r.kind, "error": str(r.error)}
            for r in results.failed_trainings.itertuples()
        ],
    }


def build_report(db_path: str | Path) -> dict[str, Any]:
    report = {"schema": SCHEMA, "datasets": [dataset_report(r) for r in load_results(db_path)]}
    validate(report)
    return report


# ------------------------------------------------------------------------------------ validation


class ReportError(ValueError):
    """The report does not match its schema: a bug, never written to disk."""


def _number(value: Any, where: str, *, fraction: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReportError(f"{where} must be a finite number, got {value!r}")
    if fraction and not -1e-9 <= value <= 1 + 1e-9:
        raise ReportError(f"{where} must be a fraction in [0, 1], got {value}")


def _estimate(value: Mapping[str, Any], where: str) -> None:
    for key in ("value", "low", "high"):
        _number(value[key], f"{where}.{key}", fraction=True)
    if not value["low"] - 1e-9 <= value["value"] <= value["high"] + 1e-9:
        raise ReportError(f"{where}: value outside its confidence interval")
    if not isinstance(value["n"], int) or value["n"] < 0:
        raise ReportError(f"{where}.n must be a non-negative integer")


def validate(report: Mapping[str, Any]) -> None:
    """Check the documented schema (README, "leaderboard.json"): types, ranges, and consistency."""
    if report.get("schema") != SCHEMA:
        raise ReportError(f"schema must be {SCHEMA}")
    for data in report["datasets"]:
        where = data["dataset"]
        if not isinstance(data["n_eval"], int) or not all(isinstance(s, int) for s in data["seeds"]):
            raise ReportError(f"{where}: n_eval and seeds must be integers")
        ranks = [d["rank"] for d in data["defenses"]]
        if ranks != list(range(1, len(ranks) + 1)):
            raise ReportError(f"{where}: ranks must be 1..n in order")
        for entry in data["defenses"]:
            at = f"{where}/{entry['defense']}"
            _estimate(entry["clean"], f"{at}.clean")
            _number(entry["worst_case"], f"{at}.worst_case", fraction=True, optional=True)
            for key in (
                "seen",
                "unseen",
                "relative_seen_avg",
                "relative_seen_worst",
                "relative_unseen_avg",
                "relative_unseen_worst",
                "ratio",
                "gap",
            ):
                _number(entry[key], f"{at}.{key}", optional=True)
            for threat in entry["worst_case_by_threat"]:
                _estimate(threat, f"{at}.worst_case_by_threat[{threat['norm']} {threat['eps']}]")
                _number(threat["relative"], f"{at}.worst_case_by_threat.relative", optional=True)
            for cell in entry["cells"]:
                _number(cell["eps"], f"{at}.cells.eps")
                _number(cell["robust_accuracy"], f"{at}.cells[{cell['attack']}].robust_accuracy", fraction=True)
                _number(cell["relative"], f"{at}.cells[{cell['attack']}].relative", optional=True)
                if not isinstance(cell["seen"], bool):
                    raise ReportError(f"{at}: cells.seen must be a boolean")
                worst = next(
                    (t for t in entry["worst_case_by_threat"] if (t["norm"], t["eps"]) == (cell["norm"], cell["eps"])),
                    None,
                )
                if worst is None or worst["value"] > cell["robust_accuracy"] + 1e-9:
                    raise ReportError(f"{at}: worst case above {cell['attack']} at {cell['norm']} {cell['eps']}")
            for flag in entry["flags"]:
                if not (isinstance(flag["key"], str) and isinstance(flag["evidence"], str) and flag["evidence"]):
                    raise ReportError(f"{at}: every flag needs a key and its evidence")
