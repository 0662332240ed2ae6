"""The runner: turns a matrix spec into jobs, skips what the database already holds, and stores each
result the moment an executor hands it back.

Order of work, per defense: train it (or reuse its checkpoint), evaluate it clean and observe its
behaviour, then pair it with every attack that applies — the standard ones always, adaptive ones
when the defense declares or is observed to need them — at every eps of the attack's norm. Each step
is submitted to the executor the moment its inputs exist, so defenses proceed independently.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import bench.foundation.models
from bench.execution.executor import Executor, JobFailure
from bench.execution.jobs import CellJob, EvaluationJob, TrainingJob, VerificationJob
from bench.execution.probes import behaves_non_differentiable, behaves_randomized, behaves_saturated
from bench.execution.progress import Progress
from bench.execution.shard import Shard
from bench.execution.workbench import failed_cell
from bench.foundation.config import MatrixSpec
from bench.foundation.data import Dataset
from bench.foundation.errors import RobustMatrixError
from bench.foundation.keys import RESULTS_VERSION, digest, keyed_versions
from bench.foundation.kwargs import validate_kwarg_tables
from bench.foundation.models import architecture_name
from bench.foundation.registry import ATTACKS, DEFENSES, VERIFIERS, unknown_id_message
from bench.foundation.specs import AttackSpec, DefenseSpec, VerifierSpec
from bench.storage.store import (
    CellRecord,
    EvaluationRecord,
    Store,
    TrainingRecord,
    VerificationRecord,
    checkpoint_dir,
    decode_mask,
    encode_mask,
    read_checkpoint,
)
from defenses.pretrained import register_pretrained

SURROGATE_DEFENSE = "standard-v1"
WILDCARD = set("*?[")


@dataclass
class RunSummary:
    trained: int = 0
    loaded: int = 0
    """Models trained elsewhere, verified and loaded (not trained)."""
    evaluated: int = 0
    computed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(what, why) for every failed cell and every defense whose training or evaluation failed."""
    notes: list[str] = field(default_factory=list)
    cell_keys: list[str] = field(default_factory=list)
    """Every cell the run covered: computed now, found stored, or failed."""
    computed_keys: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.failed


def is_pretrained(defense: DefenseSpec) -> bool:
    """A model trained elsewhere (``[pretrained]`` or a plugin's): loaded, never trained."""
    return defense.source.startswith("pretrained")


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


FAMILY_ORDER = {
    family: rank
    for rank, family in enumerate(
        ("adaptive", "gradient", "score-based", "decision-based", "transfer", "noise", "reference")
    )
}
"""Cascade order: attacks the defense's nature calls for first, then white-box, then the rest."""


BLACK_BOX_NEEDS = ("randomized", "non-differentiable")
"""A defense that meets an adaptive attack for one of these has gradients no white-box stage can
trust; the cascade adds its black-box stages there. (A saturated softmax is not among them: its
logits are honest, and the logit losses and APGD-T's targeted DLR read them.)"""


def is_cascade(attack: AttackSpec) -> bool:
    """A cascade (the adaptive worst case) takes its escalation stages as a kwarg."""
    return "stages" in attack.kwargs


def cascade_members(
    cascade: AttackSpec, paired: list[AttackSpec], kwargs: Mapping[str, Mapping[str, Any]] | None = None
) -> list[AttackSpec]:
    """Every other attack paired with the defense at the cascade's norm — the cells whose results the
    cascade starts from, so its worst case is over all of them — in cascade order: the adaptive
    attacks the defense's nature calls for, then white-box, score-based, decision-based, transfer
    and noise; within a family, the cheapest first, costed with the matrix's ``kwargs`` per attack
    id where given. The cascade itself re-runs only the adaptive ones, at its grade."""
    # A reference attack (AutoAttack itself) is what the cascade is checked against, not a source.
    members = [a for a in paired if a.norm == cascade.norm and not is_cascade(a) and a.family != "reference"]
    costs = {a.id: _cost(a, (kwargs or {}).get(a.id)) for a in members}
    return sorted(members, key=lambda a: (FAMILY_ORDER.get(a.family, 9), costs[a.id], a.id))


