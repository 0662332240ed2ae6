"""``robustmatrix merge A.db B.db … --into C.db``: combine databases of shards (or of any runs).

Every result is keyed by a digest of what determines it, so merging is a union by key:
- a key the target lacks is copied;
- a key it holds with the same result is left alone — merging twice changes nothing;
- a failed cell is replaced by an ok result for the same key (that is what a retry does), never
  the other way round;
- a key it holds with a *different* result is a conflict: reported, never overwritten.

Runs are copied once (matched on everything recorded about them and the cells they covered), with
the cells they covered. Checkpoint files found beside a source are copied beside the target, so the merged
folder resumes without retraining. Each source is merged in one transaction.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.foundation.errors import RobustMatrixError
from bench.storage.store import Store, checkpoint_dir

VOLATILE = {"created_at", "wall_time", "device", "versions", "error"}
"""Columns that describe how a result was produced, not what it is: never a conflict."""
KEYS = {"trainings": "training_key", "evaluations": "eval_key", "cells": "cell_key"}


@dataclass(frozen=True)
class Conflict:
    table: str
    key: str
    label: str
    columns: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.table[:-1]} {self.label} ({self.key[:12]}…) differs in {', '.join(self.columns)}"


@dataclass
class MergeReport:
    added: Counter = field(default_factory=Counter)
    replaced_failed: int = 0
    conflicts: list[Conflict] = field(default_factory=list)
    checkpoints: int = 0

    def summary(self) -> str:
        parts = [f"{n} {table}" for table, n in sorted(self.added.items()) if n]
        text = ("added " + ", ".join(parts)) if parts else "nothing new"
        if self.replaced_failed:
            text += f"; {self.replaced_failed} failed cell(s) replaced by ok results"
        if self.checkpoints:
            text += f"; {self.checkpoints} checkpoint file(s) copied"
        return text + f"; {len(self.conflicts)} conflict(s)"


def _columns(connection: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]


def _label(table: str, row: dict[str, Any]) -> str:
    if table == "cells":
        return f"{row['defense_id']} × {row['attack_id']} @ {row['norm']} {row['eps']:g} (seed {row['seed']})"
    if "defense_id" in row:
        return f"{row['defense_id']} (seed {row['seed']})"
    return str(next(iter(row.values())))


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[str, ...]:
    return tuple(c for c in ours if c not in VOLATILE and c in theirs and ours[c] != theirs[c])


def _rows(connection: sqlite3.Connection, sql: str, parameters: tuple = ()) -> list[dict[str, Any]]:
    return [dict(row) for row in connection.execute(sql, parameters)]


def _one(connection: sqlite3.Connection, sql: str, parameters: tuple = ()) -> dict[str, Any] | None:
    row = connection.execute(sql, parameters).fetchone()
    return dict(row) if row is not None else None


def _insert(connection: sqlite3.Connection, table: str, row: dict[str, Any], columns: list[str]) -> None:
    shared = [c for c in row if c in columns]
    connection.execute(
        f"INSERT INTO {table} ({', '.join(shared)}) VALUES ({', '.join('?' * len(shared))})",
        [row[c] for c in shared],
    )


def _merge_keyed(target: sqlite3.Connection, source: sqlite3.Connection, table: str, report: MergeReport) -> None:
    key = KEYS[table]
    columns = _columns(target, table)
    for row in _rows(source, f"SELECT * FROM {table} ORDER BY {key}"):
        ours = _one(target, f"SELECT * FROM {table} WHERE {key} = ?", (row[key],))
        if ours is None:
            _insert(target, table, row, columns)
            report.added[table] += 1
            continue
        if table == "cells" and ours["status"] != row["status"]:
            if ours["status"] == "failed":  # an ok result supersedes a failure, as a retry would
                target.execute("DELETE FROM cells WHERE cell_key = ?", (row[key],))
                _insert(target, table, row, columns)
                report.replaced_failed += 1
            continue
        if table == "cells" and ours["status"] == "failed":
            continue  # two failures of one cell: nothing to choose between
        differing = _differences(ours, row)
        if differing:
            report.conflicts.append(Conflict(table, row[key], _label(table, row), differing))


def _merge_attacks(target: sqlite3.Connection, source: sqlite3.Connection, report: MergeReport) -> None:
    for row in _rows(source, "SELECT * FROM attacks ORDER BY attack_id, attack_version"):
        query = "SELECT * FROM attacks WHERE attack_id = ? AND attack_version = ?"
        ours = _one(target, query, (row["attack_id"], row["attack_version"]))
        if ours is None:
            _insert(target, "attacks", row, _columns(target, "attacks"))
            report.added["attacks"] += 1
        elif _differences(ours, row):
            label = f"{row['attack_id']} {row['attack_version']}"
            report.conflicts.append(Conflict("attacks", label, label, _differences(ours, row)))


def _merge_failures(target: sqlite3.Connection, source: sqlite3.Connection, report: MergeReport) -> None:
    """A failed training or evaluation is copied unless the target holds its successful result."""
    for row in _rows(source, "SELECT * FROM failures ORDER BY job_key"):
        table, key = ("trainings", "training_key") if row["kind"] == "training" else ("evaluations", "eval_key")
        done = target.execute(f"SELECT 1 FROM {table} WHERE {key} = ?", (row["job_key"],)).fetchone()
        present = target.execute("SELECT 1 FROM failures WHERE job_key = ?", (row["job_key"],)).fetchone()
        if not done and not present:
            _insert(target, "failures", row, _columns(target, "failures"))
            report.added["failures"] += 1
    target.execute(
        "DELETE FROM failures WHERE job_key IN (SELECT training_key FROM trainings) "
        "OR job_key IN (SELECT eval_key FROM evaluations)"
    )


def _merge_runs(target: sqlite3.Connection, source: sqlite3.Connection, report: MergeReport) -> None:
    """Copy each run once: a run is the same run when everything recorded about it matches,
    including the set of cells it covered (two shards may start in the same second)."""
    columns = [c for c in _columns(target, "runs") if c != "run_id"]
    for row in _rows(source, "SELECT * FROM runs ORDER BY run_id"):
        keys = sorted(r[0] for r in source.execute("SELECT cell_key FROM run_cells WHERE run_id = ?", (row["run_id"],)))
        shared = [c for c in columns if c in row]
        match = " AND ".join(f"{c} IS ?" for c in shared)
        run_id = None
        for (candidate,) in target.execute(f"SELECT run_id FROM runs WHERE {match}", [row[c] for c in shared]):
            covered = target.execute("SELECT cell_key FROM run_cells WHERE run_id = ? ORDER BY cell_key", (candidate,))
            if [r[0] for r in covered] == keys:
                run_id = candidate
                break
        if run_id is None:
            cursor = target.execute(
                f"INSERT INTO runs ({', '.join(shared)}) VALUES ({', '.join('?' * len(shared))})",
                [row[c] for c in shared],
            )
            run_id = cursor.lastrowid
            report.added["runs"] += 1
            target.executemany("INSERT INTO run_cells VALUES (?, ?)", [(run_id, k) for k in keys])
        snapshot = source.execute("SELECT snapshot FROM nightly WHERE run_id = ?", (row["run_id"],)).fetchone()
        if snapshot is not None:
            target.execute("INSERT OR IGNORE INTO nightly VALUES (?, ?)", (run_id, snapshot[0]))


def _copy_checkpoints(source: Path, target: Path) -> int:
    copied = 0
    source_dir, target_dir = checkpoint_dir(source), checkpoint_dir(target)
    if not source_dir.is_dir() or source_dir.resolve() == target_dir.resolve():
        return 0
    for path in sorted(source_dir.glob("*.pt")):
        destination = target_dir / path.name
        if not destination.exists():
            target_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination.with_name(destination.name + ".part"))
            (destination.with_name(destination.name + ".part")).replace(destination)
            copied += 1
    return copied


def merge_databases(sources: list[Path], into: Path) -> MergeReport:
    """Merge every source database into ``into`` (created if missing); see the module docstring."""
    into = Path(into)
    if not sources:
        raise RobustMatrixError("merge needs at least one database to merge")
    resolved = {Path(s).resolve() for s in sources}
    if into.exists() and into.resolve() in resolved:
        raise RobustMatrixError(f"{into} is both a source and the target; merge into a new file")
    for path in sources:  # validate every source before writing anything
        Store.open_existing(path).close()
    report = MergeReport()
    with Store.open(into) as target:
        for path in sources:
            with Store.open_existing(path) as source:
                try:
                    with target.connection:
                        for table in ("trainings", "evaluations", "cells"):
                            _merge_keyed(target.connection, source.connection, table, report)
                        _merge_attacks(target.connection, source.connection, report)
                        _merge_failures(target.connection, source.connection, report)
                        _merge_runs(target.connection, source.connection, report)
                except sqlite3.OperationalError as exc:
                    raise RobustMatrixError(f"cannot merge {path} into {into}: {exc}") from None
            report.checkpoints += _copy_checkpoints(Path(path), into)
    return report
