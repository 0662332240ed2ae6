"""The results database: one SQLite file holding every trained defense, clean evaluation and cell.

Every result is validated, then written in its own transaction the moment it exists, keyed by a
digest of everything that determines it; a key already present is never recomputed. A run killed
at any point therefore loses at most the cell in flight, and re-running completes exactly the
missing cells. The schema is documented in ARCHITECTURE.md; ``user_version`` is its version.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench.foundation.errors import RobustMatrixError
from bench.foundation.specs import ID_PATTERN, NORMS

APPLICATION_ID = 0x524D5458  # "RMTX": marks the file as ours
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trainings (
    training_key TEXT PRIMARY KEY,
    defense_id TEXT NOT NULL,
    defense_version TEXT NOT NULL,
    source TEXT NOT NULL,
    dataset TEXT NOT NULL,
    seed INTEGER NOT NULL,
    kwargs TEXT NOT NULL,
    trained_against TEXT NOT NULL,
    nature TEXT NOT NULL,
    architecture TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    checkpoint_sha256 TEXT,
    epochs INTEGER NOT NULL,
    wall_time REAL NOT NULL,
    forwards INTEGER NOT NULL,
    backwards INTEGER NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    eval_key TEXT PRIMARY KEY,
    training_key TEXT NOT NULL REFERENCES trainings(training_key),
    n_eval INTEGER NOT NULL,
    clean_accuracy REAL NOT NULL,
    clean_mask BLOB NOT NULL,
    observed TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY,
    training_key TEXT NOT NULL REFERENCES trainings(training_key),
    dataset TEXT NOT NULL,
    defense_id TEXT NOT NULL,
    attack_id TEXT NOT NULL,
    attack_version TEXT NOT NULL,
    attack_kwargs TEXT NOT NULL,
    family TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    bounded INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    n_eval INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    clean_accuracy REAL,
    robust_accuracy REAL,
    robust_mask BLOB,
    success_mask BLOB,
    mean_perturbation REAL,
    forwards INTEGER NOT NULL,
    backwards INTEGER NOT NULL,
    wall_time REAL NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_by_defense ON cells(dataset, defense_id, attack_id, eps, seed);
CREATE TABLE IF NOT EXISTS attacks (
    attack_id TEXT NOT NULL,
    attack_version TEXT NOT NULL,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (attack_id, attack_version)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    git_commit TEXT,
    versions TEXT NOT NULL,
    device TEXT NOT NULL,
    cells_computed INTEGER NOT NULL DEFAULT 0,
    cells_failed INTEGER NOT NULL DEFAULT 0
);
"""

OPERATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (
    job_key TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('training', 'evaluation')),
    defense_id TEXT NOT NULL,
    dataset TEXT NOT NULL,
    seed INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_cells (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    cell_key TEXT NOT NULL,
    PRIMARY KEY (run_id, cell_key)
);
CREATE TABLE IF NOT EXISTS nightly (
    run_id INTEGER PRIMARY KEY REFERENCES runs(run_id),
    snapshot TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS verifications (
    verification_key TEXT PRIMARY KEY,
    training_key TEXT NOT NULL REFERENCES trainings(training_key),
    dataset TEXT NOT NULL,
    defense_id TEXT NOT NULL,
    verifier_id TEXT NOT NULL,
    verifier_version TEXT NOT NULL,
    verifier_kwargs TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    seed INTEGER NOT NULL,
    n_eval INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'unsupported', 'failed')),
    error TEXT,
    certifies TEXT NOT NULL CHECK (certifies IN ('model', 'smoothed')),
    clean_mask BLOB NOT NULL,
    certified_mask BLOB,
    certified_accuracy REAL,
    wall_time REAL NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
