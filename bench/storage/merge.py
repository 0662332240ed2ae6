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

A source may be a file someone sent, so it is trusted no further than a run's own results: it is opened
read-only, refused while one of its runs is still running (half written), and every record is rebuilt
and validated by the store's own rules (mask lengths, ids, norms, accuracies agreeing with the masks),
and every checkpoint it brings checked (its sha256 and the training key inside), before anything is
written; the first problem refuses the merge with one line.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.foundation.errors import RobustMatrixError
from bench.storage.store import Store, checkpoint_dir, file_sha256, names_problem, read_checkpoint, validated_row

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
    """Columns that differ; a digest the target does not know (a row from before digests) is no conflict."""
    return tuple(
        c
        for c in ours
        if c not in VOLATILE
        and c in theirs
        and ours[c] != theirs[c]
        and not (c == "checkpoint_sha256" and ours[c] is None)
    )


@dataclass
class Source:
    """A source database, checked: its rows rebuilt through the store's validation, and the digests
    of the checkpoint files beside it that are the trainings they claim to be."""

    path: Path
    rows: dict[str, list[dict[str, Any]]]
    checkpoints: dict[str, tuple[str, str]]
    """checkpoint file name -> (training key, sha256)."""


def check_source(path: Path) -> Source:
    """Open ``path`` read-only and check all of it (see the module docstring); RobustMatrixError on the
    first problem, naming the file and the record."""
    with Store.open_readonly(path) as store:
        running = store.running_runs()
        if running:
            run = running[0]
            raise RobustMatrixError(
                f"cannot merge {path}: its run {run['run_id']} (started {run['started_at']}) is still running; "
                "merge it once the run has finished"
            )
        rows: dict[str, list[dict[str, Any]]] = {}
        try:
            for table, key in KEYS.items():
                rows[table] = [
                    validated_row(table, row)
                    for row in _rows(store.connection, f"SELECT * FROM {table} ORDER BY {key}")
                ]
            for table in ("attacks", "failures"):
                rows[table] = (
                    _rows(store.connection, f"SELECT * FROM {table}") if _columns(store.connection, table) else []
                )
                for row in rows[table]:
                    problem = names_problem(row)
                    if problem is not None:
                        raise RobustMatrixError(f"{table[:-1]} {problem}")
        except RobustMatrixError as exc:
            raise RobustMatrixError(f"cannot merge {path}: {exc}") from None
    checkpoints = {}
    folder = checkpoint_dir(path)
    for row in rows["trainings"]:
        file = folder / row["checkpoint"]
        if not file.is_file():
            continue  # nothing to copy: the target retrains it when it is needed
        try:
            _, data = read_checkpoint(file, row["training_key"], row["checkpoint_sha256"])
        except RobustMatrixError as exc:
            raise RobustMatrixError(f"cannot merge {path}: {exc}") from None
        row["checkpoint_sha256"] = row["checkpoint_sha256"] or file_sha256(data)
        checkpoints[row["checkpoint"]] = (row["training_key"], row["checkpoint_sha256"])
    return Source(Path(path), rows, checkpoints)


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


def _merge_keyed(target: sqlite3.Connection, source: Source, table: str, report: MergeReport) -> None:
    key = KEYS[table]
    columns = _columns(target, table)
    for row in source.rows[table]:
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


def _merge_attacks(target: sqlite3.Connection, source: Source, report: MergeReport) -> None:
    for row in sorted(source.rows["attacks"], key=lambda r: (r["attack_id"], r["attack_version"])):
        query = "SELECT * FROM attacks WHERE attack_id = ? AND attack_version = ?"
        ours = _one(target, query, (row["attack_id"], row["attack_version"]))
        if ours is None:
            _insert(target, "attacks", row, _columns(target, "attacks"))
            report.added["attacks"] += 1
        elif _differences(ours, row):
            label = f"{row['attack_id']} {row['attack_version']}"
            report.conflicts.append(Conflict("attacks", label, label, _differences(ours, row)))


def _merge_failures(target: sqlite3.Connection, source: Source, report: MergeReport) -> None:
    """A failed training or evaluation is copied unless the target holds its successful result."""
    for row in sorted(source.rows["failures"], key=lambda r: r["job_key"]):
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
    covers, nightly = bool(_columns(source, "run_cells")), bool(_columns(source, "nightly"))  # a read-only old file
    for row in _rows(source, "SELECT * FROM runs ORDER BY run_id"):
        query = "SELECT cell_key FROM run_cells WHERE run_id = ?"
        keys = sorted(r[0] for r in source.execute(query, (row["run_id"],))) if covers else []
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
        query = "SELECT snapshot FROM nightly WHERE run_id = ?"
        snapshot = source.execute(query, (row["run_id"],)).fetchone() if nightly else None
        if snapshot is not None:
            target.execute("INSERT OR IGNORE INTO nightly VALUES (?, ?)", (run_id, snapshot[0]))


def _copy_checkpoints(source: Source, target: Path) -> int:
    """Copy the checked checkpoints the target lacks: the bytes written are the bytes verified again
    here (the file may have changed since it was checked), and nothing else in the folder travels."""
    copied = 0
    source_dir, target_dir = checkpoint_dir(source.path), checkpoint_dir(target)
    if not source_dir.is_dir() or source_dir.resolve() == target_dir.resolve():
        return 0
    for name, (training_key, sha256) in sorted(source.checkpoints.items()):
        destination = target_dir / name
        if destination.exists():
            continue
        try:
            _, data = read_checkpoint(source_dir / name, training_key, sha256)
        except RobustMatrixError as exc:
            raise RobustMatrixError(f"cannot merge {source.path}: {exc}") from None
        target_dir.mkdir(parents=True, exist_ok=True)
        part = destination.with_name(destination.name + ".part")
        part.write_bytes(data)
        os.replace(part, destination)
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
    checked = [check_source(Path(path)) for path in sources]  # every source, before writing anything
    report = MergeReport()
    with Store.open(into) as target:
        for source in checked:
            with Store.open_readonly(source.path) as opened:
                try:
                    with target.connection:
                        for table in ("trainings", "evaluations", "cells"):
                            _merge_keyed(target.connection, source, table, report)
                        _merge_attacks(target.connection, source, report)
                        _merge_failures(target.connection, source, report)
                        _merge_runs(target.connection, opened.connection, report)
                except sqlite3.OperationalError as exc:
                    raise RobustMatrixError(f"cannot merge {source.path} into {into}: {exc}") from None
            report.checkpoints += _copy_checkpoints(source, into)
    return report
