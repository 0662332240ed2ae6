"""What the leaderboard computes: per-cell robust accuracy with Wilson intervals, the per-example
worst case per threat model ("best known" robust accuracy), seen vs unseen threat models, and the
competitive ratio of MultiRobustBench.

Worst case is per example — an example counts as robust only if *every* attack at that threat
model failed on it — then averaged: the mean of the minimum, never the minimum of the means
(Carlini et al. 2019). With several seeds the examples of all seeds are pooled. Threat models of one
norm are nested: an adversarial example found within a smaller eps lies inside every larger ball,
so it counts at every larger eps too, and the worst case never rises with eps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leaderboard.results import Cell

Z_95 = 1.959963984540054
WHITE_BOX = ("gradient", "adaptive")
"""Families that see the model's gradients: only these can make a cell *seen* — a defense trained
against a threat model has not been trained against black-box, transfer or noise attacks."""
LP_NORMS = ("linf", "l2", "l1")


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Estimate:
    """A pooled robust accuracy: value, 95% Wilson interval, and the number of examples behind it."""

    value: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, masks: Sequence[np.ndarray]) -> Estimate:
        n = int(sum(len(m) for m in masks))
        successes = int(sum(int(m.sum()) for m in masks))
        low, high = wilson_interval(successes, n)
        return cls(successes / n if n else float("nan"), low, high, n)

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def is_seen(family: str, norm: str, eps: float, trained_against: Iterable[Mapping[str, Any]]) -> bool:
    """A white-box cell inside a threat model the defense declares it was trained against."""
    return family in WHITE_BOX and threat_is_seen(norm, eps, trained_against)


def threat_is_seen(norm: str, eps: float, trained_against: Iterable[Mapping[str, Any]]) -> bool:
    """A threat model inside one the defense declares it was trained against (any attack)."""
    return any(t["norm"] == norm and eps <= float(t["eps"]) + 1e-12 for t in trained_against)


def threat_label(norm: str, eps: float) -> str:
    return f"{norm} {eps:g}"


def column_label(attack_id: str, norm: str, eps: float) -> str:
    return f"{attack_id} {norm} {eps:g}"


Masks = dict[int, np.ndarray]
"""Per-example boolean masks of one cell or threat model, by seed (seeds are evaluated on the same
examples, so two cells' masks of a seed are paired example by example)."""


def _grouped(records: Iterable[Any], key: Any) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = {}
    for record in records:
        out.setdefault(key(record), []).append(record)
    return out


REFERENCE = "reference"
"""The family of a reference evaluation (AutoAttack itself): compared with the worst case, never
part of it — a benchmark is not graded with the oracle it is checked against."""


def worst_case(records: Sequence[Cell]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per threat model: the pooled per-example worst case over every attack at that eps or a smaller
    one of the same norm (reference evaluations excluded), the attack that contributes most to it,
    and the reference evaluation at that eps, if the matrix ran one. ``masks`` holds the
    per-example worst case by seed.

    The *strongest attack* is the one whose removal would raise the worst case the most (the
    examples only it broke, nested over eps); ``strongest_margin`` is that raise. A cascade's cell
    starts from what the other cells broke, so only its own breaks count as its contribution. Ties
    go to adaptive attacks (what broke a defense that needed them), then to the lower mean."""
    own = [r for r in records if r.family != REFERENCE]
    references = [r for r in records if r.family == REFERENCE]
    out = {}
    by_threat = _grouped(own, lambda r: (str(r.norm), float(r.eps)))
    for (norm, eps), group in sorted(by_threat.items()):
        within = [r for (n, e), rows in by_threat.items() if n == norm and e <= eps for r in rows]
        seeds = sorted({int(r.seed) for r in group})
        # One section holds one n_eval: a seed's masks cover the same examples at every eps.
        contributions = _own_breaks(within)
        masks = {seed: np.logical_and.reduce([m for (_, s), m in contributions.items() if s == seed]) for seed in seeds}
        estimate = Estimate.of(list(masks.values()))
        raised: dict[str, int] = {}
        for attack in {r.attack_id for r in group}:
            without = {
                seed: np.logical_and.reduce(
                    [m for (a, s), m in contributions.items() if s == seed and a != attack]
                    or [np.ones_like(masks[seed])]
                )
                for seed in seeds
            }
            raised[str(attack)] = int(sum(int(without[s].sum()) - int(masks[s].sum()) for s in seeds))
        means = {
            str(attack): float(np.mean([r.robust_accuracy for r in rows]))
            for attack, rows in _grouped(group, lambda r: r.attack_id).items()
        }
        families = {str(r.attack_id): str(r.family) for r in group}
        strongest = min(raised, key=lambda a: (-raised[a], families[a] != "adaptive", means[a], a))
        out[(norm, eps)] = {
            "estimate": estimate,
            "masks": masks,
            "strongest_attack": strongest,
            "strongest_margin": raised[strongest] / max(1, estimate.n),
            "attacks": len({r.attack_id for r in group}),
            "reference": _reference(references, norm, eps, masks),
        }
    return out


def _own_breaks(within: Sequence[Cell]) -> dict[tuple[str, int], np.ndarray]:
    """Per (attack, seed): the robust mask that shows only what that attack broke itself, AND-ed over
    the eps it ran at. A cascade's stored mask also marks what the other cells at its eps or a
    smaller one broke (it attacked only their survivors); those examples are given back to it here."""
    plain = [r for r in within if not r.cascade]
    out: dict[tuple[str, int], np.ndarray] = {}
    for r in within:
        mask = r.robust
        if r.cascade:
            others = [o.robust for o in plain if o.seed == r.seed and o.norm == r.norm and o.eps <= r.eps]
            if others:
                mask = mask | ~np.logical_and.reduce(others)
        key = (str(r.attack_id), int(r.seed))
        out[key] = mask if key not in out else out[key] & mask
    return out


def _reference(
    references: Sequence[Cell], norm: str, eps: float, worst: Mapping[int, np.ndarray]
) -> dict[str, Any] | None:
    """The reference evaluation at exactly this threat model, and how many examples it broke that the
    worst case left robust (``beyond``, with their positions in the evaluation set per seed)."""
    here = [r for r in references if r.norm == norm and float(r.eps) == eps and int(r.seed) in worst]
    if not here:
        return None
    attack = sorted({str(r.attack_id) for r in here})[0]
    masks = {int(r.seed): r.robust for r in here if r.attack_id == attack}
    beyond = {seed: np.flatnonzero(worst[seed] & ~mask).tolist() for seed, mask in masks.items()}
    return {
        "attack": attack,
        **Estimate.of(list(masks.values())).as_dict(),
        "beyond": int(sum(len(ids) for ids in beyond.values())),
        "beyond_examples": {str(seed): ids for seed, ids in beyond.items() if ids},
    }


def cell_masks(records: Sequence[Cell]) -> dict[tuple[str, str, float], Masks]:
    """Per (attack, norm, eps): the robust mask of each seed, for paired comparisons between cells."""
    out: dict[tuple[str, str, float], Masks] = {}
    for r in records:
        out.setdefault((str(r.attack_id), str(r.norm), float(r.eps)), {})[int(r.seed)] = r.robust
    return out


def cell_table(records: Sequence[Cell], trained_against: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (attack, eps) column of a defense, pooled over seeds."""
    rows = []
    columns = _grouped(records, lambda r: (str(r.attack_id), str(r.family), str(r.norm), float(r.eps)))
    for (attack_id, family, norm, eps), group in columns.items():
        estimate = Estimate.of([r.robust for r in group])
        steps = [r.steps for r in group if r.steps is not None]
        rows.append(
            {
                "attack": attack_id,
                "family": family,
                "norm": norm,
                "eps": eps,
                "steps": int(steps[0]) if steps else None,
                "cascade": any(bool(r.cascade) for r in group),
                "seen": is_seen(family, norm, eps, trained_against),
                "robust_accuracy": estimate.value,
                "ci_low": estimate.low,
                "ci_high": estimate.high,
                "n": estimate.n,
                "wall_time": float(sum(r.wall_time for r in group)),
                "forwards": int(sum(r.forwards for r in group)),
                "backwards": int(sum(r.backwards for r in group)),
            }
        )
    return sorted(rows, key=lambda r: (r["norm"], r["eps"], r["attack"]))


RATIO_FLOOR = 0.05
"""The competitive ratio is left undefined on a column where no defense keeps this much robust
accuracy: near zero one example decides it (0.004 vs 0.000 would read as a ratio of 0)."""


def add_relative_robustness(
    entries_by_defense: Mapping[str, list[dict[str, Any]]], key: Sequence[str], value: str
) -> None:
    """Competitive ratio per column (MultiRobustBench): a defense's accuracy / the best defense's on
    that column, stored as ``relative``; None where the best is below RATIO_FLOOR. A column
    is the tuple of ``key`` fields: (attack, norm, eps) for cells, (norm, eps) for threat models."""
    best: dict[tuple, float] = {}
    for entries in entries_by_defense.values():
        for entry in entries:
            column = tuple(entry[k] for k in key)
            best[column] = max(best.get(column, 0.0), entry[value])
    for entries in entries_by_defense.values():
        for entry in entries:
            top = best[tuple(entry[k] for k in key)]
            entry["relative"] = entry[value] / top if top >= RATIO_FLOOR else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def generalization(cells: Sequence[Mapping[str, Any]], threats: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Seen vs unseen summary of one defense.

    ``seen`` / ``unseen``: mean robust accuracy over seen cells (white-box attacks inside a trained-for
    threat model) / over every other cell. They are descriptive only: the unseen cells include noise,
    transfer and black-box attacks that seen cells never do, so the two means measure different
    attack mixes and their difference is not a generalization gap.

    ``seen_worst_case`` / ``unseen_worst_case``: mean of the per-example worst case (best-known robust
    accuracy) over the seen / unseen *threat models*. The same estimator on both sides — every attack
    of a threat model counts, whatever its family — so ``gap`` = seen_worst_case - unseen_worst_case
    and ``ratio`` = unseen_worst_case / seen_worst_case compare like with like.

    ``relative_*``: the average and worst competitive ratio over seen and unseen threat models, taken
    on the per-example worst case — per-attack columns would compare against a masked defense's
    inflated number under an attack that cannot see through it."""
    seen_mean = _mean([r["robust_accuracy"] for r in cells if r["seen"]])
    unseen_mean = _mean([r["robust_accuracy"] for r in cells if not r["seen"]])
    seen_worst = _mean([t["value"] for t in threats if t["seen"]])
    unseen_worst = _mean([t["value"] for t in threats if not t["seen"]])
    relative_seen = [t["relative"] for t in threats if t["seen"] and t.get("relative") is not None]
    relative_unseen = [t["relative"] for t in threats if not t["seen"] and t.get("relative") is not None]
    both = seen_worst is not None and unseen_worst is not None
    return {
        "seen": seen_mean,
        "unseen": unseen_mean,
        "seen_worst_case": seen_worst,
        "unseen_worst_case": unseen_worst,
        "gap": seen_worst - unseen_worst if both else None,
        "ratio": unseen_worst / seen_worst if both and seen_worst > 0 else None,
        "relative_seen_avg": _mean(relative_seen),
        "relative_seen_worst": min(relative_seen) if relative_seen else None,
        "relative_unseen_avg": _mean(relative_unseen),
        "relative_unseen_worst": min(relative_unseen) if relative_unseen else None,
    }


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact up to float rounding: the tail is summed from its
    boundary term away from the mode (terms only shrink, so nothing overflows and the sum stops
    once they no longer matter); the lower tail gives 1 - P(X <= k - 1) when k is below the mean."""
    if k <= 0 or p >= 1:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    odds = p / (1 - p)

    def boundary(i: int) -> float:
        return math.exp(
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * math.log(p)
            + (n - i) * math.log1p(-p)
        )

    term = total = 1.0
    if k > n * p:
        for i in range(k, n):
            term *= (n - i) / (i + 1) * odds
            total += term
            if term < 1e-17 * total:
                break
        return min(1.0, boundary(k) * total)
    for i in range(k - 1, 0, -1):
        term *= i / (n - i + 1) / odds
        total += term
        if term < 1e-17 * total:
            break
    return max(0.0, 1.0 - boundary(k - 1) * total)


def paired_counts(winner: Masks, loser: Masks) -> tuple[int, int]:
    """Examples of the seeds both cells ran on that survive ``loser`` but not ``winner`` (``winner``
    broke them and ``loser`` did not), and the reverse — the discordant pairs of McNemar's test."""
    common = sorted(set(winner) & set(loser))
    only_winner = sum(int(np.count_nonzero(loser[s] & ~winner[s])) for s in common)
    only_loser = sum(int(np.count_nonzero(winner[s] & ~loser[s])) for s in common)
    return only_winner, only_loser


def mcnemar_one_sided(only_winner: int, only_loser: int) -> float:
    """Exact one-sided McNemar p-value: the chance of at least ``only_winner`` of the discordant pairs
    going the winner's way if both attacks were equally strong (Binomial(discordant, 1/2))."""
    return binomial_tail(only_winner, only_winner + only_loser, 0.5)