"""Tables added after schema 1 (additive, so older readers ignore them): trainings and evaluations
that failed (their defense's cells cannot run), the cells each run covered, and each nightly run's
snapshot for the regression report, and the verifiers' certificates (opt-in, docs/certified.md).
Created on open when missing."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def encode_mask(mask: np.ndarray) -> bytes:
    """Per-example booleans as packed bits (the length is stored beside them as n_eval)."""
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes()


def decode_mask(blob: bytes, n: int) -> np.ndarray:
    """The ``n`` booleans packed in ``blob``. A blob of any other length is refused: unpacking a short
    one would pad it with zeros, turning missing examples into "not robust" without a word."""
    if not isinstance(blob, bytes) or len(blob) != (n + 7) // 8:
        size = f"{len(blob)} bytes" if isinstance(blob, bytes) else "no bytes"
        raise RobustMatrixError(f"a mask of {size} cannot hold {n} examples (it needs {(n + 7) // 8})")
    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=n).astype(bool)


SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*\.pt$")
"""A checkpoint is a plain file name inside the checkpoint folder: no path, so a record cannot point
outside it."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
"""Dataset names: they reach headings, file names and CSV cells."""


def names_problem(row: Mapping[str, Any]) -> str | None:
    """What is wrong with the ids, norm and dataset of a stored row (those it has), or None. They reach
    file names, Markdown and CSV, so a database someone sent is checked before they get there."""
    for column in ("defense_id", "attack_id"):
        if column in row and not (isinstance(row[column], str) and ID_PATTERN.match(row[column])):
            return f"{column} {str(row[column])[:60]!r} is not an id (lowercase name ending in -vN)"
    if "norm" in row and row["norm"] not in NORMS:
        return f"norm {str(row['norm'])[:20]!r} is not one of {', '.join(NORMS)}"
    if "dataset" in row and not (isinstance(row["dataset"], str) and NAME.match(row["dataset"])):
        return f"dataset {str(row['dataset'])[:60]!r} is not a plain name"
    return None


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"refusing to store an invalid result: {what}")


def _require_names(record: Any) -> None:
    problem = names_problem({f.name: getattr(record, f.name) for f in fields(record)})
    _require(problem is None, str(problem))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainingRecord:
    training_key: str
    defense_id: str
    defense_version: str
    source: str
    dataset: str
    seed: int
    kwargs: Mapping[str, Any]
    trained_against: Sequence[Mapping[str, Any]]
    nature: Mapping[str, Any]
    architecture: str
    checkpoint: str
    epochs: int
    wall_time: float
    forwards: int
    backwards: int
    device: str
    versions: Mapping[str, str]
    checkpoint_sha256: str | None = None
    """sha256 of the checkpoint file, checked on every load and merge; None only in rows written before
    it was recorded."""

    def validate(self) -> None:
        _require_names(self)
        _require(isinstance(self.checkpoint, str) and bool(CHECKPOINT_NAME.match(self.checkpoint)), "checkpoint name")
        _require(self.checkpoint_sha256 is None or bool(SHA256.match(str(self.checkpoint_sha256))), "checkpoint sha256")
        _require(
            all(_is_number(v) and v >= 0 for v in (self.wall_time, self.forwards, self.backwards)),
            "training cost must be non-negative numbers",
        )
        _require(isinstance(self.seed, int) and isinstance(self.epochs, int), "seed and epochs must be integers")
        for threat in self.trained_against:
            _require(_is_number(threat.get("eps")) and threat.get("norm"), f"bad trained-against {threat}")


@dataclass(frozen=True)
class EvaluationRecord:
    eval_key: str
    training_key: str
    n_eval: int
    clean_mask: np.ndarray
    observed: Mapping[str, Any]

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.clean_mask)) if self.n_eval else 0.0

    def validate(self) -> None:
        _require(
            isinstance(self.n_eval, int) and len(self.clean_mask) == self.n_eval,
            "clean mask length differs from n_eval",
        )


