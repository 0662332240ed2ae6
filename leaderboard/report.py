"""The leaderboard as data: one JSON-ready report built from the database, validated before any file
is written. Every output (Markdown, CSV, JSON, HTML, plots) renders this one structure.

Ranking: by the *best-known* robust accuracy — per threat model the per-example worst case over
every attack that ran there (adaptive ones included), averaged over the dataset's threat models —
never by a single, possibly weaker, attack, and never over a defense's own subset of threat models
(a defense missing one is listed, unranked, as incomplete).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leaderboard.flags import FLAGS, certified_but_broken, masking_flags
from leaderboard.metrics import (
    Estimate,
    add_relative_robustness,
    cell_masks,
    cell_table,
    generalization,
    is_seen,
    threat_is_seen,
    wilson_interval,
    worst_case,
)
from leaderboard.results import Cell, Results, Verification, load_results

SCHEMA = "robustmatrix-leaderboard/3"
"""2: ``worst_case_by_threat[].reference`` (AutoAttack beside the worst case); the strongest attack
is the one whose removal raises the worst case most. 3: ``worst_case_by_threat[].certified`` (the
verifiers' lower bound beside the worst case, null where no verifier ran) and ``certified`` (its
mean over the threat models that have one)."""


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


def _merged_observations(trainings: list[dict[str, Any]]) -> dict[str, Any]:
    observed = dict(trainings[0]["observed"])
    for other in (t["observed"] for t in trainings[1:]):  # any seed's observation counts
        for key, value in other.items():
            if isinstance(value, bool):
                observed[key] = observed.get(key, False) or value
            elif isinstance(value, (int, float)) and isinstance(observed.get(key), (int, float)):
                observed[key] = max(observed[key], value)
    return observed


def _probe_counts(trainings: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per loss, (examples whose input gradient vanished, examples probed), pooled over seeds. The probe
    records fractions of the correctly classified examples among the first ``examples`` evaluation
    examples; their number is read from the clean mask."""
    totals = {"ce": [0, 0], "dlr": [0, 0], "zero": [0, 0]}
    for observed, clean in ((t["observed"], t["clean"]) for t in trainings):
        probed = int(np.count_nonzero(clean[: int(observed.get("examples", len(clean)))]))
        fractions = {
            "ce": observed.get("vanishing_gradient_ce", 0.0),
            "dlr": observed.get("vanishing_gradient_dlr", 0.0),
            "zero": max(observed.get("zero_gradient_ce", 0.0), observed.get("zero_gradient_dlr", 0.0)),
        }
        for loss, fraction in fractions.items():
            totals[loss][0] += round(float(fraction) * probed)
            totals[loss][1] += probed
    return {loss: (k, m) for loss, (k, m) in totals.items()}


def certificates(
    verifications: list[Verification], worst: Mapping[tuple[str, float], Mapping[str, Any]]
) -> tuple[
    dict[tuple[str, float], dict[str, Any]], dict[str, dict[tuple[str, float], dict[str, dict[int, np.ndarray]]]]
]:
    """Per threat model with a worst case and a verifier's run: the certified lower bound (per
    example, certified by *any* verifier that ran — each is sound, so their union is) with its
    interval and each verifier's own result; and, by what they certify (the model, or a smoothed
    classifier), the per-verifier masks by seed, for the flags."""
    entries, masks = {}, {}
    by_threat: dict[tuple[str, float], list[Verification]] = {}
    for v in verifications:
        by_threat.setdefault((v.norm, v.eps), []).append(v)
    for key, group in sorted(by_threat.items()):
        if key not in worst:
            continue
        seeds = sorted(worst[key]["masks"])
        ok = [v for v in group if v.status == "ok" and v.seed in seeds]
        union = {
            s: np.logical_or.reduce([v.certified for v in ok if v.seed == s] or [np.zeros_like(worst[key]["masks"][s])])
            for s in seeds
        }
        runs = []
        for verifier in sorted({v.verifier_id for v in group}):
            mine = [v for v in group if v.verifier_id == verifier]
            done = [v for v in mine if v.status == "ok"]
            reason = next((v.error for v in mine if v.status != "ok"), None)
            status = "ok" if len(done) == len(mine) else next(v.status for v in mine if v.status != "ok")
            runs.append(
                {
                    "verifier": verifier,
                    "status": status,
                    "value": Estimate.of([v.certified for v in done]).value if status == "ok" else None,
                    "wall_time": float(sum(v.wall_time for v in mine)),
                    "reason": reason,
                }
            )
            kind = "smoothed" if any(v.certifies == "smoothed" for v in mine) else "model"
            masks.setdefault(kind, {}).setdefault(key, {})[verifier] = {v.seed: v.certified for v in done}
        entries[key] = {**Estimate.of(list(union.values())).as_dict(), "verifiers": runs}
    return entries, masks


