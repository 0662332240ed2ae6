"""Synthetic results databases for leaderboard tests: written through the store's API, so they are
exactly what a run writes, with chosen per-example outcomes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.storage.store import CellRecord, EvaluationRecord, Store, TrainingRecord

QUIET = {
    "examples": 64,
    "randomized": False,
    "max_output_difference": 0.0,
    "probability_like": False,
    "zero_gradient_ce": 0.0,
    "zero_gradient_dlr": 0.0,
    "vanishing_gradient_ce": 0.0,
    "vanishing_gradient_dlr": 0.0,
    "num_classes": 10,
}
FAMILIES = {
    "fgsm-linf-v1": ("gradient", 1),
    "pgd-linf-v1": ("gradient", 20),
    "pgd-l2-v1": ("gradient", 20),
    "square-linf-v1": ("score-based", None),
    "transfer-pgd-linf-v1": ("transfer", 20),
    "noise-linf-v1": ("noise", None),
    "eot-pgd-linf-v1": ("adaptive", 20),
    "bpda-pgd-linf-v1": ("adaptive", 20),
    "pgd-margin-linf-v1": ("gradient", 20),
    "spatial-v1": ("decision-based", None),
}
NORMS = {"pgd-l2-v1": "l2", "spatial-v1": "spatial"}


@dataclass
class FakeDefense:
    name: str
    cells: Mapping[tuple[str, float], float | np.ndarray]
    """(attack id, eps) -> robust accuracy (a prefix of the clean-correct examples) or an exact mask."""
    clean: float = 1.0
    trained_against: Sequence[Mapping[str, Any]] = ()
    nature: Mapping[str, Any] = field(default_factory=dict)
    observed: Mapping[str, Any] = field(default_factory=dict)
    source: str = "builtin"
    seeds: Sequence[int] = (0,)
    failed: Sequence[tuple[str, float]] = ()
    """(attack id, eps) cells recorded as failed (status "failed", no masks)."""
    n_eval: int | None = None
    """Evaluation size of this defense (default: the database's ``n``)."""


def _mask(n: int, fraction: float) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[: int(round(fraction * n))] = True
    return mask


def write_database(
    path: Path,
    defenses: Sequence[FakeDefense],
    n: int = 100,
    attacks: Mapping[str, tuple[str, int | None, str]] | None = None,
) -> Path:
    """Write ``defenses`` into a new database at ``path``. ``attacks`` maps further attack ids to
    (family, declared steps, norm); the ids of FAMILIES need no entry."""
    known = {a: (family, steps, NORMS.get(a, "linf")) for a, (family, steps) in FAMILIES.items()}
    known.update(attacks or {})
    nature_defaults = {
        "randomized": False,
        "differentiable": True,
        "bpda_approximation": None,
        "outputs_logits": True,
        "saturates_softmax": False,
    }
    with Store.open(path) as store:
        for attack_id, (family, steps, _) in known.items():
            store.put_attack(attack_id, "v", "builtin", {"family": family, "budget": {"steps": steps}, "kwargs": {}})
        store.put_attack(
            "adaptive-worst-case-linf-v1",
            "v",
            "builtin",
            {"family": "adaptive", "budget": {}, "kwargs": {"members": []}},
        )
        for defense in defenses:
            size = defense.n_eval or n
            for seed in defense.seeds:
                key = f"{defense.name}/{seed}"
                store.put_training(
                    TrainingRecord(
                        key,
                        defense.name,
                        "v",
                        defense.source,
                        "digits",
                        seed,
                        {"epochs": 1},
                        list(defense.trained_against),
                        {**nature_defaults, **defense.nature},
                        "small-cnn",
                        "x.pt",
                        1,
                        1.5,
                        1000,
                        900,
                        "cpu",
                        {"torch": "x"},
                    )
                )
                clean = _mask(size, defense.clean)
                store.put_evaluation(
                    EvaluationRecord(f"{key}/e{size}", key, size, clean, {**QUIET, **defense.observed})
                )
                outcomes = [*defense.cells.items(), *((cell, None) for cell in defense.failed)]
                for (attack_id, eps), outcome in outcomes:
                    attack = attack_id.split("@")[0]
                    family, _, norm = known.get(attack, ("adaptive", None, "linf"))
                    robust = outcome if isinstance(outcome, np.ndarray) or outcome is None else _mask(size, outcome)
                    store.put_cell(
                        CellRecord(
                            f"{key}/{attack}/{eps}/{size}",
                            key,
                            "digits",
                            defense.name,
                            attack,
                            "v",
                            {},
                            family,
                            norm,
                            float(eps),
                            True,
                            seed,
                            size,
                            "ok" if robust is not None else "failed",
                            None if robust is not None else "RuntimeError: boom",
                            clean if robust is not None else None,
                            robust & clean if robust is not None else None,
                            0.1,
                            10,
                            10,
                            0.01,
                            "cpu",
                            {},
                        )
                    )
    return path