@dataclass(frozen=True)
class CellRecord:
    cell_key: str
    training_key: str
    dataset: str
    defense_id: str
    attack_id: str
    attack_version: str
    attack_kwargs: Mapping[str, Any]
    family: str
    norm: str
    eps: float
    bounded: bool
    seed: int
    n_eval: int
    status: str
    error: str | None
    clean_mask: np.ndarray | None
    robust_mask: np.ndarray | None
    mean_perturbation: float | None
    forwards: int
    backwards: int
    wall_time: float
    device: str
    versions: Mapping[str, str]

    @property
    def success_mask(self) -> np.ndarray | None:
        """Clean-correct examples the attack turned into errors."""
        if self.clean_mask is None or self.robust_mask is None:
            return None
        return self.clean_mask & ~self.robust_mask

    def validate(self) -> None:
        _require_names(self)
        _require(self.status in ("ok", "failed"), f"status {self.status!r}")
        _require(_is_number(self.eps) and self.eps >= 0, f"eps {self.eps!r}")
        _require(
            all(_is_number(v) and v >= 0 for v in (self.forwards, self.backwards, self.wall_time)),
            "cost must be non-negative numbers",
        )
        if self.status == "failed":
            _require(bool(self.error), "a failed cell needs its reason")
            return
        _require(self.clean_mask is not None and self.robust_mask is not None, "masks missing")
        _require(len(self.clean_mask) == self.n_eval == len(self.robust_mask), "mask length differs from n_eval")
        _require(
            not np.any(self.robust_mask & ~self.clean_mask),
            "an example counted robust although it is misclassified without attack",
        )
        _require(
            self.mean_perturbation is None or _is_number(self.mean_perturbation),
            f"mean perturbation {self.mean_perturbation!r}",
        )


VERIFICATION_STATUSES = ("ok", "unsupported", "failed")


@dataclass(frozen=True)
class VerificationRecord:
    """A verifier's per-example certificates for one defense and Lp threat model. ``unsupported``:
    the verifier has no sound bound for this model (``error`` says why); nothing is certified."""

    verification_key: str
    training_key: str
    dataset: str
    defense_id: str
    verifier_id: str
    verifier_version: str
    verifier_kwargs: Mapping[str, Any]
    norm: str
    eps: float
    seed: int
    n_eval: int
    status: str
    error: str | None
    certifies: str
    clean_mask: np.ndarray
    certified_mask: np.ndarray | None
    wall_time: float
    device: str
    versions: Mapping[str, str]

    def validate(self) -> None:
        _require_names(self)
        _require(isinstance(self.verifier_id, str) and bool(ID_PATTERN.match(self.verifier_id)), "verifier id")
        _require(self.norm in ("linf", "l2"), f"a verifier certifies Lp balls, not {self.norm!r}")
        _require(self.status in VERIFICATION_STATUSES, f"status {self.status!r}")
        _require(self.certifies in ("model", "smoothed"), f"certifies {self.certifies!r}")
        _require(_is_number(self.eps) and self.eps >= 0, f"eps {self.eps!r}")
        _require(_is_number(self.wall_time) and self.wall_time >= 0, "wall time must be a non-negative number")
        _require(len(self.clean_mask) == self.n_eval, "clean mask length differs from n_eval")
        if self.status != "ok":
            _require(bool(self.error) and self.certified_mask is None, "an unsupported or failed run needs its reason")
            return
        _require(self.certified_mask is not None and len(self.certified_mask) == self.n_eval, "certified mask")
        _require(
            not np.any(self.certified_mask & ~self.clean_mask),
            "an example counted certified although it is misclassified without attack",
        )


def _row(record: Any) -> dict[str, Any]:
    row = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, np.ndarray):
            value = encode_mask(value)
        elif isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, str)):
            value = json.dumps(value if isinstance(value, Mapping) else list(value), sort_keys=True, default=dict)
        elif isinstance(value, bool):
            value = int(value)
        row[f.name] = value
    return row


Record = TrainingRecord | EvaluationRecord | CellRecord | VerificationRecord


def record_row(record: Record, created_at: str | None = None) -> dict[str, Any]:
    """The validated database row of a record, derived columns (accuracies, success mask) computed from
    its masks: the one way a record becomes a row, for a run and for a merge alike."""
    record.validate()
    row = _row(record)
    if isinstance(record, EvaluationRecord):
        row["clean_accuracy"] = record.clean_accuracy
    elif isinstance(record, CellRecord):
        ok = record.status == "ok" and record.n_eval > 0
        success = record.success_mask
        del row["clean_mask"]
        row["clean_accuracy"] = float(np.mean(record.clean_mask)) if ok else None
        row["robust_accuracy"] = float(np.mean(record.robust_mask)) if ok else None
        row["success_mask"] = encode_mask(success) if success is not None else None
    elif isinstance(record, VerificationRecord):
        ok = record.status == "ok" and record.n_eval > 0
        row["certified_accuracy"] = float(np.mean(record.certified_mask)) if ok else None
    row["created_at"] = created_at or now()
    return row