def _defense_entry(
    results: Results, defense_id: str, trainings: list[dict[str, Any]], records: list[Cell]
) -> dict[str, Any]:
    first = trainings[0]
    trained_against = list(first["trained_against"])
    rows = cell_table(records, trained_against)
    worst = worst_case(records)
    observed = _merged_observations(trainings)
    clean = Estimate.of([t["clean"] for t in trainings])
    flags = masking_flags(
        rows,
        worst,
        observed,
        first["nature"],
        results.num_classes,
        clean.value,
        masks=cell_masks(records),
        probe=_probe_counts(trainings),
    )
    mine = [v for v in results.verifications if v.defense_id == defense_id]
    certified, certified_masks = certificates(mine, worst)
    contradictions = [
        certified_but_broken(worst, certified_masks.get("model", {})),
        certified_but_broken(worst, certified_masks.get("smoothed", {}), "smoothed-vote-disagrees"),
    ]
    order = list(FLAGS)
    flags = sorted([*flags, *(c for c in contradictions if c is not None)], key=lambda f: order.index(f.key))
    by_threat = [
        {
            "norm": norm,
            "eps": eps,
            **entry["estimate"].as_dict(),
            "strongest_attack": entry["strongest_attack"],
            "attacks": entry["attacks"],
            "seen": threat_is_seen(norm, eps, trained_against),
            "reference": entry["reference"],
            "certified": certified.get((norm, eps)),
        }
        for (norm, eps), entry in sorted(worst.items())
    ]
    bounds = [t["certified"]["value"] for t in by_threat if t["certified"] is not None]
    return {
        "defense": defense_id,
        "strongest_attack": decisive_attack(worst),
        "source": str(first["source"]),
        "trained_against": trained_against,
        "nature": dict(first["nature"]),
        "kwargs": dict(first["kwargs"]),
        "clean": clean.as_dict(),
        "worst_case_by_threat": by_threat,
        "certified": float(np.mean(bounds)) if bounds else None,
        "flags": [{"key": f.key, "title": f.title, "evidence": f.evidence} for f in flags],
        "training": {
            "wall_time": float(np.mean([t["wall_time"] for t in trainings])),
            "forwards": int(np.mean([t["forwards"] for t in trainings])),
            "backwards": int(np.mean([t["backwards"] for t in trainings])),
            "epochs": int(max(t["epochs"] for t in trainings)),
        },
        "observed": observed,
        "cells": rows,
        "failed_attacks": _failed_attacks(results, defense_id),
    }


def _failed_attacks(results: Results, defense_id: str) -> list[dict[str, Any]]:
    """The attacks whose cells failed for this defense (and that the matrix still selects): at those
    threat models the worst case is over fewer attacks than everyone else's, so the row is unranked."""
    failed = {
        (str(r["attack_id"]), str(r["norm"]), float(r["eps"]))
        for r in results.failed
        if r["defense_id"] == defense_id and not r.get("excluded")
    }
    return [{"attack": a, "norm": n, "eps": e} for a, n, e in sorted(failed)]


