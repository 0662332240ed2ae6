"""The runner: turns a matrix spec into jobs, skips what the database already holds, and stores each
result the moment an executor hands it back.

Order of work: train every defense (or reuse its checkpoint), evaluate each clean and observe its
behaviour, then pair it with every attack that applies — the standard ones always, adaptive ones
when the defense declares or is observed to need them — at every eps of the attack's norm.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import bench.models
from bench.config import MatrixSpec
from bench.data import Dataset
from bench.errors import RobustMatrixError
from bench.executor import Executor
from bench.jobs import CellJob, EvaluationJob, TrainingJob
from bench.keys import digest
from bench.models import architecture_name
from bench.probes import behaves_non_differentiable, behaves_randomized, behaves_saturated
from bench.progress import Progress
from bench.registry import ATTACKS, DEFENSES, AttackSpec, DefenseSpec, Registry
from bench.store import Store

SURROGATE_DEFENSE = "standard-v1"
WILDCARD = set("*?[")


@dataclass
class RunSummary:
    trained: int = 0
    evaluated: int = 0
    computed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def applies(attack: AttackSpec, nature: Mapping[str, Any], observed: Mapping[str, Any]) -> bool:
    """Whether the runner pairs ``attack`` with a defense of this declared nature and observed behaviour."""
    if attack.applies_to == "always":
        return True
    if attack.applies_to == "randomized":
        return bool(nature.get("randomized")) or behaves_randomized(observed)
    if attack.applies_to == "non-differentiable":
        return not nature.get("differentiable", True) or behaves_non_differentiable(observed)
    if attack.applies_to == "saturated-softmax":
        return (
            bool(nature.get("saturates_softmax"))
            or not nature.get("outputs_logits", True)
            or behaves_saturated(observed)
        )
    return False


def _overrides(tables: Mapping[str, Mapping[str, Any]], spec: DefenseSpec | AttackSpec) -> dict[str, Any]:
    """Matrix kwargs for one component: wildcard tables first (only kwargs it has), then its own table."""
    import fnmatch

    merged: dict[str, Any] = {}
    for pattern, values in tables.items():
        if WILDCARD & set(pattern) and fnmatch.fnmatchcase(spec.id, pattern):
            merged.update({k: v for k, v in values.items() if k in spec.kwargs})
    merged.update(tables.get(spec.id, {}))
    return merged


def _check_kwarg_tables(tables: Mapping[str, Mapping[str, Any]], registry: Registry) -> None:
    for pattern in tables:
        if not WILDCARD & set(pattern):
            registry.get(pattern)


class Runner:
    def __init__(
        self,
        spec: MatrixSpec,
        dataset: Dataset,
        executor: Executor,
        progress: Progress | None = None,
        retry_failed: bool = False,
    ) -> None:
        """Resolve and validate the whole matrix up front, so bad input fails before any work."""
        self.spec = spec
        self.executor = executor
        self.fingerprint = dataset.fingerprint()
        self.progress = progress or Progress(enabled=False)
        self.retry_failed = retry_failed
        self._models_version = digest(inspect.getsource(bench.models))
        dataset.eval_indices(spec.n_eval)
        _check_kwarg_tables(spec.defense_kwargs, DEFENSES)
        _check_kwarg_tables(spec.attack_kwargs, ATTACKS)
        self.defenses: list[DefenseSpec] = DEFENSES.select(list(spec.defenses))  # type: ignore[assignment]
        self.attacks: list[AttackSpec] = ATTACKS.select(list(spec.attacks))  # type: ignore[assignment]
        self.attack_kwargs = {
            a.id: a.resolve_kwargs(spec.dataset, _overrides(spec.attack_kwargs, a)) for a in self.attacks
        }
        self.attack_versions = {a.id: a.code_version() for a in self.attacks}
        self._check_eps()
        for defense in self.defenses:
            self.training_job(defense, spec.seeds[0])

    def _check_eps(self) -> None:
        literal = {p for p in self.spec.attacks if not WILDCARD & set(p)}
        for attack in self.attacks:
            if attack.eps_grid is None and attack.norm not in self.spec.eps and attack.id in literal:
                raise RobustMatrixError(
                    f"attack {attack.id} works in the {attack.norm} norm but the matrix has no eps.{attack.norm} grid"
                )

    def eps_grid(self, attack: AttackSpec) -> tuple[float, ...]:
        return attack.eps_grid if attack.eps_grid is not None else self.spec.eps.get(attack.norm, ())

    # ------------------------------------------------------------------------------- jobs
    def training_job(self, defense: DefenseSpec, seed: int) -> TrainingJob:
        kwargs = defense.resolve_kwargs(self.spec.dataset, _overrides(self.spec.defense_kwargs, defense))
        defense.threat_models(kwargs)  # validates the declared trained-against eps
        key = digest(
            {
                "defense": defense.id,
                "version": defense.code_version(),
                "kwargs": kwargs,
                "dataset": self.spec.dataset,
                "data": self.fingerprint,
                "seed": seed,
                "architecture": architecture_name(self.spec.dataset),
                "models": self._models_version,
            }
        )
        return TrainingJob(key, defense.id, kwargs, self.spec.dataset, seed, f"{defense.id}-{key[:16]}.pt")

    def evaluation_job(self, training: TrainingJob) -> EvaluationJob:
        return EvaluationJob(
            digest({"training": training.training_key, "n_eval": self.spec.n_eval}), training, self.spec.n_eval
        )

    def cell_jobs(
        self, training: TrainingJob, evaluation: Mapping[str, Any], surrogates: Mapping[int, TrainingJob]
    ) -> list[CellJob]:
        defense = DEFENSES.get(training.defense_id)
        nature = defense.nature()
        observed = json.loads(evaluation["observed"])
        bpda_fallback = defense.bpda_approximation is None and behaves_non_differentiable(observed)
        jobs = []
        for attack in self.attacks:
            if not applies(attack, nature, observed):
                continue
            surrogate = surrogates.get(training.seed) if attack.needs_surrogate else None
            kwargs = self.attack_kwargs[attack.id]
            for eps in self.eps_grid(attack):
                key = digest(
                    {
                        "training": training.training_key,
                        "attack": attack.id,
                        "version": self.attack_versions[attack.id],
                        "kwargs": kwargs,
                        "eps": eps,
                        "n_eval": self.spec.n_eval,
                        "bpda_fallback": bpda_fallback,
                        "surrogate": surrogate.training_key if surrogate else None,
                    }
                )
                jobs.append(
                    CellJob(
                        cell_key=key,
                        training=training,
                        attack_id=attack.id,
                        attack_version=self.attack_versions[attack.id],
                        attack_kwargs=kwargs,
                        family=attack.family,
                        norm=attack.norm,
                        eps=float(eps),
                        bounded=attack.bounded,
                        n_eval=self.spec.n_eval,
                        batch_size=self.spec.batch_size,
                        clean_mask=evaluation["clean_mask"],
                        bpda_fallback=bpda_fallback,
                        surrogate=surrogate,
                        timeout=self.spec.cell_timeout,
                    )
                )
        return jobs

    # -------------------------------------------------------------------------------- run
    def run(self, store: Store, only_defenses: list[str] | None = None) -> RunSummary:
        """Compute what ``store`` lacks (for ``only_defenses``, if given) and store it as it finishes."""
        self.store = store
        summary = RunSummary()
        for attack in self.attacks:
            described = attack.describe(self.spec.dataset)
            described["kwargs"] = self.attack_kwargs[attack.id]
            described["budget"] = vars(attack.budget(self.attack_kwargs[attack.id]))
            store.put_attack(attack.id, self.attack_versions[attack.id], attack.source, described)
        chosen = DEFENSES.select(only_defenses) if only_defenses else self.defenses
        trainings = [self.training_job(d, seed) for seed in self.spec.seeds for d in chosen]
        surrogates: dict[int, TrainingJob] = {}
        if any(a.needs_surrogate for a in self.attacks):
            standard = DEFENSES.get(SURROGATE_DEFENSE)
            surrogates = {seed: self.training_job(standard, seed) for seed in self.spec.seeds}  # type: ignore[arg-type]
        needed = {job.training_key: job for job in [*trainings, *surrogates.values()]}

        missing = [job for job in needed.values() if not self._checkpoint_ready(job)]
        for record in self.executor.train(missing):
            self.store.put_training(record)
            summary.trained += 1

        evaluations: dict[str, Mapping[str, Any]] = {}
        todo = []
        for job in trainings:
            evaluation = self.evaluation_job(job)
            row = self.store.evaluation(evaluation.eval_key)
            if row is None:
                todo.append(evaluation)
            else:
                evaluations[job.training_key] = row
        for record in self.executor.evaluate(todo):
            self.store.put_evaluation(record)
            evaluations[record.training_key] = self.store.evaluation(
                digest({"training": record.training_key, "n_eval": record.n_eval})
            )
            summary.evaluated += 1

        cells = [c for job in trainings for c in self.cell_jobs(job, evaluations[job.training_key], surrogates)]
        status = self.store.cell_status([c.cell_key for c in cells])
        pending = []
        for cell in cells:
            state = status.get(cell.cell_key)
            if state == "ok" or (state == "failed" and not self.retry_failed):
                summary.skipped += 1
                if state == "failed":
                    summary.failed.append((cell.label, self._failure_reason(cell.cell_key)))
            else:
                pending.append(cell)
        labels = {c.cell_key: c.label for c in pending}
        self.progress.start_cells(len(pending))
        for record in self.executor.run_cells(pending):
            self.store.put_cell(record)
            summary.computed += 1
            label = labels[record.cell_key]
            if record.status == "failed":
                summary.failed.append((label, record.error or "unknown error"))
                self.progress.cell_done(label, f"FAILED ({record.error})")
            else:
                accuracy = float(np.mean(record.robust_mask)) if record.robust_mask is not None else float("nan")
                self.progress.cell_done(label, f"robust accuracy {accuracy:.3f}")
        self.progress.close()
        return summary

    def _checkpoint_ready(self, job: TrainingJob) -> bool:
        """Trained already: the database knows the training and its checkpoint file exists."""
        return (
            self.store.training(job.training_key) is not None
            and (checkpoint_dir(self.store.path) / job.checkpoint).exists()
        )

    def _failure_reason(self, cell_key: str) -> str:
        row = self.store.connection.execute("SELECT error FROM cells WHERE cell_key = ?", (cell_key,)).fetchone()
        return row["error"] if row else "unknown error"


def checkpoint_dir(db_path: Path) -> Path:
    """Checkpoints live beside the database they belong to."""
    return Path(db_path).parent / "checkpoints"