def record_from_row(table: str, row: Mapping[str, Any]) -> Record:
    """Rebuild the record a stored row claims to be (decoding JSON and masks; a cell's clean mask is its
    robust mask plus its success mask). Raises RobustMatrixError or ValueError on a malformed row."""
    kinds: dict[str, type[Any]] = {"trainings": TrainingRecord, "evaluations": EvaluationRecord, "cells": CellRecord}
    kind = kinds[table]
    values: dict[str, Any] = {}
    for f in fields(kind):
        if f.name == "clean_mask" and kind is CellRecord:
            continue
        value = row.get(f.name)
        if f.name in ("kwargs", "trained_against", "nature", "observed", "attack_kwargs", "versions"):
            value = json.loads(value)
        elif f.name in ("clean_mask", "robust_mask") and value is not None:
            value = decode_mask(value, row["n_eval"])
        elif f.name == "bounded":
            value = bool(value)
        values[f.name] = value
    if kind is CellRecord:
        robust, success = values["robust_mask"], row.get("success_mask")
        values["clean_mask"] = None
        if robust is not None:
            values["clean_mask"] = robust | decode_mask(success, row["n_eval"])
    return kind(**values)


def _same(stored: Any, derived: Any) -> bool:
    if isinstance(derived, float) and _is_number(stored):
        return math.isclose(stored, derived, rel_tol=1e-9, abs_tol=1e-12)
    return stored == derived