def _cost(attack: AttackSpec, kwargs: Mapping[str, Any] | None = None) -> int:
    """Declared budget as a rough cost: the bound on passes per example where the attack declares
    one, else steps x restarts or queries; unknown last."""
    budget = attack.budget(kwargs)
    if budget.forwards is not None:
        return int(budget.forwards) + int(budget.backwards or 0)
    if budget.queries:
        return int(budget.queries) * max(1, int(budget.restarts or 1))
    if budget.steps:
        return int(budget.steps) * max(1, int(budget.restarts or 1))
    return 10**9


def _overrides(tables: Mapping[str, Mapping[str, Any]], spec: DefenseSpec | AttackSpec) -> dict[str, Any]:
    """Matrix kwargs for one component: wildcard tables first (only kwargs it has), then its own table."""
    import fnmatch

    merged: dict[str, Any] = {}
    for pattern, values in tables.items():
        if WILDCARD & set(pattern) and fnmatch.fnmatchcase(spec.id, pattern):
            merged.update({k: v for k, v in values.items() if k in spec.kwargs})
    merged.update(tables.get(spec.id, {}))
    return merged


class Runner:
    def __init__(
        self,
        spec: MatrixSpec,
        dataset: Dataset,
        executor: Executor | None,
        progress: Progress | None = None,
        retry_failed: bool = False,
    ) -> None:
        """Resolve and validate the whole matrix up front, so bad input fails before any work (the
        executor may be attached afterwards, so a cluster is not started for a matrix with a typo)."""
        self.spec = spec
        self.executor = executor
        self.fingerprint = dataset.fingerprint()
        self.progress = progress or Progress(enabled=False)
        self.retry_failed = retry_failed
        self._models_version = digest(inspect.getsource(bench.foundation.models))
        self._libraries = keyed_versions()
        self.notes: list[str] = []
        """Warnings about the matrix as run (attacks left out), printed once and kept for the summary."""
        self.environment: dict[str, Any] = {"device": "cpu", "threads": 1}
        """Where the jobs run, as far as it changes results (keyed): the device type, and on the CPU the
        torch threads per job (their reduction order differs). Set by whoever attaches the executor."""
        dataset.eval_indices(spec.n_eval)
        # Declared [pretrained] models are defenses of this matrix whatever `defenses` selects.
        pretrained = register_pretrained(spec.pretrained.values())
        selected = DEFENSES.select(list(spec.defenses)) if spec.defenses else []
        self.defenses: list[DefenseSpec] = [*selected, *(p for p in pretrained if p not in selected)]  # type: ignore[list-item]
        self.attacks: list[AttackSpec] = ATTACKS.select(list(spec.attacks))  # type: ignore[assignment]
        self.surrogate_id = self._choose_surrogate()
        if self.surrogate_id is None:
            self._leave_out_transfer()
        trains = [d for d in self.defenses if not is_pretrained(d)]
        if self.surrogate_id is not None and not is_pretrained(DEFENSES.get(self.surrogate_id)):
            trains.append(DEFENSES.get(self.surrogate_id))  # type: ignore[arg-type]
        if trains and not dataset.has_train():
            try:
                dataset.x_train  # noqa: B018 - raises the reason: a missing or corrupted training file
            except RobustMatrixError as exc:
                names = ", ".join(d.id for d in trains[:3]) + (", ..." if len(trains) > 3 else "")
                raise RobustMatrixError(f"{exc} (the training split is needed to train {names})") from None
        validate_kwarg_tables(spec.defense_kwargs, DEFENSES, self.defenses)
        validate_kwarg_tables(spec.attack_kwargs, ATTACKS, self.attacks)
        self.attack_kwargs = {
            a.id: a.resolve_kwargs(spec.dataset, _overrides(spec.attack_kwargs, a)) for a in self.attacks
        }
        self.attack_versions = {a.id: a.code_version() for a in self.attacks}
        self._check_eps()
        for attack in self.attacks:  # every kwarg value is tried now, not inside a job an hour later
            attack.validate(spec.dataset, self.attack_kwargs[attack.id], self.eps_grid(attack))
        self.verifiers: list[VerifierSpec] = VERIFIERS.select(list(spec.verifiers)) if spec.verifiers else []  # type: ignore[assignment]
        self.verifier_kwargs = {v.id: v.resolve_kwargs(spec.dataset) for v in self.verifiers}
        self.verifier_versions = {v.id: v.code_version() for v in self.verifiers}
        for verifier in self.verifiers:
            verifier.validate(spec.dataset, self.verifier_kwargs[verifier.id])
        surrogate = [DEFENSES.get(self.surrogate_id)] if self.surrogate_id is not None else []
        self._validated: set[str] = set()
        self.validate_defenses([*self.defenses, *surrogate])  # type: ignore[list-item]

    def _choose_surrogate(self) -> str | None:
        """The transfer attacks' surrogate: the matrix's ``surrogate``, else ``standard-v1`` where the
        matrix trains anything; None when no attack needs one, or when nothing is trained and the
        matrix names none (a matrix of pretrained models trains nothing, a surrogate included)."""
        if not any(a.needs_surrogate for a in self.attacks):
            return None
        if self.spec.surrogate is not None:
            if self.spec.surrogate not in DEFENSES:
                raise RobustMatrixError(f"surrogate: {unknown_id_message(self.spec.surrogate)}")
            return self.spec.surrogate
        if all(is_pretrained(d) for d in self.defenses):
            return None
        return SURROGATE_DEFENSE

    def _leave_out_transfer(self) -> None:
        """No surrogate: the attacks that need one are left out, visibly (never a silent hole)."""
        dropped = [a.id for a in self.attacks if a.needs_surrogate]
        if not dropped:
            return
        self.attacks = [a for a in self.attacks if not a.needs_surrogate]
        self.notes.append(
            f"{', '.join(dropped)} left out: this matrix trains nothing, so there is no {SURROGATE_DEFENSE} "
            'surrogate to craft on; name one with surrogate = "ID" (a [pretrained] model of the matrix, or '
            f'"{SURROGATE_DEFENSE}" to train it)'
        )
        print(f"robustmatrix: warning: {self.notes[-1]}", file=sys.stderr)

    def validate_defenses(self, defenses: list[DefenseSpec]) -> None:
        """Build each defense with its resolved kwargs (no training): a bad value fails up front."""
        for defense in defenses:
            if defense.id not in self._validated:
                defense.validate(self.spec.dataset, self.training_job(defense, self.spec.seeds[0]).kwargs)
                self._validated.add(defense.id)

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
        payload = {
            "defense": defense.id,
            "version": defense.code_version(),
            "kwargs": kwargs,
            "dataset": self.spec.dataset,
            "data": self.fingerprint,
            "seed": seed,
            "architecture": architecture_name(self.spec.dataset),
            "models": self._models_version,
            "libraries": self._libraries,
            "environment": self.environment,
            "harness": RESULTS_VERSION,
        }
        precision = self.spec.training_precision
        if precision != "fp32":  # keyed only when set: fp32 keys stay those of every earlier run
            payload["precision"] = precision
        key = digest(payload)
        return TrainingJob(
            key, defense.id, kwargs, self.spec.dataset, seed, f"{defense.id}-{key[:16]}.pt", precision=precision
        )

    def evaluation_job(self, training: TrainingJob) -> EvaluationJob:
        return EvaluationJob(
            digest({"training": training.training_key, "n_eval": self.spec.n_eval, "harness": RESULTS_VERSION}),
            training,
            self.spec.n_eval,
        )

    def cell_jobs(
        self, training: TrainingJob, evaluation: Mapping[str, Any], surrogates: Mapping[int, TrainingJob]
    ) -> list[CellJob]:
        defense = DEFENSES.get(training.defense_id)
        nature = defense.nature()
        observed = json.loads(evaluation["observed"])
        bpda_fallback = defense.bpda_approximation is None and behaves_non_differentiable(observed)
        paired = [a for a in self.attacks if applies(a, nature, observed)]
        jobs: list[CellJob] = []
        cascades = []
        for attack in paired:
            if is_cascade(attack):
                cascades.append(attack)
                continue
            kwargs = self.attack_kwargs[attack.id]
            surrogate = surrogates.get(training.seed) if attack.needs_surrogate else None
            for eps in self.eps_grid(attack):
                jobs.append(self._cell_job(training, evaluation, attack, kwargs, eps, bpda_fallback, surrogate))
        for cascade in cascades:
            members = cascade_members(cascade, paired, self.attack_kwargs)
            adaptive = [m for m in members if m.family == "adaptive"]
            kwargs = {
                **self.attack_kwargs[cascade.id],
                "members": [[m.id, self.attack_kwargs[m.id]] for m in adaptive],
                "bpda": not nature.get("differentiable", True) or bpda_fallback,
                # Gradients that cannot be trusted (a randomized or non-differentiable defense,
                # declared or observed): AutoAttack's black-box stage too.
                "black_box": any(m.applies_to in BLACK_BOX_NEEDS for m in adaptive),
            }
            needs_surrogate = any(m.needs_surrogate for m in adaptive)
            surrogate = surrogates.get(training.seed) if needs_surrogate else None
            member_ids = {m.id for m in members}
            stages = [*kwargs["stages"], *(kwargs["black_box_stages"] if kwargs["black_box"] else [])]
            runs = [*adaptive, *(ATTACKS.get(stage) for stage, _ in stages)]
            versions = tuple((m.id, m.code_version()) for m in runs)
            below: list[str] = []
            for eps in sorted(self.eps_grid(cascade)):
                # The members' cells at this eps or a smaller one (the balls are nested: an example
                # broken inside a smaller ball is broken in this one) and the cascade's own cells at
                # the smaller eps: the cascade's key covers their keys (a change to any re-runs it),
                # it waits for their results and escalates only on what all of them left robust.
                after = sorted([j.cell_key for j in jobs if j.attack_id in member_ids and j.eps <= float(eps)] + below)
                job = self._cell_job(
                    training, evaluation, cascade, kwargs, eps, bpda_fallback, surrogate, after, versions
                )
                jobs.append(job)
                below.append(job.cell_key)
        return jobs

    def verification_jobs(self, training: TrainingJob, evaluation: Mapping[str, Any]) -> list[VerificationJob]:
        """Each verifier once per Lp threat model of the matrix that it certifies (opt-in: none
        unless the matrix names ``verifiers``). Keys never enter a cell's key."""
        jobs = []
        for verifier in self.verifiers:
            for norm in verifier.norms:
                for eps in self.spec.eps.get(norm, ()):
                    payload = {
                        "training": training.training_key,
                        "verifier": verifier.id,
                        "version": self.verifier_versions[verifier.id],
                        "kwargs": self.verifier_kwargs[verifier.id],
                        "norm": norm,
                        "eps": eps,
                        "n_eval": self.spec.n_eval,
                        "batch_size": self.spec.batch_size,
                        "libraries": self._libraries,
                        "environment": self.environment,
                        "harness": RESULTS_VERSION,
                    }
                    jobs.append(
                        VerificationJob(
                            digest(payload),
                            training,
                            verifier.id,
                            self.verifier_versions[verifier.id],
                            dict(self.verifier_kwargs[verifier.id]),
                            norm,
                            float(eps),
                            self.spec.n_eval,
                            self.spec.batch_size,
                            evaluation["clean_mask"],
                        )
                    )
        return jobs

    def _cell_job(
        self,
        training: TrainingJob,
        evaluation: Mapping[str, Any],
        attack: AttackSpec,
        kwargs: Mapping[str, Any],
        eps: float,
        bpda_fallback: bool,
        surrogate: TrainingJob | None,
        after: list[str] | None = None,
        member_versions: tuple[tuple[str, str], ...] = (),
    ) -> CellJob:
        payload = {
            "training": training.training_key,
            "attack": attack.id,
            "version": self.attack_versions[attack.id],
            "kwargs": kwargs,
            "eps": eps,
            "n_eval": self.spec.n_eval,
            "bpda_fallback": bpda_fallback,
            "surrogate": surrogate.training_key if surrogate else None,
            # The seeded stream is drawn batch by batch: another batch size, other examples.
            "batch_size": self.spec.batch_size,
            "libraries": self._libraries,
            "environment": self.environment,
            "harness": RESULTS_VERSION,
        }
        if after is not None:
            payload["members"] = after
            payload["member_versions"] = [list(pair) for pair in member_versions]
        return CellJob(
            cell_key=digest(payload),
            training=training,
            attack_id=attack.id,
            attack_version=self.attack_versions[attack.id],
            attack_kwargs=dict(kwargs),
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
            members=tuple(after) if after is not None else None,
            member_versions=member_versions,
        )

    # -------------------------------------------------------------------------------- run
    def run(self, store: Store, only_defenses: list[str] | None = None, shard: Shard | None = None) -> RunSummary:
        """Compute what ``store`` lacks (for ``only_defenses`` and this ``shard``'s cells, if given)
        and store each result the moment the executor hands it back.

        Work is pipelined by dependency: a defense is evaluated as soon as its checkpoint exists, and
        its cells are planned as soon as it is evaluated (and its seed's surrogate is trained), so a
        slow training holds up only its own cells. A training or evaluation that fails is recorded
        and costs only that defense's cells; a failed cell costs only itself."""
        if self.executor is None:
            raise RuntimeError("Runner.run needs an executor")
        self.store = store
        self._summary = RunSummary(notes=list(self.notes))
        self._shard = shard
        self._record_attacks()
        chosen = DEFENSES.select(only_defenses) if only_defenses else self.defenses
        self.validate_defenses(chosen)  # type: ignore[arg-type]
        trainings = [self.training_job(d, seed) for seed in self.spec.seeds for d in chosen]
        self._surrogates: dict[int, TrainingJob] = {}
        if self.surrogate_id is not None:
            surrogate = DEFENSES.get(self.surrogate_id)
            self._surrogates = {seed: self.training_job(surrogate, seed) for seed in self.spec.seeds}  # type: ignore[arg-type]
        self._defense_keys = {job.training_key for job in trainings}
        self._in_flight: dict[str, TrainingJob | EvaluationJob] = {}
        self._labels: dict[str, str] = {}
        self._ready: set[str] = set()
        self._unusable_trainings: dict[str, str] = {}
        self._waiting_for_surrogate: dict[int, list[tuple[TrainingJob, Mapping[str, Any]]]] = {}
        self._waiting_cascades: dict[str, tuple[CellJob, set[str]]] = {}
        self.progress.start_cells(0)
        needed = list({job.training_key: job for job in [*self._surrogates.values(), *trainings]}.values())
        needed.sort(key=lambda job: job.declared_length, reverse=True)  # longest first (stable otherwise)
        for job in shard.rotate(needed) if shard else needed:
            self._start_training(job)
        while self.executor.pending():
            self._handle(self.executor.next_finished())
        if self._waiting_cascades:  # pragma: no cover - every member resolves; a leftover is a bug
            raise RuntimeError(f"cascades left waiting for their members: {sorted(self._waiting_cascades)}")
        self.progress.close()
        return self._summary

    def _record_attacks(self) -> None:
        for attack in self.attacks:
            described = attack.describe(self.spec.dataset)
            described["kwargs"] = self.attack_kwargs[attack.id]
            described["budget"] = vars(attack.budget(self.attack_kwargs[attack.id]))
            self.store.put_attack(attack.id, self.attack_versions[attack.id], attack.source, described)

    def _handle(
        self, outcome: TrainingRecord | EvaluationRecord | CellRecord | VerificationRecord | JobFailure
    ) -> None:
        if isinstance(outcome, VerificationRecord):
            self._verification_finished(outcome)
        elif isinstance(outcome, JobFailure):
            self._job_failed(outcome.job, outcome.error)
        elif isinstance(outcome, TrainingRecord):
            self._training_finished(outcome)
        elif isinstance(outcome, EvaluationRecord):
            self._evaluation_finished(outcome)
        else:
            self._cell_finished(outcome)

    # ---------------------------------------------------------------------------- trainings
    def _start_training(self, job: TrainingJob) -> None:
        if self._checkpoint_ready(job):
            self._trained(job)
            return
        failure = self.store.failure(job.training_key)
        if failure is not None and not self.retry_failed:
            self._unusable(job, f"training failed: {failure['error']}")
            return
        self._in_flight[job.training_key] = job
        self.executor.submit(job)

    def _training_finished(self, record: TrainingRecord) -> None:
        job = self._in_flight.pop(record.training_key)
        assert isinstance(job, TrainingJob)
        expected = DEFENSES.get(job.defense_id).code_version()
        if record.defense_version != expected:
            self._job_failed(
                job,
                f"the worker's code of {job.defense_id} (version {record.defense_version}) differs from the "
                f"driver's ({expected}); install the same code on every worker",
            )
            return
        self.store.put_training(record)
        self.store.clear_failure(job.training_key)
        if is_pretrained(DEFENSES.get(job.defense_id)):
            self._summary.loaded += 1
        else:
            self._summary.trained += 1
        self._trained(job)

    def _trained(self, job: TrainingJob) -> None:
        self._ready.add(job.training_key)
        if job.training_key in self._defense_keys:
            self._start_evaluation(job)
        self._release_waiting(job)

    def _release_waiting(self, job: TrainingJob) -> None:
        """Plan the cells of defenses that were waiting for this (surrogate) training to resolve."""
        for seed, surrogate in self._surrogates.items():
            if surrogate.training_key == job.training_key:
                for training, evaluation in self._waiting_for_surrogate.pop(seed, []):
                    self._plan_cells(training, evaluation)

    # -------------------------------------------------------------------------- evaluations
    def _start_evaluation(self, training: TrainingJob) -> None:
        job = self.evaluation_job(training)
        row = self.store.evaluation(job.eval_key)
        if row is not None:
            self._evaluated(training, row)
            return
        failure = self.store.failure(job.eval_key)
        if failure is not None and not self.retry_failed:
            self._unusable(training, f"evaluation failed: {failure['error']}")
            return
        self._in_flight[job.eval_key] = job
        self.executor.submit(job)

    def _evaluation_finished(self, record: EvaluationRecord) -> None:
        job = self._in_flight.pop(record.eval_key)
        assert isinstance(job, EvaluationJob)
        self.store.put_evaluation(record)
        self.store.clear_failure(record.eval_key)
        self._summary.evaluated += 1
        self._evaluated(job.training, self.store.evaluation(record.eval_key))

    def _evaluated(self, training: TrainingJob, evaluation: Mapping[str, Any]) -> None:
        surrogate = self._surrogates.get(training.seed)
        if surrogate is not None and not self._resolved(surrogate):
            self._waiting_for_surrogate.setdefault(training.seed, []).append((training, evaluation))
            return
        self._plan_cells(training, evaluation)

    def _resolved(self, training: TrainingJob) -> bool:
        return training.training_key in self._ready or training.training_key in self._unusable_trainings

    # -------------------------------------------------------------------------------- cells
    def _plan_verifications(self, training: TrainingJob, evaluation: Mapping[str, Any]) -> None:
        jobs = self.verification_jobs(training, evaluation)
        if self._shard is not None:
            jobs = [j for j in jobs if self._shard.owns(j.group_key)]
        status = self.store.verification_status([j.verification_key for j in jobs])
        todo = [j for j in jobs if status.get(j.verification_key) not in ("ok", "unsupported")]
        todo = [j for j in todo if status.get(j.verification_key) != "failed" or self.retry_failed]
        self._summary.skipped += len(jobs) - len(todo)
        self.progress.more_cells(len(todo))
        for job in todo:
            self._labels[job.verification_key] = job.label
            self.executor.submit(job)  # type: ignore[union-attr]

    def _verification_finished(self, record: VerificationRecord) -> None:
        self.store.put_verification(record)
        self._summary.computed += 1
        label = self._labels.pop(record.verification_key, record.verification_key)
        if record.status == "failed":
            self._summary.failed.append((label, record.error or "unknown error"))
            self.progress.cell_done(label, f"FAILED ({record.error})")
        elif record.status == "unsupported":
            self.progress.cell_done(label, str(record.error))
        else:
            certified = float(np.mean(record.certified_mask)) if record.certified_mask is not None else 0.0
            self.progress.cell_done(label, f"certified {certified:.3f}")

    def _plan_cells(self, training: TrainingJob, evaluation: Mapping[str, Any]) -> None:
        if self.verifiers:
            self._plan_verifications(training, evaluation)
        cells = self.cell_jobs(training, evaluation, self._surrogates)
        if self._shard is not None:
            cells = [c for c in cells if self._shard.owns(c.group_key)]
        self._summary.cell_keys.extend(c.cell_key for c in cells)
        status = self.store.cell_status([c.cell_key for c in cells])
        todo = []
        for cell in cells:
            state = status.get(cell.cell_key)
            if state == "ok" or (state == "failed" and not self.retry_failed):
                self._summary.skipped += 1
                if state == "failed":
                    self._summary.failed.append((cell.label, self._failure_reason(cell.cell_key)))
            else:
                todo.append(cell)
        self.progress.more_cells(len(todo))
        todo_keys = {cell.cell_key for cell in todo}
        for cell in todo:
            self._labels[cell.cell_key] = cell.label
            unusable = self._unusable_trainings.get(cell.surrogate.training_key) if cell.surrogate else None
            if unusable is not None:
                self._cell_finished(failed_cell(cell, f"its surrogate {self.surrogate_id} is unusable: {unusable}"))
            elif cell.members is not None:
                pending = {k for k in cell.members if k in todo_keys and k not in self._summary.computed_keys}
                self._waiting_cascades[cell.cell_key] = (cell, pending)
                self._release_cascades()
            else:
                self.executor.submit(cell)

    def _release_cascades(self, finished: str | None = None) -> None:
        """Submit every cascade whose members' cells are all resolved, with their shared robust mask."""
        for key, (cell, waiting) in list(self._waiting_cascades.items()):
            waiting.discard(finished)  # type: ignore[arg-type]
            if not waiting:
                del self._waiting_cascades[key]
                self.executor.submit(replace(cell, prior_robust=self._members_robust(cell)))

    def _members_robust(self, cascade: CellJob) -> bytes:
        """Examples robust under every member's stored cell (failed members contribute nothing)."""
        robust = decode_mask(cascade.clean_mask, cascade.n_eval)
        for row in self.store.cells_by_key(cascade.members or ()):
            if row["status"] == "ok":
                robust = robust & decode_mask(row["robust_mask"], cascade.n_eval)
        return encode_mask(robust)

    def _cell_finished(self, record: CellRecord) -> None:
        self.store.put_cell(record)
        self._summary.computed += 1
        self._summary.computed_keys.add(record.cell_key)
        label = self._labels.pop(record.cell_key, record.cell_key)
        if record.status == "failed":
            self._summary.failed.append((label, record.error or "unknown error"))
            self.progress.cell_done(label, f"FAILED ({record.error})")
        else:
            accuracy = float(np.mean(record.robust_mask)) if record.robust_mask is not None else float("nan")
            self.progress.cell_done(label, f"robust accuracy {accuracy:.3f}")
        if self._waiting_cascades:
            self._release_cascades(record.cell_key)

    # ------------------------------------------------------------------------------ failures
    def _job_failed(self, job: TrainingJob | EvaluationJob, error: str) -> None:
        """A training or evaluation raised: record it; the defense's cells cannot run."""
        if isinstance(job, TrainingJob):
            key, kind, training = job.training_key, "training", job
        else:
            key, kind, training = job.eval_key, "evaluation", job.training
        self._in_flight.pop(key, None)
        self.store.put_failure(key, kind, training.defense_id, training.dataset, training.seed, error)
        self._unusable(training, f"{kind} failed: {error}")

    def _unusable(self, training: TrainingJob, reason: str) -> None:
        """This defense (seed) has no usable model: report it once, skip its cells, and let the
        defenses waiting for it as a surrogate go on (their transfer cells fail with the reason)."""
        self._unusable_trainings[training.training_key] = reason
        self._summary.failed.append((f"{training.defense_id} (seed {training.seed}): none of its cells ran", reason))
        self._release_waiting(training)

    def _checkpoint_ready(self, job: TrainingJob) -> bool:
        """Trained already: the database knows the training and its checkpoint file is that training's
        (its key inside, and the sha256 the database recorded for it). A file that is not is moved
        aside with a warning and the defense retrained: never evaluate another model under its key."""
        row = self.store.training(job.training_key)
        path = checkpoint_dir(self.store.path) / job.checkpoint
        if row is None or not path.exists():
            return False
        try:
            read_checkpoint(path, job.training_key, row["checkpoint_sha256"] or None)
        except RobustMatrixError as exc:
            path.replace(path.with_name(path.name + ".rejected"))
            print(f"robustmatrix: warning: {exc}; retraining {job.defense_id}", file=sys.stderr)
            return False
        return True

    def _failure_reason(self, cell_key: str) -> str:
        row = self.store.connection.execute("SELECT error FROM cells WHERE cell_key = ?", (cell_key,)).fetchone()
        return row["error"] if row else "unknown error"
