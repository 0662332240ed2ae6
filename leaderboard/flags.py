"""Gradient-masking diagnostics: the signs Carlini et al. (2019) and AutoAttack check for, computed
from a defense's cells and the runner's probes, each with the evidence that triggered it.

Accuracies are fractions; margins keep one example's worth of noise from raising a flag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SINGLE_STEP_MARGIN = 0.02
"""Single-step beats iterative: the best single-step attack is this far below the best iterative one."""
BLACK_BOX_MARGIN = 0.02
"""Black-box, transfer or noise beats white-box by more than this."""
EPS_RISE_MARGIN = 0.02
"""An attack's accuracy at a larger eps exceeds its accuracy at a smaller eps by more than this."""
NEAR_CHANCE_MARGIN = 0.15
"""At the largest eps of an Lp norm, the worst case should be within this of chance (1 / classes)."""
ADAPTIVE_MARGIN = 0.05
"""An adaptive attack (EOT, BPDA, logit-space; not the cascade) beats every standard white-box
attack at a threat model by more than 5 points: "standard evaluation unreliable"."""

BLACK_BOX = ("score-based", "decision-based", "transfer", "noise")

FLAGS = {
    "single-step-beats-iterative": "a single-step attack beats every iterative one",
    "black-box-beats-white-box": "a black-box, transfer or noise attack beats every white-box one",
    "accuracy-rises-with-eps": "robust accuracy rises with eps",
    "not-near-chance": "the largest eps does not bring accuracy near chance",
    "standard-evaluation-unreliable": "an adaptive attack beats the standard white-box ones by more than 5 points",
    "zero-gradients": "input gradients vanish on some examples",
    "probability-outputs": "outputs look like probabilities",
    "undeclared-randomness": "outputs change between identical forward passes, not declared randomized",
    "clean-near-chance": "clean accuracy is near chance: training failed, robust accuracy means nothing",
}
"""Stable keys (used in the JSON and by the nightly report) and their one-line meaning."""


@dataclass(frozen=True)
class Flag:
    key: str
    evidence: str

    @property
    def title(self) -> str:
        return FLAGS[self.key]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return min(rows, key=lambda r: r["robust_accuracy"]) if rows else None


def _by_threat(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float], list[Mapping[str, Any]]]:
    grouped: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["norm"], row["eps"]), []).append(row)
    return dict(sorted(grouped.items()))


def _beats(key: str, winners: Sequence, losers: Sequence, margin: float, where: str) -> Flag | None:
    winner, loser = _best(winners), _best(losers)
    if winner is None or loser is None or winner["robust_accuracy"] >= loser["robust_accuracy"] - margin:
        return None
    return Flag(
        key,
        f"{winner['attack']} {_pct(winner['robust_accuracy'])} vs {loser['attack']} "
        f"{_pct(loser['robust_accuracy'])} at {where}",
    )


def _first_per_key(found: list[Flag]) -> list[Flag]:
    """One flag per key; the evidence of the first threat model that raised it, plus a count."""
    out: dict[str, list[Flag]] = {}
    for flag in found:
        out.setdefault(flag.key, []).append(flag)
    result = []
    for key, flags in out.items():
        more = f" (and {len(flags) - 1} more threat model{'s' if len(flags) > 2 else ''})" if len(flags) > 1 else ""
        result.append(Flag(key, flags[0].evidence + more))
    return result


def masking_flags(
    rows: Sequence[Mapping[str, Any]],
    worst: Mapping[tuple[str, float], Mapping[str, Any]],
    observed: Mapping[str, Any],
    nature: Mapping[str, Any],
    num_classes: int,
    clean: float | None = None,
) -> list[Flag]:
    """Every diagnostic that fires for one defense, in the order of FLAGS."""
    found: list[Flag] = []
    if clean is not None and clean <= 1.0 / num_classes + NEAR_CHANCE_MARGIN:
        found.append(Flag("clean-near-chance", f"clean accuracy {_pct(clean)} (chance {_pct(1.0 / num_classes)})"))
    for (norm, eps), group in _by_threat(rows).items():
        where = f"{norm} {eps:g}"
        gradient = [r for r in group if r["family"] == "gradient"]
        single = [r for r in gradient if r.get("steps") == 1]
        iterative = [r for r in gradient if (r.get("steps") or 0) > 1]
        for flag in (
            _beats("single-step-beats-iterative", single, iterative, SINGLE_STEP_MARGIN, where),
            _beats(
                "black-box-beats-white-box",
                [r for r in group if r["family"] in BLACK_BOX],
                gradient,
                BLACK_BOX_MARGIN,
                where,
            ),
            _beats(
                "standard-evaluation-unreliable",
                [r for r in group if r["family"] == "adaptive" and not r.get("cascade")],
                gradient,
                ADAPTIVE_MARGIN,
                where,
            ),
        ):
            if flag is not None:
                found.append(flag)
    by_attack: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_attack.setdefault((row["attack"], row["norm"]), []).append(row)
    for (attack, norm), series in sorted(by_attack.items()):
        series = sorted(series, key=lambda r: r["eps"])
        for smaller, larger in zip(series, series[1:], strict=False):
            if larger["robust_accuracy"] > smaller["robust_accuracy"] + EPS_RISE_MARGIN:
                found.append(
                    Flag(
                        "accuracy-rises-with-eps",
                        f"{attack}: {_pct(smaller['robust_accuracy'])} at {norm} {smaller['eps']:g} but "
                        f"{_pct(larger['robust_accuracy'])} at {larger['eps']:g}",
                    )
                )
    chance = 1.0 / num_classes
    for norm in sorted({n for n, _ in worst if n in ("linf", "l2", "l1")}):
        largest = max(eps for n, eps in worst if n == norm)
        value = worst[(norm, largest)]["estimate"].value
        if value > chance + NEAR_CHANCE_MARGIN:
            found.append(
                Flag("not-near-chance", f"worst case {_pct(value)} at {norm} {largest:g} (chance {_pct(chance)})")
            )
    ce, dlr = observed.get("vanishing_gradient_ce", 0.0), observed.get("vanishing_gradient_dlr", 0.0)
    zero = max(observed.get("zero_gradient_ce", 0.0), observed.get("zero_gradient_dlr", 0.0))
    if ce > 0 or dlr > 0:
        found.append(
            Flag(
                "zero-gradients",
                f"input gradients vanish on {_pct(ce)} of probed examples (cross-entropy) and {_pct(dlr)} (DLR); "
                f"exactly zero on {_pct(zero)}",
            )
        )
    if observed.get("probability_like"):
        found.append(Flag("probability-outputs", "outputs lie in [0, 1] and sum to 1"))
    if observed.get("randomized") and not nature.get("randomized"):
        found.append(
            Flag(
                "undeclared-randomness",
                f"identical forward passes differ by up to {observed.get('max_output_difference', 0.0):.3g}",
            )
        )
    order = list(FLAGS)
    return sorted(_first_per_key(found), key=lambda f: order.index(f.key))