def validated_row(table: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` rebuilt through its record's validation, or a one-line RobustMatrixError naming what is
    wrong: for rows from a database someone sent, whose derived columns must also agree with the masks."""
    key = str(row.get({"trainings": "training_key", "evaluations": "eval_key"}.get(table, "cell_key"), "?"))
    try:
        rebuilt = record_row(record_from_row(table, row), created_at=row.get("created_at"))
    except (RobustMatrixError, ValueError, TypeError, KeyError) as exc:
        raise RobustMatrixError(f"{table[:-1]} {key[:12]}… is invalid: {str(exc).splitlines()[0]}") from None
    for column in ("clean_accuracy", "robust_accuracy", "success_mask"):
        derived = rebuilt.get(column)  # None (a failed cell's): the stored value is dropped, not trusted
        if derived is not None and column in row and not _same(row[column], derived):
            raise RobustMatrixError(f"{table[:-1]} {key[:12]}… is invalid: its {column} disagrees with its masks")
    return rebuilt


def _connect(path: Path, target: str, exists: bool) -> sqlite3.Connection:
    """A connection to ``target`` (a path, or a ``file:`` URI), refused with one line unless the file
    is a robustmatrix database of a schema this code reads."""
    try:
        connection = sqlite3.connect(target, uri=target.startswith("file:"), timeout=30)
        connection.row_factory = sqlite3.Row
        app_id = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise RobustMatrixError(f"{path} is not a robustmatrix database ({exc})") from None
    except OSError as exc:
        raise RobustMatrixError(f"cannot read {path}: {exc}") from None
    if exists and app_id != APPLICATION_ID:
        connection.close()
        detail = "an empty SQLite file" if tables == 0 else "a SQLite database of another program"
        raise RobustMatrixError(f"{path} is {detail}, not a robustmatrix results database")
    if version > SCHEMA_VERSION:
        connection.close()
        raise RobustMatrixError(
            f"{path} was written by a newer robustmatrix (schema {version} > {SCHEMA_VERSION}); upgrade"
        )
    return connection


class Store:
    """A robustmatrix results database. Open with :meth:`open` (creates) or :meth:`open_existing`."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.connection = connection
        self.path = path

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, *, create: bool = True) -> Store:
        path = Path(path)
        if path.is_dir():
            raise RobustMatrixError(f"{path} is a directory, not a database file")
        exists = path.exists() and path.stat().st_size > 0
        if not exists and not create:
            raise RobustMatrixError(f"no results database at {path}; run `robustmatrix run` first")
        if not exists:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RobustMatrixError(f"cannot create a database at {path}: {exc.strerror}") from None
        store = cls(_connect(path, str(path), exists), path)
        if not exists:
            store._initialise()
        else:
            store._add_operations_tables()
        return store

    @classmethod
    def open_existing(cls, path: str | Path) -> Store:
        return cls.open(path, create=False)

    def _initialise(self) -> None:
        try:
            with self.connection:
                self.connection.execute("PRAGMA journal_mode=WAL")
                self.connection.executescript(SCHEMA + OPERATIONS_SCHEMA)
                self.connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self.connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.connection.execute("INSERT OR REPLACE INTO meta VALUES ('created_at', ?)", (now(),))
        except sqlite3.OperationalError as exc:
            raise RobustMatrixError(f"cannot write the database {self.path}: {exc}") from None

    def _add_operations_tables(self) -> None:
        """Bring a database written before the operations tables (or the checkpoint digest column)
        existed up to date: additive, so schema 1 readers still read it. A read-only file is left as it
        is (its readers do not need the additions)."""
        present = {r[0] for r in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        digest = "trainings" not in present or "checkpoint_sha256" in self.columns("trainings")
        certifies = "verifications" not in present or "certifies" in self.columns("verifications")
        if {"failures", "run_cells", "nightly", "verifications"} <= present and digest and certifies:
            return
        try:
            with self.connection:
                self.connection.executescript(OPERATIONS_SCHEMA)
                if not digest:
                    self.connection.execute("ALTER TABLE trainings ADD COLUMN checkpoint_sha256 TEXT")
                if not certifies:  # a verifications table from before the column
                    self.connection.execute(
                        "ALTER TABLE verifications ADD COLUMN certifies TEXT NOT NULL DEFAULT 'model'"
                    )
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc).replace(" ", "").lower():
                raise RobustMatrixError(f"cannot update the database {self.path}: {exc}") from None

    @classmethod
    def open_readonly(cls, path: str | Path) -> Store:
        """Open an existing database for reading only (SQLite ``mode=ro``): for a file someone sent,
        which merge and the leaderboard must never change."""
        path = Path(path)
        if path.is_dir():
            raise RobustMatrixError(f"{path} is a directory, not a database file")
        if not path.is_file() or path.stat().st_size == 0:
            raise RobustMatrixError(f"no results database at {path}; run `robustmatrix run` first")
        return cls(_connect(path, f"{path.resolve().as_uri()}?mode=ro", True), path)

    def columns(self, table: str) -> list[str]:
        return [row[1] for row in self.connection.execute(f"PRAGMA table_info({table})")]

    def running_runs(self) -> list[sqlite3.Row]:
        """Runs recorded as still running: their database may be half written."""
        present = {r[0] for r in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" not in present:
            return []
        return self.connection.execute("SELECT * FROM runs WHERE status = 'running' ORDER BY run_id").fetchall()

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            with self.connection:
                yield self.connection
        except sqlite3.OperationalError as exc:
            raise RobustMatrixError(f"cannot write the database {self.path}: {exc}") from None

    # ----------------------------------------------------------------------------- writing
    def _insert(self, table: str, row: Mapping[str, Any]) -> bool:
        columns = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        with self._write() as connection:
            cursor = connection.execute(f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})", row)
        return cursor.rowcount == 1

    def put_training(self, record: TrainingRecord) -> bool:
        """Write a training; a retrained one (its checkpoint was rejected) updates the recorded digest,
        which a non-deterministic device may change, so the file and its row stay one."""
        row = record_row(record)
        if self._insert("trainings", row):
            return True
        with self._write() as connection:
            connection.execute(
                "UPDATE trainings SET checkpoint_sha256 = ? WHERE training_key = ?",
                (row["checkpoint_sha256"], row["training_key"]),
            )
        return False

    def put_evaluation(self, record: EvaluationRecord) -> bool:
        return self._insert("evaluations", record_row(record))

    def put_cell(self, record: CellRecord, *, replace_failed: bool = True) -> bool:
        """Write a cell; returns False if an ok cell with this key already exists. A failed cell
        is replaced by a later result for the same key (that is what retrying means)."""
        row = record_row(record)
        columns = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        with self._write() as connection:
            if replace_failed:
                connection.execute("DELETE FROM cells WHERE cell_key = ? AND status = 'failed'", (record.cell_key,))
            cursor = connection.execute(f"INSERT OR IGNORE INTO cells ({columns}) VALUES ({marks})", row)
        return cursor.rowcount == 1

    def put_verification(self, record: VerificationRecord) -> bool:
        """Write a verification; a failed one is replaced by a later result for the same key."""
        row = record_row(record)
        with self._write() as connection:
            connection.execute(
                "DELETE FROM verifications WHERE verification_key = ? AND status = 'failed'", (record.verification_key,)
            )
            columns, marks = ", ".join(row), ", ".join(f":{c}" for c in row)
            cursor = connection.execute(f"INSERT OR IGNORE INTO verifications ({columns}) VALUES ({marks})", row)
        return cursor.rowcount == 1

    def verification_status(self, keys: Sequence[str]) -> dict[str, str]:
        """Status of those verification keys that are present."""
        out: dict[str, str] = {}
        keys = list(keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT verification_key, status FROM verifications WHERE verification_key IN ({marks})"
            out.update({row[0]: row[1] for row in self.connection.execute(query, chunk)})
        return out

    def put_attack(self, attack_id: str, attack_version: str, source: str, spec: Mapping[str, Any]) -> None:
        """Record an attack's declared properties (family, norm, budget, ...) so the leaderboard can
        reason about attacks from the database alone."""
        with self._write() as connection:
            connection.execute(
                "INSERT OR IGNORE INTO attacks VALUES (?, ?, ?, ?, ?)",
                (attack_id, attack_version, source, json.dumps(dict(spec), sort_keys=True), now()),
            )

    # ----------------------------------------------------------------------------- reading
    def training(self, training_key: str) -> sqlite3.Row | None:
        return self.connection.execute("SELECT * FROM trainings WHERE training_key = ?", (training_key,)).fetchone()

    def evaluation(self, eval_key: str) -> sqlite3.Row | None:
        return self.connection.execute("SELECT * FROM evaluations WHERE eval_key = ?", (eval_key,)).fetchone()

    def cell_status(self, cell_keys: Sequence[str]) -> dict[str, str]:
        """Status ('ok' / 'failed') of those keys that are present."""
        return {row["cell_key"]: row["status"] for row in self.cells_by_key(cell_keys)}

    def cells_by_key(self, cell_keys: Sequence[str]) -> list[sqlite3.Row]:
        keys = list(cell_keys)
        rows: list[sqlite3.Row] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.connection.execute(f"SELECT * FROM cells WHERE cell_key IN ({marks})", chunk).fetchall()
        return rows

    def cells(self, **where: Any) -> list[sqlite3.Row]:
        clause = " AND ".join(f"{k} = :{k}" for k in where) or "1"
        return self.connection.execute(f"SELECT * FROM cells WHERE {clause} ORDER BY cell_key", where).fetchall()

    def count(self, table: str) -> int:
        return self.connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    # ----------------------------------------------------------------------------- runs
    def start_run(
        self, kind: str, config: Mapping[str, Any], device: str, versions: Mapping[str, str], git_commit: str | None
    ) -> int:
        with self._write() as connection:
            cursor = connection.execute(
                "INSERT INTO runs (kind, started_at, status, config, git_commit, versions, device) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                (kind, now(), json.dumps(config, sort_keys=True), git_commit, json.dumps(dict(versions)), device),
            )
        return int(cursor.lastrowid)

    def finish_run(self, run_id: int, status: str, computed: int, failed: int) -> None:
        with self._write() as connection:
            connection.execute(
                "UPDATE runs SET finished_at = ?, status = ?, cells_computed = ?, cells_failed = ? WHERE run_id = ?",
                (now(), status, computed, failed, run_id),
            )

    def run(self, run_id: int) -> sqlite3.Row | None:
        return self.connection.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()

    def link_run_cells(self, run_id: int, cell_keys: Sequence[str]) -> None:
        """Record that run ``run_id`` covered these cells (computed them or found them stored)."""
        with self._write() as connection:
            connection.executemany(
                "INSERT OR IGNORE INTO run_cells (run_id, cell_key) VALUES (?, ?)", [(run_id, k) for k in cell_keys]
            )

    def run_cell_keys(self, run_id: int) -> list[str]:
        rows = self.connection.execute("SELECT cell_key FROM run_cells WHERE run_id = ? ORDER BY cell_key", (run_id,))
        return [r[0] for r in rows]

    def put_nightly(self, run_id: int, snapshot: Mapping[str, Any]) -> None:
        """Keep a nightly run's snapshot (its cells, worst cases, flags, attack speeds) for later comparisons."""
        with self._write() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO nightly (run_id, snapshot) VALUES (?, ?)",
                (run_id, json.dumps(dict(snapshot), sort_keys=True)),
            )

    def nightly_snapshots(self) -> list[tuple[int, dict[str, Any]]]:
        """Every nightly snapshot, oldest first."""
        rows = self.connection.execute("SELECT run_id, snapshot FROM nightly ORDER BY run_id")
        return [(int(r[0]), json.loads(r[1])) for r in rows]

    # ----------------------------------------------------------------------------- failed jobs
    def put_failure(self, job_key: str, kind: str, defense_id: str, dataset: str, seed: int, error: str) -> None:
        """Record that a training or evaluation failed (the latest reason wins)."""
        with self._write() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_key, kind, defense_id, dataset, seed, error or "unknown error", now()),
            )

    def failure(self, job_key: str) -> sqlite3.Row | None:
        return self.connection.execute("SELECT * FROM failures WHERE job_key = ?", (job_key,)).fetchone()

    def clear_failure(self, job_key: str) -> None:
        with self._write() as connection:
            connection.execute("DELETE FROM failures WHERE job_key = ?", (job_key,))


def checkpoint_dir(db_path: Path) -> Path:
    """Checkpoints live beside the database they belong to."""
    return Path(db_path).parent / "checkpoints"


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(
    path: Path, training_key: str, sha256: str | None = None, map_location: Any = "cpu"
) -> tuple[dict[str, Any], bytes]:
    """The checkpoint at ``path`` as (payload, its bytes), after checking that its bytes have the
    expected sha256 (when one is known) and that the training key inside it is ``training_key``: a
    swapped, torn or foreign file must never be evaluated as this training. The bytes are read once and
    both hashed and unpickled (``weights_only``), so the file checked is the file loaded. Raises
    RobustMatrixError naming the mismatch."""
    import torch  # here, not at the top: the leaderboard imports this module and never loads a model

    name = Path(path).name
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RobustMatrixError(f"checkpoint {name} cannot be read: {exc.strerror}") from None
    digest = file_sha256(data)
    if sha256 is not None and digest != sha256:
        raise RobustMatrixError(f"checkpoint {name} has sha256 {digest[:16]}…, not the recorded {sha256[:16]}…")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        inside = payload["meta"]["training_key"]
        payload["state_dict"]  # noqa: B018 - a checkpoint without weights is no checkpoint
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is not this training's checkpoint
        raise RobustMatrixError(f"checkpoint {name} is not a readable checkpoint ({type(exc).__name__})") from None
    if inside != training_key:
        raise RobustMatrixError(
            f"checkpoint {name} holds training {str(inside)[:16]}…, not {training_key[:16]}…; it is another model"
        )
    return payload, data


def record_dict(record: Any) -> dict[str, Any]:
    """A record as a plain dict (masks as lists), for logs and tests."""
    out = asdict(record)
    for key, value in out.items():
        if isinstance(value, np.ndarray):
            out[key] = value.tolist()
    return out