def rank_defenses(defenses: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Set ``worst_case``, ``missing_threat_models`` and ``rank`` of every defense and sort them; returns
    the dataset's threat models (every (norm, eps) any defense has a result at).

    ``worst_case`` is the mean over the *dataset's* threat models. A defense without a result at some of
    them (its cells there failed or were not run) would average over fewer, easier or harder, threat
    models: its worst case is null, it is not ranked (rank null) and comes after the ranked ones, with
    the missing threat models named."""
    threats = sorted({(t["norm"], t["eps"]) for d in defenses for t in d["worst_case_by_threat"]})
    for entry in defenses:
        have = {(t["norm"], t["eps"]) for t in entry["worst_case_by_threat"]}
        missing = [t for t in threats if t not in have]
        entry["missing_threat_models"] = [{"norm": n, "eps": e} for n, e in missing]
        values = [t["value"] for t in entry["worst_case_by_threat"]]
        complete = values and not missing and not entry["failed_attacks"]
        entry["worst_case"] = float(np.mean(values)) if complete else None
    ranked = sorted(
        (d for d in defenses if d["worst_case"] is not None),
        key=lambda d: (-d["worst_case"], -d["clean"]["value"], d["defense"]),
    )
    unranked = sorted((d for d in defenses if d["worst_case"] is None), key=lambda d: d["defense"])
    for rank, entry in enumerate(ranked, start=1):
        entry["rank"] = rank
    for entry in unranked:
        entry["rank"] = None
    defenses[:] = ranked + unranked
    return threats


def _coverage_warnings(defenses: list[dict[str, Any]], threats: list[tuple[str, float]]) -> list[str]:
    """A threat model most defenses have no result at (typically an eps that only a `run --defense X
    --config` added) makes all of them unranked: say so once, with what to do."""
    out = []
    for norm, eps in threats:
        having = [d["defense"] for d in defenses if {"norm": norm, "eps": eps} not in d["missing_threat_models"]]
        if 2 * len(having) < len(defenses):
            out.append(
                f"only {len(having)} of {len(defenses)} defenses have results at {norm} {eps:g} "
                f"({', '.join(having[:5])}{', ...' if len(having) > 5 else ''}): the others are listed unranked as "
                "incomplete. Run them at it with the same matrix, or leave it out of the config."
            )
    return out


def dataset_report(results: Results) -> dict[str, Any]:
    cells: dict[str, list[Cell]] = {}
    for cell in results.cells:
        cells.setdefault(cell.defense_id, []).append(cell)
    trainings: dict[str, list[dict[str, Any]]] = {}
    for training in results.trainings:
        trainings.setdefault(training["defense_id"], []).append(training)
    defenses = [
        _defense_entry(results, defense_id, seeds, cells.get(defense_id, []))
        for defense_id, seeds in sorted(trainings.items())
    ]
    add_relative_robustness({d["defense"]: d["cells"] for d in defenses}, ("attack", "norm", "eps"), "robust_accuracy")
    add_relative_robustness({d["defense"]: d["worst_case_by_threat"] for d in defenses}, ("norm", "eps"), "value")
    for entry in defenses:
        entry.update(generalization(entry["cells"], entry["worst_case_by_threat"]))
    threats = rank_defenses(defenses)
    return {
        "dataset": results.dataset,
        "n_eval": results.n_eval,
        "seeds": results.seeds,
        "num_classes": results.num_classes,
        "threat_models": [{"norm": n, "eps": e} for n, e in threats],
        "warnings": [*results.warnings, *_coverage_warnings(defenses, threats)],
        "defenses": defenses,
        "failed_cells": [
            {
                "defense": r["defense_id"],
                "attack": r["attack_id"],
                "norm": r["norm"],
                "eps": r["eps"],
                "seed": r["seed"],
                "error": str(r["error"]),
            }
            for r in results.failed
        ],
        "failed_defenses": [
            {"defense": r["defense_id"], "seed": r["seed"], "stage": r["kind"], "error": str(r["error"])}
            for r in results.failed_trainings
        ],
    }


def build_report(db_path: str | Path) -> dict[str, Any]:
    report = {"schema": SCHEMA, "datasets": [dataset_report(r) for r in load_results(db_path)]}
    validate(report)
    return report


# ------------------------------------------------------------------------------------ validation


class ReportError(ValueError):
    """The report does not match its schema: a bug, never written to disk."""


TOLERANCE = 1e-9
FAMILIES = ("gradient", "adaptive", "score-based", "decision-based", "transfer", "noise", "reference")
ESTIMATE = ("value", "low", "high", "n")
THREAT = ("norm", "eps")
SUMMARY_NUMBERS = (
    "seen",
    "unseen",
    "seen_worst_case",
    "unseen_worst_case",
    "gap",
    "ratio",
    "relative_seen_avg",
    "relative_seen_worst",
    "relative_unseen_avg",
    "relative_unseen_worst",
)
DATASET_KEYS = (
    "dataset",
    "n_eval",
    "seeds",
    "num_classes",
    "threat_models",
    "warnings",
    "defenses",
    "failed_cells",
    "failed_defenses",
)
DEFENSE_KEYS = (
    "rank",
    "defense",
    "source",
    "clean",
    "worst_case",
    "worst_case_by_threat",
    "certified",
    "missing_threat_models",
    "strongest_attack",
    *SUMMARY_NUMBERS,
    "flags",
    "trained_against",
    "nature",
    "observed",
    "kwargs",
    "training",
    "cells",
    "failed_attacks",
)
BY_THREAT_KEYS = (*THREAT, *ESTIMATE, "strongest_attack", "attacks", "seen", "relative", "reference", "certified")
CERTIFIED_KEYS = (*ESTIMATE, "verifiers")
VERIFIER_RUN_KEYS = ("verifier", "status", "value", "wall_time", "reason")
REFERENCE_KEYS = ("attack", *ESTIMATE, "beyond", "beyond_examples")
CELL_KEYS = (
    "attack",
    "family",
    "norm",
    "eps",
    "steps",
    "cascade",
    "seen",
    "robust_accuracy",
    "ci_low",
    "ci_high",
    "n",
    "relative",
    "wall_time",
    "forwards",
    "backwards",
)
TRAINING_KEYS = ("wall_time", "forwards", "backwards", "epochs")
FLAG_KEYS = ("key", "title", "evidence")
FAILED_CELL_KEYS = ("defense", "attack", "norm", "eps", "seed", "error")
FAILED_DEFENSE_KEYS = ("defense", "seed", "stage", "error")


def _object(value: Any, keys: tuple[str, ...], where: str) -> Mapping[str, Any]:
    """A JSON object with exactly ``keys``."""
    if not isinstance(value, Mapping):
        raise ReportError(f"{where} must be an object, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ReportError(f"{where} is missing {', '.join(missing)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ReportError(f"{where} has unknown key(s) {', '.join(map(str, unknown))}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ReportError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _string(value: Any, where: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise ReportError(f"{where} must be a non-empty string, got {value!r}")


def _bool(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise ReportError(f"{where} must be true or false, got {value!r}")


def _integer(value: Any, where: str, *, minimum: int | None = 0, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ReportError(f"{where} must be an integer >= {minimum}, got {value!r}")


def _number(
    value: Any,
    where: str,
    *,
    fraction: bool = False,
    optional: bool = False,
    low: float | None = None,
    high: float | None = None,
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReportError(f"{where} must be a finite number, got {value!r}")
    if fraction:
        low, high = 0.0, 1.0
    if (low is not None and value < low - TOLERANCE) or (high is not None and value > high + TOLERANCE):
        if low is not None and high is not None:
            bounds = f"in [{low:g}, {high:g}]"
        else:
            bounds = f">= {low:g}" if low is not None else f"<= {high:g}"
        raise ReportError(f"{where} must be {bounds}, got {value}")


def _same(value: float | None, expected: float | None, where: str) -> None:
    if (value is None) != (expected is None) or (
        value is not None and expected is not None and abs(value - expected) > 1e-7
    ):
        raise ReportError(f"{where} is {value!r} but its definition gives {expected!r}")


def _interval(value: float, low: float, high: float, n: int, where: str) -> None:
    """A pooled proportion of ``n`` examples with its 95% Wilson interval."""
    if not low - TOLERANCE <= value <= high + TOLERANCE:
        raise ReportError(f"{where}: value {value} outside its confidence interval [{low}, {high}]")
    if n == 0:
        raise ReportError(f"{where}: an estimate needs at least one example")
    successes = value * n
    if abs(successes - round(successes)) > 1e-6:
        raise ReportError(f"{where}: value {value} is not a proportion of {n} examples")
    expected = wilson_interval(round(successes), n)
    if abs(low - expected[0]) > 1e-7 or abs(high - expected[1]) > 1e-7:
        raise ReportError(f"{where}: [{low}, {high}] is not the 95% Wilson interval {expected}")


def _estimate(value: Any, where: str, keys: tuple[str, ...] = ESTIMATE) -> None:
    _object(value, keys, where)
    for key in ("value", "low", "high"):
        _number(value[key], f"{where}.{key}", fraction=True)
    _integer(value["n"], f"{where}.n")
    _interval(value["value"], value["low"], value["high"], value["n"], where)


def _threat(value: Any, where: str, keys: tuple[str, ...] = THREAT) -> tuple[str, float]:
    _object(value, keys, where)
    _string(value["norm"], f"{where}.norm")
    _number(value["eps"], f"{where}.eps", low=0.0)
    return value["norm"], value["eps"]


def _json_values(value: Any, where: str) -> None:
    """Only JSON types (no NaN or infinity, no numpy scalars) anywhere."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, (int, float)):
        if type(value) not in (int, float):
            raise ReportError(f"{where}: {type(value).__name__} is not a JSON number")
        if not math.isfinite(value):
            raise ReportError(f"{where}: {value} is not a JSON number (missing values are null)")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ReportError(f"{where}: key {key!r} is not a string")
            _json_values(item, f"{where}.{key}")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _json_values(item, f"{where}[{i}]")
        return
    raise ReportError(f"{where}: {type(value).__name__} is not a JSON value")


def validate(report: Any) -> None:
    """Check the documented schema (README, "leaderboard.json"): every key present and no other, types
    and ranges, and the consistency of derived numbers with their definitions. Raises ReportError."""
    try:
        _validate(report)
    except ReportError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a shape no check foresaw
        raise ReportError(f"malformed report: {type(exc).__name__}: {exc}") from exc


def _validate(report: Any) -> None:
    _object(report, ("schema", "datasets"), "report")
    if report["schema"] != SCHEMA:
        raise ReportError(f"schema must be {SCHEMA}, got {report['schema']!r}")
    _json_values(report, "report")
    for i, data in enumerate(_list(report["datasets"], "datasets")):
        _dataset(data, f"datasets[{i}]")


def _dataset(data: Any, where: str) -> None:
    _object(data, DATASET_KEYS, where)
    _string(data["dataset"], f"{where}.dataset")
    where = data["dataset"]
    _integer(data["n_eval"], f"{where}.n_eval", minimum=1)
    seeds = _list(data["seeds"], f"{where}.seeds")
    for seed in seeds:
        _integer(seed, f"{where}.seeds[]", minimum=None)
    if not seeds or seeds != sorted(set(seeds)):
        raise ReportError(f"{where}.seeds must be a non-empty sorted list of distinct integers")
    _integer(data["num_classes"], f"{where}.num_classes", minimum=2)
    threats = [_threat(t, f"{where}.threat_models[]") for t in _list(data["threat_models"], f"{where}.threat_models")]
    if threats != sorted(set(threats)):
        raise ReportError(f"{where}.threat_models must be sorted and distinct")
    for text in _list(data["warnings"], f"{where}.warnings"):
        _string(text, f"{where}.warnings[]")
    for cell in _list(data["failed_cells"], f"{where}.failed_cells"):
        _object(cell, FAILED_CELL_KEYS, f"{where}.failed_cells[]")
        for key in ("defense", "attack", "norm", "error"):
            _string(cell[key], f"{where}.failed_cells[].{key}")
        _number(cell["eps"], f"{where}.failed_cells[].eps", low=0.0)
        _integer(cell["seed"], f"{where}.failed_cells[].seed", minimum=None)
    for failure in _list(data["failed_defenses"], f"{where}.failed_defenses"):
        _object(failure, FAILED_DEFENSE_KEYS, f"{where}.failed_defenses[]")
        for key in ("defense", "stage", "error"):
            _string(failure[key], f"{where}.failed_defenses[].{key}")
        _integer(failure["seed"], f"{where}.failed_defenses[].seed", minimum=None)
    defenses = _list(data["defenses"], f"{where}.defenses")
    for entry in defenses:
        _defense(entry, where, set(threats), data["n_eval"] * len(seeds))
    names = [d["defense"] for d in defenses]
    if len(set(names)) != len(names):
        raise ReportError(f"{where}: a defense is listed twice")
    covered = {(t["norm"], t["eps"]) for d in defenses for t in d["worst_case_by_threat"]}
    if covered != set(threats):
        raise ReportError(f"{where}.threat_models must be the threat models some defense has a result at")
    ranked = [d for d in defenses if d["rank"] is not None]
    if [d["rank"] for d in ranked] != list(range(1, len(ranked) + 1)) or defenses[: len(ranked)] != ranked:
        raise ReportError(f"{where}: ranks must be 1..n in order, followed by the unranked (incomplete) defenses")
    order = [(-d["worst_case"], -d["clean"]["value"]) for d in ranked]
    if order != sorted(order):
        raise ReportError(f"{where}: ranked defenses must be sorted by worst case, then clean accuracy")


def _certified(value: Any, where: str) -> None:
    _object(value, CERTIFIED_KEYS, where)
    _estimate({k: value[k] for k in ESTIMATE}, where)
    for run in _list(value["verifiers"], f"{where}.verifiers"):
        _object(run, VERIFIER_RUN_KEYS, f"{where}.verifiers[]")
        _string(run["verifier"], f"{where}.verifiers[].verifier")
        if run["status"] not in ("ok", "unsupported", "failed"):
            raise ReportError(f"{where}.verifiers[].status must be ok, unsupported or failed, got {run['status']!r}")
        _number(run["value"], f"{where}.verifiers[].value", fraction=True, optional=True)
        _number(run["wall_time"], f"{where}.verifiers[].wall_time", low=0.0)
        _string(run["reason"], f"{where}.verifiers[].reason", optional=True)
        if (run["value"] is None) != (run["status"] != "ok"):
            raise ReportError(f"{where}.verifiers[]: a value exactly when the verifier ran")
        if run["value"] is not None and run["value"] > value["value"] + TOLERANCE:
            raise ReportError(f"{where}: {run['verifier']} certifies more than the union of all verifiers")


def _defense(entry: Any, dataset: str, threats: set[tuple[str, float]], pooled: int) -> None:
    _object(entry, DEFENSE_KEYS, f"{dataset}.defenses[]")
    _string(entry["defense"], f"{dataset}.defenses[].defense")
    at = f"{dataset}/{entry['defense']}"
    _integer(entry["rank"], f"{at}.rank", minimum=1, optional=True)
    _string(entry["source"], f"{at}.source")
    _estimate(entry["clean"], f"{at}.clean")
    _string(entry["strongest_attack"], f"{at}.strongest_attack", optional=True)
    for key in ("nature", "observed", "kwargs"):
        if not isinstance(entry[key], Mapping):
            raise ReportError(f"{at}.{key} must be an object")
    trained_against = _list(entry["trained_against"], f"{at}.trained_against")
    for threat in trained_against:
        _threat(threat, f"{at}.trained_against[]", (*THREAT, "attack"))
        _string(threat["attack"], f"{at}.trained_against[].attack")
    training = _object(entry["training"], TRAINING_KEYS, f"{at}.training")
    _number(training["wall_time"], f"{at}.training.wall_time", low=0.0)
    for key in ("forwards", "backwards", "epochs"):
        _integer(training[key], f"{at}.training.{key}")

    by_threat = {}
    for threat in _list(entry["worst_case_by_threat"], f"{at}.worst_case_by_threat"):
        key = _threat(threat, f"{at}.worst_case_by_threat[]", BY_THREAT_KEYS)
        here = f"{at}.worst_case_by_threat[{key[0]} {key[1]:g}]"
        _estimate({k: threat[k] for k in ESTIMATE}, here)
        _string(threat["strongest_attack"], f"{here}.strongest_attack")
        _integer(threat["attacks"], f"{here}.attacks", minimum=1)
        _bool(threat["seen"], f"{here}.seen")
        if threat["seen"] != threat_is_seen(key[0], key[1], trained_against):
            raise ReportError(f"{here}.seen contradicts trained_against")
        _number(threat["relative"], f"{here}.relative", fraction=True, optional=True)
        if threat["reference"] is not None:
            reference = _object(threat["reference"], REFERENCE_KEYS, f"{here}.reference")
            _string(reference["attack"], f"{here}.reference.attack")
            _estimate({k: reference[k] for k in ESTIMATE}, f"{here}.reference")
            _integer(reference["beyond"], f"{here}.reference.beyond")
            listed = sum(
                len(_list(ids, f"{here}.reference.beyond_examples")) for ids in reference["beyond_examples"].values()
            )
            if listed != reference["beyond"]:
                raise ReportError(f"{here}.reference.beyond must count the examples it lists")
        if threat["certified"] is not None:
            _certified(threat["certified"], f"{here}.certified")
        if key in by_threat:
            raise ReportError(f"{here} is listed twice")
        by_threat[key] = threat
    missing = {
        _threat(t, f"{at}.missing_threat_models[]")
        for t in _list(entry["missing_threat_models"], f"{at}.missing_threat_models")
    }
    if missing & set(by_threat) or missing | set(by_threat) != threats:
        raise ReportError(
            f"{at}: worst_case_by_threat and missing_threat_models must split the dataset's threat models"
        )

    _number(entry["worst_case"], f"{at}.worst_case", fraction=True, optional=True)
    bounds = [t["certified"]["value"] for t in by_threat.values() if t["certified"] is not None]
    _number(entry["certified"], f"{at}.certified", fraction=True, optional=True)
    _same(entry["certified"], float(np.mean(bounds)) if bounds else None, f"{at}.certified (the mean certified bound)")
    failed_attacks = _list(entry["failed_attacks"], f"{at}.failed_attacks")
    for failed in failed_attacks:
        _threat(failed, f"{at}.failed_attacks[]", (*THREAT, "attack"))
    complete = not missing and bool(by_threat) and not failed_attacks
    expected = float(np.mean([t["value"] for t in by_threat.values()])) if complete else None
    _same(entry["worst_case"], expected, f"{at}.worst_case (the mean over the dataset's threat models)")
    if (entry["rank"] is None) != (entry["worst_case"] is None):
        raise ReportError(f"{at}: a defense is ranked exactly when its worst case covers every threat model")

    columns = set()
    for cell in _list(entry["cells"], f"{at}.cells"):
        _object(cell, CELL_KEYS, f"{at}.cells[]")
        _string(cell["attack"], f"{at}.cells[].attack")
        key = _threat(cell, f"{at}.cells[{cell['attack']}]", CELL_KEYS)
        here = f"{at}.cells[{cell['attack']} {key[0]} {key[1]:g}]"
        if cell["family"] not in FAMILIES:
            raise ReportError(f"{here}.family must be one of {', '.join(FAMILIES)}, got {cell['family']!r}")
        _integer(cell["steps"], f"{here}.steps", optional=True)
        _bool(cell["cascade"], f"{here}.cascade")
        _bool(cell["seen"], f"{here}.seen")
        if cell["seen"] != is_seen(cell["family"], key[0], key[1], trained_against):
            raise ReportError(f"{here}.seen contradicts its family and trained_against")
        for field in ("robust_accuracy", "ci_low", "ci_high"):
            _number(cell[field], f"{here}.{field}", fraction=True)
        _integer(cell["n"], f"{here}.n")
        _interval(cell["robust_accuracy"], cell["ci_low"], cell["ci_high"], cell["n"], here)
        if cell["n"] > pooled:
            raise ReportError(f"{here}.n = {cell['n']} exceeds n_eval x seeds = {pooled}")
        _number(cell["relative"], f"{here}.relative", fraction=True, optional=True)
        _number(cell["wall_time"], f"{here}.wall_time", low=0.0)
        _integer(cell["forwards"], f"{here}.forwards")
        _integer(cell["backwards"], f"{here}.backwards")
        if (cell["attack"], *key) in columns:
            raise ReportError(f"{here} is listed twice")
        columns.add((cell["attack"], *key))
        worst = by_threat.get(key)
        beside = cell["family"] == "reference"  # compared with the worst case, not part of it
        if worst is None or (not beside and worst["value"] > cell["robust_accuracy"] + TOLERANCE):
            raise ReportError(f"{at}: worst case above {cell['attack']} at {key[0]} {key[1]:g}")

    for key in SUMMARY_NUMBERS:
        bounds = {"low": -1.0, "high": 1.0} if key == "gap" else {"low": 0.0} if key == "ratio" else {"fraction": True}
        _number(entry[key], f"{at}.{key}", optional=True, **bounds)
    for key, expected in generalization(entry["cells"], entry["worst_case_by_threat"]).items():
        _same(entry[key], expected, f"{at}.{key}")

    seen_keys = set()
    for flag in _list(entry["flags"], f"{at}.flags"):
        _object(flag, FLAG_KEYS, f"{at}.flags[]")
        if not isinstance(flag["key"], str) or flag["key"] not in FLAGS:
            raise ReportError(f"{at}: unknown flag {flag['key']!r} (known: {', '.join(FLAGS)})")
        if flag["title"] != FLAGS[flag["key"]]:
            raise ReportError(f"{at}: flag {flag['key']} must have the title {FLAGS[flag['key']]!r}")
        _string(flag["evidence"], f"{at}: flag {flag['key']}'s evidence")
        if flag["key"] in seen_keys:
            raise ReportError(f"{at}: flag {flag['key']} is listed twice")
        seen_keys.add(flag["key"])
