"""Units of work, as plain picklable data: what an executor ships to a worker.

A job names components by id and carries resolved kwargs, never live objects, so any executor (in
process, Ray task, Slurm shard) can run it from the registry alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.foundation.keys import digest


@dataclass(frozen=True)
class TrainingJob:
    training_key: str
    defense_id: str
    kwargs: dict[str, Any]
    dataset: str
    seed: int
    checkpoint: str  # file name inside the checkpoint directory
    precision: str = "fp32"
    """``bf16``: trained under bfloat16 autocast (the matrix's ``training_precision``; keyed)."""

    @property
    def declared_length(self) -> int:
        """Epochs x (1 + attack steps) from the declared kwargs: a proxy of how long the training
        runs, so the runner starts the longest first and the last GPU is not left with one long pole."""

        def whole(name: str, default: int) -> int:
            value = self.kwargs.get(name, default)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

        return whole("epochs", 1) * (1 + whole("steps", 0))


@dataclass(frozen=True)
class EvaluationJob:
    eval_key: str
    training: TrainingJob
    n_eval: int


@dataclass(frozen=True)
class CellJob:
    cell_key: str
    training: TrainingJob
    attack_id: str
    attack_version: str
    attack_kwargs: dict[str, Any]
    family: str
    norm: str
    eps: float
    bounded: bool
    n_eval: int
    batch_size: int
    clean_mask: bytes
    bpda_fallback: bool
    """BPDA through the preprocessing with an identity backward, for a defense that was observed
    (not declared) to have vanishing gradients."""
    surrogate: TrainingJob | None
    timeout: float | None = None
    members: tuple[str, ...] | None = None
    """For a cascade: the cell keys of its members at this defense and eps, which it waits for."""
    member_versions: tuple[tuple[str, str], ...] = ()
    """For a cascade: (attack id, code version) of every member it runs, as the driver knows them."""
    prior_robust: bytes | None = None
    """For a cascade: the packed robust mask shared by its members' own cells of this defense and eps
    (an example any of them broke is broken here too), so the cascade attacks only the survivors and
    its robust accuracy is never above a member's. None for every other attack."""

    @property
    def group_key(self) -> str:
        """Cells that belong together — a defense's cells at one norm, every eps of which a cascade
        needs (the balls are nested) — share a group; shards split the matrix by group."""
        return digest({"training": self.training.training_key, "norm": self.norm})

    @property
    def label(self) -> str:
        return f"{self.training.defense_id} × {self.attack_id} @ {self.norm} {self.eps:g} (seed {self.training.seed})"


@dataclass(frozen=True)
class VerificationJob:
    """One verifier on one defense at one Lp threat model, over the clean-correct evaluation examples."""

    verification_key: str
    training: TrainingJob
    verifier_id: str
    verifier_version: str
    verifier_kwargs: dict[str, Any]
    norm: str
    eps: float
    n_eval: int
    batch_size: int
    clean_mask: bytes

    @property
    def group_key(self) -> str:
        """The shard group of the defense's cells at this norm: a shard keeps both or neither."""
        return digest({"training": self.training.training_key, "norm": self.norm})

    @property
    def label(self) -> str:
        return f"{self.training.defense_id} ⊢ {self.verifier_id} @ {self.norm} {self.eps:g} (seed {self.training.seed})"
