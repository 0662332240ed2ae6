"""Reading the results database into plain rows: the only input the leaderboard has.

When the database holds several generations of a result (a defense retrained after a code change,
an attack re-run), only the newest counts: the newest training of each (dataset, defense, seed),
its newest evaluation, and the newest cell per (training, attack, eps).

Results on different numbers of evaluation examples (``run --defense X --config`` with another
``n_eval``) are never mixed — their masks do not line up — and never dropped: each evaluation size
of a dataset is a section of its own, the newest size first, and every section carries a warning
naming the defenses that are only in another one.

Plain sqlite3 and lists: the leaderboard runs as a command of its own, and pandas (which writes the
CSV) costs more to import than everything this module does with it.
"""

from __future__ import annotations

import fnmatch
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.foundation.errors import RobustMatrixError
from bench.storage.store import Store, decode_mask, names_problem

DEFAULT_CLASSES = 10
"""Classes assumed for chance accuracy when an evaluation predates recording ``num_classes``."""


class Cell(NamedTuple):
    """One ok cell of one seed, with the attack's declared ``steps`` and whether it is the cascade."""

    defense_id: str
    attack_id: str
    family: str
    norm: str
    eps: float
    seed: int
    robust: np.ndarray
    robust_accuracy: float
    steps: int | None
    cascade: bool
    wall_time: float
    forwards: int
    backwards: int


class Verification(NamedTuple):
    """One verifier's run on one defense, seed and Lp threat model: per-example ``certified`` (all
    False unless status is ok), and why not when it could not bound the model."""

    defense_id: str
    verifier_id: str
    norm: str
    eps: float
    seed: int
    status: str
    error: str | None
    certified: np.ndarray
    wall_time: float
    certifies: str = "model"


@dataclass(frozen=True)
class Results:
    dataset: str
    n_eval: int
    trainings: list[dict[str, Any]]
    """One per (defense_id, seed): the newest training, with its ``clean`` mask and ``observed``,
    ``trained_against``, ``nature`` and ``kwargs`` decoded; sorted by defense, then seed."""
    cells: list[Cell]
    """One per (defense_id, seed, attack_id, eps), status ok."""
    failed: list[dict[str, Any]]
    """Failed cells (the newest per key), with their reasons."""
    failed_trainings: list[dict[str, Any]]
    """Defenses whose training or evaluation failed (so none of their cells ran)."""
    warnings: tuple[str, ...] = field(default=())
    """What a reader must know about this section: other evaluation sizes of the dataset, and which
    defenses are only there."""
    verifications: tuple[Verification, ...] = field(default=())
    """The newest certificate per (defense, seed, verifier, norm, eps) of the section's trainings."""

    @property
    def defenses(self) -> list[str]:
        return sorted({t["defense_id"] for t in self.trainings})

    @property
    def seeds(self) -> list[int]:
        return sorted({int(t["seed"]) for t in self.trainings})

    @property
    def num_classes(self) -> int:
        counts = [t["observed"].get("num_classes") for t in self.trainings if t["observed"].get("num_classes")]
        return int(max(counts)) if counts else DEFAULT_CLASSES


def _newest(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The newest row (by created_at; later rows win ties) per key, in order of first appearance."""
    out: dict[tuple, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["created_at"]):
        out[tuple(row[k] for k in keys)] = row
    return list(out.values())


def _read(connection: sqlite3.Connection, table: str, columns: str = "*") -> list[dict[str, Any]]:
    present = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if table not in present:
        return []
    cursor = connection.execute(f"SELECT {columns} FROM {table} ORDER BY rowid")  # insertion order breaks ties
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _attack_declarations(attacks: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int | None, bool]]:
    """(attack id, version) -> (declared steps, is the cascade: it declares its member attacks)."""
    out = {}
    for row in attacks:
        spec = json.loads(row["spec"])
        steps = (spec.get("budget") or {}).get("steps")
        out[(row["attack_id"], row["attack_version"])] = (
            int(steps) if steps is not None else None,
            "members" in (spec.get("kwargs") or {}),
        )
    return out


CELL_COLUMNS = (
    "cell_key, training_key, dataset, defense_id, attack_id, attack_version, family, norm, eps, seed, n_eval, "
    "status, error, robust_accuracy, robust_mask, forwards, backwards, wall_time, created_at"
)


def load_results(db_path: str | Path, dataset: str | None = None) -> list[Results]:
    """Results per dataset and evaluation size found in the database, newest generation only. The file
    is opened read-only (it may be someone else's), and every id, norm and dataset name is checked
    against its pattern before it can reach a file name, the Markdown or the CSV."""
    with Store.open_readonly(db_path) as store:
        connection = store.connection
        trainings = _read(connection, "trainings")
        evaluations = _read(connection, "evaluations")
        cells = _read(connection, "cells", CELL_COLUMNS)
        attacks = _read(connection, "attacks")
        failures = _read(connection, "failures")
        runs = _read(connection, "runs")
        verifications = _read(connection, "verifications")
    named = (("trainings", trainings), ("cells", cells), ("attacks", attacks), ("failures", failures))
    for table, rows in (*named, ("verifications", verifications)):
        for row in rows:
            problem = names_problem(row)
            if problem is None and table == "verifications":
                problem = names_problem({"attack_id": row["verifier_id"]})
                problem = problem.replace("attack_id", "verifier_id") if problem else None
            if problem is not None:
                raise RobustMatrixError(f"{db_path}: a row of {table} has a {problem}; refusing to show it")
    declared = _attack_declarations(attacks)
    try:
        sections = _sections(trainings, evaluations, cells, declared, failures, runs, dataset)
        return [_with_verifications(section, verifications) for section in sections]
    except RobustMatrixError as exc:  # a mask that does not hold its examples
        raise RobustMatrixError(f"{db_path}: {exc}") from None


def _sections(
    trainings: list[dict[str, Any]],
    evaluations: list[dict[str, Any]],
    cells: list[dict[str, Any]],
    declared: dict[tuple[str, str], tuple[int | None, bool]],
    failures: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    dataset: str | None,
) -> list[Results]:
    if dataset is not None:
        trainings = [t for t in trainings if t["dataset"] == dataset]
    out = []
    for name in sorted({t["dataset"] for t in trainings}):
        chosen = {
            t["training_key"]: t
            for t in _newest((t for t in trainings if t["dataset"] == name), ["defense_id", "seed"])
        }
        evals = [e for e in evaluations if e["training_key"] in chosen]
        if not evals:
            continue
        # Masks of different sizes cannot mix: one section per size, the newest evaluation's first.
        newest_first = reversed(sorted(evals, key=lambda e: e["created_at"]))  # ties: the later row is newer
        sizes = list(dict.fromkeys(int(e["n_eval"]) for e in newest_first))
        members = {
            n: sorted({chosen[e["training_key"]]["defense_id"] for e in evals if e["n_eval"] == n}) for n in sizes
        }
        present = {t["defense_id"] for t in chosen.values()}
        broken = [
            {"defense_id": f["defense_id"], "seed": int(f["seed"]), "kind": f["kind"], "error": f["error"]}
            for f in _newest(
                (f for f in failures if f["dataset"] == name and f["defense_id"] not in present), ["defense_id", "seed"]
            )
        ]
        for position, n_eval in enumerate(sizes):
            out.append(
                _section(
                    name,
                    n_eval,
                    chosen,
                    [e for e in evals if e["n_eval"] == n_eval],
                    [c for c in cells if c["training_key"] in chosen and c["n_eval"] == n_eval],
                    declared,
                    broken if position == 0 else [],
                    tuple(_size_warnings(name, n_eval, members)),
                    _selected_attacks(runs, name),
                )
            )
    return out


def _section(
    name: str,
    n_eval: int,
    chosen: dict[str, dict[str, Any]],
    evals: list[dict[str, Any]],
    cells: list[dict[str, Any]],
    declared: dict[tuple[str, str], tuple[int | None, bool]],
    broken: list[dict[str, Any]],
    warnings: tuple[str, ...],
    selected: tuple[str, ...] | None = None,
) -> Results:
    trainings = []
    for evaluation in _newest(evals, ["training_key"]):
        row = dict(chosen[evaluation["training_key"]])
        row["clean"] = decode_mask(evaluation["clean_mask"], n_eval)
        row["observed"] = json.loads(evaluation["observed"])
        for column in ("trained_against", "nature", "kwargs"):
            row[column] = json.loads(row[column])
        trainings.append(row)
    trainings.sort(key=lambda t: (t["defense_id"], int(t["seed"])))
    evaluated = {t["training_key"] for t in trainings}
    relevant = _newest((c for c in cells if c["training_key"] in evaluated), ["training_key", "attack_id", "eps"])
    ok, failed = [], []
    for c in relevant:
        if c["status"] != "ok":
            failed.append(
                {
                    "defense_id": c["defense_id"],
                    "attack_id": c["attack_id"],
                    "norm": c["norm"],
                    "eps": float(c["eps"]),
                    "seed": int(c["seed"]),
                    "error": c["error"],
                    # An attack the newest run's matrix no longer selects: the user excluded it.
                    "excluded": selected is not None
                    and not any(fnmatch.fnmatchcase(c["attack_id"], p) for p in selected),
                }
            )
            continue
        steps, cascade = declared.get((c["attack_id"], c["attack_version"]), (None, False))
        ok.append(
            Cell(
                c["defense_id"],
                c["attack_id"],
                c["family"],
                c["norm"],
                float(c["eps"]),
                int(c["seed"]),
                decode_mask(c["robust_mask"], n_eval),
                float(c["robust_accuracy"]),
                steps,
                cascade,
                float(c["wall_time"]),
                int(c["forwards"]),
                int(c["backwards"]),
            )
        )
    return Results(name, n_eval, trainings, ok, failed, broken, warnings)


def _with_verifications(section: Results, rows: list[dict[str, Any]]) -> Results:
    """The section with its trainings' newest certificates (masks decoded, sizes checked)."""
    keys = {t["training_key"] for t in section.trainings}
    mine = [r for r in rows if r["training_key"] in keys and int(r["n_eval"]) == section.n_eval]
    found = []
    for r in _newest(mine, ["training_key", "verifier_id", "norm", "eps"]):
        certified = (
            decode_mask(r["certified_mask"], section.n_eval)
            if r["status"] == "ok"
            else np.zeros(section.n_eval, dtype=bool)
        )
        found.append(
            Verification(
                r["defense_id"],
                r["verifier_id"],
                r["norm"],
                float(r["eps"]),
                int(r["seed"]),
                r["status"],
                r["error"],
                certified,
                float(r["wall_time"]),
                str(r.get("certifies") or "model"),
            )
        )
    return replace(section, verifications=tuple(found))


def _selected_attacks(runs: list[dict[str, Any]], dataset: str) -> tuple[str, ...] | None:
    """The attack patterns of the newest run of ``dataset`` (None when no run recorded its matrix)."""
    for run in sorted(runs, key=lambda r: int(r["run_id"]), reverse=True):
        try:
            config = json.loads(run["config"])
        except (TypeError, ValueError):
            continue
        if isinstance(config, dict) and config.get("dataset") == dataset and isinstance(config.get("attacks"), list):
            return tuple(str(p) for p in config["attacks"])
    return None


def _size_warnings(dataset: str, n_eval: int, members: dict[int, list[str]]) -> list[str]:
    if len(members) < 2:
        return []
    others = [n for n in members if n != n_eval]
    absent = sorted(set().union(*(members[n] for n in others)) - set(members[n_eval]))
    text = (
        f"{dataset} has results on {len(members)} evaluation sizes "
        f"(n_eval {', '.join(str(n) for n in members)}; a run with a --config of another n_eval made the "
        f"newer ones). Results of different sizes are never mixed: this table ranks the "
        f"{len(members[n_eval])} defense{'s' if len(members[n_eval]) != 1 else ''} evaluated on {n_eval} examples"
    )
    if absent:
        shown = ", ".join(absent[:12]) + (f" and {len(absent) - 12} more" if len(absent) > 12 else "")
        text += f"; not in it, because they were evaluated only on other sizes: {shown}"
    return [text + "."]
